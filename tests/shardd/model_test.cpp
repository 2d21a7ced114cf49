#include <gtest/gtest.h>

#include <limits>

#include <torch/torch.h>

#include "shardguard/shardd/model.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/schedule.h"
#include "shardd/test_job.h"

namespace shardguard::shardd {
namespace {

// Every stage builds only its own blocks: its parameter count is exactly its
// partition share, and the stages add up to the monolithic model.
TEST(ModelTest, EachStageBuildsOnlyItsShare) {
  for (const char* arch : {"mlp", "cnn", "vit"}) {
    const JobSpec job = shardguard::testing::small_job(arch, 1);
    const auto desc = model::describe_model(job.model);
    const int blocks = static_cast<int>(desc.blocks.size());
    auto whole = build_blocks(job.model, 0, blocks, job.training.seed);
    EXPECT_EQ(count_parameters(*whole), desc.parameters()) << arch;
    for (int n : {1, 2, 4}) {
      int64_t sum = 0;
      for (const auto& s : model::partition(desc, n, "parameters")) {
        auto part = build_blocks(job.model, s.first_block, s.end_block, job.training.seed);
        EXPECT_EQ(count_parameters(*part), s.parameters) << arch << " n=" << n << " stage " << s.index;
        if (n > 1) {
          EXPECT_LT(count_parameters(*part), desc.parameters()) << "a stage of " << n << " holds the whole " << arch;
        } else {
          EXPECT_EQ(count_parameters(*part), desc.parameters());
        }
        sum += count_parameters(*part);
      }
      EXPECT_EQ(sum, count_parameters(*whole)) << arch << " n=" << n;
    }
  }
}

TEST(ModelTest, SameBlockSameWeightsWhateverTheCut) {
  const JobSpec job = shardguard::testing::small_job("cnn", 1);
  auto whole = build_blocks(job.model, 0, 5, job.training.seed);
  auto part = build_blocks(job.model, 2, 4, job.training.seed);
  auto whole_params = whole->named_parameters();
  for (const auto& p : part->named_parameters()) {
    ASSERT_TRUE(whole_params.contains(p.key())) << p.key();
    EXPECT_TRUE(torch::equal(whole_params[p.key()], p.value())) << p.key();
  }
  auto other_seed = build_blocks(job.model, 2, 4, job.training.seed + 1);
  EXPECT_FALSE(torch::equal(other_seed->parameters()[0], part->parameters()[0]));
}

TEST(ModelTest, ForwardShapesMatchTheDescription) {
  for (const char* arch : {"mlp", "cnn", "vit"}) {
    const JobSpec job = shardguard::testing::small_job(arch, 1);
    const auto desc = model::describe_model(job.model);
    auto x = torch::randn({3, 1, 28, 28});
    for (const auto& b : desc.blocks) {
      auto blk = build_blocks(job.model, b.index, b.index + 1, 1);
      x = blk->forward(x);
      std::vector<int64_t> want{3};
      want.insert(want.end(), b.out_shape.begin(), b.out_shape.end());
      EXPECT_EQ(x.sizes().vec(), want) << arch << " block " << b.name;
    }
  }
}

// gpt: LibTorch's parameter count equals the description's, block by block and in
// every cut; shapes chain from int64 tokens to logits; and attention is causal:
// a later token never changes an earlier position's output.
JobSpec gpt_job(int hidden, int depth, int heads, int context, int vocab) {
  auto j = shardguard::testing::small_gpt_job_json(1, "/nonexistent");
  j["spec"]["model"] = {{"architecture", "gpt"}, {"hidden", hidden}, {"depth", depth}, {"heads", heads},
                        {"context", context}, {"vocab", vocab}};
  return job_from_json(j);
}

TEST(ModelTest, GptParametersEqualTheDescription) {
  for (const JobSpec& job : {gpt_job(32, 2, 2, 16, 256), gpt_job(256, 4, 4, 128, 256), gpt_job(48, 3, 3, 7, 1000)}) {
    const auto desc = model::describe_model(job.model);
    const int blocks = static_cast<int>(desc.blocks.size());
    ASSERT_EQ(blocks, job.model.depth + 2);
    for (const auto& b : desc.blocks) {
      auto one = build_blocks(job.model, b.index, b.index + 1, job.training.seed);
      EXPECT_EQ(count_parameters(*one), b.parameters) << "hidden " << job.model.hidden << " block " << b.name;
    }
    auto whole = build_blocks(job.model, 0, blocks, job.training.seed);
    EXPECT_EQ(count_parameters(*whole), desc.parameters()) << job.model.hidden;
    for (int n : {2, 4}) {
      if (n > blocks) continue;
      int64_t sum = 0;
      for (const auto& s : model::partition(desc, n, "parameters")) {
        auto part = build_blocks(job.model, s.first_block, s.end_block, job.training.seed);
        EXPECT_EQ(count_parameters(*part), s.parameters);
        sum += count_parameters(*part);
      }
      EXPECT_EQ(sum, desc.parameters());
    }
  }
  // The default-size byte model of the example is a few million parameters.
  const auto big = model::describe_model(gpt_job(256, 4, 4, 128, 256).model);
  EXPECT_GT(big.parameters(), 3'000'000);
  EXPECT_LT(big.parameters(), 4'000'000);
}

TEST(ModelTest, GptShapesChainFromTokensToLogits) {
  const JobSpec job = gpt_job(32, 2, 2, 16, 256);
  const auto desc = model::describe_model(job.model);
  torch::Tensor x = torch::randint(0, 256, {3, 16}, torch::kInt64);
  for (const auto& b : desc.blocks) {
    auto blk = build_blocks(job.model, b.index, b.index + 1, 1);
    x = blk->forward(x);
    std::vector<int64_t> want{3};
    want.insert(want.end(), b.out_shape.begin(), b.out_shape.end());
    EXPECT_EQ(x.sizes().vec(), want) << b.name;
    EXPECT_EQ(x.scalar_type(), torch::kFloat32) << b.name;
  }
}

TEST(ModelTest, GptIsCausal) {
  const JobSpec job = gpt_job(32, 2, 2, 16, 256);
  auto whole = build_blocks(job.model, 0, 4, job.training.seed);
  whole->eval();
  torch::NoGradGuard no_grad;
  auto a = torch::randint(0, 256, {2, 16}, torch::kInt64);
  auto b = a.clone();
  b.index_put_({torch::indexing::Slice(), 10}, (a.index({torch::indexing::Slice(), 10}) + 1) % 256);
  const auto ya = whole->forward(a), yb = whole->forward(b);
  EXPECT_TRUE(torch::allclose(ya.slice(1, 0, 10), yb.slice(1, 0, 10), 1e-5, 1e-6)) << "an earlier position saw a later token";
  EXPECT_FALSE(torch::allclose(ya.slice(1, 10, 11), yb.slice(1, 10, 11))) << "position 10 ignores its own token";
}

// The cnn's pooling gives torch::max_pool2d(x, 2)'s values without autograd (the
// quarter maximum) and its values and gradient with it (the kernel), on odd sizes, on
// windows with ties (ReLU's zeros, small integers) and with NaNs, which both propagate.
// (torch::equal does not tell +0 from -0; ReLU gives +0 only.)
TEST(ModelTest, MaxPool2x2HasMaxPool2dsValues) {
  torch::manual_seed(7);
  const std::vector<std::vector<int64_t>> shapes = {{3, 5, 28, 28}, {2, 4, 7, 7}, {2, 3, 6, 9}, {4, 14, 14}};
  for (const auto& shape : shapes) {
    for (int kind = 0; kind < 4; ++kind) {
      torch::Tensor x = torch::randn(shape);
      if (kind == 1) x = torch::relu(x);                                 // many zeros: ties
      if (kind == 2) x = torch::randint(0, 3, shape).to(torch::kFloat);  // ties at every value
      if (kind == 3) x.masked_fill_(torch::rand(shape) < 0.05, std::numeric_limits<float>::quiet_NaN());
      const std::string what = model::shape_str(shape) + " kind " + std::to_string(kind);
      {
        torch::NoGradGuard no_grad;
        const auto got = max_pool_2x2(x), want = torch::max_pool2d(x, 2);
        ASSERT_EQ(got.sizes(), want.sizes()) << what;
        EXPECT_TRUE(torch::equal(got.isnan(), want.isnan())) << what;
        EXPECT_TRUE(torch::equal(got.nan_to_num(0), want.nan_to_num(0))) << what;
        if (kind == 3) {
          EXPECT_GT(want.isnan().sum().item<int64_t>(), 0) << what;
        }
      }
      if (kind == 3) continue;
      const auto a = x.clone().requires_grad_(true);
      const auto b = x.clone().requires_grad_(true);
      const auto ya = max_pool_2x2(a);
      const auto yb = torch::max_pool2d(b, 2);
      ASSERT_TRUE(ya.requires_grad()) << what;
      ASSERT_TRUE(torch::equal(ya, yb)) << what;
      const auto g = torch::randn(yb.sizes());
      ya.backward(g);
      yb.backward(g);
      EXPECT_TRUE(torch::equal(a.grad(), b.grad())) << what;
    }
  }
  // What max_pool2d refuses is refused, not pooled some other way.
  EXPECT_THROW(max_pool_2x2(torch::zeros({1, 1, 1, 4})), std::invalid_argument);
  EXPECT_THROW(max_pool_2x2(torch::zeros({8, 8})), std::invalid_argument);
  EXPECT_THROW(max_pool_2x2(torch::zeros({1, 1, 1, 8, 8})), std::invalid_argument);
  EXPECT_THROW(max_pool_2x2(torch::zeros({1, 1, 8, 8}, torch::kLong)), std::invalid_argument);
}

TEST(ScheduleTest, EveryMicroBatchOnceForwardBeforeBackward) {
  for (const char* kind : {"gpipe", "1f1b"}) {
    for (int n : {1, 2, 4}) {
      for (int s = 0; s < n; ++s) {
        for (int m : {1, 3, 8}) {
          const auto ops = make_schedule(kind, s, n, m);
          ASSERT_EQ(ops.size(), 2u * m);
          std::vector<int> f(m, -1), b(m, -1);
          int next_b = 0, in_flight = 0, peak = 0;
          for (size_t i = 0; i < ops.size(); ++i) {
            auto& slot = ops[i].kind == PipeOp::kForward ? f : b;
            EXPECT_EQ(slot[ops[i].micro_batch], -1);
            slot[ops[i].micro_batch] = static_cast<int>(i);
            if (ops[i].kind == PipeOp::kBackward) {
              EXPECT_EQ(ops[i].micro_batch, next_b++);  // gradients accumulate in order
              --in_flight;
            } else {
              peak = std::max(peak, ++in_flight);
            }
          }
          for (int k = 0; k < m; ++k) EXPECT_LT(f[k], b[k]);
          if (std::string(kind) == "1f1b") {
            EXPECT_LE(peak, std::min(n - s, m)) << "stage " << s << " of " << n;
          }
        }
      }
    }
  }
}

TEST(ScheduleTest, OneFOneBShape) {
  const auto ops = make_schedule("1f1b", 1, 4, 4);  // warm-up 2
  const std::vector<PipeOp> want{{PipeOp::kForward, 0},  {PipeOp::kForward, 1},  {PipeOp::kForward, 2},
                                 {PipeOp::kBackward, 0}, {PipeOp::kForward, 3},  {PipeOp::kBackward, 1},
                                 {PipeOp::kBackward, 2}, {PipeOp::kBackward, 3}};
  EXPECT_EQ(ops, want);
}

}  // namespace
}  // namespace shardguard::shardd
