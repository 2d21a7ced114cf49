// `shardctl plan --risk STUDY.csv` (issue 19 item 3): the worst R one untrusted
// principal can reach under the job's placement rules, from a study's cells.
#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <vector>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/operator/reconcile.h"
#include "shardguard/shardctl/commands.h"
#include "shardguard/shardctl/study_report.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

using testing::internal::CaptureStdout;
using testing::internal::GetCapturedStdout;

// cnn in 4 stages (11.3 %, 44.2 %, 44.2 %, 0.4 %) at maxExposure 0.5.
constexpr const char* kJob = R"(apiVersion: shardguard.io/v1alpha1
kind: ShardedTrainingJob
metadata: {name: fmnist, namespace: ml}
spec:
  model: {architecture: cnn, hidden: 64}
  sharding: {shards: 4}
  protection: {maxExposure: 0.5}
)";

// Scratch 0.5, victim 0.9 at 600 samples, two seeds; R = (acc - 0.5) / 0.4.
std::vector<CellResult> cells() {
  std::vector<CellResult> out;
  auto add = [&](const std::string& row, const std::string& held, const std::string& attack, double acc0,
                 double acc1) {
    out.push_back({"cnn", row, held, 0, attack, 600, 1, acc0, 0, 1});
    out.push_back({"cnn", row, held, 0, attack, 600, 2, acc1, 0, 1});
  };
  add("-", "", "scratch", 0.5, 0.5);
  add("-", "", "victim", 0.9, 0.9);
  add("none", "", "A1-frozen", 0.5, 0.52);
  add("s0", "0", "A1-frozen", 0.78, 0.82);     // R 0.75: the input stage
  add("s2+3", "2+3", "A1-frozen", 0.6, 0.6);   // R 0.25, exposure 0.4455
  add("s2+3", "2+3", "A2", 0.62, 0.62);        // R 0.30
  add("s0+1", "0+1", "A1-frozen", 0.86, 0.86); // exposure 0.5545: beyond any node
  add("all", "0+1+2+3", "A1-frozen", 0.9, 0.9);
  return out;
}

JobSpec job() { return job_from_json(yaml_to_json(kJob)); }

TEST(PlanRisk, WorstReachableRowIsTheInputStageUntilItIsTrusted) {
  const JobSpec j = job();
  const RiskReport r = worst_reachable_risk(cells(), j, op::stage_parameters(j));
  EXPECT_EQ(r.stages, 4);
  ASSERT_EQ(r.worst.size(), 1u);
  EXPECT_EQ(r.worst[0].samples, 600);
  EXPECT_EQ(r.worst[0].row, "s0");
  EXPECT_NEAR(r.worst[0].r.mean, 0.75, 1e-9);
  EXPECT_EQ(r.out_of_reach, (std::vector<std::string>{"s0+1 (exposure 0.5545)", "all (exposure 1.0000)"}));

  // Stage 0 kept on the owner's nodes: the worst an untrusted principal reaches is s2+3.
  JobSpec trusted = j;
  trusted.protection.trusted_stages = {0};
  trusted.protection.trusted_node_selector = {{"owner", "me"}};
  const RiskReport rt = worst_reachable_risk(cells(), trusted, op::stage_parameters(trusted));
  ASSERT_EQ(rt.worst.size(), 1u);
  EXPECT_EQ(rt.worst[0].row, "s2+3");
  EXPECT_EQ(rt.worst[0].attack, "A2");
  EXPECT_NEAR(rt.worst[0].r.mean, 0.3, 1e-9);
  EXPECT_EQ(rt.out_of_reach,
            (std::vector<std::string>{"s0 (trusted)", "s0+1 (trusted)", "all (trusted)"}));
}

TEST(PlanRisk, AStudyOfAnotherModelOrStageCountIsRefused) {
  const JobSpec j = job();
  std::vector<CellResult> other = cells();
  for (auto& c : other) c.model = "vit";
  EXPECT_THROW(worst_reachable_risk(other, j, op::stage_parameters(j)), StudyError);
  std::vector<CellResult> three = cells();
  for (auto& c : three) {
    if (c.row == "all") c.held = "0+1+2";
  }
  try {
    worst_reachable_risk(three, j, op::stage_parameters(j));
    FAIL() << "a 3-stage study was used for a 4-shard job";
  } catch (const StudyError& e) {
    EXPECT_STREQ(e.what(), "--risk: the study's cnn rows are for 3 stages, the job has 4 shards");
  }
}

