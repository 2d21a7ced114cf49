#include "shardguard/shardd/model.h"

#include <array>
#include <cmath>
#include <limits>
#include <mutex>
#include <stdexcept>

#include <torch/nn.h>

namespace shardguard::shardd {
namespace {

namespace nn = torch::nn;

// ViT patch embedding: cut the image into p×p patches, project each to `dim`,
// add a learned position embedding.
struct PatchEmbedImpl : nn::Module {
  PatchEmbedImpl(int patch, int dim) : patch(patch) {
    const int per_side = model::kImageSide / patch;
    proj = register_module("proj", nn::Linear(patch * patch, dim));
    pos = register_parameter("pos", torch::randn({per_side * per_side, dim}) * 0.02);
  }
  torch::Tensor forward(torch::Tensor x) {
    const int64_t n = x.size(0), s = model::kImageSide / patch;
    x = x.reshape({n, s, patch, s, patch}).permute({0, 1, 3, 2, 4}).reshape({n, s * s, patch * patch});
    return proj(x) + pos;
  }
  int patch;
  nn::Linear proj{nullptr};
  torch::Tensor pos;
};
TORCH_MODULE(PatchEmbed);

// Pre-norm transformer encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)).
struct EncoderImpl : nn::Module {
  EncoderImpl(int dim, int heads) : heads(heads) {
    ln1 = register_module("ln1", nn::LayerNorm(nn::LayerNormOptions({dim})));
    qkv = register_module("qkv", nn::Linear(dim, 3 * dim));
    proj = register_module("proj", nn::Linear(dim, dim));
    ln2 = register_module("ln2", nn::LayerNorm(nn::LayerNormOptions({dim})));
    fc1 = register_module("fc1", nn::Linear(dim, 2 * dim));
    fc2 = register_module("fc2", nn::Linear(2 * dim, dim));
  }
  torch::Tensor forward(torch::Tensor x) {
    const int64_t n = x.size(0), t = x.size(1), d = x.size(2), dh = d / heads;
    auto parts = qkv(ln1(x)).reshape({n, t, 3, heads, dh}).permute({2, 0, 3, 1, 4});
    auto q = parts[0], k = parts[1], v = parts[2];
    auto att = torch::softmax(torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(dh)), -1);
    auto mixed = torch::matmul(att, v).permute({0, 2, 1, 3}).reshape({n, t, d});
    x = x + proj(mixed);
    return x + fc2(torch::gelu(fc1(ln2(x))));
  }
  int heads;
  nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Encoder);

// ViT head: layer norm, mean over tokens, linear classifier.
struct VitHeadImpl : nn::Module {
  explicit VitHeadImpl(int dim) {
    ln = register_module("ln", nn::LayerNorm(nn::LayerNormOptions({dim})));
    fc = register_module("fc", nn::Linear(dim, model::kNumClasses));
  }
  torch::Tensor forward(torch::Tensor x) { return fc(ln(x).mean(1)); }
  nn::LayerNorm ln{nullptr};
  nn::Linear fc{nullptr};
};
TORCH_MODULE(VitHead);

// gpt embedding: token ids [n, t] (int64) → token vectors + learned positions [n, t, d].
struct TokenEmbedImpl : nn::Module {
  TokenEmbedImpl(int vocab, int context, int dim) {
    tokens = register_parameter("tokens", torch::randn({vocab, dim}) * 0.02);
    pos = register_parameter("pos", torch::randn({context, dim}) * 0.02);
  }
  torch::Tensor forward(torch::Tensor ids) {
    return torch::embedding(tokens, ids) + pos.slice(0, 0, ids.size(1));
  }
  torch::Tensor tokens, pos;
};
TORCH_MODULE(TokenEmbed);

// Pre-norm causal transformer block: x + proj(masked MHSA(LN(x))), then
// x + fc2(gelu(fc1(LN(x)))) with a 4×-wide MLP. Position j attends to 0..j only.
struct CausalBlockImpl : nn::Module {
  CausalBlockImpl(int dim, int heads) : heads(heads) {
    ln1 = register_module("ln1", nn::LayerNorm(nn::LayerNormOptions({dim})));
    qkv = register_module("qkv", nn::Linear(dim, 3 * dim));
    proj = register_module("proj", nn::Linear(dim, dim));
    ln2 = register_module("ln2", nn::LayerNorm(nn::LayerNormOptions({dim})));
    fc1 = register_module("fc1", nn::Linear(dim, 4 * dim));
    fc2 = register_module("fc2", nn::Linear(4 * dim, dim));
  }
  torch::Tensor forward(torch::Tensor x) {
    const int64_t n = x.size(0), t = x.size(1), d = x.size(2), dh = d / heads;
    auto parts = qkv(ln1(x)).reshape({n, t, 3, heads, dh}).permute({2, 0, 3, 1, 4});
    auto q = parts[0], k = parts[1], v = parts[2];
    auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(dh));
    const auto future = torch::ones({t, t}, torch::TensorOptions().dtype(torch::kBool).device(x.device())).triu(1);
    auto att = torch::softmax(scores.masked_fill(future, -std::numeric_limits<float>::infinity()), -1);
    auto mixed = torch::matmul(att, v).permute({0, 2, 1, 3}).reshape({n, t, d});
    x = x + proj(mixed);
    return x + fc2(torch::gelu(fc1(ln2(x))));
  }
  int heads;
  nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CausalBlock);

