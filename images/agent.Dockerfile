# syntax=docker/dockerfile:1.7
# The agent: its static binary plus iptables/ip6tables (both the nft and the
# legacy backend, so it can match whichever the host uses), ipset, nft and
# conntrack. It runs with NET_ADMIN/NET_RAW in the host network namespace.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -f images/agent.Dockerfile .
#
# BUILDER_IMAGE: see controller.Dockerfile (the build stage is the same text).
# BASE_IMAGE is any Debian bookworm image (`make images` imports one made by
# debootstrap).
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM --platform=$BUILDPLATFORM ${BUILDER_IMAGE} AS build
ARG BUILDARCH
ARG TARGETARCH
# `release` for anything shipped; `dev` builds in a fraction of the time
# (unoptimized, larger binaries) for tests of the images' plumbing.
ARG CARGO_PROFILE=release
COPY images/cross-env.sh /usr/local/bin/cross-env
RUN cross-env install
WORKDIR /src
COPY . .
# The target cache may hold a later build of another tree (the cache is
# shared, and cargo judges freshness by mtime, which COPY keeps): this layer
# only runs when the sources changed, so the crate itself always rebuilds.
RUN --mount=type=cache,id=palisade-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=palisade-cargo-target,target=/src/target \
    . /etc/cross-env \
 && find src Cargo.toml -exec touch {} + \
 && cargo build --locked --profile "$CARGO_PROFILE" --target "$RUST_TARGET" \
       --bin palisade-controller --bin palisade-agent \
 && dir=$([ "$CARGO_PROFILE" = dev ] && echo debug || echo "$CARGO_PROFILE") \
 && mkdir -p /out && cp "target/$RUST_TARGET/$dir/palisade-controller" "target/$RUST_TARGET/$dir/palisade-agent" /out/

FROM ${BASE_IMAGE} AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset nftables conntrack \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
COPY --from=build /out/palisade-agent /usr/local/bin/palisade-agent
ENTRYPOINT ["/usr/local/bin/palisade-agent"]
