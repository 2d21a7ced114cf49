// The engine on the in-memory transport: a whole pipeline of engines in this
// process, no sockets. Same math as one process, resuming from checkpoints,
// a refused checkpoint, a stage restarting mid-run.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <set>
#include <thread>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/process.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/engine.h"
#include "shardguard/shardd/memory_transport.h"
#include "shardguard/shardd/threads.h"
#include "shardguard/shardd/trainer.h"
#include "support/temp_dir.h"
#include "shardd/pipeline_helpers.h"
#include "shardd/test_job.h"

namespace shardguard::shardd {
namespace {

// One stage: its metrics, its transport and its engine (declared in that
// order, so the engine goes first and closes the transport).
struct Node {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<StageMetrics> metrics;
  std::unique_ptr<MemoryTransport> transport;
  std::unique_ptr<Engine> engine;
  std::vector<int64_t> resumes;  // steps of every resume, in order
  StageResult result;
};

struct EngineRun {
  std::vector<StageResult> results;
  std::vector<std::vector<int64_t>> resumes;
  std::vector<std::shared_ptr<prometheus::Registry>> registries;
  const StageResult& last() const { return results.back(); }
};

using shardguard::testing::expect_same_losses;
using shardguard::testing::metric;

// Every resume of a stage was at `step` (there may be more than one: a
// JoinNotice that reaches stage 0 before its first Sync returned adds a resync).
::testing::AssertionResult all_at(const std::vector<int64_t>& resumes, int64_t step) {
  if (resumes.empty()) return ::testing::AssertionFailure() << "never resumed";
  for (auto r : resumes) {
    if (r != step) return ::testing::AssertionFailure() << "resumed at " << r << ", not " << step;
  }
  return ::testing::AssertionSuccess();
}

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { set_compute_threads(1); }

  // Stage i's node on `network`: checkpoints under dir_, the same key file on every run.
  std::unique_ptr<Node> make_node(MemoryNetwork& network, const JobSpec& job, int stage, int64_t max_steps,
                                  StageEvents events = {}, int replica = 0, const std::string& replica_store = "") {
    std::filesystem::create_directories(dir_ + "/keys");
    const std::string key_file = dir_ + "/keys/shard-" + std::to_string(stage) + ".key";
    if (!std::filesystem::exists(key_file)) generate_key_file(key_file);
    StageOptions o;
    o.job = job;
    o.stage = stage;
    o.checkpoint_dir = dir_ + "/checkpoints";
    o.key = load_key_file(key_file);
    o.device = "cpu";
    o.peer_timeout_s = 60;
    o.max_steps = max_steps;
    o.replica = replica;
    o.replica_store = replica_store;
    auto node = std::make_unique<Node>();
    node->metrics = std::make_unique<StageMetrics>(*node->registry, job.name, stage);
    node->transport = std::make_unique<MemoryTransport>(network, stage, *node->metrics, /*retry_budget_s=*/30);
    auto* resumes = &node->resumes;
    auto on_resume = events.on_resume;
    events.on_resume = [resumes, on_resume](int64_t step) {
      resumes->push_back(step);
      if (on_resume) on_resume(step);
    };
    node->engine = std::make_unique<Engine>(o, *node->metrics, *node->transport, events);
    node->engine->start();
    return node;
  }

  // Runs every stage of `job`; `events(i)` gives stage i's events. `nodes`
  // is filled before any stage runs, so events may reach the other engines.
  EngineRun run(const JobSpec& job, int64_t max_steps = 0,
          const std::function<StageEvents(int)>& events = {}) {
    const int n = job.sharding.shards;
    MemoryNetwork network(n);
    std::vector<std::unique_ptr<Node>> nodes;
    for (int i = 0; i < n; ++i) nodes.push_back(make_node(network, job, i, max_steps, events ? events(i) : StageEvents{}));
    nodes_ = &nodes;
    std::vector<std::thread> threads;
    for (auto& node : nodes) threads.emplace_back([&node] { node->result = node->engine->run(); });
    for (auto& t : threads) t.join();
    nodes_ = nullptr;
    EngineRun out;
    for (auto& node : nodes) {
      out.results.push_back(node->result);
      out.resumes.push_back(node->resumes);
      out.registries.push_back(node->registry);
    }
    return out;
  }

