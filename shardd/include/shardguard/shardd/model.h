// The model zoo in LibTorch: builds only the blocks a stage owns.
#pragma once

#include <cstdint>

#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include "shardguard/model/model_desc.h"

namespace shardguard::shardd {

// The seed of block `index` of a job: a SplitMix64 mix of both, so the same block
// gets the same initial weights whatever the cut and whichever process builds it.
uint64_t block_seed(uint64_t job_seed, int block_index);

// Builds blocks [first, end) of the model as one Sequential whose children are
// named "block<global index>", so parameter names are the same in every stage
// layout ("block3.0.weight") and shards can be recombined by name.
// Thread-safe (construction is serialised: LibTorch's default generator is global).
torch::nn::Sequential build_blocks(const ModelSpec& spec, int first, int end, uint64_t job_seed);

// 2×2 max-pooling with stride 2 of a [C, H, W] or [N, C, H, W] floating-point tensor
// (odd H or W: the last row or column is dropped): the values of torch::max_pool2d(x, 2).
// When autograd does not record it (evaluation, a victim's answers, a frozen stage with
// nothing trainable before it) it is the maximum of each window's four strided
// quarters, up to 9× faster than LibTorch 1.13's CPU kernel, which scans every window in
// a scalar loop and writes an index per output; when it does, it is that kernel, whose
// backward needs the indices. Throws std::invalid_argument on another shape or type.
torch::Tensor max_pool_2x2(const torch::Tensor& x);

// Number of parameter elements of a module.
int64_t count_parameters(const torch::nn::Module& module);

}  // namespace shardguard::shardd
