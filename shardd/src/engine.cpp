#include "engine_impl.h"

#include <random>

#include "shardguard/common/log.h"
#include "shardguard/common/token_file.h"
#include "shardguard/shardd/generate.h"
#include "shardguard/shardd/model.h"
#include "shardguard/shardd/script_model.h"
#include "shardguard/shardd/trainer.h"

namespace shardguard::shardd {
namespace {

std::string random_boot_id() {
  std::random_device rd;
  std::uniform_int_distribution<uint64_t> dist;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(dist(rd)));
  return buf;
}

}  // namespace

Engine::Impl::Impl(StageOptions options, StageMetrics& metrics, Transport& transport, StageEvents events,
                   ParameterSink publish)
    : opt_(std::move(options)), metrics_(metrics), transport_(transport), events_(std::move(events)),
      publish_(std::move(publish)), boot_id_(random_boot_id()) {
  transport_.attach(*this);
}

Engine::Impl::~Impl() { shutdown(); }

// ---- setup -------------------------------------------------------------------
void Engine::Impl::start(const std::function<nlohmann::json()>& open) {
  std::vector<model::StageDesc> stages;
  if (opt_.from_package()) {
    // A split TorchScript model: the manifest's cut, which split made with the job's sharding.
    const std::string source = opt_.package_url.empty() ? opt_.package_dir : opt_.package_url;
    if (!opt_.package_url.empty() && opt_.package_manifest.empty()) {
      throw model::PackageError("--package " + opt_.package_url +
                                ": a URL needs --package-manifest (the manifest is never read from the server)");
    }
    manifest_ = opt_.package_manifest.empty() ? load_manifest(opt_.package_dir) : load_manifest_file(opt_.package_manifest);
    desc_ = manifest_.desc();
    if (static_cast<int>(manifest_.shards.size()) != opt_.job.sharding.shards) {
      throw model::PackageError("--package: " + source + " holds a model cut into " +
                                std::to_string(manifest_.shards.size()) + " shards, but spec.sharding.shards is " +
                                std::to_string(opt_.job.sharding.shards));
    }
    // The data this job feeds the first block (checked by stage 0) and the loss reads
    // from the last (checked by the last stage); the stages between read no data.
    const bool first = opt_.stage == 0, last = opt_.stage == opt_.job.sharding.shards - 1;
    if (first || last) {
      const DataShapes data = data_shapes(opt_.job, first);
      const std::vector<int64_t>& in = desc_.blocks.front().in_shape;
      const std::vector<int64_t>& out = desc_.blocks.back().out_shape;
      const bool input_differs = first && in != data.input;
      const std::string needs = last ? data.refuses_output(out) : "";
      if (input_differs || !needs.empty()) {
        throw model::PackageError("--package: the model in " + source + " maps " + model::shape_str(in) + " to " +
                                  model::shape_str(out) + " per sample, but spec.dataset.format " +
                                  opt_.job.dataset.format + " with this job's spec.model" +
                                  (input_differs ? " gives " + model::shape_str(data.input) : "") +
                                  (input_differs && !needs.empty() ? " and" : "") +
                                  (needs.empty() ? "" : " needs " + needs));
      }
    }
    stages = manifest_.stages();
  } else {
    desc_ = model::describe_model(opt_.job.model);
    stages = model::partition(desc_, opt_.job.sharding.shards, opt_.job.sharding.balance);
  }
  n_ = static_cast<int>(stages.size());
  if (opt_.stage < 0 || opt_.stage >= n_) {
    throw std::invalid_argument("--stage: " + std::to_string(opt_.stage) + " is out of range for a job with " +
                                std::to_string(n_) + " shards (0.." + std::to_string(n_ - 1) + ")");
  }
  // Generation runs one pipeline: replica 0's stages, whatever spec.sharding.replicas says.
  if (opt_.generate.enabled()) opt_.job.sharding.replicas = 1;
  if (!opt_.package_url.empty()) {
    // Only this stage's package, once; kept sealed and opened (digest first) by every
    // fresh start like a file.
    // A stop (SIGTERM) while fetching abandons the fetch instead of waiting out its
    // timeouts and retries.
    FetchOptions fetch = opt_.fetch;
    fetch.stop_wait = [this](double seconds) {
      std::unique_lock<std::mutex> lock(mu_);
      return cv_.wait_for(lock, std::chrono::duration<double>(seconds), [this] { return !stop_reason_.empty(); });
    };
    package_bytes_ = fetch_package(opt_.package_url, manifest_, opt_.stage, fetch);
  }
  const int replicas = opt_.job.sharding.replicas;
  if (opt_.replica < 0 || opt_.replica >= replicas) {
    throw std::invalid_argument("--replica: " + std::to_string(opt_.replica) + " is out of range for a job with " +
                                std::to_string(replicas) + " replicas (0.." + std::to_string(replicas - 1) + ")");
  }
  if (replicas > 1 && opt_.replica_store.empty()) {
    throw std::invalid_argument("--replica-store: required when spec.sharding.replicas is " +
                                std::to_string(replicas) + " (host:port of the stage's replica group)");
  }
  if (replicas == 1 && (!opt_.replica_store.empty() || !opt_.replica_tunnels.empty())) {
    // A replica group's flags on a job without one would be ignored: say so instead.
    throw std::invalid_argument(std::string(opt_.replica_store.empty() ? "--replica-tunnel" : "--replica-store") +
                                ": only for a job with spec.sharding.replicas > 1 (job " + opt_.job.name + " has 1)");
  }
  generating_ = opt_.generate.enabled();
  if (generating_) {
    if (!opt_.job.model.language_model()) {
      throw std::invalid_argument("--generate-tokens: job " + opt_.job.name + " trains architecture " +
                                  opt_.job.model.architecture + (opt_.job.model.from_package()
                                      ? " on spec.dataset.format " + opt_.job.dataset.format : std::string()) +
                                  ", not a language model (gpt, or torchscript with format tokens)");
    }
    if (opt_.stage == 0 && opt_.generate.prompt.empty()) {
      throw std::invalid_argument("--generate-prompt: the prompt has no tokens");
    }
    for (const int64_t t : opt_.generate.prompt) {
      if (t < 0 || t >= opt_.job.model.vocab) {
        throw std::invalid_argument("--generate-prompt: token " + std::to_string(t) + " is outside the vocabulary of " +
                                    std::to_string(opt_.job.model.vocab) + " tokens (spec.model.vocab)");
      }
    }
  }
  writes_checkpoints_ = opt_.replica == 0;
  evaluates_ = opt_.replica == 0;
  me_ = stages[opt_.stage];
  first_ = opt_.stage == 0;
  last_ = opt_.stage == n_ - 1;
  device_ = resolve_device(opt_.device);
  micro_ = opt_.job.training.batch_size / opt_.job.training.micro_batches;
  schedule_ = make_schedule(opt_.job.training.schedule, opt_.stage, n_, opt_.job.training.micro_batches);
  in_shape_ = desc_.blocks[me_.first_block].in_shape;
  out_shape_ = desc_.blocks[me_.end_block - 1].out_shape;

  store_ = std::make_unique<CheckpointStore>(opt_.checkpoint_dir,
                                             CheckpointId{opt_.job.name, opt_.stage, me_.first_block, me_.end_block},
                                             opt_.key);
  build_fresh();
  metrics_.parameters.Set(static_cast<double>(parameters_));

  // Data: stage 0 reads only the features, the last stage only the labels
  // (generation reads none: its input is the prompt).
  if ((first_ || last_) && !generating_) {
    const int64_t train_n = count_samples(opt_.job, Split::kTrain, &desc_);
    plan_ = make_batch_plan(opt_.job, train_n, opt_.replica);
    sampler_ = std::make_unique<BatchSampler>(plan_);
    total_steps_ = plan_.total_steps();
    schedule_steps_ = total_steps_;
    if (opt_.max_steps > 0) total_steps_ = std::min(total_steps_, opt_.max_steps);
  }
  if ((first_ || last_) && !generating_) {
    train_ = Samples::load(opt_.job, Split::kTrain, first_, last_, &desc_);
    test_ = Samples::load(opt_.job, Split::kTest, first_, last_, &desc_);
  }

  nlohmann::json ready = {{"stage", opt_.stage}, {"replica", opt_.replica}, {"replicas", replicas}, {"stages", n_}, {"blocks", {me_.first_block, me_.end_block}},
                          {"parameters", parameters_}, {"device", device_.str()}, {"boot_id", boot_id_}};
  if (open) ready.update(open());
  log::info("stage ready", ready);
}

