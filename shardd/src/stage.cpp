#include "shardguard/shardd/stage.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include <google/protobuf/io/coded_stream.h>
#include <grpcpp/grpcpp.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim.h>
#include <torch/utils.h>

#include "shardguard/common/log.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/data.h"
#include "shardguard/shardd/metrics.h"
#include "shardguard/shardd/model.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/schedule.h"
#include "shardguard/shardd/tensor_codec.h"
#include "shardguard/shardd/trainer.h"
#include "shardguard/shardd/wire_bytes.h"
#include "shardguard/v1/pipeline.grpc.pb.h"

namespace shardguard::shardd {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Thrown inside the main loop when a resynchronisation preempts the current step.
struct Aborted {};
// Thrown inside the main loop when the stage must stop (fatal error or stop()).
struct Stopped {};

bool retryable(const grpc::Status& s) {
  switch (s.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::ABORTED:
      return true;
    // Not RESOURCE_EXHAUSTED: a sidecar answers it for a message over its size
    // limit, which the same message will never get under.
    default:
      return false;
  }
}

std::shared_ptr<grpc::Channel> make_channel(const std::string& address, WireByteCounters wire) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 50);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 50);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // shardd only ever talks to loopback (its neighbour, or the sidecar in front of
  // it); the sidecar adds mTLS on the way between pods.
  return grpc::experimental::CreateCustomChannelWithInterceptors(address, grpc::InsecureChannelCredentials(), args,
                                                                 wire_byte_client_interceptors(wire));
}

// A neighbour: a stub plus retry-with-backoff for calls that must get through.
class Peer {
 public:
  Peer(std::string name, const std::string& address, double budget_s, WireByteCounters wire)
      : name_(std::move(name)), address_(address), budget_s_(budget_s),
        stub_(v1::Pipeline::NewStub(make_channel(address, wire))) {}

  const std::string& describe() const { return name_; }

  // Calls fn until it succeeds, fails for good, `cancelled()` turns true, or the
  // budget is spent. Returns an empty string on success, else the reason.
  template <class Fn>
  std::string call(Fn fn, const std::function<bool()>& cancelled, double deadline_s) {
    const auto start = Clock::now();
    std::chrono::milliseconds backoff(50);
    grpc::Status last;
    for (int attempt = 1;; ++attempt) {
      if (cancelled()) return "cancelled";
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(deadline_s * 1000)));
      last = fn(*stub_, &ctx);
      if (last.ok()) return "";
      if (!retryable(last)) {
        return name_ + " at " + address_ + " refused the call: " + last.error_message();
      }
      if (seconds_since(start) + backoff.count() / 1000.0 > budget_s_) {
        return name_ + " at " + address_ + " unreachable for " + std::to_string(static_cast<int>(budget_s_)) +
               " s after " + std::to_string(attempt) + " attempts (last error: " + last.error_message() + ")";
      }
      std::unique_lock<std::mutex> lock(sleep_mu_);
      sleep_cv_.wait_for(lock, backoff, [&] { return cancelled(); });
      backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
    }
  }
  void wake() { sleep_cv_.notify_all(); }

 private:
  std::string name_, address_;
  double budget_s_;
  std::unique_ptr<v1::Pipeline::Stub> stub_;
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
};

// Sends requests to one neighbour in order from its own thread, so compute never
// waits on the network. A request of an older generation than the stage's
// current one is dropped instead of sent.
template <class Req>
class Sender {
 public:
  using Rpc = grpc::Status (*)(v1::Pipeline::Stub&, grpc::ClientContext*, const Req&);

  Sender(Peer& peer, Rpc rpc, std::function<uint64_t()> generation, std::function<void(const std::string&)> fatal,
         StageMetrics& metrics, double deadline_s, size_t max_queued)
      : peer_(peer), rpc_(rpc), generation_(std::move(generation)), fatal_(std::move(fatal)), metrics_(metrics),
        deadline_s_(deadline_s), max_queued_(max_queued), thread_([this] { loop(); }) {}

