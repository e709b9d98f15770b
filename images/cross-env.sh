#!/bin/sh
# The Rust target and C toolchain of an image build stage, from the platform
# it runs on (BUILDARCH) and the one it builds for (TARGETARCH); both are set
# by `docker buildx` / `podman build --platform`.
#
#   cross-env install   installs the toolchain (apt, rustup) and writes
#                       /etc/cross-env, the environment `cargo build` needs.
#
# Binaries are static musl ones on both architectures. The C parts (ring,
# aws-lc) are compiled by musl-gcc natively, or by Debian's cross gcc for the
# target when cross-compiling; that gcc also links, using the musl C library
# Rust ships with its musl targets (link-self-contained), so no musl
# cross-toolchain is needed.
set -eu
build=${BUILDARCH:-$(dpkg --print-architecture)}
target=${TARGETARCH:-$build}
case "$target" in
  amd64) rust=x86_64-unknown-linux-musl; gnu=x86_64-linux-gnu ;;
  arm64) rust=aarch64-unknown-linux-musl; gnu=aarch64-linux-gnu ;;
  *) echo "cross-env: unsupported TARGETARCH $target (amd64 or arm64)" >&2; exit 1 ;;
esac
[ "${1:-}" = install ] || { echo "usage: cross-env install" >&2; exit 2; }
triple=$(echo "$rust" | tr 'a-z-' 'A-Z_')
under=$(echo "$rust" | tr '-' '_')
if [ "$target" = "$build" ]; then
  pkgs="musl-tools"
  cc=musl-gcc
  linker=""
else
  pkgs="gcc-$gnu libc6-dev-$target-cross"
  cc=$gnu-gcc
  linker=$gnu-gcc
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 # a word list
apt-get install -y -qq --no-install-recommends ca-certificates $pkgs >/dev/null
rm -rf /var/lib/apt/lists/*
rustup target add "$rust"
{
  echo "export RUST_TARGET=$rust"
  echo "export CC_$under=$cc"
  echo "export AR_$under=${gnu}-ar"
  [ -n "$linker" ] && echo "export CARGO_TARGET_${triple}_LINKER=$linker"
  # Static, and no debug info in the shipped binaries.
  echo "export CARGO_PROFILE_RELEASE_STRIP=symbols"
} >/etc/cross-env
cat /etc/cross-env
