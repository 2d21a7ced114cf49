// The shard access policy: parsing/validation, the pure decision, the pipeline
// rules of DESIGN.md §4 and the round trip through JSON. No I/O.
#include "shardguard/common/pki.h"
#include "shardguard/policy/policy.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace shardguard::policy {
namespace {

using nlohmann::json;

const std::string kTd = "shardguard.local";
const std::string kNs = "ml";
const std::string kJob = "fmnist";

std::string shard_id(int i) { return spiffe_id_for_shard(kTd, kNs, kJob, i); }
std::string exporter_id() { return spiffe_id_for_exporter(kTd, kNs, kJob); }

// The problems parse_policy reports for `doc` (fails the test if it parses).
std::vector<PolicyProblem> problems_of(const std::string& doc) {
  try {
    parse_policy(doc);
  } catch (const PolicyError& e) {
    return e.problems();
  }
  ADD_FAILURE() << "policy parsed but should not have: " << doc;
  return {};
}

// True when some problem sits at `path` and its message contains `text`.
bool has_problem(const std::vector<PolicyProblem>& problems, const std::string& path,
                 const std::string& text = "") {
  for (const PolicyProblem& p : problems) {
    if (p.path == path && p.message.find(text) != std::string::npos) return true;
  }
  return false;
}

std::string dump(const std::vector<PolicyProblem>& problems) {
  std::string out;
  for (const PolicyProblem& p : problems) out += p.str() + "\n";
  return out;
}

json base_doc() {
  return json{{"version", 1}, {"trustDomain", kTd}, {"namespace", kNs},
              {"job", kJob},  {"shard", 1},         {"shards", 4}};
}

// ---------------------------------------------------------------------------
// is_canonical_method

TEST(PolicyCanonicalMethod, AcceptsExactGrpcPaths) {
  EXPECT_TRUE(is_canonical_method(kForwardMethod));
  EXPECT_TRUE(is_canonical_method(kBackwardMethod));
  EXPECT_TRUE(is_canonical_method(kExportMethod));
  EXPECT_TRUE(is_canonical_method("/grpc.health.v1.Health/Check"));
  EXPECT_TRUE(is_canonical_method("/a.B/C"));
  EXPECT_TRUE(is_canonical_method("/my_pkg.v2.Some_Service/Do_It2"));
}

const std::vector<std::string>& method_tricks() {
  static const std::vector<std::string> tricks = {
      "",
      "/",
      "//",
      "shardguard.v1.Pipeline/Forward",    // missing leading '/'
      "//shardguard.v1.Pipeline/Forward",  // '//'
      "/shardguard.v1.Pipeline//Forward",
      "/shardguard.v1.Pipeline/Forward//",
      "/shardguard.v1.Pipeline/Forward/",   // trailing '/'
      "/shardguard.v1.Pipeline%2FForward",  // percent-encoding
      "/shardguard.v1.Pipeline%2fForward",
      "/shardguard.v1.Pipeline/Forward%00",
      "/shardguard%2Ev1.Pipeline/Forward",
      "%2Fshardguard.v1.Pipeline%2FForward",
      "/shardguard.v1.Pipeline/./Forward",  // '.' / '..' segments
      "/./shardguard.v1.Pipeline/Forward",
      "/shardguard.v1.Pipeline/../Pipeline/Forward",
      "/../shardguard.v1.Pipeline/Forward",
      "/shardguard.v1.Pipeline/..",
      "/shardguard.v1.Pipeline/.",
      "/shardguard..v1.Pipeline/Forward",  // empty package part
      ".shardguard.v1.Pipeline/Forward",
      "/.shardguard.v1.Pipeline/Forward",
      "/shardguard.v1.pipeline/forward",  // other case
      "/shardguard.v1.Pipeline/forward",
      "/shardguard.v1.pipeline/Forward",
      "/Shardguard.v1.Pipeline/Forward",
      "/SHARDGUARD.V1.PIPELINE/FORWARD",
      "/shardguard.v1.Pipeline/Forward?x=1",  // query, fragment, spaces, NUL
      "/shardguard.v1.Pipeline/Forward#f",
      "/shardguard.v1.Pipeline/Forward ",
      " /shardguard.v1.Pipeline/Forward",
      std::string("/shardguard.v1.Pipeline/Forward\0", 32),
      "/shardguard.v1.Pipeline/For\nward",
      "\\shardguard.v1.Pipeline\\Forward",
      "/shardguard.v1.Pipeline\\Forward",
      "/Pipeline/Forward",        // no package
      "/shardguard.v1.Pipeline",  // no method
      "/shardguard.v1.Pipeline/Forward/Extra",
      "/shardguard.v1.Pipeline/*",
      "/shardguard.v1.Pipeline/Forward" + std::string(300, 'x'),
  };
  return tricks;
}

TEST(PolicyCanonicalMethod, RefusesEveryTrick) {
  for (const std::string& m : method_tricks()) {
    if (m == "/shardguard.v1.Pipeline/forward" || m == "/SHARDGUARD.V1.PIPELINE/FORWARD") {
      continue;  // checked below: syntax alone cannot tell the case of a known name
    }
    EXPECT_FALSE(is_canonical_method(m))
        << json(m).dump(-1, ' ', true, json::error_handler_t::replace);
  }
  EXPECT_FALSE(is_canonical_method("/shardguard.v1.Pipeline/forward"));
  EXPECT_FALSE(is_canonical_method("/SHARDGUARD.V1.PIPELINE/FORWARD"));
}

// ---------------------------------------------------------------------------
// SPIFFE IDs

TEST(PolicySpiffe, ValidatesIds) {
  EXPECT_TRUE(is_spiffe_id("spiffe://shardguard.local/ns/ml/job/fmnist/shard/0"));
  EXPECT_TRUE(is_spiffe_id("spiffe://td_1.example-x/a/B.c_d-e"));
  for (const std::string& bad : std::vector<std::string>{
           "",
           "spiffe://",
           "spiffe://shardguard.local",
           "spiffe://shardguard.local/",
           "spiffe://shardguard.local/ns//ml",
           "spiffe://shardguard.local/ns/ml/",
           "spiffe://shardguard.local/./ml",
           "spiffe://shardguard.local/ns/../x",
           "SPIFFE://shardguard.local/ns",
           "spiffe://ShardGuard.local/ns",
           "spiffe://shardguard.local/ns%2Fml",
           "spiffe://shardguard.local/ns?x",
           "spiffe://shardguard.local/ns#x",
           "spiffe://user@shardguard.local/ns",
           "spiffe://shardguard.local:443/ns",
           "https://shardguard.local/ns",
           "spiffe:///ns/ml",
           "spiffe://shardguard.local/ns/*",
       }) {
    EXPECT_FALSE(is_spiffe_id(bad)) << bad;
  }
  EXPECT_FALSE(is_spiffe_id("spiffe://shardguard.local/" + std::string(2048, 'a')));
  EXPECT_EQ(spiffe_trust_domain("spiffe://shardguard.local/ns/ml"), "shardguard.local");
  EXPECT_EQ(spiffe_trust_domain("not an id"), "");
  EXPECT_EQ(shard_id(3), "spiffe://shardguard.local/ns/ml/job/fmnist/shard/3");
  EXPECT_EQ(exporter_id(), "spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter");
}

// ---------------------------------------------------------------------------
// pipeline_policy: every rule for every stage of 1, 2 and 4 shards

TEST(PolicyPipeline, EveryNeighbourRuleForEveryStage) {
  for (int shards : {1, 2, 4}) {
    for (int i = 0; i < shards; ++i) {
      SCOPED_TRACE("shards=" + std::to_string(shards) + " shard=" + std::to_string(i));
      const Policy p = pipeline_policy(kTd, kNs, kJob, i, shards, ExportRules{});
      EXPECT_EQ(p.shard(), i);
      EXPECT_EQ(p.shards(), shards);
      const bool has_prev = i > 0;
      const bool has_next = i + 1 < shards;
      EXPECT_EQ(p.ingress().size(), static_cast<std::size_t>(has_prev + has_next));
      EXPECT_EQ(p.egress().size(), static_cast<std::size_t>(has_prev + has_next));
      EXPECT_FALSE(p.exports().allowed);

      // Every (direction, peer, method): exactly the DESIGN §4 neighbours pass.
      for (int j = 0; j < shards + 1; ++j) {  // j == shards: a stage that does not exist
        for (const std::string& method :
             std::vector<std::string>{kForwardMethod, kBackwardMethod}) {
          const bool fwd = method == kForwardMethod;
          const Decision in = decide(p, Direction::kIngress, shard_id(j), method);
          const Decision out = decide(p, Direction::kEgress, shard_id(j), method);
          const bool in_ok = fwd ? j == i - 1 : j == i + 1;
          const bool out_ok = fwd ? j == i + 1 : j == i - 1;
          SCOPED_TRACE("peer=" + std::to_string(j) + " method=" + method);
          EXPECT_EQ(in.allow, in_ok && j < shards) << in.reason;
          EXPECT_EQ(out.allow, out_ok && j < shards) << out.reason;
          if (in.allow) {
            EXPECT_EQ(in.rule, fwd ? "forward-from-prev" : "backward-from-next");
          } else {
            EXPECT_EQ(in.rule, kRuleDefaultDeny);
          }
          if (out.allow) {
            EXPECT_EQ(out.rule, fwd ? "forward-to-next" : "backward-to-prev");
          } else {
            EXPECT_EQ(out.rule, kRuleDefaultDeny);
          }
        }
      }
      // No stage talks to itself.
      EXPECT_FALSE(decide(p, Direction::kIngress, shard_id(i), kForwardMethod).allow);
      EXPECT_FALSE(decide(p, Direction::kIngress, shard_id(i), kBackwardMethod).allow);
      // Export is refused when the job does not allow it.
      const Decision ex = decide(p, Direction::kIngress, exporter_id(), kExportMethod);
      EXPECT_FALSE(ex.allow);
      EXPECT_EQ(ex.rule, kRuleExportDenied);
    }
  }
}

TEST(PolicyPipeline, MiddleStageRulesAreExactlyTheNeighbours) {
  const Policy p = pipeline_policy(kTd, kNs, kJob, 2, 4, ExportRules{});
  ASSERT_EQ(p.ingress().size(), 2u);
  EXPECT_EQ(p.ingress()[0], (PolicyRule{"forward-from-prev", {shard_id(1)}, {kForwardMethod}}));
  EXPECT_EQ(p.ingress()[1], (PolicyRule{"backward-from-next", {shard_id(3)}, {kBackwardMethod}}));
  ASSERT_EQ(p.egress().size(), 2u);
  EXPECT_EQ(p.egress()[0], (PolicyRule{"backward-to-prev", {shard_id(1)}, {kBackwardMethod}}));
  EXPECT_EQ(p.egress()[1], (PolicyRule{"forward-to-next", {shard_id(3)}, {kForwardMethod}}));
}

// Data-parallel replicas (issue 20): replica r of stage i talks only to replica r of
// stages i±1 — never to another replica's neighbours, to its own stage's replicas
// through the pipeline methods, or to a plain shard identity.
TEST(PolicyPipeline, ReplicaTalksOnlyToTheSameReplicaOfItsNeighbours) {
  auto replica_id = [](int shard, int replica) {
    return spiffe_id_for_replica(kTd, kNs, kJob, static_cast<uint32_t>(shard), static_cast<uint32_t>(replica));
  };
  EXPECT_EQ(replica_id(2, 1), "spiffe://shardguard.local/ns/ml/job/fmnist/shard/2/replica/1");
  const Policy p = pipeline_policy(kTd, kNs, kJob, 2, 4, ExportRules{}, 1);
  ASSERT_EQ(p.ingress().size(), 2u);
  EXPECT_EQ(p.ingress()[0], (PolicyRule{"forward-from-prev", {replica_id(1, 1)}, {kForwardMethod}}));
  EXPECT_EQ(p.ingress()[1], (PolicyRule{"backward-from-next", {replica_id(3, 1)}, {kBackwardMethod}}));
  ASSERT_EQ(p.egress().size(), 2u);
  EXPECT_EQ(p.egress()[0], (PolicyRule{"backward-to-prev", {replica_id(1, 1)}, {kBackwardMethod}}));
  EXPECT_EQ(p.egress()[1], (PolicyRule{"forward-to-next", {replica_id(3, 1)}, {kForwardMethod}}));
  EXPECT_TRUE(decide(p, Direction::kIngress, replica_id(1, 1), kForwardMethod).allow);
  for (const std::string& other : {replica_id(1, 0), replica_id(1, 2), replica_id(2, 0), shard_id(1)}) {
    const Decision d = decide(p, Direction::kIngress, other, kForwardMethod);
    EXPECT_FALSE(d.allow) << other;
    EXPECT_EQ(d.rule, kRuleDefaultDeny) << other;
  }
  EXPECT_FALSE(decide(p, Direction::kEgress, replica_id(3, 0), kForwardMethod).allow);
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 2, 4, ExportRules{}, -2), PolicyError);
}

