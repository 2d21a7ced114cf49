#include "shardguard/sidecar/ledger.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <limits>

#include <nlohmann/json.hpp>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "shardguard/common/files.h"

namespace shardguard::sidecar {
namespace {

using nlohmann::json;

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
constexpr int kLedgerVersion = 2;     // version 2: with "sequence"
constexpr int kLedgerVersionNoSequence = 1;
// Domain separation: the MAC input starts with this, so a MAC made for another
// purpose under the same key is never accepted as a ledger's.
constexpr const char* kMacLabel = "shardguard-exposure-ledger-v1\n";

uint64_t sat_add(uint64_t a, uint64_t b) { return a > kMax - b ? kMax : a + b; }

std::string to_hex(const unsigned char* p, size_t n) {
  static const char* kDigits = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[p[i] >> 4];
    out[2 * i + 1] = kDigits[p[i] & 0xf];
  }
  return out;
}

void check_key(const std::string& key) {
  if (key.size() < kLedgerMinKeyBytes) {
    throw LedgerError("exposure ledger HMAC key has " + std::to_string(key.size()) +
                      " bytes, need at least " + std::to_string(kLedgerMinKeyBytes));
  }
}

// The canonical body: compact JSON of an object whose keys nlohmann keeps sorted.
std::string canonical(const json& body) { return body.dump(); }

}  // namespace

// ---- IntervalSet -------------------------------------------------------------

uint64_t IntervalSet::add(uint64_t begin, uint64_t end) {
  if (begin >= end) return 0;
  const uint64_t before = covered_;
  uint64_t lo = begin;
  uint64_t hi = end;
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin() && std::prev(it)->second >= begin) --it;  // overlaps or touches
  while (it != ranges_.end() && it->first <= end) {
    lo = std::min(lo, it->first);
    hi = std::max(hi, it->second);
    covered_ -= it->second - it->first;
    it = ranges_.erase(it);
  }
  ranges_.emplace_hint(it, lo, hi);
  covered_ += hi - lo;
  return covered_ - before;
}

uint64_t IntervalSet::uncovered(uint64_t begin, uint64_t end) const {
  if (begin >= end) return 0;
  uint64_t overlap = 0;
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin() && std::prev(it)->second > begin) --it;
  for (; it != ranges_.end() && it->first < end; ++it) {
    overlap += std::min(end, it->second) - std::max(begin, it->first);
  }
  return (end - begin) - overlap;
}

bool IntervalSet::contains(uint64_t offset) const {
  auto it = ranges_.upper_bound(offset);
  if (it == ranges_.begin()) return false;
  --it;
  return offset < it->second;
}

bool IntervalSet::contains(uint64_t begin, uint64_t end) const {
  return uncovered(begin, end) == 0;
}

std::vector<ByteRange> IntervalSet::ranges() const {
  std::vector<ByteRange> out;
  out.reserve(ranges_.size());
  for (const auto& [b, e] : ranges_) out.push_back({b, e});
  return out;
}

// ---- ExposureLedger ----------------------------------------------------------

void ExposureLedger::set_shard_bytes(uint32_t shard, uint64_t bytes) { shard_bytes_[shard] = bytes; }

std::optional<uint64_t> ExposureLedger::shard_bytes(uint32_t shard) const {
  auto it = shard_bytes_.find(shard);
  if (it == shard_bytes_.end()) return std::nullopt;
  return it->second;
}

uint64_t ExposureLedger::record(const std::string& principal, uint32_t shard, uint64_t begin,
                                uint64_t end) {
  if (begin >= end) return 0;
  return exposure_[{principal, shard}].add(begin, end);
}

uint64_t ExposureLedger::exposed_bytes(const std::string& principal, uint32_t shard) const {
  const IntervalSet* set = ranges(principal, shard);
  return set ? set->covered() : 0;
}

uint64_t ExposureLedger::exposed_bytes(const std::string& principal) const {
  uint64_t total = 0;
  for (auto it = exposure_.lower_bound({principal, 0});
       it != exposure_.end() && it->first.first == principal; ++it) {
    total = sat_add(total, it->second.covered());
  }
  return total;
}

double ExposureLedger::ratio(const std::string& principal, uint32_t shard) const {
  auto size = shard_bytes(shard);
  if (!size || *size == 0) return 0.0;
  const double r = static_cast<double>(exposed_bytes(principal, shard)) / static_cast<double>(*size);
  return std::min(1.0, r);
}

