// plan(observed) and the status arithmetic behind it (issue 4 items 3-5): exposure
// from placement history, placement restrictions, conditions, runPolicy, and that a
// settled job plans no writes at all.
#include "shardguard/operator/reconcile.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/package.h"
#include "shardguard/operator/status.h"
#include "shardguard/common/time.h"

namespace shardguard::op {
namespace {

using nlohmann::json;

// ---- exposure arithmetic -------------------------------------------------------------

TEST(ExposureTest, HeldStagesPlusSandwichedOnes) {
  EXPECT_EQ(exposed_stages({0, 2}, 4), (std::set<int>{0, 1, 2}));
  EXPECT_EQ(exposed_stages({1, 3}, 4), (std::set<int>{1, 2, 3}));
  EXPECT_EQ(exposed_stages({0, 3}, 4), (std::set<int>{0, 3}));
  EXPECT_EQ(exposed_stages({}, 4), (std::set<int>{}));
  EXPECT_EQ(exposed_stages({7}, 4), (std::set<int>{}));  // out of range: ignored
}

TEST(ExposureTest, RatioIsParameterWeighted) {
  const std::vector<int64_t> p = {10, 20, 30, 40};
  EXPECT_DOUBLE_EQ(exposure_of(p, {0}), 0.1);
  EXPECT_DOUBLE_EQ(exposure_of(p, {3}), 0.4);
  EXPECT_DOUBLE_EQ(exposure_of(p, {0, 2}), 0.6);  // 0 and 2 held, 1 sandwiched
  EXPECT_DOUBLE_EQ(exposure_of(p, {0, 1, 2, 3}), 1.0);
  EXPECT_DOUBLE_EQ(exposure_of({}, {0}), 0.0);
}

TEST(ExposureTest, ReportHasMaxNodeAndMaxPrincipal) {
  const std::vector<int64_t> p = {10, 20, 30, 40};
  const auto r = compute_exposure(p, {{"a", {0}}, {"b", {1, 3}}, {"c", {2}}});
  ASSERT_EQ(r.nodes.size(), 3u);
  EXPECT_EQ(r.nodes[1].node, "b");
  EXPECT_EQ(r.nodes[1].exposed, (std::set<int>{1, 2, 3}));
  EXPECT_DOUBLE_EQ(r.max_node, 0.9);
  EXPECT_DOUBLE_EQ(r.max_principal, 0.4);
  const json j = exposure_to_json(r);
  EXPECT_EQ(j["maxNode"], 0.9);
  EXPECT_EQ(history_from_status({{"exposure", j}}), (PlacementHistory{{"a", {0}}, {"b", {1, 3}}, {"c", {2}}}));
}

TEST(ExposureTest, TrustedStagesAndNodesAreOutOfTheMaxima) {
  const std::vector<int64_t> p = {50, 10, 20, 20};
  // Node a held trusted stage 0 (so it is the owner's) and later stage 1; b held 1 and 3.
  const auto r = compute_exposure(p, {{"a", {0, 1}}, {"b", {1, 3}}, {"c", {2}}}, {}, {0, 2});
  ASSERT_EQ(r.nodes.size(), 3u);
  EXPECT_TRUE(r.nodes[0].trusted);
  EXPECT_DOUBLE_EQ(r.nodes[0].ratio, 0.6);  // all it holds: it is trusted
  EXPECT_FALSE(r.nodes[1].trusted);
  EXPECT_DOUBLE_EQ(r.nodes[1].ratio, 0.3);  // 1 and 3; the sandwiched 2 is trusted
  EXPECT_TRUE(r.nodes[2].trusted);
  EXPECT_DOUBLE_EQ(r.max_node, 0.3);
  EXPECT_DOUBLE_EQ(r.max_principal, 0.2);   // stage 3's identity; 0 and 2 are trusted
  EXPECT_EQ(exposure_to_json(r)["nodes"][0]["trusted"], true);
  EXPECT_FALSE(exposure_to_json(r)["nodes"][1].contains("trusted"));
  // A trusted node is never avoided; an untrusted one by its untrusted exposure: stage 3
  // on b makes {1, 3}, 0.3 with stage 2 trusted, 0.5 with 2 sandwiched.
  EXPECT_EQ(nodes_to_avoid(p, {{"a", {0}}, {"b", {1}}}, 3, 0.3, {0, 2}), (std::vector<std::string>{}));
  EXPECT_EQ(nodes_to_avoid(p, {{"a", {0}}, {"b", {1}}}, 3, 0.3, {0}), (std::vector<std::string>{"b"}));
  EXPECT_EQ(nodes_to_avoid(p, {{"a", {0}}, {"b", {1}}}, 1, 0.05, {0}), (std::vector<std::string>{"b"}));
}

TEST(ExposureTest, NodesToAvoidKeepEveryNodeWithinTheLimit) {
  const std::vector<int64_t> p = {25, 25, 25, 25};
  const PlacementHistory h = {{"a", {0}}, {"b", {1}}, {"c", {2}}, {"d", {3}}};
  // Shard 2 again on c: unchanged. On a: holds 0 and 2, sandwiches 1 → 0.75.
  EXPECT_EQ(nodes_to_avoid(p, h, 2, 0.25), (std::vector<std::string>{"a", "b", "d"}));
  EXPECT_EQ(nodes_to_avoid(p, h, 2, 0.5), (std::vector<std::string>{"a"}));
  EXPECT_EQ(nodes_to_avoid(p, h, 2, 0.75), (std::vector<std::string>{}));
}

TEST(ConditionTest, TransitionTimeMovesOnlyWhenTheStatusChanges) {
  json c = json::array();
  set_condition(c, "Ready", false, "ShardsNotReady", "0 of 4", 1, "2026-01-01T00:00:00Z");
  set_condition(c, "Ready", false, "ShardsNotReady", "2 of 4", 2, "2026-01-01T00:01:00Z");
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
  EXPECT_EQ(c[0]["message"], "2 of 4");
  EXPECT_EQ(c[0]["observedGeneration"], 2);
  set_condition(c, "Ready", true, "AllShardsReady", "4 of 4", 2, "2026-01-01T00:02:00Z");
  EXPECT_EQ(c[0]["lastTransitionTime"], "2026-01-01T00:02:00Z");
  EXPECT_TRUE(condition_true(c, "Ready"));
  EXPECT_FALSE(condition_true(c, "Running"));
}

// ---- plan(): a small simulated cluster ---------------------------------------------------

constexpr int64_t kT0 = 1795000000;

json job_yaml(const std::string& run_policy = "", double max_exposure = 0.5) {
  return yaml_to_json(R"(apiVersion: shardguard.io/v1alpha1
kind: ShardedTrainingJob
metadata: {name: fm, namespace: ml, uid: 11111111-2222-3333-4444-555555555555, generation: 1}
spec:
  model: {architecture: vit}
  sharding: {shards: 4}
  protection: {maxExposure: )" + std::to_string(max_exposure) + R"(}
  template: {image: shardd:1}
  sidecar: {image: sidecar:1}
)" + run_policy);
}

// Applies plans the way the API server would, and plays the kubelet.
struct Cluster {
  json job;
  std::map<std::string, json> objects;  // "Kind/name"
  int64_t now = kT0;
  int uid_counter = 0;
  int writes = 0;
  std::vector<EventNote> events;
  std::vector<std::optional<int64_t>> ledger_sequences;  // what the sidecars publish
  std::optional<Progress> progress;                     // what the last stage's shardd reports
  // A package job: what the controller read from the keys Secret (or why it could not).
  std::optional<model::PackageManifest> manifest;
  std::vector<std::string> package_keys;
  std::string package_error;

