// The HTTP/2 relay of shard-sidecar's new data plane (issue 17), on nghttp2: it speaks
// HTTP/2 on both sides and never terminates gRPC. Downstream, one nghttp2 server
// session per accepted connection; upstream, ONE long-lived nghttp2 client session per
// upstream (per worker thread) with every relayed stream multiplexed on it.
//
//   client ══TLS/h2══▶ [downstream session] ─decide─▶ [upstream session] ══h2══▶ server
//
// Per stream: the request HEADERS are complete before anything happens; header lists
// over the limit are refused (RESOURCE_EXHAUSTED), then the caller's decide() runs on
// (peer SPIFFE ID, :path, headers) BEFORE any byte goes upstream; a refusal is a gRPC
// trailers-only response. DATA is then moved both ways through a per-direction pipe:
// one copy in (from nghttp2's receive buffer), none out (NGHTTP2_DATA_FLAG_NO_COPY: the
// frame is written straight from the pipe into the connection's output buffer). Window
// updates are manual: the bytes of a DATA frame are given back to its sender
// (nghttp2_session_consume) only when they have been written on the other side, so a
// stream never holds more than its flow-control window, however slowly its reader reads.
// A gRPC frame inspector on each direction reads the 5-byte message prefixes and refuses
// a message over max_message_bytes from its prefix.
//
// Threads: a RelayWorker belongs to one EventLoop and is used on that loop's thread
// only. Relay runs N workers, each on its own thread, and a listener that hands accepted
// sockets round-robin to them. Hooks run on the worker threads: they must be quick and
// thread-safe (the policy decision is a pure function on an immutable snapshot).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "shardguard/sidecar/h2/event_loop.h"
#include "shardguard/sidecar/h2/grpc_frames.h"
#include "shardguard/sidecar/h2/tls.h"

namespace shardguard::sidecar::h2 {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

struct UpstreamConfig {
  std::string address;              // host:port (resolved when a connection is opened)
  std::shared_ptr<TlsContext> tls;  // client side; null: plaintext HTTP/2 (prior knowledge)
  // Tests and the fuzzer: returns a connected non-blocking socket (or -1: the
  // connection failed) instead of dialling `address`.
  std::function<int()> dial;
};

struct RelayLimits {
  // HTTP/2 flow-control windows the relay advertises (and so the most it buffers per
  // stream and per downstream connection in each direction). nghttp2 caps them at 2^31-1.
  // 4 MiB per stream keeps a 1 MiB-message stream at full speed on loopback and a LAN
  // (sidecar_bench: the same GB/s as 16 MiB) while a sidecar relaying one stream each way
  // peaks at about 26 MB RSS instead of 45-64 MB.
  uint32_t stream_window = 4u << 20;
  uint32_t connection_window = 256u << 20;
  uint32_t max_concurrent_streams = 4096;
  // Request header lists larger than this (RFC 9113 §6.5.2 counting) are refused with
  // RESOURCE_EXHAUSTED before decide(); SETTINGS_MAX_HEADER_LIST_SIZE is twice it.
  size_t max_header_list_bytes = 60 * 1024;
  uint64_t max_message_bytes = 64u << 20;
  // Encoded frames a connection queues for its socket before it stops producing more.
  size_t max_output_bytes = 256 * 1024;
  std::chrono::milliseconds handshake_timeout{10000};
  // Upstream liveness (0 = off): while an upstream connection carries streams and has
  // received nothing for keepalive_interval, it is sent a PING; if nothing arrives
  // within keepalive_timeout after that, it is closed (its streams end UNAVAILABLE and
  // the next call opens a new connection). A frozen or vanished peer, from which no RST
  // ever comes, would otherwise hold every call on the connection. Only streams that
  // wait are pinged, so a gRPC server's ping-abuse policy (no pings on idle
  // connections) is not provoked; the sidecar turns it on for its peers.
  std::chrono::milliseconds keepalive_interval{0};
  std::chrono::milliseconds keepalive_timeout{10000};
};

// The request a decision is made on (valid during the call of decide only).
struct RequestInfo {
  uint64_t call_id;          // the CallInfo::id the other hooks will see for this call
  std::string_view peer_id;  // verified SPIFFE ID (TLS) or the listener's plaintext identity
  std::string_view path;     // :path
  const HeaderList& headers;  // every field as received, pseudo-headers included
};

struct Decision {
  bool allow = false;
  std::string upstream;   // allow: the RelayConfig::upstreams key to relay to
  bool inspect = false;   // allow: hand every whole message to on_message
  GrpcCode code = GrpcCode::permission_denied;  // refuse
  std::string message;                           // refuse: grpc-message (sent percent-encoded)
  static Decision allow_to(std::string upstream, bool inspect = false) {
    Decision d;
    d.allow = true;
    d.upstream = std::move(upstream);
    d.inspect = inspect;
    return d;
  }
  static Decision refuse(GrpcCode code, std::string message) {
    Decision d;
    d.code = code;
    d.message = std::move(message);
    return d;
  }
};

enum class Direction { request, response };

struct CallInfo {
  uint64_t id = 0;  // unique per process
  std::chrono::steady_clock::time_point started;  // when its HEADERS were complete
  std::string peer_id;
  std::string path;
  std::string upstream;
};

struct CallEnd {
  CallInfo info;
  // The grpc-status the client was sent (the server's or the relay's), -1 when the
  // stream ended with RST_STREAM instead (reset_code then says which).
  int grpc_status = -1;
  std::string grpc_message;
  uint32_t reset_code = 0;
  bool refused_by_relay = false;   // decide(), a limit, or on_message refused it
  // Why, when refused_by_relay: "header_list_too_large", "message_too_large" (a limit,
  // before any decision or from a message prefix), "decision" (decide()), "message"
  // (on_message), "bad_request" (no valid :path), "no_upstream".
  std::string refusal_reason;
  bool upstream_failed = false;    // the upstream connection failed or went away
  uint64_t request_bytes = 0;      // DATA payload bytes relayed upstream
  uint64_t response_bytes = 0;     // DATA payload bytes relayed downstream
  uint64_t request_messages = 0;   // gRPC message prefixes seen
  uint64_t response_messages = 0;
};

struct RelayHooks {
  // Required. Runs once per request, on its complete HEADERS.
  std::function<Decision(const RequestInfo&)> decide;
  // Streams whose decision asked to inspect: every whole message, each direction,
  // before it is forwarded; a refusal ends the call (trailers downstream, RST upstream).
  std::function<Decision(const CallInfo&, Direction, const GrpcMessage&)> on_message;
  // Every call that passed its HEADERS, once, when it ends downstream.
  std::function<void(const CallEnd&)> on_call_end;
  // A downstream connection that failed before HTTP/2 started: the verifier's reason
  // token when it refused the certificate, else "alpn", "handshake_timeout" or "tls".
  std::function<void(std::string_view reason, std::string_view detail)> on_handshake_failure;
};

struct RelayConfig {
  std::map<std::string, UpstreamConfig> upstreams;
  std::shared_ptr<TlsContext> server_tls;  // null: plaintext downstream (loopback listener)
  std::string plaintext_peer_id;          // the identity of a plaintext downstream
  // Request headers never relayed upstream (lower case), beyond the hop-by-hop ones.
  std::vector<std::string> drop_request_headers;
  RelayLimits limits;
};

// Counters and gauges of one relay, all workers together (relaxed atomics).
struct RelayStats {
  std::atomic<int64_t> buffered_bytes{0};       // DATA bytes held in pipes now
  std::atomic<int64_t> peak_buffered_bytes{0};
  std::atomic<int64_t> output_bytes{0};         // encoded frames queued for sockets now
  std::atomic<int64_t> downstream_connections{0};
  std::atomic<int64_t> upstream_connections{0};
  std::atomic<uint64_t> upstream_connects_total{0};
  std::atomic<int64_t> active_calls{0};
  std::atomic<uint64_t> calls_total{0};
  std::atomic<uint64_t> refused_total{0};
  std::atomic<uint64_t> bytes_upstream_total{0};    // DATA payload
  std::atomic<uint64_t> bytes_downstream_total{0};  // DATA payload
  std::atomic<uint64_t> handshake_failures_total{0};
  std::atomic<uint64_t> keepalive_timeouts_total{0};  // upstream connections closed unanswered
};

class RelayWorker {
 public:
  // Throws std::invalid_argument for a config without decide or with a bad limit.
  RelayWorker(EventLoop& loop, RelayConfig config, RelayHooks hooks, std::shared_ptr<RelayStats> stats);
  ~RelayWorker();  // closes everything at once
  RelayWorker(const RelayWorker&) = delete;
  RelayWorker& operator=(const RelayWorker&) = delete;

