#!/bin/bash
# One lane of the A4 full run (docs/exposure-study.md, "A4: the query attacker"): model
# MODEL (cnn or vit) at 10 000 and 100 000 queries, every default row, 3 seeds, into
# OUT/MODEL-lo; then at 1 000 000 queries for the rows ROWS_1M into OUT/MODEL-1m, then for
# every other default row into the same OUT/MODEL-1m (ROWS_1M first: the rows that decide
# the question are a result on their own if the lane is stopped). All resumable: a rerun
# skips the cells already in their results.csv.
#
#   tools/exposure-study/a4-lane.sh MODEL OUT [ROWS_1M] [VICTIM.pt] [WAIT_PID]
#
# VICTIM.pt: a cached victim (models/victim-MODEL-n60000-e1-seed1.pt of an earlier run
# with the same --victim-epochs) copied into both outputs, so the victim is not trained
# again. WAIT_PID: start only once that process has ended (a run sharing these cores).
# Runs from the repository root with build/bin/shardctl, at nice 15 on one thread.
set -euo pipefail
m=${1:?MODEL (cnn or vit)} out=${2:?OUT directory} rows1m=${3:-none,s0,s1,s0+1,s1+2+3,all}
victim=${4:-} wait_pid=${5:-}
cd "$(dirname "$0")/../.."
if [ -n "$wait_pid" ]; then
  while kill -0 "$wait_pid" 2>/dev/null; do sleep 60; done  # a lane waits for the run before it
fi
flags=(--job "examples/fashion-mnist-$m.yaml" --attacks A4 --seeds 3 --steps 200 --batch 64
       --test-samples 2000 --victim-epochs 1 --threads 1 --no-plots)
for o in "$m-lo" "$m-1m"; do
  mkdir -p "$out/$o/models"
  [ -z "$victim" ] || cp -n "$victim" "$out/$o/models/"
done
run() { OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice -n 15 build/bin/shardctl study "${flags[@]}" "$@"; }
echo "a4 lane $m: 10k+100k from $(date -u +%FT%TZ)"
run --out "$out/$m-lo" --queries 10000,100000
echo "a4 lane $m: 1M ($rows1m) from $(date -u +%FT%TZ)"
run --out "$out/$m-1m" --queries 1000000 --rows "$rows1m"
echo "a4 lane $m: 1M, every other row, from $(date -u +%FT%TZ)"
run --out "$out/$m-1m" --queries 1000000
echo "a4 lane $m: done $(date -u +%FT%TZ)"