// gpt head: layer norm, linear to the vocabulary (logits for every position).
struct LmHeadImpl : nn::Module {
  LmHeadImpl(int dim, int vocab) {
    ln = register_module("ln", nn::LayerNorm(nn::LayerNormOptions({dim})));
    fc = register_module("fc", nn::Linear(dim, vocab));
  }
  torch::Tensor forward(torch::Tensor x) { return fc(ln(x)); }
  nn::LayerNorm ln{nullptr};
  nn::Linear fc{nullptr};
};
TORCH_MODULE(LmHead);

// The four strided quarters of x's 2×2 windows: the (0,0), (0,1), (1,0) and (1,1)
// elements of every window.
std::array<torch::Tensor, 4> quarters(const torch::Tensor& x) {
  using torch::indexing::Slice;
  const int64_t h = x.size(-2) / 2 * 2, w = x.size(-1) / 2 * 2;
  std::array<torch::Tensor, 4> q;
  for (int k = 0; k < 4; ++k) q[k] = x.index({"...", Slice(k / 2, h, 2), Slice(k % 2, w, 2)});
  return q;
}

// The cnn's pooling layer (see max_pool_2x2).
struct MaxPool2x2Impl : nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return max_pool_2x2(x); }
};
TORCH_MODULE(MaxPool2x2);

// One block: a Sequential with a concrete forward, so it can sit inside the
// stage's Sequential (LibTorch cannot nest plain Sequentials).
struct BlockImpl : nn::SequentialImpl {
  using nn::SequentialImpl::SequentialImpl;
  torch::Tensor forward(torch::Tensor x) { return nn::SequentialImpl::forward(x); }
};
TORCH_MODULE(Block);

Block build_block(const ModelSpec& spec, const model::BlockDesc& b, int num_blocks) {
  const bool last = b.index == num_blocks - 1;
  if (spec.architecture == "mlp") {
    if (b.index == 0) return Block(nn::Flatten(), nn::Linear(model::kImageSide * model::kImageSide, spec.hidden), nn::ReLU());
    if (last) return Block(nn::Linear(spec.hidden, model::kNumClasses));
    return Block(nn::Linear(spec.hidden, spec.hidden), nn::ReLU());
  }
  if (spec.architecture == "cnn") {
    if (b.index < 3) {
      return Block(nn::Conv2d(nn::Conv2dOptions(b.in_shape[0], b.out_shape[0], 3).padding(1)), nn::ReLU(), MaxPool2x2());
    }
    if (!last) {
      const int64_t flat = b.in_shape[0] * b.in_shape[1] * b.in_shape[2];
      return Block(nn::Flatten(), nn::Linear(flat, spec.hidden), nn::ReLU());
    }
    return Block(nn::Linear(spec.hidden, model::kNumClasses));
  }
  if (spec.architecture == "gpt") {
    if (b.index == 0) return Block(TokenEmbed(spec.vocab, spec.context, spec.hidden));
    if (last) return Block(LmHead(spec.hidden, spec.vocab));
    return Block(CausalBlock(spec.hidden, spec.heads));
  }
  // vit
  if (b.index == 0) return Block(PatchEmbed(spec.patch_size, spec.hidden));
  if (last) return Block(VitHead(spec.hidden));
  return Block(Encoder(spec.hidden, spec.heads));
}

}  // namespace

uint64_t block_seed(uint64_t job_seed, int block_index) {
  uint64_t z = job_seed + 0x9E3779B97F4A7C15ULL * (static_cast<uint64_t>(block_index) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFFULL;  // torch seeds are taken as signed
}

torch::nn::Sequential build_blocks(const ModelSpec& spec, int first, int end, uint64_t job_seed) {
  static std::mutex generator_mu;
  const model::ModelDesc desc = model::describe_model(spec);
  nn::Sequential stage;
  std::lock_guard<std::mutex> lock(generator_mu);
  for (int i = first; i < end; ++i) {
    torch::manual_seed(block_seed(job_seed, i));
    stage->push_back("block" + std::to_string(i), build_block(spec, desc.blocks.at(i), static_cast<int>(desc.blocks.size())));
  }
  return stage;
}

torch::Tensor max_pool_2x2(const torch::Tensor& x) {
  // What max_pool2d takes: [C, H, W] or [N, C, H, W] floating point, H and W ≥ 2.
  if ((x.dim() != 3 && x.dim() != 4) || !x.is_floating_point() || x.size(-2) < 2 || x.size(-1) < 2) {
    throw std::invalid_argument("max_pool_2x2: input of shape " + model::shape_str(x.sizes().vec()) + " and type " +
                                std::string(c10::toString(x.scalar_type())) +
                                ": expected [C, H, W] or [N, C, H, W] floating point with H, W >= 2");
  }
  // With autograd, LibTorch's kernel: it records each window's winner as it scans, and
  // its backward is cheap; recording the winner after a quarter maximum costs more than
  // its scan saves (pipeline_bench --pooling-only measured both).
  if (torch::GradMode::is_enabled() && x.requires_grad()) return torch::max_pool2d(x, 2);
  const auto q = quarters(x);
  return torch::maximum(torch::maximum(q[0], q[1]), torch::maximum(q[2], q[3]));
}

int64_t count_parameters(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

}  // namespace shardguard::shardd
