// Text generation with a trained language model (`shardctl generate`): the window a
// forward pass sees and how the next token is drawn from the logits. The pipeline's
// stages (engine) and the monolithic decode of a recombined model (`shardctl
// recombine --prompt`) use the same two functions, so both give the same tokens.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "shardguard/shardd/stage.h"

namespace shardguard::shardd {

// The last `context` tokens of `tokens` as int64 [1, context], right-padded with
// token 0 when there are fewer; *position is the index of the last real token. A
// causal model's logits at that position depend on the real tokens only, so every
// pass has the shape the model was trained with.
torch::Tensor generation_window(const std::vector<int64_t>& tokens, int64_t context, int* position);

// The token drawn from `logits` (one position: [vocab]) for the `index`-th generated
// token: greedy (argmax, the lowest id on a tie) when temperature is 0 or top_k is 1,
// else from softmax(logits / temperature) restricted to the top_k most likely ids,
// with a uniform number that depends only on (seed, index).
int64_t sample_token(const torch::Tensor& logits, const GenerateOptions& options, int64_t index);

}  // namespace shardguard::shardd