  explicit Cluster(json j) : job(std::move(j)) {}

  Observed observe() const {
    Observed ob;
    ob.job = job;
    ob.now = now;
    const JobSpec spec = job_from_json(job);
    auto get = [&](const std::string& kind, const std::string& name) -> std::optional<json> {
      auto it = objects.find(kind + "/" + name);
      if (it == objects.end()) return std::nullopt;
      return it->second;
    };
    ob.ca_secret = get("Secret", ca_secret_name(spec));
    ob.service = get("Service", service_name(spec));
    const int n = spec.sharding.shards, slots = n * replica_count(spec);
    for (int k = 0; k < slots; ++k) {  // as the controller: index = slot
      ob.shard_secrets.push_back(get("Secret", replica_name(spec, k % n, k / n)));
      ob.config_maps.push_back(get("ConfigMap", replica_name(spec, k % n, k / n)));
      ob.pods.push_back(get("Pod", replica_name(spec, k % n, k / n)));
    }
    ob.render_inputs.uid = job["metadata"]["uid"];
    ob.render_inputs.ca_cert_pem = "CA";
    ob.render_inputs.ca_key_pem = "CAKEY";
    for (int i = 0; i < slots; ++i) {
      ob.render_inputs.shards.push_back(
          {"C" + std::to_string(i), "K" + std::to_string(i), std::string(32, 'k'), std::string(32, 'l')});
    }
    ob.render_inputs.job_object = job;
    ob.ledger_sequences = ledger_sequences;
    ob.progress = progress;
    ob.render_inputs.package_manifest = manifest;
    ob.render_inputs.package_keys = package_keys;
    ob.package_error = package_error;
    return ob;
  }

  Observed observe_raw() const {
    Observed ob;
    ob.job = job;
    ob.now = now;
    return ob;
  }

  void apply(const Action& a) {
    ++writes;
    const std::string key = a.kind + "/" + a.name;
    if (a.kind == "ShardedTrainingJob") {
      if (a.verb == Action::Verb::kDelete) {
        job = json();
        return;
      }
      json status = job.value("status", json::object());
      job = a.object;
      job["status"] = status;
      if (job["metadata"].contains("deletionTimestamp") && job["metadata"]["finalizers"].empty()) job = json();
      return;
    }
    if (a.verb == Action::Verb::kDelete) {
      objects.erase(key);
    } else {
      json o = a.object;
      if (a.verb == Action::Verb::kCreate) o["metadata"]["uid"] = "uid-" + std::to_string(++uid_counter);
      objects[key] = o;
    }
  }

  Plan step() {
    Plan p = plan(observe());
    for (const auto& a : p.before_status) apply(a);
    if (p.status && !job.is_null()) {
      ++writes;
      job["status"] = *p.status;
    }
    for (const auto& a : p.after_status) apply(a);
    events.insert(events.end(), p.events.begin(), p.events.end());
    return p;
  }

  // Reconciles until nothing is left to write (bounded).
  int settle() {
    const int before = writes;
    for (int i = 0; i < 10; ++i) {
      Plan p = step();
      if (p.before_status.empty() && !p.status && p.after_status.empty()) return writes - before;
    }
    ADD_FAILURE() << "did not settle";
    return writes - before;
  }

