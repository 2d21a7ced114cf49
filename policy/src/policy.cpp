// The shard access policy: parse + validate once, then a pure decision.
// See policy.h for the format and the decision order.
#include "shardguard/policy/policy.h"

#include "shardguard/common/pki.h"
#include "shardguard/common/strings.h"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <utility>

namespace shardguard::policy {
namespace {

using nlohmann::json;

constexpr std::size_t kMaxPolicyBytes = 1 << 20;  // 1 MiB: a policy is a few KiB
constexpr std::size_t kMaxMethodBytes = 256;
constexpr std::size_t kMaxRuleNameBytes = 63;
constexpr std::size_t kMaxShardIndexDigits = 9;  // fits an int
constexpr std::size_t kMaxDepth = 32;  // nesting of arrays and objects; a policy needs 4

const char* const kShardPatternSuffix = "/shard/*";

bool is_lower(char c) { return c >= 'a' && c <= 'z'; }
bool is_upper(char c) { return c >= 'A' && c <= 'Z'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

char to_lower(char c) { return is_upper(c) ? static_cast<char>(c - 'A' + 'a') : c; }

std::string lower(std::string s) {
  for (char& c : s) c = to_lower(c);
  return s;
}

bool iequals(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (to_lower(a[i]) != to_lower(b[i])) return false;
  }
  return true;
}

// Values in messages and decision reasons: JSON literals, ASCII, cut (decode.h).
using decode::quote;


// A shard index as it appears in a SPIFFE ID: decimal, no sign, no leading zeros.
bool is_canonical_index(const std::string& s, std::size_t begin) {
  const std::size_t n = s.size() - begin;
  if (n == 0 || n > kMaxShardIndexDigits) return false;
  if (s[begin] == '0' && n > 1) return false;
  for (std::size_t i = begin; i < s.size(); ++i) {
    if (!is_digit(s[i])) return false;
  }
  return true;
}

bool is_shard_pattern(const std::string& peer) { return peer.find('*') != std::string::npos; }

// The pattern `spiffe://<td>/ns/<ns>/job/<job>/shard/*`, checked by substituting an
// index for the '*' and requiring the exact six-segment shape.
bool is_valid_shard_pattern(const std::string& pattern) {
  const std::string suffix = kShardPatternSuffix;
  if (pattern.size() <= suffix.size() ||
      pattern.compare(pattern.size() - suffix.size(), suffix.size(), suffix) != 0 ||
      std::count(pattern.begin(), pattern.end(), '*') != 1) {
    return false;
  }
  const std::string concrete = pattern.substr(0, pattern.size() - 1) + "0";
  const std::string td = spiffe_trust_domain(concrete);  // "" when not a SPIFFE ID
  if (td.empty()) return false;
  const std::string path = concrete.substr(std::string("spiffe://").size() + td.size());
  std::vector<std::string> segments;
  std::size_t start = 1;
  while (start <= path.size()) {
    const std::size_t next = path.find('/', start);
    segments.push_back(
        path.substr(start, next == std::string::npos ? std::string::npos : next - start));
    if (next == std::string::npos) break;
    start = next + 1;
  }
  return segments.size() == 6 && segments[0] == "ns" && segments[2] == "job" &&
         segments[4] == "shard";
}

bool peer_matches(const std::string& rule_peer, const std::string& peer) {
  if (rule_peer.empty() || rule_peer.back() != '*') return rule_peer == peer;
  const std::size_t prefix = rule_peer.size() - 1;
  return peer.size() > prefix && peer.compare(0, prefix, rule_peer, 0, prefix) == 0 &&
         is_canonical_index(peer, prefix);
}

const std::vector<std::string>& project_methods() {
  static const std::vector<std::string> methods = {kForwardMethod, kBackwardMethod, kExportMethod,
                                                   kTunnelStoreMethod, kTunnelGlooMethod};
  return methods;
}

// True when `method` is not one of the project's or the policy's methods but equals
// one of them when letter case is ignored: a case trick, not an unknown method.
bool is_case_variant(const Policy& policy, const std::string& method) {
  bool exact = false;
  bool variant = false;
  auto consider = [&](const std::string& known) {
    if (known == method) {
      exact = true;
    } else if (iequals(known, method)) {
      variant = true;
    }
  };
  for (const std::string& m : project_methods()) consider(m);
  for (const auto* rules : {&policy.ingress(), &policy.egress()}) {
    for (const PolicyRule& rule : *rules) {
      for (const std::string& m : rule.methods) consider(m);
    }
  }
  return variant && !exact;
}

// ---------------------------------------------------------------------------
// Parsing

using decode::at;
std::string join(const std::string& path, const std::string& key) { return decode::child(path, key); }

// The decode kit with the policy's rules: a null is a value (of the wrong type), and
// an integer is written as one (2.0 is not 2).
class Checker : public decode::Reader {
 public:
  Checker() : Reader(Rules{/*null_is_absent=*/false, /*whole_floats_are_integers=*/false}) {}

