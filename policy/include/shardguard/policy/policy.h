// The shard access policy (DESIGN.md §4): parsed and validated once into an
// immutable Policy, then consulted by decide(), a pure function with no I/O.
// The sidecar's proxy only does the I/O around it (read the file, answer
// PERMISSION_DENIED with the decision's reason, count the decision).
//
// ## The JSON format (one document per pod, rendered by the operator)
//
//   {
//     "version": 1,                              // required, must be 1
//     "trustDomain": "shardguard.local",         // required, SPIFFE trust domain
//     "namespace": "ml",                         // required, DNS-1123 label
//     "job": "fmnist-cnn",                       // required, DNS-1123 label
//     "shard": 1,                                // required, 0 <= shard < shards
//     "shards": 4,                               // required, >= 1
//     "ingress": [                               // optional, default []: who may call us
//       {"name": "forward-from-prev",            //   unique over ingress and egress
//        "peers": ["spiffe://shardguard.local/ns/ml/job/fmnist-cnn/shard/0"],
//        "methods": ["/shardguard.v1.Pipeline/Forward"]}
//     ],
//     "egress": [ ... same shape ... ],          // optional, default []: whom we may call
//     "export": {                                // optional, default {"allowed": false}
//       "allowed": true,
//       "principals": [
//         {"peer": "spiffe://shardguard.local/ns/ml/job/fmnist-cnn/role/exporter",
//          "budgetBytes": 1048576}]
//     }
//   }
//
// Validation (parse_policy) refuses, and reports every problem with its JSON path:
// - unknown fields, missing required fields, wrong JSON types, duplicate keys;
// - rule names that are not lower-case `[a-z0-9-]` (1..63 characters, starting and
//   ending with a letter or digit), duplicate rule names (ingress and egress share one
//   namespace, because the name is a metrics label), and the engine's own rule names
//   ("default-deny", "malformed-method", "bad-peer", "export", "export-denied");
// - empty `peers` or `methods`, and duplicates inside one list;
// - peers that are not SPIFFE IDs of this policy's trust domain. A peer is either an
//   exact SPIFFE ID with a non-empty path, or the one pattern form
//   `spiffe://<td>/ns/<namespace>/job/<job>/shard/*`, where `*` stands for one shard
//   index (a decimal number without leading zeros). No other wildcards, no regex;
// - methods that are not canonical gRPC method paths (see is_canonical_method), or
//   that differ only in letter case from a method of this project;
// - the export method in an ingress/egress rule: parameter export is governed only
//   by the "export" section (allowed + principals with byte budgets);
// - `export.allowed` true with no principals, or false with some; principal peers
//   that are patterns or not of this trust domain; duplicate principals; budgets that
//   are negative, fractional or larger than 2^63-1.
//
// ## The decision (decide)
//
// Default deny. In this order:
// 1. the peer is not a valid SPIFFE ID of the policy's trust domain → "bad-peer";
// 2. the method is not canonical, or is a case variant of a method this policy or the
//    project knows → "malformed-method" (refuses `//`, any `%`, `.`/`..` segments,
//    trailing `/`, other case, a missing leading `/`, the empty string, …);
// 3. the export method (ingress only): allowed iff export.allowed and the peer is a
//    listed principal → rule "export" (the decision carries the principal's byte
//    budget; the ledger enforces it), otherwise "export-denied";
// 4. the first rule of that direction whose peers match the peer exactly (or by the
//    shard pattern) and whose methods contain the method exactly → that rule;
// 5. otherwise "default-deny".
//
// Thread-safety: a Policy is immutable after construction; share it as
// std::shared_ptr<const Policy> and call decide() from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <string>
#include <vector>

#include "shardguard/common/decode.h"

