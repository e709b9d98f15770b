# syntax=docker/dockerfile:1.7
# The controller: one static binary on an empty base, run as non-root with a
# read-only root filesystem (the chart sets both). Multi-arch: build with
#   docker buildx build --platform linux/amd64,linux/arm64 -f images/controller.Dockerfile .
FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG TARGETARCH
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools cmake clang \
 && case "$TARGETARCH" in amd64) echo x86_64-unknown-linux-musl ;; arm64) echo aarch64-unknown-linux-musl ;; *) exit 1 ;; esac > /target \
 && rustup target add "$(cat /target)"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry --mount=type=cache,target=/src/target \
    cargo build --locked --release --target "$(cat /target)" --bin palisade-controller \
 && cp "target/$(cat /target)/release/palisade-controller" /palisade-controller

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /palisade-controller /palisade-controller
USER 65532:65532
ENTRYPOINT ["/palisade-controller"]
