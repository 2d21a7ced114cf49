#include "shardguard/sidecar/h2/resolve.h"

#include <netdb.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <stdexcept>
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

struct LookupBudget::State {
  explicit State(int m) : max(m) {}
  const int max;
  std::atomic<int> in_flight{0};
};

LookupBudget::LookupBudget(int max) : state_(std::make_shared<State>(max)) {
  if (max < 1) throw std::invalid_argument("a lookup budget needs max >= 1, not " + std::to_string(max));
}

int LookupBudget::max() const { return state_->max; }

int LookupBudget::in_flight() const { return state_->in_flight.load(std::memory_order_acquire); }

namespace {

// One place in a budget, taken only while the count is below the budget's max (so a
// refused caller never holds one, even for a moment), given back once by whichever
// owner goes last: the lookup thread after `done`, or lookup_async when the thread
// never started.
class Slot {
 public:
  static std::optional<Slot> take(const std::shared_ptr<LookupBudget::State>& state) {
    int seen = state->in_flight.load(std::memory_order_acquire);
    while (seen < state->max) {
      if (state->in_flight.compare_exchange_weak(seen, seen + 1, std::memory_order_acq_rel)) return Slot(state);
    }
    return std::nullopt;
  }
  ~Slot() {
    if (state_) state_->in_flight.fetch_sub(1, std::memory_order_acq_rel);
  }
  Slot(Slot&& other) noexcept : state_(std::move(other.state_)) {}
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
  Slot& operator=(Slot&&) = delete;

 private:
  explicit Slot(std::shared_ptr<LookupBudget::State> state) : state_(std::move(state)) {}
  std::shared_ptr<LookupBudget::State> state_;
};

}  // namespace

bool lookup_async(const LookupBudget& budget, const std::string& host, const std::string& port,
                  std::function<void(Resolved)> done, std::string* why) {
  std::optional<Slot> slot = Slot::take(budget.state_);
  if (!slot) {
    *why = std::to_string(budget.max()) + " name lookups are still waiting for DNS";
    return false;
  }
  try {
    std::thread([slot = std::move(*slot), host, port, done = std::move(done)]() mutable {
      try {
        done(lookup(host, port, 0));
      } catch (...) {  // nothing above this thread could hear of it
      }
      // the slot is given back when this lambda is destroyed, after done has returned
    }).detach();
  } catch (const std::exception& e) {  // no thread (EAGAIN) or no memory; the slot goes with the lambda
    *why = std::string("no thread for the lookup: ") + e.what();
    return false;
  }
  return true;
}

}  // namespace shardguard::sidecar::h2
