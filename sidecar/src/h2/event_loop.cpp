#include "shardguard/sidecar/h2/event_loop.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace shardguard::sidecar::h2 {

namespace {
constexpr int kMaxEvents = 256;
uint64_t pack(int fd, uint32_t generation) {
  return (static_cast<uint64_t>(generation) << 32) | static_cast<uint32_t>(fd);
}
}  // namespace

EventLoop::EventLoop() {
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) throw std::runtime_error(std::string("epoll_create1: ") + std::strerror(errno));
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    close(epoll_fd_);
    throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = pack(wake_fd_, 0);
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
}

EventLoop::~EventLoop() {
  close(wake_fd_);
  close(epoll_fd_);
}

void EventLoop::watch(int fd, uint32_t events, FdHandler handler) {
  epoll_event ev{};
  ev.events = events;
  auto it = watches_.find(fd);
  if (it != watches_.end()) {
    it->second.handler = std::move(handler);
    ev.data.u64 = pack(fd, it->second.generation);
    epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, fd, &ev);
    return;
  }
  uint32_t generation = next_generation_++;
  if (next_generation_ == 0) next_generation_ = 1;
  ev.data.u64 = pack(fd, generation);
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0)
    throw std::runtime_error("epoll_ctl(ADD, fd " + std::to_string(fd) + "): " + std::strerror(errno));
  watches_.emplace(fd, Watch{generation, std::move(handler)});
}

void EventLoop::modify(int fd, uint32_t events) {
  auto it = watches_.find(fd);
  if (it == watches_.end()) return;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = pack(fd, it->second.generation);
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, fd, &ev);
}

void EventLoop::unwatch(int fd) {
  if (watches_.erase(fd) > 0) epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
}

uint64_t EventLoop::run_after(std::chrono::milliseconds delay, Task task) {
  uint64_t id = next_timer_++;
  auto when = Clock::now() + delay;
  timer_order_.emplace(when, id);
  timers_.emplace(id, std::make_pair(when, std::move(task)));
  return id;
}

void EventLoop::cancel(uint64_t timer_id) {
  auto it = timers_.find(timer_id);
  if (it == timers_.end()) return;
  auto range = timer_order_.equal_range(it->second.first);
  for (auto o = range.first; o != range.second; ++o) {
    if (o->second == timer_id) {
      timer_order_.erase(o);
      break;
    }
  }
  timers_.erase(it);
}

void EventLoop::post(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    posted_.push_back(std::move(task));
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof one);
}

void EventLoop::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof one);
}

bool EventLoop::stopped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stop_;
}

size_t EventLoop::run_once(std::chrono::milliseconds timeout) {
  int wait_ms = static_cast<int>(timeout.count());
  if (!timer_order_.empty()) {
    auto until = std::chrono::duration_cast<std::chrono::milliseconds>(timer_order_.begin()->first - Clock::now());
    int due = until.count() < 0 ? 0 : static_cast<int>(until.count()) + 1;
    if (wait_ms < 0 || due < wait_ms) wait_ms = due;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!posted_.empty() || stop_) wait_ms = 0;
  }
  epoll_event events[kMaxEvents];
  int n = epoll_wait(epoll_fd_, events, kMaxEvents, wait_ms);
  size_t ran = 0;
  for (int i = 0; i < n; ++i) {
    int fd = static_cast<int>(events[i].data.u64 & 0xffffffffu);
    uint32_t generation = static_cast<uint32_t>(events[i].data.u64 >> 32);
    if (fd == wake_fd_ && generation == 0) {
      uint64_t value;
      [[maybe_unused]] ssize_t r = read(wake_fd_, &value, sizeof value);
      continue;
    }
    auto it = watches_.find(fd);
    if (it == watches_.end() || it->second.generation != generation) continue;
    FdHandler handler = it->second.handler;  // the handler may unwatch itself
    handler(events[i].events);
    ++ran;
  }
  std::vector<Task> tasks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks.swap(posted_);
  }
  for (auto& task : tasks) {
    task();
    ++ran;
  }
  auto now = Clock::now();
  while (!timer_order_.empty() && timer_order_.begin()->first <= now) {
    uint64_t id = timer_order_.begin()->second;
    timer_order_.erase(timer_order_.begin());
    auto it = timers_.find(id);
    if (it == timers_.end()) continue;
    Task task = std::move(it->second.second);
    timers_.erase(it);
    task();
    ++ran;
  }
  return ran;
}

void EventLoop::run() {
  while (!stopped()) run_once(std::chrono::milliseconds(-1));
}

}  // namespace shardguard::sidecar::h2
