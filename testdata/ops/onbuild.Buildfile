# A stage's ONBUILD triggers run first in a stage built on it, then are cleared; a stage
# the target does not need is pruned.
FROM scratch AS parent
ENV X=parent
ONBUILD ENV FROM_TRIGGER=$X
ONBUILD COPY trigger.txt /trigger.txt
WORKDIR /
FROM scratch AS unused
RUN never
FROM parent AS child
ENV X=child
RUN echo $FROM_TRIGGER