  const json* field(const json& obj, const std::string& path, const char* key, bool required) {
    return required ? require(obj, path, key) : find(obj, key);
  }
};

// nlohmann keeps the last of duplicate keys silently; a policy must not be able to
// hide a field behind a second one, so duplicates are found while parsing.
// A policy is four levels deep; anything nested deeper than kMaxDepth is refused while
// parsing, because nlohmann's dump (used in messages) recurses once per level. Paths
// are built only for a problem: building one per container cost time and memory
// quadratic in the depth.
json parse_document(const std::string& text, Checker& c) {
  struct Frame {
    bool is_array;
    std::size_t next_index;  // arrays: index of the next element
    std::set<std::string> keys;
    std::string key;         // objects: the current key
    bool in_array;           // this container is an element of an array (not a member)
    std::string segment;     // how the parent names it: "[3]" or a key ("" for the root)
  };
  struct TooDeep {};
  std::vector<Frame> stack;
  auto path_of = [&stack](std::size_t frames) {
    std::string path;
    for (std::size_t i = 1; i < frames; ++i) {
      path = stack[i].in_array ? path + stack[i].segment : join(path, stack[i].segment);
    }
    return path;
  };
  json::parser_callback_t callback = [&](int, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start: {
        const bool in_array = !stack.empty() && stack.back().is_array;
        std::string segment;
        if (!stack.empty()) {
          Frame& top = stack.back();
          segment = in_array ? "[" + std::to_string(top.next_index++) + "]" : top.key;
        }
        stack.push_back(Frame{event == json::parse_event_t::array_start, 0, {}, "", in_array,
                              std::move(segment)});
        if (stack.size() > kMaxDepth) {
          c.fail(path_of(stack.size()), "is nested more than " + std::to_string(kMaxDepth) +
                                            " levels deep");
          throw TooDeep{};
        }
        break;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!stack.empty()) stack.pop_back();
        break;
      case json::parse_event_t::key: {
        Frame& top = stack.back();
        top.key = parsed.get<std::string>();
        if (!top.keys.insert(top.key).second) {
          c.fail(join(path_of(stack.size()), top.key), decode::duplicate_key(top.key));
        }
        break;
      }
      case json::parse_event_t::value:
        if (!stack.empty() && stack.back().is_array) ++stack.back().next_index;
        break;
    }
    return true;
  };
  try {
    return json::parse(text, callback);
  } catch (const TooDeep&) {
    return json();
  } catch (const json::exception& e) {
    c.fail("policy", std::string("is not valid JSON: ") + e.what());
    return json();
  }
}

std::string peer_problem(const std::string& peer, const std::string& trust_domain) {
  if (is_shard_pattern(peer)) {
    if (!is_valid_shard_pattern(peer)) {
      return quote(peer) +
             " is not a valid pattern: the only wildcard form is "
             "spiffe://<trust-domain>/ns/<namespace>/job/<job>/shard/*";
    }
    const std::string td = spiffe_trust_domain(peer.substr(0, peer.size() - 1) + "0");
    if (td != trust_domain) {
      return quote(peer) + " is not of this policy's trust domain " + quote(trust_domain);
    }
    return "";
  }
  if (std::string why = decode::not_spiffe_id(peer); !why.empty()) return why;
  if (spiffe_trust_domain(peer) != trust_domain) {
    return quote(peer) + " is not of this policy's trust domain " + quote(trust_domain);
  }
  return "";
}

std::string method_problem(const std::string& method) {
  if (!is_canonical_method(method)) {
    return quote(method) +
           " is not a canonical method path (/<package>.<Service>/<Method>, exact case, "
           "no '%', no '.' or '..' segments, no empty segments, no trailing '/')";
  }
  for (const std::string& known : project_methods()) {
    if (method != known && iequals(method, known)) {
      return quote(method) + " is not a canonical method path: the method is spelled " +
             quote(known);
    }
  }
  return "";
}

bool is_reserved_rule_name(const std::string& name) {
  for (const char* reserved :
       {kRuleDefaultDeny, kRuleMalformedMethod, kRuleBadPeer, kRuleExport, kRuleExportDenied,
        kRuleNoPolicy, kRuleLedgerRolledBack}) {
    if (name == reserved) return true;
  }
  return false;
}

// A list of distinct strings, each checked by `problem` (returns "" when fine).
// Duplicates are looked up in a map, not by comparing every pair: a 1 MiB policy holds
// tens of thousands of items, and pairwise checks took minutes.
template <class Problem>
std::vector<std::string> string_list(Checker& c, const json* v, const std::string& path,
                                     const char* what, Problem problem,
                                     bool case_insensitive_duplicates) {
  std::vector<std::string> out;
  std::map<std::string, std::size_t> first;  // item (lower-cased if so) -> its index in v
  if (!c.array(v, path)) return out;
  if (v->empty()) c.fail(path, decode::none_listed(what));
  for (std::size_t i = 0; i < v->size(); ++i) {
    const std::string item_path = at(path, i);
    const std::optional<std::string> s = c.string(&(*v)[i], item_path);
    if (!s) continue;
    const std::string msg = problem(*s);
    if (!msg.empty()) {
      c.fail(item_path, msg);
      continue;
    }
    const auto [it, inserted] = first.emplace(case_insensitive_duplicates ? lower(*s) : *s, i);
    if (!inserted) {
      c.fail(item_path, decode::duplicate((*v)[it->second].get<std::string>(), at(path, it->second)));
    }
    out.push_back(*s);
  }
  return out;
}

std::vector<PolicyRule> parse_rules(Checker& c, const json* v, const std::string& path,
                                    const std::string& trust_domain,
                                    std::map<std::string, std::string>& names) {
  std::vector<PolicyRule> rules;
  if (v == nullptr || !c.array(v, path)) return rules;
  for (std::size_t i = 0; i < v->size(); ++i) {
    const std::string rule_path = at(path, i);
    const json& r = (*v)[i];
    if (!c.object(&r, rule_path)) continue;
    c.known_fields(r, rule_path, {"name", "peers", "methods"});
    PolicyRule rule;
    const std::string name_path = join(rule_path, "name");
    if (std::optional<std::string> name =
            c.string(c.field(r, rule_path, "name", true), name_path)) {
      if (!c.dns_label(name_path, *name, kMaxRuleNameBytes)) {
        // reported: the name is a metrics label
      } else if (is_reserved_rule_name(*name)) {
        c.fail(name_path, "must not be a rule name the engine reports (\"default-deny\", "
                          "\"malformed-method\", \"bad-peer\", \"export\", \"export-denied\", "
                          "\"no-policy\", \"ledger-rolled-back\"), got " + quote(*name));
      } else if (auto it = names.find(*name); it != names.end()) {
        c.fail(name_path, decode::duplicate(*name, it->second));
      } else {
        names.emplace(*name, name_path);
      }
      rule.name = *name;
    }
    const std::string peers_path = join(rule_path, "peers");
    rule.peers = string_list(
        c, c.field(r, rule_path, "peers", true), peers_path, "peer",
        [&](const std::string& p) { return peer_problem(p, trust_domain); }, false);
    const std::string methods_path = join(rule_path, "methods");
    rule.methods = string_list(
        c, c.field(r, rule_path, "methods", true), methods_path, "method",
        [](const std::string& m) {
          if (m == kExportMethod) {
            return quote(m) + " is governed by the \"export\" section, not by rules";
          }
          return method_problem(m);
        },
        true);
    rules.push_back(std::move(rule));
  }
  return rules;
}

ExportRules parse_export(Checker& c, const json* v, const std::string& trust_domain) {
  ExportRules out;
  const std::string path = "export";
  if (v == nullptr || !c.object(v, path)) return out;
  c.known_fields(*v, path, {"allowed", "principals"});
  out.allowed =
      c.boolean(c.field(*v, path, "allowed", true), join(path, "allowed")).value_or(false);
  const std::string list_path = join(path, "principals");
  const json* list = c.field(*v, path, "principals", false);
  if (list == nullptr || !c.array(list, list_path)) {
    if (out.allowed && list == nullptr) {
      c.fail(list_path, decode::none_listed("principal when export.allowed is true"));
    }
    return out;
  }
  if (out.allowed && list->empty()) {
    c.fail(list_path, decode::none_listed("principal when export.allowed is true"));
  }
  if (!out.allowed && !list->empty()) {
    c.fail(list_path, "must be empty when export.allowed is false");
  }
  std::map<std::string, std::string> peers;  // of the principals so far -> the first's path
  for (std::size_t i = 0; i < list->size(); ++i) {
    const std::string p_path = at(list_path, i);
    const json& p = (*list)[i];
    if (!c.object(&p, p_path)) continue;
    c.known_fields(p, p_path, {"peer", "budgetBytes"});
    ExportPrincipal principal;
    const std::string peer_path = join(p_path, "peer");
    if (std::optional<std::string> peer = c.string(c.field(p, p_path, "peer", true), peer_path)) {
      std::string msg;
      if (is_shard_pattern(*peer)) {
        msg = quote(*peer) + " must be an exact SPIFFE ID: export principals take no patterns";
      } else {
        msg = peer_problem(*peer, trust_domain);
      }
      if (auto it = peers.find(*peer); msg.empty() && it != peers.end()) {
        msg = decode::duplicate(*peer, it->second);
      }
      if (!msg.empty()) c.fail(peer_path, msg);
      principal.peer = *peer;
    }
    const std::string budget_path = join(p_path, "budgetBytes");
    if (std::optional<int64_t> budget =
            c.integer<int64_t>(c.field(p, p_path, "budgetBytes", true), budget_path)) {
      c.at_least(budget_path, *budget, 0);
      principal.budget_bytes = *budget;
    }
    peers.emplace(principal.peer, peer_path);
    out.principals.push_back(std::move(principal));
  }
  return out;
}

// Case variants across rules would make a call ambiguous (exact for one rule,
// malformed for another), so they are refused outright. Each method is reported
// against the first earlier method that is spelled differently, so per lower-cased
// method only the first two spellings (with their paths) are needed.
void check_case_variants(Checker& c, const std::vector<PolicyRule>& ingress,
                         const std::vector<PolicyRule>& egress) {
  std::map<std::string, std::vector<std::pair<std::string, std::string>>> seen;
  auto scan = [&](const std::vector<PolicyRule>& rules, const std::string& dir) {
    for (std::size_t i = 0; i < rules.size(); ++i) {
      for (std::size_t j = 0; j < rules[i].methods.size(); ++j) {
        const std::string& m = rules[i].methods[j];
        const std::string path = at(join(at(dir, i), "methods"), j);
        std::vector<std::pair<std::string, std::string>>& spellings = seen[lower(m)];
        bool known = false;
        for (const auto& [other, other_path] : spellings) {
          if (other == m) {
            known = true;
          } else {
            c.fail(path, quote(m) + " differs only in letter case from " + quote(other) + " at " +
                             other_path);
            break;
          }
        }
        if (!known && spellings.size() < 2) spellings.emplace_back(m, path);
      }
    }
  };
  scan(ingress, "ingress");
  scan(egress, "egress");
}

}  // namespace

