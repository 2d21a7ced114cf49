// Tensors on the wire: dtype, shape and raw bytes (shardguard.v1.Tensor).
#pragma once

#include <string>
#include <vector>

#include <torch/types.h>

#include "shardguard/shardd/transport.h"  // FrameError, check_frame_shape
#include "shardguard/v1/pipeline.pb.h"

namespace shardguard::shardd {

// Copies a float32 tensor (any device) into msg.
void encode_tensor(const torch::Tensor& tensor, v1::Tensor* msg);

// Checks the frame against what this stage expects — float32, a batch dimension
// of 1..max_batch followed by exactly `sample_shape` — and the byte count; then
// takes the bytes without another copy (msg's data string is moved from).
// Throws FrameError naming the expected and the received shape/dtype.
torch::Tensor decode_tensor(v1::Tensor* msg, const std::vector<int64_t>& sample_shape, int64_t max_batch);

std::string describe(const v1::Tensor& msg);  // "float32[16, 32, 14, 14]"

}  // namespace shardguard::shardd