// The tunnels of the gradient all-reduce (issue 20): only between replicas of the
// same stage of the same job; Store only to replica 0, which serves the stage's store.
TEST(PolicyPipeline, TunnelsOnlyBetweenReplicasOfTheSameStage) {
  auto rid = [](int shard, int replica, const std::string& job = kJob) {
    return spiffe_id_for_replica(kTd, kNs, job, static_cast<uint32_t>(shard), static_cast<uint32_t>(replica));
  };
  const Policy r0 = pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}, 0, 3);
  const Policy r1 = pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}, 1, 3);
  const Policy r2 = pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}, 2, 3);
  // Gloo's greater replica connects: Gloo comes in from greater replicas only and goes
  // out to lesser ones only; the store goes to replica 0 only.
  ASSERT_EQ(r0.ingress().size(), 4u);
  EXPECT_EQ(r0.ingress()[2], (PolicyRule{"tunnel-from-replicas", {rid(1, 1), rid(1, 2)}, {kTunnelGlooMethod}}));
  EXPECT_EQ(r0.ingress()[3], (PolicyRule{"tunnel-store-from-replicas", {rid(1, 1), rid(1, 2)}, {kTunnelStoreMethod}}));
  ASSERT_EQ(r0.egress().size(), 2u);
  ASSERT_EQ(r1.ingress().size(), 3u);
  EXPECT_EQ(r1.ingress()[2], (PolicyRule{"tunnel-from-replicas", {rid(1, 2)}, {kTunnelGlooMethod}}));
  ASSERT_EQ(r1.egress().size(), 4u);
  EXPECT_EQ(r1.egress()[2], (PolicyRule{"tunnel-to-replicas", {rid(1, 0)}, {kTunnelGlooMethod}}));
  EXPECT_EQ(r1.egress()[3], (PolicyRule{"tunnel-to-store", {rid(1, 0)}, {kTunnelStoreMethod}}));
  ASSERT_EQ(r2.ingress().size(), 2u);
  EXPECT_EQ(r2.egress()[2], (PolicyRule{"tunnel-to-replicas", {rid(1, 0), rid(1, 1)}, {kTunnelGlooMethod}}));

  // Replica 0 serves the store to its stage's replicas and takes Gloo from them.
  EXPECT_EQ(decide(r0, Direction::kIngress, rid(1, 2), kTunnelGlooMethod).rule, "tunnel-from-replicas");
  EXPECT_EQ(decide(r0, Direction::kIngress, rid(1, 2), kTunnelStoreMethod).rule, "tunnel-store-from-replicas");
  // A lesser replica never reaches a greater one's Gloo listener, nor sends it Gloo.
  EXPECT_FALSE(decide(r1, Direction::kIngress, rid(1, 0), kTunnelGlooMethod).allow);
  EXPECT_FALSE(decide(r2, Direction::kIngress, rid(1, 1), kTunnelGlooMethod).allow);
  EXPECT_FALSE(decide(r0, Direction::kEgress, rid(1, 1), kTunnelGlooMethod).allow);
  EXPECT_FALSE(decide(r1, Direction::kEgress, rid(1, 2), kTunnelGlooMethod).allow);
  EXPECT_TRUE(decide(r2, Direction::kEgress, rid(1, 1), kTunnelGlooMethod).allow);
  // Another stage, another job, a plain shard identity: refused, both ways.
  for (const std::string& other : {rid(0, 1), rid(2, 1), rid(2, 0), rid(1, 1, "other-job"), shard_id(1)}) {
    for (const char* m : {kTunnelGlooMethod, kTunnelStoreMethod}) {
      const Decision in = decide(r0, Direction::kIngress, other, m);
      EXPECT_FALSE(in.allow) << other << " " << m;
      EXPECT_EQ(in.rule, kRuleDefaultDeny) << other << " " << m;
      EXPECT_FALSE(decide(r1, Direction::kEgress, other, m).allow) << other << " " << m;
    }
  }
  EXPECT_FALSE(decide(r0, Direction::kIngress, rid(1, 0), kTunnelGlooMethod).allow);  // itself
  // Store: only replica 0 serves it; no replica takes it elsewhere or sends it there.
  EXPECT_FALSE(decide(r1, Direction::kIngress, rid(1, 0), kTunnelStoreMethod).allow);
  EXPECT_FALSE(decide(r1, Direction::kEgress, rid(1, 2), kTunnelStoreMethod).allow);
  EXPECT_TRUE(decide(r1, Direction::kEgress, rid(1, 0), kTunnelStoreMethod).allow);
  EXPECT_FALSE(decide(r0, Direction::kEgress, rid(1, 1), kTunnelStoreMethod).allow);
  // A case variant of a tunnel method is a trick, not an unknown method.
  EXPECT_EQ(decide(r0, Direction::kIngress, rid(1, 1), "/shardguard.v1.Tunnel/gloo").rule, kRuleMalformedMethod);
  // No tunnel rules without replicas, or with one.
  for (const Policy& p : {pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}),
                          pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}, 0, 1)}) {
    EXPECT_EQ(p.ingress().size(), 2u);
    EXPECT_EQ(p.egress().size(), 2u);
  }
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}, 2, 2), PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}, 0, 0), PolicyError);
}