  json& pod(int i) { return objects.at("Pod/fm-shard-" + std::to_string(i)); }
  // Replica r of stage i of a job with replicas.
  static std::string replica_pod(int i, int r) { return "Pod/fm-shard-" + std::to_string(i) + "-r" + std::to_string(r); }
  void kubelet_replica(int i, int r, const std::string& node, const std::string& phase) {
    json& p = objects.at(replica_pod(i, r));
    p["spec"]["nodeName"] = node;
    p["status"] = {{"phase", phase},
                   {"conditions", json::array({{{"type", "Ready"}, {"status", phase == "Running" ? "True" : "False"}}})}};
  }
  bool has_pod(int i) const { return objects.count("Pod/fm-shard-" + std::to_string(i)) > 0; }
  void kubelet(int i, const std::string& node, const std::string& phase, bool ready = true) {
    pod(i)["spec"]["nodeName"] = node;
    pod(i)["status"] = {{"phase", phase},
                        {"conditions", json::array({{{"type", "Ready"}, {"status", ready ? "True" : "False"}}})}};
  }
  bool has_event(const std::string& reason) const {
    for (const auto& e : events) {
      if (e.reason == reason) return true;
    }
    return false;
  }
};

TEST(PlanTest, NewJobGetsFinalizerObjectsAndPendingStatus) {
  Cluster c(job_yaml());
  Plan p = c.step();
  ASSERT_FALSE(p.before_status.empty());
  EXPECT_EQ(p.before_status[0].kind, "ShardedTrainingJob");  // the finalizer first
  EXPECT_EQ(c.job["metadata"]["finalizers"][0], kFinalizer);
  // CA + 4 Secrets + 4 ConfigMaps + Service + 4 Pods.
  EXPECT_EQ(c.objects.size(), 14u);
  ASSERT_TRUE(p.status);
  EXPECT_EQ(c.job["status"]["phase"], "Pending");
  EXPECT_EQ(c.job["status"]["observedGeneration"], 1);
  EXPECT_EQ(c.job["status"]["shards"].size(), 4u);
  EXPECT_TRUE(c.has_event("Created"));
  // 14 objects + finalizer + status, and then nothing more to write.
  EXPECT_EQ(c.writes, 16);
  EXPECT_EQ(c.settle(), 0);
}

TEST(PlanTest, RunningJobReportsExposureAndSettlesWithNoWrites) {
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  const json& st = c.job["status"];
  EXPECT_EQ(st["phase"], "Running");
  EXPECT_TRUE(condition_true(st["conditions"], "Ready"));
  EXPECT_TRUE(condition_true(st["conditions"], "Running"));
  EXPECT_TRUE(condition_true(st["conditions"], "ShardIsolation"));
  EXPECT_EQ(st["exposure"]["nodes"].size(), 4u);
  EXPECT_LE(st["exposure"]["maxNode"].get<double>(), 0.5);
  EXPECT_GT(st["exposure"]["maxNode"].get<double>(), 0.0);
  EXPECT_EQ(st["shards"][2]["node"], "node-2");
  EXPECT_TRUE(c.has_event("Running"));
  // A resync of a settled job writes nothing.
  Plan again = plan(c.observe());
  EXPECT_TRUE(again.before_status.empty());
  EXPECT_FALSE(again.status);
  EXPECT_TRUE(again.after_status.empty());
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Succeeded");
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Succeeded");
  EXPECT_TRUE(condition_true(c.job["status"]["conditions"], "Succeeded"));
  EXPECT_TRUE(c.job["status"].contains("completionTime"));
}

TEST(PlanTest, ProgressCarriesTheEvalLossAndTheSucceededEventSummarisesTheEvaluation) {
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.progress = Progress{120, 1, 0.51234, 0.8125, std::nullopt};  // no evaluation loss yet
  c.settle();
  EXPECT_EQ(c.job["status"]["progress"]["accuracy"], 0.8125);
  EXPECT_FALSE(c.job["status"]["progress"].contains("evalLoss"));
  c.progress->eval_loss = 2.3456789;
  c.settle();
  EXPECT_EQ(c.job["status"]["progress"]["evalLoss"], 2.3457);  // rounded to 4 decimals
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Succeeded");
  c.settle();
  std::string message;
  for (const auto& e : c.events) {
    if (e.reason == "Succeeded") message = e.message;
  }
  EXPECT_EQ(message, "every shard finished training; test accuracy 0.8125; eval loss 2.3457");
}

TEST(PlanTest, FailedPodIsCountedOnceAndRecreatedAwayFromUnsafeNodes) {
  // Equal-ish stages, maxExposure 0.5: a node that held shard 0 must not get shard 2.
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  c.kubelet(2, "node-2", "Failed");
  c.pod(2)["status"]["reason"] = "Error";
  Plan p = plan(c.observe());
  ASSERT_TRUE(p.status);
  EXPECT_EQ((*p.status)["shards"][2]["restarts"], 1);
  EXPECT_EQ((*p.status)["failedPods"], 1);
  ASSERT_EQ(p.after_status.size(), 1u);  // the failed pod goes after status recorded it
  EXPECT_EQ(p.after_status[0].verb, Action::Verb::kDelete);
  // The same observation again (status not yet written, cache stale) plans the same:
  // it is counted by pod uid, so a retry does not double count.
  c.step();
  EXPECT_FALSE(c.has_pod(2));
  c.step();  // recreate
  ASSERT_TRUE(c.has_pod(2));
  EXPECT_EQ(c.job["status"]["shards"][2]["restarts"], 1);
  EXPECT_TRUE(c.has_event("ShardPodFailed"));
  EXPECT_TRUE(c.has_event("ShardPodRecreated"));
  const json& aff = c.pod(2)["spec"]["affinity"];
  ASSERT_TRUE(aff.contains("nodeAffinity")) << aff.dump();
  const json avoid = aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                        ["matchFields"][0]["values"];
  const std::vector<int64_t> params = stage_parameters(job_from_json(c.job));
  const PlacementHistory h = history_from_status(c.job["status"]);
  EXPECT_EQ(avoid.get<std::vector<std::string>>(), nodes_to_avoid(params, h, 2, 0.5));
  // node-0 held shard 0: adding shard 2 sandwiches shard 1 — more than half the ViT.
  EXPECT_NE(std::find(avoid.begin(), avoid.end(), "node-0"), avoid.end());
  // The recreated pod lands on a fresh node: exposure stays within bounds.
  c.kubelet(2, "node-9", "Running");
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Running");
  EXPECT_TRUE(condition_true(c.job["status"]["conditions"], "ShardIsolation"));
  EXPECT_EQ(c.job["status"]["exposure"]["nodes"].size(), 5u);  // node-2 keeps shard 2 in its history
}

std::vector<std::string> sidecar_flag(const json& pod, const std::string& flag) {
  std::vector<std::string> out;
  for (const auto& c : pod["spec"]["containers"]) {
    if (c["name"] != "sidecar") continue;
    const auto args = c["args"].get<std::vector<std::string>>();
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == flag) out.push_back(args[i + 1]);
    }
  }
  return out;
}

