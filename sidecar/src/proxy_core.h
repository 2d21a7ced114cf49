// What both data planes of shard-sidecar share (proxy.h; the gRPC plane in proxy.cpp,
// the HTTP/2 plane in h2_plane.cpp): configuration, metrics, the policy store, the
// audit log, the exposure ledger, and the plane-independent halves of every decision
// (inbound and outbound routing, the export guard), so that a call is decided,
// counted, logged and audited the same way whichever engine relays it.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>
#include <initializer_list>
#include <string_view>
#include <unordered_map>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "shardguard/policy/policy.h"
#include "shardguard/sidecar/acceptor.h"
#include "shardguard/sidecar/audit.h"
#include "shardguard/sidecar/ledger.h"
#include "shardguard/sidecar/policy_store.h"
#include "shardguard/sidecar/proxy.h"

namespace shardguard::sidecar {

// gRPC status codes by number (both planes report them under these names).
enum GrpcStatus : int {
  kOk = 0,
  kCancelled = 1,
  kInvalidArgument = 3,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kInternal = 13,
  kUnavailable = 14,
};
// The label of a gRPC status code in shardguard_proxy_requests_total.
std::string grpc_code_name(int code);

// The address of a connection's peer without the port (an IPv4 client of a dual-stack
// listener as IPv4): the key of the per-source caps, the acceptor's and the tunnels'.
std::string source_address(const sockaddr_storage& sa);

// A file whose contents are re-read when its (inode, size, mtime) changes.
class WatchedFile {
 public:
  explicit WatchedFile(std::string path) : path_(std::move(path)) {}
  // The current contents; re-reads on change. Throws FileError when unreadable and
  // nothing was ever read.
  std::string get(bool* changed = nullptr);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::mutex mu_;
  bool loaded_ = false;
  std::tuple<ino_t, off_t, time_t, long> stamp_{};
  std::string contents_;
};

// The counters of the per-call metrics, found by their label values. prometheus-cpp's
// Family::Add builds a label map, hashes it and takes the family's mutex, which a scrape
// holds while it collects the family; through this cache a call costs a lookup under a
// mutex of our own (shared only by the data-plane threads) and atomic increments, so a
// scrape never holds up a relayed frame. The label values are bounded (methods as
// labelled by method_label, verified peer IDs, rules, status codes), and so is the cache.
class CounterCache {
 public:
  explicit CounterCache(prometheus::Family<prometheus::Counter>& family) : family_(family) {}
  // The counter with these labels (name, value), found by their values; the family's
  // Add runs only the first time.
  using Label = std::pair<const char*, std::string_view>;
  prometheus::Counter& get(std::initializer_list<Label> labels);

 private:
  prometheus::Family<prometheus::Counter>& family_;
  std::mutex mu_;
  std::unordered_map<std::string, prometheus::Counter*> counters_;
};

struct SidecarMetrics {
  explicit SidecarMetrics(prometheus::Registry& r);
  prometheus::Family<prometheus::Counter>& decisions;
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Family<prometheus::Histogram>& duration;
  prometheus::Family<prometheus::Counter>& bytes;
  prometheus::Family<prometheus::Counter>& refusals;
  prometheus::Family<prometheus::Counter>& handshake_failures;
  prometheus::Gauge& cert_expiry;
  prometheus::Family<prometheus::Counter>& reloads;
  prometheus::Gauge& policy_generation;
  prometheus::Family<prometheus::Counter>& exposed;
  prometheus::Family<prometheus::Gauge>& exposure_ratio;
  prometheus::Counter& cert_reloads;
  // Series only with --ledger (Proxy::start).
  prometheus::Family<prometheus::Gauge>& ledger_sequence;
  prometheus::Family<prometheus::Gauge>& ledger_min_sequence;
  std::map<std::string, prometheus::Histogram*, std::less<>> duration_by_direction;  // found without a std::string
  prometheus::Counter* reloads_ok = nullptr;
  prometheus::Counter* reloads_error = nullptr;
  CounterCache decisions_by_label{decisions};
  CounterCache requests_by_label{requests};
  CounterCache bytes_by_label{bytes};
};

// Where a call may go, decided once on its method and peer (before any byte moves).
struct RouteDecision {
  bool allow = false;
  int code = kPermissionDenied;  // refusal: the gRPC status and its message
  std::string message;
  std::string peer;              // allow: the peer's SPIFFE ID (also the metrics label)
  bool export_call = false;      // allow: an export, to be guarded by an ExportLedgerGuard
  int64_t export_budget = 0;
  uint32_t shard = 0;
};

// The verdict on one message: code 0 forwards it, anything else stops the call.
struct MessageVerdict {
  int code = kOk;
  std::string message;
  bool ok() const { return code == kOk; }
};

struct ProxyCore;

// The exposure ledger at work on one export call (proxy.h): the request's range is
// checked against the budget, every chunk must lie inside it and is recorded and
// saved before it is forwarded; done() audits an accepted export once.
class ExportLedgerGuard {
 public:
  ExportLedgerGuard(ProxyCore* core, std::string principal, int64_t budget, uint32_t shard)
      : core_(core), principal_(std::move(principal)), budget_(static_cast<uint64_t>(budget)), shard_(shard) {}
  MessageVerdict request(const std::string& message);   // a serialized ExportRequest
  MessageVerdict response(const std::string& message);  // a serialized ExportChunk
  void done();  // idempotent

