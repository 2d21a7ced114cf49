// Name lookups for the sidecar's outgoing connections: the HTTP/2 relay's upstreams and
// the L4 tunnels' destinations. getaddrinfo blocks for seconds when DNS is slow or down,
// so each caller asks for a numeric address first (lookup with AI_NUMERICHOST) and runs
// a name's lookup off its own thread with lookup_async (relay.cpp's Resolver posts the
// answer to its event loop, tunnel.cpp's resolve_before waits for it until its deadline).
#pragma once

#include <sys/socket.h>

#include <functional>
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

// Name lookups running on their own threads, in the whole process, at most: with DNS down
// each lasts the resolver's timeouts × attempts, longer than the caller waits for it, and
// peers that keep dialling must not pile up threads.
inline constexpr int kMaxNameLookups = 16;

// Looks host:port up (lookup with flags 0) on a detached thread of its own and calls
// `done` there with the answer; the lookup's slot is held until `done` returns. Returns
// false with *why, and never calls `done`, when no lookup can start: kMaxNameLookups are
// in flight, or no thread can be had. `done` outlives any caller that stopped waiting,
// so it must own (or share) whatever it touches.
bool lookup_async(const std::string& host, const std::string& port, std::function<void(Resolved)> done,
                  std::string* why);

// Lookups started by lookup_async whose `done` has not yet returned.
int name_lookups_in_flight();

}  // namespace shardguard::sidecar::h2
