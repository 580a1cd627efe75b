# Build stage
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY assets ./assets
# With OpenTelemetry export: it is off until `WALCAST_OTLP__ENDPOINT` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) is set.
RUN cargo build --release --locked --features otlp --bin walcast

# Runtime stage
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/walcast /usr/local/bin/walcast
# The change log (resume history) lives here; mount a volume to keep it across containers.
RUN mkdir -p /var/lib/walcast/changelog && chown -R nobody /var/lib/walcast
ENV WALCAST_CHANGELOG__DIR=/var/lib/walcast/changelog
VOLUME /var/lib/walcast
USER nobody
EXPOSE 4000
ENV WALCAST_LISTEN=0.0.0.0:4000
ENTRYPOINT ["/usr/local/bin/walcast"]
CMD ["serve"]
