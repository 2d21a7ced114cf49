// Name lookups off the caller's thread (sidecar/h2/resolve.h): the answer arrives on the
// lookup's own thread, at most a budget's max run at once, and each gives its place back
// once its callback has returned. Every test has budgets of its own, so one that fails
// leaves no lookup counted against the relay's or the tunnels'.
#include "shardguard/sidecar/h2/resolve.h"

#include <gtest/gtest.h>

#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace shardguard::sidecar::h2 {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kWait = std::chrono::seconds(10);

// Holds lookups inside their callbacks until opened, and counts those that got there.
// Opened when it goes, so a test that stops early lets its lookups finish.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  int entered = 0;
  bool open = false;
  std::vector<Resolved> answers;
  std::vector<std::thread::id> threads;

  void arrive(Resolved r, bool hold) {
    std::unique_lock<std::mutex> lock(mu);
    answers.push_back(std::move(r));
    threads.push_back(std::this_thread::get_id());
    ++entered;
    cv.notify_all();
    if (hold) cv.wait(lock, [&] { return open; });
  }
  bool wait_entered(int n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, kWait, [&] { return entered == n; });
  }
  void release() {
    {
      std::lock_guard<std::mutex> lock(mu);
      open = true;
    }
    cv.notify_all();
  }
};
struct OpenOnExit {
  std::shared_ptr<Gate> gate;
  ~OpenOnExit() { gate->release(); }
};

// Waits until no lookup of `budget` is counted: the last one gives its place back after
// its callback returned, so the callback cannot tell the test the moment.
bool drained(const LookupBudget& budget) {
  const auto deadline = Clock::now() + kWait;
  while (budget.in_flight() != 0) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

TEST(NameLookup, AnswersOnItsOwnThreadAndGivesItsPlaceBack) {
  LookupBudget budget(2);
  auto gate = std::make_shared<Gate>();
  OpenOnExit opener{gate};
  std::string why;
  ASSERT_TRUE(lookup_async(budget, "127.0.0.1", "8443", [gate](Resolved r) { gate->arrive(std::move(r), false); }, &why))
      << why;
  ASSERT_TRUE(gate->wait_entered(1));
  {
    std::lock_guard<std::mutex> lock(gate->mu);
    EXPECT_EQ(gate->answers[0].error, "");
    ASSERT_EQ(gate->answers[0].addresses.size(), 1u);
    const auto* in = reinterpret_cast<const sockaddr_in*>(&gate->answers[0].addresses[0].addr);
    EXPECT_EQ(in->sin_family, AF_INET);
    EXPECT_EQ(ntohs(in->sin_port), 8443);
    EXPECT_NE(gate->threads[0], std::this_thread::get_id());
  }
  EXPECT_TRUE(drained(budget)) << budget.in_flight() << " still in flight";
  EXPECT_EQ(budget.in_flight(), 0);
}

TEST(NameLookup, RefusesBeyondItsBudgetUntilAPlaceIsGivenBack) {
  LookupBudget budget(4);
  LookupBudget other(4);
  auto gate = std::make_shared<Gate>();
  OpenOnExit opener{gate};
  std::string why;
  for (int i = 0; i < budget.max(); ++i) {
    ASSERT_TRUE(lookup_async(budget, "127.0.0.1", "1", [gate](Resolved r) { gate->arrive(std::move(r), true); }, &why))
        << i << ": " << why;
  }
  ASSERT_TRUE(gate->wait_entered(budget.max()));
  EXPECT_EQ(budget.in_flight(), budget.max());

  // One more is refused with a reason, and its callback never runs.
  auto ran = std::make_shared<std::atomic<bool>>(false);
  why.clear();
  EXPECT_FALSE(lookup_async(budget, "127.0.0.1", "1", [ran](Resolved) { *ran = true; }, &why));
  EXPECT_EQ(why, "4 name lookups are still waiting for DNS");
  EXPECT_EQ(budget.in_flight(), budget.max());

  // Another budget is not held up by this one's lookups.
  auto side = std::make_shared<Gate>();
  OpenOnExit side_opener{side};
  ASSERT_TRUE(lookup_async(other, "127.0.0.1", "2", [side](Resolved r) { side->arrive(std::move(r), false); }, &why))
      << why;
  EXPECT_TRUE(side->wait_entered(1));
  EXPECT_TRUE(drained(other));

  gate->release();
  ASSERT_TRUE(drained(budget)) << budget.in_flight() << " still in flight";
  EXPECT_EQ(budget.in_flight(), 0);  // given back once each, never twice
  EXPECT_FALSE(*ran);
  {
    std::lock_guard<std::mutex> lock(gate->mu);
    for (const Resolved& r : gate->answers) EXPECT_EQ(r.error, "");
  }

  // Every place is back: a full set starts again.
  auto again = std::make_shared<Gate>();
  OpenOnExit again_opener{again};
  for (int i = 0; i < budget.max(); ++i) {
    ASSERT_TRUE(lookup_async(budget, "127.0.0.1", "1", [again](Resolved r) { again->arrive(std::move(r), false); }, &why))
        << i << ": " << why;
  }
  EXPECT_TRUE(again->wait_entered(budget.max()));
  EXPECT_TRUE(drained(budget));
  EXPECT_EQ(budget.in_flight(), 0);
}

TEST(NameLookup, ACallbackThatThrowsStillGivesItsPlaceBack) {
  LookupBudget budget(1);
  auto gate = std::make_shared<Gate>();
  OpenOnExit opener{gate};
  std::string why;
  ASSERT_TRUE(lookup_async(
      budget, "127.0.0.1", "1",
      [gate](Resolved r) {
        gate->arrive(std::move(r), false);
        throw std::runtime_error("callback failed");
      },
      &why))
      << why;
  ASSERT_TRUE(gate->wait_entered(1));
  EXPECT_TRUE(drained(budget));
  EXPECT_TRUE(lookup_async(budget, "127.0.0.1", "1", [](Resolved) {}, &why)) << why;
  EXPECT_TRUE(drained(budget));
}

TEST(NameLookup, ABudgetNeedsRoomForOne) {
  EXPECT_THROW(LookupBudget(0), std::invalid_argument);
  EXPECT_EQ(LookupBudget(1).max(), 1);
}

}  // namespace
}  // namespace shardguard::sidecar::h2
