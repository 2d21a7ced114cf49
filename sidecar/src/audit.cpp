#include "shardguard/sidecar/audit.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>

#include <nlohmann/json.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/time.h"

namespace shardguard::sidecar {
namespace {

using ojson = nlohmann::ordered_json;

struct Formatted {
  std::string line;  // with "\n"
  std::string hash;
};

Formatted format(const AuditEvent& ev, uint64_t seq, const std::string& prev) {
  ojson body;
  body["ts"] = ev.ts;
  body["seq"] = seq;
  body["peer"] = ev.peer;
  body["method"] = ev.method;
  body["rule"] = ev.rule;
  body["decision"] = ev.decision;
  body["bytes"] = ev.bytes;
  body["ranges_digest"] = ev.ranges_digest;
  body["prev"] = prev;
  // ensure_ascii: the line is printable ASCII whatever bytes the peer sent; invalid
  // UTF-8 is replaced rather than thrown on (no exceptions on the data path).
  std::string text = body.dump(-1, ' ', true, ojson::error_handler_t::replace);
  Formatted out;
  out.hash = sha256_hex(prev + text);
  text.pop_back();  // the closing '}'
  out.line = text + ",\"hash\":\"" + out.hash + "\"}\n";
  return out;
}

const char* const kStringFields[] = {"ts", "peer", "method", "rule", "decision", "ranges_digest", "prev", "hash"};

// Verifies one line (without its "\n") as line number n of the chain; on success
// advances expected_seq and prev. Returns the reason it is bad, or "".
std::string check_line(const std::string& line, uint64_t& expected_seq, std::string& prev) {
  if (line.empty()) return "empty line";
  ojson v = ojson::parse(line, nullptr, /*allow_exceptions=*/false);
  if (v.is_discarded() || !v.is_object()) return "not a JSON object";
  if (v.size() != 10) return "wrong set of fields";
  for (const char* f : kStringFields) {
    if (!v.contains(f) || !v[f].is_string()) return std::string("field ") + f + " missing or not a string";
  }
  for (const char* f : {"seq", "bytes"}) {
    if (!v.contains(f) || !v[f].is_number_unsigned()) {
      return std::string("field ") + f + " missing or not an unsigned integer";
    }
  }
  const uint64_t seq = v["seq"].get<uint64_t>();
  if (seq != expected_seq) {
    return "seq " + std::to_string(seq) + ", expected " + std::to_string(expected_seq) +
           " (a line was dropped, duplicated or reordered)";
  }
  if (v["prev"].get<std::string>() != prev) {
    return "prev does not match the previous line's hash (a line was dropped, edited or reordered)";
  }
  AuditEvent ev;
  ev.ts = v["ts"].get<std::string>();
  ev.peer = v["peer"].get<std::string>();
  ev.method = v["method"].get<std::string>();
  ev.rule = v["rule"].get<std::string>();
  ev.decision = v["decision"].get<std::string>();
  ev.bytes = v["bytes"].get<uint64_t>();
  ev.ranges_digest = v["ranges_digest"].get<std::string>();
  const Formatted want = format(ev, seq, prev);
  if (v["hash"].get<std::string>() != want.hash) return "hash mismatch (the line was edited)";
  if (want.line.compare(0, want.line.size() - 1, line) != 0) {
    return "not in canonical form (the line was edited)";
  }
  ++expected_seq;
  prev = want.hash;
  return "";
}

}  // namespace

std::string ranges_digest(const std::vector<ByteRange>& ranges) {
  if (ranges.empty()) return "";
  std::string text;
  for (const auto& r : ranges) {
    if (!text.empty()) text += ',';
    text += std::to_string(r.begin) + '-' + std::to_string(r.end);
  }
  return sha256_hex(text);
}

std::string audit_timestamp_now() { return format_rfc3339(std::chrono::system_clock::now(), 3); }

std::string format_audit_line(const AuditEvent& event, uint64_t seq, const std::string& prev_hash) {
  return format(event, seq, prev_hash).line;
}

AuditVerifyResult verify_audit_text(const std::string& text) {
  AuditVerifyResult r;
  uint64_t expected_seq = 1;
  std::string prev = kAuditGenesis;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const uint64_t n = r.lines + 1;
    if (nl == std::string::npos) {
      r.first_bad_line = n;
      r.reason = "line " + std::to_string(n) + ": truncated (no trailing newline)";
      r.last_hash = prev;
      return r;
    }
    const std::string why = check_line(text.substr(pos, nl - pos), expected_seq, prev);
    if (!why.empty()) {
      r.first_bad_line = n;
      r.reason = "line " + std::to_string(n) + ": " + why;
      r.last_hash = prev;
      return r;
    }
    ++r.lines;
    pos = nl + 1;
  }
  r.ok = true;
  r.last_hash = prev;
  return r;
}

AuditVerifyResult verify_audit_log(const std::string& path) {
  std::string text;
  try {
    text = read_file(path);
  } catch (const std::exception& e) {
    AuditVerifyResult r;
    r.reason = e.what();
    r.last_hash = kAuditGenesis;
    return r;
  }
  return verify_audit_text(text);
}

AuditLog::AuditLog(const std::string& path, int mirror_fd) : path_(path), mirror_fd_(mirror_fd) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd_ < 0) throw AuditError("audit log " + path + ": cannot open: " + std::strerror(errno));
  const AuditVerifyResult v = verify_audit_log(path);
  if (!v.ok) {
    ::close(fd_);
    fd_ = -1;
    throw AuditError("audit log " + path + ": refusing to append to a broken chain: " + v.reason);
  }
  seq_ = v.lines;
  hash_ = v.last_hash;
}

AuditLog::~AuditLog() {
  if (fd_ >= 0) ::close(fd_);
}

bool AuditLog::append(const AuditEvent& event, std::string* error) {
  auto fail = [&](const std::string& why) {
    if (error) *error = "audit log " + path_ + ": " + why;
    return false;
  };
  AuditEvent ev = event;
  if (ev.ts.empty()) ev.ts = audit_timestamp_now();
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return fail("an earlier write failed; refusing to append");
  const Formatted f = format(ev, seq_ + 1, hash_);
  ssize_t n;
  do {
    n = ::write(fd_, f.line.data(), f.line.size());
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    failed_ = true;
    return fail(std::string("write failed: ") + std::strerror(errno));
  }
  if (static_cast<size_t>(n) != f.line.size()) {
    failed_ = true;
    return fail("short write (" + std::to_string(n) + " of " + std::to_string(f.line.size()) + " bytes)");
  }
  ++seq_;
  hash_ = f.hash;
  if (mirror_fd_ >= 0) {
    ssize_t m;
    do {
      m = ::write(mirror_fd_, f.line.data(), f.line.size());
    } while (m < 0 && errno == EINTR);
  }
  return true;
}

uint64_t AuditLog::last_seq() const {
  std::lock_guard<std::mutex> lock(mu_);
  return seq_;
}

std::string AuditLog::last_hash() const {
  std::lock_guard<std::mutex> lock(mu_);
  return hash_;
}

}  // namespace shardguard::sidecar
