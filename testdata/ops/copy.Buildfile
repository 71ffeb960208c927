# COPY and ADD: expanded sources, absolute destinations, heredocs, --from inputs.
FROM scratch AS files
ARG DIR=/opt
WORKDIR /work
COPY a.txt b/ ./
COPY --chown=1:2 --chmod=0640 --exclude=*.tmp src $DIR/src/
COPY <<EOF /etc/motd
dir is ${DIR}
EOF
COPY <<'RAW' relative/raw.txt
kept ${DIR}
RAW
ADD --checksum=sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d https://example.com/x.tar.gz /x/
COPY --parents ./p/./q /dst
FROM scratch
COPY --from=files /opt/src /src
COPY --from=0 /etc/motd /motd
COPY --from=docker.io/library/busybox:latest /bin/busybox /bin/
