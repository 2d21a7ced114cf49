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
#
# A4_PHASES (default "lo 1m"): the phases to run; "1m" alone skips the 10 000/100 000
# part (its cells are in docs/exposure-study/a4/). The 1 M cells a run has finished are
# committed to docs/exposure-study/a4/1m/MODEL/ (results.csv and settings.txt, copied
# from OUT/MODEL-1m, with its victim in models/): a machine without OUT starts from them,
# so that no finished cell is trained again and every 1 M cell of a model measures the one
# victim (the same command trains a different cnn victim on a CPU with other BLAS kernels:
# 0.8965 for the 10 k/100 k cells, 0.8930 on an AVX-512 Xeon).
set -euo pipefail
m=${1:?MODEL (cnn or vit)} out=${2:?OUT directory} rows1m=${3:-none,s0,s1,s0+1,s1+2+3,all}
victim=${4:-} wait_pid=${5:-}
cd "$(dirname "$0")/../.."
if [ -n "$wait_pid" ]; then
  while kill -0 "$wait_pid" 2>/dev/null; do sleep 60; done  # a lane waits for the run before it
fi
flags=(--job "examples/fashion-mnist-$m.yaml" --attacks A4 --seeds 3 --steps 200 --batch 64
       --test-samples 2000 --victim-epochs 1 --threads 1 --no-plots)
phases=${A4_PHASES:-lo 1m}
for o in "$m-lo" "$m-1m"; do
  mkdir -p "$out/$o/models"
  [ -z "$victim" ] || cp -n "$victim" "$out/$o/models/"
done
saved=docs/exposure-study/a4/1m/$m
if [ -f "$saved/results.csv" ] && [ ! -f "$out/$m-1m/results.csv" ]; then
  cp "$saved/settings.txt" "$saved/results.csv" "$out/$m-1m/"
  cp -n "$saved"/models/*.pt "$out/$m-1m/models/"
  echo "a4 lane $m: 1M resumes from $saved ($(($(wc -l < "$saved/results.csv") - 1)) lines)"
fi
run() { OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice -n 15 build/bin/shardctl study "${flags[@]}" "$@"; }
case " $phases " in *" lo "*)
  echo "a4 lane $m: 10k+100k from $(date -u +%FT%TZ)"
  run --out "$out/$m-lo" --queries 10000,100000 ;;
esac
case " $phases " in *" 1m "*) ;; *) echo "a4 lane $m: done $(date -u +%FT%TZ)"; exit 0 ;; esac
echo "a4 lane $m: 1M ($rows1m) from $(date -u +%FT%TZ)"
run --out "$out/$m-1m" --queries 1000000 --rows "$rows1m"
echo "a4 lane $m: 1M, every other row, from $(date -u +%FT%TZ)"
run --out "$out/$m-1m" --queries 1000000
echo "a4 lane $m: done $(date -u +%FT%TZ)"
