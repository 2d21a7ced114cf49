// The exposure ledger (issue 3 item 4, DESIGN.md §5): which parameter bytes of
// which shard each principal has received through the export RPC. Only unique
// byte ranges count, so re-sending the same bytes is not counted twice.
//
// Layers, pure first:
// - IntervalSet: a set of half-open byte ranges [begin, end) over uint64.
// - ExposureLedger: per (principal SPIFFE ID, shard index) an IntervalSet, plus the
//   total parameter bytes of each shard (for the ratio), and the budget check.
// - save()/load(): the only I/O. The file is JSON with an HMAC-SHA256 over its
//   canonical body, written atomically with mode 0600, so that a restart neither
//   resets budgets nor accepts a tampered file.
// - sequence(): a counter sealed with the rest, raised by every save(). An older
//   sealed copy put back in place verifies, but carries a lower sequence; whoever
//   recorded the higher one (the operator, from shardguard_ledger_sequence) can tell
//   (the sidecar's --ledger-min-sequence).
//
// Ranges are trusted as given: the proxy must check a request's ranges against the
// shard's size before recording them (ratio() is clamped to 1 regardless).
//
// Thread-safety: none. IntervalSet and ExposureLedger are plain values; the proxy
// keeps one ledger behind one mutex and calls try_record() under it, which makes
// the budget check and the record one step.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace shardguard::sidecar {

// A half-open byte range [begin, end). begin >= end is empty.
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  bool operator==(const ByteRange& o) const { return begin == o.begin && end == o.end; }
};

class IntervalSet {
 public:
  // Adds [begin, end), merging with overlapping and adjacent ranges. Returns the
  // bytes that were not covered before. An empty range adds nothing and returns 0.
  uint64_t add(uint64_t begin, uint64_t end);

  // How many bytes of [begin, end) are not yet covered (0 for an empty range).
  uint64_t uncovered(uint64_t begin, uint64_t end) const;

  // Whether the byte at offset is covered.
  bool contains(uint64_t offset) const;
  // Whether every byte of [begin, end) is covered (true for an empty range).
  bool contains(uint64_t begin, uint64_t end) const;

  // Total covered bytes. Cannot overflow: every range lies inside [0, UINT64_MAX).
  uint64_t covered() const { return covered_; }
  bool empty() const { return ranges_.empty(); }

  // The disjoint, non-adjacent ranges in increasing order.
  std::vector<ByteRange> ranges() const;

 private:
  std::map<uint64_t, uint64_t> ranges_;  // begin -> end; disjoint, not adjacent
  uint64_t covered_ = 0;
};

class LedgerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The HMAC key must be at least this long (the sidecar uses a 32-byte key file,
// see load_key_file in common/crypto.h).
inline constexpr size_t kLedgerMinKeyBytes = 16;

class ExposureLedger {
 public:
  struct Entry {
    std::string principal;
    uint32_t shard = 0;
    uint64_t exposed_bytes = 0;
    double ratio = 0.0;
  };

  // The shard's total parameter bytes (the denominator of ratio()).
  void set_shard_bytes(uint32_t shard, uint64_t bytes);
  std::optional<uint64_t> shard_bytes(uint32_t shard) const;

  // Records that principal received [begin, end) of shard; returns the bytes that
  // principal had not received before.
  uint64_t record(const std::string& principal, uint32_t shard, uint64_t begin, uint64_t end);

  uint64_t exposed_bytes(const std::string& principal, uint32_t shard) const;
  // Over all shards: what the per-principal export budget of the policy limits.
  uint64_t exposed_bytes(const std::string& principal) const;

  // exposed / shard bytes, clamped to [0, 1]; 0 when the shard's size is unknown or 0.
  double ratio(const std::string& principal, uint32_t shard) const;

  // Whether recording [begin, end) of shard would take principal's unique exposed
  // bytes (over all shards) above budget_bytes. Bytes already received are free.
  bool would_exceed(const std::string& principal, uint64_t budget_bytes, uint32_t shard,
                    uint64_t begin, uint64_t end) const;

  // would_exceed() then record(), as one step: nullopt (and nothing recorded) when
  // over budget, else the newly exposed bytes.
  std::optional<uint64_t> try_record(const std::string& principal, uint64_t budget_bytes,
                                     uint32_t shard, uint64_t begin, uint64_t end);

  // Every (principal, shard) with its exposure, sorted by principal then shard
  // (for the metrics shardguard_param_bytes_exposed_total / shardguard_exposure_ratio).
  std::vector<Entry> entries() const;

  const IntervalSet* ranges(const std::string& principal, uint32_t shard) const;

  // Exposures and shard sizes are equal (the sequence is not compared).
  bool operator==(const ExposureLedger& o) const;

  // How many times this ledger has been saved (0: never). Sealed with the rest.
  uint64_t sequence() const { return sequence_; }
  void set_sequence(uint64_t sequence) { sequence_ = sequence; }

  // Raises the sequence by one, then writes the ledger atomically (mode 0600) with
  // an HMAC-SHA256 under key. Every save, successful or not, uses a new sequence.
  // Throws LedgerError (short key, or the sequence cannot grow) or FileError (I/O).
  void save(const std::string& path, const std::string& key);

  // Reads a ledger written by save(). A missing file is an empty ledger with
  // sequence 0 (load_existing tells the two apart). A file of version 1, from before
  // the sequence, reads as sequence 0. Throws
  // LedgerError naming the path when the file cannot be read, is not a ledger, its
  // HMAC does not verify (tampered, or another key) or its content is invalid;
  // never returns partial state.
  static ExposureLedger load(const std::string& path, const std::string& key);
  // The same, but nullopt when the file does not exist.
  static std::optional<ExposureLedger> load_existing(const std::string& path, const std::string& key);

  // The serialized form and its inverse (exposed for tests and shardctl).
  std::string serialize(const std::string& key) const;
  static ExposureLedger deserialize(const std::string& text, const std::string& key,
                                    const std::string& where);

 private:
  std::map<std::pair<std::string, uint32_t>, IntervalSet> exposure_;
  std::map<uint32_t, uint64_t> shard_bytes_;
  uint64_t sequence_ = 0;
};

// HMAC-SHA256(key, data) as lower-case hex (OpenSSL EVP_MAC). Throws LedgerError.
std::string hmac_sha256_hex(const std::string& key, const std::string& data);

}  // namespace shardguard::sidecar