// Issue 16 item 2: the ledger sequence a sidecar publishes is kept in status, only
// ever raised, and given to the sidecar of every pod created for that shard later,
// which then refuses exports from an older copy of its ledger, or from none.
TEST(PlanTest, LedgerSequenceIsRecordedNeverLoweredAndGivenToRecreatedPods) {
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(sidecar_flag(c.pod(i), "--ledger-min-sequence").empty());
    c.kubelet(i, "node-" + std::to_string(i), "Running");
  }
  c.settle();
  c.ledger_sequences = {std::nullopt, 5, std::nullopt, 0};
  c.settle();
  const json& st = c.job["status"];
  EXPECT_EQ(st["shards"][1]["ledgerSequence"], 5);
  EXPECT_FALSE(st["shards"][0].contains("ledgerSequence")) << st["shards"][0].dump();
  EXPECT_FALSE(st["shards"][3].contains("ledgerSequence")) << st["shards"][3].dump();
  // A sidecar that loaded an older copy publishes a lower sequence: not recorded.
  c.ledger_sequences = {std::nullopt, 3};
  EXPECT_FALSE(plan(c.observe()).status);
  c.ledger_sequences = {std::nullopt, 9};
  c.settle();
  EXPECT_EQ(c.job["status"]["shards"][1]["ledgerSequence"], 9);
  c.ledger_sequences.clear();  // unreadable (the pod is going): the record stays
  // Shard 1's pod fails; its replacement's sidecar must accept no ledger older than 9.
  c.kubelet(1, "node-1", "Failed");
  c.step();
  EXPECT_FALSE(c.has_pod(1));
  c.step();
  ASSERT_TRUE(c.has_pod(1));
  EXPECT_EQ(sidecar_flag(c.pod(1), "--ledger-min-sequence"), std::vector<std::string>{"9"});
  EXPECT_EQ(c.job["status"]["shards"][1]["ledgerSequence"], 9);
  // The other shards' pods are not touched.
  for (int i : {0, 2, 3}) EXPECT_TRUE(sidecar_flag(c.pod(i), "--ledger-min-sequence").empty()) << i;
  // Suspend and resume: every pod is recreated with what its shard recorded.
  c.ledger_sequences = {2, 9, std::nullopt, std::nullopt};
  c.kubelet(1, "node-5", "Running");
  c.settle();
  c.job["spec"]["runPolicy"]["suspend"] = true;
  c.settle();
  c.job["spec"]["runPolicy"]["suspend"] = false;
  c.ledger_sequences.clear();
  c.settle();
  EXPECT_EQ(sidecar_flag(c.pod(0), "--ledger-min-sequence"), std::vector<std::string>{"2"});
  EXPECT_EQ(sidecar_flag(c.pod(1), "--ledger-min-sequence"), std::vector<std::string>{"9"});
  EXPECT_TRUE(sidecar_flag(c.pod(2), "--ledger-min-sequence").empty());
}

TEST(PlanTest, ConfigMapCachedAsADigestIsUpdatedOnlyWhenItsDataChanged) {
  Cluster c(job_yaml());
  c.settle();
  json& cm = c.objects.at("ConfigMap/fm-shard-1");
  cm[kCachedDataDigest] = data_digest(cm["data"]);
  const json data = cm["data"];
  cm.erase("data");
  EXPECT_EQ(c.settle(), 0);  // same digest: nothing to write
  c.objects.at("ConfigMap/fm-shard-1")[kCachedDataDigest] = data_digest({{"policy.json", "{}"}});
  Plan p = plan(c.observe());
  ASSERT_EQ(p.before_status.size(), 1u);
  EXPECT_EQ(p.before_status[0].verb, Action::Verb::kUpdate);
  EXPECT_EQ(p.before_status[0].object["data"], data);  // the desired data, not the digest
  EXPECT_FALSE(p.before_status[0].object.contains(kCachedDataDigest));
}

TEST(PlanTest, PodGoneWhileRunningCountsAsAFailure) {
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  c.objects.erase("Pod/fm-shard-1");  // evicted: gone without a Failed phase
  c.settle();
  EXPECT_TRUE(c.has_pod(1));
  EXPECT_EQ(c.job["status"]["shards"][1]["restarts"], 1);
  EXPECT_EQ(c.job["status"]["failedPods"], 1);
  EXPECT_TRUE(c.has_event("ShardPodFailed"));
  // Suspending deletes every pod on purpose: no failures counted for that.
  c.kubelet(1, "node-5", "Running");
  c.settle();
  c.job["spec"]["runPolicy"]["suspend"] = true;
  c.settle();
  c.job["spec"]["runPolicy"]["suspend"] = false;
  c.settle();
  EXPECT_EQ(c.job["status"]["failedPods"], 1);
}

TEST(PlanTest, UnscheduledPodIsReplacedWhenItsKeepOffListIsOutOfDate) {
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  c.kubelet(2, "node-2", "Failed");
  c.settle();  // shard 2 recreated, waiting for a node
  ASSERT_TRUE(c.has_pod(2));
  EXPECT_EQ(c.pod(2)["metadata"]["annotations"][kAnnotationAvoidNodes], "node-0,node-1,node-3");
  // (Nodes 1 and 3 hold a third of the model each: another third is too much.)
  // Meanwhile shard 0 fails and its new pod runs on node-9. While it runs there, the
  // anti-affinity keeps shard 2 off node-9: nothing to replace yet.
  c.kubelet(0, "node-0", "Failed");
  c.settle();
  c.kubelet(0, "node-9", "Running");
  const std::string before = c.pod(2)["metadata"]["uid"];
  c.settle();
  EXPECT_EQ(c.pod(2)["metadata"]["uid"], before);
  // Once shard 0 has left node-9, shard 2 there would sandwich stage 1: the waiting
  // pod's keep-off list is out of date and it is replaced.
  c.kubelet(0, "node-9", "Failed");
  c.settle();
  ASSERT_TRUE(c.has_pod(2));
  EXPECT_NE(c.pod(2)["metadata"]["uid"], before);
  EXPECT_EQ(c.pod(2)["metadata"]["annotations"][kAnnotationAvoidNodes], "node-0,node-1,node-3,node-9");
  EXPECT_TRUE(c.has_event("ShardPodReplaced"));
  EXPECT_EQ(c.job["status"]["failedPods"], 3);  // the replacement is not a failure
}

TEST(PlanTest, BackoffLimitExhaustedFailsTheJob) {
  Cluster c(job_yaml("  runPolicy: {backoffLimit: 1}\n"));
  c.settle();
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
    c.kubelet(1, "node-1", "Failed");
    c.settle();
  }
  EXPECT_EQ(c.job["status"]["phase"], "Failed");
  EXPECT_TRUE(condition_true(c.job["status"]["conditions"], "Failed"));
  EXPECT_TRUE(c.has_event("BackoffLimitExceeded"));
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(c.has_pod(i)) << i;  // every pod deleted, none recreated
  EXPECT_EQ(c.settle(), 0);
}

