# syntax=docker/dockerfile:1
# One image with every service binary (forfall-ingest, -watcher, -dispatch, -matcher, -handoff,
# -portal) and the `forfall` CLI; each Deployment runs its own as the command. Built on the
# release profile without the `demo` feature, so no development stand-in (mail and SMS sinks,
# registry emulator) is in it; it runs as a non-root user and needs no shell, and is meant for a read-only
# root filesystem with a volume where a service writes (the file adapter's export_dir).
#   docker build -t forfall:dev .

FROM rust:1.95-bookworm AS build
# librdkafka is built from source with cmake (rdkafka's bundled build), libcurl with it for
# OAUTHBEARER/OIDC: they need a C toolchain, cmake, OpenSSL's and zlib's headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features \
      -p forfall-ingest -p forfall-watcher -p forfall-dispatch -p forfall-matcher \
      -p forfall-handoff -p forfall-portal -p forfall \
 && mkdir -p /out/bin /out/lib \
 && for b in forfall forfall-ingest forfall-watcher forfall-dispatch forfall-matcher forfall-handoff forfall-portal; do \
      cp "target/release/$b" /out/bin/; \
    done \
 && cp /lib/*-linux-gnu/libz.so.1 /out/lib/

# distroless: glibc, OpenSSL and CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lib/libz.so.1 /usr/lib/libz.so.1
COPY --from=build /out/bin/ /usr/local/bin/
USER nonroot:nonroot
# Each service serves /healthz, /readyz and /metrics on its admin port (9600 + its offset).
EXPOSE 9600-9610
ENTRYPOINT []
CMD ["/usr/local/bin/forfall", "--help"]
