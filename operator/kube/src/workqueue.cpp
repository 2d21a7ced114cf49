#include "shardguard/kube/workqueue.h"

#include <algorithm>
#include <cmath>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace shardguard::kube {

using std::chrono::nanoseconds;
using Clock = std::chrono::steady_clock;

RateLimiter::~RateLimiter() = default;

// ---- ItemExponentialFailureRateLimiter ----------------------------------------

ItemExponentialFailureRateLimiter::ItemExponentialFailureRateLimiter(nanoseconds base, nanoseconds max_delay)
    : base_(base), max_(max_delay) {}

nanoseconds ItemExponentialFailureRateLimiter::when(const std::string& item) {
  std::lock_guard<std::mutex> lock(mu_);
  const int exp = failures_[item]++;
  // Computed in floating point so that a large exponent caps instead of overflowing.
  const double delay = static_cast<double>(base_.count()) * std::pow(2.0, exp);
  if (delay >= static_cast<double>(max_.count())) return max_;
  return nanoseconds(static_cast<int64_t>(delay));
}

void ItemExponentialFailureRateLimiter::forget(const std::string& item) {
  std::lock_guard<std::mutex> lock(mu_);
  failures_.erase(item);
}

int ItemExponentialFailureRateLimiter::num_requeues(const std::string& item) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = failures_.find(item);
  return it == failures_.end() ? 0 : it->second;
}

// ---- BucketRateLimiter --------------------------------------------------------

BucketRateLimiter::BucketRateLimiter(double qps, int burst)
    : qps_(qps > 0 ? qps : 1e-9), burst_(burst > 0 ? burst : 1), tokens_(burst_), last_(Clock::now()) {}

nanoseconds BucketRateLimiter::when(const std::string&) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = Clock::now();
  const double elapsed = std::chrono::duration<double>(now - last_).count();
  last_ = now;
  tokens_ = std::min(burst_, tokens_ + elapsed * qps_);
  tokens_ -= 1;  // a reservation: may go negative, the wait pays it back
  if (tokens_ >= 0) return nanoseconds(0);
  return nanoseconds(static_cast<int64_t>(-tokens_ / qps_ * 1e9));
}

// ---- MaxOfRateLimiter ---------------------------------------------------------

MaxOfRateLimiter::MaxOfRateLimiter(std::vector<std::unique_ptr<RateLimiter>> limiters)
    : limiters_(std::move(limiters)) {}

nanoseconds MaxOfRateLimiter::when(const std::string& item) {
  nanoseconds longest(0);
  for (auto& l : limiters_) longest = std::max(longest, l->when(item));
  return longest;
}

void MaxOfRateLimiter::forget(const std::string& item) {
  for (auto& l : limiters_) l->forget(item);
}

int MaxOfRateLimiter::num_requeues(const std::string& item) {
  int most = 0;
  for (auto& l : limiters_) most = std::max(most, l->num_requeues(item));
  return most;
}

std::unique_ptr<RateLimiter> default_controller_rate_limiter() {
  std::vector<std::unique_ptr<RateLimiter>> v;
  v.push_back(std::make_unique<ItemExponentialFailureRateLimiter>(std::chrono::milliseconds(5), std::chrono::seconds(1000)));
  v.push_back(std::make_unique<BucketRateLimiter>(10, 100));
  return std::make_unique<MaxOfRateLimiter>(std::move(v));
}

// ---- WorkQueue ----------------------------------------------------------------

namespace {
prometheus::Histogram::BucketBoundaries duration_buckets() {
  // 10 ns .. 10 s by factors of 10, as client-go's workqueue metrics.
  prometheus::Histogram::BucketBoundaries b;
  double v = 1e-8;
  for (int i = 0; i < 10; ++i, v *= 10) b.push_back(v);
  return b;
}
double seconds_since(Clock::time_point t, Clock::time_point now) {
  return std::chrono::duration<double>(now - t).count();
}
}  // namespace

