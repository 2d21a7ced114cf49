// Name lookups off the caller's thread (sidecar/h2/resolve.h): the answer arrives on the
// lookup's own thread, at most kMaxNameLookups run at once in the process, and each
// gives its place back when its callback has returned.
#include "shardguard/sidecar/h2/resolve.h"

#include <gtest/gtest.h>

#include <netinet/in.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace shardguard::sidecar::h2 {
namespace {

using Clock = std::chrono::steady_clock;

// Lets the test hold lookups inside their callbacks, and count those that got there.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  int entered = 0;
  bool open = false;
  std::vector<Resolved> answers;
  std::vector<std::thread::id> threads;
};

// Waits until no lookup holds a place (the last one gives it back after its callback
// returned, so a test cannot learn the moment from the callback itself).
bool drained(Clock::duration within) {
  const auto deadline = Clock::now() + within;
  while (name_lookups_in_flight() > 0) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

TEST(NameLookup, AnswersOnItsOwnThreadAndGivesItsPlaceBack) {
  ASSERT_TRUE(drained(std::chrono::seconds(10)));
  auto gate = std::make_shared<Gate>();
  std::string why;
  ASSERT_TRUE(lookup_async(
      "127.0.0.1", "8443",
      [gate](Resolved r) {
        std::lock_guard<std::mutex> lock(gate->mu);
        gate->answers.push_back(std::move(r));
        gate->threads.push_back(std::this_thread::get_id());
        ++gate->entered;
        gate->cv.notify_all();
      },
      &why))
      << why;
  {
    std::unique_lock<std::mutex> lock(gate->mu);
    ASSERT_TRUE(gate->cv.wait_for(lock, std::chrono::seconds(10), [&] { return gate->entered == 1; }));
    ASSERT_EQ(gate->answers.size(), 1u);
    EXPECT_EQ(gate->answers[0].error, "");
    ASSERT_EQ(gate->answers[0].addresses.size(), 1u);
    const auto* in = reinterpret_cast<const sockaddr_in*>(&gate->answers[0].addresses[0].addr);
    EXPECT_EQ(in->sin_family, AF_INET);
    EXPECT_EQ(ntohs(in->sin_port), 8443);
    EXPECT_NE(gate->threads[0], std::this_thread::get_id());
  }
  EXPECT_TRUE(drained(std::chrono::seconds(10))) << name_lookups_in_flight() << " still in flight";
}

TEST(NameLookup, RefusesBeyondTheCapUntilAPlaceIsGivenBack) {
  ASSERT_TRUE(drained(std::chrono::seconds(10)));
  auto gate = std::make_shared<Gate>();
  auto held = [gate](Resolved r) {
    std::unique_lock<std::mutex> lock(gate->mu);
    gate->answers.push_back(std::move(r));
    ++gate->entered;
    gate->cv.notify_all();
    gate->cv.wait(lock, [&] { return gate->open; });
  };
  std::string why;
  for (int i = 0; i < kMaxNameLookups; ++i) ASSERT_TRUE(lookup_async("127.0.0.1", "1", held, &why)) << i << ": " << why;
  {
    std::unique_lock<std::mutex> lock(gate->mu);
    ASSERT_TRUE(gate->cv.wait_for(lock, std::chrono::seconds(10), [&] { return gate->entered == kMaxNameLookups; }));
  }
  EXPECT_EQ(name_lookups_in_flight(), kMaxNameLookups);

  // One more is refused with a reason, and its callback never runs.
  bool ran = false;
  why.clear();
  EXPECT_FALSE(lookup_async("127.0.0.1", "1", [&ran](Resolved) { ran = true; }, &why));
  EXPECT_EQ(why, std::to_string(kMaxNameLookups) + " name lookups are still waiting for DNS");
  EXPECT_EQ(name_lookups_in_flight(), kMaxNameLookups);

  {
    std::lock_guard<std::mutex> lock(gate->mu);
    gate->open = true;
  }
  gate->cv.notify_all();
  ASSERT_TRUE(drained(std::chrono::seconds(10))) << name_lookups_in_flight() << " still in flight";
  EXPECT_FALSE(ran);
  for (const Resolved& r : gate->answers) EXPECT_EQ(r.error, "");

  // Every place is back: a full set starts again.
  auto again = std::make_shared<Gate>();
  for (int i = 0; i < kMaxNameLookups; ++i) {
    ASSERT_TRUE(lookup_async(
        "127.0.0.1", "1",
        [again](Resolved) {
          std::lock_guard<std::mutex> lock(again->mu);
          ++again->entered;
          again->cv.notify_all();
        },
        &why))
        << i << ": " << why;
  }
  std::unique_lock<std::mutex> lock(again->mu);
  EXPECT_TRUE(again->cv.wait_for(lock, std::chrono::seconds(10), [&] { return again->entered == kMaxNameLookups; }));
  lock.unlock();
  EXPECT_TRUE(drained(std::chrono::seconds(10)));
}

}  // namespace
}  // namespace shardguard::sidecar::h2