// ---------------------------------------------------------------------------

Policy::Policy(int version, std::string trust_domain, std::string ns, std::string job, int shard,
               int shards, std::vector<PolicyRule> ingress, std::vector<PolicyRule> egress,
               ExportRules exports)
    : version_(version),
      trust_domain_(std::move(trust_domain)),
      namespace_(std::move(ns)),
      job_(std::move(job)),
      shard_(shard),
      shards_(shards),
      ingress_(std::move(ingress)),
      egress_(std::move(egress)),
      export_(std::move(exports)) {}

bool Policy::operator==(const Policy& o) const {
  return version_ == o.version_ && trust_domain_ == o.trust_domain_ && namespace_ == o.namespace_ &&
         job_ == o.job_ && shard_ == o.shard_ && shards_ == o.shards_ && ingress_ == o.ingress_ &&
         egress_ == o.egress_ && export_ == o.export_;
}

Policy parse_policy(const std::string& json_text) {
  Checker c;
  if (json_text.size() > kMaxPolicyBytes) {
    c.fail("policy", "is " + std::to_string(json_text.size()) + " bytes, more than the limit of " +
                         std::to_string(kMaxPolicyBytes));
    throw PolicyError(std::move(c.errors));
  }
  const json doc = parse_document(json_text, c);
  if (!c.errors.empty()) throw PolicyError(std::move(c.errors));
  if (!doc.is_object()) {
    c.fail("policy", decode::wrong_type("a JSON object", doc));
    throw PolicyError(std::move(c.errors));
  }
  c.known_fields(doc, "",
                 {"version", "trustDomain", "namespace", "job", "shard", "shards", "ingress",
                  "egress", "export"});

  const std::optional<int> version = c.integer<int>(c.field(doc, "", "version", true), "version");
  if (version && *version != 1) c.fail("version", "must be 1, got " + std::to_string(*version));

  const std::optional<std::string> td_field =
      c.string(c.field(doc, "", "trustDomain", true), "trustDomain");
  const std::string td = td_field.value_or("");
  if (const std::string why = td_field ? validate_trust_domain(td) : ""; !why.empty()) {
    c.fail("trustDomain", "must be a SPIFFE trust domain (lower-case letters, digits, '.', '-', "
                          "'_'; at most 255): " + why + ", got " + quote(td));
  }
  const std::optional<std::string> ns = c.string(c.field(doc, "", "namespace", true), "namespace");
  if (ns) c.dns_label("namespace", *ns);
  const std::optional<std::string> job = c.string(c.field(doc, "", "job", true), "job");
  if (job) c.dns_label("job", *job);

  const std::optional<int> shards = c.integer<int>(c.field(doc, "", "shards", true), "shards");
  if (shards) c.at_least("shards", *shards, 1);
  const std::optional<int> shard = c.integer<int>(c.field(doc, "", "shard", true), "shard");
  if (shard && (*shard < 0 || (shards && *shards >= 1 && *shard >= *shards))) {
    c.fail("shard", "must be in [0, shards" +
                        (shards ? " = " + std::to_string(*shards) : std::string()) + "), got " +
                        std::to_string(*shard));
  }

  std::map<std::string, std::string> names;
  std::vector<PolicyRule> ingress =
      parse_rules(c, c.field(doc, "", "ingress", false), "ingress", td, names);
  std::vector<PolicyRule> egress =
      parse_rules(c, c.field(doc, "", "egress", false), "egress", td, names);
  check_case_variants(c, ingress, egress);
  ExportRules exports = parse_export(c, c.field(doc, "", "export", false), td);

  if (!c.errors.empty()) throw PolicyError(std::move(c.errors));
  return Policy(*version, td, *ns, *job, *shard, *shards, std::move(ingress), std::move(egress),
                std::move(exports));
}

