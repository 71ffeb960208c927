#!/usr/bin/env bash
# Cold build, no-op rebuild and one-file-change rebuild, all the way to an OCI layout on disk,
# for generated contexts; where buildah is installed it runs the same build files on the same
# inputs in the same run (buildah bud --layers, then buildah push to oci:) and prints the
# ratio builder/buildah. A report, not a test.
#
# Usage: benches/rebuild.sh [small|big|multi ...]   (default: all three; needs root)
# Environment: BENCH_DIR (default /var/tmp/builder-bench), SMALL_FILES (20000), SMALL_BYTES (5000).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=$PWD/target/release/builder
work=${BENCH_DIR:-/var/tmp/builder-bench}
small_files=${SMALL_FILES:-20000}
small_bytes=${SMALL_BYTES:-5000}
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(small big multi)
have_buildah=false
command -v buildah >/dev/null && have_buildah=true
mkdir -p "$work"
run_id=$(date +%s)
runs=$work/runs/$run_id   # fresh stores per run; nothing is deleted between timed runs
mkdir -p "$runs"

gen() { # scenario -> context dir, build file
  local s=$1 ctx=$work/ctx-$1
  if [ ! -d "$ctx" ]; then
    mkdir -p "$ctx"
    case $s in
      small) python3 - "$ctx" "$small_files" "$small_bytes" <<'PY'
import os, sys
ctx, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(ctx, "src", "m%03d" % (i // 200))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d.txt" % i), "wb") as f:
        f.write((("%d " % i) * size).encode()[:size])
PY
        ;;
      big) for i in 1 2 3 4 5; do head -c $((40*1024*1024)) /dev/urandom > "$ctx/blob$i.bin"; done ;;
      multi) for p in a b c; do mkdir -p "$ctx/$p"; for i in $(seq 1 2000); do echo "$p $i" > "$ctx/$p/$i.txt"; done; done ;;
    esac
  fi
  case $s in
    small) printf 'FROM scratch\nCOPY src/ /app/src/\nLABEL bench=small\n' ;;
    big) printf 'FROM scratch\nCOPY blob1.bin blob2.bin /data/\nCOPY blob3.bin blob4.bin blob5.bin /data/\n' ;;
    multi) printf 'FROM scratch AS a\nCOPY a/ /a/\nFROM scratch AS b\nCOPY b/ /b/\nFROM scratch AS c\nCOPY c/ /c/\nFROM scratch\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\n' ;;
  esac > "$work/Buildfile-$s"
  echo "$ctx"
}

edit_one() { # scenario context
  case $1 in
    small) echo "edit $(date +%s%N)" >> "$2/src/m050/f10000.txt" ;;
    big) echo "edit $(date +%s%N)" >> "$2/blob4.bin" ;;
    multi) echo "edit $(date +%s%N)" >> "$2/b/7.txt" ;;
  esac
}

timed() { # label command... -> "seconds maxrss_kb"
  sync  # neither tool pays for the other's pending writeback
  /usr/bin/time -f "%e %M" -o "$runs/time.txt" "$@" >/dev/null 2>"$runs/last.log" || { cat "$runs/last.log" >&2; return 1; }
  cat "$runs/time.txt"
}

b_build() { timed "$bin" build --progress quiet --root "$runs/builder-$1" -f "$work/Buildfile-$1" -o "oci:$runs/out-builder-$1:bench" "$2"; }
h_build() {
  sync
  local st=(--root "$runs/buildah-$1" --runroot "$runs/buildah-run-$1" --storage-driver overlay)
  /usr/bin/time -f "%e %M" -o "$runs/t1" buildah "${st[@]}" bud --layers --quiet -f "$work/Buildfile-$1" -t "bench-$1" "$2" >/dev/null 2>"$runs/last.log" || { cat "$runs/last.log" >&2; return 1; }
  /usr/bin/time -f "%e %M" -o "$runs/t2" buildah "${st[@]}" push --quiet "bench-$1" "oci:$runs/out-buildah-$1:bench" >/dev/null 2>>"$runs/last.log" || { cat "$runs/last.log" >&2; return 1; }
  read -r a ma < "$runs/t1"; read -r b mb < "$runs/t2"
  echo "$(echo "$a + $b" | bc) $(( ma > mb ? ma : mb ))"
}

printf '%-7s %-16s %10s %10s %8s %12s\n' scenario measure builder_s buildah_s ratio builder_MB
for s in "${scenarios[@]}"; do
  ctx=$(gen "$s")
  find "$ctx" -type f -exec cat {} + > /dev/null   # warm the page cache
  for phase in cold noop one-file; do
    [ "$phase" = one-file ] && edit_one "$s" "$ctx"
    read -r bt bm <<< "$(b_build "$s" "$ctx")"
    ht="-"; ratio="-"
    if $have_buildah; then
      read -r ht _ <<< "$(h_build "$s" "$ctx")"
      ratio=$(echo "scale=3; $bt / $ht" | bc)
    fi
    printf '%-7s %-16s %10s %10s %8s %12s\n' "$s" "$phase" "$bt" "$ht" "$ratio" "$((bm / 1024))"
  done
done
echo "(stores under $runs; remove $work/runs when done)"