TEST(PolicyPipeline, NonNeighbourCallingForwardIsDenied) {
  const Policy p = pipeline_policy(kTd, kNs, kJob, 2, 4, ExportRules{});
  for (int j : {0, 2, 3}) {
    const Decision d = decide(p, Direction::kIngress, shard_id(j), kForwardMethod);
    EXPECT_FALSE(d.allow) << j;
    EXPECT_EQ(d.rule, kRuleDefaultDeny);
    EXPECT_NE(d.reason.find(shard_id(j)), std::string::npos) << d.reason;
  }
  // Nor may stage 2 send Forward anywhere but stage 3.
  EXPECT_FALSE(decide(p, Direction::kEgress, shard_id(0), kForwardMethod).allow);
  EXPECT_FALSE(decide(p, Direction::kEgress, shard_id(1), kForwardMethod).allow);
  EXPECT_TRUE(decide(p, Direction::kEgress, shard_id(3), kForwardMethod).allow);
  // The exporter identity is no pipeline peer.
  EXPECT_FALSE(decide(p, Direction::kIngress, exporter_id(), kForwardMethod).allow);
}

TEST(PolicyPipeline, NeighbourCallingUnknownMethodIsDenied) {
  const Policy p = pipeline_policy(kTd, kNs, kJob, 2, 4, ExportRules{});
  for (const std::string& m :
       std::vector<std::string>{"/shardguard.v1.Pipeline/Reset", "/shardguard.v1.Pipeline/Forward2",
                                "/shardguard.v1.Other/Forward", "/grpc.health.v1.Health/Check",
                                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}) {
    const Decision d = decide(p, Direction::kIngress, shard_id(1), m);
    EXPECT_FALSE(d.allow) << m;
    EXPECT_EQ(d.rule, kRuleDefaultDeny) << m;
  }
  // The neighbour calls the other direction's method: also denied.
  EXPECT_EQ(decide(p, Direction::kIngress, shard_id(1), kBackwardMethod).rule, kRuleDefaultDeny);
  EXPECT_EQ(decide(p, Direction::kIngress, shard_id(3), kForwardMethod).rule, kRuleDefaultDeny);
}

