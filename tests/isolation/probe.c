/* An attacker inside a RUN step. Each check tries one escape and prints
 *   CHECK <name> refused <how>     when the sandbox stopped it, or
 *   CHECK <name> ESCAPED <what>    when it worked.
 * tests/isolation.rs compiles this statically (cc -static) and runs it in a step, under
 * each executor. Arguments: the host's loopback port to try, and the read-only bind mount
 * of the build context to try to write through. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

static void report(const char *name, int escaped, const char *detail) {
    printf("CHECK %s %s %s\n", name, escaped ? "ESCAPED" : "refused", detail);
    fflush(stdout);
}

static void refused_if(const char *name, long rc) {
    if (rc < 0)
        report(name, 0, strerror(errno));
    else
        report(name, 1, "the call succeeded");
}

/* "shocker": open the host file system's root inode through a bind-mounted host file. */
static void open_by_handle(void) {
    int mfd = open("/etc/resolv.conf", O_RDONLY);
    struct {
        struct file_handle fh;
        unsigned char bytes[8];
    } h;
    memset(&h, 0, sizeof h);
    h.fh.handle_bytes = 8;
    h.fh.handle_type = 1; /* FILEID_INO32_GEN */
    unsigned int ino = 2;  /* the root directory of ext2/3/4 */
    memcpy(h.fh.f_handle, &ino, sizeof ino);
    long fd = syscall(SYS_open_by_handle_at, mfd, &h.fh, O_RDONLY | O_DIRECTORY);
    refused_if("open_by_handle_at", fd);
}

static void tcp(const char *name, const char *addr, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, addr, &a.sin_addr);
    struct timeval tv = {2, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    refused_if(name, connect(s, (struct sockaddr *)&a, sizeof a));
    close(s);
}

static void write_file(const char *name, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0 && write(fd, "x\n", 2) == 2) {
        report(name, 1, path);
    } else {
        report(name, 0, strerror(errno));
    }
    if (fd >= 0)
        close(fd);
}

static void read_nonempty(const char *name, const char *path) {
    char buf[64];
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        report(name, 0, strerror(errno));
        return;
    }
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n > 0)
        report(name, 1, "read host data");
    else
        report(name, 0, n == 0 ? "empty" : strerror(errno));
}

static void list_nonempty(const char *name, const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        report(name, 0, strerror(errno));
        return;
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    report(name, n > 0, n > 0 ? "listed host entries" : "empty");
}

static int child_fn(void *arg) { (void)arg; return 0; }

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 1;
    const char *ctx = argc > 2 ? argv[2] : "/ctx";
    char path[512];

    mkdir("/tmp", 01777);
    mkdir("/mnt", 0755);
    open_by_handle();
    refused_if("mount_tmpfs", mount("none", "/tmp", "tmpfs", 0, NULL));
    refused_if("mount_proc", mount("proc", "/mnt", "proc", 0, NULL));
    refused_if("mount_sysfs", mount("sysfs", "/mnt", "sysfs", 0, NULL));
    refused_if("remount_bind_rw", mount(NULL, ctx, NULL, MS_REMOUNT | MS_BIND, NULL));
    refused_if("remount_root_suid_dev", mount(NULL, "/", NULL, MS_REMOUNT, NULL));
    refused_if("umount_proc_mask", umount2("/proc/kcore", MNT_DETACH));
    snprintf(path, sizeof path, "%s/written-by-step", ctx);
    write_file("write_context", path);
    write_file("write_proc_sys", "/proc/sys/kernel/core_pattern");
    write_file("write_sysrq", "/proc/sysrq-trigger");
    write_file("write_sys", "/sys/kernel/uevent_helper");
    read_nonempty("read_proc_kcore", "/proc/kcore");
    read_nonempty("read_proc_keys", "/proc/keys");
    read_nonempty("read_proc_timer_list", "/proc/timer_list");
    list_nonempty("list_sys_firmware", "/sys/firmware");
    /* Device nodes: the step may make them (as in docker), never use them. */
    mknod("/dev/kmsg2", S_IFCHR | 0600, makedev(1, 11));
    read_nonempty("read_dev_kmsg_made", "/dev/kmsg2");
    mknod("/kmsg3", S_IFCHR | 0600, makedev(1, 11));
    read_nonempty("read_kmsg_made_in_root", "/kmsg3");
    unlink("/kmsg3");
    mknod("/mem2", S_IFCHR | 0600, makedev(1, 1));
    read_nonempty("read_mem_made_in_root", "/mem2");
    unlink("/mem2");
    read_nonempty("read_dev_kmsg", "/dev/kmsg");
    refused_if("unshare_user", unshare(CLONE_NEWUSER));
    refused_if("unshare_mount", unshare(CLONE_NEWNS));
    refused_if("unshare_net", unshare(CLONE_NEWNET));
    {
        static char stack[65536];
        long pid = clone(child_fn, stack + sizeof stack, CLONE_NEWNS | SIGCHLD, NULL);
        if (pid > 0)
            waitpid(pid, NULL, 0);
        refused_if("clone_newns", pid);
    }
    refused_if("setns_pid1_net", setns(open("/proc/1/ns/net", O_RDONLY), 0) == 0 ? 0 : -1);
    refused_if("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0));
    refused_if("add_key", syscall(SYS_add_key, "user", "k", "v", 1, -3));
    refused_if("bpf", syscall(SYS_bpf, 0, NULL, 0));
    refused_if("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    refused_if("init_module", syscall(SYS_init_module, NULL, 0, ""));
    refused_if("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    refused_if("iopl", syscall(SYS_iopl, 3));
    refused_if("swapon", syscall(SYS_swapon, "/x", 0));
    refused_if("syslog_read", syscall(SYS_syslog, 3, path, sizeof path));
    refused_if("userfaultfd", syscall(SYS_userfaultfd, 0));
    refused_if("pivot_root", syscall(SYS_pivot_root, "/", "/"));
    refused_if("sethostname", sethostname("x", 1));
    tcp("host_loopback_127", "127.0.0.1", port);
    tcp("host_loopback_gateway", "10.0.2.2", port);
    return 0;
}
