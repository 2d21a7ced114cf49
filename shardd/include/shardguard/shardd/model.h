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

// 2×2 max-pooling with stride 2 over the last two dimensions of an [N, C, H, W] tensor
// (odd H or W: the last row or column is dropped), with exactly the values and the
// gradient of torch::max_pool2d(x, 2) — the gradient goes to the first maximum of each
// window in row-major order, as LibTorch's kernel gives it — computed as the maximum
// of the window's four strided quarters. LibTorch 1.13's CPU max_pool2d is a scalar
// loop that also writes an index per output; this is about 10× faster forward. One
// difference: a window holding a NaN passes no gradient (LibTorch's gives it to a NaN).
torch::Tensor max_pool_2x2(const torch::Tensor& x);

// Number of parameter elements of a module.
int64_t count_parameters(const torch::nn::Module& module);

}  // namespace shardguard::shardd