TEST(PolicyPipeline, ExportRulesOnlyWhenAllowed) {
  ExportRules ex{true, {{exporter_id(), 4096}}};
  const Policy p = pipeline_policy(kTd, kNs, kJob, 1, 4, ex);
  EXPECT_EQ(p.exports(), ex);
  Decision d = decide(p, Direction::kIngress, exporter_id(), kExportMethod);
  EXPECT_TRUE(d.allow) << d.reason;
  EXPECT_EQ(d.rule, kRuleExport);
  EXPECT_EQ(d.export_budget_bytes, 4096);
  // Only the principal; not a neighbour shard; never on egress.
  d = decide(p, Direction::kIngress, shard_id(0), kExportMethod);
  EXPECT_FALSE(d.allow);
  EXPECT_EQ(d.rule, kRuleExportDenied);
  EXPECT_FALSE(decide(p, Direction::kEgress, exporter_id(), kExportMethod).allow);
  // The exporter may not use the pipeline methods.
  EXPECT_FALSE(decide(p, Direction::kIngress, exporter_id(), kForwardMethod).allow);

  // Not allowed: principals are dropped, the export is refused.
  ex.allowed = false;
  const Policy closed = pipeline_policy(kTd, kNs, kJob, 1, 4, ex);
  EXPECT_FALSE(closed.exports().allowed);
  EXPECT_TRUE(closed.exports().principals.empty());
  d = decide(closed, Direction::kIngress, exporter_id(), kExportMethod);
  EXPECT_FALSE(d.allow);
  EXPECT_EQ(d.rule, kRuleExportDenied);
}

TEST(PolicyPipeline, BadArgumentsThrow) {
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 4, 4, ExportRules{}), PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, -1, 4, ExportRules{}), PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 0, 0, ExportRules{}), PolicyError);
  EXPECT_THROW(pipeline_policy("Bad Domain", kNs, kJob, 0, 2, ExportRules{}), PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, "ML", kJob, 0, 2, ExportRules{}), PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, kNs, "a/b", 0, 2, ExportRules{}), PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 0, 2, ExportRules{true, {}}), PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 0, 2, ExportRules{true, {{exporter_id(), -1}}}),
               PolicyError);
  EXPECT_THROW(pipeline_policy(kTd, kNs, kJob, 2147483647, 2147483647, ExportRules{}), PolicyError);
}

// ---------------------------------------------------------------------------
// decide: tricks, foreign identities, patterns

TEST(PolicyDecide, EveryMethodPathTrickIsMalformed) {
  const Policy p = pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{true, {{exporter_id(), 1}}});
  for (const std::string& m : method_tricks()) {
    for (Direction dir : {Direction::kIngress, Direction::kEgress}) {
      for (int peer : {0, 2}) {
        const Decision d = decide(p, dir, shard_id(peer), m);
        EXPECT_FALSE(d.allow) << m;
        EXPECT_EQ(d.rule, kRuleMalformedMethod)
            << json(m).dump(-1, ' ', true, json::error_handler_t::replace);
      }
    }
  }
  // Case variants of the export method, too.
  const Decision d =
      decide(p, Direction::kIngress, exporter_id(), "/shardguard.v1.ShardExport/EXPORT");
  EXPECT_FALSE(d.allow);
  EXPECT_EQ(d.rule, kRuleMalformedMethod);
  // The genuine calls still pass.
  EXPECT_TRUE(decide(p, Direction::kIngress, shard_id(0), kForwardMethod).allow);
  EXPECT_TRUE(decide(p, Direction::kIngress, shard_id(2), kBackwardMethod).allow);
}

