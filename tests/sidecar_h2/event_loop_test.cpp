// The relay's epoll loop (sidecar/h2/event_loop.h): readiness, timers, cross-thread posts.
#include "shardguard/sidecar/h2/event_loop.h"

#include <gtest/gtest.h>

#include <sys/epoll.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

namespace shardguard::sidecar::h2 {
namespace {

using namespace std::chrono_literals;

TEST(EventLoop, DispatchesReadinessUntilUnwatched) {
  EventLoop loop;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  int seen = 0;
  loop.watch(fds[0], EPOLLIN, [&](uint32_t ev) {
    EXPECT_TRUE(ev & EPOLLIN);
    char c;
    ASSERT_EQ(read(fds[0], &c, 1), 1);
    if (++seen == 2) loop.unwatch(fds[0]);
  });
  ASSERT_EQ(write(fds[1], "ab", 2), 2);
  for (int i = 0; i < 100 && seen < 2; ++i) loop.run_once(1000ms);
  EXPECT_EQ(seen, 2);
  ASSERT_EQ(write(fds[1], "c", 1), 1);
  EXPECT_EQ(loop.run_once(0ms), 0u);  // unwatched: nothing runs
  close(fds[0]);
  close(fds[1]);
}

TEST(EventLoop, TimersFireInOrderAndCancelledOnesNever) {
  EventLoop loop;
  std::vector<int> order;
  loop.run_after(20ms, [&] { order.push_back(2); });
  uint64_t cancelled = loop.run_after(10ms, [&] { order.push_back(99); });
  loop.run_after(0ms, [&] { order.push_back(1); });
  loop.run_after(30ms, [&] {
    order.push_back(3);
    loop.stop();
  });
  loop.cancel(cancelled);
  loop.cancel(12345);
  loop.run();  // returns after the last timer stops it
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

TEST(EventLoop, PostsFromOtherThreadsWakeTheLoopInOrder) {
  EventLoop loop;
  std::vector<int> got;
  std::thread loop_thread([&] { loop.run(); });
  std::thread poster([&] {
    for (int i = 0; i < 1000; ++i) loop.post([&got, i] { got.push_back(i); });
    loop.post([&] { loop.stop(); });
  });
  poster.join();
  loop_thread.join();
  ASSERT_EQ(got.size(), 1000u);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(got[i], i);
}

}  // namespace
}  // namespace shardguard::sidecar::h2
