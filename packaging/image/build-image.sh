#!/usr/bin/env bash
# Builds a root filesystem for regional edge hardware with the molt-edge package in it,
# and an ext4 disk image of it:
#
#   sudo packaging/image/build-image.sh [--deb FILE] [--suite bookworm] [--mirror URL]
#        [--out target/image] [--size 2G]
#
# Steps: debootstrap a minimal Debian (systemd, networking, ssh), install the package
# (built by packaging/build-deb.sh unless --deb names one), enable molt-edge.service,
# then pack target/image/rootfs.tar.zst and target/image/molt-edge.ext4 (mkfs.ext4 -d).
# The device boots it from its own bootloader; provisioning happens on the device:
#   molt-provision enroll --control-plane URL --grpc-addr ADDR --token TOKEN \
#       --dir /var/lib/molt-edge --config /etc/molt-edge/edge.toml
# Needs root, debootstrap, zstd and e2fsprogs (apt-get install debootstrap zstd e2fsprogs).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
suite=bookworm
mirror=http://deb.debian.org/debian
out="$root/target/image"
size=2G
deb=""
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) deb="$2"; shift 2 ;;
        --suite) suite="$2"; shift 2 ;;
        --mirror) mirror="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "build-image: run as root (debootstrap and chroot need it)" >&2; exit 1; }
for tool in debootstrap zstd mkfs.ext4; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is needed" >&2; exit 1; }
done
[ -n "$deb" ] || deb="$("$root/packaging/build-deb.sh")"

rootfs="$out/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,ifupdown,isc-dhcp-client,openssh-server,ca-certificates,adduser,procps,kmod \
    "$suite" "$rootfs" "$mirror"

cp "$deb" "$rootfs/tmp/molt-edge.deb"
mount --bind /proc "$rootfs/proc"
trap 'umount "$rootfs/proc" 2>/dev/null || true' EXIT
chroot "$rootfs" /bin/sh -ec '
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/molt-edge.deb
    rm /tmp/molt-edge.deb
    systemctl enable molt-edge.service
    echo molt-edge > /etc/hostname
    printf "auto lo\niface lo inet loopback\nallow-hotplug eth0\niface eth0 inet dhcp\n" > /etc/network/interfaces
    apt-get clean
'
umount "$rootfs/proc"
trap - EXIT

tar --numeric-owner -C "$rootfs" -cf - . | zstd -q -T0 -o "$out/rootfs.tar.zst" -f
rm -f "$out/molt-edge.ext4"
mkfs.ext4 -q -L molt-edge -d "$rootfs" "$out/molt-edge.ext4" "$size"
echo "$out/rootfs.tar.zst"
echo "$out/molt-edge.ext4"