  // Every replica of every stage of `job` (spec.sharding.replicas), each replica a
  // pipeline of its own on its own in-memory network, the replicas of a stage in one
  // Gloo group on 127.0.0.1; all replicas of a stage share its checkpoint directory.
  // results[r][i]: replica r's stage i. `events(r, i)` as in run().
  // A port for a group's store: pick_listen_port, below the kernel's ephemeral range,
  // where the Gloo listeners and connections of the groups already running take ports
  // (with pick_free_port one of them took a store's port once before its TCPStore bound
  // it: "Address already in use"). Not handed out twice by this test.
  int store_port() {
    for (int tries = 0; tries < 100; ++tries) {
      const int port = pick_listen_port();
      if (store_ports_.insert(port).second) return port;
    }
    ADD_FAILURE() << "pick_listen_port gave only ports this test had";
    return pick_listen_port();
  }
  std::set<int> store_ports_;

  std::vector<EngineRun> run_replicated(const JobSpec& job, int64_t max_steps = 0,
                                        const std::function<StageEvents(int, int)>& events = {}) {
    const int n = job.sharding.shards, replicas = job.sharding.replicas;
    std::vector<std::string> stores;
    for (int i = 0; i < n; ++i) stores.push_back("127.0.0.1:" + std::to_string(store_port()));
    std::vector<std::unique_ptr<MemoryNetwork>> networks;
    std::vector<std::vector<std::unique_ptr<Node>>> nodes(replicas);
    for (int r = 0; r < replicas; ++r) {
      networks.push_back(std::make_unique<MemoryNetwork>(n));
      for (int i = 0; i < n; ++i) {
        nodes[r].push_back(make_node(*networks[r], job, i, max_steps, events ? events(r, i) : StageEvents{}, r,
                                     stores[i]));
      }
    }
    replica_nodes_ = &nodes;
    std::vector<std::thread> threads;
    for (auto& pipeline : nodes) {
      for (auto& node : pipeline) threads.emplace_back([&node] { node->result = node->engine->run(); });
    }
    for (auto& t : threads) t.join();
    replica_nodes_ = nullptr;
    std::vector<EngineRun> out(replicas);
    for (int r = 0; r < replicas; ++r) {
      for (auto& node : nodes[r]) {
        out[r].results.push_back(node->result);
        out[r].resumes.push_back(node->resumes);
        out[r].registries.push_back(node->registry);
      }
    }
    return out;
  }

