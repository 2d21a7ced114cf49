// model::runs_within: the consecutive runs of stages an export principal may read.
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "shardguard/model/exposure.h"

namespace shardguard::model {
namespace {

using Runs = std::vector<std::set<int>>;

TEST(RunsWithin, CutsWhereTheNextStageWouldPassTheLimit) {
  EXPECT_EQ(runs_within({1, 1, 1, 1}, 0.5), (Runs{{0, 1}, {2, 3}}));
  EXPECT_EQ(runs_within({1, 1, 1, 1}, 0.25), (Runs{{0}, {1}, {2}, {3}}));
  EXPECT_EQ(runs_within({1, 1, 1, 1}, 1.0), (Runs{{0, 1, 2, 3}}));
  // Exactly at the limit stays in (shares of integers against a decimal limit).
  EXPECT_EQ(runs_within({3, 3, 2, 2}, 0.6), (Runs{{0, 1}, {2, 3}}));
  EXPECT_EQ(runs_within({1, 2, 3, 4}, 0.5), (Runs{{0, 1}, {2}, {3}}));
  EXPECT_EQ(runs_within({45, 45, 5, 5}, 0.5), (Runs{{0}, {1, 2}, {3}}));
}

TEST(RunsWithin, EveryRunIsWithinTheLimitAndTheRunsCoverEveryStageOnce) {
  const std::vector<double> w = {2113, 84000, 84000, 82000, 5000, 130};
  for (double limit : {0.33, 0.35, 0.5, 0.7, 0.99, 1.0}) {  // the largest stage is 0.3265
    const Runs runs = runs_within(w, limit);
    int next = 0;
    for (const auto& r : runs) {
      EXPECT_LE(exposure_of(w, r), limit + 1e-12) << limit;
      for (int i : r) EXPECT_EQ(i, next++) << "runs are consecutive and in order";
    }
    EXPECT_EQ(next, static_cast<int>(w.size())) << limit;
  }
}

TEST(RunsWithin, AStageAboveTheLimitIsARunByItself) {
  EXPECT_EQ(runs_within({1, 8, 1}, 0.5), (Runs{{0}, {1}, {2}}));
  EXPECT_EQ(runs_within({}, 0.5), Runs{});
}

TEST(TrustedStages, AreLeftOutOfAnUntrustedPrincipalsExposure) {
  const std::vector<double> w = {50, 10, 20, 20};
  EXPECT_DOUBLE_EQ(exposure_of(w, {0}, {0}), 0.0);
  EXPECT_DOUBLE_EQ(exposure_of(w, {1, 3}, {}), 0.5);    // 1, 3 and the sandwiched 2
  EXPECT_DOUBLE_EQ(exposure_of(w, {1, 3}, {2}), 0.3);   // ... but 2 is trusted
  EXPECT_DOUBLE_EQ(exposure_of(w, {0, 1}, {0}), 0.1);
  EXPECT_DOUBLE_EQ(exposure_of(w, {0, 1}, {}), exposure_of(w, {0, 1}));
}

TEST(TrustedStages, AreInNoRunAndEndTheRunBefore) {
  EXPECT_EQ(runs_within({50, 10, 20, 20}, 0.5, {0}), (Runs{{1, 2, 3}}));
  EXPECT_EQ(runs_within({10, 10, 10, 10, 10}, 1.0, {2}), (Runs{{0, 1}, {3, 4}}));
  EXPECT_EQ(runs_within({10, 10}, 1.0, {0, 1}), Runs{});
}

}  // namespace
}  // namespace shardguard::model
