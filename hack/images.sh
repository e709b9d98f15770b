#!/usr/bin/env bash
# `make images`: builds palisade/controller and palisade/agent with podman from
# images/*.Dockerfile, the files users build, on a machine with no registry:
#
#   base     localhost/palisade-base:bookworm   debootstrap --variant=minbase
#            bookworm from the mirror apt uses, `podman import`ed (Debian slim's
#            path excludes: no docs, man pages or locales);
#   builder  localhost/palisade-builder:<rust>  base + gcc + this machine's Rust
#            toolchain, laid out as the official rust image lays it out;
#   images   localhost/palisade/{controller,agent}:local, BASE_IMAGE and
#            BUILDER_IMAGE passed as build arguments.
#
# Everything podman keeps (storage, its temp dir and the cargo cache mounts of
# the build stage) lives under ${XDG_CACHE_HOME:-$HOME/.cache}/palisade/podman,
# and nothing under /etc changes. Builds never use podman's bridge network
# (it would rewrite the host firewall): `--network host` to reach the mirror
# and crates.io, containers `--network none`.
#
#   hack/images.sh            build (cached), print sizes
#   hack/images.sh e2e DIR    also build localhost/palisade/pause:e2e (the pod
#                             sandbox of `make e2e`'s nodes) and write
#                             DIR/{controller,agent,pause}.tar (docker-archive,
#                             what `ctr images import` reads), when changed
#   hack/images.sh podman …   run podman with this configuration
#
# IMAGE_PROFILE=dev builds the binaries unoptimized (the Dockerfiles'
# CARGO_PROFILE): much faster from a cold cache, for the e2e plumbing only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/palisade"
P="$CACHE/podman"
TAG="${IMAGE_TAG:-local}"
SUITE=bookworm
BASE="localhost/palisade-base:$SUITE"
ARCH=$(dpkg --print-architecture)
log() { printf '[images] %s\n' "$*" >&2; }

# Debian's podman and the tools it needs.
tools() {
  local missing=()
  for p in podman buildah debootstrap runc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# crun refuses cgroup-v1 "hybrid" hosts, and podman's default rlimits exceed
# the hard limits root may have on CI machines: runc, and limits within them.
configure() {
  mkdir -p "$P/storage" "$P/run" "$P/tmp"
  local nofile nproc
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [[ $nofile == unlimited ]] && nofile=1048576
  # runc was seen to fail setting nproc at root's own hard limit (96551);
  # 32768 is plenty for a build.
  [[ $nproc == unlimited ]] || ((nproc > 32768)) && nproc=32768
  cat >"$P/containers.conf" <<CONF
[containers]
netns = "none"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$P/run/libpod"
volume_path = "$P/storage/volumes"
[network]
network_backend = "netavark"
network_config_dir = "$P/networks"
CONF
  cat >"$P/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$P/storage"
runroot = "$P/run/storage"
CONF
  export CONTAINERS_CONF="$P/containers.conf" CONTAINERS_STORAGE_CONF="$P/storage.conf"
  # buildah keeps RUN --mount=type=cache directories under TMPDIR.
  export TMPDIR="$P/tmp"
  # `podman build` does not apply default_ulimits to RUN steps.
  ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
}

pm() { podman "$@"; }

mirror() {
  local uri
  uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -v security | head -1 | awk '{print ($1 == "deb") ? $2 : $2}')
  echo "${uri:-http://deb.debian.org/debian}"
}

base() {
  pm image exists "$BASE" && return 0
  local dir="$P/rootfs-$SUITE"
  log "debootstrap --variant=minbase $SUITE ($(mirror))"
  rm -rf "$dir"
  debootstrap --variant=minbase "$SUITE" "$dir" "$(mirror)" >"$P/debootstrap.log" 2>&1 \
    || { tail -20 "$P/debootstrap.log" >&2; exit 1; }
  # As Debian's slim images: no docs, man pages or locales, now or later.
  cat >"$dir/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
  find "$dir/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf "$dir"/usr/share/{man,info,locale,lintian}/* "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | pm import --quiet - "$BASE" >/dev/null
  rm -rf "$dir"
}

