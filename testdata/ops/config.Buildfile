# Config instructions fold into typed edits; ARG and ENV scoping is resolved.
ARG BASE_TAG=1.0
FROM scratch AS base
ARG NAME=app
ENV HOME_DIR=/home/${NAME} GREETING="hello world"
LABEL org.example.name=$NAME "org.example.home"="${HOME_DIR}"
USER 1000:1000
WORKDIR /srv
WORKDIR data
EXPOSE 80 8000-8001/udp
VOLUME ["/var/lib/${NAME}"]
STOPSIGNAL SIGTERM
SHELL ["/bin/bash", "-c"]
CMD echo $GREETING
ENTRYPOINT ["/entry"]
HEALTHCHECK --interval=5s --retries=2 CMD ["/check", "--fast"]
MAINTAINER someone@example.com
ONBUILD RUN echo child