TEST(PlanRisk, PlanPrintsTheRiskAndRefusesAnUnreadableStudy) {
  const testsupport::TempDir tmp{"plan-risk"};
  const std::string dir = tmp.str();
  write_file_atomic(dir + "/job.yaml", kJob);
  std::string csv = csv_header() + "\n";
  for (const auto& c : cells()) csv += to_csv_line(c) + "\n";
  write_file_atomic(dir + "/results.csv", csv);
  CaptureStdout();
  const int rc = RunPlan(dir + "/job.yaml", dir + "/results.csv");
  const std::string out = GetCapturedStdout();
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("the worst R one untrusted principal can reach within maxExposure 0.5000\n"
                     "     600 samples  R 0.75 ± 0.07  row s0 (A1-frozen), exposure 0.1126\n"
                     "  out of reach: s0+1 (exposure 0.5545), all (exposure 1.0000)\n"),
            std::string::npos)
      << out;
  CaptureStdout();
  EXPECT_EQ(RunPlan(dir + "/job.yaml", dir + "/missing.csv"), 2);
  GetCapturedStdout();
  // A damaged study is refused with its first bad line, not read in part; an empty one
  // (or another file) is refused as holding no results.
  write_file_atomic(dir + "/damaged.csv", csv + "cnn,s0,0,0.1126,A1-frozen,600,1,0.9;0.1,0.5,1.0\n");
  write_file_atomic(dir + "/cut.csv", csv + to_csv_line(cells()[0]));
  write_file_atomic(dir + "/empty.csv", "");
  write_file_atomic(dir + "/header.csv", csv_header() + "\n");
  const std::string last = std::to_string(cells().size() + 2);
  for (const auto& [file, why] : std::vector<std::pair<std::string, std::string>>{
           {"damaged.csv", "damaged.csv: 1 line is not a study result (first: line " + last +
                               ": accuracy '0.9;0.1' is not a number); mend or delete"},
           {"cut.csv", "cut.csv: line " + last + " has no newline (a write cut short); mend or delete"},
           {"empty.csv", "empty.csv holds no study results"},
           {"header.csv", "header.csv holds no study results"}}) {
    testing::internal::CaptureStderr();
    CaptureStdout();
    EXPECT_EQ(RunPlan(dir + "/job.yaml", dir + "/" + file), 2);
    GetCapturedStdout();
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find(why), std::string::npos) << err;
  }
}

// results.md's placement table: per attacker, no stage or one stage trusted, four caps.
TEST(PlanRisk, PlacementTableShowsWhatTrustingAStageAndTheCapBuy) {
  const JobSpec j = job();
  const auto params = op::stage_parameters(j);
  const std::vector<double> shares(params.begin(), params.end());
  const std::string t = placement_table(aggregate(cells()), "cnn", shares);
  EXPECT_NE(t.find("| attacker | trusted stages | maxExposure 0.25 | maxExposure 0.50 | maxExposure 0.75 | "
                   "maxExposure 1.00 |\n"),
            std::string::npos)
      << t;
  // The input stage is within reach under any cap; s0+1 from 0.75, the victim at 1.
  // Stages 1 and 2 hold 44.2 % each: a 0.25 cap refuses the job whatever is trusted.
  // The input stage is within reach under any other cap; s0+1 from 0.75, the victim at 1.
  EXPECT_NE(t.find("| 600 samples | none | refused | 0.75 (s0) | 0.90 (s0+1) | 1.00 (all) |\n"), std::string::npos)
      << t;
  // Trusting stage 0 leaves s2+3 (A2, 0.30).
  EXPECT_NE(t.find("| 600 samples | 0 | refused | 0.30 (s2+3) | 0.30 (s2+3) | 0.30 (s2+3) |\n"), std::string::npos)
      << t;
  EXPECT_NE(t.find("| 600 samples | 1 | refused | 0.75 (s0) | 0.75 (s0) | 0.75 (s0) |\n"), std::string::npos) << t;
  // With the two large stages alike and a smaller cut (shares 0.1, 0.2, 0.2, 0.5): 0.25
  // refuses unless stage 3 is trusted, where only s0 (0.1) and the rows of 1 and 2 fit.
  const std::string small = placement_table(aggregate(cells()), "cnn", {0.1, 0.2, 0.2, 0.5});
  EXPECT_NE(small.find("| 600 samples | 3 | 0.75 (s0) |"), std::string::npos) << small;
  EXPECT_NE(small.find("| 600 samples | 0 | refused |"), std::string::npos) << small;
  EXPECT_NE(t.find("| 600 samples | 3 |"), std::string::npos) << t;
  // Both ends trusted: s2+3 and s0 out of reach, `none` the worst left.
  EXPECT_NE(t.find("| 600 samples | 0, 3 | refused | 0.03 (none) | 0.03 (none) | 0.03 (none) |\n"), std::string::npos)
      << t;
  EXPECT_EQ(t.find("| 600 samples | 4 |"), std::string::npos) << t;
  // Another stage count or model: no table (write_report then leaves it out).
  EXPECT_EQ(placement_table(aggregate(cells()), "cnn", {0.5, 0.5}), "");
  EXPECT_EQ(placement_table(aggregate(cells()), "vit", shares), "");
}