bool ExposureLedger::would_exceed(const std::string& principal, uint64_t budget_bytes, uint32_t shard,
                                  uint64_t begin, uint64_t end) const {
  const IntervalSet* set = ranges(principal, shard);
  const uint64_t fresh = set ? set->uncovered(begin, end) : (begin < end ? end - begin : 0);
  return sat_add(exposed_bytes(principal), fresh) > budget_bytes;
}

std::optional<uint64_t> ExposureLedger::try_record(const std::string& principal, uint64_t budget_bytes,
                                                   uint32_t shard, uint64_t begin, uint64_t end) {
  if (would_exceed(principal, budget_bytes, shard, begin, end)) return std::nullopt;
  return record(principal, shard, begin, end);
}

std::vector<ExposureLedger::Entry> ExposureLedger::entries() const {
  std::vector<Entry> out;
  out.reserve(exposure_.size());
  for (const auto& [k, set] : exposure_) {
    out.push_back({k.first, k.second, set.covered(), ratio(k.first, k.second)});
  }
  return out;
}

const IntervalSet* ExposureLedger::ranges(const std::string& principal, uint32_t shard) const {
  auto it = exposure_.find({principal, shard});
  return it == exposure_.end() ? nullptr : &it->second;
}

bool ExposureLedger::operator==(const ExposureLedger& o) const {
  if (shard_bytes_ != o.shard_bytes_ || exposure_.size() != o.exposure_.size()) return false;
  for (auto a = exposure_.begin(), b = o.exposure_.begin(); a != exposure_.end(); ++a, ++b) {
    if (a->first != b->first || a->second.ranges() != b->second.ranges()) return false;
  }
  return true;
}

// ---- persistence -------------------------------------------------------------
//
//   {"body": {"exposure": [{"principal": "spiffe://…", "shard": 0,
//                           "ranges": [[0, 4096], [8192, 12288]]}, …],
//             "sequence": 12,
//             "shards": [{"shard": 0, "bytes": 1048576}, …],
//             "version": 2},
//    "hmac": "<hex HMAC-SHA256(key, label || canonical(body))>"}

std::string hmac_sha256_hex(const std::string& key, const std::string& data) {
  EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  if (!mac) throw LedgerError("HMAC-SHA256: EVP_MAC_fetch failed");
  EVP_MAC_CTX* ctx = EVP_MAC_CTX_new(mac);
  EVP_MAC_free(mac);
  if (!ctx) throw LedgerError("HMAC-SHA256: EVP_MAC_CTX_new failed");
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                         OSSL_PARAM_construct_end()};
  unsigned char out[EVP_MAX_MD_SIZE];
  size_t out_len = 0;
  const bool ok =
      EVP_MAC_init(ctx, reinterpret_cast<const unsigned char*>(key.data()), key.size(), params) == 1 &&
      EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(data.data()), data.size()) == 1 &&
      EVP_MAC_final(ctx, out, &out_len, sizeof(out)) == 1;
  EVP_MAC_CTX_free(ctx);
  if (!ok) throw LedgerError("HMAC-SHA256 failed");
  return to_hex(out, out_len);
}

std::string ExposureLedger::serialize(const std::string& key) const {
  check_key(key);
  json exposure = json::array();
  for (const auto& [k, set] : exposure_) {
    if (set.empty()) continue;
    json ranges = json::array();
    for (const auto& r : set.ranges()) ranges.push_back(json::array({r.begin, r.end}));
    exposure.push_back({{"principal", k.first}, {"shard", k.second}, {"ranges", std::move(ranges)}});
  }
  json shards = json::array();
  for (const auto& [shard, bytes] : shard_bytes_) shards.push_back({{"shard", shard}, {"bytes", bytes}});
  json body = {{"version", kLedgerVersion},
               {"sequence", sequence_},
               {"exposure", std::move(exposure)},
               {"shards", std::move(shards)}};
  const std::string canon = canonical(body);
  json doc = {{"body", std::move(body)}, {"hmac", hmac_sha256_hex(key, kMacLabel + canon)}};
  return doc.dump(1) + "\n";
}