# The CA bundle this machine trusts (it may sit behind a TLS-inspecting
# proxy): cargo in the builder uses it to reach crates.io, through
# CARGO_HTTP_CAINFO only, so the system store the controller image copies its
# CA bundle from stays Debian's.
host_ca_bundle() {
  local f
  for f in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [[ -n $f && -f $f ]] && { echo "$f"; return; }
  done
  log "no CA bundle found"; exit 1
}

# The host's Rust toolchain (the one `rustc` here is), copied into the base
# under the official image's paths (RUSTUP_HOME=/usr/local/rustup,
# CARGO_HOME=/usr/local/cargo) so images/*.Dockerfile cannot tell them apart.
builder() {
  local sysroot version name
  sysroot=$(rustc --print sysroot)
  version=$(rustc --version | awk '{print $2}')
  name="$version-$(rustc -vV | awk '/^host:/{print $2}')"
  BUILDER="localhost/palisade-builder:$version"
  pm image exists "$BUILDER" && return 0
  log "builder image $BUILDER from $sysroot"
  pm build --quiet --network host "${ULIMITS[@]}" --pull=never -t "$BUILDER" \
    -v "$sysroot:/toolchain:ro" -v "$(command -v rustup):/rustup-bin:ro" \
    -v "$(host_ca_bundle):/host-ca.pem:ro" \
    --build-arg BASE="$BASE" --build-arg TOOLCHAIN="$name" -f - "$P" >/dev/null <<'DF'
ARG BASE
FROM ${BASE}
ARG TOOLCHAIN
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    CARGO_HTTP_CAINFO=/usr/local/cargo/host-ca.pem \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev make ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p "$RUSTUP_HOME/toolchains/$TOOLCHAIN" "$CARGO_HOME/bin" \
 && cp -a /toolchain/bin /toolchain/lib /toolchain/libexec "$RUSTUP_HOME/toolchains/$TOOLCHAIN/" \
 && cp /rustup-bin "$CARGO_HOME/bin/rustup" \
 && cp /host-ca.pem "$CARGO_HOME/host-ca.pem" \
 && for t in cargo rustc rustdoc; do ln -s rustup "$CARGO_HOME/bin/$t"; done \
 && printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$TOOLCHAIN" >"$RUSTUP_HOME/settings.toml" \
 && cargo --version
DF
}

build_images() {
  local t0 what
  for what in controller agent; do
    t0=$(date +%s.%N)
    pm build --quiet --network host "${ULIMITS[@]}" --pull=never --layers \
      --build-arg BUILDER_IMAGE="$BUILDER" --build-arg BASE_IMAGE="$BASE" \
      --build-arg BUILDARCH="$ARCH" --build-arg TARGETARCH="$ARCH" \
      --build-arg CARGO_PROFILE="${IMAGE_PROFILE:-release}" \
      -f "$ROOT/images/$what.Dockerfile" -t "localhost/palisade/$what:$TAG" "$ROOT" >/dev/null
    log "$(printf 'palisade/%s:%s built in %.1fs' "$what" "$TAG" "$(echo "$(date +%s.%N) - $t0" | bc)")"
  done
}

# Checks that the images are what they claim: the controller static, uid
# 65532, without a shell; the agent with both iptables backends, ipset, nft
# and conntrack. Containers run with no network.
verify() {
  local c="localhost/palisade/controller:$TAG" a="localhost/palisade/agent:$TAG"
  [[ $(pm image inspect -f '{{.Config.User}}' "$c") == 65532:65532 ]] || { log "controller: not uid 65532"; exit 1; }
  pm run --rm --network none --read-only "$c" --help >/dev/null || { log "controller binary does not run on scratch"; exit 1; }
  if pm run --rm --network none --entrypoint /bin/sh "$c" -c true >/dev/null 2>&1; then
    log "controller image has a shell"; exit 1
  fi
  pm run --rm --network none --cap-drop all --cap-add NET_ADMIN,NET_RAW --entrypoint /bin/sh "$a" -c \
    'palisade-agent --help >/dev/null && iptables-nft --version && iptables-legacy --version && ip6tables-nft --version \
     && ip6tables-legacy --version && ipset --version && nft --version && conntrack --version' >/dev/null \
    || { log "agent image lacks a tool"; exit 1; }
}

