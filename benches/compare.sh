#!/usr/bin/env bash
# builder, docker's BuildKit and buildah side by side, in one run, on the same inputs:
# cold builds, no-op rebuilds and one-file-edit rebuilds of issue 17's scenarios, plus a
# 200k-file context (no-op, and builder's peak RSS). Medians of RUNS runs, in seconds, with
# the ratio builder/docker. A report, not a test.
#
# CI-shaped scenarios (issue 36), beside docker (and skopeo): run-heavy (a RUN that unpacks
# 30,000 files, 200 MB, from a bind-mounted tar: cold with --no-cache, and after a one-file
# edit before it), big-base (a 4-layer, 260 MB image on a loopback registry: pull plus the
# first RUN on an empty store, against docker's pull plus build), push and pull of that
# image against `skopeo copy`. In these, who goes first alternates from run to run: a run that
# follows docker's deletes creates files slowly for a minute or more.
#
# builder writes a gzip OCI layout (-o oci:); docker builds into its daemon's store (no
# layer compression); buildah builds with --layers into its storage. A cold build is a fresh
# builder store, and `--no-cache` for docker and buildah (their base image stays, as
# builder's does).
#
# Usage: benches/compare.sh [scenario ...]   (needs root, docker.io and buildah)
#   scenarios: copy-many incremental copy-big run-steps multi-stage huge run-heavy big-base
#              push pull (default: all)
# Environment: BENCH_DIR (default /var/tmp/builder-compare), RUNS (3), BASELINE (another
# builder binary, say the last release: it runs beside the others in every phase, with
# stores of its own, and the table gains a builder/before column).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=$PWD/target/release/builder
before=${BASELINE:-}
[ -z "$before" ] || [ -x "$before" ] || { echo "BASELINE=$before is not an executable"; exit 1; }
work=${BENCH_DIR:-/var/tmp/builder-compare}
runs=${RUNS:-3}
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(copy-many incremental copy-big run-steps multi-stage huge run-heavy big-base push pull)
# The CI-shaped scenarios have their own loop, after the others.
ci_scenarios=()
dev_scenarios=()
for s in "${scenarios[@]}"; do
  case $s in
    run-heavy|big-base|push|pull) ci_scenarios+=("$s") ;;
    *) dev_scenarios+=("$s") ;;
  esac
done
for tool in docker dockerd buildah busybox skopeo docker-registry; do
  command -v $tool >/dev/null || { echo "$tool is not installed (apt-get install docker.io buildah busybox-static skopeo docker-registry)"; exit 1; }
done
mkdir -p "$work"
stamp=$(date +%s)

# dockerd off the host network, with its own roots (DEVELOPERS' rule).
dk=$work/dockerd
mkdir -p "$dk"
# A daemon of an earlier run that is still stopping holds its pid file: wait it out.
if [ -f "$dk/pid" ]; then
  old=$(cat "$dk/pid" 2>/dev/null || true)
  for _ in $(seq 100); do { [ -n "$old" ] && kill -0 "$old" 2>/dev/null; } || break; sleep 0.2; done
  rm -f "$dk/pid"
fi
dockerd --iptables=false --ip6tables=false --bridge=none --data-root "$dk/data" \
  --exec-root "$dk/exec" --pidfile "$dk/pid" -H "unix://$dk/sock" >"$dk/log" 2>&1 &
