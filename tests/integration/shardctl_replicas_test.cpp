// `shardctl run` of a job with data-parallel replicas (issue 20): replica r of every
// stage as its own shardd behind its own sidecar, talking only to replica r of its
// neighbours; the replicas of a stage average their gradients (Gloo, through the sidecars' tunnels). A job
// with replicas: 2 trains like the same job with replicas: 1 and twice the batch.
#include <gtest/gtest.h>

#include <signal.h>

#include <cmath>
#include <fstream>
#include <regex>
#include <set>
#include <thread>

#include "integration/pipeline_fixture.h"

namespace shardguard {
namespace {

using ShardctlReplicasTest = PipelineFixture;

// step → loss of the `step` lines of a shardd log.
std::map<int64_t, double> step_losses(const std::string& file) {
  std::map<int64_t, double> out;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.value("msg", "") == "step") out[j.at("step").get<int64_t>()] = j.at("loss").get<double>();
  }
  return out;
}

// The steps a shardd log says its pipeline resumed from (after a restart).
std::set<int64_t> resumed_steps(const std::string& file) {
  std::set<int64_t> out;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.value("msg", "") == "pipeline resumed") out.insert(j.at("step").get<int64_t>());
  }
  return out;
}

// The pid of the one process whose command line holds every one of `needles`, or 0.
pid_t pid_of(const std::vector<std::string>& needles) {
  pid_t found = 0;
  for (const auto& [pid, cmd] : command_lines()) {
    bool all = true;
    for (const auto& n : needles) all = all && cmd.find(n) != std::string::npos;
    if (all) {
      if (found != 0) return 0;  // not unique
      found = pid;
    }
  }
  return found;
}

int count_lines(const std::string& file, const std::string& msg) {
  int n = 0;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.value("msg", "") == msg) ++n;
  }
  return n;
}

// Every replica's Gloo traffic went through the sidecars' tunnels (the report of
// `shardctl run`, from the sidecars' shardguard_tunnel_bytes_total): for every
// replica, what its sidecar took in from Gloo for each peer equals what that peer's
// sidecar handed to the peer's Gloo, both ways, and it carries the gradients its
// shardd all-reduced plus Gloo's own bytes: its message headers for the step check,
// the gradients and the loss sums, 1 336 bytes a step measured with 2 replicas (the
// bound allows 2 KiB).
void expect_gloo_through_the_sidecars(const std::string& out, int stages, int replicas, int steps) {
  static const std::regex line(
      R"(shard (\d+)(?: replica (\d+))? tunnels: Gloo sent (\d+) received (\d+), all-reduced (\d+)  \(([^)]*)\))");
  int seen = 0;
  for (std::sregex_iterator it(out.begin(), out.end(), line), end; it != end; ++it) {
    const auto& m = *it;
    ++seen;
    const double sent = std::stod(m[3]), received = std::stod(m[4]), payload = std::stod(m[5]);
    EXPECT_EQ(m[6], "equal at both ends of every tunnel") << m[0];
    EXPECT_GT(payload, 0) << m[0];
    EXPECT_GE(sent, payload) << m[0];
    EXPECT_LE(sent, payload + 2048.0 * steps) << m[0];
    EXPECT_EQ(sent, received) << m[0];  // a ring of two: each sends what it receives
  }
  EXPECT_EQ(seen, stages * replicas) << out;
  EXPECT_EQ(out.find("(DIFFER)"), std::string::npos) << out;
}