  ~Sender() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    peer_.wake();
    thread_.join();
  }

  // Queues a request; blocks while `max_queued` are waiting, so a slow neighbour
  // holds the producer back instead of letting memory grow.
  void send(Req req, uint64_t generation) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return queue_.size() < max_queued_ || stopping_ || failed_; });
      queue_.push_back({std::move(req), generation});
    }
    cv_.notify_all();
  }

  // Waits until everything queued so far went out (or was dropped, or the sender failed).
  void flush() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return (queue_.empty() && !busy_) || stopping_ || failed_; });
  }

  double transport_seconds() const { return transport_seconds_.load(); }

 private:
  struct Item {
    Req req;
    uint64_t generation;
  };

  void loop() {
    for (;;) {
      Item item;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty() || stopping_; });
        if (stopping_) return;
        item = std::move(queue_.front());
        queue_.pop_front();
        busy_ = true;
      }
      cv_.notify_all();  // room in the queue
      const auto start = Clock::now();
      auto stale = [&] { return item.generation != generation_() || is_stopping(); };
      std::string err = "cancelled";  // stale before its turn: dropped unsent
      if (!stale()) {
        err = peer_.call([&](v1::Pipeline::Stub& stub, grpc::ClientContext* ctx) { return rpc_(stub, ctx, item.req); },
                         stale, deadline_s_);
      }
      const double took = seconds_since(start);
      transport_seconds_.store(transport_seconds_.load() + took);
      if (err.empty()) {
        metrics_.transport_seconds.Increment(took);
        if (item.req.has_frame()) {
          metrics_.bytes_sent.Increment(static_cast<double>(item.req.ByteSizeLong()));
          metrics_.frames_sent.Increment();
        }
      } else if (err != "cancelled") {
        fatal_(err);
        std::lock_guard<std::mutex> lock(mu_);
        failed_ = true;
      } else {
        metrics_.stale_frames.Increment();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        busy_ = false;
      }
      cv_.notify_all();
    }
  }

  bool is_stopping() {
    std::lock_guard<std::mutex> lock(mu_);
    return stopping_;
  }

  Peer& peer_;
  Rpc rpc_;
  std::function<uint64_t()> generation_;
  std::function<void(const std::string&)> fatal_;
  StageMetrics& metrics_;
  const double deadline_s_;
  const size_t max_queued_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool busy_ = false;
  bool stopping_ = false;
  bool failed_ = false;
  std::atomic<double> transport_seconds_{0};
  std::thread thread_;
};

grpc::Status call_forward(v1::Pipeline::Stub& stub, grpc::ClientContext* ctx, const v1::ForwardRequest& req) {
  v1::ForwardReply reply;
  return stub.Forward(ctx, req, &reply);
}

grpc::Status call_backward(v1::Pipeline::Stub& stub, grpc::ClientContext* ctx, const v1::BackwardRequest& req) {
  v1::BackwardReply reply;
  return stub.Backward(ctx, req, &reply);
}

std::string random_boot_id() {
  std::random_device rd;
  std::uniform_int_distribution<uint64_t> dist;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(dist(rd)));
  return buf;
}

// A frame the main loop consumes: a tensor from a neighbour, or Finish.
struct Inbound {
  v1::Phase phase = v1::PHASE_UNSPECIFIED;
  int64_t step = 0;
  int micro_batch = 0;
  int epoch = 0;
  torch::Tensor tensor;
  bool finish = false;
  std::shared_ptr<std::promise<std::string>> done;  // finish: fulfilled with "" or the error
};

}  // namespace

// Serves this shard's parameters as of its newest checkpoint (ShardExport in
// pipeline.proto). Only the sidecar in front of shardd decides who may call it.
class ExportService final : public v1::ShardExport::Service {
 public:
  static constexpr size_t kChunkBytes = 1 << 20;

  // Copies the parameters (to CPU, float32) into a new snapshot. Training thread.
  void publish(const torch::nn::Sequential& model, int64_t step) {
    auto bytes = std::make_shared<std::string>();
    for (const auto& p : model->parameters()) {
      const auto t = p.detach().to(torch::kCPU, torch::kFloat32).contiguous();
      bytes->append(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel()) * sizeof(float));
    }
    std::lock_guard<std::mutex> lock(mu_);
    snapshot_ = std::move(bytes);
    step_ = step;
  }

  grpc::Status Export(grpc::ServerContext* ctx, const v1::ExportRequest* req,
                      grpc::ServerWriter<v1::ExportChunk>* writer) override {
    std::shared_ptr<const std::string> bytes;
    int64_t step = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      bytes = snapshot_;
      step = step_;
    }
    if (!bytes) return {grpc::StatusCode::UNAVAILABLE, "no checkpoint written yet: nothing to export"};
    const uint64_t total = bytes->size();
    if (req->length() == 0 || req->offset() >= total || req->length() > total - req->offset()) {
      return {grpc::StatusCode::OUT_OF_RANGE, "range [" + std::to_string(req->offset()) + ", +" +
                                                  std::to_string(req->length()) + ") is not within the shard's " +
                                                  std::to_string(total) + " parameter bytes"};
    }
    for (uint64_t at = req->offset(), end = req->offset() + req->length(); at < end && !ctx->IsCancelled();) {
      const uint64_t n = std::min<uint64_t>(kChunkBytes, end - at);
      v1::ExportChunk chunk;
      chunk.set_offset(at);
      chunk.set_data(bytes->data() + at, n);
      chunk.set_total_bytes(total);
      chunk.set_step(step);
      if (!writer->Write(chunk)) return {grpc::StatusCode::CANCELLED, "the caller went away"};
      at += n;
    }
    return grpc::Status::OK;
  }

 private:
  std::mutex mu_;
  std::shared_ptr<const std::string> snapshot_;
  int64_t step_ = 0;
};

class StageRunner::Impl final : public v1::Pipeline::Service {
 public:
  Impl(StageOptions options, std::shared_ptr<prometheus::Registry> registry, StageEvents events)
      : opt_(std::move(options)), registry_(std::move(registry)), events_(std::move(events)),
        metrics_(*registry_, opt_.job.name, opt_.stage), boot_id_(random_boot_id()) {}

  ~Impl() override { shutdown(); }

