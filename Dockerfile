# kraken-token-broker container image.
#
#   docker build -t kraken-token-broker:0.1.0 .
#
# Stage 1 builds the release binary; stage 2 is distroless: glibc, libgcc,
# CA certificates (the broker verifies Kraken's TLS against the OS trust
# store), no shell, no package manager, running as the non-root user 65532.
#
# Both bases are pinned by digest, so a rebuild fetches the bytes that were
# reviewed. The digests are those public Dockerfiles and build logs pinned
# for these tags when this file was written; refresh them deliberately
# (`docker buildx imagetools inspect rust:1.95-bookworm`, then review).
#
# Build arguments (CI uses them, since no registry is reachable there):
#   BUILD_IMAGE    the build stage's base (needs cargo, unless PREBUILT is set)
#   RUNTIME_IMAGE  the runtime base (glibc, libgcc_s, CA certificates and a
#                  user 65532; no shell needed)
#   PREBUILT       a path in the build context to an already built release
#                  binary: copied instead of compiled (CI builds the binary
#                  once on the host and makes its bases with debootstrap;
#                  see ci/image_check.py)
#
# The container runs as the chart runs it: user 65532, read-only root
# filesystem, every capability dropped, no privilege escalation. The broker
# writes nothing to disk but its audit trail, to stdout by default.

ARG BUILD_IMAGE=docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

FROM ${BUILD_IMAGE} AS build
ARG PREBUILT=""
WORKDIR /src
COPY . .
RUN set -eu; \
    if [ -n "$PREBUILT" ]; then \
      install -D -m 0755 "$PREBUILT" /out/kraken-token-broker; \
    else \
      cargo build --release --locked --bin kraken-token-broker; \
      install -D -m 0755 target/release/kraken-token-broker /out/kraken-token-broker; \
    fi; \
    /out/kraken-token-broker --version

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/kraken-token-broker /usr/local/bin/kraken-token-broker
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/kraken-token-broker"]
CMD ["serve", "--config", "/etc/kraken-token-broker/config/broker.toml"]
