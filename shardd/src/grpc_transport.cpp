#include "grpc_transport.h"

#include <google/protobuf/io/coded_stream.h>

#include "shardguard/shardd/tensor_codec.h"
#include "shardguard/shardd/wire_bytes.h"

#include "clock.h"

namespace shardguard::shardd {
namespace {

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

grpc::Status to_grpc(const Status& s) {
  switch (s.code) {
    case Status::kOk: return grpc::Status::OK;
    case Status::kInvalid: return {grpc::StatusCode::INVALID_ARGUMENT, s.message};
    case Status::kRefused: return {grpc::StatusCode::FAILED_PRECONDITION, s.message};
    case Status::kUnavailable: return {grpc::StatusCode::UNAVAILABLE, s.message};
  }
  return {grpc::StatusCode::INTERNAL, s.message};
}

Phase from_proto(v1::Phase p) {
  switch (p) {
    case v1::PHASE_TRAIN: return Phase::kTrain;
    case v1::PHASE_EVAL: return Phase::kEval;
    case v1::PHASE_GENERATE: return Phase::kGenerate;
    default: return Phase::kUnspecified;
  }
}

v1::Phase to_proto(Phase p) {
  switch (p) {
    case Phase::kTrain: return v1::PHASE_TRAIN;
    case Phase::kEval: return v1::PHASE_EVAL;
    case Phase::kGenerate: return v1::PHASE_GENERATE;
    default: return v1::PHASE_UNSPECIFIED;
  }
}

// A received tensor, decoded in place (without another copy) once the engine
// says what it expects. Valid while the handler that made it runs.
class ProtoTensor final : public TensorPayload {
 public:
  explicit ProtoTensor(v1::Tensor* msg) : msg_(msg) {}
  torch::Tensor take(const std::vector<int64_t>& sample_shape, int64_t max_batch) override {
    return decode_tensor(msg_, sample_shape, max_batch);
  }

 private:
  v1::Tensor* msg_;
};

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

}  // namespace

// A neighbour: a stub plus retry-with-backoff for calls that must get through.
class GrpcPeer {
 public:
  GrpcPeer(const std::string& name, const std::string& address, double budget_s, WireByteCounters wire)
      : retrier(name + " at " + address, budget_s), stub_(v1::Pipeline::NewStub(make_channel(address, wire))) {}

  // fn(stub, ctx) makes one call; each attempt has its own deadline.
  template <class Fn>
  std::string call(Fn fn, const std::function<bool()>& cancelled, double deadline_s) {
    return retrier.call(
        [&] {
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::milliseconds(static_cast<int64_t>(deadline_s * 1000)));
          const grpc::Status s = fn(*stub_, &ctx);
          return Attempt{s.ok(), retryable(s), s.error_message()};
        },
        cancelled);
  }

  Retrier retrier;

 private:
  std::unique_ptr<v1::Pipeline::Stub> stub_;
};

GrpcTransport::GrpcTransport(GrpcLinkOptions options, StageMetrics& metrics)
    : opt_(std::move(options)), metrics_(metrics) {}

GrpcTransport::~GrpcTransport() { close(); }

int GrpcTransport::listen(const std::vector<grpc::Service*>& services) {
  int port = 0;
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(-1);
  builder.SetMaxSendMessageSize(-1);
  builder.AddListeningPort(opt_.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(this);
  for (auto* s : services) builder.RegisterService(s);
  builder.experimental().SetInterceptorCreators(
      wire_byte_server_interceptors({&metrics_.message_bytes_sent, &metrics_.message_bytes_received}));
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) {
    throw std::runtime_error("--listen: cannot listen on " + opt_.listen + " (address in use or invalid)");
  }
  return port;
}

void GrpcTransport::set_neighbours(const std::string& prev, const std::string& next) {
  opt_.prev = prev;
  opt_.next = next;
}

