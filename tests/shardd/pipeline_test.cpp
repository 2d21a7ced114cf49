// The pipeline over real gRPC on loopback, every stage in its own thread of
// this process: same math as one process, recombination, and bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <torch/torch.h>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/data.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/tensor_codec.h"
#include "shardguard/shardd/recombine.h"
#include "shardguard/shardd/stage.h"
#include "shardguard/shardd/threads.h"
#include "shardguard/shardd/trainer.h"
#include "shardguard/v1/pipeline.grpc.pb.h"
#include "shardd/pipeline_helpers.h"
#include "shardd/test_job.h"
#include "support/temp_dir.h"

namespace shardguard::shardd {
namespace {

struct PipelineRun {
  std::vector<StageResult> results;
  std::vector<int64_t> parameters;
  std::vector<std::shared_ptr<prometheus::Registry>> registries;
  const StageResult& last() const { return results.back(); }
};

class PipelineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { set_compute_threads(1); }

  // Options of one stage of `job` on CPU, with its checkpoints under dir_.
  StageOptions options(const JobSpec& job, int stage, std::string key = "") {
    StageOptions o;
    o.job = job;
    o.stage = stage;
    o.checkpoint_dir = dir_ + "/checkpoints";
    o.key = key.empty() ? random_bytes(32) : std::move(key);
    o.device = "cpu";
    o.peer_timeout_s = 60;
    o.retry_budget_s = 30;
    return o;
  }

  // Runs every stage of `job` in this process; returns when all have stopped.
  PipelineRun run(const JobSpec& job, int64_t max_steps = 0) {
    const int n = job.sharding.shards;
    std::filesystem::create_directories(dir_ + "/keys");
    std::vector<std::unique_ptr<StageRunner>> runners;
    std::vector<std::shared_ptr<prometheus::Registry>> registries;
    for (int i = 0; i < n; ++i) {
      const std::string key_file = dir_ + "/keys/shard-" + std::to_string(i) + ".key";
      if (!std::filesystem::exists(key_file)) generate_key_file(key_file);
      StageOptions o = options(job, i, load_key_file(key_file));
      o.max_steps = max_steps;
      registries.push_back(std::make_shared<prometheus::Registry>());
      runners.push_back(std::make_unique<StageRunner>(o, registries.back()));
      runners.back()->start();
    }
    for (int i = 0; i < n; ++i) {
      runners[i]->set_neighbours(i > 0 ? "127.0.0.1:" + std::to_string(runners[i - 1]->port()) : "",
                                 i + 1 < n ? "127.0.0.1:" + std::to_string(runners[i + 1]->port()) : "");
    }
    PipelineRun out;
    out.results.resize(n);
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { out.results[i] = runners[i]->run(); });
    for (auto& t : threads) t.join();
    for (auto& r : runners) out.parameters.push_back(r->parameters());
    out.registries = registries;
    return out;
  }

  const shardguard::testsupport::TempDir tmp_{"shardguard-test"};
  const std::string dir_ = tmp_.str();
};

using shardguard::testing::expect_same_losses;
using shardguard::testing::metric;

TEST_F(PipelineTest, SameLossesAsOneProcessForOneTwoFourStages) {
  for (const char* arch : {"mlp", "cnn"}) {
    for (const char* schedule : {"1f1b", "gpipe"}) {
      auto json = shardguard::testing::small_job_json(arch, 1, 512);
      json["spec"]["training"]["schedule"] = schedule;
      const JobSpec base = job_from_json(json);
      MonolithicOptions mo;
      mo.device = "cpu";
      const auto mono = train_monolithic(base, mo);
      ASSERT_EQ(mono.steps.size(), 16u);
      double head = 0, tail = 0;
      for (int i = 0; i < 4; ++i) {
        head += mono.steps[i].loss;
        tail += mono.steps[12 + i].loss;
      }
      EXPECT_LT(tail, head) << "the reference does not learn";
      for (int n : {1, 2, 4}) {
        auto jn = json;
        jn["spec"]["sharding"]["shards"] = n;
        const JobSpec job = job_from_json(jn);
        std::filesystem::remove_all(dir_ + "/checkpoints");
        const auto run_result = run(job);
        for (const auto& r : run_result.results) ASSERT_TRUE(r.ok) << r.error;
        const std::string what = std::string(arch) + " " + schedule + " n=" + std::to_string(n);
        expect_same_losses(run_result.last().losses, mono, what);
        ASSERT_TRUE(run_result.last().last_eval.has_value()) << what;
        EXPECT_EQ(run_result.last().last_eval->correct, mono.eval.correct) << what;
        int64_t total = 0;
        for (auto p : run_result.parameters) total += p;
        EXPECT_EQ(total, model::describe_model(job.model).parameters()) << what;
      }
    }
  }
}

