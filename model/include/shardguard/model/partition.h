// partition(model, n, balance) → n contiguous stages. Pure and deterministic.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "shardguard/model/model_desc.h"

namespace shardguard::model {

struct StageDesc {
  int index = 0;
  int first_block = 0;  // inclusive
  int end_block = 0;    // exclusive
  int64_t parameters = 0;
  int64_t flops = 0;
  int num_blocks() const { return end_block - first_block; }
};

class PartitionError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Splits the blocks into n non-empty contiguous stages so that the largest
// stage cost (parameters or FLOPs, per `balance`) is as small as possible; among
// equal optima the earliest cut points win, so the result never varies.
// Throws PartitionError naming n and the number of blocks when n is out of range.
std::vector<StageDesc> partition(const ModelDesc& model, int n, const std::string& balance);

// Share of the model's parameters held by a stage, in [0, 1].
double parameter_share(const ModelDesc& model, const StageDesc& stage);

}  // namespace shardguard::model
