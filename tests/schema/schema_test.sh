#!/usr/bin/env bash
# ctest driver of the schema tests (tests/schema/CMakeLists.txt, label "schema").
#
#   schema_test.sh NODE SOURCE_DIR crds
#   schema_test.sh NODE SOURCE_DIR examples
#   schema_test.sh NODE SOURCE_DIR deploy
#   schema_test.sh NODE SOURCE_DIR negative
#   schema_test.sh NODE SOURCE_DIR render SHARDCTL WORKDIR
#
# NODE is the node binary CMake found (or NODE-NOTFOUND). Missing tooling is a
# failure, never a skip: CI runs `make deps` before the tests.
set -u
node=$1
src=$2
mode=$3
shift 3

fail() {
  echo "schema_test ($mode): $*" >&2
  exit 1
}

if [ -z "$node" ] || [ "$node" = "NODE-NOTFOUND" ] || ! "$node" --version >/dev/null 2>&1; then
  fail "node (Node.js 18+) not found; run \`make deps\` (it installs nodejs, npm and tools/node_modules)"
fi
if [ ! -d "$src/tools/node_modules/kubernetes-models" ] || [ ! -d "$src/tools/node_modules/yaml" ]; then
  fail "$src/tools/node_modules is missing or incomplete; run \`make deps\` (npm ci in tools/)"
fi

validate=("$node" "$src/tests/schema/validate.mjs")
crd_files=("$src"/crds/*.yaml)
crd_args=()
for c in "${crd_files[@]}"; do crd_args+=(--crd "$c"); done

case "$mode" in
  crds)
    exec "${validate[@]}" "${crd_files[@]}"
    ;;
  examples)
    # examples/models/*.yaml: the jobs of shardctl split (docs/distribution.md).
    exec "${validate[@]}" "${crd_args[@]}" "$src"/examples/*.yaml "$src"/examples/models/*.yaml
    ;;
  deploy)
    # deploy/*.yaml (the operator installed by hand) against the Kubernetes schemas.
    deploy_files=("$src"/deploy/*.yaml)
    [ -e "${deploy_files[0]}" ] || fail "no $src/deploy/*.yaml"
    exec "${validate[@]}" "${crd_args[@]}" "${deploy_files[@]}"
    ;;
  negative)
    # Every object of testdata/broken.yaml must fail, each for its own reason.
    out=$("${validate[@]}" "${crd_args[@]}" "$src/tests/schema/testdata/broken.yaml")
    rc=$?
    printf '%s\n' "$out"
    [ "$rc" -eq 1 ] || fail "expected exit 1 for the broken objects, got $rc"
    expected=(
      'FAIL Pod default/containers-not-a-list: spec.containers must be array'
      'FAIL Secret default/data-not-base64: data["tls.key"] must match format "byte"'
      'FAIL ShardedTrainingJob default/unknown-architecture: spec.model.architecture must be one of'
      'FAIL ShardedTrainingJob default/misspelt-field: spec.sharding.shard unknown field'
      'FAIL Widget no-schema: unknown kind: no schema for apiVersion example.com/v1 kind Widget'
      '0 passed, 5 failed'
    )
    for e in "${expected[@]}"; do
      grep -qF -- "$e" <<<"$out" || fail "missing from the validator's output: $e"
    done
    echo "the validator rejected every broken object"
    ;;
  render)
    shardctl=$1
    work=$2
    [ -x "$shardctl" ] || fail "shardctl not found at $shardctl"
    rm -rf "$work" && mkdir -p "$work" || fail "cannot create $work"
    files=()
    for job in "$src"/examples/*.yaml; do
      name=$(basename "$job" .yaml)
      # A package job renders from its split packages (the manifest and keys), which
      # only `shardctl split` of a TorchScript archive makes: tests/operator's
      # RenderPackage and tests/integration's package tests render those.
      if grep -q '^ *architecture: torchscript' "$job"; then
        echo "skipped $name: spec.model.package needs the packages of shardctl split"
        continue
      fi
      "$shardctl" render "$job" --out "$work/$name.yaml" ||
        fail "shardctl render $job failed"
      files+=("$work/$name.yaml")
    done
    # The JSON List form too, of the first example.
    first=("$src"/examples/*.yaml)
    "$shardctl" render "${first[0]}" --format json --out "$work/$(basename "${first[0]}" .yaml).json" ||
      fail "shardctl render --format json ${first[0]} failed"
    files+=("$work/$(basename "${first[0]}" .yaml).json")
    "${validate[@]}" "${files[@]}"
    rc=$?
    rm -rf "$work"  # private keys
    exit $rc
    ;;
  *)
    fail "unknown mode (crds, examples, deploy, negative, render)"
    ;;
esac
