# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, ship only the binary on distroless
# (glibc, CA certificates for the OS trust store, no shell, non-root).
#
#   docker build -t authgate .
#   docker run -p 8080:8080 -p 9090:9090 \
#     -v $PWD/proxy.toml:/etc/authgate/proxy.toml:ro -v authgate-state:/var/lib/authgate \
#     -e CRM_CLIENT_SECRET=... authgate
#
# In a container the config must listen on 0.0.0.0 (`[listen] addr = "0.0.0.0:8080"`,
# `[admin] addr = "0.0.0.0:9090"`): loopback inside the container is unreachable
# from outside it.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && cp target/release/authgate /authgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /authgate /usr/local/bin/authgate
# The token store and audit log live under the state volume; run as `nonroot`
# (uid 65532), which owns nothing else in the image.
WORKDIR /var/lib/authgate
VOLUME ["/var/lib/authgate"]
ENV AUTHGATE_CONFIG=/etc/authgate/proxy.toml
USER nonroot:nonroot
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/authgate"]
CMD ["run", "--log-format", "json"]