std::string to_json(const Policy& policy) {
  auto rules = [](const std::vector<PolicyRule>& rs) {
    json out = json::array();
    for (const PolicyRule& r : rs) {
      out.push_back({{"name", r.name}, {"peers", r.peers}, {"methods", r.methods}});
    }
    return out;
  };
  json principals = json::array();
  for (const ExportPrincipal& p : policy.exports().principals) {
    principals.push_back({{"peer", p.peer}, {"budgetBytes", p.budget_bytes}});
  }
  const json doc = {
      {"version", policy.version()},
      {"trustDomain", policy.trust_domain()},
      {"namespace", policy.ns()},
      {"job", policy.job()},
      {"shard", policy.shard()},
      {"shards", policy.shards()},
      {"ingress", rules(policy.ingress())},
      {"egress", rules(policy.egress())},
      {"export", {{"allowed", policy.exports().allowed}, {"principals", principals}}},
  };
  // Indented for people, unless that would pass the size limit parse_policy enforces
  // (a policy near 1 MiB grows by half when indented).
  std::string text = doc.dump(2);
  if (text.size() > kMaxPolicyBytes) text = doc.dump();
  return text;
}

Decision decide(const Policy& policy, Direction direction, const std::string& peer_spiffe_id,
                const std::string& method_path) {
  Decision d;
  const char* dir = direction == Direction::kIngress ? "ingress" : "egress";
  // spiffe_trust_domain is "" for anything that is not a SPIFFE ID, and a parsed
  // policy's trust domain is never empty: one validation per call.
  if (spiffe_trust_domain(peer_spiffe_id) != policy.trust_domain()) {
    d.rule = kRuleBadPeer;
    d.reason = "peer " + quote(peer_spiffe_id) + " is not a SPIFFE ID of trust domain " +
               quote(policy.trust_domain());
    return d;
  }
  if (!is_canonical_method(method_path) || is_case_variant(policy, method_path)) {
    d.rule = kRuleMalformedMethod;
    d.reason = "method " + quote(method_path) + " is not a canonical method path";
    return d;
  }
  if (direction == Direction::kIngress && method_path == kExportMethod) {
    const ExportRules& ex = policy.exports();
    if (!ex.allowed) {
      d.rule = kRuleExportDenied;
      d.reason = "export of parameters is not allowed for job " + quote(policy.job());
      return d;
    }
    for (const ExportPrincipal& p : ex.principals) {
      if (p.peer == peer_spiffe_id) {
        d.allow = true;
        d.rule = kRuleExport;
        d.export_budget_bytes = p.budget_bytes;
        d.reason = "peer " + quote(peer_spiffe_id) + " is an export principal with a budget of " +
                   std::to_string(p.budget_bytes) + " bytes";
        return d;
      }
    }
    d.rule = kRuleExportDenied;
    d.reason = "peer " + quote(peer_spiffe_id) + " is not an export principal of shard " + std::to_string(policy.shard());
    return d;
  }
  const std::vector<PolicyRule>& rules =
      direction == Direction::kIngress ? policy.ingress() : policy.egress();
  for (const PolicyRule& rule : rules) {
    if (std::find(rule.methods.begin(), rule.methods.end(), method_path) == rule.methods.end()) {
      continue;
    }
    for (const std::string& p : rule.peers) {
      if (peer_matches(p, peer_spiffe_id)) {
        d.allow = true;
        d.rule = rule.name;
        d.reason = std::string(dir) + " rule " + quote(rule.name) + " allows " +
                   quote(method_path) + " with peer " + quote(peer_spiffe_id);
        return d;
      }
    }
  }
  d.rule = kRuleDefaultDeny;
  d.reason = std::string("no ") + dir + " rule allows " + quote(method_path) + " with peer " +
             quote(peer_spiffe_id);
  return d;
}

