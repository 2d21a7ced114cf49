#include "shardguard/sidecar/h2/resolve.h"

#include <netdb.h>

#include <atomic>
#include <cstring>
#include <system_error>
#include <thread>
#include <utility>

namespace shardguard::sidecar::h2 {

Resolved lookup(const std::string& host, const std::string& port, int flags) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = flags;
  addrinfo* found = nullptr;
  Resolved r;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0 || !found) {
    r.error = rc != 0 ? gai_strerror(rc) : "no address";
  } else {
    for (const addrinfo* a = found; a && r.addresses.size() < 8; a = a->ai_next) {
      Resolved::Address one;
      std::memcpy(&one.addr, a->ai_addr, a->ai_addrlen);
      one.len = a->ai_addrlen;
      r.addresses.push_back(one);
    }
  }
  if (found) freeaddrinfo(found);
  return r;
}

namespace {

std::atomic<int> in_flight{0};

// One of the kMaxNameLookups places: taken by acquire, given back when the last owner
// goes (the lookup thread after `done`, or lookup_async when the thread never started).
class Slot {
 public:
  static bool acquire() {
    if (in_flight.fetch_add(1, std::memory_order_acq_rel) < kMaxNameLookups) return true;
    in_flight.fetch_sub(1, std::memory_order_acq_rel);
    return false;
  }
  Slot() = default;
  ~Slot() {
    if (held_) in_flight.fetch_sub(1, std::memory_order_acq_rel);
  }
  Slot(Slot&& other) noexcept : held_(std::exchange(other.held_, false)) {}
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
  Slot& operator=(Slot&&) = delete;

 private:
  bool held_ = true;
};

}  // namespace

bool lookup_async(const std::string& host, const std::string& port, std::function<void(Resolved)> done,
                  std::string* why) {
  if (!Slot::acquire()) {
    *why = std::to_string(kMaxNameLookups) + " name lookups are still waiting for DNS";
    return false;
  }
  Slot slot;
  try {
    std::thread([slot = std::move(slot), host, port, done = std::move(done)]() mutable {
      done(lookup(host, port, 0));
      // slot is released when this lambda is destroyed, after done has returned
    }).detach();
  } catch (const std::system_error& e) {  // no thread to be had (EAGAIN); the slot goes with the lambda
    *why = std::string("no thread for the lookup: ") + e.what();
    return false;
  }
  return true;
}

int name_lookups_in_flight() { return in_flight.load(std::memory_order_acquire); }

}  // namespace shardguard::sidecar::h2