ExposureLedger ExposureLedger::deserialize(const std::string& text, const std::string& key,
                                           const std::string& where) {
  check_key(key);
  auto fail = [&](const std::string& why) -> LedgerError {
    return LedgerError("exposure ledger " + where + ": " + why);
  };
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) throw fail("not valid JSON");
  if (!doc.is_object() || doc.size() != 2 || !doc.contains("body") || !doc.contains("hmac") ||
      !doc["body"].is_object() || !doc["hmac"].is_string()) {
    throw fail("not a ledger (want exactly {\"body\": {...}, \"hmac\": \"...\"})");
  }
  // Authenticate before looking at anything in the body.
  const std::string expected = hmac_sha256_hex(key, kMacLabel + canonical(doc["body"]));
  const std::string& got = doc["hmac"].get_ref<const std::string&>();
  if (got.size() != expected.size() || CRYPTO_memcmp(got.data(), expected.data(), got.size()) != 0) {
    throw fail("HMAC does not verify: the file was modified or was written under another key");
  }
  const json& body = doc["body"];
  auto is_u64 = [](const json& v) { return v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0); };
  auto is_u32 = [&](const json& v) { return is_u64(v) && v.get<uint64_t>() <= std::numeric_limits<uint32_t>::max(); };
  if (!body.contains("version") || (body["version"] != kLedgerVersion && body["version"] != kLedgerVersionNoSequence)) {
    throw fail("unsupported version " + body.value("version", json()).dump());
  }
  const bool with_sequence = body["version"] == kLedgerVersion;
  if (body.size() != (with_sequence ? 4u : 3u) || !body.contains("exposure") || !body.contains("shards") ||
      (with_sequence && !body.contains("sequence"))) {
    throw fail(with_sequence ? "body must have exactly version, sequence, exposure and shards"
                             : "body must have exactly version, exposure and shards");
  }
  if (!body["exposure"].is_array() || !body["shards"].is_array()) throw fail("exposure and shards must be arrays");

  ExposureLedger out;
  if (with_sequence) {
    if (!is_u64(body["sequence"])) throw fail("sequence must be an unsigned integer");
    out.sequence_ = body["sequence"].get<uint64_t>();
  }
  size_t i = 0;
  for (const json& s : body["shards"]) {
    const std::string at = "shards[" + std::to_string(i++) + "]";
    if (!s.is_object() || s.size() != 2 || !s.contains("shard") || !s.contains("bytes") ||
        !is_u32(s["shard"]) || !is_u64(s["bytes"])) {
      throw fail(at + ": want {\"shard\": uint32, \"bytes\": uint64}");
    }
    if (!out.shard_bytes_.emplace(s["shard"].get<uint32_t>(), s["bytes"].get<uint64_t>()).second) {
      throw fail(at + ": duplicate shard");
    }
  }
  i = 0;
  for (const json& e : body["exposure"]) {
    const std::string at = "exposure[" + std::to_string(i++) + "]";
    if (!e.is_object() || e.size() != 3 || !e.contains("principal") || !e.contains("shard") ||
        !e.contains("ranges") || !e["principal"].is_string() || !is_u32(e["shard"]) ||
        !e["ranges"].is_array()) {
      throw fail(at + ": want {\"principal\": string, \"shard\": uint32, \"ranges\": [[begin, end], ...]}");
    }
    auto k = std::make_pair(e["principal"].get<std::string>(), e["shard"].get<uint32_t>());
    if (out.exposure_.count(k)) throw fail(at + ": duplicate (principal, shard)");
    IntervalSet& set = out.exposure_[k];
    for (const json& r : e["ranges"]) {
      if (!r.is_array() || r.size() != 2 || !is_u64(r[0]) || !is_u64(r[1]) ||
          r[0].get<uint64_t>() >= r[1].get<uint64_t>()) {
        throw fail(at + ": ranges must be [begin, end] with begin < end");
      }
      set.add(r[0].get<uint64_t>(), r[1].get<uint64_t>());
    }
  }
  return out;
}

void ExposureLedger::save(const std::string& path, const std::string& key) {
  check_key(key);
  if (sequence_ == kMax) throw LedgerError("exposure ledger " + path + ": the sequence cannot grow any more");
  // Raised before the write and kept when it fails: a sequence is never used for two
  // different contents, and what was published stays at most what is on disk.
  ++sequence_;
  write_file_atomic(path, serialize(key), 0600);
}

ExposureLedger ExposureLedger::load(const std::string& path, const std::string& key) {
  auto found = load_existing(path, key);
  return found ? std::move(*found) : ExposureLedger{};
}

std::optional<ExposureLedger> ExposureLedger::load_existing(const std::string& path, const std::string& key) {
  check_key(key);
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::nullopt;
    throw LedgerError("exposure ledger " + path + ": " + std::strerror(errno));
  }
  std::string text;
  try {
    text = read_file(path);
  } catch (const FileError& e) {
    throw LedgerError(std::string("exposure ledger ") + path + ": " + e.what());
  }
  return deserialize(text, key, path);
}

}  // namespace shardguard::sidecar
