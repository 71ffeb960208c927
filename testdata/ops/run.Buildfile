# RUN: argv in shell and exec form, environment with ARGs, mounts resolved, networks.
FROM scratch AS tools
FROM scratch
ARG VERSION=2
ENV PATH=/usr/bin:/bin
WORKDIR /build
RUN make VERSION=$VERSION
RUN ["/bin/echo", "$VERSION"]
RUN --mount=type=cache,target=.cache,sharing=locked --mount=type=tmpfs,target=/scratch,size=1048576 \
    --mount=type=bind,from=tools,source=/,target=/tools \
    --mount=type=secret,id=token,env=TOKEN \
    --mount=type=secret,id=key \
    build
RUN --network=none <<EOT
set -e
echo ${VERSION}
EOT
RUN <<EOT
#!/bin/sh
echo script
EOT
USER nobody
RUN id
