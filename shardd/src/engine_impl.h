// Engine::Impl, shared by engine.cpp (lifecycle, inbound messages, the
// Sync/Resume/Finish protocol) and engine_steps.cpp (training steps,
// evaluation, checkpoints).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <optional>
#include <set>

#include <torch/optim.h>

#include "shardguard/model/model_desc.h"
#include "shardguard/model/package.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/data.h"
#include "shardguard/shardd/engine.h"
#include "shardguard/shardd/schedule.h"
#include "shardguard/shardd/trainer.h"
#include "clock.h"
#include "replica_group.h"

namespace shardguard::shardd {

// Thrown inside the main loop when a resynchronisation preempts the current step.
struct Aborted {};
// Thrown inside the main loop when the stage must stop (fatal error or stop()).
struct Stopped {};

class Engine::Impl final : public Receiver {
 public:
  Impl(StageOptions options, StageMetrics& metrics, Transport& transport, StageEvents events, ParameterSink publish);
  ~Impl() override;

  void start(const std::function<nlohmann::json()>& open);
  int64_t parameters() const { return parameters_; }
  StageResult run();
  void stop(const std::string& reason);

  // ---- Receiver: the transport's threads ----------------------------------------
  Status on_frame(Direction direction, InFrame frame) override;
  Status on_sync(const SyncMsg& msg, SyncReply* reply) override;
  Status on_resume(const ResumeMsg& msg) override;
  Status on_finish(const FinishMsg& msg) override;
  Status on_join(const JoinMsg& msg) override;
  uint64_t generation() const override { return generation_.load(); }
  bool stopping() const override;
  void link_failed(const std::string& reason) override { fail(reason); }

 private:
  // A frame the main loop consumes: a tensor from a neighbour, or Finish.
  struct Inbound {
    Phase phase = Phase::kUnspecified;
    int64_t step = 0;
    int micro_batch = 0;
    int epoch = 0;
    int position = 0;  // generate: the window's last real position
    torch::Tensor tensor;
    bool finish = false;
    std::shared_ptr<std::promise<std::string>> done;  // finish: fulfilled with "" or the error
  };
  struct ResumeCmd {
    uint64_t generation;
    int64_t step;
    int64_t schedule_steps;
    std::shared_ptr<std::promise<std::string>> done;
  };

  // engine.cpp
  void build_fresh();
  void fail(const std::string& reason);
  void shutdown();
  Status not_running() const;
  std::string await(std::future<std::string>& result, const char* what);
  std::string prefixed(const std::string& err) const;  // "stage K: err", or "" for ""
  // The steps this stage can restore: step 0 (a fresh start) and every checkpoint.
  std::set<int64_t> restorable_steps() const;
  Inbound wait_for(std::deque<Inbound>& queue, const char* what);
  Inbound expect(std::deque<Inbound>& queue, const char* what, int64_t step, int micro_batch);
  bool handle_resume();
  void resume_at(uint64_t generation, int64_t step, int64_t schedule_steps);
  void drive();
  bool at_eval_point() const;
  void resync_with_retries();
  bool take_join();
  std::string resync();
  void follow();
  void generate();                   // stage 0 of `shardctl generate`
  void generate_forward(Inbound& in);  // stages 1..n-1 of it
  torch::Tensor token_from_below(int64_t i, const torch::Tensor& out, int position);

  // engine_steps.cpp
  void run_eval_round();
  void eval_forward(Inbound& in);
  void eval_batch(int64_t batch, int round, const torch::Tensor& logits);
  void train_step(int64_t step, Inbound* first_in);
  void after_step();
  void finish_local(int64_t step);
  void write_checkpoint(int64_t step);
  void observe(prometheus::Histogram& h, Clock::time_point t0);
  OutFrame frame(Phase phase, int64_t step, int m, int epoch, const torch::Tensor& t) const;

  StageOptions opt_;
  StageMetrics& metrics_;
  Transport& transport_;
  StageEvents events_;
  ParameterSink publish_;
  const std::string boot_id_;

  model::ModelDesc desc_;
  model::PackageManifest manifest_;  // with a package (opt_.from_package())
  std::string package_bytes_;        // with opt_.package_url: the fetched package, still sealed
  model::StageDesc me_;
  int n_ = 0;
  bool first_ = false, last_ = false;
  torch::Device device_{torch::kCPU};
  int micro_ = 0;
  std::vector<PipeOp> schedule_;
  std::vector<int64_t> in_shape_, out_shape_;
  torch::nn::Sequential model_{nullptr};
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  int64_t parameters_ = 0;
  std::unique_ptr<CheckpointStore> store_;
  std::unique_ptr<ReplicaGroup> group_;  // replicas > 1: this stage's replica group
  bool writes_checkpoints_ = true;       // replica 0 only
  bool evaluates_ = true;                // replica 0 only
  bool generating_ = false;              // opt_.generate: restore, generate, finish (no training)

  BatchPlan plan_;
  std::unique_ptr<BatchSampler> sampler_;
  int64_t total_steps_ = 0;     // steps this run trains (the job's, or fewer with --max-steps)
  int64_t schedule_steps_ = 0;  // the job's steps, for the learning rate (learning_rate_at)
  Samples train_, test_;  // stage 0: features; last stage: targets

  // Shared between the transport's threads and the main loop.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Inbound> fwd_, bwd_;
  std::optional<ResumeCmd> resume_;
  bool abort_ = false;
  bool join_pending_ = false;
  std::set<std::string> pending_joins_;  // boot ids of the notices behind join_pending_
  std::set<std::string> members_;
  std::string stop_reason_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> connected_{false};
  uint64_t generation_counter_ = 0;

  // Main-loop state.
  int64_t done_ = 0;
  int64_t resumed_step_ = 0;                      // step of the last resume
  Clock::time_point train_start_ = Clock::now();  // when the last resume happened
  int64_t last_checkpoint_ = -1;
  std::vector<double> losses_;
  std::optional<EvalReport> last_eval_;
  int64_t eval_seen_ = 0, next_eval_batch_ = 0;  // samples of the round so far
  EvalResult eval_sum_;                            // predictions, hits and loss of the round so far
  double compute_seconds_ = 0;
};

}  // namespace shardguard::shardd
