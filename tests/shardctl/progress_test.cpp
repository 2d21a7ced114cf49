#include <gtest/gtest.h>

#include "shardguard/shardctl/progress.h"

namespace shardguard::shardctl {
namespace {

TEST(ProgressTest, TerminalLineHasBarAndFields) {
  Progress p;
  p.epoch = 0;
  p.epochs = 2;
  p.step = 50;
  p.total_steps = 200;
  p.loss = 0.41234;
  p.accuracy = 0.859;
  p.samples_per_second = 640.4;
  p.eta_seconds = 192;
  const std::string line = format_progress(p, true, 20);
  EXPECT_EQ(line, "epoch 1/2 [#####...............] step 50/200  25%  loss 0.4123  acc 0.859  640 samples/s  ETA 3m12s");
  const std::string plain = format_progress(p, false, 20);
  EXPECT_EQ(plain.find('['), std::string::npos);
  EXPECT_NE(plain.find("step 50/200"), std::string::npos);
}

TEST(ProgressTest, LanguageModelShowsBitsInsteadOfAccuracy) {
  Progress p;
  p.epochs = 1;
  p.step = 10;
  p.total_steps = 100;
  p.loss = 1.3862944;  // 2 bits
  p.accuracy = 0.5;
  p.bits_unit = "bits/byte";
  p.samples_per_second = 40;
  p.eta_seconds = 90;
  EXPECT_EQ(format_progress(p, false), "epoch 1/1 step 10/100  10%  loss 1.3863  2.000 bits/byte  40 samples/s  ETA 1m30s");
}

TEST(ProgressTest, Durations) {
  EXPECT_EQ(format_duration(45), "45s");
  EXPECT_EQ(format_duration(192), "3m12s");
  EXPECT_EQ(format_duration(3720), "1h02m");
  EXPECT_EQ(format_duration(-1), "?");
}

TEST(ProgressTest, RateMeterAveragesAndEstimates) {
  RateMeter m(64);
  EXPECT_EQ(m.eta_seconds(0, 100), -1);
  m.observe(0, 0.0);
  m.observe(10, 1.0);  // 640 samples/s
  EXPECT_DOUBLE_EQ(m.samples_per_second(), 640);
  EXPECT_DOUBLE_EQ(m.eta_seconds(10, 110), 10.0);  // 100 steps × 64 / 640
  m.observe(20, 3.0);  // 320 samples/s, averaged in
  EXPECT_NEAR(m.samples_per_second(), 0.9 * 640 + 0.1 * 320, 1e-9);
  m.observe(20, 4.0);  // no new step: unchanged
  EXPECT_NEAR(m.samples_per_second(), 608, 1e-9);
}

}  // namespace
}  // namespace shardguard::shardctl
