// Pipeline schedules as plain data: the order in which one stage runs the
// forward (F) and backward (B) passes of the M micro-batches of a step.
#pragma once

#include <string>
#include <vector>

namespace shardguard::shardd {

struct PipeOp {
  enum Kind { kForward, kBackward } kind;
  int micro_batch;
  bool operator==(const PipeOp& o) const { return kind == o.kind && micro_batch == o.micro_batch; }
};

// gpipe: F0..F(M-1), B0..B(M-1).
// 1f1b: min(n-1-stage, M) warm-up forwards, then one forward and one backward
// alternately, then the remaining backwards; at most n-stage micro-batches
// are in flight on a stage, so activation memory no longer grows with M.
// Backwards run in micro-batch order in both, so gradients accumulate in the
// same order as in a single process.
std::vector<PipeOp> make_schedule(const std::string& kind, int stage, int stages, int micro_batches);

}  // namespace shardguard::shardd
