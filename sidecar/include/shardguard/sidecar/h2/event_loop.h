// One epoll event loop per thread (issue 17): file-descriptor readiness, one-shot
// timers and a cross-thread wake-up (eventfd). Everything but post() and stop() must
// be called on the loop's own thread (from inside a handler, or before run()).
// Handlers may watch, unwatch and schedule freely while they run; a handler that is
// unwatched during a batch of events is not called for the rest of that batch.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace shardguard::sidecar::h2 {

class EventLoop {
 public:
  using Clock = std::chrono::steady_clock;
  using FdHandler = std::function<void(uint32_t events)>;  // EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP
  using Task = std::function<void()>;

  // Throws std::runtime_error when epoll or eventfd cannot be created.
  EventLoop();
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Readiness of `fd` (edge-triggered is not used: level-triggered, `events` a mask of
  // EPOLLIN/EPOLLOUT). watch() replaces an existing registration's handler.
  void watch(int fd, uint32_t events, FdHandler handler);
  void modify(int fd, uint32_t events);
  void unwatch(int fd);

  // A one-shot timer; returns its id (never 0). cancel() of a fired or unknown id is a no-op.
  uint64_t run_after(std::chrono::milliseconds delay, Task task);
  void cancel(uint64_t timer_id);

  // Thread-safe: runs `task` on the loop thread soon (in order of posting).
  void post(Task task);
  // Thread-safe: run() returns after the current batch.
  void stop();

  // Runs until stop(). The thread that calls it is the loop's thread.
  void run();
  // One round: waits at most `timeout` for events (0: polls), dispatches them, the
  // posted tasks and the due timers. Returns the number of handlers and tasks run.
  size_t run_once(std::chrono::milliseconds timeout);
  bool stopped() const;

 private:
  struct Watch {
    uint32_t generation;
    FdHandler handler;
  };
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  uint32_t next_generation_ = 1;
  std::unordered_map<int, Watch> watches_;
  uint64_t next_timer_ = 1;
  std::multimap<Clock::time_point, uint64_t> timer_order_;
  std::unordered_map<uint64_t, std::pair<Clock::time_point, Task>> timers_;
  mutable std::mutex mu_;  // guards posted_ and stop_
  std::vector<Task> posted_;
  bool stop_ = false;
};

}  // namespace shardguard::sidecar::h2
