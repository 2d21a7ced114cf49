#include "shardguard/shardd/schedule.h"

#include <algorithm>
#include <stdexcept>

namespace shardguard::shardd {

std::vector<PipeOp> make_schedule(const std::string& kind, int stage, int stages, int micro_batches) {
  if (stage < 0 || stage >= stages || micro_batches < 1) {
    throw std::invalid_argument("make_schedule: stage " + std::to_string(stage) + " of " + std::to_string(stages) +
                                " with " + std::to_string(micro_batches) + " micro-batches");
  }
  std::vector<PipeOp> ops;
  ops.reserve(2 * static_cast<size_t>(micro_batches));
  if (kind == "gpipe") {
    for (int m = 0; m < micro_batches; ++m) ops.push_back({PipeOp::kForward, m});
    for (int m = 0; m < micro_batches; ++m) ops.push_back({PipeOp::kBackward, m});
    return ops;
  }
  if (kind != "1f1b") throw std::invalid_argument("unknown schedule \"" + kind + "\" (expected 1f1b or gpipe)");
  const int warmup = std::min(stages - 1 - stage, micro_batches);
  int next_f = 0, next_b = 0;
  for (; next_f < warmup; ++next_f) ops.push_back({PipeOp::kForward, next_f});
  while (next_f < micro_batches) {
    ops.push_back({PipeOp::kForward, next_f++});
    ops.push_back({PipeOp::kBackward, next_b++});
  }
  while (next_b < micro_batches) ops.push_back({PipeOp::kBackward, next_b++});
  return ops;
}

}  // namespace shardguard::shardd
