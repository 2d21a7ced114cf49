// libFuzzer target: the shard access policy parser (sidecar/policy.h).
//
// parse_policy must either return a Policy or throw PolicyError naming at least one
// problem; any other exception, a crash or a sanitizer report is a bug. For every input
// that parses:
// - the round trip holds: parse_policy(to_json(p)) == p, and to_json is a fixed point;
// - decide() never throws, and agrees with the rules: every exact (peer, method) pair
//   of a rule is allowed in that rule's direction, shard patterns match a concrete
//   index, export principals get exactly their budget, foreign trust domains and
//   case variants of methods are refused, and an allow always names a rule that
//   really lists the method and matches the peer.
// Violations print what went wrong and abort(), which libFuzzer records as a crash.
#include "shardguard/common/pki.h"
#include "shardguard/policy/policy.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <vector>

namespace sg = shardguard::policy;

namespace {

[[noreturn]] void bug(const std::string& what, const std::string& detail = "") {
  std::fprintf(stderr, "policy_fuzz: %s\n", what.c_str());
  if (!detail.empty()) std::fprintf(stderr, "%s\n", detail.c_str());
  std::abort();
}

void check(bool ok, const std::string& what, const std::string& detail = "") {
  if (!ok) bug(what, detail);
}

const char* dir_name(sg::Direction d) { return d == sg::Direction::kIngress ? "ingress" : "egress"; }

const std::vector<sg::PolicyRule>& rules_of(const sg::Policy& p, sg::Direction d) {
  return d == sg::Direction::kIngress ? p.ingress() : p.egress();
}

bool is_pattern(const std::string& peer) { return !peer.empty() && peer.back() == '*'; }

// Reference matcher, deliberately lenient (any number of digits): exact, or a shard
// pattern followed by a decimal index without leading zeros.
bool peer_matches(const std::string& rule_peer, const std::string& peer) {
  if (!is_pattern(rule_peer)) return rule_peer == peer;
  const std::string prefix = rule_peer.substr(0, rule_peer.size() - 1);
  if (peer.size() <= prefix.size() || peer.compare(0, prefix.size(), prefix) != 0) return false;
  const std::string index = peer.substr(prefix.size());
  if (index.size() > 1 && index[0] == '0') return false;
  for (char c : index) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

// True when some rule of direction d lists `peer` literally (not through a pattern).
bool listed_exactly(const sg::Policy& p, sg::Direction d, const std::string& peer);

// A peer matching `rule_peer` (the pattern with a concrete index, or the peer itself).
std::string concrete(const std::string& rule_peer, const char* index = "7") {
  return is_pattern(rule_peer) ? rule_peer.substr(0, rule_peer.size() - 1) + index : rule_peer;
}

std::string flip_case(const std::string& s) {
  std::string out = s;
  for (char& c : out) {
    if (c >= 'a' && c <= 'z') {
      c = static_cast<char>(c - 'a' + 'A');
      break;
    }
  }
  return out;
}

// The decision must be well formed, and an allow must be explained by the policy.
void check_decision(const sg::Policy& p, sg::Direction d, const std::string& peer,
                    const std::string& method, const sg::Decision& dec) {
  const std::string ctx = std::string(dir_name(d)) + " peer=" + peer + " method=" + method +
                          " -> rule=" + dec.rule + " allow=" + (dec.allow ? "1" : "0") +
                          " reason=" + dec.reason;
  check(!dec.rule.empty() && !dec.reason.empty(), "decision without rule or reason", ctx);
  if (!dec.allow) {
    check(dec.export_budget_bytes == 0, "deny carries an export budget", ctx);
    return;
  }
  check(shardguard::is_spiffe_id(peer) && shardguard::spiffe_trust_domain(peer) == p.trust_domain(),
        "allowed a peer outside the trust domain", ctx);
  check(sg::is_canonical_method(method), "allowed a non-canonical method", ctx);
  if (dec.rule == sg::kRuleExport) {
    check(d == sg::Direction::kIngress && method == sg::kExportMethod && p.exports().allowed,
          "export allowed outside the export rules", ctx);
    bool found = false;
    for (const sg::ExportPrincipal& pr : p.exports().principals) {
      if (pr.peer == peer && pr.budget_bytes == dec.export_budget_bytes) found = true;
    }
    check(found, "export allowed for a peer that is not a principal (or wrong budget)", ctx);
    return;
  }
  check(method != sg::kExportMethod || d == sg::Direction::kEgress,
        "ingress export allowed by an ordinary rule", ctx);
  for (const sg::PolicyRule& r : rules_of(p, d)) {
    if (r.name != dec.rule) continue;
    bool has_method = false;
    for (const std::string& m : r.methods) has_method |= m == method;
    check(has_method, "allowing rule does not list the method", ctx);
    bool has_peer = false;
    for (const std::string& rp : r.peers) has_peer |= peer_matches(rp, peer);
    check(has_peer, "allowing rule does not match the peer", ctx);
    return;
  }
  bug("allow names a rule that is not in this direction", ctx);
}

bool listed_exactly(const sg::Policy& p, sg::Direction d, const std::string& peer) {
  for (const sg::PolicyRule& r : rules_of(p, d)) {
    for (const std::string& rp : r.peers) {
      if (rp == peer) return true;
    }
  }
  return false;
}

sg::Decision checked_decide(const sg::Policy& p, sg::Direction d, const std::string& peer,
                    const std::string& method) {
  sg::Decision dec = sg::decide(p, d, peer, method);
  check_decision(p, d, peer, method, dec);
  return dec;
}

void exercise_decide(const sg::Policy& p, const std::string& input) {
  constexpr std::size_t kMaxRules = 8;
  constexpr std::size_t kMaxItems = 4;
  const std::string foreign_td = "spiffe://" + p.trust_domain() + "x/ns/" + p.ns();
  for (sg::Direction d : {sg::Direction::kIngress, sg::Direction::kEgress}) {
    const std::vector<sg::PolicyRule>& rules = rules_of(p, d);
    for (std::size_t i = 0; i < rules.size() && i < kMaxRules; ++i) {
      const sg::PolicyRule& r = rules[i];
      for (std::size_t j = 0; j < r.peers.size() && j < kMaxItems; ++j) {
        const std::string peer = concrete(r.peers[j]);
        for (std::size_t k = 0; k < r.methods.size() && k < kMaxItems; ++k) {
          const std::string& m = r.methods[k];
          const std::string ctx = std::string(dir_name(d)) + " rule " + r.name + " peer " + peer +
                                  " method " + m;
          check(checked_decide(p, d, peer, m).allow, "a rule's own (peer, method) is denied", ctx);
          const std::string variant = flip_case(m);
          if (variant != m) {
            const sg::Decision v = checked_decide(p, d, peer, variant);
            check(!v.allow && v.rule == sg::kRuleMalformedMethod,
                  "case variant of a rule's method not refused as malformed", ctx);
          }
          check(!checked_decide(p, d, peer, m + "/").allow, "trailing '/' allowed", ctx);
          check(!checked_decide(p, d, peer + "/", m).allow, "peer with trailing '/' allowed", ctx);
          const sg::Decision f = checked_decide(p, d, foreign_td + peer.substr(peer.size() / 2), m);
          check(!f.allow, "foreign trust domain allowed", ctx);
          if (is_pattern(r.peers[j])) {
            for (const char* bad : {"", "01", "-1", "x", "1/2", "4294967296000"}) {
              const std::string q = concrete(r.peers[j], bad);
              check(!checked_decide(p, d, q, m).allow || listed_exactly(p, d, q),
                    "shard pattern matched a non-canonical index", ctx + " index '" + bad + "'");
            }
            checked_decide(p, d, concrete(r.peers[j], "0"), m);
          }
        }
      }
    }
  }
  const sg::ExportRules& ex = p.exports();
  for (std::size_t i = 0; i < ex.principals.size() && i < kMaxRules; ++i) {
    const sg::ExportPrincipal& pr = ex.principals[i];
    const sg::Decision dec = checked_decide(p, sg::Direction::kIngress, pr.peer, sg::kExportMethod);
    check(dec.allow == ex.allowed && (!dec.allow || dec.export_budget_bytes == pr.budget_bytes),
          "export principal decision", pr.peer);
    checked_decide(p, sg::Direction::kEgress, pr.peer, sg::kExportMethod);
  }
  // The pipeline neighbours and the exporter, with the project's methods.
  std::vector<std::string> peers;
  for (int delta : {-1, 0, 1}) {
    const int64_t index = static_cast<int64_t>(p.shard()) + delta;
    if (index >= 0 && index <= INT32_MAX) {
      peers.push_back(shardguard::spiffe_id_for_shard(p.trust_domain(), p.ns(), p.job(), static_cast<int>(index)));
    }
  }
  peers.push_back(shardguard::spiffe_id_for_exporter(p.trust_domain(), p.ns(), p.job()));
  // Pieces of the input itself: arbitrary bytes as a peer and as a method.
  const std::string half = input.substr(0, input.size() / 2);
  peers.push_back(half);
  peers.push_back("spiffe://" + p.trust_domain() + "/" + half);
  const std::vector<std::string> methods = {sg::kForwardMethod, sg::kBackwardMethod,
                                            sg::kExportMethod, flip_case(sg::kForwardMethod),
                                            input.substr(input.size() / 2), ""};
  for (const std::string& peer : peers) {
    for (const std::string& m : methods) {
      checked_decide(p, sg::Direction::kIngress, peer, m);
      checked_decide(p, sg::Direction::kEgress, peer, m);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::optional<sg::Policy> parsed;
  try {
    parsed.emplace(sg::parse_policy(text));
  } catch (const sg::PolicyError& e) {
    check(!e.problems().empty(), "PolicyError without problems");
    for (const sg::PolicyProblem& pr : e.problems()) {
      check(!pr.path.empty() && !pr.message.empty(), "problem without path or message", pr.str());
    }
    return 0;
  } catch (const std::exception& e) {
    bug(std::string("parse_policy threw something other than PolicyError: ") + e.what());
  }
  const sg::Policy& p = *parsed;

  // Round trip. A document just under parse_policy's 1 MiB limit that leaves out the
  // optional fields can come back a few bytes over it; only that may fail.
  const std::string json = sg::to_json(p);
  if (json.size() > (std::size_t{1} << 20)) {
    check(text.size() + 128 > (std::size_t{1} << 20), "to_json is far larger than its input",
          std::to_string(text.size()) + " -> " + std::to_string(json.size()) + " bytes");
    exercise_decide(p, text);
    return 0;
  }
  std::optional<sg::Policy> again;
  try {
    again.emplace(sg::parse_policy(json));
  } catch (const std::exception& e) {
    bug(std::string("to_json output does not parse: ") + e.what(), json);
  }
  check(*again == p, "parse_policy(to_json(p)) != p", json);
  check(sg::to_json(*again) == json, "to_json is not a fixed point", json);

  exercise_decide(p, text);
  return 0;
}
