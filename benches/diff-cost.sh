#!/usr/bin/env bash
# Diff cost of a one-file RUN change on a large base, overlay snapshotter vs copy fallback.
# Usage: benches/diff-cost.sh [FILES]   (default 50000; needs root and busybox-static)
# Not a test: it prints a table. Inputs are warmed before timing and nothing is deleted
# between timed runs (see the machine notes in DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-50000}
cargo build --release -q
bin=$PWD/target/release/builder
work=${BENCH_DIR:-/var/tmp/builder-bench-diff}
mkdir -p "$work"
root=$work/root
base=$work/base-$files
if [ ! -d "$base" ]; then
  mkdir -p "$base/bin" "$base/etc"
  cp /bin/busybox "$base/bin/" && ln -sf busybox "$base/bin/sh"
  echo 'root:x:0:0:root:/root:/bin/sh' > "$base/etc/passwd"
  python3 - "$base" "$files" <<'PY'
import os, sys
base, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(base, "data", "d%03d" % (i // 500))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d" % i), "w") as f:
        f.write("x" * (i % 2048))
PY
  "$bin" import --root "$root" "$base" -t "bench-base:$files" >/dev/null
fi
ctx=$work/ctx
mkdir -p "$ctx"
# Warm the page cache for the base snapshot.
find "$root" -type f -exec cat {} + > /dev/null 2>&1 || true

step_time() { # snapshotter label
  printf 'FROM bench-base:%s\nRUN echo changed > /data/d000/f00000\n' "$files" > "$ctx/Buildfile"
  local log
  log=$(BUILDER_SNAPSHOTTER=$1 "$bin" build --root "$root" --progress plain "$ctx" 2>&1 >/dev/null)
  echo "$log" | awk '/\[stage-0 2\/2\]/{run=1} run && / DONE /{print $3; exit}' | tr -d s
}

printf '%-10s %-10s %s\n' snapshotter files "RUN step seconds (3 runs)"
for snap in overlay copy; do
  times=()
  for _ in 1 2 3; do times+=("$(step_time $snap)"); done
  printf '%-10s %-10s %s\n' "$snap" "$files" "${times[*]}"
done