// gpt on token windows: the same per-step losses as one process for 1, 2 and 4
// stages under both schedules (stage 0 receives int64 tokens, [micro, context,
// hidden] activations travel), the same validation loss, and the metrics report it.
TEST_F(PipelineTest, GptSameLossesAsOneProcessForOneTwoFourStages) {
  const std::string data = dir_ + "/tokens";
  shardguard::testing::write_small_tokens(data);
  for (const char* schedule : {"1f1b", "gpipe"}) {
    auto json = shardguard::testing::small_gpt_job_json(1, data);
    json["spec"]["training"]["schedule"] = schedule;
    const JobSpec base = job_from_json(json);
    MonolithicOptions mo;
    mo.device = "cpu";
    const auto mono = train_monolithic(base, mo);
    ASSERT_EQ(mono.steps.size(), 16u);
    EXPECT_LT(mono.steps.back().loss, mono.steps.front().loss - 0.5) << "the reference does not learn";
    ASSERT_GT(mono.eval.total, 0);
    EXPECT_EQ(mono.eval.total, 74 * 16);  // (1200 - 1) / 16 validation windows, 16 predictions each
    for (int n : {1, 2, 4}) {
      auto jn = json;
      jn["spec"]["sharding"]["shards"] = n;
      const JobSpec job = job_from_json(jn);
      std::filesystem::remove_all(dir_ + "/checkpoints");
      const auto r = run(job);
      for (const auto& st : r.results) ASSERT_TRUE(st.ok) << st.error;
      const std::string what = std::string("gpt ") + schedule + " n=" + std::to_string(n);
      expect_same_losses(r.last().losses, mono, what);
      ASSERT_TRUE(r.last().last_eval.has_value()) << what;
      EXPECT_EQ(r.last().last_eval->total, mono.eval.total) << what;
      EXPECT_NEAR(r.last().last_eval->loss(), mono.eval.loss(), 1e-5 * mono.eval.loss()) << what;
      EXPECT_NEAR(metric(*r.registries.back(), "shardguard_eval_loss"), r.last().last_eval->loss(), 1e-9) << what;
      int64_t total = 0;
      for (auto p : r.parameters) total += p;
      EXPECT_EQ(total, model::describe_model(job.model).parameters()) << what;
    }
  }
}

// A learning-rate warm-up and cosine decay: the stages without data (the middle
// ones of 4) learn the job's length from the driver's Resume, so all stages step
// with the one process's rates; and a pipeline stopped midway resumes on the same
// schedule (every step's loss equals the uninterrupted run's).
TEST_F(PipelineTest, WarmupAndCosineDecayMatchOneProcessAndSurviveARestart) {
  const std::string data = dir_ + "/tokens";
  shardguard::testing::write_small_tokens(data);
  auto json = shardguard::testing::small_gpt_job_json(1, data);
  json["spec"]["training"]["optimizer"] = {{"name", "adam"}, {"learningRate", 0.01}};
  MonolithicOptions mo;
  mo.device = "cpu";
  const auto constant = train_monolithic(job_from_json(json), mo);
  json["spec"]["training"]["optimizer"]["warmupSteps"] = 4;
  json["spec"]["training"]["optimizer"]["decay"] = "cosine";
  const auto mono = train_monolithic(job_from_json(json), mo);
  ASSERT_EQ(mono.steps.size(), 16u);
  // The schedule is in effect: step 0 runs at a quarter of the rate, so step 1's
  // loss already differs from the constant-rate run's.
  EXPECT_EQ(mono.steps[0].loss, constant.steps[0].loss);
  EXPECT_GT(std::abs(mono.steps[1].loss - constant.steps[1].loss), 1e-4);

  json["spec"]["sharding"]["shards"] = 4;
  const JobSpec job = job_from_json(json);
  const auto full = run(job);
  for (const auto& st : full.results) ASSERT_TRUE(st.ok) << st.error;
  expect_same_losses(full.last().losses, mono, "gpt cosine n=4");

  std::filesystem::remove_all(dir_ + "/checkpoints");
  const auto part = run(job, 7);
  for (const auto& st : part.results) ASSERT_TRUE(st.ok) << st.error;
  const auto rest = run(job);  // resumes at step 7, checkpointed when --max-steps stopped it
  for (const auto& st : rest.results) ASSERT_TRUE(st.ok) << st.error;
  ASSERT_EQ(rest.last().losses.size(), 16u);
  for (size_t s = 7; s < 16; ++s) EXPECT_NEAR(rest.last().losses[s], full.last().losses[s], 1e-5) << s;
}

