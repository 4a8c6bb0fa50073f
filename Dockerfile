# syntax=docker/dockerfile:1
# Build: the release binary (debug info stripped by the release profile), with the registry and
# target directory in build caches so a source change does not rebuild the dependencies.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p changegate && cp target/release/changegate /changegate

# Run: a small image with only the binary; no shell is needed at run time.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /changegate /usr/local/bin/changegate
RUN useradd --system --no-create-home --uid 10001 changegate
USER changegate
ENV CHANGEGATE_LISTEN=0.0.0.0:8080
# Give memory freed after a burst (e.g. stalled readers) back to the system: see README.
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=32768:glibc.malloc.trim_threshold=131072
EXPOSE 8080
# Ready, not merely alive: answers 200 only while the database (and MongoDB) are reachable.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s CMD ["/usr/local/bin/changegate", "probe"]
ENTRYPOINT ["/usr/local/bin/changegate"]
CMD ["serve"]
