# syntax=docker/dockerfile:1.7
# The controller: one static (musl) binary on an empty base, run as uid 65532
# with a read-only root filesystem (the chart sets both); no shell.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -f images/controller.Dockerfile .
#
# BUILDER_IMAGE is any Debian bookworm image with a Rust toolchain laid out as
# the official rust image lays it out (`make images` builds one from the local
# toolchain, since no registry is reachable there). The build stage is the
# same text in agent.Dockerfile, so a builder runs it once for both images,
# and it builds both binaries for the same reason. It runs on the build
# platform and cross-compiles: see images/README.md for the cross toolchain.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm

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

FROM scratch AS controller
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/palisade-controller /palisade-controller
USER 65532:65532
ENTRYPOINT ["/palisade-controller"]