// A4's cells get lines of their own (labelled samples + query budget), after the
// attackers with data, under the same placement rules; a language model's say
// "training windows" and that R is on the loss.
TEST(PlanRisk, QueryAttackersAndLanguageModelsGetTheirOwnLines) {
  const testsupport::TempDir tmp{"plan-risk-a4"};
  const std::string dir = tmp.str();
  write_file_atomic(dir + "/job.yaml", kJob);
  std::vector<CellResult> all = cells();
  for (int seed : {1, 2}) {
    all.push_back({"cnn", "-", "", 0, "scratch", 0, seed, 0.1, 0, 1});
    all.push_back({"cnn", "-", "", 0, "victim", 0, seed, 0.9, 0, 1});
    CellResult a4{"cnn", "none", "", 0, "A4", 0, seed, 0.5, 0, 1};  // R 0.5
    a4.queries = 100000;
    all.push_back(a4);
    a4.row = "s0", a4.held = "0", a4.accuracy = 0.7;  // R 0.75
    all.push_back(a4);
    a4.row = "s0+1", a4.held = "0+1", a4.accuracy = 0.9;  // beyond maxExposure
    all.push_back(a4);
  }
  const JobSpec j = job();
  const RiskReport r = worst_reachable_risk(all, j, op::stage_parameters(j));
  ASSERT_EQ(r.worst.size(), 2u);
  EXPECT_EQ(r.worst[0].queries, 0);
  EXPECT_EQ(r.worst[1].queries, 100000);
  EXPECT_EQ(r.worst[1].samples, 0);
  EXPECT_EQ(r.worst[1].row, "s0");
  EXPECT_NEAR(r.worst[1].r.mean, 0.75, 1e-9);
  JobSpec trusted = j;
  trusted.protection.trusted_stages = {0};
  const RiskReport rt = worst_reachable_risk(all, trusted, op::stage_parameters(trusted));
  ASSERT_EQ(rt.worst.size(), 2u);
  EXPECT_EQ(rt.worst[1].row, "none");  // with stage 0 trusted, pure black-box extraction is the worst
  EXPECT_NEAR(rt.worst[1].r.mean, 0.5, 1e-9);

  std::string csv = csv_header() + "\n";
  for (const auto& c : all) csv += to_csv_line(c) + "\n";
  write_file_atomic(dir + "/results.csv", csv);
  CaptureStdout();
  EXPECT_EQ(RunPlan(dir + "/job.yaml", dir + "/results.csv"), 0);
  std::string out = GetCapturedStdout();
  EXPECT_NE(out.find("     600 samples  R 0.75 ± 0.07  row s0 (A1-frozen), exposure 0.1126\n"
                     "       0 samples + 100000 queries  R 0.75 ± 0.00  row s0 (A4), exposure 0.1126\n"),
            std::string::npos)
      << out;

  // The same numbers as a language model's: windows, and R on the loss (lower loss is better).
  std::vector<CellResult> lm;
  for (int seed : {1, 2}) {
    for (auto [row, held, loss] : {std::tuple{"-", "", 3.0}, {"s0", "0", 2.0}, {"all", "0+1+2+3", 1.0}}) {
      CellResult c{"cnn", row, held, 0, row == std::string("-") ? "scratch" : "A1-frozen", 181, seed, 0.3, 0, 1};
      c.loss = c.val_loss = loss;
      lm.push_back(c);
    }
    CellResult v{"cnn", "-", "", 0, "victim", 181, seed, 0.5, 0, 1};
    v.loss = v.val_loss = 1.0;
    lm.push_back(v);
  }
  csv = csv_header() + "\n";
  for (const auto& c : lm) csv += to_csv_line(c) + "\n";
  write_file_atomic(dir + "/lm.csv", csv);
  CaptureStdout();
  EXPECT_EQ(RunPlan(dir + "/job.yaml", dir + "/lm.csv"), 0);
  out = GetCapturedStdout();
  EXPECT_NE(out.find("     181 training windows  R on the loss 0.50 ± 0.00  row s0 (A1-frozen), exposure 0.1126\n"),
            std::string::npos)
      << out;
}

// Stage 0 of this MLP holds 85 % of it: above 0.5 unless it is trusted, as the operator
// decides (Render.TrustedStagesRunOnTheOwnersNodesAndAreOutOfTheLimit).
TEST(PlanRisk, ATrustedStageIsOutOfPlansLargestStageCheck) {
  const testsupport::TempDir tmp{"plan-trusted"};
  const std::string job = std::string("apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\n") +
                          "metadata: {name: m, namespace: ml}\nspec:\n  model: {architecture: mlp, hidden: 64}\n" +
                          "  sharding: {shards: 3}\n  protection:\n    maxExposure: 0.5\n";
  write_file_atomic(tmp.str() + "/plain.yaml", job);
  write_file_atomic(tmp.str() + "/trusted.yaml",
                    job + "    trustedStages: [0]\n    trustedNodeSelector: {owner: me}\n");
  CaptureStdout();
  EXPECT_EQ(RunPlan(tmp.str() + "/plain.yaml"), 1);
  EXPECT_NE(GetCapturedStdout().find("EXCEEDED"), std::string::npos);
  CaptureStdout();
  EXPECT_EQ(RunPlan(tmp.str() + "/trusted.yaml"), 0);
  const std::string out = GetCapturedStdout();
  EXPECT_EQ(out.find("EXCEEDED"), std::string::npos) << out;
  EXPECT_NE(out.find("largest untrusted shard holds"), std::string::npos) << out;
}

}  // namespace
}  // namespace shardguard::shardctl