void Engine::Impl::build_fresh() {
  // A package is opened again for every fresh start: fine-tuning starts from its weights.
  if (!opt_.from_package()) {
    model_ = build_blocks(opt_.job.model, me_.first_block, me_.end_block, opt_.job.training.seed);
  } else if (!opt_.package_url.empty()) {
    model_ = package_stage(open_package_bytes(package_bytes_, package_url(opt_.package_url, opt_.stage), manifest_,
                                              opt_.stage, opt_.package_key),
                           me_.first_block, me_.end_block);
  } else {
    model_ = package_stage(load_package(opt_.package_dir, manifest_, opt_.stage, opt_.package_key), me_.first_block,
                           me_.end_block);
  }
  model_->to(device_);
  model_->train();
  optimizer_ = make_optimizer(opt_.job.training.optimizer, model_->parameters());
  parameters_ = count_parameters(*model_);
}

void Engine::Impl::stop(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_reason_.empty()) stop_reason_ = reason;
  }
  cv_.notify_all();
  transport_.wake();
}

void Engine::Impl::fail(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_reason_.empty()) stop_reason_ = "stage " + std::to_string(opt_.stage) + ": " + reason;
  }
  cv_.notify_all();
}

bool Engine::Impl::stopping() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !stop_reason_.empty();
}

