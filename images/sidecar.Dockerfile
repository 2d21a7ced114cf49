# syntax=docker/dockerfile:1
# Image: ghcr.io/shardguard/shard-sidecar
#
# shard-sidecar (sidecar/main.cpp), the mTLS proxy of every shard pod. Build from the
# repository root:
#   docker build -f images/sidecar.Dockerfile -t ghcr.io/shardguard/shard-sidecar:0.1.0 .
# See docs/images.md; checked by tests/images/check_images.sh (ctest -L images).

# ---- build: Debian's -dev packages, only the shard-sidecar target -----------------
FROM debian:12 AS build
# The top-level CMakeLists.txt finds every non-torch dependency at configure time.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev \
      prometheus-cpp-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libcpp-httplib-dev \
      libssl-dev zlib1g-dev libnghttp2-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# A torch-free configure adds every torch-free library (model, policy, operator and
# shardctl besides the sidecar's own), so their sources must be present even though
# only shard-sidecar is built.
COPY CMakeLists.txt ./
COPY cmake/ cmake/
COPY common/ common/
COPY model/ model/
COPY policy/ policy/
COPY proto/ proto/
COPY sidecar/ sidecar/
COPY operator/ operator/
COPY shardctl/ shardctl/
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DSHARDGUARD_WITH_TORCH=OFF -DSHARDGUARD_BUILD_TESTS=OFF -DSHARDGUARD_BUILD_BENCH=OFF \
 && cmake --build /build --target shard-sidecar \
 && strip --strip-unneeded /build/bin/shard-sidecar

# ---- runtime: only the libraries shard-sidecar loads ------------------------------
# libc6, libstdc++6 and libgcc-s1 are already in debian:12-slim; Abseil, c-ares, RE2,
# zlib and Brotli come in as dependencies of the gRPC and httplib packages.
FROM debian:12-slim AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libgrpc++1.51 libgrpc29 libprotobuf32 libprometheus-cpp-core1.0 libcpp-httplib0.11 libssl3 libnghttp2-14 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /build/bin/shard-sidecar /usr/local/bin/shard-sidecar
# The uid/gid the operator gives shard pods (RenderInputs::run_as_user, 65532).
USER 65532:65532
# inbound mTLS, outbound (loopback), metrics (DESIGN §7)
EXPOSE 7443 7001 9101
ENTRYPOINT ["/usr/local/bin/shard-sidecar"]
