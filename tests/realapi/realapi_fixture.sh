#!/usr/bin/env bash
# The ctest fixture around the real Kubernetes API server of ../shared/realapi
# (Kubernetes' own apiextensions-apiserver + etcd; see docs/crd.md, "Which server").
#
#   realapi_fixture.sh start RUN_DIR   build it if missing (once per machine, 6-12 min),
#                                      then start a fresh one whose state lives in RUN_DIR
#   realapi_fixture.sh stop RUN_DIR    stop it by the pids start.sh wrote
#
# REALAPI_SRC names the folder with build.sh/start.sh/stop.sh (CMake passes
# SHARDGUARD_REALAPI_SRC); REALAPI_DIR where the build lives (build.sh's default).
set -euo pipefail
cmd=${1:?usage: realapi_fixture.sh start|stop RUN_DIR}
run=${2:?usage: realapi_fixture.sh start|stop RUN_DIR}
src=${REALAPI_SRC:?REALAPI_SRC must name the realapi scripts folder}
[ -x "$src/start.sh" ] || { echo "realapi: $src/start.sh not found (REALAPI_SRC=$src)" >&2; exit 2; }

case $cmd in
  start)
    "$src/build.sh"
    # A run dir left by a killed ctest: stop what it still runs, then start clean.
    if [ -f "$run/apiserver.pid" ] || [ -f "$run/etcd.pid" ]; then "$src/stop.sh" "$run" || true; fi
    rm -rf "$run"
    "$src/start.sh" "$run"
    ;;
  stop)
    if [ -d "$run" ]; then "$src/stop.sh" "$run"; else echo "realapi: nothing running in $run"; fi
    ;;
  *) echo "usage: realapi_fixture.sh start|stop RUN_DIR" >&2; exit 2 ;;
esac