void Engine::Impl::shutdown() {
  stop("shut down");
  transport_.close();
}

std::set<int64_t> Engine::Impl::restorable_steps() const {
  std::set<int64_t> steps{0};
  for (auto s : store_->steps()) steps.insert(s);
  return steps;
}

std::string Engine::Impl::prefixed(const std::string& err) const {
  return err.empty() ? err : "stage " + std::to_string(opt_.stage) + ": " + err;
}

// ---- main loop -------------------------------------------------------------------
StageResult Engine::Impl::run() {
  const auto start = Clock::now();
  StageResult result;
  try {
    // At most one step's frames wait in a queue (plus the evaluation batches in flight).
    if (opt_.job.sharding.replicas > 1) {
      // Before the links: a replica joins its group, then its own pipeline.
      group_ = std::make_unique<ReplicaGroup>(opt_.stage, opt_.replica, opt_.job.sharding.replicas,
                                              opt_.replica_store, opt_.replica_host, opt_.replica_tunnels,
                                              opt_.replica_tunnel_map, opt_.key, opt_.peer_timeout_s,
                                              [this] { metrics_.replica_store_refused.Increment(); });
      log::info("replica group joined", {{"stage", opt_.stage}, {"replica", opt_.replica},
                                         {"replicas", opt_.job.sharding.replicas}, {"store", opt_.replica_store},
                                         {"incarnation", group_->incarnation()},
                                         {"tunnelled", !opt_.replica_tunnels.empty()}});
    }
    transport_.connect({opt_.stage, n_, static_cast<size_t>(opt_.job.training.micro_batches) + 2});
    connected_.store(true);
    if (first_) {
      drive();
    } else {
      transport_.send_join({opt_.stage, boot_id_});
      follow();
    }
    result.ok = true;
  } catch (const Stopped&) {
    result.ok = false;
  } catch (const std::exception& e) {
    fail(e.what());
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_reason_.empty()) {
      result.ok = false;
      result.error = stop_reason_;
    }
  }
  result.steps = done_;
  result.losses = losses_;
  result.last_eval = last_eval_;
  result.compute_seconds = compute_seconds_;
  result.transport_seconds = transport_.transport_seconds();
  result.serialise_seconds = metrics_.serialise_seconds.Value();
  result.wall_seconds = seconds_since(start);
  result.parameters = parameters_;
  if (group_) {
    result.allreduce_seconds = group_->seconds();
    result.allreduce_bytes = group_->bytes();
    // Leaving the group closes its connections: a replica waiting in an all-reduce
    // for this one fails at once instead of at the group's timeout.
    group_.reset();
  }
  if (result.ok) {
    result.train_seconds = seconds_since(train_start_);
    result.trained_steps = done_ - resumed_step_;
    log::info("stage finished", {{"stage", opt_.stage}, {"steps", done_}, {"wall_seconds", result.wall_seconds},
                                 {"train_seconds", result.train_seconds}, {"trained_steps", result.trained_steps},
                                 {"samples_per_second", result.train_seconds > 0 ? result.trained_steps *
                                      opt_.job.training.batch_size / result.train_seconds : 0.0},
                                 {"compute_seconds", result.compute_seconds},
                                 {"transport_seconds", result.transport_seconds},
                                 {"serialise_seconds", result.serialise_seconds},
                                 {"replica", opt_.replica},
                                 {"allreduce_seconds", result.allreduce_seconds},
                                 {"allreduce_bytes", result.allreduce_bytes}});
  } else {
    log::error("stage stopped", {{"stage", opt_.stage}, {"reason", result.error}, {"steps", done_}});
  }
  shutdown();
  // After the links are down, so that nothing is still moving.
  log::info("pipeline traffic", {{"stage", opt_.stage},
                                 {"message_bytes_sent", metrics_.message_bytes_sent.Value()},
                                 {"message_bytes_received", metrics_.message_bytes_received.Value()}});
  return result;
}

