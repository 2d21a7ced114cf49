# syntax=docker/dockerfile:1
# Image: ghcr.io/shardguard/shardguard-operator
#
# shardguard-operator (operator/main.cpp). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/shardguard/shardguard-operator:0.1.0 .
# See docs/images.md. tests/images/check_images.sh checks this file (ctest -L images):
# the binary copied out of the build stage is one the build produces, every shared
# library it loads is installed by the runtime stage, the bases are pinned and the
# image runs as a non-root numeric user.

# ---- build: Debian's -dev packages, only the shardguard-operator target ------------
FROM debian:12 AS build
# SHARDGUARD_OPERATOR_ONLY=ON configures only common, model, policy and operator: the
# operator links neither the sidecar nor gRPC, Protobuf or LibTorch, so none of their
# packages are installed here (tests/images/check_operator_build.sh builds exactly
# this stage's COPY set with gRPC and Protobuf hidden from CMake).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      prometheus-cpp-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libcpp-httplib-dev \
      libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY cmake/ cmake/
COPY common/ common/
COPY model/ model/
COPY policy/ policy/
COPY operator/ operator/
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDGUARD_OPERATOR_ONLY=ON \
 && cmake --build /build --target shardguard-operator \
 && strip --strip-unneeded /build/bin/shardguard-operator

# ---- runtime: only the libraries shardguard-operator loads ------------------------
# libc6, libstdc++6 and libgcc-s1 are already in debian:12-slim; zlib1g and libbrotli1
# come in as dependencies of libcpp-httplib0.11.
FROM debian:12-slim AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libyaml-cpp0.7 libprometheus-cpp-core1.0 libcpp-httplib0.11 libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /build/bin/shardguard-operator /usr/local/bin/shardguard-operator
# The uid/gid of deploy/operator.yaml and the chart (runAsNonRoot needs a numeric user).
USER 65532:65532
# metrics, health (DESIGN §7)
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/shardguard-operator"]