stop_dockerd() {
  local pid
  pid=$(cat "$dk/pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
}
trap stop_dockerd EXIT
export DOCKER_HOST=unix://$dk/sock DOCKER_BUILDKIT=1
for _ in $(seq 100); do /usr/bin/docker info >/dev/null 2>&1 && break; sleep 0.2; done
docker() { /usr/bin/docker "$@"; }

# One busybox base for everyone: imported into builder, loaded into docker and buildah.
base=$work/base
if [ ! -f "$base/busybox.tar" ]; then
  mkdir -p "$base/rootfs/bin" && cp "$(command -v busybox)" "$base/rootfs/bin/"
  for a in sh cat echo ls sleep true; do ln -sf busybox "$base/rootfs/bin/$a"; done
  "$bin" import --root "$base/store" "$base/rootfs" -t localhost/busybox:bench >/dev/null
  "$bin" export --root "$base/store" localhost/busybox:bench -o "docker-archive:$base/busybox.tar"
fi
# The name every build file uses: local to each tool, never pulled.
loaded=$(docker load -q -i "$base/busybox.tar" | sed -n 's/^Loaded image[^:]*: //p' | tail -n 1)
docker tag "$loaded" localhost/busybox:bench
id=$(buildah pull -q "docker-archive:$base/busybox.tar")
buildah tag "$id" localhost/busybox:bench

gen() { # scenario -> context dir (made once, kept between runs)
  local s=$1 ctx=$work/ctx-$1
  if [ ! -d "$ctx" ]; then
    mkdir -p "$ctx"
    case $s in
      copy-many|incremental|huge)
        local n=20000 size=5000
        [ "$s" = incremental ] && n=5000
        [ "$s" = huge ] && { n=200000; size=500; }
        python3 - "$ctx" "$n" "$size" <<'PY'
import os, sys
ctx, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(ctx, "src", "m%04d" % (i // 200))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d.txt" % i), "wb") as f:
        f.write((("%d " % i) * size).encode()[:size])
PY
        ;;
      copy-big) for i in 1 2 3 4 5; do head -c $((100*1024*1024)) /dev/urandom > "$ctx/blob$i.bin"; done ;;
      run-steps) echo x > "$ctx/x" ;;
      multi-stage) for p in a b c; do mkdir -p "$ctx/$p"; for i in $(seq 1 2000); do echo "$p $i" > "$ctx/$p/$i.txt"; done; done ;;
    esac
  fi
  case $s in
    copy-many|huge) printf 'FROM scratch\nCOPY src/ /app/src/\n' ;;
    incremental) printf 'FROM localhost/busybox:bench\nCOPY src/ /app/src/\nRUN ls -R /app/src > /app/list\n' ;;
    copy-big) printf 'FROM scratch\nCOPY blob1.bin blob2.bin /data/\nCOPY blob3.bin blob4.bin blob5.bin /data/\n' ;;
    run-steps) printf 'FROM localhost/busybox:bench\n'; for i in 1 2 3 4 5 6 7 8; do printf 'RUN echo %d > /s%d\n' $i $i; done ;;
    multi-stage) printf 'FROM localhost/busybox:bench AS a\nCOPY a/ /a/\nRUN ls /a > /a.list\nFROM localhost/busybox:bench AS b\nCOPY b/ /b/\nRUN ls /b > /b.list\nFROM localhost/busybox:bench AS c\nCOPY c/ /c/\nFROM scratch\nCOPY --from=a /a.list /a.list\nCOPY --from=b /b.list /b.list\nCOPY --from=c /c /c\n' ;;
  esac > "$ctx/Buildfile"
  echo "$ctx"
}

edit_one() {
  case $1 in
    copy-many|huge|incremental) echo "edit $(date +%s%N)" >> "$2/src/m0010/f002001.txt" 2>/dev/null \
        || echo "edit $(date +%s%N)" >> "$(find "$2/src" -type f | sort | sed -n 2001p)" ;;
  esac
}