// Lazily: gRPC channels connect on first use.
void GrpcTransport::connect(const LinkPlan& plan) {
  const bool first = plan.stage == 0, last = plan.stage == plan.stages - 1;
  if (!first && opt_.prev.empty()) throw std::invalid_argument("--prev is required for stage " + std::to_string(plan.stage));
  if (!last && opt_.next.empty()) throw std::invalid_argument("--next is required for stage " + std::to_string(plan.stage));
  stages_ = plan.stages;
  const WireByteCounters wire{&metrics_.message_bytes_sent, &metrics_.message_bytes_received};
  std::lock_guard<std::mutex> lock(peers_mu_);
  if (!first) {
    prev_ = std::make_unique<GrpcPeer>("stage " + std::to_string(plan.stage - 1), opt_.prev, opt_.retry_budget_s, wire);
    up_ = std::make_unique<LinkSender>(*receiver_, prev_->retrier, metrics_, plan.max_queued);
  }
  if (!last) {
    next_ = std::make_unique<GrpcPeer>("stage " + std::to_string(plan.stage + 1), opt_.next, opt_.retry_budget_s, wire);
    down_ = std::make_unique<LinkSender>(*receiver_, next_->retrier, metrics_, plan.max_queued);
  }
}

// Encoded here, on the engine's thread: the copy is what the engine may drop.
void GrpcTransport::encode(const OutFrame& frame, v1::TensorFrame* out) {
  out->set_generation(frame.header.generation);
  out->set_phase(to_proto(frame.header.phase));
  out->set_step(frame.header.step);
  out->set_micro_batch(frame.header.micro_batch);
  out->set_epoch(frame.header.epoch);
  out->set_position(frame.header.position);
  const auto t0 = Clock::now();
  encode_tensor(frame.tensor, out->mutable_tensor());
  metrics_.serialise_seconds.Increment(seconds_since(t0));
}

namespace {

// One delivery of `req` through `rpc` with the peer's retries: what a LinkSender runs.
template <typename Req, typename Reply>
std::function<std::string(const std::function<bool()>&)> deliver(
    GrpcPeer* peer, std::shared_ptr<Req> req,
    grpc::Status (v1::Pipeline::Stub::*rpc)(grpc::ClientContext*, const Req&, Reply*), double deadline_s) {
  return [peer, req, rpc, deadline_s](const std::function<bool()>& stale) {
    return peer->call(
        [&](v1::Pipeline::Stub& stub, grpc::ClientContext* ctx) {
          Reply reply;
          return (stub.*rpc)(ctx, *req, &reply);
        },
        stale, deadline_s);
  };
}

}  // namespace

void GrpcTransport::send_down(OutFrame frame) {
  auto req = std::make_shared<v1::ForwardRequest>();
  encode(frame, req->mutable_frame());
  const double bytes = static_cast<double>(req->ByteSizeLong());
  down_->send({frame.header.generation,
               deliver(next_.get(), std::move(req), &v1::Pipeline::Stub::Forward, opt_.peer_timeout_s), bytes});
}

void GrpcTransport::send_up(OutFrame frame) {
  auto req = std::make_shared<v1::BackwardRequest>();
  encode(frame, req->mutable_frame());
  const double bytes = static_cast<double>(req->ByteSizeLong());
  up_->send({frame.header.generation,
             deliver(prev_.get(), std::move(req), &v1::Pipeline::Stub::Backward, opt_.peer_timeout_s), bytes});
}

void GrpcTransport::send_join(const JoinMsg& msg) {
  auto req = std::make_shared<v1::BackwardRequest>();
  req->mutable_join()->set_stage(msg.stage);
  req->mutable_join()->set_boot_id(msg.boot_id);
  up_->send({receiver_->generation(),
             deliver(prev_.get(), std::move(req), &v1::Pipeline::Stub::Backward, opt_.peer_timeout_s), std::nullopt});
}

void GrpcTransport::flush_down() {
  if (down_) down_->flush();
}

// Sync, Resume and Finish wait for the rest of the chain: their deadline covers
// every stage after this one retrying its own neighbour.
std::string GrpcTransport::control_down(const v1::ForwardRequest& req, v1::ForwardReply* reply) {
  return next_->call(
      [&](v1::Pipeline::Stub& stub, grpc::ClientContext* ctx) { return stub.Forward(ctx, req, reply); },
      [this] { return receiver_->stopping(); }, opt_.retry_budget_s * (stages_ + 1) + opt_.peer_timeout_s);
}