TEST_F(PipelineTest, SgdWithMomentumMatchesOneProcess) {
  auto json = shardguard::testing::small_job_json("mlp", 1);
  json["spec"]["training"]["optimizer"] = {{"name", "sgd"}, {"learningRate", 0.05}, {"momentum", 0.9},
                                           {"weightDecay", 0.0001}};
  MonolithicOptions mo;
  mo.device = "cpu";
  const auto mono = train_monolithic(job_from_json(json), mo);
  json["spec"]["sharding"]["shards"] = 3;
  const auto r = run(job_from_json(json));
  for (const auto& s : r.results) ASSERT_TRUE(s.ok) << s.error;
  expect_same_losses(r.last().losses, mono, "mlp sgd n=3");
}

TEST_F(PipelineTest, VitTwoStagesMatchesOneProcess) {
  auto json = shardguard::testing::small_job_json("vit", 2, 128);
  const JobSpec job = job_from_json(json);
  json["spec"]["sharding"]["shards"] = 1;
  MonolithicOptions mo;
  mo.device = "cpu";
  const auto mono = train_monolithic(job_from_json(json), mo);
  const auto r = run(job);
  for (const auto& s : r.results) ASSERT_TRUE(s.ok) << s.error;
  expect_same_losses(r.last().losses, mono, "vit n=2");
}

TEST_F(PipelineTest, RecombinedModelScoresLikeTheDistributedEvaluation) {
  const JobSpec job = shardguard::testing::small_job("cnn", 4);
  const auto r = run(job);
  for (const auto& s : r.results) ASSERT_TRUE(s.ok) << s.error;
  ASSERT_TRUE(r.last().last_eval.has_value());
  const auto files = find_shard_files(job, dir_ + "/checkpoints", dir_ + "/keys");
  ASSERT_EQ(files.size(), 4u);
  int64_t step = -1;
  auto whole = recombine(job, files, &step);
  EXPECT_EQ(step, r.last().steps);
  whole->eval();
  const auto eval = evaluate(whole, load_images(job.dataset, Split::kTest), load_labels(job.dataset, Split::kTest),
                             job.training.eval_batch_size, torch::kCPU);
  EXPECT_EQ(eval.total, r.last().last_eval->total);
  EXPECT_EQ(eval.correct, r.last().last_eval->correct);

  // Without one shard's key there is no model.
  auto wrong = files;
  wrong[2].key = random_bytes(32);
  EXPECT_THROW(recombine(job, wrong, nullptr), CheckpointError);
  wrong = files;
  wrong.pop_back();
  EXPECT_THROW(recombine(job, wrong, nullptr), CheckpointError);
}

TEST_F(PipelineTest, RestartedPipelineContinuesFromTheCheckpoint) {
  // 8 steps, checkpoints every 3: a run stopped after 5 steps restarts at 3 and
  // ends with exactly the losses of an uninterrupted run.
  const JobSpec job = shardguard::testing::small_job("mlp", 2);
  const auto full = run(job);
  for (const auto& s : full.results) ASSERT_TRUE(s.ok) << s.error;
  std::filesystem::remove_all(dir_ + "/checkpoints");
  const auto part = run(job, 5);
  for (const auto& s : part.results) ASSERT_TRUE(s.ok) << s.error;
  EXPECT_EQ(part.last().steps, 5);
  const auto rest = run(job);
  for (const auto& s : rest.results) ASSERT_TRUE(s.ok) << s.error;
  EXPECT_EQ(rest.last().steps, 8);
  // Steps 0..4 are known from the first half, 5..7 from the resumed run.
  ASSERT_EQ(rest.last().losses.size(), 8u);
  for (size_t s = 5; s < 8; ++s) EXPECT_NEAR(rest.last().losses[s], full.last().losses[s], 1e-6) << s;
  EXPECT_EQ(rest.last().last_eval->correct, full.last().last_eval->correct);
}