TEST_F(ShardctlReplicasTest, TwoReplicasLossesEqualOnePipelineWithTwiceTheBatch) {
  for (const char* arch : {"mlp", "cnn"}) {
    SCOPED_TRACE(arch);
    auto spec = job_json(2);
    spec["metadata"]["name"] = std::string("rep-") + arch;
    spec["spec"]["model"] = {{"architecture", arch}, {"hidden", 32}, {"depth", 2}, {"channels", 4}};
    spec["spec"]["dataset"]["maxTrainSamples"] = 256;
    spec["spec"]["dataset"]["maxTestSamples"] = 100;
    spec["spec"]["checkpoint"]["everySteps"] = 2;

    // One pipeline, batch 64 in 8 micro-batches of 8: 4 steps.
    spec["spec"]["training"]["batchSize"] = 64;
    spec["spec"]["training"]["microBatches"] = 8;
    const std::string single_work = dir_ + "/single-" + arch;
    {
      SpawnOptions o;
      o.argv = {kBin + "/shardctl", "run", write_job(spec, std::string("single-") + arch + ".yaml"), "--workdir",
                single_work, "--device", "cpu", "--threads", "1"};
      o.log_file = dir_ + "/single-" + arch + ".out";
      Process run(o);
      const auto st = run.wait_for(std::chrono::seconds(300));
      ASSERT_TRUE(st.has_value()) << "shardctl run did not finish in 300 s";
      ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << read_file(o.log_file);
    }
    // Two replicas of batch 32 in 4 micro-batches of 8: the same samples per step.
    spec["spec"]["training"]["batchSize"] = 32;
    spec["spec"]["training"]["microBatches"] = 4;
    spec["spec"]["sharding"]["replicas"] = 2;
    const std::string work = dir_ + "/replicated-" + arch;
    std::string out;
    {
      SpawnOptions o;
      o.argv = {kBin + "/shardctl", "run", write_job(spec, std::string("replicated-") + arch + ".yaml"), "--workdir",
                work, "--device", "cpu", "--threads", "1"};
      o.log_file = dir_ + "/replicated-" + arch + ".out";
      Process run(o);
      const auto st = run.wait_for(std::chrono::seconds(300));
      ASSERT_TRUE(st.has_value()) << "shardctl run did not finish in 300 s";
      out = read_file(o.log_file);
      ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << out;
    }
    EXPECT_NE(out.find("2 shards × 2 replicas"), std::string::npos) << out;
    expect_gloo_through_the_sidecars(out, 2, 2, 4);

    const auto want = step_losses(single_work + "/logs/shard-1.log");
    ASSERT_EQ(want.size(), 4u);
    for (const char* log : {"/logs/shard-1.log", "/logs/shard-1-r1.log"}) {
      const auto got = step_losses(work + log);
      ASSERT_EQ(got.size(), want.size()) << log;
      for (const auto& [step, loss] : want) {
        ASSERT_TRUE(got.count(step)) << log << " step " << step;
        EXPECT_NEAR(got.at(step), loss, 1e-5 * std::max(1.0, std::abs(loss))) << log << " step " << step;
      }
    }
    // Every replica of every stage joined its stage's group; replica 1 has its own
    // sidecar, whose log exists, and only replica 0's pipeline evaluated.
    for (const char* log : {"/logs/shard-0.log", "/logs/shard-1.log", "/logs/shard-0-r1.log", "/logs/shard-1-r1.log"}) {
      EXPECT_EQ(count_lines(work + log, "replica group joined"), 1) << log;
    }
    EXPECT_TRUE(fs::exists(work + "/logs/sidecar-1-r1.log"));
    EXPECT_GE(count_lines(work + "/logs/shard-1.log", "evaluation"), 1);
    EXPECT_EQ(count_lines(work + "/logs/shard-1-r1.log", "evaluation"), 0);
  }
}

