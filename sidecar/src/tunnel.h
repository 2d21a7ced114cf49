// The sidecar's L4 tunnels (issue 20, docs/sidecar.md "Tunnels"): plain TCP of the local
// shardd's c10d store and Gloo connections, carried over the sidecars' mTLS under ALPN
// "sg-tunnel/1", with the same SPIFFE identities, policy, metrics and audit log as calls.
//
//   local shardd ─TCP─▶ --tunnel LISTEN ══mTLS sg-tunnel/1══▶ peer's --inbound ─TCP─▶
//     peer's --tunnel-store (Store) or the address its --tunnel-map names for us (Gloo)
//
// Outbound: decide(egress, PEER_ID, method) before dialling; the server certificate must
// carry exactly PEER_ID. The client sends "<method>\n"; the server answers "OK\n" or
// "DENIED <rule>\n" (and closes). Then bytes flow both ways until each side has closed
// (a half-close is passed on: TCP FIN ⇄ TLS close_notify), with TCP keepalive and no
// idle timeout. One thread per tunnel (at most kMaxTunnels in each direction); shutdown() closes them all.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "proxy_core.h"
#include "shardguard/sidecar/h2/tls.h"

namespace shardguard::sidecar {

// The most tunnels (both directions together) open at once; over it a new one is
// refused (counted under shardguard_tunnel_refused_total{reason="tunnel_limit"}).
inline constexpr size_t kMaxTunnels = 256;
// Inbound tunnels from one source address that have not yet completed their handshake
// and method line (they need no certificate until then); one more is closed at once.
inline constexpr size_t kMaxTunnelHandshakesPerSource = 16;
// The longest method line a client may send (with its '\n').
inline constexpr size_t kMaxTunnelRequestLine = 64;
// The largest --tunnel-map file read.
inline constexpr size_t kMaxTunnelMapBytes = 64 * 1024;

// Rules the sidecar reports for a tunnel the policy allowed but that has nowhere to go.
inline constexpr const char* kRuleTunnelUnmapped = "tunnel-unmapped";
inline constexpr const char* kRuleTunnelNoStore = "tunnel-no-store";
inline constexpr const char* kRuleTunnelNotATunnel = "tunnel-not-a-tunnel-method";

// Where an inbound Gloo tunnel of `peer` goes, by the map file's text (one line per
// peer: "<SPIFFE ID> <host:port>", the host a loopback address). Returns "" with *why
// set when the peer has no line, or a bad one.
std::string tunnel_map_lookup(const std::string& map_text, const std::string& peer, std::string* why);
// 127.0.0.0/8 or ::1, as a literal address (split_host_port's host).
bool is_loopback_address(const std::string& host);

class Tunnels {
 public:
  // Everything a tunnel needs from the h2 plane: TLS contexts with ALPN sg-tunnel/1 and
  // the verifier of h2_plane.cpp, and how a failed inbound handshake is counted.
  struct Tls {
    std::shared_ptr<h2::TlsContext> server;
    std::map<std::string, std::shared_ptr<h2::TlsContext>> clients;  // by peer SPIFFE ID
  };
  using HandshakeFailure = std::function<void(const std::string& reason, const std::string& detail)>;

  Tunnels(ProxyCore& core, HandshakeFailure on_handshake_failure);
  ~Tunnels();  // shutdown()
  Tunnels(const Tunnels&) = delete;
  Tunnels& operator=(const Tunnels&) = delete;

  // Binds every --tunnel listener and starts accepting. Throws std::runtime_error naming
  // the flag and address that could not be bound.
  void start(Tls tls);
  // New tunnels use these contexts (certificate rotation); open ones keep theirs.
  void set_tls(Tls tls);
  // An inbound connection whose ClientHello offers sg-tunnel/1 (the acceptor's).
  void adopt(int fd);
  // Closes every listener and tunnel and joins every thread. Idempotent.
  void shutdown();
  // The port --tunnel number i listens on (the order of ProxyConfig::tunnels).
  int listen_port(size_t i) const;
  size_t open_tunnels() const;

 private:
  struct Worker {
    std::thread thread;
    std::atomic<bool> done{false};
  };
  bool spawn(const char* direction, std::function<void()> fn);
  void accept_loop();
  void outbound(size_t index, int fd);
  void inbound(int fd, const std::string& source);
  void release_handshake(const std::string& source);
  // A tunnel refused or failed: counted in shardguard_tunnel_refused_total{direction,
  // reason} and logged as a warning with `fields`, at most as often as the log limiter
  // allows for that reason (with how many lines it held back).
  void refuse(const char* direction, const std::string& reason, const std::string& message, nlohmann::json fields);
  Tls tls() const;

  ProxyCore& core_;
  HandshakeFailure on_handshake_failure_;
  prometheus::Family<prometheus::Counter>& bytes_;
  prometheus::Family<prometheus::Counter>& refused_;
  prometheus::Gauge& open_;
  int stop_fd_ = -1;  // eventfd: readable once shutdown() began
  std::atomic<bool> stopping_{false};
  std::vector<int> listen_fds_;
  std::vector<int> listen_ports_;
  std::thread acceptor_;
  mutable std::mutex mu_;
  Tls tls_;
  std::list<std::unique_ptr<Worker>> workers_;
  size_t active_inbound_ = 0;   // each at most kMaxTunnels
  size_t active_outbound_ = 0;
  std::map<std::string, size_t> handshaking_;  // inbound, by source address
};

}  // namespace shardguard::sidecar
