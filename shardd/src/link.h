// What both transports (grpc_transport.cpp, memory_transport.cpp) do the same
// way on a link to one neighbour: retries with backoff, and an ordered, bounded
// sender thread that drops messages of an older generation.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <mutex>
#include <string>
#include <thread>

#include "shardguard/shardd/metrics.h"
#include "shardguard/shardd/transport.h"

namespace shardguard::shardd {

// The outcome of one attempt to deliver a message.
struct Attempt {
  bool ok = false;
  bool retryable = false;  // the neighbour is not there (yet): try again after a backoff
  std::string error;
};

// Retries calls to one neighbour: backoff from 50 ms doubling up to 2 s, until
// the budget would be exceeded.
class Retrier {
 public:
  // who: "stage 1 at 127.0.0.1:7001", as it appears in the stage's stop reason.
  Retrier(std::string who, double budget_s) : who_(std::move(who)), budget_s_(budget_s) {}

  // Calls attempt until it succeeds, fails for good, `cancelled()` turns true,
  // or the budget is spent. Returns "" on success, "cancelled", or the reason.
  std::string call(const std::function<Attempt()>& attempt, const std::function<bool()>& cancelled);
  // Cuts the current backoff short (the caller's cancelled() is asked again).
  void wake() { cv_.notify_all(); }

 private:
  const std::string who_;
  const double budget_s_;
  std::mutex mu_;
  std::condition_variable cv_;
};

// Sends messages to one neighbour in order from its own thread, so compute
// never waits on the network. A message of another generation than the
// receiver's current one is dropped instead of sent.
class LinkSender {
 public:
  struct Message {
    uint64_t generation = 0;
    // Delivers the message (with the link's retries; `stale` cancels them):
    // "" on success, "cancelled", or why the link failed for good.
    std::function<std::string(const std::function<bool()>& stale)> deliver;
    // A frame's tensor bytes: counted in bytes_sent and frames_sent once delivered.
    // nullopt for control messages (joins), which are not frames.
    std::optional<double> frame_bytes;
  };

  LinkSender(Receiver& receiver, Retrier& retrier, StageMetrics& metrics, size_t max_queued);
  ~LinkSender();
  LinkSender(const LinkSender&) = delete;
  LinkSender& operator=(const LinkSender&) = delete;

  // Queues a message; blocks while `max_queued` are waiting, so a slow neighbour
  // holds the producer back instead of letting memory grow.
  void send(Message message);
  // Waits until everything queued so far went out (or was dropped, or the link failed).
  void flush();
  double transport_seconds() const { return transport_seconds_.load(); }

 private:
  void loop();
  bool is_stopping();

  Receiver& receiver_;
  Retrier& retrier_;
  StageMetrics& metrics_;
  const size_t max_queued_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Message> queue_;
  bool busy_ = false;
  bool stopping_ = false;
  bool failed_ = false;
  std::atomic<double> transport_seconds_{0};
  std::thread thread_;
};

}  // namespace shardguard::shardd