std::string GrpcTransport::sync(const SyncMsg& msg, SyncReply* reply) {
  v1::ForwardRequest req;
  auto* sync = req.mutable_sync();
  sync->set_generation(msg.generation);
  for (auto s : msg.steps) sync->add_steps(s);
  for (const auto& id : msg.boot_ids) sync->add_boot_ids(id);
  v1::ForwardReply r;
  const std::string err = control_down(req, &r);
  if (err.empty()) {
    reply->steps.assign(r.steps().begin(), r.steps().end());
    reply->boot_ids.assign(r.boot_ids().begin(), r.boot_ids().end());
  }
  return err;
}

std::string GrpcTransport::resume(const ResumeMsg& msg) {
  v1::ForwardRequest req;
  req.mutable_resume()->set_generation(msg.generation);
  req.mutable_resume()->set_step(msg.step);
  req.mutable_resume()->set_schedule_steps(msg.schedule_steps);
  v1::ForwardReply reply;
  return control_down(req, &reply);
}

std::string GrpcTransport::finish(const FinishMsg& msg) {
  v1::ForwardRequest req;
  req.mutable_finish()->set_generation(msg.generation);
  req.mutable_finish()->set_step(msg.step);
  v1::ForwardReply reply;
  return control_down(req, &reply);
}

void GrpcTransport::wake() {
  std::lock_guard<std::mutex> lock(peers_mu_);
  if (prev_) prev_->retrier.wake();
  if (next_) next_->retrier.wake();
}

void GrpcTransport::close() {
  if (server_) {  // first: handlers may still use the senders
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_.reset();
  }
  closed_seconds_ = transport_seconds();
  down_.reset();
  up_.reset();
}

double GrpcTransport::transport_seconds() const {
  if (!down_ && !up_) return closed_seconds_;
  return (down_ ? down_->transport_seconds() : 0) + (up_ ? up_->transport_seconds() : 0);
}

// ---- Pipeline service --------------------------------------------------------------
grpc::Status GrpcTransport::Forward(grpc::ServerContext*, const v1::ForwardRequest* req, v1::ForwardReply* reply) {
  switch (req->body_case()) {
    case v1::ForwardRequest::kFrame:
      return deliver_frame(const_cast<v1::TensorFrame*>(&req->frame()), Direction::kForward);
    case v1::ForwardRequest::kSync: {
      const auto& s = req->sync();
      SyncReply r;
      const Status st = receiver_->on_sync(
          {s.generation(), {s.steps().begin(), s.steps().end()}, {s.boot_ids().begin(), s.boot_ids().end()}}, &r);
      for (auto step : r.steps) reply->add_steps(step);
      for (const auto& id : r.boot_ids) reply->add_boot_ids(id);
      return to_grpc(st);
    }
    case v1::ForwardRequest::kResume:
      return to_grpc(receiver_->on_resume({req->resume().generation(), req->resume().step(), req->resume().schedule_steps()}));
    case v1::ForwardRequest::kFinish:
      return to_grpc(receiver_->on_finish({req->finish().generation(), req->finish().step()}));
    default:
      return {grpc::StatusCode::INVALID_ARGUMENT, "empty ForwardRequest"};
  }
}

grpc::Status GrpcTransport::Backward(grpc::ServerContext*, const v1::BackwardRequest* req, v1::BackwardReply*) {
  if (req->has_frame()) return deliver_frame(const_cast<v1::TensorFrame*>(&req->frame()), Direction::kBackward);
  if (req->has_join()) return to_grpc(receiver_->on_join({req->join().stage(), req->join().boot_id()}));
  return {grpc::StatusCode::INVALID_ARGUMENT, "empty BackwardRequest"};
}

// The tensor is decoded out of the request itself (the engine checks it first).
grpc::Status GrpcTransport::deliver_frame(v1::TensorFrame* frame, Direction direction) {
  // The request's size on the wire: the frame plus its one-byte oneof tag and length.
  const size_t size = frame->ByteSizeLong();
  metrics_.bytes_received.Increment(
      static_cast<double>(size + 1 + google::protobuf::io::CodedOutputStream::VarintSize64(size)));
  InFrame in;
  in.header = {frame->generation(), from_proto(frame->phase()), frame->step(), static_cast<int>(frame->micro_batch()),
               static_cast<int>(frame->epoch()), static_cast<int>(frame->position())};
  in.payload = std::make_unique<ProtoTensor>(frame->mutable_tensor());
  return to_grpc(receiver_->on_frame(direction, std::move(in)));
}

}  // namespace shardguard::shardd
