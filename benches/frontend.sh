#!/usr/bin/env bash
# The front end's cost against build-file size: generated files of 1k, 10k and 100k lines
# (ENV, LABEL and ARG lines) and of 100 to 2,000 chained stages (each relabelling its parent). For each it times
# parse + plan (`builder debug graph`) and a whole metadata build from scratch (no RUN, no
# context), and prints seconds and seconds per 1,000 lines: flat per-line figures mean linear.
#
#   benches/frontend.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BUILDER:-target/release/builder}
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ctx"

lines_file() { # N: a FROM scratch stage of N metadata lines
  python3 - "$1" >"$work/ctx/Buildfile" <<'EOF'
import sys
n = int(sys.argv[1])
out = ["FROM scratch"]
for i in range(n - 1):
    k = i % 4
    out.append(["ENV e%d=v%d" % (i, i), "LABEL l%d=v%d" % (i, i),
                "ARG a%d=x" % i, "ENV p%d=${e%d}-$a%d" % (i, i - 1, i - 2)][k])
print("\n".join(out))
EOF
}

stages_file() { # N: N chained stages
  python3 - "$1" >"$work/ctx/Buildfile" <<'EOF'
import sys
n = int(sys.argv[1])
out = ["FROM scratch AS s0", "LABEL stage=0"]
for i in range(1, n):
    out += ["FROM s%d AS s%d" % (i - 1, i), "LABEL stage=%d" % i]
print("\n".join(out))
EOF
}

secs() { # command...
  local s e
  s=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  e=$(date +%s.%N)
  echo "$e - $s" | bc
}

printf '%-22s %10s %12s %10s %12s\n' "input" "plan_s" "plan_s/1k" "build_s" "build_s/1k"
report() { # label, lines
  local plan build
  plan=$(secs "$bin" debug graph "$work/ctx/Buildfile")
  build=$(secs "$bin" build --root "$work/root" --progress quiet --no-cache "$work/ctx")
  printf '%-22s %10.3f %12.4f %10.3f %12.4f\n' "$1" "$plan" "$(echo "$plan * 1000 / $2" | bc -l)" \
    "$build" "$(echo "$build * 1000 / $2" | bc -l)"
}
for n in 1000 10000 100000; do
  lines_file "$n"
  report "$n lines" "$n"
done
for n in 100 500 1000 2000; do
  stages_file "$n"
  report "$n stages" "$((n * 2))"
done