namespace shardguard::policy {

inline constexpr const char* kForwardMethod = "/shardguard.v1.Pipeline/Forward";
inline constexpr const char* kBackwardMethod = "/shardguard.v1.Pipeline/Backward";
inline constexpr const char* kExportMethod = "/shardguard.v1.ShardExport/Export";
// The sidecar's L4 tunnels (docs/sidecar.md "Tunnels"): not gRPC methods, but decided
// by decide() under these paths like calls. Store: a stage's c10d rendezvous store
// (served by replica 0); Gloo: the connections of ProcessGroupGloo's TCP transport.
inline constexpr const char* kTunnelStoreMethod = "/shardguard.v1.Tunnel/Store";
inline constexpr const char* kTunnelGlooMethod = "/shardguard.v1.Tunnel/Gloo";

// Rule names the engine reports when no policy rule decided.
inline constexpr const char* kRuleDefaultDeny = "default-deny";
inline constexpr const char* kRuleMalformedMethod = "malformed-method";
inline constexpr const char* kRuleBadPeer = "bad-peer";
inline constexpr const char* kRuleExport = "export";
inline constexpr const char* kRuleExportDenied = "export-denied";
// Reported by PolicyStore when no valid policy is loaded (fail closed).
inline constexpr const char* kRuleNoPolicy = "no-policy";
// Reported by the sidecar for an export while its exposure ledger is refused: older
// than the sequence the operator recorded, or missing (--ledger-min-sequence).
inline constexpr const char* kRuleLedgerRolledBack = "ledger-rolled-back";

// One problem of a policy: the JSON path and the message, worded by the decode kit
// (common/decode.h) exactly as the job spec decoder words the same kind of error.
using PolicyProblem = FieldError;

// Thrown by parse_policy / pipeline_policy. what() lists every problem, one per line.
class PolicyError : public DecodeError {
 public:
  explicit PolicyError(std::vector<PolicyProblem> problems)
      : DecodeError("invalid shard access policy:", std::move(problems)) {}
  const std::vector<PolicyProblem>& problems() const { return errors(); }
};

struct PolicyRule {
  std::string name;
  std::vector<std::string> peers;    // exact SPIFFE IDs or ".../shard/*" patterns
  std::vector<std::string> methods;  // exact canonical method paths
  bool operator==(const PolicyRule& o) const {
    return name == o.name && peers == o.peers && methods == o.methods;
  }
};

struct ExportPrincipal {
  std::string peer;  // exact SPIFFE ID
  int64_t budget_bytes = 0;
  bool operator==(const ExportPrincipal& o) const {
    return peer == o.peer && budget_bytes == o.budget_bytes;
  }
};

struct ExportRules {
  bool allowed = false;
  std::vector<ExportPrincipal> principals;
  bool operator==(const ExportRules& o) const {
    return allowed == o.allowed && principals == o.principals;
  }
};

// A validated policy. Only parse_policy (and pipeline_policy, which goes through it)
// can make one, so every Policy that exists has passed validation.
class Policy {
 public:
  int version() const { return version_; }
  const std::string& trust_domain() const { return trust_domain_; }
  const std::string& ns() const { return namespace_; }
  const std::string& job() const { return job_; }
  int shard() const { return shard_; }
  int shards() const { return shards_; }
  const std::vector<PolicyRule>& ingress() const { return ingress_; }
  const std::vector<PolicyRule>& egress() const { return egress_; }
  const ExportRules& exports() const { return export_; }

  bool operator==(const Policy& o) const;
  bool operator!=(const Policy& o) const { return !(*this == o); }

 private:
  friend Policy parse_policy(const std::string& json_text);
  Policy(int version, std::string trust_domain, std::string ns, std::string job, int shard,
         int shards, std::vector<PolicyRule> ingress, std::vector<PolicyRule> egress,
         ExportRules exports);

  const int version_;
  const std::string trust_domain_;
  const std::string namespace_;
  const std::string job_;
  const int shard_;
  const int shards_;
  const std::vector<PolicyRule> ingress_;
  const std::vector<PolicyRule> egress_;
  const ExportRules export_;
};

enum class Direction { kIngress, kEgress };

struct Decision {
  bool allow = false;
  std::string rule;                 // the matching rule's name, or one of the kRule* names above
  std::string reason;               // one human-readable sentence; safe to send back to the caller
  int64_t export_budget_bytes = 0;  // rule "export" only: the principal's budget
};

// Parses and validates a policy document. Throws PolicyError naming every problem.
Policy parse_policy(const std::string& json_text);

// The policy as JSON, every field present (keys sorted), indented by 2 unless that
// would exceed parse_policy's 1 MiB limit (then compact); parse_policy(to_json(p)) == p.
std::string to_json(const Policy& policy);

// The pure decision. No I/O, no allocation beyond the returned strings, no throw
// except std::bad_alloc.
Decision decide(const Policy& policy, Direction direction, const std::string& peer_spiffe_id,
                const std::string& method_path);

// `/<package>.<Service>/<Method>` exactly: a leading '/', exactly two segments, the
// package a dot-separated list of lower-case identifiers ([a-z_][a-z0-9_]*), the
// service and method UpperCamelCase identifiers ([A-Z][A-Za-z0-9_]*). Nothing else:
// no percent-encoding, no empty, "." or ".." segments, no trailing '/', no query,
// no whitespace or control characters, at most 256 bytes.
bool is_canonical_method(const std::string& method_path);

// SPIFFE IDs are checked and built by common/pki.h only: validate_spiffe_id,
// is_spiffe_id, spiffe_trust_domain, spiffe_id_for_shard, spiffe_id_for_exporter.

// The policy of one pipeline stage (DESIGN.md §4): ingress Forward only from
// shard-1 ("forward-from-prev") and Backward only from shard+1 ("backward-from-next");
// egress Forward only to shard+1 ("forward-to-next") and Backward only to shard-1
// ("backward-to-prev"); the first stage has no previous and the last no next
// neighbour. The export section is copied when exports.allowed, else left empty.
// With data-parallel replicas (replica >= 0; -1: a job without replicas), the
// neighbours are replica `replica` of stages shard±1 (spiffe_id_for_replica) and no
// other replica: each replica is its own pipeline.
// With replica >= 0 and replicas > 1, the replicas of this stage average their
// gradients through the sidecars' tunnels, and only they: ingress
// "tunnel-from-replicas" lets every other replica of this stage (same job) open a Gloo
// tunnel, and on replica 0 (which serves the stage's rendezvous store) a Store tunnel
// too; egress "tunnel-to-replicas" lets Gloo go to every other replica of this stage,
// and "tunnel-to-store" (replicas other than 0) Store to replica 0 only. No tunnel to or
// from another stage or job.
// The result is validated by parse_policy; bad arguments throw PolicyError.
Policy pipeline_policy(const std::string& trust_domain, const std::string& ns,
                       const std::string& job, int shard, int shards, const ExportRules& exports,
                       int replica = -1, int replicas = 1);

}  // namespace shardguard::policy
