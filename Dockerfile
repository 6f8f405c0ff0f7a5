# Meshwire's container image: the sidecar, the control plane, meshctl and the
# example apps (echo-server, meshwire-load), plus meshwire-probe for health
# checks and meshwire-otlp-sink (the trace collector standing in for Jaeger
# in the compose test). One image; docker-compose.yml picks the program per
# container.
#
#   docker build -t meshwire:latest .          (or: docker compose build)
#
# Needs the rust and debian base images from a registry. Without a registry
# (CI), scripts/docker-offline.sh builds the same image from local binaries
# on a base made with `docker import` (docker/Dockerfile.offline).

# The toolchain of rust-toolchain.toml.
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        -p meshwire-sidecar -p meshwire-control-plane -p meshwire-examples --bins \
    && mkdir /out \
    && for b in meshwire-sidecar meshwire-control-plane meshctl echo-server meshwire-load meshwire-probe meshwire-otlp-sink; do \
           cp "target/release/$b" /out/; \
       done

FROM debian:bookworm-slim
# Not root: uid/gid 65532 (as distroless' "nonroot"); /data holds the control
# plane's database and admin token, /bootstrap what the init step hands the
# sidecars (join tokens, trust bundle).
RUN groupadd --system --gid 65532 meshwire \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin meshwire \
    && mkdir -p /data /bootstrap \
    && chown 65532:65532 /data /bootstrap
COPY --from=build /out/ /usr/local/bin/
COPY docker/mesh-init.sh /usr/local/bin/mesh-init
USER 65532:65532
WORKDIR /data
CMD ["meshwire-sidecar", "--help"]