// ---- inbound (the transport's threads) ----------------------------------------------
// Control messages need the neighbours; before run() connected them the caller retries.
Status Engine::Impl::not_running() const {
  return Status::Unavailable("stage " + std::to_string(opt_.stage) + " is not running yet");
}

Status Engine::Impl::on_frame(Direction direction, InFrame frame) {
  const bool forward = direction == Direction::kForward;
  if (frame.header.generation != generation_.load()) {
    metrics_.stale_frames.Increment();
    return Status::Ok();  // from before the last resynchronisation: dropped
  }
  Inbound in;
  in.phase = frame.header.phase;
  in.step = frame.header.step;
  in.micro_batch = frame.header.micro_batch;
  in.epoch = frame.header.epoch;
  in.position = frame.header.position;
  const bool eval = in.phase == Phase::kEval, gen = in.phase == Phase::kGenerate;
  try {
    if (!forward && eval) throw FrameError("evaluation frames never travel backward");
    if (in.phase != Phase::kTrain && !eval && !gen) throw FrameError("frame without a phase");
    if (gen != generating_) {
      throw FrameError(generating_ ? "a stage started to generate takes only generation frames"
                                   : "generation frames reach only a stage started to generate");
    }
    // Generation: one window forward, one sampled token (float32 [1, 1]) back.
    const int64_t max_batch = gen ? 1 : eval ? opt_.job.training.eval_batch_size : micro_;
    const std::vector<int64_t> token_shape{1};
    const auto t0 = Clock::now();
    in.tensor = frame.payload->take(forward ? in_shape_ : gen ? token_shape : out_shape_, max_batch);
    metrics_.serialise_seconds.Increment(seconds_since(t0));
  } catch (const FrameError& e) {
    metrics_.rejected_frames.Increment();
    const std::string what = std::string(forward ? "activation" : gen ? "token" : "gradient") + " frame (step " +
                             std::to_string(in.step) + ", micro-batch " + std::to_string(in.micro_batch) +
                             ") from stage " + std::to_string(opt_.stage + (forward ? -1 : 1)) + ": " + e.what();
    fail("refused " + what);
    return Status::Invalid("stage " + std::to_string(opt_.stage) + " refused " + what);
  }
  metrics_.frames_received.Increment();
  {
    std::lock_guard<std::mutex> lock(mu_);
    (forward ? fwd_ : bwd_).push_back(std::move(in));
  }
  cv_.notify_all();
  return Status::Ok();
}

Status Engine::Impl::on_sync(const SyncMsg& msg, SyncReply* reply) {
  if (!connected_.load()) return not_running();
  {
    std::lock_guard<std::mutex> lock(mu_);
    abort_ = true;  // preempt whatever the main loop is doing
  }
  cv_.notify_all();
  const std::set<int64_t> mine = restorable_steps();
  SyncMsg down;
  down.generation = msg.generation;
  for (auto s : msg.steps) {
    if (mine.count(s)) down.steps.push_back(s);
  }
  down.boot_ids = msg.boot_ids;
  down.boot_ids.push_back(boot_id_);
  if (last_) {
    reply->steps = down.steps;
    reply->boot_ids = down.boot_ids;
    return Status::Ok();
  }
  const std::string err = transport_.sync(down, reply);
  if (!err.empty()) return Status::Refused(prefixed(err));
  return Status::Ok();
}

