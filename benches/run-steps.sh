#!/usr/bin/env bash
# A RUN step's fixed cost: the run-steps shape (8 trivial RUN steps on a busybox base),
# built with --no-cache, for each executor and network, beside a floor (the same 8 commands
# run with `unshare` + `chroot` on the unpacked rootfs: what the user's work costs alone).
#
#   benches/run-steps.sh [RUNS]        (default 7 runs; medians are printed)
#   BASELINE=/path/to/old/builder benches/run-steps.sh   also times another builder binary
#
# Needs root, busybox-static, slirp4netns and runc. Prints one line per variant: median
# seconds per build and per step.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
bin=${BUILDER:-target/release/builder}
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/bb/bin"
cp "$(command -v busybox)" "$work/bb/bin/"
for a in sh true echo; do ln -s busybox "$work/bb/bin/$a"; done
"$bin" import --root "$work/root" "$work/bb" -t bb:1 >/dev/null
mkdir -p "$work/ctx"
{
  echo "FROM bb:1"
  for i in 1 2 3 4 5 6 7 8; do echo "RUN echo step $i > /dev/null"; done
} >"$work/ctx/Buildfile"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

time_builds() { # label, builder binary, root, args...
  local label=$1 b=$2 root=$3
  shift 3
  "$b" build --root "$root" --progress quiet --no-cache "$@" "$work/ctx" >/dev/null # warm
  local t
  t=$(for _ in $(seq "$runs"); do
    s=$(date +%s.%N)
    "$b" build --root "$root" --progress quiet --no-cache "$@" "$work/ctx" >/dev/null
    e=$(date +%s.%N)
    echo "$e - $s" | bc
  done | median)
  printf '%-28s %8.3f s/build %8.1f ms/step\n' "$label" "$t" "$(echo "$t * 1000 / 8" | bc -l)"
}

rootfs="$work/bb"
floor=$(for _ in $(seq "$runs"); do
  s=$(date +%s.%N)
  for i in 1 2 3 4 5 6 7 8; do
    unshare --mount --pid --ipc --uts --net --fork chroot "$rootfs" /bin/sh -c "x='step $i'"
  done
  e=$(date +%s.%N)
  echo "$e - $s" | bc
done | median)
printf '%-28s %8.3f s/build %8.1f ms/step\n' "floor (unshare+chroot)" "$floor" "$(echo "$floor * 1000 / 8" | bc -l)"

time_builds "builtin, network none" "$bin" "$work/root" --network none
time_builds "builtin, network default" "$bin" "$work/root"
time_builds "runc, network none" "$bin" "$work/root" --network none --runtime runc
time_builds "runc, network default" "$bin" "$work/root" --runtime runc
if [ -n "${BASELINE:-}" ]; then
  "$BASELINE" import --root "$work/base-root" "$work/bb" -t bb:1 >/dev/null
  time_builds "baseline, network none" "$BASELINE" "$work/base-root" --network none
  time_builds "baseline, network default" "$BASELINE" "$work/base-root"
fi
