#!/usr/bin/env bash
# RUN under --isolation container against the default sandbox, and docker's BuildKit, in
# one run: a base of 20,000 files, then RUN true (the first RUN of the stage: under
# container isolation it lays the 20,000 files out in the container's root), RUN that
# changes one file, and RUN true again (the fixed cost once laid out). Medians of RUNS
# builds (--no-cache), per step, from the step times the plain progress prints. A report,
# not a test.
#
#   sandbox    builder as root on this host (overlay snapshots)
#   container  builder's CI image (examples/ci) in dockerd with Docker's default profile
#   buildkit   docker build (dockerd 20.10's BuildKit) of the same build file
#
# Usage: benches/isolation.sh   (needs root, docker.io, busybox-static, uidmap, slirp4netns,
# libcap2-bin). Environment: BENCH_DIR (default /var/tmp/builder-isolation), RUNS (5).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=$PWD/target/release/builder
work=${BENCH_DIR:-/var/tmp/builder-isolation}
runs=${RUNS:-5}
mkdir -p "$work"

dk=$work/dockerd
if [ ! -S "$dk/sock" ] || ! DOCKER_HOST=unix://$dk/sock docker info >/dev/null 2>&1; then
  mkdir -p "$dk"
  dockerd --iptables=false --ip6tables=false --bridge=none --data-root "$dk/data" \
    --exec-root "$dk/exec" --pidfile "$dk/pid" -H "unix://$dk/sock" >"$dk/log" 2>&1 &
  for _ in $(seq 150); do DOCKER_HOST=unix://$dk/sock docker info >/dev/null 2>&1 && break; sleep 0.2; done
fi
export DOCKER_HOST=unix://$dk/sock DOCKER_BUILDKIT=1
# dockerd 20.10's own client, whose BuildKit needs no buildx plug-in.
docker() { /usr/bin/docker "$@"; }

ctx=$work/ctx
if [ ! -f "$ctx/files.tar" ]; then
  rm -rf "$ctx" && mkdir -p "$ctx/files"
  python3 - "$ctx/files" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(200):
    os.makedirs(f"{root}/d{d:03}", exist_ok=True)
    for f in range(100):
        with open(f"{root}/d{d:03}/f{f:03}", "w") as fh:
            fh.write(f"{d} {f}\n")
PY
  tar -C "$ctx/files" -cf "$ctx/files.tar" . && rm -rf "$ctx/files"
  cp "$(command -v busybox)" "$ctx/busybox"
  cat >"$ctx/Buildfile" <<'BF'
FROM scratch
COPY busybox /bin/busybox
ADD files.tar /data/
RUN ["/bin/busybox", "true"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox date +%N > /data/d000/f000"]
RUN ["/bin/busybox", "true"]
BF
  cp "$ctx/Buildfile" "$ctx/Dockerfile"
  chmod -R a+rX "$ctx"
fi

examples/ci/build.sh --progress quiet --root "$work/ci-store" -t builder-ci:bench \
  -o "docker-archive:$work/ci.tar" >/dev/null
docker load -i "$work/ci.tar" >/dev/null
docker build --network none -q -t bench-warm "$ctx" >/dev/null 2>&1 || true

logs=$work/logs-$(date +%s)
mkdir -p "$logs"
for i in $(seq "$runs"); do
  "$bin" build --progress plain --no-cache --network none --root "$work/host-store" "$ctx" \
    >/dev/null 2>"$logs/sandbox-$i"
  # The store on the container's own file system (the image's default), where a layout links.
  docker run --rm --pull never --network none -v "$ctx:/ctx:ro" \
    builder-ci:bench build --isolation container --progress plain --no-cache /ctx \
    >/dev/null 2>"$logs/container-$i"
  docker build --network none --progress plain --no-cache "$ctx" >/dev/null 2>"$logs/buildkit-$i"
done

python3 - "$logs" "$runs" <<'PY'
import re, statistics, sys
logs, runs = sys.argv[1], int(sys.argv[2])
labels = ["RUN true (first)", "RUN one-file change", "RUN true (again)"]
def run_times(path):
    text = open(path).read()
    steps, done, order = {}, {}, []
    for line in text.splitlines():
        m = re.match(r"#(\d+) \[.*?\] (RUN .*)", line)
        if m and m.group(1) not in steps:
            steps[m.group(1)] = m.group(2); order.append(m.group(1))
        m = re.match(r"#(\d+) DONE ([0-9.]+)s", line)
        if m:
            done[m.group(1)] = float(m.group(2))
    return [done.get(n) for n in order][:3]
table = {}
for kind in ["sandbox", "container", "buildkit"]:
    per = [run_times(f"{logs}/{kind}-{i}") for i in range(1, runs + 1)]
    table[kind] = [statistics.median([p[s] for p in per if len(p) > s and p[s] is not None] or [float("nan")]) for s in range(3)]
print(f"{'step (20,000-file base)':28} {'sandbox':>9} {'container':>10} {'buildkit':>9} {'container/sandbox':>18}")
for s, label in enumerate(labels):
    sb, ct, bk = table["sandbox"][s], table["container"][s], table["buildkit"][s]
    print(f"{label:28} {sb:9.3f} {ct:10.3f} {bk:9.3f} {ct / sb if sb else float('nan'):18.2f}")
print(f"(medians of {runs} builds, seconds; logs in {logs})")
PY