bool is_canonical_method(const std::string& m) {
  if (m.size() < 2 || m.size() > kMaxMethodBytes || m[0] != '/') return false;
  const std::size_t slash = m.find('/', 1);
  if (slash == std::string::npos) return false;
  // Method: [A-Z][A-Za-z0-9_]* up to the end (no further '/', so no trailing '/').
  if (slash + 1 >= m.size() || !is_upper(m[slash + 1])) return false;
  for (std::size_t i = slash + 2; i < m.size(); ++i) {
    const char c = m[i];
    if (!(is_lower(c) || is_upper(c) || is_digit(c) || c == '_')) return false;
  }
  // Service: one or more package parts [a-z_][a-z0-9_]*, then '.', then [A-Z][A-Za-z0-9_]*.
  const std::size_t last_dot = m.rfind('.', slash);
  if (last_dot == std::string::npos || last_dot < 1) return false;
  if (last_dot + 1 >= slash || !is_upper(m[last_dot + 1])) return false;
  for (std::size_t i = last_dot + 2; i < slash; ++i) {
    const char c = m[i];
    if (!(is_lower(c) || is_upper(c) || is_digit(c) || c == '_')) return false;
  }
  bool part_start = true;
  for (std::size_t i = 1; i < last_dot; ++i) {
    const char c = m[i];
    if (c == '.') {
      if (part_start) return false;  // empty package part ("..", leading '.')
      part_start = true;
      continue;
    }
    if (part_start ? !(is_lower(c) || c == '_') : !(is_lower(c) || is_digit(c) || c == '_')) {
      return false;
    }
    part_start = false;
  }
  return !part_start;  // the part before the service name is not empty
}

