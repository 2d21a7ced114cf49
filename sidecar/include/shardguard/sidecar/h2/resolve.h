// Name lookups for the sidecar's outgoing connections: the HTTP/2 relay's upstreams and
// the L4 tunnels' destinations. getaddrinfo blocks for seconds when DNS is slow or down,
// so each caller asks for a numeric address first (lookup with AI_NUMERICHOST) and runs
// a name's lookup off its own thread with lookup_async (relay.cpp's Resolver posts the
// answer to its event loop, tunnel.cpp's resolve_before waits for it until its deadline).
#pragma once

#include <sys/socket.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace shardguard::sidecar::h2 {

// The addresses of host:port in getaddrinfo's order (at most 8), or why there are none.
struct Resolved {
  struct Address {
    sockaddr_storage addr{};
    socklen_t len = 0;
  };
  std::vector<Address> addresses;
  std::string error;
};

// getaddrinfo(host, port) for a stream socket, any family, with `flags`: with
// AI_NUMERICHOST | AI_NUMERICSERV it answers at once (an error for a name), without
// them it blocks while the name is looked up.
Resolved lookup(const std::string& host, const std::string& port, int flags);

// How many name lookups one user (the relay's upstreams, the tunnels) may have running on
// their own threads at once: with DNS down each lasts the resolver's timeouts ×
// attempts, longer than its caller waits for it, and peers that keep dialling must not
// pile up threads. Each user has a budget of its own, so a name that does not resolve
// for one (a --tunnel-map host) does not starve the other. Copies share one count; a
// lookup keeps the count alive until it is done, so a budget may go before its lookups.
class LookupBudget {
 public:
  explicit LookupBudget(int max);
  int max() const;
  // Lookups started against this budget whose `done` has not yet returned.
  int in_flight() const;

  struct State;  // the shared count; defined in resolve.cpp

 private:
  friend bool lookup_async(const LookupBudget&, const std::string&, const std::string&,
                           std::function<void(Resolved)>, std::string*);
  std::shared_ptr<State> state_;
};

// The budget the sidecar gives each of its users: the relays' upstreams, the tunnels.
inline constexpr int kLookupsPerUser = 16;

// Looks host:port up (lookup with flags 0) on a detached thread of its own and calls
// `done` there with the answer; the lookup counts against `budget` until `done` has
// returned. Returns false with *why, and never calls `done`, when no lookup can start:
// budget.max() are in flight, or no thread can be had. `done` outlives any caller that
// stopped waiting, so it must own (or share) whatever it touches; an exception out of it
// is caught and dropped (the thread has no one to tell).
bool lookup_async(const LookupBudget& budget, const std::string& host, const std::string& port,
                  std::function<void(Resolved)> done, std::string* why);

}  // namespace shardguard::sidecar::h2
