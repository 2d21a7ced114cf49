#!/usr/bin/env bash
# The operator image needs no gRPC: builds shardguard-operator from exactly what the
# build stage of images/operator.Dockerfile copies, configured as that stage configures
# it (SHARDGUARD_OPERATOR_ONLY=ON), with gRPC, Protobuf and LibTorch hidden from CMake,
# then checks that the binary loads none of their libraries and that the Dockerfile
# installs none of their packages. Registered by tests/images/CMakeLists.txt
# (images_operator_build); docs/images.md.
#
#   check_operator_build.sh SOURCE_DIR WORK_DIR
#
# WORK_DIR (inside the build tree) receives src/ (the COPY set) and build/. Exit 0 when
# every check passed, 1 otherwise (each failure on a FAIL line).
set -u -o pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 SOURCE_DIR WORK_DIR" >&2; exit 2; }
src=$1 work=$2
dockerfile=$src/images/operator.Dockerfile
fail=0
FAIL() { echo "FAIL: $*"; fail=1; }

# 1. No gRPC or Protobuf package in any apt-get install of the Dockerfile.
pkgs=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$dockerfile" | grep -E 'apt-get install' | tr ' ' '\n' |
       grep -E '^[a-z0-9][a-z0-9.+-]+$' | grep -vE '^(apt-get|install|update|rm|RUN|DEBIAN_FRONTEND.*)$' || true)
for p in $pkgs; do
  case "$p" in *grpc*|*protobuf*|*torch*) FAIL "$dockerfile installs $p: the operator must not need it" ;; esac
done

# 2. The build stage's COPY set, and nothing else, configures and builds the operator.
rm -rf "$work/src" && mkdir -p "$work/src" "$work/build" || exit 1
while read -r from to; do
  [[ -e "$src/$from" ]] || { FAIL "COPY $from: no such path in $src"; continue; }
  mkdir -p "$work/src/$(dirname "${to%/}")"
  cp -a "$src/${from%/}" "$work/src/${to%/}"
done < <(awk '/^FROM .* AS build/{b=1; next} /^FROM /{b=0} b && /^COPY / && !/--from/ {print $2, $3}' "$dockerfile")
cmake_args=$(awk '/^FROM .* AS build/{b=1; next} /^FROM /{b=0} b' "$dockerfile" | grep -oE -- '-D[A-Z_]+=[A-Za-z0-9_]+' | tr '\n' ' ')
[[ "$cmake_args" == *SHARDGUARD_OPERATOR_ONLY=ON* ]] || FAIL "the build stage does not configure with -DSHARDGUARD_OPERATOR_ONLY=ON"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
# shellcheck disable=SC2086
if ! cmake -S "$work/src" -B "$work/build" "${gen[@]}" $cmake_args \
       -DCMAKE_DISABLE_FIND_PACKAGE_gRPC=ON -DCMAKE_DISABLE_FIND_PACKAGE_Protobuf=ON \
       -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON > "$work/configure.log" 2>&1; then
  tail -n 30 "$work/configure.log"; FAIL "configuring the operator's COPY set without gRPC/Protobuf/LibTorch failed"
elif ! cmake --build "$work/build" --target shardguard-operator > "$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log"; FAIL "building shardguard-operator from the COPY set failed"
else
  bin=$work/build/bin/shardguard-operator
  # The library names only (ldd's first column), not the load addresses after them.
  if libs=$(ldd "$bin" | awk '{print $1}' | grep -E '^lib(grpc|gpr|upb|protobuf|absl_|torch|c10)'); then
    FAIL "shardguard-operator loads: $libs"
  fi
  "$bin" --help > /dev/null 2>&1 || FAIL "$bin --help failed"
fi
[[ $fail -eq 0 ]] && echo "ok: shardguard-operator builds from the Dockerfile's COPY set without gRPC, Protobuf or LibTorch and loads none of them"
exit $fail
