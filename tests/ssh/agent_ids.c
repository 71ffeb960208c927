/* Ask the ssh agent at $SSH_AUTH_SOCK (or argv[1]) for its identities and print
 * "identities=N": what tests/contexts.rs checks a RUN --mount=type=ssh step sees. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int read_full(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : getenv("SSH_AUTH_SOCK");
    if (!path) { fprintf(stderr, "no SSH_AUTH_SOCK\n"); return 2; }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror(path); return 3; }
    /* SSH_AGENTC_REQUEST_IDENTITIES (11), length-prefixed. */
    unsigned char req[5] = {0, 0, 0, 1, 11};
    if (write(fd, req, 5) != 5) { perror("write"); return 4; }
    unsigned char head[9];
    if (read_full(fd, head, 9) != 0 || head[4] != 12) { fprintf(stderr, "bad answer\n"); return 5; }
    unsigned n = (head[5] << 24) | (head[6] << 16) | (head[7] << 8) | head[8];
    printf("identities=%u\n", n);
    return 0;
}