 private:
  MessageVerdict refuse(int code, const std::string& reason, uint64_t asked);
  ProxyCore* core_;
  const std::string principal_;
  const uint64_t budget_;
  const uint32_t shard_;
  bool seen_request_ = false;
  uint64_t begin_ = 0, end_ = 0;
  uint64_t bytes_ = 0;
  std::vector<ByteRange> ranges_;
  bool accepted_ = false;
  bool audited_ = false;
};

struct ProxyCore {
  ProxyCore(ProxyConfig c, std::shared_ptr<prometheus::Registry> r);
  virtual ~ProxyCore() = default;

  const ProxyConfig config;
  std::shared_ptr<prometheus::Registry> registry;
  SidecarMetrics metrics;
  std::unique_ptr<PolicyStore> policy;
  std::unique_ptr<AuditLog> audit;
  std::mutex ledger_mu;  // guards ledger (budget check + record are one step)
  std::unique_ptr<ExposureLedger> ledger;
  std::string ledger_key;
  // Set once at start, before serving: why the ledger on disk is not trusted (older
  // than --ledger-min-sequence, or missing). Non-empty: every export is refused and
  // the file is never written.
  std::string ledger_refused;
  prometheus::Gauge* ledger_sequence = nullptr;  // with a ledger only
  WatchedFile ca_file;
  WatchedFile cert_file;
  WatchedFile key_file;

  // Refusals a client can cause at will (a flood) are all counted but logged at most
  // kLogBurst times per reason per kLogWindow; the maintenance thread reports what
  // was held back.
  static constexpr size_t kLogBurst = 10;
  static constexpr std::chrono::seconds kLogWindow{10};
  LogLimiter log_limiter{kLogBurst, kLogWindow};

  void count_handshake_failure(const std::string& reason, const std::string& detail, const std::string& source = "");
  // A request refused for its size before any decision (reason "header_list_too_large"
  // or "message_too_large"): counted, logged rate-limited with a bounded method.
  void count_size_refusal(const char* direction, const char* reason, const char* msg, nlohmann::json fields);
  void log_suppressed();
  // The method as a metrics label: known methods as they are, anything else "other"
  // (a peer must not be able to grow the label set).
  std::string method_label(const std::string& method) const;
  // Peers as labels: only SPIFFE IDs that our CA vouched for (inbound) or that the
  // configuration names (outbound) reach here, so the set is bounded.
  void count_decision(const policy::Decision& d, const std::string& method, const std::string& peer);
  void count_request(const std::string& method, int code, const char* direction,
                     std::chrono::steady_clock::time_point started_at);
  // The byte counter of one (direction, peer) series.
  prometheus::Counter& bytes_counter(const char* direction, const std::string& peer);
  // The method, peer and reason (which quotes them) are logged and audited as bounded
  // prefixes: they come from the caller.
  void audit_deny(const policy::Decision& d, const std::string& peer, const std::string& method);
  void audit_event(AuditEvent e);
  // Publishes one (principal, shard) of the ledger; ledger_mu held.
  void publish_exposure(const std::string& principal, uint32_t shard, uint64_t newly);
  std::string ca_pem() { return ca_file.get(); }

  // Inbound: `peer` is the SPIFFE ID the handshake verified ("" when none). Counts
  // the decision (an allowed export is counted by its guard) and audits a refusal.
  RouteDecision decide_inbound(const std::string& peer, const std::string& method);
  // Outbound: the configured peer the egress policy lets `method` go to, the one
  // `requested` (the shardguard-target header, "" when absent) names or the only one.
  RouteDecision decide_outbound(const std::string& requested, const std::string& method);
};

}  // namespace shardguard::sidecar
