#include "shardguard/shardd/memory_transport.h"

#include "link.h"

namespace shardguard::shardd {
namespace {

// A tensor handed over in memory: checked like a decoded wire tensor.
class MemoryTensor final : public TensorPayload {
 public:
  explicit MemoryTensor(torch::Tensor t) : t_(std::move(t)) {}
  torch::Tensor take(const std::vector<int64_t>& sample_shape, int64_t max_batch) override {
    check_frame_shape(t_.scalar_type() == torch::kFloat32 ? "float32" : "unspecified", t_.sizes().vec(),
                      sample_shape, max_batch);
    return t_;
  }

 private:
  torch::Tensor t_;
};

double tensor_bytes(const torch::Tensor& t) { return static_cast<double>(t.numel()) * sizeof(float); }

}  // namespace

// ---- MemoryNetwork -------------------------------------------------------------------
MemoryNetwork::MemoryNetwork(int stages) : slots_(static_cast<size_t>(stages)) {}

MemoryNetwork::Call::Call(MemoryNetwork& network, int stage) : network_(network) {
  std::lock_guard<std::mutex> lock(network_.mu_);
  if (stage < 0 || stage >= static_cast<int>(network_.slots_.size())) return;
  Slot& s = network_.slots_[static_cast<size_t>(stage)];
  if (!s.receiver) return;
  ++s.calls;
  slot_ = &s;
}

MemoryNetwork::Call::~Call() {
  if (!slot_) return;
  {
    std::lock_guard<std::mutex> lock(network_.mu_);
    --slot_->calls;
  }
  network_.cv_.notify_all();
}

void MemoryNetwork::attach(int stage, Receiver& receiver, StageMetrics& metrics) {
  std::lock_guard<std::mutex> lock(mu_);
  Slot& s = slots_.at(static_cast<size_t>(stage));
  s.receiver = &receiver;
  s.metrics = &metrics;
}

// Calls in progress end on their own: a stopping engine answers at once.
void MemoryNetwork::detach(int stage, Receiver& receiver) {
  std::unique_lock<std::mutex> lock(mu_);
  Slot& s = slots_.at(static_cast<size_t>(stage));
  if (s.receiver != &receiver) return;  // a newer engine of the same stage (a restart), or nobody
  s.receiver = nullptr;
  cv_.wait(lock, [&] { return s.calls == 0; });
}

// ---- MemoryTransport --------------------------------------------------------------------
struct MemoryTransport::Links {
  std::unique_ptr<Retrier> prev, next;
  std::unique_ptr<LinkSender> up, down;
};

MemoryTransport::MemoryTransport(MemoryNetwork& network, int stage, StageMetrics& metrics, double retry_budget_s)
    : network_(network), stage_(stage), metrics_(metrics), retry_budget_s_(retry_budget_s),
      links_(std::make_unique<Links>()) {}

MemoryTransport::~MemoryTransport() { close(); }

void MemoryTransport::attach(Receiver& receiver) {
  receiver_ = &receiver;
  network_.attach(stage_, receiver, metrics_);
}

void MemoryTransport::connect(const LinkPlan& plan) {
  if (stage_ > 0) {
    links_->prev = std::make_unique<Retrier>("stage " + std::to_string(stage_ - 1), retry_budget_s_);
    links_->up = std::make_unique<LinkSender>(*receiver_, *links_->prev, metrics_, plan.max_queued);
  }
  if (stage_ < plan.stages - 1) {
    links_->next = std::make_unique<Retrier>("stage " + std::to_string(stage_ + 1), retry_budget_s_);
    links_->down = std::make_unique<LinkSender>(*receiver_, *links_->next, metrics_, plan.max_queued);
  }
}

// One attempt at calling `fn` on stage `to`'s engine; a stage nobody attached
// is like a server that is not listening: retried.
Attempt MemoryTransport::attempt(int to, const std::function<Status(Receiver&, StageMetrics&)>& fn) {
  MemoryNetwork::Call call(network_, to);
  if (!call.slot()) return {false, true, "stage " + std::to_string(to) + " is not attached"};
  const Status s = fn(*call.slot()->receiver, *call.slot()->metrics);
  return {s.ok(), s.code == Status::kUnavailable, s.message};
}

// Copied now, on the engine's thread, as the gRPC transport encodes there: the
// receiving engine gets its own CPU float32 tensor.
void MemoryTransport::send_frame(Direction direction, OutFrame frame) {
  const bool forward = direction == Direction::kForward;
  const auto t = frame.tensor.detach().to(torch::kCPU, torch::kFloat32).clone(at::MemoryFormat::Contiguous);
  const FrameHeader h = frame.header;
  const int to = forward ? stage_ + 1 : stage_ - 1;
  Retrier& retrier = forward ? *links_->next : *links_->prev;
  LinkSender& sender = forward ? *links_->down : *links_->up;
  sender.send({h.generation,
               [this, t, h, to, direction, &retrier](const std::function<bool()>& stale) {
                 return retrier.call(
                     [&] {
                       return attempt(to, [&](Receiver& r, StageMetrics& m) {
                         m.bytes_received.Increment(tensor_bytes(t));
                         return r.on_frame(direction, {h, std::make_unique<MemoryTensor>(t)});
                       });
                     },
                     stale);
               },
               tensor_bytes(t)});
}

void MemoryTransport::send_down(OutFrame frame) { send_frame(Direction::kForward, std::move(frame)); }
void MemoryTransport::send_up(OutFrame frame) { send_frame(Direction::kBackward, std::move(frame)); }

void MemoryTransport::send_join(const JoinMsg& msg) {
  const int to = stage_ - 1;
  Retrier& retrier = *links_->prev;
  links_->up->send({receiver_->generation(),
                    [this, msg, to, &retrier](const std::function<bool()>& stale) {
                      return retrier.call(
                          [&] { return attempt(to, [&](Receiver& r, StageMetrics&) { return r.on_join(msg); }); },
                          stale);
                    },
                    std::nullopt});
}

void MemoryTransport::flush_down() {
  if (links_->down) links_->down->flush();
}

// Control calls run on the caller's thread, into the next engine's handler.
std::string MemoryTransport::call_next(const std::function<Status(Receiver&)>& fn) {
  return links_->next->call([&] { return attempt(stage_ + 1, [&](Receiver& r, StageMetrics&) { return fn(r); }); },
                            [this] { return receiver_->stopping(); });
}

std::string MemoryTransport::sync(const SyncMsg& msg, SyncReply* reply) {
  return call_next([&](Receiver& r) { return r.on_sync(msg, reply); });
}

std::string MemoryTransport::resume(const ResumeMsg& msg) {
  return call_next([&](Receiver& r) { return r.on_resume(msg); });
}

std::string MemoryTransport::finish(const FinishMsg& msg) {
  return call_next([&](Receiver& r) { return r.on_finish(msg); });
}

void MemoryTransport::wake() {
  if (links_->prev) links_->prev->wake();
  if (links_->next) links_->next->wake();
}

void MemoryTransport::close() {
  if (receiver_) network_.detach(stage_, *receiver_);  // first: neighbours' calls may still use the senders
  closed_seconds_ = transport_seconds();
  links_->down.reset();
  links_->up.reset();
}

double MemoryTransport::transport_seconds() const {
  if (!links_->down && !links_->up) return closed_seconds_;
  return (links_->down ? links_->down->transport_seconds() : 0) + (links_->up ? links_->up->transport_seconds() : 0);
}

}  // namespace shardguard::shardd
