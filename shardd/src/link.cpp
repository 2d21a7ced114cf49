#include "link.h"

#include <algorithm>
#include <chrono>

#include "clock.h"

namespace shardguard::shardd {

std::string Retrier::call(const std::function<Attempt()>& attempt, const std::function<bool()>& cancelled) {
  const auto start = Clock::now();
  std::chrono::milliseconds backoff(50);
  for (int n = 1;; ++n) {
    if (cancelled()) return "cancelled";
    const Attempt last = attempt();
    if (last.ok) return "";
    if (!last.retryable) return who_ + " refused the call: " + last.error;
    if (seconds_since(start) + backoff.count() / 1000.0 > budget_s_) {
      return who_ + " unreachable for " + std::to_string(static_cast<int>(budget_s_)) + " s after " +
             std::to_string(n) + " attempts (last error: " + last.error + ")";
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, backoff, [&] { return cancelled(); });
    backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
  }
}

LinkSender::LinkSender(Receiver& receiver, Retrier& retrier, StageMetrics& metrics, size_t max_queued)
    : receiver_(receiver), retrier_(retrier), metrics_(metrics), max_queued_(max_queued),
      thread_([this] { loop(); }) {}

LinkSender::~LinkSender() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  retrier_.wake();
  thread_.join();
}

void LinkSender::send(Message message) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return queue_.size() < max_queued_ || stopping_ || failed_; });
    queue_.push_back(std::move(message));
  }
  cv_.notify_all();
}

void LinkSender::flush() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return (queue_.empty() && !busy_) || stopping_ || failed_; });
}

bool LinkSender::is_stopping() {
  std::lock_guard<std::mutex> lock(mu_);
  return stopping_;
}

void LinkSender::loop() {
  for (;;) {
    Message item;
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
    auto stale = [&] { return item.generation != receiver_.generation() || is_stopping(); };
    std::string err = "cancelled";  // stale before its turn: dropped unsent
    if (!stale()) err = item.deliver(stale);
    const double took = seconds_since(start);
    transport_seconds_.store(transport_seconds_.load() + took);
    if (err.empty()) {
      metrics_.transport_seconds.Increment(took);
      if (item.frame_bytes) {
        metrics_.bytes_sent.Increment(*item.frame_bytes);
        metrics_.frames_sent.Increment();
      }
    } else if (err != "cancelled") {
      receiver_.link_failed(err);
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

}  // namespace shardguard::shardd
