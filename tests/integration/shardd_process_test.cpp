// End-to-end with real processes: shardd stages on 127.0.0.1, one killed with
// SIGKILL mid-run and restarted; and `shardctl run` / `shardctl recombine`.
#include <gtest/gtest.h>

#include <signal.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <regex>

#include <nlohmann/json.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/process.h"
#include "integration/pipeline_fixture.h"

namespace shardguard {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using ShardProcessTest = PipelineFixture;

TEST_F(ShardProcessTest, KilledStageRestartsFromItsCheckpointAndNothingIsLost) {
  constexpr int n = 3;
  const std::string job = write_job(job_json(n));
  for (int i = 0; i < n; ++i) ports_.push_back(pick_free_port());

  // Reference: the same job, uninterrupted.
  for (int i = 0; i < n; ++i) start_stage(job, dir_ + "/ref", i, n);
  const Outcome ref = finish(n, Outcome{});
  ASSERT_EQ(ref.losses.size(), 48u);
  ASSERT_GE(ref.correct, 0);

  // The driver, a middle stage and the last stage in turn: SIGKILL it after
  // step 20, then start it again with the same arguments.
  for (int victim = 0; victim < n; ++victim) {
    SCOPED_TRACE("killed stage " + std::to_string(victim));
    const std::string run = dir_ + "/run" + std::to_string(victim);
    for (int i = 0; i < n; ++i) start_stage(job, run, i, n);
    Outcome out;
    std::vector<nlohmann::json> lines;
    ASSERT_TRUE(read_until(n - 1, [](const nlohmann::json& j) {
      return j.value("msg", "") == "step" && j.value("step", 0) >= 20;
    }, &lines));
    for (const auto& j : lines) absorb(j, out);
    const int64_t killed_at = out.losses.rbegin()->first;
    stages_[victim]->signal(SIGKILL);
    const auto st = stages_[victim]->wait_for(30s);
    ASSERT_TRUE(st.has_value());
    EXPECT_FALSE(st->exited);
    if (victim == n - 1) {  // what the killed last stage logged before it died
      lines.clear();
      read_until(n - 1, [](const nlohmann::json&) { return false; }, &lines);
      for (const auto& j : lines) absorb(j, out);
    }
    start_stage(job, run, victim, n);
    out = finish(n, out);

    // The pipeline went back to the newest checkpoint all stages hold (a
    // multiple of 8, at most one interval behind), and from there on computed
    // exactly what the uninterrupted run did.
    ASSERT_GE(out.resumes.size(), 2u) << "the last stage never resynchronised";
    const int64_t resumed = out.resumes.back();
    EXPECT_EQ(resumed % 8, 0);
    EXPECT_GE(resumed, 16);
    EXPECT_GE(resumed, killed_at - 8 - 1);
    EXPECT_LE(resumed, killed_at + 1);
    ASSERT_EQ(out.losses.rbegin()->first, 48);
    for (const auto& [step, loss] : ref.losses) {
      ASSERT_TRUE(out.losses.count(step)) << "step " << step << " never completed";
      EXPECT_NEAR(out.losses.at(step), loss, 1e-6) << "step " << step;
    }
    EXPECT_EQ(out.correct, ref.correct);
  }
}

TEST_F(ShardProcessTest, ShardctlRunTrainsAndRecombineAgrees) {
  const std::string job = write_job(job_json(2));
  SpawnOptions o;
  o.argv = {kBin + "/shardctl", "run", job, "--workdir", dir_ + "/work", "--device", "cpu", "--threads", "1"};
  o.log_file = dir_ + "/shardctl.out";
  Process run(o);
  const auto st = run.wait_for(300s);
  ASSERT_TRUE(st.has_value());
  const std::string out = read_file(dir_ + "/shardctl.out");
  ASSERT_TRUE(st->exited && st->code == 0) << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("test accuracy +([0-9.]+) \\((\\d+)/500\\)"))) << out;
  const std::string correct = m[2];
  EXPECT_GT(std::stod(m[1]), 0.5) << out;  // ten classes: chance is 0.1

  // Every shard's checkpoint and key together give back the same model.
  SpawnOptions r;
  r.argv = {kBin + "/shardctl", "recombine", job, "--checkpoints", dir_ + "/work/checkpoints", "--keys",
            dir_ + "/work/keys"};
  r.log_file = dir_ + "/recombine.out";
  Process rec(r);
  const auto rs = rec.wait_for(120s);
  ASSERT_TRUE(rs.has_value());
  const std::string rout = read_file(dir_ + "/recombine.out");
  ASSERT_TRUE(rs->exited && rs->code == 0) << rout;
  EXPECT_NE(rout.find("(" + correct + "/500)"), std::string::npos) << rout << "\nvs\n" << out;

  // A second run refuses to silently reuse or drop the checkpoints.
  SpawnOptions again = o;
  again.log_file = dir_ + "/again.out";
  Process second(again);
  const auto ss = second.wait_for(60s);
  ASSERT_TRUE(ss.has_value());
  EXPECT_EQ(ss->code, 2);
  EXPECT_NE(read_file(dir_ + "/again.out").find("--resume"), std::string::npos);
}

TEST_F(ShardProcessTest, MalformedJobIsRefusedNamingTheFieldAndValue) {
  auto j = job_json(2);
  j["spec"]["training"]["microBatches"] = 5;  // 32 is not divisible by 5
  j["spec"]["model"]["architecture"] = "resnet";
  const std::string job = write_job(j);
  SpawnOptions o;
  o.argv = {kBin + "/shardctl", "run", job, "--workdir", dir_ + "/work"};
  o.log_file = dir_ + "/out";
  Process run(o);
  const auto st = run.wait_for(60s);
  ASSERT_TRUE(st.has_value());
  EXPECT_EQ(st->code, 2);
  const std::string out = read_file(dir_ + "/out");
  EXPECT_NE(out.find("spec.model.architecture"), std::string::npos) << out;
  EXPECT_NE(out.find("resnet"), std::string::npos) << out;
  EXPECT_NE(out.find("spec.training.microBatches"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(dir_ + "/work")) << "a refused job must leave nothing behind";

  auto too_many = job_json(9);
  const std::string job2 = write_job(too_many, "too-many.yaml");
  SpawnOptions p;
  p.argv = {kBin + "/shardd", "--job", job2, "--stage", "0", "--checkpoint-dir", dir_ + "/c", "--key-file",
            dir_ + "/none.key", "--metrics", "off"};
  p.log_file = dir_ + "/out2";
  {
    Process shardd(p);
    const auto st2 = shardd.wait_for(60s);
    ASSERT_TRUE(st2.has_value());
    EXPECT_EQ(st2->code, 2);
    EXPECT_NE(read_file(dir_ + "/out2").find("none.key"), std::string::npos);
  }
  generate_key_file(dir_ + "/none.key");
  p.log_file = dir_ + "/out3";
  Process shardd(p);
  const auto st3 = shardd.wait_for(60s);
  ASSERT_TRUE(st3.has_value());
  EXPECT_EQ(st3->code, 2);
  const std::string out3 = read_file(dir_ + "/out3");
  EXPECT_NE(out3.find("spec.sharding.shards: 9 shards cannot be cut from the 4 blocks"), std::string::npos) << out3;
}

}  // namespace
}  // namespace shardguard
