#!/usr/bin/env bash
# Build builder's own CI image (examples/ci/Buildfile) with builder itself.
#   examples/ci/build.sh [BUILDER BUILD OPTIONS...]
# e.g. `examples/ci/build.sh -t builder-ci:latest -o docker-archive:builder-ci.tar`.
# It builds builder as a static binary (target/static), assembles the build context from
# this machine (newuidmap, newgidmap and slirp4netns from Debian's uidmap and slirp4netns
# packages, with the libraries they load), and runs that binary's `build`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
for tool in newuidmap newgidmap slirp4netns busybox ldd setcap; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed: apt-get install uidmap slirp4netns busybox-static libcap2-bin" >&2; exit 1; }
done

triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
  --manifest-path "$repo/Cargo.toml" --target "$triple" --target-dir "$repo/target/static"
bin="$repo/target/static/$triple/release/builder"

ctx=$(mktemp -d "${TMPDIR:-/tmp}/builder-ci.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/etc" "$ctx/home"
chmod 0755 "$ctx/home"
install -d -m 1777 "$root/tmp"
cp "$bin" "$ctx/builder"
# A shell for CI scripts (GitLab runs the job's script with it), beside builder, where
# --isolation container never lays a step's root filesystem over it.
cp "$(command -v busybox)" "$ctx/busybox"
mkdir -p "$root/bin"
ln -s /builder/bin/busybox "$root/bin/sh"
for prog in "$(command -v newuidmap)" "$(command -v newgidmap)" "$(command -v slirp4netns)"; do
  # The program (set-uid bits kept) and every library it loads, at the same paths.
  mkdir -p "$root/usr/bin"
  cp -L --preserve=mode "$prog" "$root/usr/bin/"
  ldd "$prog" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
# File capabilities, not set-uid root: in a container without CAP_SYS_ADMIN, newuidmap must
# keep the caller's uid to own the namespace it maps (as BuildKit's rootless image does).
# They travel as xattrs in a tar, which ADD unpacks with them.
mkdir -p "$ctx/caps/usr/bin"
mv "$root/usr/bin/newuidmap" "$root/usr/bin/newgidmap" "$ctx/caps/usr/bin/"
chmod 0755 "$ctx/caps/usr/bin/newuidmap" "$ctx/caps/usr/bin/newgidmap"
setcap cap_setuid=ep "$ctx/caps/usr/bin/newuidmap"
setcap cap_setgid=ep "$ctx/caps/usr/bin/newgidmap"
tar --xattrs --xattrs-include='security.capability' --numeric-owner --owner=0 --group=0 \
  -C "$ctx/caps" -cf "$ctx/uidmap.tar" usr
rm -rf "$ctx/caps"
printf 'root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/builder/home:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nbuilder:x:1000:\n' >"$root/etc/group"
echo 'builder:100000:65536' >"$root/etc/subuid"
echo 'builder:100000:65536' >"$root/etc/subgid"

"$bin" build -f "$here/Buildfile" "$@" "$ctx"
