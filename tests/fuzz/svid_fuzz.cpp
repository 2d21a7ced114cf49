// libFuzzer target: SPIFFE ID and X509-SVID validation (common/pki.h) and the
// policy's string checks (policy/policy.h).
//
// Every input is used as:
// 1. a SPIFFE ID: validate_spiffe_id, is_spiffe_id and spiffe_trust_domain (pki.h)
//    must agree with each other and with a regular-expression reference;
// 2. a gRPC method path: policy::is_canonical_method against a reference regex;
// 3. a leaf PEM, verified against a fixed job CA created once at startup (seed leaves
//    come from another CA, so they stop at the chain check, but they exercise the PEM
//    and certificate parsing);
// 4. a leaf PEM followed by its own CA bundle: whatever follows the first
//    "-----END CERTIFICATE-----" is the CA bundle, so seeds that carry their issuing CA
//    get past the chain check into the extension, key usage and SAN rules;
//    the input's last byte picks the role and the time for 3-5 ('S': server, 'P': at
//    1970, 'F': 200 years on; otherwise client, now);
// 5. raw DER wrapped in PEM armour, verified against the fixed CA (the fuzzer then
//    mutates the ASN.1 itself rather than the base64);
// 6. a CA bundle, with a valid leaf of the fixed CA;
// 7. not_after(), which may only throw PkiError.
// verify_svid must never throw; its result must be well formed (ok iff reason "ok",
// a bounded reason, a valid SPIFFE ID only when ok). Violations abort().
// SVID_FUZZ_VERBOSE=1 prints every verify_svid result (to see what a seed reaches).
#include "shardguard/common/pki.h"
#include "shardguard/policy/policy.h"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <regex>
#include <set>
#include <string>