TEST_F(PipelineTest, TamperedNewestCheckpointIsSetAsideAndAnOlderCommonOneUsed) {
  const JobSpec job = shardguard::testing::small_job("mlp", 3);
  const auto full = run(job);
  for (const auto& s : full.results) ASSERT_TRUE(s.ok) << s.error;
  // The last stage, two hops from the driver, keeps steps 6 and 8; flip a byte
  // of its step-8 file.
  const auto desc = model::describe_model(job.model);
  const auto stages = model::partition(desc, 3, "parameters");
  CheckpointStore s1(dir_ + "/checkpoints", CheckpointId{job.name, 2, stages[2].first_block, stages[2].end_block},
                     load_key_file(dir_ + "/keys/shard-2.key"));
  ASSERT_EQ(s1.steps(), (std::vector<int64_t>{6, 8}));
  std::string bytes = read_file(s1.path_for(8));
  bytes[bytes.size() - 5] ^= 0x40;
  write_file_atomic(s1.path_for(8), bytes);

  const auto again = run(job);
  for (const auto& s : again.results) ASSERT_TRUE(s.ok) << s.error;
  EXPECT_EQ(again.last().steps, 8);
  // Steps 6 and 7 were trained again from the step-6 checkpoint, exactly as before.
  ASSERT_EQ(again.last().losses.size(), 8u);
  for (size_t st = 6; st < 8; ++st) EXPECT_NEAR(again.last().losses[st], full.last().losses[st], 1e-6) << st;
  EXPECT_EQ(metric(*again.registries[2], "shardguard_checkpoint_failures_total"), 1);
  EXPECT_LT(again.results[0].wall_seconds, 20) << "the driver waited for a retry budget";
  EXPECT_TRUE(std::filesystem::exists(s1.path_for(8) + ".rejected"));  // kept, not deleted
  EXPECT_EQ(s1.steps(), (std::vector<int64_t>{6, 8}));                 // and a fresh step 8 written
  EXPECT_EQ(again.last().last_eval->correct, full.last().last_eval->correct);
}

TEST_F(PipelineTest, WrongShapeFromAPeerStopsTheStageWithBothShapes) {
  const JobSpec job = shardguard::testing::small_job("cnn", 2);
  StageOptions o = options(job, 1);
  o.prev = "127.0.0.1:1";  // nobody: its join notice is never answered
  StageRunner stage(o, std::make_shared<prometheus::Registry>());
  stage.start();
  StageResult result;
  std::thread t([&] { result = stage.run(); });

  auto stub = v1::Pipeline::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(stage.port()), grpc::InsecureChannelCredentials()));
  auto call = [&](const v1::ForwardRequest& req) {
    for (int attempt = 0;; ++attempt) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
      v1::ForwardReply reply;
      auto st = stub->Forward(&ctx, req, &reply);
      if (st.error_code() != grpc::StatusCode::UNAVAILABLE || attempt > 200) return st;
      std::this_thread::yield();
    }
  };
  v1::ForwardRequest sync;
  sync.mutable_sync()->set_generation(5);
  sync.mutable_sync()->add_steps(0);
  ASSERT_TRUE(call(sync).ok());
  v1::ForwardRequest resume;
  resume.mutable_resume()->set_generation(5);
  resume.mutable_resume()->set_step(0);
  ASSERT_TRUE(call(resume).ok());

  v1::ForwardRequest bad;
  auto* f = bad.mutable_frame();
  f->set_generation(5);
  f->set_phase(v1::PHASE_TRAIN);
  f->mutable_tensor()->set_dtype(v1::DTYPE_FLOAT32);
  for (int64_t d : {8, 4, 7, 7}) f->mutable_tensor()->add_shape(d);
  f->mutable_tensor()->set_data(std::string(8 * 4 * 7 * 7 * 4, '\0'));
  const auto desc = model::describe_model(job.model);
  const auto stages = model::partition(desc, 2, "parameters");
  auto want = model::shape_str(desc.blocks[stages[1].first_block].in_shape);  // e.g. [16, 3, 3]
  want = "float32[1..8, " + want.substr(1);
  const auto st = call(bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find(want), std::string::npos) << st.error_message();
  EXPECT_NE(st.error_message().find("float32[8, 4, 7, 7]"), std::string::npos) << st.error_message();
  t.join();
  EXPECT_FALSE(result.ok);
  EXPECT_NE(result.error.find("float32[8, 4, 7, 7]"), std::string::npos) << result.error;
}