TEST(PlanTest, SuspendDeletesPodsKeepsPkiAndResumeRecreates) {
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  const json ca = c.objects.at("Secret/fm-ca");
  c.job["spec"]["runPolicy"]["suspend"] = true;
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Suspended");
  EXPECT_TRUE(condition_true(c.job["status"]["conditions"], "Suspended"));
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(c.has_pod(i));
  EXPECT_EQ(c.objects.at("Secret/fm-ca"), ca);
  EXPECT_EQ(c.objects.count("Secret/fm-shard-3"), 1u);
  c.job["spec"]["runPolicy"]["suspend"] = false;
  c.settle();
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(c.has_pod(i));
  EXPECT_TRUE(c.has_event("Suspended"));
  EXPECT_TRUE(c.has_event("Resumed"));
  EXPECT_FALSE(condition_true(c.job["status"]["conditions"], "Suspended"));
}

TEST(PlanTest, ActiveDeadlineFailsTheJobAndRequeuesBeforeIt) {
  Cluster c(job_yaml("  runPolicy: {activeDeadlineSeconds: 60}\n"));
  Plan p = c.step();
  ASSERT_TRUE(p.requeue_after);
  EXPECT_EQ(p.requeue_after->count(), 60);
  c.settle();
  c.now += 61;
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Failed");
  EXPECT_TRUE(c.has_event("DeadlineExceeded"));
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(c.has_pod(i));
}

TEST(PlanTest, TtlAfterFinishedDeletesTheJob) {
  Cluster c(job_yaml("  runPolicy: {ttlSecondsAfterFinished: 30}\n"));
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Succeeded");
  Plan p = c.step();
  ASSERT_TRUE(p.requeue_after);
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Succeeded");
  c.now += 31;
  Plan last = c.step();
  ASSERT_EQ(last.after_status.size(), 1u);
  EXPECT_EQ(last.after_status[0].kind, "ShardedTrainingJob");
  EXPECT_TRUE(c.job.is_null());
}

TEST(PlanTest, LargestStageAboveMaxExposureIsRefusedWithACondition) {
  Cluster c(job_yaml("", 0.1));
  c.settle();
  const json& st = c.job["status"];
  EXPECT_EQ(st["phase"], "Failed");
  EXPECT_FALSE(condition_true(st["conditions"], "ShardIsolation"));
  bool found = false;
  for (const auto& cond : st["conditions"]) {
    if (cond["type"] == "ShardIsolation") {
      EXPECT_EQ(cond["reason"], "ExposureRefused");
      EXPECT_NE(cond["message"].get<std::string>().find("maxExposure"), std::string::npos);
      found = true;
    }
  }
  EXPECT_TRUE(found);
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(c.has_pod(i));
  EXPECT_TRUE(c.has_event("ExposureRefused"));
}

// Data-parallel replicas (issue 20 item 3): a pod per replica, status per replica, and a
// failed replica restarts every replica of the job together (replicas move together).
// Replicas fail together (the others of a failed one fail in their next all-reduce):
// a reconcile that finds three replica pods Failed at once counts one failure.
TEST(PlanTest, ReplicasFoundFailedTogetherCountOneFailure) {
  json j = job_yaml();
  j["spec"]["sharding"]["replicas"] = 2;
  Cluster c(j);
  c.settle();
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) c.kubelet_replica(i, r, "node-" + std::to_string(i), "Running");
  }
  c.settle();
  c.kubelet_replica(1, 0, "node-1", "Failed");
  c.kubelet_replica(1, 1, "node-1", "Failed");
  c.kubelet_replica(2, 1, "node-2", "Failed");
  Plan p = plan(c.observe());
  ASSERT_TRUE(p.status);
  EXPECT_EQ((*p.status)["failedPods"], 1);
  int restarts = 0, failed_events = 0;
  for (const auto& s : (*p.status)["shards"]) restarts += s.value("restarts", 0);
  for (const auto& e : p.events) failed_events += e.reason == "ShardPodFailed";
  EXPECT_EQ(restarts, 1);
  EXPECT_EQ(failed_events, 1);
  // Applied, the next reconcile counts none of them again.
  for (const auto& a : p.before_status) c.apply(a);
  c.job["status"] = *p.status;
  for (const auto& a : p.after_status) c.apply(a);
  p = c.step();
  EXPECT_EQ(c.job["status"]["failedPods"], 1);
}

