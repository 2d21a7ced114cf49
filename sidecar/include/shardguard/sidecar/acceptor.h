// The pure parts of the sidecar's inbound acceptor and of its flood-proof logging
// (issue 16 items 6, 7 and 8b): the ClientHello classifier, the bookkeeping of
// connections that have not sent their first bytes yet, a per-key log rate limiter
// and the bounded prefix every peer-provided string is logged as. proxy.cpp does
// the I/O around them.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace shardguard::sidecar {

// Bounded reason tokens for shardguard_tls_handshake_failures_total{reason} that the
// acceptor decides from a connection's first bytes ("" = a TLS 1.2+ ClientHello that
// offers HTTP/2, or not enough bytes yet to tell — see classify_client_hello).
//   "plaintext"      an HTTP/1.x request or the HTTP/2 connection preface
//   "not_tls"        anything else that is not a TLS handshake record carrying a
//                    well-formed ClientHello (of at most kMaxClientHelloBytes)
//   "tls_version"    a ClientHello offering at most TLS 1.1 (or SSL)
//   "alpn"           a ClientHello without ALPN, or whose ALPN offers none of "h2",
//                    "grpc-exp" and "sg-tunnel/1" (HTTP/1.1 over TLS, `openssl
//                    s_client`, …): gRPC would complete TLS and then close it
//                    without a word
// A ClientHello whose ALPN offers "sg-tunnel/1" and neither "h2" nor "grpc-exp" is
// acceptable and marked `tunnel`: the sidecar's L4 tunnel handler takes it (h2 plane).
struct HelloClass {
  bool complete = false;  // enough bytes were seen to decide
  std::string reason;     // "" when acceptable (complete) or undecided (!complete)
  std::string detail;     // for the log line when refused (bounded, printable)
  bool tunnel = false;    // acceptable, and offers only the tunnel protocol of these
};
// The largest ClientHello (handshake message body) the acceptor reassembles; a real
// one is a few hundred bytes to a few KiB.
inline constexpr size_t kMaxClientHelloBytes = 32 * 1024;
// Pure: classifies the first bytes of a connection: the TLS records up to the end of
// the ClientHello (which may span several records).
HelloClass classify_client_hello(const uint8_t* data, size_t size);

// The connections the acceptor holds until their first bytes decide them, in the
// order they arrived, with two caps: per source address and in all. Pure
// bookkeeping (no I/O); the acceptor closes what it is told to.
class PendingConnections {
 public:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    int fd = -1;
    std::string source;  // the peer's IP address, without the port
    Clock::time_point deadline;
  };
  struct Victim {
    uint64_t id;
    const char* reason;  // "source_limit" or "pending_limit"
  };

  PendingConnections(size_t max_total, size_t max_per_source);
  // Which connection must go before one more from `source` may be added: the oldest
  // of that source when it is at its cap, else the oldest of all when the set is full;
  // nothing when there is room.
  std::optional<Victim> victim_for(const std::string& source) const;
  uint64_t add(int fd, std::string source, Clock::time_point deadline);
  Entry remove(uint64_t id);
  const Entry* find(uint64_t id) const;
  std::optional<uint64_t> oldest() const;
  size_t size() const { return by_id_.size(); }
  size_t count(const std::string& source) const;
  std::vector<int> fds() const;

 private:
  size_t max_total_;
  size_t max_per_source_;
  uint64_t next_id_ = 0;
  std::map<uint64_t, Entry> by_id_;  // arrival order
  std::unordered_map<std::string, std::set<uint64_t>> by_source_;
};

// At most `burst` log lines per key per `window`; what is held back is reported by
// the next line of that key and by take_suppressed(). Keys must come from a bounded
// set (reason tokens). Thread-safe.
class LogLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  LogLimiter(size_t burst, std::chrono::milliseconds window) : burst_(burst), window_(window) {}
  // true: write this line, with *suppressed = lines of the key held back since the
  // last one written.
  bool allow(const std::string& key, Clock::time_point now, uint64_t* suppressed);
  // Keys whose window has ended with lines held back, and how many (reset).
  std::vector<std::pair<std::string, uint64_t>> take_suppressed(Clock::time_point now);

 private:
  struct State {
    Clock::time_point window_start;
    size_t written = 0;
    uint64_t suppressed = 0;
  };
  const size_t burst_;
  const std::chrono::milliseconds window_;
  std::mutex mu_;
  std::map<std::string, State> keys_;
};

// How a peer-provided string (a method path, a header value, a certificate's name)
// is logged or audited: as it is up to `max` bytes, else its first `max` bytes (not
// cutting a UTF-8 sequence) followed by "…(N bytes)" with N its full size.
inline constexpr size_t kLoggedPrefixBytes = 256;
std::string bounded_text(std::string_view text, size_t max = kLoggedPrefixBytes);

}  // namespace shardguard::sidecar