  // ---- setup -----------------------------------------------------------------
  void start() {
    desc_ = model::describe_model(opt_.job.model);
    const auto stages = model::partition(desc_, opt_.job.sharding.shards, opt_.job.sharding.balance);
    n_ = static_cast<int>(stages.size());
    if (opt_.stage < 0 || opt_.stage >= n_) {
      throw std::invalid_argument("--stage: " + std::to_string(opt_.stage) + " is out of range for a job with " +
                                  std::to_string(n_) + " shards (0.." + std::to_string(n_ - 1) + ")");
    }
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

    // Data: stage 0 reads only the features, the last stage only the labels.
    if (first_ || last_) {
      const int64_t train_n = count_samples(opt_.job.dataset, Split::kTrain);
      plan_ = make_batch_plan(opt_.job, train_n);
      sampler_ = std::make_unique<BatchSampler>(plan_);
      total_steps_ = plan_.total_steps();
      if (opt_.max_steps > 0) total_steps_ = std::min(total_steps_, opt_.max_steps);
    }
    if (first_) {
      train_x_ = load_images(opt_.job.dataset, Split::kTrain);
      test_x_ = load_images(opt_.job.dataset, Split::kTest);
    }
    if (last_) {
      train_y_ = load_labels(opt_.job.dataset, Split::kTrain);
      test_y_ = load_labels(opt_.job.dataset, Split::kTest);
    }

    grpc::ServerBuilder builder;
    builder.SetMaxReceiveMessageSize(-1);
    builder.SetMaxSendMessageSize(-1);
    builder.AddListeningPort(opt_.listen, grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    builder.RegisterService(&export_);
    builder.experimental().SetInterceptorCreators(wire_byte_server_interceptors(wire_counters()));
    server_ = builder.BuildAndStart();
    if (!server_ || port_ == 0) {
      throw std::runtime_error("--listen: cannot listen on " + opt_.listen + " (address in use or invalid)");
    }
    log::info("stage ready", {{"stage", opt_.stage}, {"stages", n_}, {"blocks", {me_.first_block, me_.end_block}},
                              {"parameters", parameters_}, {"port", port_}, {"device", device_.str()},
                              {"boot_id", boot_id_}});
  }

  int port() const { return port_; }
  int64_t parameters() const { return parameters_; }

  void stop(const std::string& reason) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_reason_.empty()) stop_reason_ = reason;
    }
    cv_.notify_all();
    if (prev_) prev_->wake();
    if (next_) next_->wake();
  }

  // ---- main loop --------------------------------------------------------------
  void set_neighbours(const std::string& prev, const std::string& next) {
    opt_.prev = prev;
    opt_.next = next;
  }

  // Connects to the neighbours (lazily: gRPC channels connect on first use).
  void connect() {
    if (!first_ && opt_.prev.empty()) throw std::invalid_argument("--prev is required for stage " + std::to_string(opt_.stage));
    if (!last_ && opt_.next.empty()) throw std::invalid_argument("--next is required for stage " + std::to_string(opt_.stage));
    if (!first_) prev_ = std::make_unique<Peer>("stage " + std::to_string(opt_.stage - 1), opt_.prev, opt_.retry_budget_s, wire_counters());
    if (!last_) next_ = std::make_unique<Peer>("stage " + std::to_string(opt_.stage + 1), opt_.next, opt_.retry_budget_s, wire_counters());
    auto gen = [this] { return generation_.load(); };
    auto fatal = [this](const std::string& e) { fail(e); };
    // At most one step's frames wait in a queue (plus the evaluation batches in flight).
    const size_t max_queued = static_cast<size_t>(opt_.job.training.micro_batches) + 2;
    if (next_) {
      down_ = std::make_unique<Sender<v1::ForwardRequest>>(*next_, &call_forward, gen, fatal, metrics_,
                                                           opt_.peer_timeout_s, max_queued);
    }
    if (prev_) {
      up_ = std::make_unique<Sender<v1::BackwardRequest>>(*prev_, &call_backward, gen, fatal, metrics_,
                                                          opt_.peer_timeout_s, max_queued);
    }
    connected_.store(true);
  }

  StageResult run() {
    const auto start = Clock::now();
    StageResult result;
    try {
      connect();
      if (first_) {
        drive();
      } else {
        v1::BackwardRequest join;
        join.mutable_join()->set_stage(opt_.stage);
        join.mutable_join()->set_boot_id(boot_id_);
        up_->send(join, generation_.load());
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
    result.transport_seconds = (down_ ? down_->transport_seconds() : 0) + (up_ ? up_->transport_seconds() : 0);
    result.serialise_seconds = metrics_.serialise_seconds.Value();
    result.wall_seconds = seconds_since(start);
    result.parameters = parameters_;
    if (result.ok) {
      result.train_seconds = seconds_since(train_start_);
      result.trained_steps = done_ - resumed_step_;
      log::info("stage finished", {{"stage", opt_.stage}, {"steps", done_}, {"wall_seconds", result.wall_seconds},
                                   {"train_seconds", result.train_seconds}, {"trained_steps", result.trained_steps},
                                   {"samples_per_second", result.train_seconds > 0 ? result.trained_steps *
                                        opt_.job.training.batch_size / result.train_seconds : 0.0},
                                   {"compute_seconds", result.compute_seconds},
                                   {"transport_seconds", result.transport_seconds},
                                   {"serialise_seconds", result.serialise_seconds}});
    } else {
      log::error("stage stopped", {{"stage", opt_.stage}, {"reason", result.error}, {"steps", done_}});
    }
    shutdown();
    // After the server and the channels are down, so that nothing is still moving.
    log::info("pipeline traffic", {{"stage", opt_.stage},
                                   {"message_bytes_sent", metrics_.message_bytes_sent.Value()},
                                   {"message_bytes_received", metrics_.message_bytes_received.Value()}});
    return result;
  }

  // ---- gRPC service (handler threads) ---------------------------------------
  grpc::Status Forward(grpc::ServerContext*, const v1::ForwardRequest* req, v1::ForwardReply* reply) override {
    if (!req->has_frame() && !connected_.load()) return not_running();
    switch (req->body_case()) {
      case v1::ForwardRequest::kFrame:
        return accept_frame(const_cast<v1::TensorFrame*>(&req->frame()), /*forward=*/true);
      case v1::ForwardRequest::kSync:
        return on_sync(req->sync(), reply);
      case v1::ForwardRequest::kResume:
        return on_resume(req->resume());
      case v1::ForwardRequest::kFinish:
        return on_finish(req->finish());
      default:
        return {grpc::StatusCode::INVALID_ARGUMENT, "empty ForwardRequest"};
    }
  }

  grpc::Status Backward(grpc::ServerContext*, const v1::BackwardRequest* req, v1::BackwardReply*) override {
    if (req->has_frame()) return accept_frame(const_cast<v1::TensorFrame*>(&req->frame()), /*forward=*/false);
    if (!connected_.load()) return not_running();
    if (req->has_join()) {
      if (first_) {
        std::lock_guard<std::mutex> lock(mu_);
        if (members_.count(req->join().boot_id()) == 0) {
          log::info("stage joined, resynchronising", {{"joined_stage", req->join().stage()}});
          join_pending_ = true;
        }
        cv_.notify_all();
      } else if (up_) {
        up_->send(*req, generation_.load());
      }
      return grpc::Status::OK;
    }
    return {grpc::StatusCode::INVALID_ARGUMENT, "empty BackwardRequest"};
  }

 private:
  // Control messages need the neighbours; before run() connected them the caller retries.
  grpc::Status not_running() const {
    return {grpc::StatusCode::UNAVAILABLE, "stage " + std::to_string(opt_.stage) + " is not running yet"};
  }

  void build_fresh() {
    model_ = build_blocks(opt_.job.model, me_.first_block, me_.end_block, opt_.job.training.seed);
    model_->to(device_);
    model_->train();
    optimizer_ = make_optimizer(opt_.job.training.optimizer, model_->parameters());
    parameters_ = count_parameters(*model_);
  }

  void fail(const std::string& reason) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_reason_.empty()) stop_reason_ = "stage " + std::to_string(opt_.stage) + ": " + reason;
    }
    cv_.notify_all();
  }

  void shutdown() {
    stop("shut down");
    if (server_) {  // first: handlers may still use the senders
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
      server_.reset();
    }
    down_.reset();
    up_.reset();
  }

  grpc::Status accept_frame(v1::TensorFrame* frame, bool forward) {
    // The request's size on the wire: the frame plus its one-byte oneof tag and length.
    metrics_.bytes_received.Increment(static_cast<double>(frame->ByteSizeLong() + 1 +
                                                          google::protobuf::io::CodedOutputStream::VarintSize64(frame->ByteSizeLong())));
    if (frame->generation() != generation_.load()) {
      metrics_.stale_frames.Increment();
      return grpc::Status::OK;  // from before the last resynchronisation: dropped
    }
    Inbound in;
    in.phase = frame->phase();
    in.step = frame->step();
    in.micro_batch = frame->micro_batch();
    in.epoch = frame->epoch();
    const bool eval = in.phase == v1::PHASE_EVAL;
    try {
      if (!forward && eval) throw FrameError("evaluation frames never travel backward");
      if (in.phase != v1::PHASE_TRAIN && !eval) throw FrameError("frame without a phase");
      const int64_t max_batch = eval ? opt_.job.training.eval_batch_size : micro_;
      const auto t0 = Clock::now();
      in.tensor = decode_tensor(frame->mutable_tensor(), forward ? in_shape_ : out_shape_, max_batch);
      metrics_.serialise_seconds.Increment(seconds_since(t0));
    } catch (const FrameError& e) {
      metrics_.rejected_frames.Increment();
      const std::string what = std::string(forward ? "activation" : "gradient") + " frame (step " +
                               std::to_string(in.step) + ", micro-batch " + std::to_string(in.micro_batch) +
                               ") from stage " + std::to_string(opt_.stage + (forward ? -1 : 1)) + ": " + e.what();
      fail("refused " + what);
      return {grpc::StatusCode::INVALID_ARGUMENT, "stage " + std::to_string(opt_.stage) + " refused " + what};
    }
    metrics_.frames_received.Increment();
    {
      std::lock_guard<std::mutex> lock(mu_);
      (forward ? fwd_ : bwd_).push_back(std::move(in));
    }
    cv_.notify_all();
    return grpc::Status::OK;
  }

  grpc::Status on_sync(const v1::SyncRequest& req, v1::ForwardReply* reply) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      abort_ = true;  // preempt whatever the main loop is doing
    }
    cv_.notify_all();
    std::set<int64_t> mine{0};
    for (auto s : store_->steps()) mine.insert(s);
    v1::SyncRequest down;
    down.set_generation(req.generation());
    for (auto s : req.steps()) {
      if (mine.count(s)) down.add_steps(s);
    }
    down.mutable_boot_ids()->CopyFrom(req.boot_ids());
    down.add_boot_ids(boot_id_);
    if (last_) {
      reply->mutable_steps()->CopyFrom(down.steps());
      reply->mutable_boot_ids()->CopyFrom(down.boot_ids());
      return grpc::Status::OK;
    }
    v1::ForwardRequest fwd;
    *fwd.mutable_sync() = down;
    const std::string err = next_->call(
        [&](v1::Pipeline::Stub& stub, grpc::ClientContext* ctx) { return stub.Forward(ctx, fwd, reply); },
        [this] { return stopping(); }, control_deadline());
    if (!err.empty()) return {grpc::StatusCode::FAILED_PRECONDITION, "stage " + std::to_string(opt_.stage) + ": " + err};
    return grpc::Status::OK;
  }

  grpc::Status on_resume(const v1::ResumeRequest& req) {
    auto done = std::make_shared<std::promise<std::string>>();
    auto result = done->get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      resume_ = ResumeCmd{req.generation(), req.step(), done};
    }
    cv_.notify_all();
    const std::string err = await(result, "resume");
    if (!err.empty()) return {grpc::StatusCode::FAILED_PRECONDITION, err};
    if (last_) return grpc::Status::OK;
    return forward_control_down([&](v1::ForwardRequest& f) { *f.mutable_resume() = req; });
  }

  grpc::Status on_finish(const v1::FinishRequest& req) {
    if (req.generation() != generation_.load()) {
      metrics_.stale_frames.Increment();
      return {grpc::StatusCode::FAILED_PRECONDITION, "finish of an older pipeline generation"};
    }
    Inbound in;
    in.finish = true;
    in.step = req.step();
    in.done = std::make_shared<std::promise<std::string>>();
    auto result = in.done->get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      fwd_.push_back(std::move(in));
    }
    cv_.notify_all();
    // The main loop flushes, checkpoints and passes Finish on before answering.
    const std::string err = await(result, "finish");
    if (!err.empty()) return {grpc::StatusCode::FAILED_PRECONDITION, err};
    return grpc::Status::OK;
  }

  // Waits for the main loop's answer to a control message, but never past the
  // stage stopping or the peer timeout (a handler must not outlive the server).
  std::string await(std::future<std::string>& result, const char* what) {
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(opt_.peer_timeout_s));
    while (result.wait_for(std::chrono::milliseconds(50)) != std::future_status::ready) {
      if (stopping()) return "stage " + std::to_string(opt_.stage) + " is stopping";
      if (Clock::now() > deadline) return "stage " + std::to_string(opt_.stage) + " did not " + what + " in time";
    }
    return result.get();
  }

  template <class Fill>
  grpc::Status forward_control_down(Fill fill) {
    v1::ForwardRequest fwd;
    fill(fwd);
    const std::string err = next_->call(
        [&](v1::Pipeline::Stub& stub, grpc::ClientContext* ctx) {
          v1::ForwardReply reply;
          return stub.Forward(ctx, fwd, &reply);
        },
        [this] { return stopping(); }, control_deadline());
    // FAILED_PRECONDITION, not UNAVAILABLE: the stage above must not retry what
    // this stage already retried; the driver decides whether to resynchronise.
    if (!err.empty()) return {grpc::StatusCode::FAILED_PRECONDITION, "stage " + std::to_string(opt_.stage) + ": " + err};
    return grpc::Status::OK;
  }

  WireByteCounters wire_counters() { return {&metrics_.message_bytes_sent, &metrics_.message_bytes_received}; }

  double control_deadline() const { return opt_.retry_budget_s * (n_ + 1) + opt_.peer_timeout_s; }

  bool stopping() {
    std::lock_guard<std::mutex> lock(mu_);
    return !stop_reason_.empty();
  }

  // ---- waiting ----------------------------------------------------------------
  // Pops the next inbound item of one direction; throws Aborted when a
  // resynchronisation is pending and Stopped when the stage must stop.
  Inbound wait_for(std::deque<Inbound>& queue, const char* what) {
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

  Inbound expect(std::deque<Inbound>& queue, const char* what, int64_t step, int micro_batch) {
    Inbound in = wait_for(queue, what);
    if (in.finish || in.phase != v1::PHASE_TRAIN || in.step != step || in.micro_batch != micro_batch) {
      fail(std::string("protocol error: expected ") + what + " of step " + std::to_string(step) + " micro-batch " +
           std::to_string(micro_batch) + ", received " + (in.finish ? "finish" : "step " + std::to_string(in.step) +
           " micro-batch " + std::to_string(in.micro_batch)));
      throw Stopped{};
    }
    return in;
  }

  // Applies a pending Resume (any stage) — restores the checkpoint and switches generation.
  bool handle_resume() {
    std::optional<ResumeCmd> cmd;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cmd.swap(resume_);
    }
    if (!cmd) return false;
    std::string err;
    try {
      resume_at(cmd->generation, cmd->step);
    } catch (const std::exception& e) {
      err = "stage " + std::to_string(opt_.stage) + ": cannot resume at step " + std::to_string(cmd->step) + ": " + e.what();
    }
    cmd->done->set_value(err);
    if (!err.empty()) {
      // Stay up: the driver resynchronises without the refused checkpoint.
      log::error("resume refused", {{"stage", opt_.stage}, {"step", cmd->step}, {"error", err}});
    }
    return true;
  }

  void resume_at(uint64_t generation, int64_t step) {
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
      export_.publish(model_, step);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      abort_ = false;  // only once the stage really is at `step`
    }
    done_ = step;
    resumed_step_ = step;
    train_start_ = Clock::now();
    last_checkpoint_ = step;
    if (losses_.size() > static_cast<size_t>(step)) losses_.resize(static_cast<size_t>(step));
    eval_seen_ = eval_correct_ = 0;
    next_eval_batch_ = 0;
    metrics_.resyncs.Increment();
    log::info("pipeline resumed", {{"stage", opt_.stage}, {"step", step}, {"generation", std::to_string(generation)}});
    if (events_.on_resume) events_.on_resume(step);
  }

  // ---- stage 0: the driver ---------------------------------------------------
  void drive() {
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
      if (!next_) return;
      down_->flush();
      if (stopping()) throw Stopped{};
      auto st = forward_control_down([&](v1::ForwardRequest& f) {
        f.mutable_finish()->set_generation(generation_.load());
        f.mutable_finish()->set_step(done_);
      });
      if (st.ok()) return;
      // A stage restarted after the last step (it refuses a Finish of a
      // generation it never joined): resynchronise and finish again.
      if (attempt >= kMaxFinishAttempts) {
        fail("finish: " + st.error_message());
        throw Stopped{};
      }
      log::warn("finish refused, resynchronising", {{"error", st.error_message()}, {"attempt", attempt}});
    }
  }

  bool at_eval_point() const {
    return done_ > 0 && (done_ % plan_.steps_per_epoch() == 0 || done_ == total_steps_);
  }

  // A resync whose Resume failed (a stage refused its checkpoint and set it
  // aside) is tried again: the next Sync no longer offers that step. After a
  // resync at an evaluation point the evaluation runs again, since the one
  // before may have been cut short.
  void resync_with_retries() {
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

  bool take_join() {
    std::lock_guard<std::mutex> lock(mu_);
    const bool pending = join_pending_;
    join_pending_ = false;
    return pending;
  }

  // Sync + Resume down the chain. Returns "" or why a stage could not resume.
  std::string resync() {
    const uint64_t generation = (static_cast<uint64_t>(std::random_device{}()) << 20) ^ ++generation_counter_;
    std::set<int64_t> steps{0};
    for (auto s : store_->steps()) steps.insert(s);
    std::set<std::string> members{boot_id_};
    if (next_) {
      v1::ForwardRequest fwd;
      auto* sync = fwd.mutable_sync();
      sync->set_generation(generation);
      for (auto s : steps) sync->add_steps(s);
      sync->add_boot_ids(boot_id_);
      v1::ForwardReply reply;
      const std::string err = next_->call(
          [&](v1::Pipeline::Stub& stub, grpc::ClientContext* ctx) { return stub.Forward(ctx, fwd, &reply); },
          [this] { return stopping(); }, control_deadline());
      if (!err.empty()) {
        fail("synchronising the pipeline: " + err);
        throw Stopped{};
      }
      steps = std::set<int64_t>(reply.steps().begin(), reply.steps().end());
      members.insert(reply.boot_ids().begin(), reply.boot_ids().end());
    }
    const int64_t step = steps.empty() ? 0 : *steps.rbegin();
    {
      std::lock_guard<std::mutex> lock(mu_);
      members_ = members;
    }
    resume_at(generation, step);
    if (next_) {
      auto st = forward_control_down([&](v1::ForwardRequest& f) {
        f.mutable_resume()->set_generation(generation);
        f.mutable_resume()->set_step(step);
      });
      if (!st.ok()) return st.error_message();
    }
    log::info("pipeline synchronised", {{"stages", n_}, {"step", step}, {"total_steps", total_steps_}});
    return "";
  }

  void run_eval_round() {
    const int round = static_cast<int>(done_ / plan_.steps_per_epoch());
    const int64_t n = test_x_.size(0);
    const int batch = opt_.job.training.eval_batch_size;
    model_->eval();
    torch::NoGradGuard no_grad;
    for (int64_t b = 0; b * batch < n; ++b) {
      auto x = test_x_.slice(0, b * batch, std::min<int64_t>(n, (b + 1) * batch)).to(device_);
      auto out = model_->forward(x);
      if (last_) {
        eval_batch(b, round, out);
      } else {
        send_down(v1::PHASE_EVAL, b, 0, round, out);
      }
    }
    model_->train();
  }

  // ---- stages 1..n-1: followers -----------------------------------------------
  void follow() {
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
          if (down_) down_->flush();
          finish_local(in.step);
        } catch (const std::exception& e) {
          in.done->set_value(e.what());
          fail(std::string("finish: ") + e.what());
          throw Stopped{};
        }
        if (next_) {
          auto st = forward_control_down([&](v1::ForwardRequest& f) {
            f.mutable_finish()->set_generation(generation_.load());
            f.mutable_finish()->set_step(in.step);
          });
          if (!st.ok()) {
            // The next stage restarted: stay up for the driver's resync.
            in.done->set_value("stage " + std::to_string(opt_.stage) + ": " + st.error_message());
            continue;
          }
        }
        in.done->set_value("");
        return;
      }
      if (in.phase == v1::PHASE_EVAL) {
        eval_forward(in);
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

  void eval_forward(Inbound& in) {
    torch::NoGradGuard no_grad;
    model_->eval();
    auto out = model_->forward(in.tensor.to(device_));
    model_->train();
    if (last_) {
      eval_batch(in.step, in.epoch, out);
    } else {
      send_down(v1::PHASE_EVAL, in.step, 0, in.epoch, out);
    }
  }

  void eval_batch(int64_t batch, int round, const torch::Tensor& logits) {
    if (batch != next_eval_batch_) {
      fail("protocol error: expected evaluation batch " + std::to_string(next_eval_batch_) + ", received " +
           std::to_string(batch));
      throw Stopped{};
    }
    const int64_t begin = batch * opt_.job.training.eval_batch_size;
    const auto y = test_y_.slice(0, begin, begin + logits.size(0)).to(device_);
    if (y.size(0) != logits.size(0)) {
      fail("evaluation batch " + std::to_string(batch) + " has more samples than the test set");
      throw Stopped{};
    }
    eval_correct_ += logits.argmax(1).eq(y).sum().item<int64_t>();
    eval_seen_ += logits.size(0);
    ++next_eval_batch_;
    if (eval_seen_ == test_y_.size(0)) {
      EvalReport r;
      r.round = round;
      r.step = done_;
      r.correct = eval_correct_;
      r.total = eval_seen_;
      last_eval_ = r;
      metrics_.eval_accuracy.Set(r.accuracy());
      log::info("evaluation", {{"round", round}, {"step", done_}, {"accuracy", r.accuracy()}, {"correct", r.correct},
                               {"total", r.total}});
      if (events_.on_eval) events_.on_eval(r);
      eval_seen_ = eval_correct_ = 0;
      next_eval_batch_ = 0;
    }
  }

  // ---- one optimizer step -------------------------------------------------------
  void train_step(int64_t step, Inbound* first_in) {
    const int m_count = opt_.job.training.micro_batches;
    const int epoch = first_in ? first_in->epoch : plan_.epoch_of(step);
    std::vector<torch::Tensor> inputs(m_count), outputs(m_count);
    double loss_sum = 0;
    int64_t correct = 0;
    optimizer_->zero_grad();
    for (const PipeOp& op : schedule_) {
      const int m = op.micro_batch;
      if (op.kind == PipeOp::kForward) {
        torch::Tensor x;
        if (first_) {
          x = train_x_.index_select(0, sampler_->indices(step, m)).to(device_);
        } else {
          Inbound in = (m == 0 && first_in) ? std::move(*first_in) : expect(fwd_, "activation", step, m);
          if (in.step != step || in.micro_batch != m) {
            fail("protocol error: step " + std::to_string(step) + " began with micro-batch " + std::to_string(in.micro_batch));
            throw Stopped{};
          }
          x = in.tensor.to(device_).requires_grad_(true);
        }
        const auto t0 = Clock::now();
        auto out = model_->forward(x);
        if (last_) {
          const auto y = train_y_.index_select(0, sampler_->indices(step, m)).to(device_);
          auto loss = torch::nn::functional::cross_entropy(out, y);
          loss_sum += loss.item<double>();
          correct += out.argmax(1).eq(y).sum().item<int64_t>();
          out = loss / m_count;
        }
        observe(metrics_.forward_seconds, t0);
        inputs[m] = x;
        outputs[m] = out;
        if (!last_) send_down(v1::PHASE_TRAIN, step, m, epoch, out);
      } else {
        torch::Tensor grad;
        if (!last_) grad = expect(bwd_, "gradient", step, m).tensor.to(device_);
        const auto t0 = Clock::now();
        if (last_) {
          outputs[m].backward();
        } else {
          outputs[m].backward(grad);
        }
        observe(metrics_.backward_seconds, t0);
        if (!first_) {
          v1::BackwardRequest req;
          fill_frame(req.mutable_frame(), v1::PHASE_TRAIN, step, m, epoch, inputs[m].grad());
          up_->send(std::move(req), generation_.load());
        }
        inputs[m] = torch::Tensor();
        outputs[m] = torch::Tensor();
      }
    }
    const auto t0 = Clock::now();
    optimizer_->step();
    observe(metrics_.optimizer_seconds, t0);
    done_ = step + 1;
    metrics_.steps.Increment();
    metrics_.samples.Increment(opt_.job.training.batch_size);
    metrics_.step.Set(static_cast<double>(done_));
    metrics_.epoch.Set(epoch);
    if (last_) {
      StepReport r;
      r.step = done_;
      r.total_steps = total_steps_;
      r.epoch = epoch;
      r.loss = loss_sum / m_count;
      r.accuracy = static_cast<double>(correct) / opt_.job.training.batch_size;
      losses_.resize(static_cast<size_t>(step));
      losses_.push_back(r.loss);
      metrics_.loss.Set(r.loss);
      metrics_.train_accuracy.Set(r.accuracy);
      if (events_.on_step) events_.on_step(r);
    }
  }

  void after_step() {
    if (done_ % opt_.job.checkpoint.every_steps == 0) write_checkpoint(done_);
  }

  void finish_local(int64_t step) {
    if (step != done_) {
      throw std::runtime_error("finish at step " + std::to_string(step) + " but this stage completed " +
                               std::to_string(done_) + " steps");
    }
    if (last_checkpoint_ != done_) write_checkpoint(done_);
  }

  void write_checkpoint(int64_t step) {
    const auto t0 = Clock::now();
    try {
      const size_t bytes = store_->save(step, model_, *optimizer_);
      metrics_.checkpoint_bytes.Set(static_cast<double>(bytes));
    } catch (const std::exception& e) {
      metrics_.checkpoint_failures.Increment();
      throw std::runtime_error(std::string("writing checkpoint of step ") + std::to_string(step) + ": " + e.what());
    }
    observe(metrics_.checkpoint_seconds, t0);
    metrics_.checkpoint_writes.Increment();
    metrics_.checkpoint_step.Set(static_cast<double>(step));
    last_checkpoint_ = step;
    export_.publish(model_, step);
    log::info("checkpoint written", {{"stage", opt_.stage}, {"step", step}, {"path", store_->path_for(step)}});
  }

  void observe(prometheus::Histogram& h, Clock::time_point t0) {
    const double s = seconds_since(t0);
    h.Observe(s);
    compute_seconds_ += s;
  }

  void fill_frame(v1::TensorFrame* f, v1::Phase phase, int64_t step, int m, int epoch, const torch::Tensor& t) {
    f->set_generation(generation_.load());
    f->set_phase(phase);
    f->set_step(step);
    f->set_micro_batch(m);
    f->set_epoch(epoch);
    const auto t0 = Clock::now();
    encode_tensor(t, f->mutable_tensor());
    metrics_.serialise_seconds.Increment(seconds_since(t0));
  }

  void send_down(v1::Phase phase, int64_t step, int m, int epoch, const torch::Tensor& t) {
    v1::ForwardRequest req;
    fill_frame(req.mutable_frame(), phase, step, m, epoch, t);
    down_->send(std::move(req), generation_.load());
  }

  struct ResumeCmd {
    uint64_t generation;
    int64_t step;
    std::shared_ptr<std::promise<std::string>> done;
  };

  StageOptions opt_;
  std::shared_ptr<prometheus::Registry> registry_;
  StageEvents events_;
  StageMetrics metrics_;
  const std::string boot_id_;

  model::ModelDesc desc_;
  model::StageDesc me_;
  int n_ = 0;
  bool first_ = false, last_ = false;
  torch::Device device_{torch::kCPU};
  int micro_ = 0;
  std::vector<PipeOp> schedule_;
  std::vector<int64_t> in_shape_, out_shape_;
  torch::nn::Sequential model_{nullptr};
  ExportService export_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  int64_t parameters_ = 0;
  std::unique_ptr<CheckpointStore> store_;

  BatchPlan plan_;
  std::unique_ptr<BatchSampler> sampler_;
  int64_t total_steps_ = 0;
  torch::Tensor train_x_, test_x_, train_y_, test_y_;

  std::unique_ptr<Peer> prev_, next_;
  std::unique_ptr<Sender<v1::ForwardRequest>> down_;
  std::unique_ptr<Sender<v1::BackwardRequest>> up_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  // Shared between handler threads and the main loop.
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Inbound> fwd_, bwd_;
  std::optional<ResumeCmd> resume_;
  bool abort_ = false;
  bool join_pending_ = false;
  std::set<std::string> members_;
  std::string stop_reason_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> connected_{false};
  uint64_t generation_counter_ = 0;

  // Main-loop state.
  int64_t done_ = 0;
  int64_t resumed_step_ = 0;             // step of the last resume
  Clock::time_point train_start_ = Clock::now();  // when the last resume happened
  int64_t last_checkpoint_ = -1;
  std::vector<double> losses_;
  std::optional<EvalReport> last_eval_;
  int64_t eval_seen_ = 0, eval_correct_ = 0, next_eval_batch_ = 0;
  double compute_seconds_ = 0;
};

StageRunner::StageRunner(StageOptions options, std::shared_ptr<prometheus::Registry> registry, StageEvents events)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(registry), std::move(events))) {}
StageRunner::~StageRunner() = default;
void StageRunner::start() { impl_->start(); }
int StageRunner::port() const { return impl_->port(); }
int64_t StageRunner::parameters() const { return impl_->parameters(); }
StageResult StageRunner::run() { return impl_->run(); }
void StageRunner::stop(const std::string& reason) { impl_->stop(reason); }
void StageRunner::set_neighbours(const std::string& prev, const std::string& next) { impl_->set_neighbours(prev, next); }

}  // namespace shardguard::shardd
