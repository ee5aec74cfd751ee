# syntax=docker/dockerfile:1
#
# Tally's container image: the `tally` binary on distroless, nothing else.
#
#   docker buildx build -t REGISTRY/tally:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg IMAGE_SOURCE=https://your.git.host/tally .
#
# Reproducible rebuilds: the toolchain is pinned by tag below, dependencies by Cargo.lock
# (--locked), and the build runs at fixed paths. For a byte-for-byte rebuild:
#   - pin both base images by digest as well as tag, e.g.
#       FROM rust:1.94-slim-bookworm@sha256:<digest> AS build
#     (`docker buildx imagetools inspect rust:1.94-slim-bookworm` prints the digest);
#   - pass SOURCE_DATE_EPOCH=$(git log -1 --pretty=%ct) (buildx reads it from the
#     environment) so image and history timestamps are the commit's, and add
#     `--output type=image,name=REGISTRY/tally:0.1.0,push=true,rewrite-timestamp=true`
#     (BuildKit 0.13+) so file timestamps in the layers are clamped to it too.
#
# Health: there is no HEALTHCHECK, because distroless has no shell and no curl to run one.
# Kubernetes probes the HTTP endpoints instead: /livez (never touches the database; use it
# for liveness) and /readyz (database reachable and migrations applied; use it for
# readiness), on the API port 8080 in processes with the api role and on the metrics port
# 9090 in every process. `tally --version` prints the version.

# ---- build -----------------------------------------------------------------------------
# The Rust version matches rust-version in Cargo.toml (.ci/dockerfile.sh checks it). The
# slim image has gcc and libc6-dev, which ring's build script needs; TLS is rustls, so no
# OpenSSL is built or linked.
FROM rust:1.94-slim-bookworm AS build

# Set by BuildKit (e.g. linux/amd64): each platform of a multi-platform build gets its own
# target-directory cache below, instead of rebuilding over the other's.
ARG TARGETPLATFORM
WORKDIR /build

# SQLX_OFFLINE: the crate uses no query! macros, and the build must never try to reach a
# database. --remap-path-prefix keeps the builder's paths out of the binary (panic
# locations and line tables name /tally/src/... and /cargo/registry/...).
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    SQLX_OFFLINE=true \
    RUSTFLAGS="--remap-path-prefix=/build=/tally --remap-path-prefix=/usr/local/cargo=/cargo"

# Only what `cargo build --release` reads (.dockerignore admits nothing else):
# the manifest and lock file, the sources, the migrations that sqlx::migrate! embeds and
# the OpenAPI document that src/api/mod.rs embeds with include_str!.
COPY Cargo.toml Cargo.lock ./
COPY migrations ./migrations
COPY openapi ./openapi
COPY src ./src

# The cargo registry and the target directory live in BuildKit cache mounts, so a source
# change recompiles Tally alone, not its ~330 dependencies. The binary is copied out of
# the target cache, which is not part of the image; sharing=locked serialises concurrent
# builds on one target directory (cargo would otherwise race itself).
RUN --mount=type=cache,id=tally-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=tally-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=tally-target-${TARGETPLATFORM},target=/build/target,sharing=locked \
    cargo build --release --locked \
 && install -D -m 0755 target/release/tally /out/tally \
 && /out/tally --version

# ---- runtime ---------------------------------------------------------------------------
# glibc and libgcc (Rust's unwinder), CA certificates and tzdata; no shell, no package
# manager. The :nonroot tag's default user is 65532, set explicitly below anyway.
FROM gcr.io/distroless/cc-debian12:nonroot

# BuildKit uses it for the image's timestamps (see the top of this file).
ARG SOURCE_DATE_EPOCH
# The crate's version (Cargo.toml; .ci/dockerfile.sh checks the default matches).
ARG VERSION=0.1.0
ARG REVISION=""
ARG IMAGE_SOURCE=""

LABEL org.opencontainers.image.title="tally" \
      org.opencontainers.image.description="PostgreSQL-native order delivery engine: orders fan out into chunked tasks that a fleet of workers delivers exactly once." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${IMAGE_SOURCE}"

COPY --from=build /out/tally /usr/local/bin/tally

# The binary's defaults listen on 127.0.0.1, right on a laptop and unreachable in a
# container: listen on every interface here (the API and probes on 8080, /metrics and
# probes on 9090).
ENV TALLY_API_ADDR=0.0.0.0:8080 \
    TALLY_METRICS_ADDR=0.0.0.0:9090

USER 65532:65532
EXPOSE 8080 9090

# Exec form: tally is PID 1 and receives SIGTERM itself (it stops claiming, lets running
# attempts finish for TALLY_SHUTDOWN_GRACE_SEC, hands back the rest and deregisters).
ENTRYPOINT ["/usr/local/bin/tally"]
CMD ["serve"]