Status Engine::Impl::on_resume(const ResumeMsg& msg) {
  if (!connected_.load()) return not_running();
  auto done = std::make_shared<std::promise<std::string>>();
  auto result = done->get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    resume_ = ResumeCmd{msg.generation, msg.step, msg.schedule_steps, done};
  }
  cv_.notify_all();
  const std::string err = await(result, "resume");
  if (!err.empty()) return Status::Refused(err);
  if (last_) return Status::Ok();
  // Refused, not unavailable: the stage above must not retry what this stage
  // already retried; the driver decides whether to resynchronise.
  const std::string down = transport_.resume(msg);
  if (!down.empty()) return Status::Refused(prefixed(down));
  return Status::Ok();
}

Status Engine::Impl::on_finish(const FinishMsg& msg) {
  if (!connected_.load()) return not_running();
  if (msg.generation != generation_.load()) {
    metrics_.stale_frames.Increment();
    return Status::Refused("finish of an older pipeline generation");
  }
  Inbound in;
  in.finish = true;
  in.step = msg.step;
  in.done = std::make_shared<std::promise<std::string>>();
  auto result = in.done->get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    fwd_.push_back(std::move(in));
  }
  cv_.notify_all();
  // The main loop flushes, checkpoints and passes Finish on before answering.
  const std::string err = await(result, "finish");
  if (!err.empty()) return Status::Refused(err);
  return Status::Ok();
}

Status Engine::Impl::on_join(const JoinMsg& msg) {
  if (!connected_.load()) return not_running();
  if (first_) {
    std::lock_guard<std::mutex> lock(mu_);
    if (members_.count(msg.boot_id) == 0) {
      log::info("stage joined, resynchronising", {{"joined_stage", msg.stage}});
      join_pending_ = true;
      pending_joins_.insert(msg.boot_id);
    }
    cv_.notify_all();
  } else {
    transport_.send_join(msg);
  }
  return Status::Ok();
}

// Waits for the main loop's answer to a control message, but never past the
// stage stopping or the peer timeout (a handler must not outlive the transport).
std::string Engine::Impl::await(std::future<std::string>& result, const char* what) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(opt_.peer_timeout_s));
  while (result.wait_for(std::chrono::milliseconds(50)) != std::future_status::ready) {
    if (stopping()) return "stage " + std::to_string(opt_.stage) + " is stopping";
    if (Clock::now() > deadline) return "stage " + std::to_string(opt_.stage) + " did not " + what + " in time";
  }
  return result.get();
}

// ---- waiting -------------------------------------------------------------------
// Pops the next inbound item of one direction; throws Aborted when a
// resynchronisation is pending and Stopped when the stage must stop.
Engine::Impl::Inbound Engine::Impl::wait_for(std::deque<Inbound>& queue, const char* what) {
  std::unique_lock<std::mutex> lock(mu_);
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(opt_.peer_timeout_s));
  for (;;) {
    if (!stop_reason_.empty()) throw Stopped{};
    if (abort_ || resume_ || join_pending_) throw Aborted{};
    if (!queue.empty()) {
      Inbound in = std::move(queue.front());
      queue.pop_front();
      return in;
    }
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && queue.empty() && !abort_ && !resume_ &&
        !join_pending_ && stop_reason_.empty()) {
      lock.unlock();
      fail(std::string("no ") + what + " for " + std::to_string(static_cast<int>(opt_.peer_timeout_s)) + " s");
      throw Stopped{};
    }
  }
}

Engine::Impl::Inbound Engine::Impl::expect(std::deque<Inbound>& queue, const char* what, int64_t step,
                                           int micro_batch) {
  Inbound in = wait_for(queue, what);
  if (in.finish || in.phase != Phase::kTrain || in.step != step || in.micro_batch != micro_batch) {
    fail(std::string("protocol error: expected ") + what + " of step " + std::to_string(step) + " micro-batch " +
         std::to_string(micro_batch) + ", received " + (in.finish ? "finish" : "step " + std::to_string(in.step) +
         " micro-batch " + std::to_string(in.micro_batch)));
    throw Stopped{};
  }
  return in;
}

// ---- resume (any stage) -----------------------------------------------------------
// Applies a pending Resume: restores the checkpoint and switches generation.
bool Engine::Impl::handle_resume() {
  std::optional<ResumeCmd> cmd;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cmd.swap(resume_);
  }
  if (!cmd) return false;
  std::string err;
  try {
    resume_at(cmd->generation, cmd->step, cmd->schedule_steps);
  } catch (const std::exception& e) {
    err = "stage " + std::to_string(opt_.stage) + ": cannot resume at step " + std::to_string(cmd->step) + ": " +
          e.what();
  }
  cmd->done->set_value(err);
  if (!err.empty()) {
    // Stay up: the driver resynchronises without the refused checkpoint.
    log::error("resume refused", {{"stage", opt_.stage}, {"step", cmd->step}, {"error", err}});
  }
  return true;
}

