# syntax=docker/dockerfile:1
# Image: ghcr.io/shardguard/shardd
#
# shardd (shardd/main.cpp), the LibTorch trainer of one pipeline stage. Build from the
# repository root with BuildKit (the default builder since Docker 23; it builds only
# the stages the chosen variant needs):
#
#   # CPU (default): Debian 12's LibTorch 1.13 — the same packages `make deps` installs,
#   # so the image runs exactly what `make test` tested.
#   docker build -f images/shardd.Dockerfile -t ghcr.io/shardguard/shardd:0.1.0 .
#
#   # CUDA: the official LibTorch CUDA zip (cxx11 ABI) from download.pytorch.org,
#   # compiled against NVIDIA's CUDA toolkit for Debian 12; `shardd --device cuda`
#   # (or the default --device auto) then trains on the pod's GPU.
#   docker build -f images/shardd.Dockerfile --build-arg TORCH=cuda \
#     --build-arg LIBTORCH_SHA256=<sha256 of the zip> -t ghcr.io/shardguard/shardd:0.1.0-cuda .
#
# See docs/images.md. tests/images/check_images.sh checks this file (ctest -L images)
# with the default TORCH=cpu: the binary copied out of the build is one the build
# produces, every library it loads is installed by runtime-cpu (or its parents), the
# bases are pinned and the image runs as a non-root numeric user.

# cpu | cuda: selects build-<TORCH> and runtime-<TORCH> below.
ARG TORCH=cpu
# The CUDA variant's LibTorch and CUDA toolkit (they must match: cu124 ↔ 12-4).
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu124/libtorch-cxx11-abi-shared-with-deps-2.5.1%2Bcu124.zip
ARG LIBTORCH_SHA256=
ARG CUDA_PACKAGE=cuda-toolkit-12-4

# ---- build-base: Debian's -dev packages without LibTorch ---------------------------
FROM debian:12 AS build-base
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev \
      prometheus-cpp-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libcpp-httplib-dev \
      libssl-dev zlib1g-dev libnghttp2-dev libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*

# ---- build-cpu: Debian's LibTorch (libtorch-dev, 1.13, CPU only) -------------------
FROM build-base AS build-cpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libtorch-dev libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_PREFIX=/usr

# ---- build-cuda: LibTorch CUDA zip + NVIDIA's CUDA toolkit for Debian 12 -----------
# LibTorch's CMake package needs the CUDA toolkit (nvcc, headers) to be found at
# configure time; the zip itself carries the CUDA runtime libraries shardd loads.
FROM build-base AS build-cuda
ARG LIBTORCH_URL
ARG LIBTORCH_SHA256
ARG CUDA_PACKAGE
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl unzip \
 && curl -fsSL -o /tmp/cuda-keyring.deb \
      https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
 && dpkg -i /tmp/cuda-keyring.deb && rm /tmp/cuda-keyring.deb \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${CUDA_PACKAGE}" \
 && rm -rf /var/lib/apt/lists/*
RUN curl -fsSL -o /tmp/libtorch.zip "${LIBTORCH_URL}" \
 && if [ -n "${LIBTORCH_SHA256}" ]; then \
      echo "${LIBTORCH_SHA256}  /tmp/libtorch.zip" | sha256sum -c -; \
    else \
      echo "WARNING: LIBTORCH_SHA256 not set; the zip's sha256 is $(sha256sum /tmp/libtorch.zip | cut -d' ' -f1)"; \
    fi \
 && unzip -q /tmp/libtorch.zip -d /opt && rm /tmp/libtorch.zip
ENV TORCH_PREFIX=/opt/libtorch \
    PATH=/usr/local/cuda/bin:${PATH} \
    CUDACXX=/usr/local/cuda/bin/nvcc

# ---- build: only the shardd target, against the chosen LibTorch --------------------
FROM build-${TORCH} AS build
WORKDIR /src
# The top level adds every library (model, policy, sidecar, operator, shardctl), so
# their sources must be present to configure even though only shardd is built.
COPY CMakeLists.txt ./
COPY cmake/ cmake/
COPY common/ common/
COPY model/ model/
COPY policy/ policy/
COPY proto/ proto/
COPY sidecar/ sidecar/
COPY operator/ operator/
COPY shardd/ shardd/
COPY shardctl/ shardctl/
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="${TORCH_PREFIX}" \
      -DSHARDGUARD_WITH_TORCH=ON -DSHARDGUARD_BUILD_TESTS=OFF -DSHARDGUARD_BUILD_BENCH=OFF \
 && cmake --build /build --target shardd \
 && strip --strip-unneeded /build/bin/shardd

# ---- runtime-base: what shardd loads besides LibTorch, and the dataset -------------
# libc6, libstdc++6 and libgcc-s1 are already in debian:12-slim; c-ares, RE2 and
# Brotli come in as dependencies of the gRPC and httplib packages.
FROM debian:12-slim AS runtime-base
# images-check: not-a-library dataset-fashion-mnist (the default spec.dataset.path, /usr/share/datasets/fashion-mnist)
# images-check: not-a-library ca-certificates (the trust store https package URLs are verified against)
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libgrpc++1.51 libgrpc29 libabsl20220623 libprotobuf32 libprometheus-cpp-core1.0 \
      libcpp-httplib0.11 libyaml-cpp0.7 libssl3 zlib1g libcurl4 ca-certificates dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

# ---- runtime-cpu: Debian's LibTorch runtime; OpenBLAS instead of the reference BLAS
FROM runtime-base AS runtime-cpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libtorch1.13 libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/*

# ---- runtime-cuda: the zip's libraries (LibTorch, cudart, cuBLAS, cuDNN, NCCL, …) --
# The GPU driver (libcuda.so.1) is not in the image: the NVIDIA container toolkit
# mounts the node's driver into containers that get a GPU (nvidia.com/gpu limit).
FROM runtime-base AS runtime-cuda
COPY --from=build-cuda /opt/libtorch/lib/ /opt/libtorch/lib/
ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---- final --------------------------------------------------------------------------
FROM runtime-${TORCH} AS runtime
COPY --from=build /build/bin/shardd /usr/local/bin/shardd
# The uid/gid the operator gives shard pods (RenderInputs::run_as_user, 65532).
USER 65532:65532
# metrics (gRPC listens on 127.0.0.1:7000 only; DESIGN §7)
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/shardd"]