TEST(PolicyDecide, ForeignJobNamespaceAndTrustDomainAreDenied) {
  const Policy p = pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{});
  // Same index, another job or namespace: a valid identity, but no rule names it.
  for (const std::string& peer : std::vector<std::string>{
           spiffe_id_for_shard(kTd, kNs, "other", 0), spiffe_id_for_shard(kTd, "prod", kJob, 0),
           spiffe_id_for_shard(kTd, kNs, "fmnist2", 0), spiffe_id_for_shard(kTd, kNs, "fmnis", 0),
           "spiffe://shardguard.local/ns/ml/job/fmnist/shard/0/x",
           "spiffe://shardguard.local/ns/ml/job/fmnist/shard/00",
           "spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter"}) {
    const Decision d = decide(p, Direction::kIngress, peer, kForwardMethod);
    EXPECT_FALSE(d.allow) << peer;
    EXPECT_EQ(d.rule, kRuleDefaultDeny) << peer;
  }
  // Another trust domain or no valid SPIFFE ID at all: bad-peer.
  for (const std::string& peer : std::vector<std::string>{
           spiffe_id_for_shard("evil.local", kNs, kJob, 0),
           spiffe_id_for_shard("shardguard.local.evil", kNs, kJob, 0),
           std::string("spiffe://SHARDGUARD.local/ns/ml/job/fmnist/shard/0"), std::string(""),
           std::string("spiffe://shardguard.local"),
           std::string("spiffe://shardguard.local/ns/ml/job/fmnist/shard/0/"),
           std::string("spiffe://shardguard.local/ns/ml/job/fmnist/shard/../0"),
           std::string("spiffe://shardguard.local/ns/ml/job/fmnist/shard%2F0"),
           std::string("spiffe://shardguard.local/ns/ml/job/fmnist/shard/*"),
           std::string("CN=shard-0")}) {
    const Decision d = decide(p, Direction::kIngress, peer, kForwardMethod);
    EXPECT_FALSE(d.allow) << peer;
    EXPECT_EQ(d.rule, kRuleBadPeer) << peer;
  }
}

TEST(PolicyDecide, ShardPatternMatchesOneIndexOfThatJobOnly) {
  json doc = base_doc();
  doc["ingress"] = json::array({{{"name", "any-stage"},
                                 {"peers", {"spiffe://shardguard.local/ns/ml/job/fmnist/shard/*"}},
                                 {"methods", {kBackwardMethod}}}});
  const Policy p = parse_policy(doc.dump());
  for (int i : {0, 1, 3, 10, 123456789}) {
    const Decision d = decide(p, Direction::kIngress, shard_id(i), kBackwardMethod);
    EXPECT_TRUE(d.allow) << i;
    EXPECT_EQ(d.rule, "any-stage");
  }
  const std::string base = "spiffe://shardguard.local/ns/ml/job/fmnist/shard/";
  for (const std::string& peer : std::vector<std::string>{
           base + "01", base + "00", base + "1a", base + "1/x", base + "x", base + "1234567890",
           base + "_1", base + "-1", exporter_id(), spiffe_id_for_shard(kTd, kNs, "other", 0),
           spiffe_id_for_shard(kTd, "prod", kJob, 0),
           std::string("spiffe://shardguard.local/ns/ml/job/fmnist/shards/0")}) {
    const Decision d = decide(p, Direction::kIngress, peer, kBackwardMethod);
    EXPECT_FALSE(d.allow) << peer;
  }
  // Ingress rules do not apply to egress, and the method still has to match.
  EXPECT_FALSE(decide(p, Direction::kEgress, shard_id(0), kBackwardMethod).allow);
  EXPECT_FALSE(decide(p, Direction::kIngress, shard_id(0), kForwardMethod).allow);
}

TEST(PolicyDecide, ReasonsQuoteUntrustedInput) {
  const Policy p = pipeline_policy(kTd, kNs, kJob, 0, 2, ExportRules{});
  const Decision d =
      decide(p, Direction::kIngress, std::string("spiffe://x\n\"injected\"\xff"), kForwardMethod);
  EXPECT_EQ(d.rule, kRuleBadPeer);
  EXPECT_EQ(d.reason.find('\n'), std::string::npos) << d.reason;
  EXPECT_EQ(d.reason.find("\xff"), std::string::npos) << d.reason;
  const Decision long_method =
      decide(p, Direction::kIngress, shard_id(1), std::string(100000, '/'));
  EXPECT_EQ(long_method.rule, kRuleMalformedMethod);
  EXPECT_LT(long_method.reason.size(), 400u);
}

// ---------------------------------------------------------------------------
// parse_policy: every problem named by its JSON path

TEST(PolicyParse, MinimalPolicyDeniesEverything) {
  const Policy p = parse_policy(base_doc().dump());
  EXPECT_EQ(p.version(), 1);
  EXPECT_EQ(p.trust_domain(), kTd);
  EXPECT_EQ(p.ns(), kNs);
  EXPECT_EQ(p.job(), kJob);
  EXPECT_TRUE(p.ingress().empty());
  EXPECT_TRUE(p.egress().empty());
  EXPECT_FALSE(p.exports().allowed);
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(decide(p, Direction::kIngress, shard_id(j), kForwardMethod).rule, kRuleDefaultDeny);
    EXPECT_EQ(decide(p, Direction::kEgress, shard_id(j), kForwardMethod).rule, kRuleDefaultDeny);
  }
}

