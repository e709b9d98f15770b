# syntax=docker/dockerfile:1.7
# The agent: its binary plus the iptables/ip6tables (both the nft and the
# legacy backend, so it can match whichever the host uses), ipset and nft
# userspace. It runs with NET_ADMIN/NET_RAW in the host network namespace.
#   docker buildx build --platform linux/amd64,linux/arm64 -f images/agent.Dockerfile .
FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG TARGETARCH
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools cmake clang \
 && case "$TARGETARCH" in amd64) echo x86_64-unknown-linux-musl ;; arm64) echo aarch64-unknown-linux-musl ;; *) exit 1 ;; esac > /target \
 && rustup target add "$(cat /target)"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry --mount=type=cache,target=/src/target \
    cargo build --locked --release --target "$(cat /target)" --bin palisade-agent \
 && cp "target/$(cat /target)/release/palisade-agent" /palisade-agent

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset nftables conntrack \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /palisade-agent /usr/local/bin/palisade-agent
ENTRYPOINT ["/usr/local/bin/palisade-agent"]
