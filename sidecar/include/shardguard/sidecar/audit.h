// The audit log (issue 3 item 5): one JSON line for every deny, every
// parameter-bearing allow and every policy reload (rule "policy-reload", decision
// "allow" when applied, "deny" when refused, method = the policy file), hash-chained so that `shardctl audit verify` detects an
// edited, dropped, reordered or truncated line.
//
// ## Line format
//
//   {"ts":"2024-05-01T12:00:00.123Z","seq":1,"peer":"spiffe://…","method":"/…",
//    "rule":"export","decision":"allow","bytes":4096,"ranges_digest":"<hex>",
//    "prev":"<hex>","hash":"<hex>"}\n
//
// exactly these keys in this order, compact, non-ASCII escaped (so a line is
// always printable ASCII). seq counts from 1. `prev` is the previous line's hash
// (kAuditGenesis for the first line) and
//   hash = sha256_hex(prev + body)
// where body is the line without its `,"hash":"…"` member, i.e. the compact
// serialization of {ts, seq, peer, method, rule, decision, bytes, ranges_digest, prev}.
// verify_audit_log() requires each line to be byte-for-byte that serialization.
//
// Limits, by design of a plain hash chain: someone who can rewrite the file can
// recompute every hash after their edit, and dropping whole lines at the end leaves
// a valid chain. Anchor the last (seq, hash) elsewhere (see last_seq/last_hash) to
// detect either.
#pragma once

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "shardguard/sidecar/ledger.h"

namespace shardguard::sidecar {

// The `prev` of the first line.
inline constexpr const char* kAuditGenesis =
    "0000000000000000000000000000000000000000000000000000000000000000";

class AuditError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct AuditEvent {
  std::string ts;        // RFC 3339 UTC; empty: AuditLog::append fills in the current time
  std::string peer;      // SPIFFE ID from the handshake (or what the proxy saw)
  std::string method;    // the gRPC method path as received
  std::string rule;      // the rule that decided
  std::string decision;  // "allow" or "deny"
  uint64_t bytes = 0;    // parameter bytes sent (allow) or asked for (deny)
  std::string ranges_digest;  // ranges_digest() of the requested ranges, or ""
};

// sha256_hex of the ranges as "begin-end" joined by ","; "" for no ranges.
std::string ranges_digest(const std::vector<ByteRange>& ranges);

// Current time as RFC 3339 UTC with milliseconds.
std::string audit_timestamp_now();

// The line append() writes for event after (seq - 1) lines ending in prev_hash,
// newline included.
std::string format_audit_line(const AuditEvent& event, uint64_t seq, const std::string& prev_hash);

struct AuditVerifyResult {
  bool ok = false;
  uint64_t lines = 0;           // lines that verified, before the first bad one
  uint64_t first_bad_line = 0;  // 1-based; 0 when ok
  std::string reason;           // empty when ok
  std::string last_hash;        // hash of the last good line (kAuditGenesis if none)
};

// Checks the whole chain of the file at path (an empty file is a valid, empty log).
// Never throws: an unreadable file is reported as not ok with first_bad_line 0.
AuditVerifyResult verify_audit_log(const std::string& path);
// The same over the file's contents.
AuditVerifyResult verify_audit_text(const std::string& text);

// An append-only audit log. Opening an existing file verifies its whole chain and
// continues it; a broken chain is refused. Each line goes out in one write(2) on an
// O_APPEND descriptor. Thread-safe: append() may be called from any thread.
class AuditLog {
 public:
  // Creates the file (mode 0600) if missing. Throws AuditError naming the path when
  // it cannot be opened or its chain does not verify. With mirror_fd >= 0 (stdout, for
  // a cluster's log pipeline), every line appended to the file is written there too,
  // the same bytes in one write(2); a failed mirror write does not stop the file.
  explicit AuditLog(const std::string& path, int mirror_fd = -1);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends one line; no exceptions. On failure returns false with *error set; after
  // a failed or short write the log refuses every further append (the chain on disk
  // may be broken; reopen to find out).
  bool append(const AuditEvent& event, std::string* error = nullptr);

  uint64_t last_seq() const;
  std::string last_hash() const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  int mirror_fd_ = -1;
  mutable std::mutex mu_;
  uint64_t seq_ = 0;
  std::string hash_;
  bool failed_ = false;
};

}  // namespace shardguard::sidecar
