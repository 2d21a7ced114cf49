// A rate-limited work queue with client-go semantics: an item is queued at most
// once; an item being processed that is added again is marked dirty and re-queued
// when done(); delayed adds; per-item exponential backoff and an overall token
// bucket. Metrics use the controller-runtime names (workqueue_*{name}).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace prometheus {
class Registry;
class Gauge;
class Counter;
class Histogram;
}  // namespace prometheus

namespace shardguard::kube {

// Thread-safe in every implementation below.
class RateLimiter {
 public:
  virtual ~RateLimiter();
  // How long to wait before the item is processed again (counts one failure).
  virtual std::chrono::nanoseconds when(const std::string& item) = 0;
  // The item succeeded: reset its failures.
  virtual void forget(const std::string& item) = 0;
  virtual int num_requeues(const std::string& item) = 0;
};

// base * 2^failures, capped at max_delay.
class ItemExponentialFailureRateLimiter : public RateLimiter {
 public:
  explicit ItemExponentialFailureRateLimiter(std::chrono::nanoseconds base = std::chrono::milliseconds(5),
                                             std::chrono::nanoseconds max_delay = std::chrono::seconds(1000));
  // RateLimiter
  std::chrono::nanoseconds when(const std::string& item) override;
  void forget(const std::string& item) override;
  int num_requeues(const std::string& item) override;

 private:
  const std::chrono::nanoseconds base_, max_;
  std::mutex mu_;
  std::map<std::string, int> failures_;
};

// One token bucket for all items: `burst` at once, then `qps` per second.
class BucketRateLimiter : public RateLimiter {
 public:
  explicit BucketRateLimiter(double qps = 10, int burst = 100);
  // RateLimiter
  std::chrono::nanoseconds when(const std::string& item) override;
  void forget(const std::string& item) override {}
  int num_requeues(const std::string& item) override { return 0; }

 private:
  const double qps_;
  const double burst_;
  std::mutex mu_;
  double tokens_;
  std::chrono::steady_clock::time_point last_;
};

// The longest delay of several limiters.
class MaxOfRateLimiter : public RateLimiter {
 public:
  explicit MaxOfRateLimiter(std::vector<std::unique_ptr<RateLimiter>> limiters);
  // RateLimiter
  std::chrono::nanoseconds when(const std::string& item) override;
  void forget(const std::string& item) override;
  int num_requeues(const std::string& item) override;

 private:
  std::vector<std::unique_ptr<RateLimiter>> limiters_;
};

// max(exponential 5 ms .. 1000 s, bucket 10 qps / burst 100), as client-go.
std::unique_ptr<RateLimiter> default_controller_rate_limiter();

class WorkQueue {
 public:
  // registry (optional): workqueue_depth, workqueue_adds_total, workqueue_retries_total,
  // workqueue_queue_duration_seconds, workqueue_work_duration_seconds, label name.
  WorkQueue(std::string name, std::unique_ptr<RateLimiter> limiter,
            prometheus::Registry* registry = nullptr);
  ~WorkQueue();  // shuts down
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  void add(const std::string& item);
  // Adds the item after d (<= 0: now). Several pending delays of one item keep the earliest.
  void add_after(const std::string& item, std::chrono::nanoseconds d);
  void add_rate_limited(const std::string& item);  // add_after(limiter.when(item)); a retry
  void forget(const std::string& item);
  int num_requeues(const std::string& item);

  // Blocks for the next item; nullopt once shut down and the queue is empty.
  std::optional<std::string> get();
  void done(const std::string& item);

  void shut_down();  // wakes every get(); later adds are ignored
  bool shutting_down() const;
  size_t len() const;

 private:
  void delay_loop();
  void add_locked(const std::string& item);

  const std::string name_;
  const std::unique_ptr<RateLimiter> limiter_;

  mutable std::mutex mu_;
  std::condition_variable cv_;        // getters
  std::condition_variable delay_cv_;  // the delay thread
  std::deque<std::string> queue_;
  std::set<std::string> dirty_, processing_;
  std::map<std::string, std::chrono::steady_clock::time_point> added_at_, started_at_;
  bool shutting_down_ = false;

  // Delayed items: item → ready time, and a heap over (ready time, item) with lazy deletion.
  using Waiting = std::pair<std::chrono::steady_clock::time_point, std::string>;
  std::map<std::string, std::chrono::steady_clock::time_point> waiting_;
  std::priority_queue<Waiting, std::vector<Waiting>, std::greater<Waiting>> heap_;
  std::thread delay_thread_;

  prometheus::Gauge* depth_ = nullptr;
  prometheus::Counter* adds_ = nullptr;
  prometheus::Counter* retries_ = nullptr;
  prometheus::Histogram* queue_duration_ = nullptr;
  prometheus::Histogram* work_duration_ = nullptr;
};

}  // namespace shardguard::kube