TEST(PolicyParse, ListsEveryProblemWithItsPath) {
  json doc = base_doc();
  doc["version"] = 2;
  doc["shard"] = 4;
  doc["color"] = "blue";
  doc["ingress"] = json::array({
      {{"name", "ok"}, {"peers", {shard_id(0)}}, {"methods", {kForwardMethod}}},
      {{"name", "fwd"},
       {"peers",
        {shard_id(0), "spiffe://other.local/ns/ml/job/fmnist/shard/0", "shard-0", shard_id(0)}},
       {"methods",
        {"/shardguard.v1.pipeline/forward", "/shardguard.v1.Pipeline/FORWARD",
         "/shardguard.v1.Pipeline//Backward", kExportMethod}}},
      {{"name", "ok"}, {"peer", {shard_id(0)}}, {"methods", json::array()}},
  });
  doc["egress"] = json::array({
      {{"name", "Bad_Name"}, {"peers", json::array()}, {"methods", {kBackwardMethod}}},
      {{"name", "default-deny"}, {"peers", {shard_id(0)}}, {"methods", {kBackwardMethod}}},
      "not an object",
  });
  doc["export"] = {
      {"allowed", true},
      {"principals",
       {{{"peer", exporter_id()}, {"budgetBytes", -5}},
        {{"peer", exporter_id()}, {"budgetBytes", 1.5}},
        {{"peer", "spiffe://shardguard.local/ns/ml/job/fmnist/shard/*"}, {"budgetBytes", 1}},
        {{"peer", "spiffe://other.local/x"}, {"budget", 1}}}}};
  const std::vector<PolicyProblem> ps = problems_of(doc.dump());
  SCOPED_TRACE(dump(ps));
  EXPECT_TRUE(has_problem(ps, "version", "must be 1"));
  EXPECT_TRUE(has_problem(ps, "shard", "must be in [0, shards = 4), got 4"));
  EXPECT_TRUE(has_problem(ps, "color", "unknown field"));
  EXPECT_TRUE(has_problem(ps, "ingress[1].peers[1]", "trust domain"));
  EXPECT_TRUE(has_problem(ps, "ingress[1].peers[2]", "must be a SPIFFE ID"));
  EXPECT_TRUE(has_problem(ps, "ingress[1].peers[3]", "duplicate"));
  EXPECT_TRUE(has_problem(ps, "ingress[1].methods[0]",
                          "\"/shardguard.v1.pipeline/forward\" is not a canonical method"));
  EXPECT_TRUE(
      has_problem(ps, "ingress[1].methods[1]", "spelled \"/shardguard.v1.Pipeline/Forward\""));
  EXPECT_TRUE(has_problem(ps, "ingress[1].methods[2]", "not a canonical method"));
  EXPECT_TRUE(has_problem(ps, "ingress[1].methods[3]", "\"export\" section"));
  EXPECT_TRUE(
      has_problem(ps, "ingress[2].name", "duplicate value \"ok\" (also at ingress[0].name)"));
  EXPECT_TRUE(has_problem(ps, "ingress[2].peer", "unknown field"));
  EXPECT_TRUE(has_problem(ps, "ingress[2].peers", "required, got nothing"));
  EXPECT_TRUE(has_problem(ps, "ingress[2].methods", "at least one"));
  EXPECT_TRUE(has_problem(ps, "egress[0].name", "must be a DNS-1123 label"));
  EXPECT_TRUE(has_problem(ps, "egress[0].peers", "at least one"));
  EXPECT_TRUE(has_problem(ps, "egress[1].name", "must not be a rule name the engine reports"));
  EXPECT_TRUE(has_problem(ps, "egress[2]", "expected an object"));
  EXPECT_TRUE(has_problem(ps, "export.principals[0].budgetBytes", "must be at least 0, got -5"));
  EXPECT_TRUE(has_problem(ps, "export.principals[1].peer", "duplicate value"));
  EXPECT_TRUE(has_problem(ps, "export.principals[1].budgetBytes", "expected an integer"));
  EXPECT_TRUE(has_problem(ps, "export.principals[2].peer", "no patterns"));
  EXPECT_TRUE(has_problem(ps, "export.principals[3].peer", "trust domain"));
  EXPECT_TRUE(has_problem(ps, "export.principals[3].budget", "unknown field"));
  EXPECT_TRUE(has_problem(ps, "export.principals[3].budgetBytes", "required, got nothing"));
  // The message names every problem, one per line.
  try {
    parse_policy(doc.dump());
  } catch (const PolicyError& e) {
    EXPECT_NE(
        std::string(e.what()).find(
            "ingress[1].methods[0]: \"/shardguard.v1.pipeline/forward\" is not a canonical method"),
        std::string::npos)
        << e.what();
  }
}

TEST(PolicyParse, RequiredFieldsAndTypes) {
  std::vector<PolicyProblem> ps = problems_of("{}");
  for (const char* f : {"version", "trustDomain", "namespace", "job", "shard", "shards"}) {
    EXPECT_TRUE(has_problem(ps, f, "required, got nothing")) << f << "\n" << dump(ps);
  }
  json doc = base_doc();
  doc["version"] = "1";
  doc["trustDomain"] = 7;
  doc["namespace"] = "Ml";
  doc["job"] = "-job";
  doc["shards"] = 0;
  doc["shard"] = 1e20;
  doc["ingress"] = {{"name", "x"}};
  doc["egress"] = nullptr;
  doc["export"] = {{"allowed", "yes"}};
  ps = problems_of(doc.dump());
  SCOPED_TRACE(dump(ps));
  EXPECT_TRUE(has_problem(ps, "version", "expected an integer"));
  EXPECT_TRUE(has_problem(ps, "trustDomain", "expected a string"));
  EXPECT_TRUE(has_problem(ps, "namespace", "DNS-1123"));
  EXPECT_TRUE(has_problem(ps, "job", "DNS-1123"));
  EXPECT_TRUE(has_problem(ps, "shards", "at least 1"));
  EXPECT_TRUE(has_problem(ps, "shard", "integer"));
  EXPECT_TRUE(has_problem(ps, "ingress", "expected an array"));
  EXPECT_TRUE(has_problem(ps, "egress", "expected an array"));
  EXPECT_TRUE(has_problem(ps, "export.allowed", "true or false"));

  doc = base_doc();
  doc["export"] = {{"allowed", false},
                   {"principals", {{{"peer", exporter_id()}, {"budgetBytes", 1}}}}};
  EXPECT_TRUE(has_problem(problems_of(doc.dump()), "export.principals", "must be empty"));
  doc["export"] = {
      {"allowed", true},
      {"principals", {{{"peer", exporter_id()}, {"budgetBytes", 18446744073709551615ull}}}}};
  EXPECT_TRUE(has_problem(problems_of(doc.dump()), "export.principals[0].budgetBytes", "out of range"));
  doc["export"] = {{"allowed", true}};
  EXPECT_TRUE(has_problem(problems_of(doc.dump()), "export.principals", "at least one"));
}

