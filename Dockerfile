# vllm-router container image: a pinned Rust builder, a slim Debian runtime, non-root.
#   docker build -t vllm-router:latest .
#   docker run -p 30000:30000 -p 29000:29000 -v $PWD/policies:/policies vllm-router:latest \
#       --worker-urls http://vllm:8000 --policy-wasm /policies/policy.wasm
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
# host/build.rs builds the built-in policies to wasm and embeds them.
RUN cargo build --release --locked -p vllm-router \
 && cp target/release/vllm-router /usr/local/bin/vllm-router

FROM debian:bookworm-slim
# Debian's security updates replace package versions: pinning them (DL3008) would break
# the build at the next point release, so the stable suite's current versions are taken.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 65532 --no-create-home router \
 && mkdir /policies && chown router /policies
COPY --from=build /usr/local/bin/vllm-router /usr/local/bin/vllm-router
USER 65532
# Policy files: mount a directory (or a ConfigMap) here; the router watches it.
VOLUME ["/policies"]
EXPOSE 30000 29000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD ["curl", "-fsS", "http://127.0.0.1:30000/liveness"]
# Listen on all interfaces inside the container, metrics too (the defaults are 127.0.0.1).
ENTRYPOINT ["vllm-router", "--host", "0.0.0.0", "--port", "30000", "--prometheus-host", "0.0.0.0", "--prometheus-port", "29000"]
CMD ["--help"]
