#!/usr/bin/env bash
# The image names and tags agree everywhere they are written (ctest images_names):
#   images/<x>.Dockerfile   "# Image: <repository>" header
#   charts/shardguard/values.yaml   operator/shardd/sidecar .image.repository
#   charts/shardguard/Chart.yaml    appVersion (the chart's default tag)
#   CMakeLists.txt                  project(shardguard VERSION …) == appVersion
#   operator/include/.../render.h   kDefault{Shard,Sidecar}Image: the operator's and
#                                   shardctl render's --shardd-image / --sidecar-image defaults
#   deploy/operator.yaml            the operator Deployment's image
#   Makefile                        `make images` tags (make -n)
#
#   check_image_names.sh SOURCE_DIR
set -u -o pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 SOURCE_DIR" >&2; exit 2; }
SRC=$1
failures=0
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
ok() { echo "ok   $*"; }

app=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}.*/\1/p' "$SRC/charts/shardguard/Chart.yaml")
ver=$(sed -n 's/^project(shardguard VERSION \([0-9.]*\).*/\1/p' "$SRC/CMakeLists.txt")
[[ -n $app ]] || fail "charts/shardguard/Chart.yaml: no appVersion"
if [[ $app == "$ver" ]]; then ok "Chart appVersion $app == CMake project VERSION"
else fail "Chart appVersion '$app' != CMakeLists.txt project VERSION '$ver'"; fi

# values.yaml: <key>:\n  image:\n    repository: X  (top-level key, two-space indents)
values_repo() {
  awk -v key="$1" '
    /^[^ #]/ { top = $0; sub(/:.*/, "", top); img = 0 }
    top == key && /^  image:/ { img = 1; next }
    top == key && img && /^    repository:/ { v = $0; sub(/^    repository:[ \t]*/, "", v); gsub(/"/, "", v); print v; exit }
  ' "$SRC/charts/shardguard/values.yaml"
}
make_out=$(make -n -s -C "$SRC" images 2>&1) || make_out=""

declare -A REPO=()
for pair in operator:operator shardd:shardd sidecar:sidecar; do
  key=${pair%%:*} df=$SRC/images/${pair#*:}.Dockerfile
  v=$(values_repo "$key")
  d=$(sed -n 's/^#[[:space:]]*Image:[[:space:]]*\([^[:space:]]*\).*/\1/p' "$df" 2>/dev/null | head -n1)
  [[ -n $v ]] || fail "values.yaml: no $key.image.repository"
  [[ -n $d ]] || fail "images/${pair#*:}.Dockerfile: no '# Image: <repository>' header"
  if [[ -n $v && $v == "$d" ]]; then ok "$key: values.yaml $key.image.repository == images/${pair#*:}.Dockerfile: $v"
  elif [[ -n $v && -n $d ]]; then fail "$key: values.yaml says $v, images/${pair#*:}.Dockerfile says $d"; fi
  REPO[$key]=$v
  if grep -Eq -- "docker (buildx )?build .*-f images/${pair#*:}\.Dockerfile .*-t ${v}:${app}( |$)|-t ${v}:${app} .*-f images/${pair#*:}\.Dockerfile" <<<"$make_out"; then
    ok "$key: make images tags ${v}:${app}"
  else
    fail "$key: 'make -n images' does not build images/${pair#*:}.Dockerfile as ${v}:${app}"
  fi
done

render_h=$SRC/operator/include/shardguard/operator/render.h
for pair in shardd:kDefaultShardImage sidecar:kDefaultSidecarImage; do
  key=${pair%%:*} var=${pair#*:}
  got=$(sed -n "s/.*${var} = \"\([^\"]*\)\".*/\1/p" "$render_h")
  want=${REPO[$key]}:$app
  if [[ $got == "$want" ]]; then ok "render.h ${var} (--${key}-image default) $got"
  else fail "render.h ${var} (--${key}-image default) '$got' != values.yaml + appVersion '$want'"; fi
done

got=$(sed -n 's/^[[:space:]]*image:[[:space:]]*\([^[:space:]]*shardguard-operator[^[:space:]]*\).*/\1/p' "$SRC/deploy/operator.yaml" | head -n1)
want=${REPO[operator]}:$app
if [[ $got == "$want" ]]; then ok "deploy/operator.yaml image $got"
else fail "deploy/operator.yaml image '$got' != '$want'"; fi

[[ $failures -eq 0 ]] || { echo "$failures check(s) failed"; exit 1; }
echo PASS