TEST(PlanTest, ReplicasGetTheirOwnPodsStatusAndRestartTogether) {
  json j = job_yaml();
  j["spec"]["sharding"]["replicas"] = 2;
  Cluster c(j);
  c.settle();
  // CA + 8 Secrets + 8 ConfigMaps + Service + 8 Pods.
  EXPECT_EQ(c.objects.size(), 26u);
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) EXPECT_TRUE(c.objects.count(Cluster::replica_pod(i, r))) << i << " " << r;
  }
  EXPECT_FALSE(c.has_pod(0));  // no fm-shard-0 without a replica suffix
  // Both replicas of stage i on node-i: one stage per node.
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) c.kubelet_replica(i, r, "node-" + std::to_string(i), "Running");
  }
  c.settle();
  const json st = c.job["status"];
  EXPECT_EQ(st["phase"], "Running");
  EXPECT_TRUE(condition_true(st["conditions"], "Ready"));
  for (const auto& cond : st["conditions"]) {
    if (cond["type"] == "Ready") {
      EXPECT_EQ(cond["message"], "8 of 8 shard pods ready");
    }
  }
  ASSERT_EQ(st["shards"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    const json& s = st["shards"][i];
    EXPECT_EQ(s["index"], i);
    EXPECT_EQ(s["phase"], "Running");
    ASSERT_EQ(s["replicas"].size(), 2u) << s.dump();
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(s["replicas"][r]["replica"], r);
      EXPECT_EQ(s["replicas"][r]["pod"], "fm-shard-" + std::to_string(i) + "-r" + std::to_string(r));
      EXPECT_EQ(s["replicas"][r]["node"], "node-" + std::to_string(i));
      EXPECT_EQ(s["replicas"][r]["phase"], "Running");
    }
  }
  // Exposure is per stage: a node with both replicas of one stage holds one stage.
  EXPECT_EQ(st["exposure"]["nodes"].size(), 4u);
  EXPECT_LE(st["exposure"]["maxNode"].get<double>(), 0.5);
  EXPECT_EQ(plan(c.observe()).status, std::nullopt);  // settled: nothing to write

  // Replica 1 of stage 2 fails: counted once, for it alone; every other pod of the job
  // is stopped with it (status first), and nothing starts while one is still going.
  c.kubelet_replica(2, 1, "node-2", "Failed");
  Plan p = plan(c.observe());
  ASSERT_TRUE(p.status);
  EXPECT_EQ((*p.status)["failedPods"], 1);
  EXPECT_EQ((*p.status)["shards"][2]["replicas"][1]["restarts"], 1);
  EXPECT_EQ((*p.status)["shards"][2]["replicas"][0]["restarts"], 0);
  EXPECT_EQ((*p.status)["shards"][2]["restarts"], 1);
  EXPECT_EQ((*p.status)["shards"][2]["phase"], "Failed");
  EXPECT_EQ(p.after_status.size(), 8u);
  for (const auto& a : p.after_status) EXPECT_EQ(a.verb, Action::Verb::kDelete) << a.name;
  for (const auto& a : p.before_status) EXPECT_NE(a.kind, "Pod") << a.name;
  bool restarted = false;
  for (const auto& e : p.events) restarted = restarted || e.reason == "ReplicasRestarted";
  EXPECT_TRUE(restarted);
  // Apply it, but one pod (stage 0 replica 0) is still terminating.
  for (const auto& a : p.before_status) c.apply(a);
  c.job["status"] = *p.status;
  for (const auto& a : p.after_status) {
    if (a.name == "fm-shard-0-r0") {
      c.objects.at("Pod/fm-shard-0-r0")["metadata"]["deletionTimestamp"] = "2026-11-18T00:00:00Z";
    } else {
      c.apply(a);
    }
  }
  p = c.step();
  for (const auto& a : p.before_status) EXPECT_NE(a.kind, "Pod") << "created " << a.name << " while a pod stops";
  for (const auto& a : p.after_status) EXPECT_NE(a.kind, "Pod") << "deleted " << a.name << " again";
  EXPECT_EQ(c.job["status"]["shards"][0]["replicas"][0]["phase"], "Pending");
  // It is gone: all 8 start together; only the failed replica counts a restart.
  c.objects.erase("Pod/fm-shard-0-r0");
  c.step();
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) EXPECT_TRUE(c.objects.count(Cluster::replica_pod(i, r))) << i << " " << r;
  }
  c.settle();
  EXPECT_EQ(c.job["status"]["failedPods"], 1);
  int restarts = 0;
  for (const auto& s : c.job["status"]["shards"]) {
    for (const auto& e : s["replicas"]) restarts += e["restarts"].get<int>();
  }
  EXPECT_EQ(restarts, 1);
  // Stage 2's new replicas keep off node-0 (stage 0 there: stage 2 would sandwich 1).
  const json& aff = c.objects.at(Cluster::replica_pod(2, 1))["spec"]["affinity"];
  ASSERT_TRUE(aff.contains("nodeAffinity")) << aff.dump();
  const json avoid = aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                        ["matchFields"][0]["values"];
  EXPECT_NE(std::find(avoid.begin(), avoid.end(), "node-0"), avoid.end()) << avoid.dump();
}

// A replica fails after the other replica's pipeline finished (its pods Succeeded, one
// even gone) and while a pod's node is unknown: the group restart stops and recreates
// every replica — a finished replica left out would leave the restarted group waiting
// for it until the backoff limit.
TEST(PlanTest, AGroupRestartAlsoRestartsFinishedAndUnknownReplicas) {
  json j = job_yaml();
  j["spec"]["sharding"]["replicas"] = 2;
  j["spec"]["runPolicy"]["backoffLimit"] = 3;
  Cluster c(j);
  c.settle();
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) c.kubelet_replica(i, r, "node-" + std::to_string(i), "Running");
  }
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet_replica(i, 0, "node-" + std::to_string(i), "Succeeded");
  c.settle();
  c.objects.erase(Cluster::replica_pod(3, 0));  // finished, and its pod already gone
  c.kubelet_replica(1, 1, "node-1", "Unknown");
  c.kubelet_replica(2, 1, "node-2", "Failed");
  Plan p = plan(c.observe());
  ASSERT_TRUE(p.status);
  EXPECT_EQ((*p.status)["failedPods"], 1);
  std::set<std::string> deleted;
  for (const auto& a : p.after_status) {
    EXPECT_EQ(a.verb, Action::Verb::kDelete) << a.name;
    deleted.insert(a.name);
  }
  // 7 pods exist: 3 finished replica-0 pods, the unknown, the failed, and 2 running.
  EXPECT_EQ(deleted.size(), 7u);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(deleted.count(Cluster::replica_pod(i, 0).substr(4))) << i;
  EXPECT_TRUE(deleted.count("fm-shard-1-r1"));
  EXPECT_NE((*p.status)["phase"], "Succeeded");
  for (const auto& s : (*p.status)["shards"]) {
    for (const auto& e : s["replicas"]) EXPECT_NE(e["phase"], "Succeeded") << e.dump();
  }
  for (const auto& a : p.before_status) c.apply(a);
  c.job["status"] = *p.status;
  for (const auto& a : p.after_status) c.apply(a);
  c.step();
  // All 8 are created again, together; the one failure is all that was counted.
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) EXPECT_TRUE(c.objects.count(Cluster::replica_pod(i, r))) << i << " " << r;
  }
  c.settle();
  EXPECT_EQ(c.job["status"]["failedPods"], 1);
  EXPECT_NE(c.job["status"]["phase"], "Failed");
}

