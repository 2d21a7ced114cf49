#include <gtest/gtest.h>

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
