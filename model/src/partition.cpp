#include "shardguard/model/partition.h"

#include <algorithm>
#include <limits>

namespace shardguard::model {

std::vector<StageDesc> partition(const ModelDesc& model, int n, const std::string& balance) {
  const int blocks = static_cast<int>(model.blocks.size());
  if (balance != "parameters" && balance != "compute") {
    throw PartitionError("spec.sharding.balance: unknown balance \"" + balance +
                         "\" (expected parameters or compute)");
  }
  if (n < 1 || n > blocks) {
    throw PartitionError("spec.sharding.shards: " + std::to_string(n) + " shards cannot be cut from the " +
                         std::to_string(blocks) + " blocks of model " + model.architecture +
                         " (need 1 to " + std::to_string(blocks) + ")");
  }
  std::vector<int64_t> cost(blocks);
  for (int b = 0; b < blocks; ++b) {
    cost[b] = balance == "parameters" ? model.blocks[b].parameters : model.blocks[b].flops;
  }
  std::vector<int64_t> prefix(blocks + 1, 0);
  for (int b = 0; b < blocks; ++b) prefix[b + 1] = prefix[b] + cost[b];

  // best[k][j]: smallest possible largest-stage cost when the first j blocks form
  // k stages; cut[k][j]: where the k-th stage starts in that optimum.
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max();
  std::vector<std::vector<int64_t>> best(n + 1, std::vector<int64_t>(blocks + 1, kInf));
  std::vector<std::vector<int>> cut(n + 1, std::vector<int>(blocks + 1, 0));
  best[0][0] = 0;
  for (int k = 1; k <= n; ++k) {
    for (int j = k; j <= blocks; ++j) {
      for (int i = k - 1; i < j; ++i) {  // stage k covers blocks [i, j)
        if (best[k - 1][i] == kInf) continue;
        const int64_t worst = std::max(best[k - 1][i], prefix[j] - prefix[i]);
        if (worst < best[k][j]) {  // strict: the earliest cut wins ties
          best[k][j] = worst;
          cut[k][j] = i;
        }
      }
    }
  }
  std::vector<StageDesc> stages(n);
  int end = blocks;
  for (int k = n; k >= 1; --k) {
    const int begin = cut[k][end];
    StageDesc& s = stages[k - 1];
    s.index = k - 1;
    s.first_block = begin;
    s.end_block = end;
    for (int b = begin; b < end; ++b) {
      s.parameters += model.blocks[b].parameters;
      s.flops += model.blocks[b].flops;
    }
    end = begin;
  }
  return stages;
}

double parameter_share(const ModelDesc& model, const StageDesc& stage) {
  const int64_t total = model.parameters();
  return total == 0 ? 0.0 : static_cast<double>(stage.parameters) / static_cast<double>(total);
}

}  // namespace shardguard::model