TEST(PolicyParse, RefusesMalformedJsonDuplicateKeysAndNonObjects) {
  EXPECT_TRUE(has_problem(problems_of("{"), "policy", "not valid JSON"));
  EXPECT_TRUE(has_problem(problems_of(""), "policy", "not valid JSON"));
  EXPECT_TRUE(has_problem(problems_of("[]"), "policy", "expected a JSON object"));
  EXPECT_TRUE(has_problem(problems_of("null"), "policy", "expected a JSON object"));
  EXPECT_TRUE(has_problem(problems_of(std::string(2 << 20, ' ')), "policy", "limit"));
  // A second key must not silently override the first.
  const std::string dup =
      R"({"version":1,"trustDomain":"shardguard.local","namespace":"ml","job":"fmnist",)"
      R"("shard":1,"shards":4,"ingress":[{"name":"a","peers":["spiffe://shardguard.local/x"],)"
      R"("methods":["/shardguard.v1.Pipeline/Forward"],)"
      R"("peers":["spiffe://shardguard.local/ns/ml/job/fmnist/shard/*"]}],"shards":9})";
  const std::vector<PolicyProblem> ps = problems_of(dup);
  SCOPED_TRACE(dump(ps));
  EXPECT_TRUE(has_problem(ps, "ingress[0].peers", "duplicate key"));
  EXPECT_TRUE(has_problem(ps, "shards", "duplicate key"));
}

// Found by tests/fuzz/policy_fuzz: deep nesting that fits in the 1 MiB limit built one
// path string per level (memory and time quadratic in the depth: 300 000 levels ran out
// of memory) and overflowed the stack in nlohmann's recursive dump when the value was
// quoted in a message. Nesting past 32 levels is now refused while parsing.
TEST(PolicyParse, RefusesDeepNestingCheaply) {
  const std::size_t depth = 400000;  // 800 KB
  const std::string deep = std::string(depth, '[') + std::string(depth, ']');
  for (const std::string& doc :
       {deep, R"({"version":)" + deep + "}", R"({"ingress":[{"peers":)" + deep + "}]}"}) {
    const std::vector<PolicyProblem> ps = problems_of(doc);
    SCOPED_TRACE(dump(ps).substr(0, 500));
    ASSERT_EQ(ps.size(), 1u);
    EXPECT_NE(ps[0].message.find("nested more than 32 levels"), std::string::npos);
  }
  // The problem names the container that went too deep; 32 levels still parse.
  std::string path = "version";
  for (int i = 0; i < 31; ++i) path += "[0]";
  auto nested = [](int levels) {
    return R"({"version":)" + std::string(levels, '[') + std::string(levels, ']') + "}";
  };
  EXPECT_TRUE(has_problem(problems_of(nested(32)), path, "nested more than 32 levels"));
  EXPECT_TRUE(has_problem(problems_of(nested(31)), "version", "expected an integer"));
}