// Done when (issue 20): one replica's shardd SIGKILLed mid-training; every replica of
// its stage fails in the all-reduce and is restarted, the groups meet again, and every
// pipeline resumes from the stage's newest common checkpoint: each step's final loss
// equals the uninterrupted run's.
TEST_F(ShardctlReplicasTest, KilledReplicaIsRestartedAndEveryReplicaResumesWithNothingLost) {
  auto spec = job_json(2);
  spec["metadata"]["name"] = "rep-kill";
  spec["spec"]["model"] = {{"architecture", "mlp"}, {"hidden", 32}, {"depth", 2}};
  spec["spec"]["dataset"]["maxTrainSamples"] = 1536;  // / (32 × 2): 24 steps
  spec["spec"]["dataset"]["maxTestSamples"] = 100;
  spec["spec"]["checkpoint"]["everySteps"] = 4;
  spec["spec"]["sharding"]["replicas"] = 2;
  spec["spec"]["runPolicy"] = {{"backoffLimit", 6}};
  const std::string job = write_job(spec);
  auto run_job = [&](const std::string& work) {
    SpawnOptions o;
    o.argv = {kBin + "/shardctl", "run", job, "--workdir", work, "--device", "cpu", "--threads", "1",
              "--peer-timeout", "60"};
    o.log_file = work + ".out";
    return std::make_unique<Process>(o);
  };
  const std::string ref_work = dir_ + "/reference";
  {
    auto run = run_job(ref_work);
    const auto st = run->wait_for(std::chrono::seconds(300));
    ASSERT_TRUE(st.has_value());
    ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << read_file(ref_work + ".out");
  }
  const auto want = step_losses(ref_work + "/logs/shard-1.log");
  ASSERT_EQ(want.size(), 24u);

  const std::string work = dir_ + "/killed";
  auto run = run_job(work);
  const std::string victim_log = work + "/logs/shard-1-r1.log";
  pid_t victim = 0;
  for (int i = 0; i < 3000 && victim == 0; ++i) {
    const auto steps = step_losses(victim_log);
    if (!steps.empty() && steps.rbegin()->first >= 10) {
      victim = pid_of({work + "/", "/shardd", "--replica 1", "--stage 1 "});
    }
    if (victim == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // polling the log, not syncing
  }
  ASSERT_NE(victim, 0) << "replica 1 of stage 1 never reached step 10\n" << read_file(work + ".out");
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  const auto st = run->wait_for(std::chrono::seconds(400));
  ASSERT_TRUE(st.has_value()) << "shardctl run did not finish";
  const std::string out = read_file(work + ".out");
  ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << out;
  EXPECT_NE(out.find("shard 1 replica 1 stopped"), std::string::npos) << out;

  for (const char* log : {"/logs/shard-1.log", "/logs/shard-1-r1.log"}) {
    const auto got = step_losses(work + log);  // the last report of every step
    // A SIGKILL can land after a step's all-reduce but before the victim logs that
    // step; replica 0 then checkpoints it (when it is a checkpoint step) and everyone
    // resumes after it, so the victim's log — and only the victim's: replica 0 logs a
    // step before it checkpoints it — may lack exactly that step: a checkpoint step its
    // group resumed from. Every step a log does report equals the uninterrupted run's.
    const bool victim_log = std::string(log) == "/logs/shard-1-r1.log";
    const auto resumed = resumed_steps(work + log);
    int missing = 0;
    for (const auto& [step, loss] : want) {
      if (!got.count(step)) {
        ++missing;
        EXPECT_TRUE(victim_log && step % 4 == 0 && resumed.count(step))
            << log << " lacks step " << step << ", which is not a checkpoint step the killed replica resumed from";
        continue;
      }
      EXPECT_NEAR(got.at(step), loss, 1e-6 * std::max(1.0, std::abs(loss))) << log << " step " << step;
    }
    EXPECT_LE(missing, 1) << log;
    EXPECT_EQ(got.size() + static_cast<size_t>(missing), want.size()) << log;  // no step beyond the run's
  }
  // Both groups met again (a later incarnation, or a fresh store), and both pipelines
  // resumed from a checkpoint after the restart.
  for (const char* log : {"/logs/shard-1.log", "/logs/shard-1-r1.log"}) {
    EXPECT_GE(count_lines(work + log, "replica group joined"), 2) << log;
  }
}

}  // namespace
}  // namespace shardguard
