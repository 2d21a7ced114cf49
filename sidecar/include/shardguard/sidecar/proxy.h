// The shard-sidecar proxy (issue 3 item 2, DESIGN.md §2–§4): the only way into and
// out of a shard pod.
//
//   peer sidecar ══mTLS══▶ inbound listener ─▶ local shardd (loopback, plaintext)
//   local shardd ─▶ outbound listener (loopback) ══mTLS══▶ peer sidecar
//
// Two engines (ProxyConfig::data_plane; everything below holds for both): the gRPC
// plane (proxy.cpp) and the HTTP/2 relay (h2_plane.cpp, sidecar/h2/relay.h: decides
// on the request headers, moves DATA frames). On the gRPC plane both listeners are
// gRPC servers with a generic callback service: every call is
// relayed message by message (one read in flight per direction, so gRPC's flow
// control reaches from one end to the other), for any method, unary or streaming.
// Nothing is forwarded before the decision:
// - inbound: the peer's identity is the SPIFFE ID of the client certificate that the
//   TLS handshake verified (never a header); decide(ingress, peer, method);
// - outbound: the target is chosen per call among the peers of `--peer` whose
//   egress decision for the method is an allow: the `shardguard-target` request
//   header names one of them, or, without it, the allowed peer must be unique (a
//   pipeline stage sends Forward only to the next and Backward only to the previous
//   stage, so shardd needs no header). The peer's server certificate must carry
//   exactly that SPIFFE ID.
//
// TLS (gRPC's TLS credentials on OpenSSL): TLS 1.2 or 1.3 with gRPC's AEAD-only
// cipher list; client certificates are mandatory. Chain and X509-SVID rules are
// checked by common/pki verify_svid in a gRPC certificate verifier, so that every
// refusal is counted under its reason. Before gRPC sees a connection, the inbound
// acceptor reads (peeks) its first bytes and refuses, counted, what cannot be a TLS
// 1.2+ ClientHello offering HTTP/2 or, on the h2 plane, the L4 tunnel protocol
// sg-tunnel/1 (tunnel.h, docs/sidecar.md "Tunnels") (plaintext, garbage, TLS <= 1.1, no h2 in ALPN)
// and clients that send no whole ClientHello within the first-bytes timeout; it
// never stops accepting, and bounds the connections waiting for their first bytes per
// source address and in all (acceptor.h).
//
// Parameter export (/shardguard.v1.ShardExport/Export, the only parameter-bearing
// RPC): allowed by the policy's export section only; the requested byte range is
// checked against the principal's budget in the exposure ledger before anything is
// forwarded, every chunk coming back must lie inside it and is recorded, and the
// ledger is saved (HMAC-sealed, with a sequence raised by every save) before the
// chunk is forwarded. A ledger older than ledger_min_sequence stops every export. An allowed export is audited
// with its bytes and the digest of its ranges.
//
// Certificates, key and CA bundle are files, re-read when they change (rotation
// without dropping open streams); the policy is a PolicyStore (hot reload).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/registry.h>

#include "shardguard/sidecar/acceptor.h"  // classify_client_hello, bounded_text