// A 1 MiB policy holds tens of thousands of peers, methods or principals; duplicates and
// case variants used to be found by comparing every pair (about a minute for 70 000
// methods in an optimised build, many more under the sanitizers).
TEST(PolicyParse, HugeListsParseQuickly) {
  json doc = base_doc();
  json methods = json::array();
  for (int i = 0; i < 35000; ++i) methods.push_back("/a.B/Ma" + std::to_string(i));
  json peers = json::array();
  for (int i = 0; i < 8000; ++i) peers.push_back("spiffe://" + kTd + "/p" + std::to_string(i));
  json principals = json::array();
  for (int i = 0; i < 2000; ++i) {
    principals.push_back({{"peer", "spiffe://" + kTd + "/e" + std::to_string(i)}, {"budgetBytes", 1}});
  }
  doc["ingress"] = json::array({{{"name", "many"}, {"peers", peers}, {"methods", methods}}});
  doc["egress"] = json::array({{{"name", "out"}, {"peers", {shard_id(0)}}, {"methods", {"/a.B/Mb"}}}});
  doc["export"] = {{"allowed", true}, {"principals", principals}};
  const std::string text = doc.dump();
  ASSERT_LT(text.size(), std::size_t{1} << 20);
  const auto start = std::chrono::steady_clock::now();
  const Policy p = parse_policy(text);
  EXPECT_EQ(p.ingress().at(0).methods.size(), 35000u);
  EXPECT_EQ(p.exports().principals.size(), 2000u);
  // Indented, this policy would pass the 1 MiB limit: to_json falls back to compact.
  EXPECT_EQ(parse_policy(to_json(p)), p);
  // Duplicates and case variants at the ends of the lists are still found, against the
  // first earlier spelling.
  doc["ingress"][0]["methods"].push_back("/a.B/MA34999");
  doc["ingress"][0]["peers"].push_back("spiffe://" + kTd + "/p7999");
  doc["egress"][0]["methods"].push_back("/a.B/MA7");
  doc["egress"][0]["methods"].push_back("/a.B/MB");
  doc["export"]["principals"].push_back({{"peer", "spiffe://" + kTd + "/e1999"}, {"budgetBytes", 1}});
  const std::vector<PolicyProblem> ps = problems_of(doc.dump());
  SCOPED_TRACE(dump(ps));
  EXPECT_EQ(ps.size(), 7u);
  EXPECT_TRUE(has_problem(ps, "ingress[0].methods[35000]", "duplicate value \"/a.B/Ma34999\" (also at ingress[0].methods[34999])"));
  EXPECT_TRUE(has_problem(ps, "ingress[0].methods[35000]",
                          "differs only in letter case from \"/a.B/Ma34999\" at ingress[0].methods[34999]"));
  EXPECT_TRUE(has_problem(ps, "egress[0].methods[2]", "duplicate value \"/a.B/Mb\" (also at egress[0].methods[0])"));
  EXPECT_TRUE(has_problem(ps, "ingress[0].peers[8000]", "duplicate value"));
  EXPECT_TRUE(has_problem(ps, "egress[0].methods[1]",
                          "differs only in letter case from \"/a.B/Ma7\" at ingress[0].methods[7]"));
  EXPECT_TRUE(has_problem(ps, "egress[0].methods[2]",
                          "differs only in letter case from \"/a.B/Mb\" at egress[0].methods[0]"));
  EXPECT_TRUE(has_problem(ps, "export.principals[2000].peer", "duplicate value"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

TEST(PolicyParse, RefusesPatternsOtherThanTheShardWildcard) {
  for (const std::string& bad : std::vector<std::string>{
           "spiffe://shardguard.local/ns/ml/job/fmnist/shard/*/x",
           "spiffe://shardguard.local/ns/ml/job/*/shard/0",
           "spiffe://shardguard.local/ns/*/job/fmnist/shard/*",
           "spiffe://shardguard.local/ns/ml/job/fmnist/shard/1*",
           "spiffe://shardguard.local/ns/ml/job/fmnist/shard/**",
           "spiffe://shardguard.local/ns/ml/job/fmnist/role/*",
           "spiffe://shardguard.local/ns/ml/job/fmnist/*",
           "spiffe://shardguard.local/*",
           "spiffe://*/ns/ml/job/fmnist/shard/*",
           "spiffe://shardguard.local/x/ns/ml/job/fmnist/shard/*",
           "spiffe://shardguard.local/ns/ml/job/fmnist/shard/.*",
           "spiffe://shardguard.local/ns/ml/job/fmnist/shard/[0-9]+",
       }) {
    json doc = base_doc();
    doc["ingress"] =
        json::array({{{"name", "r"}, {"peers", {bad}}, {"methods", {kForwardMethod}}}});
    const std::vector<PolicyProblem> ps = problems_of(doc.dump());
    EXPECT_TRUE(has_problem(ps, "ingress[0].peers[0]")) << bad << "\n" << dump(ps);
  }
  json doc = base_doc();
  doc["egress"] = json::array({{{"name", "r"},
                                {"peers", {"spiffe://other.local/ns/ml/job/fmnist/shard/*"}},
                                {"methods", {kForwardMethod}}}});
  EXPECT_TRUE(has_problem(problems_of(doc.dump()), "egress[0].peers[0]", "trust domain"));
}

TEST(PolicyParse, RefusesMethodsThatDifferOnlyInCase) {
  json doc = base_doc();
  doc["ingress"] =
      json::array({{{"name", "a"}, {"peers", {shard_id(0)}}, {"methods", {"/x.v1.Svc/DoIt"}}}});
  doc["egress"] =
      json::array({{{"name", "b"}, {"peers", {shard_id(0)}}, {"methods", {"/x.v1.Svc/DOIT"}}}});
  EXPECT_TRUE(
      has_problem(problems_of(doc.dump()), "egress[0].methods[0]", "differs only in letter case"));
}

// ---------------------------------------------------------------------------
// Round trip and immutability

TEST(PolicyRoundTrip, PipelinePoliciesSurviveJson) {
  for (int shards : {1, 2, 4}) {
    for (int i = 0; i < shards; ++i) {
      for (bool allowed : {false, true}) {
        const ExportRules ex{allowed, {{exporter_id(), 1 << 20}, {shard_id(0), 0}}};
        const Policy p = pipeline_policy(kTd, kNs, kJob, i, shards, ex);
        const std::string text = to_json(p);
        const Policy back = parse_policy(text);
        EXPECT_EQ(back, p) << text;
        EXPECT_EQ(to_json(back), text);
      }
    }
  }
}

TEST(PolicyRoundTrip, HandWrittenPolicySurvivesJson) {
  json doc = base_doc();
  doc["ingress"] = json::array(
      {{{"name", "any-stage"},
        {"peers", {"spiffe://shardguard.local/ns/ml/job/fmnist/shard/*", exporter_id()}},
        {"methods", {kBackwardMethod, "/grpc.health.v1.Health/Check"}}}});
  doc["export"] = {
      {"allowed", true},
      {"principals", {{{"peer", exporter_id()}, {"budgetBytes", 9223372036854775807ll}}}}};
  const Policy p = parse_policy(doc.dump());
  EXPECT_EQ(parse_policy(to_json(p)), p);
  EXPECT_EQ(p.exports().principals.at(0).budget_bytes, 9223372036854775807ll);
  // Equality sees every field.
  EXPECT_NE(pipeline_policy(kTd, kNs, kJob, 0, 2, ExportRules{}),
            pipeline_policy(kTd, kNs, kJob, 1, 2, ExportRules{}));
  EXPECT_NE(pipeline_policy(kTd, kNs, kJob, 0, 2, ExportRules{}),
            pipeline_policy(kTd, kNs, "other", 0, 2, ExportRules{}));
}

TEST(PolicyImmutable, OnlyParsingMakesOneAndNothingChangesIt) {
  static_assert(!std::is_default_constructible_v<Policy>);
  static_assert(!std::is_copy_assignable_v<Policy>);
  static_assert(!std::is_move_assignable_v<Policy>);
  static_assert(std::is_same_v<decltype(std::declval<const Policy&>().ingress()),
                               const std::vector<PolicyRule>&>);
  const std::shared_ptr<const Policy> shared =
      std::make_shared<const Policy>(pipeline_policy(kTd, kNs, kJob, 1, 3, ExportRules{}));
  EXPECT_TRUE(decide(*shared, Direction::kIngress, shard_id(0), kForwardMethod).allow);
}

}  // namespace
}  // namespace shardguard::policy
