#!/usr/bin/env bash
# Runs libFuzzer targets for a fixed time each: `make fuzz-smoke` (20 s) and
# `make fuzz` (FUZZ_SECONDS). Usage: run_fuzzers.sh BUILD_DIR SECONDS TARGET...
# (TARGET "policy" runs BUILD_DIR/bin/policy_fuzz on tests/fuzz/corpus/policy/).
#
# Each target runs on a copy of its seed corpus in a temporary folder (the committed
# seeds are never modified) with -timeout=10 -rss_limit_mb=2048. Any crash, sanitizer
# report, timeout or out-of-memory fails the run; the input that did it is kept as
# BUILD_DIR/fuzz-artifacts/TARGET/crash-<sha1> (or timeout-, oom-, leak-) and can be
# replayed with `BUILD_DIR/bin/TARGET_fuzz FILE`. Extra libFuzzer flags: FUZZ_ARGS.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 BUILD_DIR SECONDS TARGET..." >&2
  exit 2
fi
build="$1"
seconds="$2"
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
status=0
for target in "$@"; do
  bin="$build/bin/${target}_fuzz"
  if [ ! -x "$bin" ]; then
    echo "fuzz: $bin is missing (make fuzz-build)" >&2
    exit 1
  fi
  work="$(mktemp -d)"
  artifacts="$build/fuzz-artifacts/$target"
  mkdir -p "$work/corpus" "$artifacts"
  cp "$here/corpus/$target/"* "$work/corpus/"
  seeds=$(ls "$work/corpus" | wc -l)
  dict=()
  [ -f "$here/$target.dict" ] && dict=("-dict=$here/$target.dict")
  echo "fuzz: ${target}_fuzz for ${seconds}s on $seeds seeds"
  # shellcheck disable=SC2086
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" ${FUZZ_ARGS:-} "$work/corpus" > "$work/log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log" | tail -1)
  per_sec=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/log" | tail -1)
  units=$(ls "$work/corpus" | wc -l)
  if [ "$rc" -ne 0 ]; then
    echo "fuzz: ${target}_fuzz FAILED (exit $rc) after ${execs:-?} executions; the end of its log:" >&2
    grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$work/log" | tail -60 >&2
    echo "fuzz: reproduce with: $bin $(ls -t "$artifacts" | head -1 | sed "s|^|$artifacts/|")" >&2
    status=1
  else
    echo "fuzz: ${target}_fuzz ok: ${execs:-?} executions (${per_sec:-?}/s), corpus $seeds -> $units inputs"
  fi
  rm -rf "$work"
done
exit $status