Policy pipeline_policy(const std::string& trust_domain, const std::string& ns,
                       const std::string& job, int shard, int shards, const ExportRules& exports,
                       int replica, int replicas) {
  if (replica < -1) throw PolicyError({PolicyProblem{"replica", decode::at_least("-1", std::to_string(replica))}});
  if (replicas < 1) throw PolicyError({PolicyProblem{"replicas", decode::at_least("1", std::to_string(replicas))}});
  if (replicas > 1 && replica >= replicas) {
    throw PolicyError({PolicyProblem{"replica", "must be below replicas (" + std::to_string(replicas) + "), not " +
                                                    std::to_string(replica)}});
  }
  auto rule = [&](const char* name, int peer, const char* method) {
    if (peer < 0) throw PolicyError({PolicyProblem{"shard", decode::at_least("0", std::to_string(peer))}});
    std::string id;
    try {
      id = replica < 0 ? spiffe_id_for_shard(trust_domain, ns, job, static_cast<uint32_t>(peer))
                       : spiffe_id_for_replica(trust_domain, ns, job, static_cast<uint32_t>(peer),
                                               static_cast<uint32_t>(replica));
    } catch (const PkiError& e) {
      throw PolicyError({PolicyProblem{"peers", e.what()}});
    }
    return json{{"name", name}, {"peers", json::array({id})}, {"methods", json::array({method})}};
  };
  json ingress = json::array();
  json egress = json::array();
  if (shard > 0) {
    ingress.push_back(rule("forward-from-prev", shard - 1, kForwardMethod));
    egress.push_back(rule("backward-to-prev", shard - 1, kBackwardMethod));
  }
  if (static_cast<int64_t>(shard) + 1 < shards) {
    ingress.push_back(rule("backward-from-next", shard + 1, kBackwardMethod));
    egress.push_back(rule("forward-to-next", shard + 1, kForwardMethod));
  }
  if (replica >= 0 && replicas > 1) {
    // The other replicas of this stage: the only tunnel peers there are.
    auto replica_id = [&](int r) {
      try {
        return spiffe_id_for_replica(trust_domain, ns, job, static_cast<uint32_t>(shard), static_cast<uint32_t>(r));
      } catch (const PkiError& e) {
        throw PolicyError({PolicyProblem{"peers", e.what()}});
      }
    };
    // Of two replicas Gloo's greater one connects: Gloo comes in only from greater
    // replicas and goes out only to lesser ones, so no replica can reach a listener of
    // a pair that is not its own to connect.
    json greater = json::array(), lesser = json::array(), others = json::array();
    for (int r = 0; r < replicas; ++r) {
      if (r > replica) greater.push_back(replica_id(r));
      if (r < replica) lesser.push_back(replica_id(r));
      if (r != replica) others.push_back(replica_id(r));
    }
    if (!greater.empty()) {
      ingress.push_back(
          {{"name", "tunnel-from-replicas"}, {"peers", greater}, {"methods", json::array({kTunnelGlooMethod})}});
    }
    if (replica == 0) {
      ingress.push_back(
          {{"name", "tunnel-store-from-replicas"}, {"peers", others}, {"methods", json::array({kTunnelStoreMethod})}});
    }
    if (!lesser.empty()) {
      egress.push_back(
          {{"name", "tunnel-to-replicas"}, {"peers", lesser}, {"methods", json::array({kTunnelGlooMethod})}});
    }
    if (replica != 0) {
      egress.push_back({{"name", "tunnel-to-store"},
                        {"peers", json::array({replica_id(0)})},
                        {"methods", json::array({kTunnelStoreMethod})}});
    }
  }
  json principals = json::array();
  if (exports.allowed) {
    for (const ExportPrincipal& p : exports.principals) {
      principals.push_back({{"peer", p.peer}, {"budgetBytes", p.budget_bytes}});
    }
  }
  const json doc = {
      {"version", 1},
      {"trustDomain", trust_domain},
      {"namespace", ns},
      {"job", job},
      {"shard", shard},
      {"shards", shards},
      {"ingress", ingress},
      {"egress", egress},
      {"export", {{"allowed", exports.allowed}, {"principals", principals}}},
  };
  return parse_policy(doc.dump(-1, ' ', false, json::error_handler_t::replace));
}

}  // namespace shardguard::policy
