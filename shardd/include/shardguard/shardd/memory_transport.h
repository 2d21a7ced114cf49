// A Transport without sockets: a whole pipeline of engines in one process, each
// stage's transport handing frames and control messages straight to its
// neighbours' engines. Frames still go through a sender thread per direction
// (bounded, ordered, generation-checked, like the gRPC transport), and control
// calls are retried while the neighbour is not running yet, so the engines see
// the same protocol as between processes. For tests of the engine
// (tests/shardd/engine_test.cpp); shardd itself uses the gRPC transport.
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "shardguard/shardd/metrics.h"
#include "shardguard/shardd/transport.h"

namespace shardguard::shardd {

struct Attempt;  // link.h

// Where the stages of one in-process pipeline find each other.
class MemoryNetwork {
 public:
  explicit MemoryNetwork(int stages);

 private:
  friend class MemoryTransport;
  struct Slot {
    Receiver* receiver = nullptr;  // null: not attached (yet, or any more)
    StageMetrics* metrics = nullptr;
    int calls = 0;                 // calls into receiver in progress
  };
  // While a Call lives, the stage's receiver is not detached.
  class Call {
   public:
    Call(MemoryNetwork& network, int stage);
    ~Call();
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;
    Slot* slot() const { return slot_; }  // null when nobody is attached there

   private:
    MemoryNetwork& network_;
    Slot* slot_ = nullptr;
  };
  void attach(int stage, Receiver& receiver, StageMetrics& metrics);
  // Nothing calls `receiver` once this returns (a stage may be attached again,
  // by a new engine: a restart).
  void detach(int stage, Receiver& receiver);

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;
};

class MemoryTransport final : public Transport {
 public:
  // retry_budget_s: how long a neighbour that is not running yet is retried.
  MemoryTransport(MemoryNetwork& network, int stage, StageMetrics& metrics, double retry_budget_s = 60);
  ~MemoryTransport() override;

  void attach(Receiver& receiver) override;
  void connect(const LinkPlan& plan) override;
  void send_down(OutFrame frame) override;
  void send_up(OutFrame frame) override;
  void send_join(const JoinMsg& msg) override;
  void flush_down() override;
  std::string sync(const SyncMsg& msg, SyncReply* reply) override;
  std::string resume(const ResumeMsg& msg) override;
  std::string finish(const FinishMsg& msg) override;
  void wake() override;
  void close() override;
  double transport_seconds() const override;

 private:
  struct Links;
  Attempt attempt(int to, const std::function<Status(Receiver&, StageMetrics&)>& fn);
  void send_frame(Direction direction, OutFrame frame);
  std::string call_next(const std::function<Status(Receiver&)>& fn);
  MemoryNetwork& network_;
  const int stage_;
  StageMetrics& metrics_;
  const double retry_budget_s_;
  Receiver* receiver_ = nullptr;
  std::unique_ptr<Links> links_;
  double closed_seconds_ = 0;
};

}  // namespace shardguard::shardd
