#!/usr/bin/env bash
# The dependency direction of docs/architecture.md, checked on the sources: which
# folder may include which project headers, and where LibTorch and gRPC headers may
# appear. CMake's link lines enforce the same at build time for what a target links;
# this catches an include that happens to compile through a transitive include path.
# Registered by tests/CMakeLists.txt (label "layout").
#
#   check_layering.sh SOURCE_DIR
#
# Exit 0 when every rule holds, 1 otherwise (one FAIL line per offending include).
set -u -o pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 SOURCE_DIR" >&2; exit 2; }
cd "$1" || exit 2
fail=0

# forbid FOLDER_OR_FILES... -- PATTERN WHY
forbid() {
  local files=() pattern why
  while [[ $1 != -- ]]; do files+=("$1"); shift; done
  shift; pattern=$1 why=$2
  local hits
  hits=$(grep -rnE --include='*.h' --include='*.cpp' "^[[:space:]]*#[[:space:]]*include[[:space:]]*[<\"]($pattern)" \
         "${files[@]}" 2>/dev/null || true)
  if [[ -n $hits ]]; then
    while IFS= read -r h; do echo "FAIL: $h — $why"; done <<< "$hits"
    fail=1
  fi
}

project='shardguard/(model|policy|sidecar|shardd|shardctl|operator|kube)/'
forbid common -- "$project|torch/|grpc|google/protobuf|shardguard/v1/" \
  "common depends on nothing of the project and on neither LibTorch nor gRPC"
forbid model -- 'shardguard/(policy|sidecar|shardd|shardctl|operator|kube)/|torch/|grpc|google/protobuf' \
  "model is torch-free plain C++ on common"
forbid policy -- 'shardguard/(model|sidecar|shardd|shardctl|operator|kube)/|torch/|grpc|google/protobuf' \
  "policy is common + nlohmann_json only"
forbid operator -- 'shardguard/(sidecar|shardd|shardctl)/|shardguard/v1/|torch/|grpc|google/protobuf' \
  "the operator links common, model, policy and kube only (its image has no gRPC)"
forbid operator/src/render.cpp operator/include/shardguard/operator/render.h -- 'shardguard/operator/(status|reconcile|controller)\.h' \
  "render is pure and below status and reconcile"
forbid sidecar -- 'shardguard/(model|shardd|shardctl|operator|kube)/|torch/' \
  "the sidecar never depends on training code or the operator"
forbid sidecar/src/h2 sidecar/include/shardguard/sidecar/h2 -- 'grpc|google/protobuf|shardguard/v1/|shardguard/(policy|common)/' \
  "the HTTP/2 data plane (shardguard_sidecar_h2) is gRPC-free and takes policy and identity through its hooks"
forbid shardd -- 'shardguard/(sidecar|shardctl|operator|kube|policy)/' \
  "shardd depends on model, proto and common only"
mapfile -t torch_free < <(ls shardctl/src/*.cpp shardctl/include/shardguard/shardctl/*.h shardctl/main.cpp |
                          grep -vE 'shardctl/src/(recombine_cmd|split_cmd|study)\.cpp$|shardctl/main\.cpp$')
# (main.cpp includes shardd/threads.h under #ifdef SHARDCTL_WITH_TORCH; the library must not.)
forbid "${torch_free[@]}" -- 'torch/|shardguard/shardd/' \
  "only recombine_cmd.cpp, split_cmd.cpp and study.cpp (shardguard_shardctl_torch) may use LibTorch or shardd"

[[ $fail -eq 0 ]] && echo "ok: every include follows docs/architecture.md's dependency direction"
exit $fail