namespace shardguard::sidecar {

// The request header that picks the outbound target (a SPIFFE ID) when the policy
// allows more than one peer for a method.
inline constexpr const char* kTargetHeader = "shardguard-target";

// The range of ProxyConfig::max_header_list_bytes; gRPC's own limit is set to twice it.
inline constexpr int64_t kMinHeaderListBytes = 1024;
inline constexpr int64_t kMaxHeaderListBytes = 512 * 1024;

// The engine that relays calls (issue 17): gRPC's server and client stacks (every call
// terminated and re-originated), or the HTTP/2 relay on nghttp2 (sidecar/h2/relay.h),
// which decides on the request headers and moves DATA frames. Same listeners, policy,
// metrics, audit log and export guard; docs/sidecar.md says what h2 does not do yet.
enum class DataPlane { grpc, h2 };
// "grpc" | "h2" (the --data-plane flag). Throws std::invalid_argument.
DataPlane parse_data_plane(const std::string& text);
const char* data_plane_name(DataPlane plane);

struct ProxyConfig {
  DataPlane data_plane = DataPlane::h2;
  std::string inbound_listen = "0.0.0.0:7443";    // mTLS, the pod's only way in
  std::string outbound_listen = "127.0.0.1:7001";  // plaintext, loopback only
  std::string upstream = "127.0.0.1:7000";         // the local shardd
  std::string cert_file;                           // this pod's leaf SVID (PEM)
  std::string key_file;                            // its private key (PEM)
  std::string ca_file;                             // the job CA bundle (PEM)
  std::string policy_file;                         // DESIGN §4 JSON
  // Peer SPIFFE ID → host:port of that peer's inbound listener.
  std::map<std::string, std::string> peers;
  int64_t max_message_bytes = 64 * 1024 * 1024;
  // The largest request header list (HTTP/2 counting: name + value + 32 bytes per
  // field, over :path, :authority and the request metadata); larger requests are
  // refused with RESOURCE_EXHAUSTED before anything is logged. Envoy's default.
  int64_t max_header_list_bytes = 60 * 1024;
  std::chrono::milliseconds handshake_timeout{10000};
  // h2 plane: a peer connection with waiting calls and nothing received for this long
  // is sent a PING, and closed when nothing answers within another 10 s (its calls end
  // UNAVAILABLE). 0 = off.
  std::chrono::milliseconds peer_keepalive{15000};
  // Inbound, before gRPC sees a connection: the time a client has to send its whole
  // ClientHello, and how many such connections may wait, from one source address and
  // in all (over a cap the oldest that sent nothing decidable is closed; accepting
  // never stops).
  std::chrono::milliseconds first_bytes_timeout{2000};
  int64_t max_pending_connections = 1024;
  int64_t max_pending_per_source = 64;
  // How often certificate, key, CA and policy files are checked for changes.
  std::chrono::milliseconds reload_interval{1000};
  std::string audit_file;  // optional: hash-chained audit log (audit.h)
  bool audit_stdout = false;  // also write each audit line to stdout (the cluster's log pipeline)
  // The exposure ledger (ledger.h): required for parameter export to be possible at
  // all; without it every export is refused. The key file holds the 32-byte HMAC key.
  std::string ledger_file;
  std::string ledger_key_file;
  // The lowest ledger sequence accepted at start (the operator renders the highest it
  // has seen published in shardguard_ledger_sequence). A ledger file with a lower
  // sequence, or none when this is > 0, is refused: every export is refused (rule
  // "ledger-rolled-back") and the file is never written; other calls are relayed.
  uint64_t ledger_min_sequence = 0;
  // L4 tunnels (h2 plane only; docs/sidecar.md "Tunnels"). --tunnel
  // SERVICE@LISTEN=PEER_ID: plain TCP accepted on the loopback LISTEN is carried over
  // mTLS to PEER_ID's inbound listener (its --peer address) as SERVICE ("store" or
  // "gloo", the methods policy::kTunnelStoreMethod / kTunnelGlooMethod).
  struct Tunnel {
    std::string service;
    std::string listen;
    std::string peer_id;
  };
  std::vector<Tunnel> tunnels;
  // Inbound: where an allowed Store tunnel goes (loopback host:port; "" = refused).
  std::string tunnel_store;
  // Inbound: the file (one line per peer, "<SPIFFE ID> <loopback host:port>") that
  // says where an allowed Gloo tunnel of that peer goes; re-read for every tunnel.
  std::string tunnel_map_file;
};

class Proxy {
 public:
  // Validates the configuration (throws std::invalid_argument naming the field and
  // the value) and registers its metrics in `registry`. Starts nothing.
  Proxy(ProxyConfig config, std::shared_ptr<prometheus::Registry> registry);
  ~Proxy();  // shutdown()
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // Loads certificates and policy, binds both listeners and starts serving. Throws
  // std::runtime_error naming the address or file that failed. A missing or
  // invalid policy does not throw: the sidecar then refuses every call (rule
  // "no-policy") until a valid file appears.
  void start();
  // Stops accepting, cancels calls in flight after `grace`, joins every thread.
  // Idempotent.
  void shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(2000));

  int inbound_port() const;
  int outbound_port() const;
  // The port of --tunnel number i (ProxyConfig::tunnels' order) once started, else 0.
  int tunnel_port(size_t i) const;
  // Ready: listening, certificates loaded and a policy in force.
  bool ready(std::string* why_not = nullptr) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Parses "spiffe://…=host:port" (the --peer flag). Throws std::invalid_argument.
std::pair<std::string, std::string> parse_peer_flag(const std::string& text);
// Parses "SERVICE@LISTEN=PEER_ID" (the --tunnel flag): the form only; Proxy checks the
// service, the address and the peer. Throws std::invalid_argument naming the flag.
ProxyConfig::Tunnel parse_tunnel_flag(const std::string& text);

}  // namespace shardguard::sidecar
