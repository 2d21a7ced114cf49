// What a model is made of, without building it: the ordered blocks of each
// architecture of the zoo with their tensor shapes, parameter counts and FLOPs.
// Pure and torch-free, so the partitioner, the operator and the exposure math
// can reason about a model that no process ever builds whole.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "shardguard/common/jobspec.h"

namespace shardguard::model {

struct BlockDesc {
  int index = 0;
  std::string name;                 // e.g. "conv1", "encoder2", "head"
  std::vector<int64_t> in_shape;    // per sample (no batch dimension)
  std::vector<int64_t> out_shape;   // per sample
  int64_t parameters = 0;
  int64_t flops = 0;                // forward multiply-adds × 2, per sample
};

struct ModelDesc {
  std::string architecture;
  std::vector<BlockDesc> blocks;
  int64_t parameters() const;
  int64_t flops() const;
};

inline constexpr int kImageSide = 28;
inline constexpr int kNumClasses = 10;

// Throws JobSpecError (path spec.model.architecture) for an unknown architecture.
ModelDesc describe_model(const ModelSpec& spec);

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace shardguard::model