sizes() {
  local what
  for what in controller agent; do
    printf '  palisade/%-10s %s\n' "$what:$TAG" \
      "$(pm image inspect -f '{{.Size}}' "localhost/palisade/$what:$TAG" | awk '{printf "%.1f MB", $1/1e6}')"
  done
}

# The pod sandbox image of the e2e nodes (no registry to pull one from): a
# static C program that sleeps until signalled.
pause_image() {
  local img=localhost/palisade/pause:e2e src="$ROOT/hack/e2e/pause.c" sum dir="$P/pause"
  sum=$(sha256sum "$src" | cut -c1-16)
  [[ -f $dir/sum && $(cat "$dir/sum") == "$sum" ]] && pm image exists "$img" && return 0
  rm -rf "$dir" && mkdir -p "$dir/rootfs"
  gcc -static -Os -s -o "$dir/rootfs/pause" "$src"
  tar -C "$dir/rootfs" -c . | pm import --quiet --change 'ENTRYPOINT ["/pause"]' - "$img" >/dev/null
  echo "$sum" >"$dir/sum"
}

# Writes DIR/<name>.tar for each image whose id changed since the last write.
e2e_archives() {
  local dir=$1 what ref id
  mkdir -p "$dir"
  for what in controller agent pause; do
    ref="localhost/palisade/$what:$TAG"
    [[ $what == pause ]] && ref=localhost/palisade/pause:e2e
    id=$(pm image inspect -f '{{.Id}}' "$ref")
    [[ -f $dir/$what.tar && -f $dir/$what.id && $(cat "$dir/$what.id") == "$id" ]] && continue
    rm -f "$dir/$what.tar"
    pm save --quiet --format docker-archive -o "$dir/$what.tar" "$ref"
    echo "$id" >"$dir/$what.id"
  done
  log "e2e image archives in $dir"
}

# What podman leaves on the machine whatever its configuration says: a
# `libpod_parent` cgroup in every hierarchy (cgroupfs manager), its blob-info
# cache in /var/lib/containers and /run/containers. Each that wasn't there
# before is removed on exit (the cgroups only when no process is left in them).
hygiene() {
  local fresh=() h
  [[ -e /var/lib/containers ]] || fresh+=(/var/lib/containers)
  [[ -e /run/containers ]] || fresh+=(/run/containers)
  local cg=1
  for h in /sys/fs/cgroup/*/; do [[ -d ${h}libpod_parent ]] && cg=0; done
  HYGIENE_PATHS=("${fresh[@]}")
  HYGIENE_CGROUPS=$cg
  trap hygiene_exit EXIT
}
hygiene_exit() {
  local h
  ((${#HYGIENE_PATHS[@]})) && rm -rf "${HYGIENE_PATHS[@]}"
  if ((HYGIENE_CGROUPS)); then
    for h in /sys/fs/cgroup/*/; do
      # rmdir refuses a cgroup that still has processes or children.
      [[ -d ${h}libpod_parent ]] && find "${h}libpod_parent" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  fi
  return 0
}

tools
configure
hygiene
mode=${1:-build}
case "$mode" in
  podman) shift; exec podman "$@" ;;
  build | e2e)
    start=$(date +%s)
    base
    builder
    build_images
    verify
    log "images ready in $(( $(date +%s) - start ))s:"
    sizes
    if [[ $mode == e2e ]]; then
      pause_image
      e2e_archives "${2:?usage: $0 e2e DIR}"
    fi
    ;;
  *) echo "usage: $0 [build | e2e DIR | podman ARGS…]" >&2; exit 2 ;;
esac