# Seconds (to the millisecond: a no-op takes a few) and peak RSS (KiB) of one command (a
# function of this script, or a program). The clock runs inside the shell that runs it, so
# the shell's own start is not counted. Dirty pages of earlier runs are written out first,
# so that no run pays for the writeback of the one before.
timed() {
  sync
  /usr/bin/time -f '%M' -o "$work/.time" bash -c \
    's=$EPOCHREALTIME; "${@:2}" >/dev/null 2>&1; e=$EPOCHREALTIME; echo "$s $e" > "$1"' \
    timed "$work/.clock" "$@" >/dev/null 2>&1 || true
  local s e
  read -r s e < "$work/.clock"
  awk -v s="$s" -v e="$e" -v m="$(tail -n 1 "$work/.time")" 'BEGIN { printf "%.3f %s\n", e - s, m }'
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

build_builder() { # ctx root
  "$bin" build --progress quiet --network none --root "$2" -o "oci:$2-layout:latest" "$1"
}
build_before() {
  "$before" build --progress quiet --network none --root "$2" -o "oci:$2-layout:latest" "$1"
}
build_docker() { docker build -q --network none -f "$1/Buildfile" "${@:2}" "$1"; }
build_buildah() { buildah bud -q --layers --isolation chroot -f "$1/Buildfile" "${@:2}" "$1"; }

export bin before
export -f docker build_builder build_before build_docker build_buildah

warm() { find "$1" -type f -exec cat {} + >/dev/null 2>&1 || true; }

tools=(builder docker buildah)
if [ -n "$before" ]; then
  tools=(builder before docker buildah)
  printf '| scenario | phase | builder | before | docker (BuildKit) | buildah | builder/docker | builder/before |\n'
  printf '|---|---|---|---|---|---|---|---|\n'
else
  printf '| scenario | phase | builder | docker (BuildKit) | buildah | builder/docker |\n'
  printf '|---|---|---|---|---|---|\n'
fi
ratio() { awk -v b="$1" -v d="$2" 'BEGIN { if (d > 0) printf "%.2f", b / d; else print "-" }'; }
row() { # scenario phase b d h [before]
  if [ -n "$before" ]; then
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$6" "$4" "$5" "$(ratio "$3" "$4")" "$(ratio "$3" "$6")"
  else
    printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5" "$(ratio "$3" "$4")"
  fi
}

rss_note=""
for s in "${dev_scenarios[@]}"; do
  ctx=$(gen "$s")
  warm "$ctx"
  phases=(cold no-op)
  case $s in copy-many|incremental) phases+=(edit) ;; esac
  [ "$s" = huge ] && phases=(no-op)
  declare -A t=()
  root_base=$work/runs/$stamp/$s
  mkdir -p "$root_base"
  # A store that holds the base image, for warm phases.
  warm_root=$root_base/warm
  cp -a "$base/store" "$warm_root"
  build_builder "$ctx" "$warm_root" >/dev/null
  if [ -n "$before" ]; then
    warm_before=$root_base/warm-before
    cp -a "$base/store" "$warm_before"
    build_before "$ctx" "$warm_before" >/dev/null
  fi
  build_docker "$ctx" >/dev/null
  build_buildah "$ctx" >/dev/null
  for phase in "${phases[@]}"; do
    for tool in "${tools[@]}"; do
      samples=()
      for r in $(seq "$runs"); do
        case $phase in
          cold)
            case $tool in
              builder) fresh=$root_base/cold-$r; cp -a "$base/store" "$fresh"; res=$(timed build_builder "$ctx" "$fresh") ;;
              before) fresh=$root_base/cold-before-$r; cp -a "$base/store" "$fresh"; res=$(timed build_before "$ctx" "$fresh") ;;
              docker) res=$(timed build_docker "$ctx" --no-cache) ;;
              buildah) res=$(timed build_buildah "$ctx" --no-cache) ;;
            esac ;;
          no-op)
            case $tool in
              builder) res=$(timed build_builder "$ctx" "$warm_root") ;;
              before) res=$(timed build_before "$ctx" "$warm_before") ;;
              docker) res=$(timed build_docker "$ctx") ;;
              buildah) res=$(timed build_buildah "$ctx") ;;
            esac ;;
          edit)
            # Each tool sees a fresh edit of the same file.
            edit_one "$s" "$ctx"
            case $tool in
              builder) res=$(timed build_builder "$ctx" "$warm_root") ;;
              before) res=$(timed build_before "$ctx" "$warm_before") ;;
              docker) res=$(timed build_docker "$ctx") ;;
              buildah) res=$(timed build_buildah "$ctx") ;;
            esac ;;
        esac
        samples+=("${res%% *}")
        if [ "$tool" = builder ] && [ "$s" = huge ]; then rss_note="builder peak RSS on the 200k-file no-op: $(( ${res##* } / 1024 )) MB"; fi
      done
      t[$tool]=$(printf '%s\n' "${samples[@]}" | median)
    done
    row "$s" "$phase" "${t[builder]}" "${t[docker]}" "${t[buildah]}" "${t[before]:-}"
  done
  unset t
done
[ -n "$rss_note" ] && echo && echo "$rss_note"