WorkQueue::WorkQueue(std::string name, std::unique_ptr<RateLimiter> limiter, prometheus::Registry* registry)
    : name_(std::move(name)), limiter_(limiter ? std::move(limiter) : default_controller_rate_limiter()) {
  if (registry) {
    const prometheus::Labels labels{{"name", name_}};
    depth_ = &prometheus::BuildGauge().Name("workqueue_depth").Help("Current depth of workqueue")
                  .Register(*registry).Add(labels);
    adds_ = &prometheus::BuildCounter().Name("workqueue_adds_total").Help("Total number of adds handled by workqueue")
                 .Register(*registry).Add(labels);
    retries_ = &prometheus::BuildCounter().Name("workqueue_retries_total").Help("Total number of retries handled by workqueue")
                    .Register(*registry).Add(labels);
    queue_duration_ = &prometheus::BuildHistogram().Name("workqueue_queue_duration_seconds")
                           .Help("How long in seconds an item stays in workqueue before being requested")
                           .Register(*registry).Add(labels, duration_buckets());
    work_duration_ = &prometheus::BuildHistogram().Name("workqueue_work_duration_seconds")
                          .Help("How long in seconds processing an item from workqueue takes")
                          .Register(*registry).Add(labels, duration_buckets());
  }
  delay_thread_ = std::thread([this] { delay_loop(); });
}

WorkQueue::~WorkQueue() {
  shut_down();
  if (delay_thread_.joinable()) delay_thread_.join();
}

void WorkQueue::add_locked(const std::string& item) {
  if (shutting_down_) return;
  if (!dirty_.insert(item).second) return;  // already queued (or dirty while processing)
  if (adds_) adds_->Increment();
  added_at_.emplace(item, Clock::now());
  if (processing_.count(item)) return;  // re-queued by done()
  queue_.push_back(item);
  if (depth_) depth_->Set(static_cast<double>(queue_.size()));
  cv_.notify_one();
}

void WorkQueue::add(const std::string& item) {
  std::lock_guard<std::mutex> lock(mu_);
  add_locked(item);
}

void WorkQueue::add_after(const std::string& item, nanoseconds d) {
  std::lock_guard<std::mutex> lock(mu_);
  if (shutting_down_) return;
  if (d <= nanoseconds(0)) {
    add_locked(item);
    return;
  }
  const auto ready = Clock::now() + d;
  auto it = waiting_.find(item);
  if (it != waiting_.end() && it->second <= ready) return;  // an earlier add is pending
  waiting_[item] = ready;
  heap_.emplace(ready, item);
  delay_cv_.notify_one();
}

void WorkQueue::add_rate_limited(const std::string& item) {
  if (retries_) retries_->Increment();
  add_after(item, limiter_->when(item));
}

void WorkQueue::forget(const std::string& item) { limiter_->forget(item); }

int WorkQueue::num_requeues(const std::string& item) { return limiter_->num_requeues(item); }

std::optional<std::string> WorkQueue::get() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !queue_.empty() || shutting_down_; });
  if (queue_.empty()) return std::nullopt;
  std::string item = std::move(queue_.front());
  queue_.pop_front();
  const auto now = Clock::now();
  if (depth_) depth_->Set(static_cast<double>(queue_.size()));
  const auto added = added_at_.find(item);
  if (added != added_at_.end()) {
    if (queue_duration_) queue_duration_->Observe(seconds_since(added->second, now));
    added_at_.erase(added);
  }
  started_at_[item] = now;
  processing_.insert(item);
  dirty_.erase(item);
  return item;
}

void WorkQueue::done(const std::string& item) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto started = started_at_.find(item);
  if (started != started_at_.end()) {
    if (work_duration_) work_duration_->Observe(seconds_since(started->second, Clock::now()));
    started_at_.erase(started);
  }
  processing_.erase(item);
  if (dirty_.count(item)) {
    queue_.push_back(item);
    if (depth_) depth_->Set(static_cast<double>(queue_.size()));
    cv_.notify_one();
  }
}

void WorkQueue::shut_down() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_ = true;
  }
  cv_.notify_all();
  delay_cv_.notify_all();
}

bool WorkQueue::shutting_down() const {
  std::lock_guard<std::mutex> lock(mu_);
  return shutting_down_;
}

size_t WorkQueue::len() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size();
}

void WorkQueue::delay_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!shutting_down_) {
    const auto now = Clock::now();
    while (!heap_.empty() && heap_.top().first <= now) {
      Waiting w = heap_.top();
      heap_.pop();
      const auto it = waiting_.find(w.second);
      if (it == waiting_.end() || it->second != w.first) continue;  // superseded by an earlier add
      waiting_.erase(it);
      add_locked(w.second);
    }
    if (heap_.empty()) {
      delay_cv_.wait(lock);
    } else {
      // A copy: wait_until keeps reading its deadline while the lock is released, and
      // an add_after() meanwhile may reallocate the heap under a reference.
      const Clock::time_point next = heap_.top().first;
      delay_cv_.wait_until(lock, next);
    }
  }
}

}  // namespace shardguard::kube