// A job without replicas keeps its single-pod recovery: a failed shard is recreated
// alone (FailedPodIsCountedOnceAndRecreatedAwayFromUnsafeNodes), nothing else stops.
TEST(PlanTest, WithoutReplicasAFailedShardStopsNoOtherPod) {
  Cluster c(job_yaml());
  c.settle();
  for (int i = 0; i < 4; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  c.kubelet(1, "node-1", "Failed");
  const Plan p = plan(c.observe());
  ASSERT_EQ(p.after_status.size(), 1u);
  EXPECT_EQ(p.after_status[0].name, "fm-shard-1");
  EXPECT_FALSE((*p.status)["shards"][1].contains("replicas"));
}

// vit in 4 stages (about 0.02, 0.33, 0.33, 0.33) at maxExposure 0.5.
TEST(PlanTest, ExportPrincipalsAreInTheExposureStatus) {
  json j = job_yaml();
  j["spec"]["protection"]["export"] = {
      {"allowed", true},
      {"principals", {"spiffe://shardguard.local/ns/ml/sa/a", "spiffe://shardguard.local/ns/ml/sa/b",
                      "spiffe://shardguard.local/ns/ml/sa/c"}}};
  Cluster c(j);
  c.settle();
  const json& ex = c.job["status"]["exposure"];
  ASSERT_EQ(ex["exportPrincipals"].size(), 3u) << ex.dump();
  EXPECT_EQ(ex["exportPrincipals"][0]["principal"], "spiffe://shardguard.local/ns/ml/sa/a");
  EXPECT_EQ(ex["exportPrincipals"][0]["shards"], json::array({0, 1}));
  EXPECT_EQ(ex["exportPrincipals"][1]["shards"], json::array({2}));
  EXPECT_EQ(ex["exportPrincipals"][2]["shards"], json::array({3}));
  double largest = 0;
  for (const auto& e : ex["exportPrincipals"]) {
    EXPECT_LE(e["ratio"].get<double>(), 0.5);
    largest = std::max(largest, e["ratio"].get<double>());
  }
  // maxPrincipal counts the export principals: 0-1 hold more than any one stage.
  EXPECT_EQ(ex["maxPrincipal"], largest);
  EXPECT_NE(c.job["status"]["phase"], "Failed");

  // Two principals cannot cover the three runs: refused, as a stage above the limit is.
  j["spec"]["protection"]["export"]["principals"].erase(2);
  Cluster refused(j);
  refused.settle();
  EXPECT_EQ(refused.job["status"]["phase"], "Failed");
  bool found = false;
  for (const auto& cond : refused.job["status"]["conditions"]) {
    if (cond["type"] == "ShardIsolation") {
      EXPECT_EQ(cond["reason"], "ExposureRefused");
      EXPECT_NE(cond["message"].get<std::string>().find("spec.protection.export.principals: 2 principals"),
                std::string::npos)
          << cond["message"];
      found = true;
    }
  }
  EXPECT_TRUE(found);
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(refused.has_pod(i));
  EXPECT_TRUE(refused.has_event("ExposureRefused"));
}

// Issue 19 item 3: the trusted stage 0 goes to the owner's nodes only; when the
// scheduler finds none, the job is refused with the reason and the scheduler's words.
TEST(PlanTest, TrustedStageThatNoNodeCanTakeRefusesTheJob) {
  json j = job_yaml();
  j["spec"]["protection"]["trustedStages"] = {0};
  j["spec"]["protection"]["trustedNodeSelector"] = {{"owner", "data-team"}};
  Cluster c(j);
  c.settle();
  ASSERT_TRUE(c.has_pod(0));
  EXPECT_EQ(c.pod(0)["spec"]["nodeSelector"]["owner"], "data-team");
  EXPECT_EQ(c.pod(1)["spec"].value("nodeSelector", json::object()).count("owner"), 0u);
  // An untrusted stage that waits for a node is not a refusal.
  c.pod(1)["status"] = {{"phase", "Pending"},
                        {"conditions", json::array({{{"type", "PodScheduled"}, {"status", "False"},
                                                     {"reason", "Unschedulable"}, {"message", "0/3 nodes"}}})}};
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Pending");
  c.pod(0)["status"] = {
      {"phase", "Pending"},
      {"conditions", json::array({{{"type", "PodScheduled"}, {"status", "False"}, {"reason", "Unschedulable"},
                                   {"message", "0/3 nodes are available: 3 node(s) didn't match Pod's node "
                                               "affinity/selector."}}})}};
  c.settle();
  const json& st = c.job["status"];
  EXPECT_EQ(st["phase"], "Failed");
  bool found = false;
  for (const auto& cond : st["conditions"]) {
    if (cond["type"] == "Failed") {
      EXPECT_EQ(cond["reason"], "TrustedStageUnschedulable");
      EXPECT_EQ(cond["message"],
                "stage 0 is trusted and no node can take it: spec.protection.trustedNodeSelector selects "
                "owner=data-team; the scheduler: 0/3 nodes are available: 3 node(s) didn't match Pod's node "
                "affinity/selector.");
      found = true;
    }
  }
  EXPECT_TRUE(found) << st.dump(2);
  EXPECT_TRUE(c.has_event("TrustedStageUnschedulable"));
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(c.has_pod(i));
}

TEST(PlanTest, InvalidSpecFailsWithTheFieldAndValue) {
  json j = job_yaml();
  j["spec"]["sharding"]["shards"] = 0;
  Cluster c(j);
  Plan p = plan(c.observe_raw());
  ASSERT_TRUE(p.status);
  EXPECT_EQ((*p.status)["phase"], "Failed");
  const std::string msg = (*p.status)["conditions"][0]["message"];
  EXPECT_NE(msg.find("spec.sharding.shards"), std::string::npos) << msg;
}

TEST(PlanTest, DeletionRemovesOwnedObjectsThenTheFinalizer) {
  Cluster c(job_yaml());
  c.settle();
  c.job["metadata"]["deletionTimestamp"] = format_rfc3339(c.now);
  Plan p = c.step();
  EXPECT_FALSE(p.status);  // no status writes while going
  EXPECT_TRUE(c.objects.empty());
  c.step();
  EXPECT_TRUE(c.job.is_null());  // finalizer removed → gone
  EXPECT_TRUE(c.has_event("CleanedUp"));
}


// ---- a package job: the manifest and keys come from spec.model.package.keysSecret -------

json package_job_yaml() {
  return yaml_to_json(R"(apiVersion: shardguard.io/v1alpha1
kind: ShardedTrainingJob
metadata: {name: fm, namespace: ml, uid: 11111111-2222-3333-4444-555555555555, generation: 1}
spec:
  model:
    architecture: torchscript
    context: 16
    package: {path: /packages/fm, keysSecret: fm-package-keys}
  dataset: {format: tokens, path: /data/text}
  sharding: {shards: 3}
  protection: {maxExposure: 0.5}
  template: {image: shardd:1}
  sidecar: {image: sidecar:1}
)");
}

// 3 blocks of 100 parameters, one per shard.
model::PackageManifest three_shard_manifest() {
  model::PackageManifest m;
  m.split_id = "feedfacefeedfacefeedfacefeedface";
  for (int i = 0; i < 3; ++i) {
    model::PackageBlock b;
    b.index = i;
    b.source = "blocks." + std::to_string(i);
    b.in_shape = b.out_shape = {16, 8};
    b.parameters = 100;
    m.blocks.push_back(b);
    model::PackageShard s;
    s.index = i;
    s.first_block = i;
    s.end_block = i + 1;
    s.parameters = 100;
    s.share = 1.0 / 3;
    s.file = model::package_file_name(i);
    m.shards.push_back(s);
  }
  return m;
}

std::string pkg_key(int i) { return std::string(32, static_cast<char>('P' + i)); }

TEST(PlanPackageTest, WaitsForTheKeysSecretThenGivesEachShardOnlyItsKey) {
  Cluster c(package_job_yaml());
  c.package_error = "spec.model.package.keysSecret ml/fm-package-keys: not found";
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Pending");
  EXPECT_FALSE(c.has_pod(0));
  bool waiting = false;
  for (const auto& cond : c.job["status"]["conditions"]) {
    if (cond["type"] == "Ready") {
      waiting = cond["reason"] == "PackageUnavailable" &&
                cond["message"].get<std::string>().find("fm-package-keys: not found") != std::string::npos;
    }
  }
  EXPECT_TRUE(waiting) << c.job["status"].dump();
  EXPECT_TRUE(c.has_event("PackageUnavailable"));
  const size_t events = c.events.size();
  c.settle();  // the same reason again: no new Event
  EXPECT_EQ(c.events.size(), events);

  c.package_error.clear();
  c.manifest = three_shard_manifest();
  c.package_keys = {pkg_key(0), pkg_key(1), pkg_key(2)};
  c.settle();
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(c.has_pod(i));
    const json& secret = c.objects.at("Secret/fm-shard-" + std::to_string(i));
    EXPECT_EQ(secret["data"][kPackageKeyItem], base64_encode(pkg_key(i)));
    for (int k = 0; k < 3; ++k) {
      if (k == i) continue;
      EXPECT_EQ(secret.dump().find(base64_encode(pkg_key(k))), std::string::npos) << i << " has " << k;
      EXPECT_EQ(c.pod(i).dump().find(base64_encode(pkg_key(k))), std::string::npos) << i << " has " << k;
    }
  }
  // The exposure is the manifest's: a third each.
  EXPECT_EQ(c.job["status"]["shards"][1]["parameters"], 100);
}