TEST_F(PipelineTest, MetricsReflectTheTraining) {
  const JobSpec job = shardguard::testing::small_job("cnn", 2);
  const auto r = run(job);
  for (const auto& s : r.results) ASSERT_TRUE(s.ok) << s.error;
  for (int i = 0; i < 2; ++i) {
    auto& reg = *r.registries[i];
    EXPECT_EQ(metric(reg, "shardguard_shard_parameters"), static_cast<double>(r.parameters[i]));
    EXPECT_EQ(metric(reg, "shardguard_train_steps_total"), 8);
    EXPECT_EQ(metric(reg, "shardguard_train_samples_total"), 8 * 32);
    EXPECT_EQ(metric(reg, "shardguard_stage_compute_seconds", "pass", "forward"), 8 * 4);
    EXPECT_EQ(metric(reg, "shardguard_stage_compute_seconds", "pass", "backward"), 8 * 4);
    EXPECT_GT(metric(reg, "shardguard_pipeline_bytes_total", "direction", "sent"), 0);
    EXPECT_GT(metric(reg, "shardguard_pipeline_bytes_total", "direction", "received"), 0);
    EXPECT_EQ(metric(reg, "shardguard_checkpoint_writes_total"), 3);  // steps 3, 6 and the end (8)
    EXPECT_EQ(metric(reg, "shardguard_checkpoint_step"), 8);
  }
  // Every frame one side sent, the other received.
  EXPECT_EQ(metric(*r.registries[0], "shardguard_pipeline_frames_total", "direction", "sent"),
            metric(*r.registries[1], "shardguard_pipeline_frames_total", "direction", "received"));
  EXPECT_EQ(metric(*r.registries[1], "shardguard_pipeline_frames_total", "direction", "sent"), 8 * 4);  // gradients
  EXPECT_NEAR(metric(*r.registries[1], "shardguard_train_loss"), r.last().losses.back(), 1e-9);
  EXPECT_NEAR(metric(*r.registries[1], "shardguard_eval_accuracy"), r.last().last_eval->accuracy(), 1e-9);
  EXPECT_NEAR(metric(*r.registries[1], "shardguard_eval_loss"), r.last().last_eval->loss(), 1e-9);
  EXPECT_GT(r.last().last_eval->loss(), 0);
}

TEST_F(PipelineTest, DeviceSelection) {
  EXPECT_EQ(resolve_device("cpu").type(), torch::kCPU);
  if (torch::cuda::is_available()) {
    EXPECT_EQ(resolve_device("auto").type(), torch::kCUDA);
  } else {
    EXPECT_EQ(resolve_device("auto").type(), torch::kCPU);
    EXPECT_THROW(resolve_device("cuda"), std::runtime_error);
  }
  EXPECT_THROW(resolve_device("tpu"), std::invalid_argument);
}

TEST_F(PipelineTest, WrongDtypeAndByteCountAreRefused) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_INT64);
  t.add_shape(2);
  t.add_shape(3);
  t.set_data(std::string(48, '\0'));
  try {
    decode_tensor(&t, {3}, 8);
    FAIL();
  } catch (const FrameError& e) {
    EXPECT_NE(std::string(e.what()).find("int64[2, 3]"), std::string::npos) << e.what();
  }
  t.set_dtype(v1::DTYPE_FLOAT32);
  t.set_data(std::string(20, '\0'));
  EXPECT_THROW(decode_tensor(&t, {3}, 8), FrameError);
  t.set_data(std::string(24, '\0'));
  EXPECT_EQ(decode_tensor(&t, {3}, 8).sizes().vec(), (std::vector<int64_t>{2, 3}));
}

TEST_F(PipelineTest, UnreachablePeerIsRetriedThenAClearError) {
  const JobSpec job = shardguard::testing::small_job("mlp", 2);
  StageOptions o = options(job, 0);
  o.next = "127.0.0.1:1";
  o.retry_budget_s = 1.5;
  StageRunner stage(o, std::make_shared<prometheus::Registry>());
  stage.start();
  const auto r = stage.run();
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.error.find("stage 1 at 127.0.0.1:1 unreachable"), std::string::npos) << r.error;
  EXPECT_NE(r.error.find("attempts"), std::string::npos) << r.error;
}

TEST_F(PipelineTest, MissingDatasetSaysMakeDeps) {
  auto json = shardguard::testing::small_job_json("mlp", 1);
  json["spec"]["dataset"]["path"] = dir_ + "/no-such-dataset";
  StageRunner stage(options(job_from_json(json), 0), std::make_shared<prometheus::Registry>());
  try {
    stage.start();
    FAIL();
  } catch (const DatasetError& e) {
    EXPECT_NE(std::string(e.what()).find("make deps"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(dir_ + "/no-such-dataset"), std::string::npos) << e.what();
  }
}

TEST_F(PipelineTest, StageOutOfRangeIsRefused) {
  StageRunner stage(options(shardguard::testing::small_job("mlp", 2), 2), std::make_shared<prometheus::Registry>());
  EXPECT_THROW(stage.start(), std::invalid_argument);
}

}  // namespace
}  // namespace shardguard::shardd