void Engine::Impl::resume_at(uint64_t generation, int64_t step, int64_t schedule_steps) {
  std::vector<Inbound> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.store(generation);
    for (auto& in : fwd_) dropped.push_back(std::move(in));
    for (auto& in : bwd_) dropped.push_back(std::move(in));
    fwd_.clear();
    bwd_.clear();
  }
  for (auto& in : dropped) {
    if (in.done) in.done->set_value("finish of an older pipeline generation");
  }
  build_fresh();
  if (step > 0) {
    try {
      store_->load(step, model_, *optimizer_, device_);
    } catch (const CheckpointError& e) {
      metrics_.checkpoint_failures.Increment();
      // Kept for inspection under another name, and never offered in a Sync again.
      const std::string moved = store_->quarantine(step);
      log::error("checkpoint refused", {{"stage", opt_.stage}, {"step", step}, {"error", e.what()},
                                        {"moved_to", moved}});
      throw;
    }
    metrics_.checkpoint_loads.Increment();
    metrics_.checkpoint_step.Set(static_cast<double>(step));
    if (publish_) publish_(model_, step);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    abort_ = false;  // only once the stage really is at `step`
  }
  if (schedule_steps > 0) schedule_steps_ = schedule_steps;
  done_ = step;
  resumed_step_ = step;
  train_start_ = Clock::now();
  last_checkpoint_ = step;
  if (losses_.size() > static_cast<size_t>(step)) losses_.resize(static_cast<size_t>(step));
  eval_seen_ = 0;
  eval_sum_ = EvalResult{};
  next_eval_batch_ = 0;
  metrics_.resyncs.Increment();
  log::info("pipeline resumed", {{"stage", opt_.stage}, {"step", step}, {"generation", std::to_string(generation)}});
  if (events_.on_resume) events_.on_resume(step);
}

// ---- stage 0: the driver -------------------------------------------------------------
void Engine::Impl::drive() {
  if (generating_) {
    generate();
    return;
  }
  constexpr int kMaxFinishAttempts = 4;
  for (int attempt = 1;; ++attempt) {
    resync_with_retries();
    while (done_ < total_steps_) {
      if (stopping()) throw Stopped{};
      if (take_join()) {
        resync_with_retries();
        continue;
      }
      try {
        train_step(done_, nullptr);
        after_step();
        if (at_eval_point()) run_eval_round();
      } catch (const Aborted&) {
        // a stage (re)joined: resync at the loop top
      }
    }
    finish_local(done_);
    if (last_) return;
    transport_.flush_down();
    if (stopping()) throw Stopped{};
    const std::string err = prefixed(transport_.finish({generation_.load(), done_}));
    if (err.empty()) return;
    // A stage restarted after the last step (it refuses a Finish of a
    // generation it never joined): resynchronise and finish again.
    if (attempt >= kMaxFinishAttempts) {
      fail("finish: " + err);
      throw Stopped{};
    }
    log::warn("finish refused, resynchronising", {{"error", err}, {"attempt", attempt}});
  }
}

bool Engine::Impl::at_eval_point() const {
  if (generating_) return false;  // no data, no evaluation
  return done_ > 0 && (done_ % plan_.steps_per_epoch() == 0 || done_ == total_steps_);
}

// A resync whose Resume failed (a stage refused its checkpoint and set it
// aside) is tried again: the next Sync no longer offers that step. After a
// resync at an evaluation point the evaluation runs again, since the one
// before may have been cut short.
void Engine::Impl::resync_with_retries() {
  constexpr int kMaxAttempts = 4;
  for (int attempt = 1;; ++attempt) {
    std::string err;
    try {
      err = resync();
    } catch (const CheckpointError& e) {
      err = e.what();
    }
    if (err.empty()) break;
    if (attempt >= kMaxAttempts || stopping()) {
      fail("resuming the pipeline: " + err);
      throw Stopped{};
    }
    log::warn("resume failed, resynchronising", {{"error", err}, {"attempt", attempt}});
  }
  if (at_eval_point()) run_eval_round();
}