  const shardguard::testsupport::TempDir tmp_{"shardguard-engine"};
  std::vector<std::vector<std::unique_ptr<Node>>>* replica_nodes_ = nullptr;  // during run_replicated()
  const std::string dir_ = tmp_.str();
  std::vector<std::unique_ptr<Node>>* nodes_ = nullptr;  // during run()
};

TEST_F(EngineTest, PipelineOfEnginesMatchesOneProcess) {
  for (auto [arch, shards, schedule] : {std::tuple{"mlp", 3, "1f1b"}, std::tuple{"cnn", 2, "gpipe"}}) {
    auto json = shardguard::testing::small_job_json(arch, 1, 512);
    json["spec"]["training"]["schedule"] = schedule;
    MonolithicOptions mo;
    mo.device = "cpu";
    const auto mono = train_monolithic(job_from_json(json), mo);
    ASSERT_EQ(mono.steps.size(), 16u);
    json["spec"]["sharding"]["shards"] = shards;
    std::filesystem::remove_all(dir_ + "/checkpoints");
    const auto r = run(job_from_json(json));
    const std::string what = std::string(arch) + " " + schedule + " n=" + std::to_string(shards);
    for (const auto& s : r.results) ASSERT_TRUE(s.ok) << what << ": " << s.error;
    expect_same_losses(r.last().losses, mono, what);
    ASSERT_TRUE(r.last().last_eval.has_value()) << what;
    EXPECT_EQ(r.last().last_eval->correct, mono.eval.correct) << what;
    EXPECT_EQ(r.last().last_eval->total, mono.eval.total) << what;
    // Every frame a stage sent, a neighbour received; each link carries 16 steps
    // x 4 micro-batches each way.
    double sent = 0, received = 0;
    for (const auto& reg : r.registries) {
      sent += metric(*reg, "shardguard_pipeline_frames_total", "direction", "sent");
      received += metric(*reg, "shardguard_pipeline_frames_total", "direction", "received");
    }
    EXPECT_EQ(sent, received) << what;
    EXPECT_GE(sent, (shards - 1) * 2 * 16 * 4) << what;
  }
}

// Done when (issue 20): replicas: 2 trains like replicas: 1 with twice the batch (and
// twice the micro-batches, so each micro-batch holds the same samples): the same
// per-step losses, since replica r takes the r-th half of every global batch and the
// replicas average their gradients before each optimizer step.
TEST_F(EngineTest, TwoReplicasTrainLikeOnePipelineWithTwiceTheBatch) {
  for (auto [arch, shards] : {std::tuple{"mlp", 2}, std::tuple{"cnn", 2}}) {
    const std::string what = std::string(arch) + " n=" + std::to_string(shards);
    auto json = shardguard::testing::small_job_json(arch, shards, 256);
    json["spec"]["training"]["batchSize"] = 64;
    json["spec"]["training"]["microBatches"] = 8;
    std::filesystem::remove_all(dir_ + "/checkpoints");
    const auto single = run(job_from_json(json));
    for (const auto& s : single.results) ASSERT_TRUE(s.ok) << what << ": " << s.error;
    ASSERT_EQ(single.last().losses.size(), 4u) << what;

    json["spec"]["training"]["batchSize"] = 32;
    json["spec"]["training"]["microBatches"] = 4;
    json["spec"]["sharding"]["replicas"] = 2;
    std::filesystem::remove_all(dir_ + "/checkpoints");
    const auto replicated = run_replicated(job_from_json(json));
    ASSERT_EQ(replicated.size(), 2u);
    for (int r = 0; r < 2; ++r) {
      for (const auto& s : replicated[r].results) ASSERT_TRUE(s.ok) << what << " replica " << r << ": " << s.error;
      const auto& losses = replicated[r].last().losses;
      ASSERT_EQ(losses.size(), single.last().losses.size()) << what;
      for (size_t s = 0; s < losses.size(); ++s) {
        const double want = single.last().losses[s];
        EXPECT_NEAR(losses[s], want, 1e-5 * std::max(1.0, std::abs(want))) << what << " replica " << r << " step " << s;
      }
      // Every replica's stages averaged every step's gradients through Gloo.
      for (const auto& s : replicated[r].results) {
        EXPECT_GT(s.allreduce_bytes, 0u) << what;
        EXPECT_EQ(s.allreduce_bytes % (4 * 4), 0u) << what;  // 4 steps of float32 gradients
      }
    }
    // Both replicas hold the same parameters at the end: replica 0's evaluation (the
    // only one) equals the single pipeline's.
    ASSERT_TRUE(replicated[0].last().last_eval.has_value()) << what;
    EXPECT_FALSE(replicated[1].last().last_eval.has_value()) << what;
    EXPECT_EQ(replicated[0].last().last_eval->correct, single.last().last_eval->correct) << what;
  }
}

// Replicas stopped mid-run resume from the stage's newest checkpoint, which only
// replica 0 wrote, every replica at the same step, and retrain the same losses.
TEST_F(EngineTest, StoppedReplicasResumeFromReplicaZerosCheckpointWithTheSameLosses) {
  auto json = shardguard::testing::small_job_json("mlp", 2, 512);
  json["spec"]["sharding"]["replicas"] = 2;  // 512 / (32 × 2): 8 steps, a checkpoint every 3
  const JobSpec job = job_from_json(json);
  std::filesystem::remove_all(dir_ + "/checkpoints");
  const auto full = run_replicated(job);
  for (const auto& rep : full) {
    for (const auto& s : rep.results) ASSERT_TRUE(s.ok) << s.error;
  }
  ASSERT_EQ(full[0].last().losses.size(), 8u);
  std::filesystem::remove_all(dir_ + "/checkpoints");

  std::atomic<bool> stopped{false};
  const auto stopped_run = run_replicated(job, 0, [&](int replica, int stage) {
    StageEvents e;
    if (replica == 1 && stage == 1) {
      e.on_step = [&](const StepReport& r) {
        if (r.step == 5 && !stopped.exchange(true)) {
          for (auto& pipeline : *replica_nodes_) {
            for (auto& node : pipeline) node->engine->stop("stopped by the test");
          }
        }
      };
    }
    return e;
  });
  for (const auto& rep : stopped_run) {
    for (const auto& s : rep.results) EXPECT_FALSE(s.ok);
  }
  const auto resumed = run_replicated(job);
  for (const auto& rep : resumed) {
    for (const auto& s : rep.results) ASSERT_TRUE(s.ok) << s.error;
    for (const auto& r : rep.resumes) EXPECT_TRUE(all_at(r, 3));
    ASSERT_EQ(rep.last().losses.size(), 8u);
    EXPECT_EQ(rep.last().trained_steps, 5);
    for (size_t s = 3; s < 8; ++s) EXPECT_NEAR(rep.last().losses[s], full[0].last().losses[s], 1e-6) << s;
  }
}

TEST_F(EngineTest, StoppedPipelineResumesFromTheCommonCheckpointWithTheSameLosses) {
  // 8 steps, a checkpoint every 3. Stopped abruptly once the last stage has
  // completed 5 steps (no final checkpoint): every stage holds step 3, none can
  // hold 6, so new engines resume at 3 and retrain 3..7 exactly as before.
  const JobSpec job = shardguard::testing::small_job("mlp", 3);
  const auto full = run(job);
  for (const auto& s : full.results) ASSERT_TRUE(s.ok) << s.error;
  ASSERT_EQ(full.last().losses.size(), 8u);
  std::filesystem::remove_all(dir_ + "/checkpoints");

  std::atomic<bool> stopped{false};
  const auto stopped_run = run(job, 0, [&](int stage) {
    StageEvents e;
    if (stage == 2) {
      e.on_step = [&](const StepReport& r) {
        if (r.step == 5 && !stopped.exchange(true)) {
          for (auto& node : *nodes_) node->engine->stop("stopped by the test");
        }
      };
    }
    return e;
  });
  for (const auto& s : stopped_run.results) {
    EXPECT_FALSE(s.ok);
    EXPECT_EQ(s.error, "stopped by the test");
  }
  EXPECT_EQ(stopped_run.last().steps, 5);
  ASSERT_EQ(stopped_run.last().losses.size(), 5u);
  for (size_t s = 0; s < 5; ++s) EXPECT_NEAR(stopped_run.last().losses[s], full.last().losses[s], 1e-6) << s;

  const auto resumed = run(job);
  for (const auto& s : resumed.results) ASSERT_TRUE(s.ok) << s.error;
  for (const auto& r : resumed.resumes) EXPECT_TRUE(all_at(r, 3));
  EXPECT_EQ(resumed.last().steps, 8);
  EXPECT_EQ(resumed.last().trained_steps, 5);
  ASSERT_EQ(resumed.last().losses.size(), 8u);
  for (size_t s = 3; s < 8; ++s) EXPECT_NEAR(resumed.last().losses[s], full.last().losses[s], 1e-6) << s;
  EXPECT_EQ(resumed.last().last_eval->correct, full.last().last_eval->correct);
}

TEST_F(EngineTest, TruncatedCheckpointOfAMiddleStageIsSetAsideAndTheOlderOneUsed) {
  const JobSpec job = shardguard::testing::small_job("mlp", 3);
  const auto full = run(job);
  for (const auto& s : full.results) ASSERT_TRUE(s.ok) << s.error;
  const auto stages = model::partition(model::describe_model(job.model), 3, "parameters");
  CheckpointStore middle(dir_ + "/checkpoints", CheckpointId{job.name, 1, stages[1].first_block, stages[1].end_block},
                         load_key_file(dir_ + "/keys/shard-1.key"));
  ASSERT_EQ(middle.steps(), (std::vector<int64_t>{6, 8}));
  const std::string bytes = read_file(middle.path_for(8));
  write_file_atomic(middle.path_for(8), bytes.substr(0, bytes.size() / 2));

  const auto again = run(job);
  for (const auto& s : again.results) ASSERT_TRUE(s.ok) << s.error;
  // Stage 0 restored 8, stage 1 refused it; the second Sync no longer finds 8 on
  // stage 1 and every stage resumes at 6. Stage 2 never got the Resume at 8.
  ASSERT_GE(again.resumes[0].size(), 2u);
  EXPECT_EQ(again.resumes[0].front(), 8);
  EXPECT_TRUE(all_at({again.resumes[0].begin() + 1, again.resumes[0].end()}, 6));
  EXPECT_TRUE(all_at(again.resumes[1], 6));
  EXPECT_TRUE(all_at(again.resumes[2], 6));
  EXPECT_EQ(metric(*again.registries[1], "shardguard_checkpoint_failures_total"), 1);
  EXPECT_EQ(metric(*again.registries[0], "shardguard_checkpoint_failures_total"), 0);
  EXPECT_EQ(metric(*again.registries[2], "shardguard_checkpoint_failures_total"), 0);
  EXPECT_EQ(again.last().trained_steps, 2);
  ASSERT_EQ(again.last().losses.size(), 8u);
  for (size_t s = 6; s < 8; ++s) EXPECT_NEAR(again.last().losses[s], full.last().losses[s], 1e-6) << s;
  EXPECT_TRUE(std::filesystem::exists(middle.path_for(8) + ".rejected"));  // kept for inspection
  EXPECT_EQ(middle.steps(), (std::vector<int64_t>{6, 8}));                 // and a fresh step 8 written
  EXPECT_EQ(again.last().last_eval->correct, full.last().last_eval->correct);
}

TEST_F(EngineTest, RestartedMiddleStageRejoinsAndThePipelineResynchronises) {
  // Stage 1 of 3 is stopped when the last stage completes step 5 and replaced by
  // a new engine (a new boot id): its JoinNotice makes stage 0 resynchronise at
  // step 3, and the run ends with the uninterrupted run's losses.
  const JobSpec job = shardguard::testing::small_job("mlp", 3);
  const auto full = run(job);
  for (const auto& s : full.results) ASSERT_TRUE(s.ok) << s.error;
  std::filesystem::remove_all(dir_ + "/checkpoints");

  MemoryNetwork network(3);
  std::vector<std::unique_ptr<Node>> nodes;
  std::atomic<bool> stopped{false};
  StageEvents last;
  last.on_step = [&](const StepReport& r) {
    if (r.step == 5 && !stopped.exchange(true)) nodes[1]->engine->stop("killed by the test");
  };
  for (int i = 0; i < 3; ++i) nodes.push_back(make_node(network, job, i, 0, i == 2 ? last : StageEvents{}));
  std::vector<std::thread> threads;
  for (auto& node : nodes) threads.emplace_back([&node] { node->result = node->engine->run(); });
  threads[1].join();
  EXPECT_FALSE(nodes[1]->result.ok);
  EXPECT_EQ(nodes[1]->result.error, "killed by the test");
  auto old = std::move(nodes[1]);
  old.reset();  // detaches the old engine before the new one attaches
  nodes[1] = make_node(network, job, 1, 0);
  threads[1] = std::thread([&] { nodes[1]->result = nodes[1]->engine->run(); });
  for (auto& t : threads) t.join();

  for (const auto& node : nodes) ASSERT_TRUE(node->result.ok) << node->result.error;
  EXPECT_TRUE(all_at(nodes[1]->resumes, 3));
  EXPECT_EQ(nodes[0]->resumes.back(), 3);
  EXPECT_GE(metric(*nodes[0]->registry, "shardguard_pipeline_resyncs_total"), 2);
  const auto& losses = nodes[2]->result.losses;
  ASSERT_EQ(losses.size(), 8u);
  for (size_t s = 0; s < 8; ++s) EXPECT_NEAR(losses[s], full.last().losses[s], 1e-6) << s;
  EXPECT_EQ(nodes[2]->result.last_eval->correct, full.last().last_eval->correct);
}

}  // namespace
}  // namespace shardguard::shardd
