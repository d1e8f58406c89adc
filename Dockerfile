# kraken-token-broker container image.
#
# No Docker engine runs on this project's development and CI machines, so this
# file is not built there: it is kept small and standard on purpose. Build and
# scan it in your own pipeline:
#   docker build -t kraken-token-broker:0.1.0 .
#
# Stage 1 builds the release binary; stage 2 is distroless: glibc, CA
# certificates (the broker verifies Kraken's TLS against the OS trust store),
# no shell, no package manager, running as the non-root user 65532.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kraken-token-broker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kraken-token-broker /usr/local/bin/kraken-token-broker
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/kraken-token-broker"]
CMD ["serve", "--config", "/etc/kraken-token-broker/config/broker.toml"]