bool Engine::Impl::take_join() {
  std::lock_guard<std::mutex> lock(mu_);
  const bool pending = join_pending_;
  join_pending_ = false;
  pending_joins_.clear();
  return pending;
}

// Sync + Resume down the chain. Returns "" or why a stage could not resume.
std::string Engine::Impl::resync() {
  const uint64_t generation = (static_cast<uint64_t>(std::random_device{}()) << 20) ^ ++generation_counter_;
  std::set<int64_t> steps = restorable_steps();
  std::set<std::string> members{boot_id_};
  if (!last_) {
    SyncMsg sync{generation, {steps.begin(), steps.end()}, {boot_id_}};
    SyncReply reply;
    const std::string err = transport_.sync(sync, &reply);
    if (!err.empty()) {
      fail("synchronising the pipeline: " + err);
      throw Stopped{};
    }
    steps = std::set<int64_t>(reply.steps.begin(), reply.steps.end());
    members.insert(reply.boot_ids.begin(), reply.boot_ids.end());
  }
  const int64_t step = steps.empty() ? 0 : *steps.rbegin();
  {
    std::lock_guard<std::mutex> lock(mu_);
    members_ = members;
    // A notice that raced this Sync (sent by a stage that then answered it) needs no
    // second resynchronisation: that stage is a member of this one. With replicas, a
    // second one would roll this pipeline back after its replica peers moved on.
    for (const auto& id : members) pending_joins_.erase(id);
    join_pending_ = !pending_joins_.empty();
  }
  resume_at(generation, step, schedule_steps_);
  if (!last_) {
    const std::string err = transport_.resume({generation, step, schedule_steps_});
    if (!err.empty()) return prefixed(err);
  }
  log::info("pipeline synchronised", {{"stages", n_}, {"step", step}, {"total_steps", total_steps_}});
  return "";
}

// ---- stages 1..n-1: followers ---------------------------------------------------------
void Engine::Impl::follow() {
  for (;;) {
    handle_resume();
    Inbound in;
    try {
      in = wait_for(fwd_, "activation");
    } catch (const Aborted&) {
      std::unique_lock<std::mutex> lock(mu_);
      // Wait for the Resume that follows the Sync that aborted us.
      const bool woke = cv_.wait_for(lock, std::chrono::duration<double>(opt_.peer_timeout_s),
                                     [&] { return resume_.has_value() || !stop_reason_.empty(); });
      if (!stop_reason_.empty()) throw Stopped{};
      if (!woke) {
        lock.unlock();
        fail("synchronisation started but no Resume arrived within " +
             std::to_string(static_cast<int>(opt_.peer_timeout_s)) + " s");
        throw Stopped{};
      }
      continue;
    }
    if (in.finish) {
      try {
        if (!last_) transport_.flush_down();
        finish_local(in.step);
      } catch (const std::exception& e) {
        in.done->set_value(e.what());
        fail(std::string("finish: ") + e.what());
        throw Stopped{};
      }
      if (!last_) {
        const std::string err = transport_.finish({generation_.load(), in.step});
        if (!err.empty()) {
          // The next stage restarted: stay up for the driver's resync.
          in.done->set_value(prefixed(prefixed(err)));
          continue;
        }
      }
      in.done->set_value("");
      return;
    }
    if (in.phase == Phase::kEval) {
      eval_forward(in);
      continue;
    }
    if (in.phase == Phase::kGenerate) {
      try {
        generate_forward(in);
      } catch (const Aborted&) {
        // resynchronisation: stage 0 gives up on it (a generation is not resumed)
      }
      continue;
    }
    try {
      train_step(in.step, &in);
      after_step();
    } catch (const Aborted&) {
      // resynchronisation: the Resume is handled at the loop top
    }
  }
}

// ---- Engine --------------------------------------------------------------------------
Engine::Engine(StageOptions options, StageMetrics& metrics, Transport& transport, StageEvents events,
               ParameterSink publish)
    : impl_(std::make_unique<Impl>(std::move(options), metrics, transport, std::move(events), std::move(publish))) {}
Engine::~Engine() = default;
void Engine::start(const std::function<nlohmann::json()>& open) { impl_->start(open); }
int64_t Engine::parameters() const { return impl_->parameters(); }
StageResult Engine::run() { return impl_->run(); }
void Engine::stop(const std::string& reason) { impl_->stop(reason); }

}  // namespace shardguard::shardd
