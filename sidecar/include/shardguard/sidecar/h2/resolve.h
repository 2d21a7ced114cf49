// Name lookups for the sidecar's outgoing connections: the HTTP/2 relay's upstreams and
// the L4 tunnels' destinations. getaddrinfo blocks for seconds when DNS is slow or down,
// so each caller runs a name's lookup off its own thread (relay.cpp's Resolver,
// tunnel.cpp's resolve_before) and asks for numeric addresses here first.
#pragma once

#include <sys/socket.h>

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

}  // namespace shardguard::sidecar::h2
