#include "shardguard/model/model_desc.h"

#include <sstream>

namespace shardguard::model {
namespace {

int64_t linear_params(int64_t in, int64_t out) { return in * out + out; }
int64_t linear_flops(int64_t tokens, int64_t in, int64_t out) { return 2 * tokens * in * out; }
int64_t conv3x3_params(int64_t in, int64_t out) { return in * out * 9 + out; }
int64_t conv3x3_flops(int64_t side, int64_t in, int64_t out) { return 2 * side * side * in * out * 9; }

void add(ModelDesc& m, std::string name, std::vector<int64_t> in, std::vector<int64_t> out,
         int64_t params, int64_t flops) {
  BlockDesc b;
  b.index = static_cast<int>(m.blocks.size());
  b.name = std::move(name);
  b.in_shape = std::move(in);
  b.out_shape = std::move(out);
  b.parameters = params;
  b.flops = flops;
  m.blocks.push_back(std::move(b));
}

// mlp: [flatten+linear(784,h)+relu] [linear(h,h)+relu] × (depth-1) [linear(h,10)]
void describe_mlp(const ModelSpec& s, ModelDesc& m) {
  const int64_t pixels = kImageSide * kImageSide, h = s.hidden;
  add(m, "input", {1, kImageSide, kImageSide}, {h}, linear_params(pixels, h), linear_flops(1, pixels, h));
  for (int i = 1; i < s.depth; ++i) {
    add(m, "hidden" + std::to_string(i), {h}, {h}, linear_params(h, h), linear_flops(1, h, h));
  }
  add(m, "head", {h}, {kNumClasses}, linear_params(h, kNumClasses), linear_flops(1, h, kNumClasses));
}

// cnn: three conv blocks (3x3 conv + relu + 2x2 max-pool; channels c, 2c, 4c;
// sides 28→14→7→3), a hidden fully connected layer, and the classifier head.
void describe_cnn(const ModelSpec& s, ModelDesc& m) {
  int64_t in_ch = 1, side = kImageSide;
  for (int i = 0; i < 3; ++i) {
    const int64_t out_ch = static_cast<int64_t>(s.channels) << i;
    add(m, "conv" + std::to_string(i + 1), {in_ch, side, side}, {out_ch, side / 2, side / 2},
        conv3x3_params(in_ch, out_ch), conv3x3_flops(side, in_ch, out_ch));
    in_ch = out_ch;
    side /= 2;
  }
  const int64_t flat = in_ch * side * side, h = s.hidden;
  add(m, "fc", {in_ch, side, side}, {h}, linear_params(flat, h), linear_flops(1, flat, h));
  add(m, "head", {h}, {kNumClasses}, linear_params(h, kNumClasses), linear_flops(1, h, kNumClasses));
}

// vit: patch embedding (+ learned positions), `depth` pre-norm transformer
// blocks (multi-head self-attention and a 2×-wide MLP), and a head (layer norm,
// mean over tokens, linear).
void describe_vit(const ModelSpec& s, ModelDesc& m) {
  const int64_t p = s.patch_size, d = s.hidden;
  const int64_t t = (kImageSide / p) * (kImageSide / p);
  const int64_t patch_px = p * p;
  add(m, "embed", {1, kImageSide, kImageSide}, {t, d}, linear_params(patch_px, d) + t * d,
      linear_flops(t, patch_px, d));
  const int64_t ln = 2 * d;
  const int64_t block_params = 2 * ln + linear_params(d, 3 * d) + linear_params(d, d) +
                               linear_params(d, 2 * d) + linear_params(2 * d, d);
  const int64_t block_flops = linear_flops(t, d, 3 * d) + 2 * (2 * t * t * d) + linear_flops(t, d, d) +
                              linear_flops(t, d, 2 * d) + linear_flops(t, 2 * d, d);
  for (int i = 0; i < s.depth; ++i) {
    add(m, "encoder" + std::to_string(i + 1), {t, d}, {t, d}, block_params, block_flops);
  }
  add(m, "head", {t, d}, {kNumClasses}, ln + linear_params(d, kNumClasses),
      linear_flops(1, d, kNumClasses));
}

// gpt: token embedding + learned positions, `depth` pre-norm causal transformer
// blocks (multi-head self-attention and a 4×-wide MLP), and a head (layer norm,
// linear to the vocabulary). Stage 0 takes int64 token ids [context]; every
// boundary after it carries [context, hidden] activations.
void describe_gpt(const ModelSpec& s, ModelDesc& m) {
  const int64_t t = s.context, d = s.hidden, v = s.vocab;
  add(m, "embed", {t}, {t, d}, v * d + t * d, t * d);  // a lookup and the position add
  const int64_t ln = 2 * d;
  const int64_t block_params = 2 * ln + linear_params(d, 3 * d) + linear_params(d, d) +
                               linear_params(d, 4 * d) + linear_params(4 * d, d);
  // Scores and the weighted sum are computed for the whole [t, t] matrix (the
  // causal mask hides the upper half after it is computed).
  const int64_t block_flops = linear_flops(t, d, 3 * d) + 2 * (2 * t * t * d) + linear_flops(t, d, d) +
                              linear_flops(t, d, 4 * d) + linear_flops(t, 4 * d, d);
  for (int i = 0; i < s.depth; ++i) {
    add(m, "layer" + std::to_string(i + 1), {t, d}, {t, d}, block_params, block_flops);
  }
  add(m, "head", {t, d}, {t, v}, ln + linear_params(d, v), linear_flops(t, d, v));
}

}  // namespace

int64_t ModelDesc::parameters() const {
  int64_t total = 0;
  for (const auto& b : blocks) total += b.parameters;
  return total;
}

int64_t ModelDesc::flops() const {
  int64_t total = 0;
  for (const auto& b : blocks) total += b.flops;
  return total;
}

ModelDesc describe_model(const ModelSpec& spec) {
  ModelDesc m;
  m.architecture = spec.architecture;
  if (spec.architecture == "mlp") {
    describe_mlp(spec, m);
  } else if (spec.architecture == "cnn") {
    describe_cnn(spec, m);
  } else if (spec.architecture == "vit") {
    describe_vit(spec, m);
  } else if (spec.architecture == "gpt") {
    describe_gpt(spec, m);
  } else {
    throw JobSpecError({{"spec.model.architecture", "unknown architecture \"" + spec.architecture +
                                                        "\" (expected one of: mlp, cnn, vit, gpt)"}});
  }
  return m;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

}  // namespace shardguard::model
