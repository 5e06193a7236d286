#!/usr/bin/env bash
# Cross-compiles a release sensorgate for Raspberry-Pi-class boards, linking with Debian's
# cross gcc (no Docker, no `cross` tool; see cross/Cross.toml for that route).
#
#   cross/build.sh aarch64   # arm64: 64-bit Raspberry Pi OS / Debian (Pi 3, 4, 5, Zero 2 W)
#   cross/build.sh armv7     # armhf: 32-bit Raspberry Pi OS (Pi 2 and later)
#   cross/build.sh aarch64-musl  # arm64, static (musl inside): any aarch64 Linux, however old
#
# Extra arguments go to `cargo build`. Installs the cross gcc with apt-get when run as root,
# and adds the Rust target with rustup, if either is missing. The glibc builds link against
# the target's glibc as shipped by this machine's Debian release: build on a release no newer
# than the one on the board (or use aarch64-musl).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 aarch64|armv7|aarch64-musl [cargo build args...]" >&2
}

case "${1:-}" in
    aarch64)
        triple=aarch64-unknown-linux-gnu
        linker=aarch64-linux-gnu-gcc
        packages="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
        ;;
    armv7)
        triple=armv7-unknown-linux-gnueabihf
        linker=arm-linux-gnueabihf-gcc
        packages="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross"
        ;;
    aarch64-musl)
        # Static (crt-static is the default on musl targets): the Rust target ships musl's crt
        # objects and libc.a, and rustc passes them to the glibc cross gcc, which only links
        # (rust-lld links too) and compiles ring's C and assembly (for TLS).
        triple=aarch64-unknown-linux-musl
        linker=aarch64-linux-gnu-gcc
        packages="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage
        exit 2
        ;;
esac
shift

# The cross gcc and the target's C library (crt files, libc): gcc only recommends the latter,
# and without it linking fails with "cannot find Scrt1.o".
has_cross_toolchain() {
    command -v "$linker" >/dev/null 2>&1 && [ "$("$linker" -print-file-name=Scrt1.o)" != Scrt1.o ]
}
if ! has_cross_toolchain; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "cross toolchain for $triple not found: installing $packages from Debian's packages" >&2
        apt-get update -qq
        # shellcheck disable=SC2086 # $packages is a list of package names.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
    else
        echo "cross toolchain for $triple not found; install it first (e.g. sudo apt-get install $packages) and retry" >&2
        exit 1
    fi
fi

# rust-toolchain.toml pins the toolchain; the target must be added to that one (we are in the
# repository, so rustup picks it).
if ! rustup target list --installed | grep -qx "$triple"; then
    echo "adding the Rust standard library for $triple" >&2
    rustup target add "$triple"
fi

# CARGO_TARGET_<TRIPLE>_LINKER, e.g. CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER. A value
# already set in the environment wins. CC_<triple> is for crates that compile C (ring, for TLS).
triple_upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
linker_var="CARGO_TARGET_${triple_upper}_LINKER"
export "$linker_var=${!linker_var:-$linker}"
cc_var="CC_${triple//-/_}"
export "$cc_var=${!cc_var:-$linker}"

cargo build --release --locked --target "$triple" -p sensorgate --bin sensorgate "$@"

target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
binary="$target_dir/$triple/release/sensorgate"
size=$(stat -c %s "$binary")
echo "built: $binary"
echo "size:  $size bytes ($(numfmt --to=iec-i --suffix=B "$size"))"
if command -v file >/dev/null 2>&1; then
    file -b "$binary"
fi
