#include "shardguard/kube/workqueue.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include "support/wait.h"

namespace shardguard::kube {
namespace {

using namespace std::chrono_literals;
using testsupport::eventually;
using testsupport::registry_sum;

std::unique_ptr<RateLimiter> fast_limiter() {
  return std::make_unique<ItemExponentialFailureRateLimiter>(1ms, 10ms);
}

// get() once an item is there (bounded), so that a bug fails instead of hanging.
std::optional<std::string> get_soon(WorkQueue& q, std::chrono::milliseconds limit = 5s) {
  if (!eventually([&] { return q.len() > 0; }, limit)) return std::nullopt;
  return q.get();
}

TEST(WorkQueueTest, AddDeduplicatesQueuedItems) {
  WorkQueue q("t", fast_limiter());
  q.add("a");
  q.add("a");
  q.add("b");
  q.add("a");
  EXPECT_EQ(q.len(), 2u);
  EXPECT_EQ(q.get(), "a");
  EXPECT_EQ(q.get(), "b");
  EXPECT_EQ(q.len(), 0u);
}

TEST(WorkQueueTest, ItemAddedWhileProcessingIsRequeuedOnDone) {
  WorkQueue q("t", fast_limiter());
  q.add("a");
  ASSERT_EQ(q.get(), "a");
  q.add("a");  // dirty, not queued: no second worker may get it
  q.add("a");
  EXPECT_EQ(q.len(), 0u);
  q.done("a");
  EXPECT_EQ(q.len(), 1u);
  EXPECT_EQ(q.get(), "a");
  q.done("a");
  EXPECT_EQ(q.len(), 0u);
}

TEST(WorkQueueTest, DoneWithoutReAddDoesNotRequeue) {
  WorkQueue q("t", fast_limiter());
  q.add("a");
  ASSERT_EQ(q.get(), "a");
  q.done("a");
  EXPECT_EQ(q.len(), 0u);
  q.add("a");
  EXPECT_EQ(q.len(), 1u);
}

TEST(WorkQueueTest, AddAfterDeliversInReadyOrder) {
  WorkQueue q("t", fast_limiter());
  q.add_after("late", 150ms);
  q.add_after("soon", 30ms);
  q.add_after("now", 0ms);  // <= 0: added at once
  EXPECT_EQ(q.len(), 1u);
  EXPECT_EQ(get_soon(q), "now");
  EXPECT_EQ(get_soon(q), "soon");
  EXPECT_EQ(get_soon(q), "late");
}

TEST(WorkQueueTest, AddAfterKeepsTheEarliestOfSeveralDelays) {
  WorkQueue q("t", fast_limiter());
  const auto start = std::chrono::steady_clock::now();
  q.add_after("x", 10s);
  q.add_after("x", 20ms);
  q.add_after("x", 5s);
  EXPECT_EQ(get_soon(q, 3s), "x");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  q.done("x");
  EXPECT_EQ(q.len(), 0u);
}

TEST(WorkQueueTest, AddAfterOfAQueuedItemDoesNotDuplicateIt) {
  WorkQueue q("t", fast_limiter());
  q.add("x");
  q.add_after("x", 10ms);
  ASSERT_EQ(q.get(), "x");
  // The delayed add lands while "x" is processing: it is dirty and comes back after done.
  ASSERT_TRUE(eventually([&] { return q.len() == 0; }, 1s));
  q.done("x");
  EXPECT_EQ(get_soon(q), "x");
}

TEST(WorkQueueTest, ShutDownWakesWaitingGetters) {
  WorkQueue q("t", fast_limiter());
  std::atomic<int> nullopts{0};
  std::vector<std::thread> workers;
  for (int i = 0; i < 3; ++i) {
    workers.emplace_back([&] {
      if (!q.get()) nullopts++;
    });
  }
  q.shut_down();
  for (auto& w : workers) w.join();
  EXPECT_EQ(nullopts.load(), 3);
  EXPECT_TRUE(q.shutting_down());
}

TEST(WorkQueueTest, ShutDownDrainsQueuedItemsThenReturnsNullopt) {
  WorkQueue q("t", fast_limiter());
  q.add("a");
  q.shut_down();
  q.add("b");                   // ignored
  q.add_after("c", 1ms);        // ignored
  EXPECT_EQ(q.get(), "a");
  EXPECT_EQ(q.get(), std::nullopt);
}

TEST(RateLimiterTest, ExponentialDoublesFromBaseAndForgetResets) {
  ItemExponentialFailureRateLimiter l;  // 5 ms .. 1000 s
  EXPECT_EQ(l.when("a"), 5ms);
  EXPECT_EQ(l.when("a"), 10ms);
  EXPECT_EQ(l.when("a"), 20ms);
  EXPECT_EQ(l.when("a"), 40ms);
  EXPECT_EQ(l.when("b"), 5ms);  // per item
  EXPECT_EQ(l.num_requeues("a"), 4);
  EXPECT_EQ(l.num_requeues("b"), 1);
  l.forget("a");
  EXPECT_EQ(l.num_requeues("a"), 0);
  EXPECT_EQ(l.when("a"), 5ms);
}

TEST(RateLimiterTest, ExponentialIsCappedWithoutOverflow) {
  ItemExponentialFailureRateLimiter l;
  std::chrono::nanoseconds last{0};
  for (int i = 0; i < 200; ++i) last = l.when("a");  // 5 ms * 2^199 would overflow anything
  EXPECT_EQ(last, std::chrono::seconds(1000));
  // 5 ms * 2^17 = 655.36 s < 1000 s; 2^18 → capped.
  ItemExponentialFailureRateLimiter m;
  for (int i = 0; i < 17; ++i) m.when("x");
  EXPECT_EQ(m.when("x"), std::chrono::nanoseconds(655360000000));
  EXPECT_EQ(m.when("x"), std::chrono::seconds(1000));
}

TEST(RateLimiterTest, BucketAllowsBurstThenSpacesAtQps) {
  BucketRateLimiter l(10, 100);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(l.when("any"), std::chrono::nanoseconds(0)) << i;
  // The bucket is empty: the next reservations wait 100 ms, 200 ms, ... (minus the
  // little time the loop above took).
  const auto first = l.when("x");
  const auto second = l.when("y");
  EXPECT_GT(first, 50ms);
  EXPECT_LE(first, 100ms);
  EXPECT_GT(second, 150ms);
  EXPECT_LE(second, 200ms);
  EXPECT_EQ(l.num_requeues("x"), 0);
}

TEST(RateLimiterTest, MaxOfTakesTheLongestDelay) {
  auto l = default_controller_rate_limiter();
  EXPECT_EQ(l->when("a"), 5ms);  // bucket has tokens; exponential says 5 ms
  EXPECT_EQ(l->when("a"), 10ms);
  EXPECT_EQ(l->num_requeues("a"), 2);
  l->forget("a");
  EXPECT_EQ(l->num_requeues("a"), 0);
  // Drain the bucket (98 tokens left): then the bucket's wait exceeds 5 ms.
  for (int i = 0; i < 98; ++i) l->when("other" + std::to_string(i));
  EXPECT_GT(l->when("fresh"), 50ms);
}

TEST(WorkQueueTest, AddRateLimitedDelaysByTheLimiterAndCountsRetries) {
  prometheus::Registry reg;
  WorkQueue q("rl", std::make_unique<ItemExponentialFailureRateLimiter>(20ms, 1s), &reg);
  q.add_rate_limited("a");
  EXPECT_EQ(q.len(), 0u);  // not before 20 ms
  EXPECT_EQ(q.num_requeues("a"), 1);
  EXPECT_EQ(get_soon(q), "a");
  q.done("a");
  q.forget("a");
  EXPECT_EQ(q.num_requeues("a"), 0);
  EXPECT_EQ(registry_sum(reg, "workqueue_retries_total", {{"name", "rl"}}), 1);
}

TEST(WorkQueueTest, MetricsPerQueueName) {
  prometheus::Registry reg;
  WorkQueue q1("one", fast_limiter(), &reg);
  WorkQueue q2("two", fast_limiter(), &reg);  // same families, another label
  q1.add("a");
  q1.add("a");
  q1.add("b");
  q2.add("z");
  EXPECT_EQ(registry_sum(reg, "workqueue_adds_total", {{"name", "one"}}), 2);
  EXPECT_EQ(registry_sum(reg, "workqueue_adds_total", {{"name", "two"}}), 1);
  EXPECT_EQ(registry_sum(reg, "workqueue_depth", {{"name", "one"}}), 2);
  ASSERT_EQ(q1.get(), "a");
  EXPECT_EQ(registry_sum(reg, "workqueue_depth", {{"name", "one"}}), 1);
  EXPECT_EQ(registry_sum(reg, "workqueue_queue_duration_seconds", {{"name", "one"}}), 1);
  q1.done("a");
  EXPECT_EQ(registry_sum(reg, "workqueue_work_duration_seconds", {{"name", "one"}}), 1);
}

TEST(WorkQueueTest, ManyWorkersProcessEveryItemOnce) {
  WorkQueue q("t", fast_limiter());
  std::mutex mu;
  std::map<std::string, int> seen;
  std::atomic<int> in_flight_dupes{0};
  std::set<std::string> active;
  std::vector<std::thread> workers;
  for (int w = 0; w < 4; ++w) {
    workers.emplace_back([&] {
      while (auto item = q.get()) {
        {
          std::lock_guard<std::mutex> lock(mu);
          if (!active.insert(*item).second) in_flight_dupes++;
          seen[*item]++;
        }
        {
          std::lock_guard<std::mutex> lock(mu);
          active.erase(*item);
        }
        q.done(*item);
      }
    });
  }
  for (int i = 0; i < 200; ++i) q.add("item" + std::to_string(i % 50));
  EXPECT_TRUE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return seen.size() == 50u && q.len() == 0;
  }));
  q.shut_down();
  for (auto& w : workers) w.join();
  EXPECT_EQ(in_flight_dupes.load(), 0);
}

}  // namespace
}  // namespace shardguard::kube
