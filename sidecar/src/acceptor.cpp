// The pure parts of the inbound acceptor (acceptor.h).
#include "shardguard/sidecar/acceptor.h"

#include <algorithm>

namespace shardguard::sidecar {

namespace {

HelloClass refused(const char* reason, std::string detail) {
  HelloClass c;
  c.complete = true;
  c.reason = reason;
  c.detail = std::move(detail);
  return c;
}

// Printable ASCII of an ALPN protocol name, for the log line.
std::string printable(const uint8_t* p, size_t n) {
  std::string out;
  for (size_t i = 0; i < n && out.size() < 64; ++i) out.push_back(p[i] >= 0x20 && p[i] < 0x7f ? static_cast<char>(p[i]) : '?');
  return out;
}

// A reader over the ClientHello body that fails (ok = false) instead of reading past it.
struct Reader {
  const uint8_t* p;
  size_t n;
  size_t at = 0;
  bool ok = true;
  size_t take(size_t bytes) {  // big-endian, bytes <= 3
    if (!ok || n - at < bytes) {
      ok = false;
      return 0;
    }
    size_t v = 0;
    for (size_t i = 0; i < bytes; ++i) v = (v << 8) | p[at + i];
    at += bytes;
    return v;
  }
  const uint8_t* skip(size_t bytes) {
    if (!ok || n - at < bytes) {
      ok = false;
      return nullptr;
    }
    const uint8_t* start = p + at;
    at += bytes;
    return start;
  }
};

// The decision on a complete ClientHello body (after the 4-byte handshake header).
HelloClass check_hello_body(const uint8_t* body, size_t size) {
  Reader r{body, size};
  r.skip(2 + 32);                     // client_version (checked by the caller), random
  const size_t session_id = r.take(1);
  if (session_id > 32) return refused("not_tls", "ClientHello with a session id of " + std::to_string(session_id) + " bytes");
  r.skip(session_id);
  r.skip(r.take(2));  // cipher suites
  r.skip(r.take(1));  // compression methods
  if (!r.ok) return refused("not_tls", "truncated ClientHello");
  if (r.at == size) return refused("alpn", "ClientHello without extensions, so without ALPN (not HTTP/2)");
  const size_t ext_total = r.take(2);
  if (!r.ok || ext_total != size - r.at) return refused("not_tls", "ClientHello extensions do not fill the message");
  bool alpn_seen = false, h2 = false, tunnel = false;
  std::string offered;
  while (r.ok && r.at < size) {
    const size_t type = r.take(2);
    const size_t len = r.take(2);
    const uint8_t* ext = r.skip(len);
    if (!r.ok) return refused("not_tls", "truncated ClientHello extension");
    if (type != 16) continue;  // application_layer_protocol_negotiation
    if (alpn_seen) return refused("not_tls", "ClientHello with two ALPN extensions");
    alpn_seen = true;
    Reader list{ext, len};
    const size_t list_len = list.take(2);
    if (!list.ok || list_len != len - 2 || list_len == 0) return refused("not_tls", "malformed ALPN extension");
    while (list.ok && list.at < len) {
      const size_t name_len = list.take(1);
      const uint8_t* name = list.skip(name_len);
      if (!list.ok || name_len == 0) return refused("not_tls", "malformed ALPN extension");
      const std::string_view proto(reinterpret_cast<const char*>(name), name_len);
      if (proto == "h2" || proto == "grpc-exp") h2 = true;
      if (proto == "sg-tunnel/1") tunnel = true;
      if (offered.size() < 200) offered += (offered.empty() ? "" : ",") + printable(name, name_len);
    }
  }
  if (!alpn_seen) return refused("alpn", "ClientHello without ALPN (not HTTP/2)");
  if (!h2 && !tunnel) return refused("alpn", "ALPN offers " + offered + ", not h2");
  HelloClass ok;
  ok.complete = true;
  ok.tunnel = !h2;
  return ok;
}

}  // namespace

HelloClass classify_client_hello(const uint8_t* data, size_t size) {
  HelloClass undecided;
  if (size == 0) return undecided;
  if (data[0] != 0x16) {  // not a TLS handshake record
    // HTTP/1.x methods and the HTTP/2 preface ("PRI * HTTP/2.0") start with an
    // upper-case ASCII letter.
    if (data[0] >= 'A' && data[0] <= 'Z') return refused("plaintext", "the first bytes are plaintext (HTTP?)");
    return refused("not_tls", "the first byte is not a TLS handshake record");
  }
  // Reassemble the handshake message from the records: each record is type(1)
  // version(2) length(2) and a fragment; the message is type(1) length(3) and a body
  // whose first two bytes are the ClientHello's client_version.
  std::vector<uint8_t> hs;
  size_t pos = 0;
  while (pos < size) {
    if (data[pos] != 0x16) return refused("not_tls", "a record other than handshake before the ClientHello ended");
    if (size - pos >= 2 && data[pos + 1] != 0x03) return refused("not_tls", "not a TLS record version");
    if (size - pos < 5) break;
    const size_t record = (static_cast<size_t>(data[pos + 3]) << 8) | data[pos + 4];
    if (record == 0 || record > 16384 + 256) return refused("not_tls", "TLS record of " + std::to_string(record) + " bytes");
    const size_t have = std::min(record, size - pos - 5);
    hs.insert(hs.end(), data + pos + 5, data + pos + 5 + have);
    pos += 5 + have;
    if (hs.size() >= 1 && hs[0] != 0x01) return refused("not_tls", "the first handshake message is not a ClientHello");
    if (hs.size() >= 4) {
      const size_t body = (static_cast<size_t>(hs[1]) << 16) | (static_cast<size_t>(hs[2]) << 8) | hs[3];
      if (body > kMaxClientHelloBytes) {
        return refused("not_tls", "ClientHello of " + std::to_string(body) + " bytes (at most " +
                                      std::to_string(kMaxClientHelloBytes) + ")");
      }
      // The version checks below read the body: a body too short to hold a
      // client_version is refused on its length, whatever bytes follow it.
      if (body < 2) return refused("not_tls", "ClientHello of " + std::to_string(body) + " bytes");
      if (hs.size() >= 5 && hs[4] != 0x03) return refused("not_tls", "not a TLS client_version");
      if (hs.size() >= 6 && hs[5] < 0x03) {  // 0x0300 SSL 3, 0x0301 TLS 1.0, 0x0302 TLS 1.1
        return refused("tls_version", "ClientHello of TLS 1.1 or older");  // TLS 1.3 clients send 0x0303 here too
      }
      if (hs.size() >= 4 + body) return check_hello_body(hs.data() + 4, body);
    }
    if (have < record) break;  // the rest of this record has not arrived yet
  }
  return undecided;
}

// ---------------------------------------------------------------------------

PendingConnections::PendingConnections(size_t max_total, size_t max_per_source)
    : max_total_(std::max<size_t>(1, max_total)), max_per_source_(std::max<size_t>(1, max_per_source)) {}

std::optional<PendingConnections::Victim> PendingConnections::victim_for(const std::string& source) const {
  const auto it = by_source_.find(source);
  if (it != by_source_.end() && it->second.size() >= max_per_source_) return Victim{*it->second.begin(), "source_limit"};
  if (by_id_.size() >= max_total_) return Victim{by_id_.begin()->first, "pending_limit"};
  return std::nullopt;
}

uint64_t PendingConnections::add(int fd, std::string source, Clock::time_point deadline) {
  const uint64_t id = next_id_++;
  by_source_[source].insert(id);
  by_id_.emplace(id, Entry{fd, std::move(source), deadline});
  return id;
}

PendingConnections::Entry PendingConnections::remove(uint64_t id) {
  const auto it = by_id_.find(id);
  if (it == by_id_.end()) return {};
  Entry e = std::move(it->second);
  by_id_.erase(it);
  const auto s = by_source_.find(e.source);
  if (s != by_source_.end()) {
    s->second.erase(id);
    if (s->second.empty()) by_source_.erase(s);
  }
  return e;
}

const PendingConnections::Entry* PendingConnections::find(uint64_t id) const {
  const auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &it->second;
}

std::optional<uint64_t> PendingConnections::oldest() const {
  if (by_id_.empty()) return std::nullopt;
  return by_id_.begin()->first;
}

size_t PendingConnections::count(const std::string& source) const {
  const auto it = by_source_.find(source);
  return it == by_source_.end() ? 0 : it->second.size();
}

std::vector<int> PendingConnections::fds() const {
  std::vector<int> out;
  out.reserve(by_id_.size());
  for (const auto& [id, e] : by_id_) out.push_back(e.fd);
  return out;
}

// ---------------------------------------------------------------------------

bool LogLimiter::allow(const std::string& key, Clock::time_point now, uint64_t* suppressed) {
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, fresh] = keys_.try_emplace(key);
  State& s = it->second;
  if (fresh || now - s.window_start >= window_) {
    s.window_start = now;
    s.written = 0;
  }
  if (s.written >= burst_) {
    ++s.suppressed;
    return false;
  }
  ++s.written;
  if (suppressed) *suppressed = s.suppressed;
  s.suppressed = 0;
  return true;
}

std::vector<std::pair<std::string, uint64_t>> LogLimiter::take_suppressed(Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::pair<std::string, uint64_t>> out;
  for (auto& [key, s] : keys_) {
    if (s.suppressed > 0 && now - s.window_start >= window_) {
      out.emplace_back(key, s.suppressed);
      s.suppressed = 0;
    }
  }
  return out;
}

std::string bounded_text(std::string_view text, size_t max) {
  if (text.size() <= max) return std::string(text);
  size_t cut = max;
  // Do not end inside a UTF-8 sequence: back up over continuation bytes.
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return std::string(text.substr(0, cut)) + "\xE2\x80\xA6(" + std::to_string(text.size()) + " bytes)";
}

}  // namespace shardguard::sidecar
