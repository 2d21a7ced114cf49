// The HTTP/2 data plane of shard-sidecar (--data-plane h2, issue 17): the relay of
// sidecar/h2/relay.h wired to the sidecar's certificates, policy, metrics, audit log
// and export guard (proxy_core.h). Two relays, one worker thread each:
// - inbound: no listener of its own; the sidecar's acceptor classifies each
//   ClientHello and hands the socket over (adopt). mTLS with the sidecar's
//   certificate, every client certificate checked by verify_svid; calls go to the
//   local shardd over plaintext HTTP/2.
// - outbound: plaintext HTTP/2 on the loopback listener for the local shardd; one
//   upstream per configured peer, mTLS with a client context that checks the peer's
//   SVID and that its SPIFFE ID is the peer's.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>

#include "proxy_core.h"

namespace shardguard::sidecar {

class H2Plane {
 public:
  explicit H2Plane(ProxyCore& core);
  ~H2Plane();  // shutdown(0)
  H2Plane(const H2Plane&) = delete;
  H2Plane& operator=(const H2Plane&) = delete;

  // Makes the TLS contexts from the certificate files (read by the core's watchers)
  // and starts both relays, the outbound one listening. Throws std::runtime_error.
  void start();
  int outbound_port() const;
  // An inbound connection whose ClientHello the acceptor took (thread-safe).
  void adopt(int fd);
  // One whose ClientHello offers only the tunnel protocol (tunnel.h; thread-safe).
  void adopt_tunnel(int fd);
  int tunnel_port(size_t i) const;
  // New connections (both ways) use the certificate and key the core's watchers read
  // last; open ones keep theirs. False (logged) when they do not make a TLS context
  // (a key that does not match its certificate mid-rotation): the previous one stays.
  bool rotate();
  // Stops both relays: GOAWAY, streams get `grace` to finish, the rest are reset.
  void shutdown(std::chrono::milliseconds grace);

  struct State;

 private:
  std::unique_ptr<State> s_;
};

}  // namespace shardguard::sidecar
