# syntax=docker/dockerfile:1
# Build: the release binary, with the dependency layer cached separately from the sources.
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
USER nobody
ENV CHANGEGATE_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s CMD ["/usr/local/bin/changegate", "--version"]
ENTRYPOINT ["/usr/local/bin/changegate"]
CMD ["serve"]
