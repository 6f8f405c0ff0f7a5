#!/usr/bin/env bash
# Builds the Meshwire container image with no image registry at all: nothing
# is pulled. A base image is imported (`docker import`) from a root file
# system made here (the binaries' shared libraries as `ldd` lists them, /bin/sh
# and getent for the init step, /etc/passwd with the non-root user), then
# docker/Dockerfile.offline adds the binaries on top of it.
#
#   scripts/docker-offline.sh                      # cargo build --release, tag meshwire:latest
#   scripts/docker-offline.sh --bin-dir DIR --tag meshwire:test
#
# --bin-dir: a directory holding meshwire-sidecar, meshwire-control-plane,
# meshctl, echo-server, meshwire-load, meshwire-probe and meshwire-otlp-sink
# (the end-to-end test passes the debug binaries `cargo test` built: CI needs
# no release build).
# Prints the image tag on the last line of stdout.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bins=(meshwire-sidecar meshwire-control-plane meshctl echo-server meshwire-load meshwire-probe meshwire-otlp-sink)
bin_dir=""
tag="meshwire:latest"
base_tag=""

while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --base-tag) base_tag="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "docker-offline: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
base_tag="${base_tag:-${tag%%:*}-base:${tag#*:}}"

if [ -z "$bin_dir" ]; then
    (cd "$repo" && cargo build --release --locked \
        -p meshwire-sidecar -p meshwire-control-plane -p meshwire-examples --bins) >&2
    bin_dir="$repo/target/release"
fi
for b in "${bins[@]}"; do
    [ -x "$bin_dir/$b" ] || { echo "docker-offline: $bin_dir/$b is missing" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
ctx="$work/ctx"
mkdir -p "$root"/{bin,usr/bin,etc,tmp} "$root/owned"/{data,bootstrap} "$ctx/bin"

# The binaries, without debug info (smaller context and image).
for b in "${bins[@]}"; do
    cp "$bin_dir/$b" "$ctx/bin/$b"
    strip --strip-debug "$ctx/bin/$b" 2>/dev/null || true
done

# /bin/sh and getent for mesh-init, and every shared library anything needs.
cp "$(command -v dash || command -v sh)" "$root/bin/sh"
cp "$(command -v getent)" "$root/usr/bin/getent"
libs() {
    # `ldd` prints "name => /path (addr)" or "/path (addr)" for the loader.
    ldd "$1" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }'
}
{
    for b in "${bins[@]}"; do libs "$ctx/bin/$b"; done
    libs "$root/bin/sh"
    libs "$root/usr/bin/getent"
} | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# glibc loads NSS modules (files, dns) at run time for getaddrinfo/getent;
# recent glibc has them built in, older ones need the modules.
for nss in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
    for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /lib /usr/lib; do
        if [ -e "$dir/$nss" ] && [ ! -e "$root$dir/$nss" ]; then
            mkdir -p "$root$dir"
            cp -L "$dir/$nss" "$root$dir/$nss"
            break
        fi
    done
done

cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
meshwire:x:65532:65532:meshwire:/nonexistent:/usr/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
meshwire:x:65532:
GROUP
echo "hosts: files dns" > "$root/etc/nsswitch.conf"

# Owned by root, except /data and /bootstrap (the non-root user writes
# there): two tar passes with forced owners, so this needs no root here.
chmod 1777 "$root/tmp"
tar -C "$root" --exclude=./owned --owner=0 --group=0 --numeric-owner -cf "$work/base.tar" .
tar -C "$root/owned" --owner=65532 --group=65532 --numeric-owner -rf "$work/base.tar" ./data ./bootstrap
docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    "$work/base.tar" "$base_tag" >&2

cp "$repo/docker/Dockerfile.offline" "$ctx/Dockerfile"
cp "$repo/docker/mesh-init.sh" "$ctx/mesh-init.sh"
docker build --quiet --build-arg "BASE=$base_tag" -t "$tag" "$ctx" >&2
echo "$tag"
