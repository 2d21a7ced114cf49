#include "shardguard/shardd/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace shardguard::shardd {
namespace {

// SplitMix64: a well-mixed 64-bit value from (seed, index), so that token `index`
// gets the same uniform number whatever came before it.
uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

torch::Tensor generation_window(const std::vector<int64_t>& tokens, int64_t context, int* position) {
  const int64_t real = std::min<int64_t>(context, static_cast<int64_t>(tokens.size()));
  auto window = torch::zeros({1, context}, torch::kInt64);
  auto* w = window.data_ptr<int64_t>();
  std::copy(tokens.end() - real, tokens.end(), w);
  *position = static_cast<int>(real - 1);
  return window;
}

int64_t sample_token(const torch::Tensor& logits, const GenerateOptions& options, int64_t index) {
  const auto l = logits.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  const double* v = l.data_ptr<double>();
  const int64_t vocab = l.numel();
  std::vector<int64_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  // Most likely first; equal logits by id, so the order never depends on the sort.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
  if (options.temperature <= 0 || options.top_k == 1) return order.front();
  const size_t k = options.top_k > 0 ? std::min<size_t>(static_cast<size_t>(options.top_k), order.size()) : order.size();
  std::vector<double> p(k);
  for (size_t i = 0; i < k; ++i) p[i] = std::exp((v[order[i]] - v[order[0]]) / options.temperature);
  const double total = std::accumulate(p.begin(), p.end(), 0.0);
  // 53 random bits as a double in [0, 1), the same on every platform.
  const double u = static_cast<double>(mix(options.seed ^ mix(static_cast<uint64_t>(index))) >> 11) * 0x1.0p-53;
  double acc = 0;
  for (size_t i = 0; i < k; ++i) {
    acc += p[i] / total;
    if (u < acc) return order[i];
  }
  return order[k - 1];
}

}  // namespace shardguard::shardd
