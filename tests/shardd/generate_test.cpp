// Generation's two pieces (shardd/generate.h): the right-padded window, which gives a
// causal model's logits of the unpadded sequence, and the sampling, which is greedy at
// temperature 0 or top-k 1, repeatable by seed, and follows softmax within the top k.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "shardguard/model/model_desc.h"
#include "shardguard/shardd/generate.h"
#include "shardguard/shardd/model.h"
#include "shardd/test_job.h"

namespace shardguard::shardd {
namespace {

TEST(GenerationWindow, RightPaddedWindowGivesTheLogitsOfTheUnpaddedSequence) {
  const JobSpec job = job_from_json(testing::small_gpt_job_json(1, "/nonexistent"));
  const int blocks = static_cast<int>(model::describe_model(job.model).blocks.size());
  auto model = build_blocks(job.model, 0, blocks, job.training.seed);
  model->eval();
  torch::NoGradGuard no_grad;
  const int64_t context = job.model.context;  // 16
  std::vector<int64_t> tokens;
  for (int i = 0; i < 21; ++i) tokens.push_back((i * 37 + 11) % 256);
  for (size_t len : {size_t{1}, size_t{5}, size_t{16}, size_t{21}}) {
    SCOPED_TRACE("sequence of " + std::to_string(len));
    const std::vector<int64_t> seq(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(len));
    int position = -1;
    const auto window = generation_window(seq, context, &position);
    ASSERT_EQ(window.sizes().vec(), (std::vector<int64_t>{1, context}));
    const int64_t real = std::min<int64_t>(context, static_cast<int64_t>(len));
    EXPECT_EQ(position, real - 1);
    // The last `real` tokens, then zeros.
    for (int64_t k = 0; k < context; ++k) {
      EXPECT_EQ(window[0][k].item<int64_t>(), k < real ? seq[static_cast<size_t>(static_cast<int64_t>(len) - real + k)] : 0);
    }
    const auto unpadded = torch::tensor(std::vector<int64_t>(seq.end() - real, seq.end()), torch::kInt64).unsqueeze(0);
    const auto want = model->forward(unpadded)[0][real - 1];
    const auto got = model->forward(window)[0][position];
    EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-5)) << (got - want).abs().max().item<float>();
  }
}

TEST(SampleToken, GreedyAtTemperatureZeroOrTopKOneTakesTheLowestIdOfTheLargestLogit) {
  const auto logits = torch::tensor({0.5f, 2.0f, -1.0f, 2.0f, 1.9f});
  GenerateOptions greedy;
  greedy.temperature = 0;
  GenerateOptions top1;
  top1.top_k = 1;
  for (int64_t i = 0; i < 20; ++i) {
    EXPECT_EQ(sample_token(logits, greedy, i), 1);
    EXPECT_EQ(sample_token(logits, top1, i), 1);
  }
}

TEST(SampleToken, TheSeedDecidesAndDrawsFollowSoftmaxWithinTheTopK) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
  const auto logits = torch::tensor({std::log(0.3f), std::log(0.5f), std::log(0.05f), std::log(0.15f)});
  GenerateOptions o;
  o.temperature = 1.0;
  o.seed = 42;
  std::map<int64_t, int> counts;
  std::vector<int64_t> first;
  constexpr int kDraws = 4000;
  for (int64_t i = 0; i < kDraws; ++i) {
    const int64_t t = sample_token(logits, o, i);
    ++counts[t];
    first.push_back(t);
  }
  EXPECT_NEAR(counts[1] / double(kDraws), 0.5, 0.03);
  EXPECT_NEAR(counts[0] / double(kDraws), 0.3, 0.03);
  EXPECT_NEAR(counts[3] / double(kDraws), 0.15, 0.03);
  EXPECT_NEAR(counts[2] / double(kDraws), 0.05, 0.02);
  // The same seed and index: the same token; another seed: another sequence.
  GenerateOptions other = o;
  other.seed = 43;
  std::vector<int64_t> again, changed;
  for (int64_t i = 0; i < 64; ++i) {
    again.push_back(sample_token(logits, o, i));
    changed.push_back(sample_token(logits, other, i));
  }
  EXPECT_EQ(again, std::vector<int64_t>(first.begin(), first.begin() + 64));
  EXPECT_NE(changed, again);
  // Top-2: only ids 1 and 0, in the ratio 5:3.
  o.top_k = 2;
  counts.clear();
  for (int64_t i = 0; i < kDraws; ++i) ++counts[sample_token(logits, o, i)];
  EXPECT_EQ(counts[0] + counts[1], kDraws);
  EXPECT_NEAR(counts[1] / double(kDraws), 0.625, 0.03);
  // A low temperature sharpens towards the argmax.
  o.top_k = 0;
  o.temperature = 0.1;
  counts.clear();
  for (int64_t i = 0; i < 1000; ++i) ++counts[sample_token(logits, o, i)];
  EXPECT_GT(counts[1], 980);
}

}  // namespace
}  // namespace shardguard::shardd