  // Takes a connected socket as a downstream connection (TLS when the config has a
  // server context). The worker owns and closes it.
  void adopt(int fd);
  // New downstream connections use `tls` (certificate rotation; open connections keep
  // theirs). Null is refused: a TLS listener stays TLS.
  void set_server_tls(std::shared_ptr<TlsContext> tls);
  // New connections to upstream `name` use `tls`; the open one keeps its session.
  void set_upstream_tls(const std::string& name, std::shared_ptr<TlsContext> tls);
  // GOAWAY to every downstream connection; each closes when its streams are done.
  // New connections are refused while draining.
  void drain();
  // Closes every connection now (streams in flight are reset).
  void close_all();
  size_t downstream_connections() const;
  size_t upstream_connections() const;
  bool idle() const;  // no connection at all
  const RelayStats& stats() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// N workers on their own threads behind one TCP listener.
class Relay {
 public:
  Relay(std::string listen_address, RelayConfig config, RelayHooks hooks, int threads = 1);
  ~Relay();  // shutdown(0)
  Relay(const Relay&) = delete;
  Relay& operator=(const Relay&) = delete;
  // Binds (host:port, port 0 = any) and starts the threads. Throws std::runtime_error.
  // An empty listen address binds nothing: connections come through adopt().
  void start();
  // Thread-safe (but not against shutdown(): stop handing sockets first): gives an
  // accepted socket to the next worker (round-robin); the relay owns it from here
  // (closed at once when not started or stopped).
  void adopt(int fd);
  // Thread-safe: rotation for every worker (RelayWorker::set_server_tls / set_upstream_tls).
  void set_server_tls(std::shared_ptr<TlsContext> tls);
  void set_upstream_tls(const std::string& name, std::shared_ptr<TlsContext> tls);
  int port() const { return port_; }
  // Stops accepting, drains (GOAWAY) for at most `grace`, closes the rest, joins.
  void shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(2000));
  const RelayStats& stats() const { return *stats_; }
  std::shared_ptr<RelayStats> stats_ptr() const { return stats_; }

 private:
  struct Worker {
    std::unique_ptr<EventLoop> loop;
    std::unique_ptr<RelayWorker> relay;
    std::thread thread;
  };
  void make_workers();
  void start_workers();
  std::string listen_address_;
  RelayConfig config_;
  RelayHooks hooks_;
  int threads_;
  std::shared_ptr<RelayStats> stats_;
  std::vector<std::unique_ptr<Worker>> workers_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<size_t> next_worker_{0};
  std::atomic<bool> started_{false};
  std::atomic<bool> stopped_{false};
};

// Makes a socket non-blocking with TCP_NODELAY (shared with the acceptor).
void prepare_socket(int fd);

}  // namespace shardguard::sidecar::h2
