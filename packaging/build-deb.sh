#!/usr/bin/env bash
# Builds the molt-edge Debian package: target/debian/molt-edge_<version>_<arch>.deb
#
#   packaging/build-deb.sh                       # release build, then package
#   packaging/build-deb.sh --no-build --bin-dir target/debug --compression gzip --out DIR
#                                                # what the tests run
#
# The package holds molt-edge and molt-provision (stripped), the systemd unit
# (sandboxed), the UDP buffer sysctls, the default config (a conffile) and the state
# directory. It is assembled in a temporary tree and built with dpkg-deb under fakeroot.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
profile=release
build=1
out="$root/target/debian"
bin_dir=""
compression=xz
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --out) out="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; build=0; shift 2 ;;
        --compression) compression="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) cargo_profile=(--release); profile_dir=release ;;
    debug) cargo_profile=(); profile_dir=debug ;;
    *) echo "build-deb: --profile is release or debug" >&2; exit 2 ;;
esac
for tool in dpkg-deb fakeroot strip; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is needed (apt-get install dpkg-dev fakeroot binutils)" >&2; exit 1; }
done

[ -n "$bin_dir" ] || bin_dir="${CARGO_TARGET_DIR:-$root/target}/$profile_dir"
if [ "$build" = 1 ]; then
    (cd "$root" && cargo build "${cargo_profile[@]}" -p molt-edge -p molt-provision --bins)
fi
for binary in molt-edge molt-provision; do
    [ -x "$bin_dir/$binary" ] || { echo "build-deb: $bin_dir/$binary is missing; build it first" >&2; exit 1; }
done

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
deb="$root/packaging/debian"

install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/usr/lib/sysctl.d" \
    "$stage/etc/molt-edge" "$stage/usr/share/doc/molt-edge"
install -d -m 0750 "$stage/var/lib/molt-edge"
for binary in molt-edge molt-provision; do
    strip --strip-debug -o "$stage/usr/bin/$binary" "$bin_dir/$binary"
    chmod 0755 "$stage/usr/bin/$binary"
done
install -m 0644 "$deb/molt-edge.service" "$stage/lib/systemd/system/molt-edge.service"
install -m 0644 "$deb/60-molt-edge.conf" "$stage/usr/lib/sysctl.d/60-molt-edge.conf"
install -m 0644 "$deb/edge.toml" "$stage/etc/molt-edge/edge.toml"
install -m 0644 "$root/edge/README.md" "$stage/usr/share/doc/molt-edge/README.md"
install -m 0644 "$root/edge/edge.example.toml" "$stage/usr/share/doc/molt-edge/edge.example.toml"
printf 'Molt edge relay\nLicense: Apache-2.0\n' >"$stage/usr/share/doc/molt-edge/copyright"
install -m 0755 "$deb/postinst" "$deb/prerm" "$deb/postrm" "$stage/DEBIAN/"
echo /etc/molt-edge/edge.toml >"$stage/DEBIAN/conffiles"
installed_size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: molt-edge
Version: $version
Architecture: $arch
Maintainer: Molt maintainers <maintainers@molt.invalid>
Installed-Size: $installed_size
Depends: libc6 (>= 2.34), adduser
Section: net
Priority: optional
Homepage: https://molt.invalid
Description: Molt edge relay appliance
 The Molt edge relay terminates QUIC with mutual TLS for AI agents, checks every
 message's signature, rate-limits, routes and durably buffers messages for offline
 recipients. Includes molt-provision, which enrolls the device with a control plane,
 and a sandboxed systemd unit.
CONTROL

mkdir -p "$out"
package="$out/molt-edge_${version}_${arch}.deb"
fakeroot dpkg-deb "-Z$compression" --build "$stage" "$package" >/dev/null
echo "$package"