namespace {

using shardguard::SvidCheck;
using shardguard::SvidRole;
using Clock = std::chrono::system_clock;

[[noreturn]] void bug(const std::string& what, const std::string& detail = "") {
  std::fprintf(stderr, "svid_fuzz: %s\n", what.c_str());
  if (!detail.empty()) std::fprintf(stderr, "%s\n", detail.c_str());
  std::abort();
}

void check(bool ok, const std::string& what, const std::string& detail = "") {
  if (!ok) bug(what, detail);
}

struct Fixture {
  shardguard::CaBundle ca;
  shardguard::Leaf leaf;
  Clock::time_point now;
};

const Fixture* g_fixture = nullptr;

// std::regex recurses per character; keep the reference checks to short inputs.
constexpr std::size_t kMaxRegexInput = 300;

const std::regex& spiffe_regex() {
  static const std::regex re("spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+");
  return re;
}

const std::regex& method_regex() {
  static const std::regex re("/[a-z_][a-z0-9_]*(\\.[a-z_][a-z0-9_]*)*\\.[A-Z][A-Za-z0-9_]*/[A-Z][A-Za-z0-9_]*");
  return re;
}

// A "." or ".." segment in the path (the part after the trust domain).
bool has_dot_segment(const std::string& id) {
  const std::size_t path = id.find('/', 9);
  if (path == std::string::npos) return false;
  const std::string p = id.substr(path) + "/";
  return p.find("/./") != std::string::npos || p.find("/../") != std::string::npos;
}

void check_spiffe_id(const std::string& s) {
  const std::string why = shardguard::validate_spiffe_id(s);
  const bool valid = why.empty();
  check(shardguard::is_spiffe_id(s) == valid, "is_spiffe_id disagrees with validate_spiffe_id", s);
  const std::string td = shardguard::spiffe_trust_domain(s);
  if (!valid) {
    check(td.empty(), "trust domain of an invalid SPIFFE ID", s);
  } else {
    check(s.size() <= shardguard::kMaxSpiffeIdBytes, "valid SPIFFE ID longer than the limit", s);
    check(!td.empty() && s.compare(0, 9 + td.size() + 1, "spiffe://" + td + "/") == 0,
          "trust domain is not the authority of the ID", s + " td=" + td);
  }
  if (s.size() <= kMaxRegexInput) {
    const bool ref = std::regex_match(s, spiffe_regex()) && !has_dot_segment(s);
    check(ref == valid, "validate_spiffe_id disagrees with the reference",
          s + " (library: " + (valid ? std::string("valid") : why) + ")");
  }
}

void check_method(const std::string& s) {
  const bool canonical = shardguard::policy::is_canonical_method(s);
  if (canonical) check(s.size() <= 256, "canonical method longer than 256 bytes", s);
  if (s.size() <= kMaxRegexInput) {
    const bool ref = s.size() <= 256 && std::regex_match(s, method_regex());
    check(ref == canonical, "is_canonical_method disagrees with the reference", s);
  }
}

void check_result(const SvidCheck& r, const char* what) {
  static const std::set<std::string> reasons = {
      "ok",          "malformed",     "self_signed",         "untrusted",
      "expired",     "not_yet_valid", "leaf_is_ca",          "key_cert_sign",
      "no_digital_signature",         "no_client_auth",      "no_server_auth",
      "no_uri_san",  "multiple_uri_sans",                    "not_spiffe",
      "invalid_spiffe_id",            "weak_signature",      "weak_key",
      "no_basic_constraints"};
  const std::string ctx = std::string(what) + ": reason=" + r.reason + " message=" + r.message +
                          " id=" + r.spiffe_id;
  check(reasons.count(r.reason) == 1, "reason outside the documented set", ctx);
  check(r.ok == (r.reason == "ok"), "ok does not match reason", ctx);
  check(!r.message.empty(), "empty message", ctx);
  if (r.ok) {
    check(shardguard::validate_spiffe_id(r.spiffe_id).empty(), "ok with an invalid SPIFFE ID", ctx);
  } else {
    check(r.spiffe_id.empty(), "refusal carries a SPIFFE ID", ctx);
  }
}

SvidCheck verify(const std::string& leaf, const std::string& ca, Clock::time_point now,
                 SvidRole role, const char* what) {
  SvidCheck r;
  try {
    r = shardguard::verify_svid(leaf, ca, now, role);
  } catch (const std::exception& e) {
    bug(std::string(what) + ": verify_svid threw: " + e.what());
  }
  check_result(r, what);
  static const bool verbose = std::getenv("SVID_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "%s: %s (%s)\n", what, r.reason.c_str(), r.message.c_str());
  return r;
}

std::string pem_armour(const uint8_t* data, std::size_t size) {
  static const char* const kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string b64;
  for (std::size_t i = 0; i < size; i += 3) {
    const uint32_t n = (uint32_t{data[i]} << 16) | (i + 1 < size ? uint32_t{data[i + 1]} << 8 : 0) |
                       (i + 2 < size ? uint32_t{data[i + 2]} : 0);
    b64 += kAlphabet[(n >> 18) & 63];
    b64 += kAlphabet[(n >> 12) & 63];
    b64 += i + 1 < size ? kAlphabet[(n >> 6) & 63] : '=';
    b64 += i + 2 < size ? kAlphabet[n & 63] : '=';
  }
  std::string out = "-----BEGIN CERTIFICATE-----\n";
  for (std::size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + "\n";
  return out + "-----END CERTIFICATE-----\n";
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static Fixture f;
  f.ca = shardguard::create_ca("fuzz job CA", std::chrono::hours(24 * 365));
  f.leaf = shardguard::issue_leaf(f.ca, "spiffe://shardguard.local/ns/fuzz/job/j/shard/0",
                                  std::chrono::hours(24));
  f.now = Clock::now();
  // The fixture itself must verify, or the fuzzer explores nothing useful.
  const SvidCheck r = shardguard::verify_svid(f.leaf.cert_pem, f.ca.cert_pem, f.now, SvidRole::client);
  check(r.ok, "fixture leaf does not verify", r.reason + ": " + r.message);
  g_fixture = &f;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& f = *g_fixture;
  const std::string s(reinterpret_cast<const char*>(data), size);

  check_spiffe_id(s);
  check_method(s);

  // The role and the time of verification come from the last byte ('S' server, 'P'
  // 1970, 'F' 200 years on, anything else client and now), so that one call per mode
  // covers both roles and an expired / not yet valid chain: parsing certificates with
  // OpenSSL 3 under ASan takes most of the time of a run.
  const char knob = size > 0 ? static_cast<char>(data[size - 1]) : '\0';
  const SvidRole role = knob == 'S' ? SvidRole::server : SvidRole::client;
  Clock::time_point when = f.now;
  if (knob == 'P') when = Clock::time_point{};
  if (knob == 'F') when = f.now + std::chrono::hours(24 * 365 * 200);

  // 3. Against the fixed CA.
  verify(s, f.ca.cert_pem, f.now, role, "leaf vs fixed CA");

  // 4. Leaf followed by its own CA bundle.
  static const std::string kEnd = "-----END CERTIFICATE-----";
  const std::size_t end = s.find(kEnd);
  if (end != std::string::npos) {
    verify(s, s.substr(end + kEnd.size()), when, role, "leaf vs own CA");
  }

  // 5. DER in PEM armour.
  verify(pem_armour(data, size), f.ca.cert_pem, f.now, role, "DER vs fixed CA");

  // 6. The input as the CA bundle (parsing the fixed leaf is the costly part; without
  // a PEM header the bundle cannot parse, so skip those inputs).
  if (s.find("-----BEGIN") != std::string::npos) {
    verify(f.leaf.cert_pem, s, f.now, SvidRole::client, "fixed leaf vs input CA");
  }

  // 7. not_after throws PkiError only.
  try {
    (void)shardguard::not_after(s);
  } catch (const shardguard::PkiError&) {
  } catch (const std::exception& e) {
    bug(std::string("not_after threw something other than PkiError: ") + e.what());
  }
  return 0;
}
