#include <gtest/gtest.h>

#include <filesystem>

#include <torch/torch.h>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/model.h"
#include "shardguard/shardd/trainer.h"
#include "shardd/test_job.h"
#include "support/temp_dir.h"

namespace shardguard::shardd {
namespace {

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    job_ = shardguard::testing::small_job("mlp", 2);
    key_ = random_bytes(32);
    model_ = build_blocks(job_.model, 0, 2, 1);
    opt_ = make_optimizer(job_.training.optimizer, model_->parameters());
    // One real optimizer step so that Adam has state worth saving.
    model_->forward(torch::randn({4, 1, 28, 28})).sum().backward();
    opt_->step();
  }

  CheckpointStore store(int stage = 0, const std::string& key = "") {
    return CheckpointStore(dir_, CheckpointId{job_.name, stage, 0, 2}, key.empty() ? key_ : key);
  }

  const shardguard::testsupport::TempDir tmp_{"shardguard-test"};
  const std::string dir_ = tmp_.str();
  JobSpec job_;
  std::string key_;
  torch::nn::Sequential model_{nullptr};
  std::unique_ptr<torch::optim::Optimizer> opt_;
};

TEST_F(CheckpointTest, RoundTripRestoresParametersAndOptimizerState) {
  auto s = store();
  s.save(10, model_, *opt_);
  auto fresh = build_blocks(job_.model, 0, 2, 99);
  auto fresh_opt = make_optimizer(job_.training.optimizer, fresh->parameters());
  s.load(10, fresh, *fresh_opt, torch::kCPU);
  for (size_t i = 0; i < model_->parameters().size(); ++i) {
    EXPECT_TRUE(torch::equal(model_->parameters()[i], fresh->parameters()[i]));
  }
  // Same optimizer state ⇒ the same next step.
  auto x = torch::randn({4, 1, 28, 28});
  opt_->zero_grad();
  fresh_opt->zero_grad();
  model_->forward(x).sum().backward();
  opt_->step();
  fresh->forward(x).sum().backward();
  fresh_opt->step();
  for (size_t i = 0; i < model_->parameters().size(); ++i) {
    EXPECT_TRUE(torch::allclose(model_->parameters()[i], fresh->parameters()[i]));
  }
}

TEST_F(CheckpointTest, PlaintextNeverOnDiskAndOnlyTwoKept) {
  auto s = store();
  for (int step : {3, 6, 9}) s.save(step, model_, *opt_);
  EXPECT_EQ(s.steps(), (std::vector<int64_t>{6, 9}));
  const std::string bytes = read_file(s.path_for(9));
  // A float of the first weight must not appear in the file.
  const float w = model_->parameters()[0].flatten()[0].item<float>();
  EXPECT_EQ(bytes.find(std::string(reinterpret_cast<const char*>(&w), sizeof w)), std::string::npos);
  for (const auto& e : std::filesystem::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().extension(), ".sgckpt") << "left behind: " << e.path();
    EXPECT_EQ(std::filesystem::status(e.path()).permissions() & std::filesystem::perms::others_read,
              std::filesystem::perms::none);
  }
}

TEST_F(CheckpointTest, TamperedFileIsRefusedAndNothingLoaded) {
  auto s = store();
  s.save(5, model_, *opt_);
  std::string bytes = read_file(s.path_for(5));
  for (size_t pos : {bytes.size() / 2, bytes.size() - 1, size_t{20}}) {
    std::string bad = bytes;
    bad[pos] ^= 0x01;
    write_file_atomic(s.path_for(5), bad);
    auto target = build_blocks(job_.model, 0, 2, 42);
    auto before = target->parameters()[0].clone();
    auto target_opt = make_optimizer(job_.training.optimizer, target->parameters());
    try {
      s.load(5, target, *target_opt, torch::kCPU);
      FAIL() << "tampered byte " << pos << " was accepted";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find(s.path_for(5)), std::string::npos) << e.what();
    }
    EXPECT_TRUE(torch::equal(before, target->parameters()[0]));
  }
  write_file_atomic(s.path_for(5), bytes.substr(0, bytes.size() / 3));
  auto target = build_blocks(job_.model, 0, 2, 42);
  auto target_opt = make_optimizer(job_.training.optimizer, target->parameters());
  EXPECT_THROW(s.load(5, target, *target_opt, torch::kCPU), CheckpointError);
}

TEST_F(CheckpointTest, WrongKeyIsRefused) {
  store().save(5, model_, *opt_);
  auto other = store(0, random_bytes(32));
  auto target = build_blocks(job_.model, 0, 2, 42);
  auto target_opt = make_optimizer(job_.training.optimizer, target->parameters());
  try {
    other.load(5, target, *target_opt, torch::kCPU);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("authentication failed"), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTest, AnotherStagesFileIsRefused) {
  auto s0 = store(0);
  s0.save(5, model_, *opt_);
  // Stage 1 pointed at stage 0's file (renamed into its name) is refused even with the right key.
  auto s1 = store(1);
  std::filesystem::copy_file(s0.path_for(5), s1.path_for(5));
  auto target = build_blocks(job_.model, 0, 2, 42);
  auto target_opt = make_optimizer(job_.training.optimizer, target->parameters());
  try {
    s1.load(5, target, *target_opt, torch::kCPU);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("stage 0"), std::string::npos) << e.what();
  }
  EXPECT_THROW(s0.load(6, target, *target_opt, torch::kCPU), CheckpointError);  // missing file
}

}  // namespace
}  // namespace shardguard::shardd