# ---- CI-shaped scenarios (issue 36) ----
ci_row() { # scenario phase builder other other-name
  printf '| %s | %s | %s | %s (%s) | - | %s |\n' "$1" "$2" "$3" "$4" "$5" "$(ratio "$3" "$4")"
}
turns() { # run first second -> the two, in the order of this run (alternating)
  if [ $(( $1 % 2 )) = 1 ]; then echo "$2 $3"; else echo "$3 $2"; fi
}
gen_run_heavy() { # -> context: a 200 MB tar of 30,000 files, and a small file before the RUN
  local ctx=$work/ctx-run-heavy
  if [ ! -f "$ctx/data.tar" ]; then
    mkdir -p "$ctx"
    python3 - "$ctx/data.tar" <<'PY'
import io, os, random, sys, tarfile
rnd = random.Random(36)
words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as t:
    for i in range(30000):
        # Two thirds text, one third incompressible: a package tree's mix.
        size = 6990
        if i % 3 == 2:
            data = os.urandom(size)
        else:
            data = b" ".join(rnd.choice(words) for _ in range(size // 5))[:size]
        info = tarfile.TarInfo("opt/pkg/m%03d/f%05d" % (i // 300, i))
        info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
        t.addfile(info, io.BytesIO(data))
PY
  fi
  echo "small" > "$ctx/small.txt"
  printf 'FROM localhost/busybox:bench\nCOPY small.txt /small.txt\nRUN --mount=type=bind,target=/in /bin/busybox tar -xf /in/data.tar -C /\n' > "$ctx/Buildfile"
  echo "$ctx"
}
# A loopback registry of its own for each timed push (a fresh storage directory, nothing
# deleted between runs); REG_PORT names the one running.
reg_pid=""
registry_up() { # storage-dir
  [ -z "$reg_pid" ] || { kill "$reg_pid" 2>/dev/null || true; wait "$reg_pid" 2>/dev/null || true; }
  mkdir -p "$1"
  printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:5055\n' "$1" > "$1.yml"
  docker-registry serve "$1.yml" >"$1.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/5055) 2>/dev/null && break; sleep 0.1; done
}
trap 'stop_dockerd; [ -z "$reg_pid" ] || kill "$reg_pid" 2>/dev/null || true' EXIT
gen_big_base() { # -> a store holding big:1 (4 layers, 260 MB), and its OCI layout
  local g=$work/big-base
  if [ ! -f "$g/done" ]; then
    mkdir -p "$g/ctx"
    python3 - "$g/ctx" <<'PY'
import os, sys
ctx = sys.argv[1]
for half in ("a", "b"):
    for i in range(10000):
        d = os.path.join(ctx, half, "m%03d" % (i // 250))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write((("%s%d " % (half, i)) * 200).encode()[:1000])
for n in (1, 2, 3):
    with open(os.path.join(ctx, "big%d.bin" % n), "wb") as f:
        # Half random, half text: compresses as a real base's libraries do.
        f.write(os.urandom(40 << 20))
        f.write((b"library text " * (40 << 20 // 13 + 1))[: 40 << 20])
PY
    printf 'FROM scratch\nCOPY a/ /usr/share/a/\nCOPY b/ /usr/share/b/\nCOPY big1.bin /usr/lib/\nCOPY big2.bin big3.bin /usr/lib/\nCOPY --from=localhost/busybox:bench /bin/ /bin/\n' > "$g/ctx/Buildfile"
    cp -a "$base/store" "$g/store"
    "$bin" build --progress quiet --root "$g/store" -t big:1 -o "oci:$g/layout:1" "$g/ctx" >/dev/null
    touch "$g/done"
  fi
  echo "$g"
}
for s in "${ci_scenarios[@]}"; do
  root_base=$work/runs/$stamp/$s
  mkdir -p "$root_base"
  case $s in
    run-heavy)
      ctx=$(gen_run_heavy)
      warm "$ctx"
      # Warm both: the base in builder's store, the image in docker's.
      warm_root=$root_base/warm
      cp -a "$base/store" "$warm_root"
      build_builder "$ctx" "$warm_root" >/dev/null
      build_docker "$ctx" >/dev/null
      for phase in cold edit; do
        bs=() ds=()
        for r in $(seq "$runs"); do
          # Who goes first alternates: a run that follows docker's deletes of its snapshot
          # creates files slowly (ext4 skips inodes freed in the last minute or more).
          for tool in $(turns "$r" builder docker); do
            case $phase-$tool in
              cold-builder)
                fresh=$root_base/cold-$r; cp -a "$base/store" "$fresh"
                res=$(timed build_builder "$ctx" "$fresh"); bs+=("${res%% *}") ;;
              cold-docker) res=$(timed build_docker "$ctx" --no-cache); ds+=("${res%% *}") ;;
              edit-builder)
                echo "edit $(date +%s%N)" >> "$ctx/small.txt"
                res=$(timed build_builder "$ctx" "$warm_root"); bs+=("${res%% *}") ;;
              edit-docker)
                echo "edit $(date +%s%N)" >> "$ctx/small.txt"
                res=$(timed build_docker "$ctx"); ds+=("${res%% *}") ;;
            esac
          done
        done
        ci_row run-heavy "$phase" "$(printf '%s\n' "${bs[@]}" | median)" "$(printf '%s\n' "${ds[@]}" | median)" docker
      done
      ;;
    big-base|push|pull)
      g=$(gen_big_base)
      warm "$g/store/blobs"
      reg=$root_base/registry-seed
      registry_up "$reg"
      "$bin" push --root "$g/store" big:1 127.0.0.1:5055/big:1 >/dev/null 2>&1
      ctx=$root_base/ctx
      mkdir -p "$ctx"
      printf 'FROM 127.0.0.1:5055/big:1\nRUN echo ran > /ran\n' > "$ctx/Buildfile"
      bs=() os=()
      if [ "$s" = big-base ]; then
        # builder's runs first: docker's, which must delete its copy of the image before
        # each pull, leave the disk slow to create files for a while.
        for r in $(seq "$runs"); do
          fresh=$root_base/empty-$r
          res=$(timed "$bin" build --progress quiet --network none --root "$fresh" -o "oci:$fresh-layout:1" "$ctx"); bs+=("${res%% *}")
        done
        for r in $(seq "$runs"); do
          docker rmi -f 127.0.0.1:5055/big:1 >/dev/null 2>&1 || true
          docker builder prune -af >/dev/null 2>&1 || true
          res=$(timed sh -c "docker pull -q 127.0.0.1:5055/big:1 && docker build -q --network none --no-cache $ctx"); os+=("${res%% *}")
        done
      fi
      for r in $(seq "$runs"); do
        case $s in
          big-base) ;;
          push)
            for tool in $(turns "$r" builder skopeo); do
              registry_up "$root_base/registry-push-$tool$r"
              case $tool in
                builder) res=$(timed "$bin" push --root "$g/store" big:1 "127.0.0.1:5055/pushed:$r"); bs+=("${res%% *}") ;;
                skopeo) res=$(timed skopeo copy -q --dest-tls-verify=false "oci:$g/layout:1" "docker://127.0.0.1:5055/pushed:$r"); os+=("${res%% *}") ;;
              esac
            done
            ;;
          pull)
            for tool in $(turns "$r" builder skopeo); do
              case $tool in
                builder) res=$(timed "$bin" pull --root "$root_base/pull-b$r" 127.0.0.1:5055/big:1); bs+=("${res%% *}") ;;
                skopeo) res=$(timed skopeo copy -q --src-tls-verify=false docker://127.0.0.1:5055/big:1 "oci:$root_base/pull-s$r:1"); os+=("${res%% *}") ;;
              esac
            done
            ;;
        esac
      done
      other=docker; [ "$s" = big-base ] || other=skopeo
      phase="pull + first RUN"; [ "$s" = big-base ] || phase=$s
      ci_row "$s" "$phase" "$(printf '%s\n' "${bs[@]}" | median)" "$(printf '%s\n' "${os[@]}" | median)" "$other"
      if [ "$s" = pull ]; then
        echo
        echo "pull: builder's store holds $(du -sm "$root_base/pull-b1" | cut -f1) MB after its pull; skopeo's layout $(du -sm "$root_base/pull-s1" | cut -f1) MB"
      fi
      ;;
  esac
done
# The zstd floor: a cold builder build with --compression zstd against `zstd -3 -T0` of the
# same bytes (to /dev/null), medians of RUNS runs. For copy-big's random bytes, which zstd
# passes through nearly as they are, and for 500 MB of this machine's own /usr (programs and
# text, which compress), cut into the same five files and built with the same build file.
zstd_row() { # label name ctx
  local label=$1 name=$2 ctx=$3 bs=() zs=() r b z
  warm "$ctx"
  for r in $(seq "$runs"); do
    fresh=$work/runs/$stamp/zstd-$name-$r
    mkdir -p "$fresh"
    b=$(timed "$bin" build --progress quiet --root "$fresh/store" --compression zstd -o "oci:$fresh/layout:z" "$ctx")
    bs+=("${b%% *}")
    z=$(timed sh -c "cat $ctx/blob*.bin | zstd -3 -T0 -q -c > /dev/null")
    zs+=("${z%% *}")
  done
  b=$(printf '%s\n' "${bs[@]}" | median)
  z=$(printf '%s\n' "${zs[@]}" | median)
  echo "$label cold with --compression zstd: ${b}s; zstd -3 -T0 of the same bytes: ${z}s (ratio $(awk -v b="$b" -v z="$z" 'BEGIN{printf "%.2f", b/z}'))"
}
if printf '%s\n' "${scenarios[@]}" | grep -qx copy-big && command -v zstd >/dev/null; then
  echo
  zstd_row copy-big random "$work/ctx-copy-big"
  text=$work/ctx-copy-big-text
  if [ ! -d "$text" ]; then
    mkdir -p "$text"
    (tar cf - /usr/lib /usr/share /usr/bin 2>/dev/null || true) | head -c $((500*1024*1024)) \
      | split -b $((100*1024*1024)) -d -a 1 - "$text/part"
    for i in 0 1 2 3 4; do mv "$text/part$i" "$text/blob$((i + 1)).bin"; done
    cp "$work/ctx-copy-big/Buildfile" "$text/"
  fi
  zstd_row "copy-big (compressible)" text "$text"
fi