TEST(PlanPackageTest, RefusedPackageFailsTheJobAtOnceNamingTheShard) {
  Cluster c(package_job_yaml());
  c.manifest = three_shard_manifest();
  c.package_keys = {pkg_key(0), pkg_key(1), pkg_key(2)};
  c.settle();
  for (int i = 0; i < 3; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  ASSERT_EQ(c.job["status"]["phase"], "Running");
  c.kubelet(1, "node-1", "Failed", false);
  c.pod(1)["status"]["containerStatuses"] = json::array(
      {{{"name", "sidecar"}, {"state", {{"running", json::object()}}}},
       {{"name", "shardd"},
        {"state",
         {{"terminated",
           {{"exitCode", model::kExitPackageRefused},
            {"reason", "Error"},
            {"message", "{\"level\":\"error\",\"msg\":\"package refused\"}\nshardd: package refused: "
                        "/packages/fm/shard-1.sgpkg: refused: authentication failed (a wrong key)\n"}}}}}}});
  c.settle();
  const json& st = c.job["status"];
  EXPECT_EQ(st["phase"], "Failed");
  std::string message;
  for (const auto& cond : st["conditions"]) {
    if (cond["type"] == "Failed" && cond["status"] == "True") {
      EXPECT_EQ(cond["reason"], "PackageRefused");
      message = cond["message"];
    }
  }
  EXPECT_NE(message.find("shard 1 (pod fm-shard-1 on node-1) refused its package: /packages/fm/shard-1.sgpkg: "
                         "refused: authentication failed (a wrong key)"),
            std::string::npos)
      << message;
  EXPECT_TRUE(c.has_event("PackageRefused"));
  EXPECT_FALSE(c.has_event("ShardPodRecreated"));
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(c.has_pod(i)) << "pod " << i << " left running";
}

TEST(PlanPackageTest, OtherFailuresOfAPackageJobAreRetried) {
  Cluster c(package_job_yaml());
  c.manifest = three_shard_manifest();
  c.package_keys = {pkg_key(0), pkg_key(1), pkg_key(2)};
  c.settle();
  for (int i = 0; i < 3; ++i) c.kubelet(i, "node-" + std::to_string(i), "Running");
  c.settle();
  c.kubelet(2, "node-2", "Failed", false);
  c.pod(2)["status"]["containerStatuses"] = json::array(
      {{{"name", "shardd"}, {"state", {{"terminated", {{"exitCode", 1}, {"reason", "Error"}}}}}}});
  c.settle();
  EXPECT_NE(c.job["status"]["phase"], "Failed");
  EXPECT_TRUE(c.has_pod(2));
  EXPECT_FALSE(c.has_event("PackageRefused"));
}

TEST(PlanPackageTest, ManifestOfAnotherShardCountIsAnInvalidSpec) {
  Cluster c(package_job_yaml());
  auto m = three_shard_manifest();
  m.shards.pop_back();
  c.manifest = m;
  c.package_keys = {pkg_key(0), pkg_key(1), pkg_key(2)};
  c.settle();
  EXPECT_EQ(c.job["status"]["phase"], "Failed");
  bool named = false;
  for (const auto& cond : c.job["status"]["conditions"]) {
    if (cond["type"] == "Failed") {
      named = cond["message"].get<std::string>().find("spec.sharding.shards: 3, but the packages") != std::string::npos;
    }
  }
  EXPECT_TRUE(named) << c.job["status"].dump();
}

}  // namespace
}  // namespace shardguard::op
