// render(job, inputs): the objects the operator would create (issue 4 item 3).
#include "shardguard/operator/reconcile.h"
#include "shardguard/operator/render.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <set>
#include <string>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/package.h"
#include "shardguard/model/partition.h"
#include "shardguard/common/pki.h"
#include "shardguard/policy/policy.h"

namespace shardguard::op {
namespace {

using nlohmann::json;

json job_object(const std::string& extra_yaml_spec = "") {
  std::string yaml = R"(apiVersion: shardguard.io/v1alpha1
kind: ShardedTrainingJob
metadata: {name: fmnist, namespace: ml}
spec:
  model: {architecture: cnn, hidden: 64, channels: 32}
  training: {epochs: 1, batchSize: 64, microBatches: 4}
  sharding: {shards: 4, balance: parameters}
  protection:
    maxExposure: 0.9
    topologyKey: topology.kubernetes.io/zone
    export:
      allowed: true
      principals: ["spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter", "spiffe://shardguard.local/ns/ml/sa/registry"]
  checkpoint: {everySteps: 100, volume: {persistentVolumeClaim: {claimName: ckpt}}}
  template:
    image: example.com/shardd:1
    resources: {limits: {nvidia.com/gpu: 1}}
    nodeSelector: {pool: gpu}
    tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}]
  sidecar: {image: example.com/sidecar:1}
)";
  return yaml_to_json(yaml + extra_yaml_spec);
}

std::string key_of(int i) { return std::string(32, static_cast<char>('a' + i)); }
std::string ledger_key_of(int i) { return std::string(32, static_cast<char>('A' + i)); }

RenderInputs inputs_for(const JobSpec& job, const json& object) {
  RenderInputs in;
  in.uid = "0b4e6a52-1111-2222-3333-444455556666";
  in.ca_cert_pem = "-----CA CERT-----\n";
  in.ca_key_pem = "-----CA KEY SECRET-----\n";
  for (int i = 0; i < job.sharding.shards; ++i) {
    in.shards.push_back({"-----LEAF CERT " + std::to_string(i) + "-----\n",
                         "-----LEAF KEY " + std::to_string(i) + "-----\n", key_of(i), ledger_key_of(i)});
  }
  in.job_object = object;
  in.export_budget_bytes = 1 << 20;
  return in;
}

struct Rendered {
  JobSpec job;
  RenderInputs in;
  DesiredObjects out;
};

Rendered render_example() {
  const json obj = job_object();
  Rendered r{job_from_json(obj), {}, {}};
  r.in = inputs_for(r.job, obj);
  r.out = render(r.job, r.in);
  return r;
}

std::vector<std::string> args_of(const json& pod, const std::string& container) {
  for (const auto& c : pod["spec"]["containers"]) {
    if (c["name"] == container) return c["args"].get<std::vector<std::string>>();
  }
  ADD_FAILURE() << "no container " << container;
  return {};
}

std::vector<std::string> flag_values(const std::vector<std::string>& args, const std::string& flag) {
  std::vector<std::string> v;
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == flag) v.push_back(args[i + 1]);
  }
  return v;
}

TEST(Base64, MatchesRfc4648Vectors) {
  EXPECT_EQ(base64_encode(""), "");
  EXPECT_EQ(base64_encode("f"), "Zg==");
  EXPECT_EQ(base64_encode("fo"), "Zm8=");
  EXPECT_EQ(base64_encode("foo"), "Zm9v");
  EXPECT_EQ(base64_encode("foob"), "Zm9vYg==");
  EXPECT_EQ(base64_encode("fooba"), "Zm9vYmE=");
  EXPECT_EQ(base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(base64_encode(std::string("\xff\x00\xfe", 3)), "/wD+");
}

TEST(Render, ObjectCountsAndNames) {
  const auto r = render_example();
  const auto all = r.out.all();
  ASSERT_EQ(all.size(), 1u + 4 + 4 + 1 + 4);
  EXPECT_EQ(r.out.ca_secret["metadata"]["name"], "fmnist-ca");
  EXPECT_EQ(r.out.service["metadata"]["name"], "fmnist");
  std::set<std::string> keys;
  for (const auto& o : all) {
    EXPECT_EQ(o["metadata"]["namespace"], "ml");
    keys.insert(o["kind"].get<std::string>() + "/" + o["metadata"]["name"].get<std::string>());
  }
  EXPECT_EQ(keys.size(), all.size()) << "duplicate kind/name";
  for (int i = 0; i < 4; ++i) {
    const std::string n = "fmnist-shard-" + std::to_string(i);
    EXPECT_TRUE(keys.count("Secret/" + n)) << n;
    EXPECT_TRUE(keys.count("ConfigMap/" + n)) << n;
    EXPECT_TRUE(keys.count("Pod/" + n)) << n;
    EXPECT_EQ(r.out.pods[i]["metadata"]["labels"][kLabelShard], std::to_string(i));
  }
}

TEST(Render, EveryObjectIsOwnedByTheJobAndLabelled) {
  const auto r = render_example();
  for (const auto& o : r.out.all()) {
    const auto& md = o["metadata"];
    ASSERT_EQ(md["ownerReferences"].size(), 1u) << md["name"];
    const auto& ref = md["ownerReferences"][0];
    EXPECT_EQ(ref["apiVersion"], "shardguard.io/v1alpha1");
    EXPECT_EQ(ref["kind"], "ShardedTrainingJob");
    EXPECT_EQ(ref["name"], "fmnist");
    EXPECT_EQ(ref["uid"], r.in.uid);
    EXPECT_EQ(ref["controller"], true);
    EXPECT_EQ(ref["blockOwnerDeletion"], true);
    EXPECT_EQ(md["labels"][kLabelJob], "fmnist");
    EXPECT_EQ(md["labels"][kLabelManagedBy], "shardguard-operator");
  }
}

TEST(Render, CaSecretHoldsCertAndKeyAndNoPodMountsIt) {
  const auto r = render_example();
  EXPECT_EQ(r.out.ca_secret["data"]["ca.crt"], base64_encode(r.in.ca_cert_pem));
  EXPECT_EQ(r.out.ca_secret["data"]["ca.key"], base64_encode(r.in.ca_key_pem));
  for (const auto& pod : r.out.pods) {
    EXPECT_EQ(pod.dump().find("fmnist-ca"), std::string::npos);
  }
}

TEST(Render, EachShardSecretHoldsOnlyItsOwnMaterial) {
  const auto r = render_example();
  for (int i = 0; i < 4; ++i) {
    const auto& s = r.out.shard_secrets[i];
    EXPECT_EQ(s["type"], "kubernetes.io/tls");
    const auto& d = s["data"];
    EXPECT_EQ(d.size(), 5u);
    EXPECT_EQ(d["tls.crt"], base64_encode(r.in.shards[i].cert_pem));
    EXPECT_EQ(d["tls.key"], base64_encode(r.in.shards[i].key_pem));
    EXPECT_EQ(d["ca.crt"], base64_encode(r.in.ca_cert_pem));
    EXPECT_EQ(d["checkpoint.key"], base64_encode(key_of(i)));
    EXPECT_EQ(d["ledger.key"], base64_encode(ledger_key_of(i)));
    const std::string text = s.dump();
    EXPECT_EQ(text.find(base64_encode(r.in.ca_key_pem)), std::string::npos) << "CA key in shard " << i;
    for (int j = 0; j < 4; ++j) {
      if (j == i) continue;
      EXPECT_EQ(text.find(base64_encode(r.in.shards[j].cert_pem)), std::string::npos) << i << " has " << j;
      EXPECT_EQ(text.find(base64_encode(r.in.shards[j].key_pem)), std::string::npos) << i << " has " << j;
      EXPECT_EQ(text.find(base64_encode(key_of(j))), std::string::npos) << i << " has key of " << j;
      EXPECT_EQ(text.find(base64_encode(ledger_key_of(j))), std::string::npos) << i << " has ledger key of " << j;
    }
  }
}

TEST(Render, PodMountsOnlyItsOwnSecret) {
  const auto r = render_example();
  for (int i = 0; i < 4; ++i) {
    for (const auto& v : r.out.pods[i]["spec"]["volumes"]) {
      if (v.contains("secret")) { EXPECT_EQ(v["secret"]["secretName"], "fmnist-shard-" + std::to_string(i)); }
      if (v.contains("configMap")) { EXPECT_EQ(v["configMap"]["name"], "fmnist-shard-" + std::to_string(i)); }
    }
  }
}

TEST(Render, PolicyConfigMapParsesAndAllowsForwardOnlyFromPrevious) {
  const auto r = render_example();
  const auto id = [](int s) { return spiffe_id_for_shard("shardguard.local", "ml", "fmnist", s); };
  for (int i = 0; i < 4; ++i) {
    const auto& cm = r.out.config_maps[i];
    const auto parsed = policy::parse_policy(cm["data"]["policy.json"].get<std::string>());
    EXPECT_EQ(parsed.shard(), i);
    EXPECT_EQ(parsed.shards(), 4);
    EXPECT_EQ(parsed.job(), "fmnist");
    EXPECT_EQ(parsed.ns(), "ml");
    for (int p = 0; p < 4; ++p) {
      const auto d = policy::decide(parsed, policy::Direction::kIngress, id(p), policy::kForwardMethod);
      EXPECT_EQ(d.allow, p == i - 1) << "shard " << i << " Forward from " << p << ": " << d.rule;
    }
    EXPECT_TRUE(parsed.exports().allowed);
    ASSERT_EQ(parsed.exports().principals.size(), 1u);
    EXPECT_EQ(parsed.exports().principals[0].budget_bytes, 1 << 20);
    // job.json is the job shardd --job reads.
    const auto job = job_from_json(json::parse(cm["data"]["job.json"].get<std::string>()));
    EXPECT_EQ(job.name, "fmnist");
    EXPECT_EQ(job.sharding.shards, 4);
  }
}

// cnn in 4 stages by parameters at maxExposure 0.9: runs 0-1 (0.555) and 2-3 (0.445).
TEST(Render, EachExportPrincipalMayExportOneRunWithinMaxExposure) {
  const auto r = render_example();
  const std::string exporter = "spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter";
  const std::string registry = "spiffe://shardguard.local/ns/ml/sa/registry";
  const auto params = stage_parameters(r.job);
  const auto assigned = assign_export_principals(r.job, params);
  ASSERT_EQ(assigned.size(), 2u);
  EXPECT_EQ(assigned[0].principal, exporter);
  EXPECT_EQ(assigned[0].shards, (std::set<int>{0, 1}));
  EXPECT_EQ(assigned[1].principal, registry);
  EXPECT_EQ(assigned[1].shards, (std::set<int>{2, 3}));
  for (const auto& a : assigned) EXPECT_LE(exposure_of(params, a.shards), r.job.protection.max_exposure);
  for (int i = 0; i < 4; ++i) {
    const auto parsed = policy::parse_policy(r.out.config_maps[i]["data"]["policy.json"].get<std::string>());
    const auto mine = i < 2 ? exporter : registry;
    const auto other = i < 2 ? registry : exporter;
    const auto yes = policy::decide(parsed, policy::Direction::kIngress, mine, policy::kExportMethod);
    EXPECT_TRUE(yes.allow) << "shard " << i << ": " << yes.reason;
    const auto no = policy::decide(parsed, policy::Direction::kIngress, other, policy::kExportMethod);
    EXPECT_FALSE(no.allow) << "shard " << i;
    EXPECT_EQ(no.reason, "peer \"" + other + "\" is not an export principal of shard " + std::to_string(i));
  }
}

TEST(Render, MorePrincipalsThanRunsTakeTheRunsInTurn) {
  const json obj = job_object();
  JobSpec job = job_from_json(obj);
  job.protection.max_exposure = 0.5;  // stages 0-1, 2, 3 (0.08 + 0.31, 0.61, 0.005)
  job.protection.export_.principals = {"spiffe://shardguard.local/a", "spiffe://shardguard.local/b",
                                       "spiffe://shardguard.local/c", "spiffe://shardguard.local/d"};
  const std::vector<int64_t> params = {18816, 73856, 147584, 1290};
  const auto assigned = assign_export_principals(job, params);
  ASSERT_EQ(assigned.size(), 4u);
  EXPECT_EQ(assigned[0].shards, (std::set<int>{0, 1}));
  EXPECT_EQ(assigned[1].shards, (std::set<int>{2}));
  EXPECT_EQ(assigned[2].shards, (std::set<int>{3}));
  EXPECT_EQ(assigned[3].shards, (std::set<int>{0, 1}));
  EXPECT_EQ(shards_text({0, 1, 3}), "0-1,3");
  EXPECT_EQ(shards_text({}), "none");
  job.protection.export_.allowed = false;
  job.protection.export_.principals.clear();
  EXPECT_TRUE(assign_export_principals(job, params).empty());
  EXPECT_FALSE(export_rules(job, {}, 0, 1).allowed);
}

TEST(Render, TooFewExportPrincipalsAreAnExposureRefusal) {
  const json obj = job_object();
  JobSpec job = job_from_json(obj);
  job.protection.export_.principals.resize(1);
  const auto in = inputs_for(job, obj);
  try {
    render(job, in);
    FAIL() << "rendered a job whose one export principal would read the whole model";
  } catch (const ExposureRefusal& e) {
    EXPECT_STREQ(e.what(),
                 "spec.protection.export.principals: 1 principal cannot export all 4 shards within maxExposure "
                 "0.9000: that takes 2, one for each run of shards (0-1, 2-3); list more principals or raise "
                 "maxExposure");
  }
}

// Issue 19 item 3: stage 0 of an MLP holds 85 % of it; kept on the data owner's nodes,
// the job fits maxExposure 0.5, and only stage 0's pod is pinned there.
TEST(Render, TrustedStagesRunOnTheOwnersNodesAndAreOutOfTheLimit) {
  json obj = job_object();
  obj["spec"]["model"] = {{"architecture", "mlp"}, {"hidden", 64}, {"depth", 3}};
  obj["spec"]["sharding"] = {{"shards", 3}};
  obj["spec"]["protection"]["maxExposure"] = 0.5;
  obj["spec"]["protection"]["export"] = {{"allowed", false}};
  JobSpec job = job_from_json(obj);
  try {
    render(job, inputs_for(job, obj));
    FAIL() << "stage 0 alone is above maxExposure";
  } catch (const ExposureRefusal& e) {
    EXPECT_NE(std::string(e.what()).find("or list the stage in trustedStages"), std::string::npos) << e.what();
  }
  obj["spec"]["protection"]["trustedStages"] = {0};
  obj["spec"]["protection"]["trustedNodeSelector"] = {{"example.com/owner", "data-team"}};
  job = job_from_json(obj);
  const auto out = render(job, inputs_for(job, obj));
  const json& trusted = out.pods[0];
  EXPECT_EQ(trusted["spec"]["nodeSelector"], (json{{"pool", "gpu"}, {"example.com/owner", "data-team"}}));
  EXPECT_EQ(trusted["metadata"]["labels"][kLabelTrusted], "true");
  for (int i = 1; i < 3; ++i) {
    EXPECT_EQ(out.pods[i]["spec"]["nodeSelector"], (json{{"pool", "gpu"}})) << i;
    EXPECT_FALSE(out.pods[i]["metadata"]["labels"].contains(kLabelTrusted)) << i;
  }
}

TEST(Render, TrustedStagesAreNeverExported) {
  JobSpec job = job_from_json(job_object());
  job.protection.trusted_stages = {0, 1};
  job.protection.trusted_node_selector = {{"owner", "me"}};
  const std::vector<int64_t> params = {18816, 73856, 73792, 650};
  const auto assigned = assign_export_principals(job, params);
  ASSERT_EQ(assigned.size(), 2u);
  EXPECT_EQ(assigned[0].shards, (std::set<int>{2, 3}));  // the only run: 2-3 (0.31)
  EXPECT_EQ(assigned[1].shards, (std::set<int>{2, 3}));
  EXPECT_FALSE(export_rules(job, assigned, 0, 1).allowed);
  job.protection.trusted_stages = {0, 1, 2, 3};
  EXPECT_TRUE(assign_export_principals(job, params).empty());
}

TEST(Render, HeadlessServiceSelectsTheJobsPods) {
  const auto r = render_example();
  const auto& spec = r.out.service["spec"];
  EXPECT_EQ(spec["clusterIP"], "None");
  ASSERT_EQ(spec["ports"].size(), 1u);
  EXPECT_EQ(spec["ports"][0]["name"], "mtls");
  EXPECT_EQ(spec["ports"][0]["port"], 7443);
  for (const auto& [k, v] : spec["selector"].items()) {
    for (const auto& pod : r.out.pods) EXPECT_EQ(pod["metadata"]["labels"][k], v) << k;
  }
  for (const auto& pod : r.out.pods) EXPECT_EQ(pod["spec"]["subdomain"], "fmnist");
}

TEST(Render, PodAntiAffinityOnTheTopologyKeyAgainstAllPodsOfTheJob) {
  const auto r = render_example();
  for (const auto& pod : r.out.pods) {
    const auto& req = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    ASSERT_EQ(req.size(), 1u);
    EXPECT_EQ(req[0]["topologyKey"], "topology.kubernetes.io/zone");
    const json want = {{kLabelJob, "fmnist"}};
    EXPECT_EQ(req[0]["labelSelector"]["matchLabels"], want);
    EXPECT_EQ(pod["metadata"]["labels"][kLabelJob], "fmnist");  // so it matches every shard
  }
}

TEST(Render, RestrictedSecurityContext) {
  const auto r = render_example();
  for (const auto& pod : r.out.pods) {
    const auto& psc = pod["spec"]["securityContext"];
    EXPECT_EQ(psc["runAsNonRoot"], true);
    EXPECT_GT(psc["runAsUser"].get<int64_t>(), 0);
    EXPECT_EQ(psc["seccompProfile"]["type"], "RuntimeDefault");
    EXPECT_EQ(pod["spec"]["automountServiceAccountToken"], false);
    ASSERT_EQ(pod["spec"]["containers"].size(), 2u);
    for (const auto& c : pod["spec"]["containers"]) {
      const auto& sc = c["securityContext"];
      EXPECT_EQ(sc["runAsNonRoot"], true) << c["name"];
      EXPECT_EQ(sc["readOnlyRootFilesystem"], true) << c["name"];
      EXPECT_EQ(sc["allowPrivilegeEscalation"], false) << c["name"];
      EXPECT_EQ(sc["capabilities"]["drop"], json::array({"ALL"})) << c["name"];
      EXPECT_FALSE(sc["capabilities"].contains("add")) << c["name"];
      EXPECT_EQ(sc["seccompProfile"]["type"], "RuntimeDefault") << c["name"];
    }
  }
}

// The exposure ledger (sidecar --ledger): its key reaches the sidecar only, through the
// TLS projection; its file lives on the checkpoint volume, so it survives the pod as
// the checkpoints do, in a subPath that only the sidecar mounts (issue 16 item 2):
// shardd, which mounts only the checkpoints' subPath, cannot delete it or put an
// older copy back.
TEST(Render, LedgerKeyAndFileBelongToTheSidecarOnly) {
  const auto r = render_example();
  for (int i = 0; i < 4; ++i) {
    const auto& spec = r.out.pods[i]["spec"];
    std::map<std::string, std::set<std::string>> projected;  // volume → Secret keys
    for (const auto& v : spec["volumes"]) {
      if (!v.contains("secret")) continue;
      for (const auto& item : v["secret"]["items"]) projected[v["name"]].insert(item["key"].get<std::string>());
    }
    EXPECT_EQ(projected["tls"], (std::set<std::string>{"tls.crt", "tls.key", "ca.crt", "ledger.key"}));
    EXPECT_EQ(projected["checkpoint-key"], std::set<std::string>{"checkpoint.key"});
    for (const auto& c : spec["containers"]) {
      std::map<std::string, json> mounts;
      for (const auto& m : c["volumeMounts"]) mounts[m["name"]] = m;
      ASSERT_TRUE(mounts.count("checkpoint")) << c["name"];
      EXPECT_EQ(c["volumeMounts"].size(), mounts.size()) << "one mount per volume";
      const json& ckpt = mounts.at("checkpoint");
      EXPECT_FALSE(ckpt.value("readOnly", false));
      if (c["name"] == "sidecar") {
        EXPECT_FALSE(mounts.count("checkpoint-key")) << "the sidecar must not see the checkpoint key";
        EXPECT_EQ(ckpt["mountPath"], "/var/lib/shardguard/ledger");
        EXPECT_EQ(ckpt["subPath"], "ledger");
      } else {
        EXPECT_FALSE(mounts.count("tls")) << "shardd must not see the TLS key or the ledger key";
        EXPECT_FALSE(mounts.count("sidecar-state")) << "shardd must not see the sidecar's own volume";
        EXPECT_EQ(ckpt["mountPath"], "/var/lib/shardguard/checkpoint");
        EXPECT_EQ(ckpt["subPath"], "checkpoints");
      }
    }
  }
}

// The ledger sequence the operator recorded for a shard becomes that shard's sidecar
// --ledger-min-sequence; 0 or none renders no flag (a sidecar that never exported).
TEST(Render, RecordedLedgerSequenceBecomesTheSidecarsMinimum) {
  const json obj = job_object();
  const JobSpec job = job_from_json(obj);
  auto in = inputs_for(job, obj);
  for (const auto& pod : render(job, in).pods) {
    EXPECT_TRUE(flag_values(args_of(pod, "sidecar"), "--ledger-min-sequence").empty());
  }
  in.ledger_min_sequence = {0, 17};  // shorter than the shard count
  const auto out = render(job, in);
  EXPECT_TRUE(flag_values(args_of(out.pods[0], "sidecar"), "--ledger-min-sequence").empty());
  EXPECT_EQ(flag_values(args_of(out.pods[1], "sidecar"), "--ledger-min-sequence"), std::vector<std::string>{"17"});
  EXPECT_TRUE(flag_values(args_of(out.pods[2], "sidecar"), "--ledger-min-sequence").empty());
  EXPECT_TRUE(flag_values(args_of(out.pods[1], "shardd"), "--ledger-min-sequence").empty());
  in.ledger_min_sequence = {0, -1};
  try {
    render(job, in);
    ADD_FAILURE() << "a negative sequence was rendered";
  } catch (const RenderError& e) {
    EXPECT_STREQ(e.what(), "render inputs: shard 1 ledger minimum sequence -1 is negative");
  }
}

TEST(Render, TemplateResourcesPlacementImagesAndVolumes) {
  const auto r = render_example();
  for (const auto& pod : r.out.pods) {
    const auto& spec = pod["spec"];
    const auto& shardd = spec["containers"][0];
    EXPECT_EQ(shardd["name"], "shardd");
    EXPECT_EQ(shardd["image"], "example.com/shardd:1");
    EXPECT_EQ(shardd["resources"]["limits"]["nvidia.com/gpu"], 1);
    EXPECT_EQ(spec["containers"][1]["image"], "example.com/sidecar:1");
    EXPECT_EQ(spec["nodeSelector"]["pool"], "gpu");
    EXPECT_EQ(spec["tolerations"][0]["key"], "gpu");
    std::set<std::string> names;
    for (const auto& v : spec["volumes"]) names.insert(v["name"]);
    EXPECT_EQ(names, (std::set<std::string>{"tls", "checkpoint-key", "config", "tmp", "sidecar-state", "checkpoint"}));
    for (const auto& v : spec["volumes"]) {
      if (v["name"] == "checkpoint") { EXPECT_EQ(v["persistentVolumeClaim"]["claimName"], "ckpt"); }
      if (v["name"] == "tmp") { EXPECT_TRUE(v.contains("emptyDir")); }
    }
  }
}

TEST(Render, ContainerArgsUseLoopbackAndTheMountedFiles) {
  const auto r = render_example();
  for (int i = 0; i < 4; ++i) {
    const auto s = args_of(r.out.pods[i], "shardd");
    EXPECT_EQ(flag_values(s, "--stage"), std::vector<std::string>{std::to_string(i)});
    EXPECT_EQ(flag_values(s, "--listen"), std::vector<std::string>{"127.0.0.1:7000"});
    EXPECT_EQ(flag_values(s, "--prev").size(), i > 0 ? 1u : 0u);
    EXPECT_EQ(flag_values(s, "--next").size(), i < 3 ? 1u : 0u);
    for (const auto& a : flag_values(s, "--prev")) EXPECT_EQ(a, "127.0.0.1:7001");
    for (const auto& a : flag_values(s, "--next")) EXPECT_EQ(a, "127.0.0.1:7001");
    EXPECT_EQ(flag_values(s, "--key-file"), std::vector<std::string>{"/etc/shardguard/key/checkpoint.key"});
    EXPECT_EQ(flag_values(s, "--metrics"), std::vector<std::string>{"0.0.0.0:9100"});
    const auto c = args_of(r.out.pods[i], "sidecar");
    EXPECT_EQ(flag_values(c, "--inbound"), std::vector<std::string>{"0.0.0.0:7443"});
    EXPECT_EQ(flag_values(c, "--outbound"), std::vector<std::string>{"127.0.0.1:7001"});
    EXPECT_EQ(flag_values(c, "--upstream"), std::vector<std::string>{"127.0.0.1:7000"});
    EXPECT_EQ(flag_values(c, "--policy"), std::vector<std::string>{"/etc/shardguard/config/policy.json"});
    EXPECT_EQ(flag_values(c, "--ledger"),
              std::vector<std::string>{"/var/lib/shardguard/ledger/fmnist-shard-" + std::to_string(i) + ".ledger.json"});
    EXPECT_EQ(flag_values(c, "--ledger-key"), std::vector<std::string>{"/etc/shardguard/tls/ledger.key"});
    EXPECT_EQ(flag_values(c, "--metrics"), std::vector<std::string>{"0.0.0.0:9101"});
    EXPECT_EQ(flag_values(c, "--audit-log"), std::vector<std::string>{"/var/lib/shardguard/sidecar/audit.jsonl"});
    EXPECT_NE(std::find(c.begin(), c.end(), "--audit-stdout"), c.end());
  }
}

// Issue 16 item 3: in the cluster the sidecar audits to its own volume, which shardd
// does not mount (so it cannot edit or delete the log), and to stdout.
TEST(Render, SidecarAuditsToItsOwnVolume) {
  const auto r = render_example();
  for (int i = 0; i < 4; ++i) {
    const json& spec = r.out.pods[i]["spec"];
    bool volume = false;
    for (const auto& v : spec["volumes"]) {
      if (v["name"] == "sidecar-state") volume = v.contains("emptyDir");
    }
    EXPECT_TRUE(volume) << "pod " << i;
    for (const auto& c : spec["containers"]) {
      bool mounted = false;
      for (const auto& m : c["volumeMounts"]) {
        if (m["name"] == "sidecar-state") {
          mounted = true;
          EXPECT_EQ(m["mountPath"], "/var/lib/shardguard/sidecar");
          EXPECT_FALSE(m.value("readOnly", false));
        }
      }
      EXPECT_EQ(mounted, c["name"] == "sidecar") << "pod " << i << " container " << c["name"];
    }
  }
}

TEST(Render, SidecarPeersAreOnlyTheNeighbours) {
  const auto r = render_example();
  for (int i = 0; i < 4; ++i) {
    std::vector<std::string> want;
    for (int p : {i - 1, i + 1}) {
      if (p < 0 || p > 3) continue;
      want.push_back(spiffe_id_for_shard("shardguard.local", "ml", "fmnist", p) + "=fmnist-shard-" +
                     std::to_string(p) + ".fmnist.ml.svc.cluster.local:7443");
    }
    EXPECT_EQ(flag_values(args_of(r.out.pods[i], "sidecar"), "--peer"), want) << "shard " << i;
  }
}

// Data-parallel replicas (issue 20 item 3): 4 stages × 2 replicas, each replica its own
// pod, identity, policy and neighbours; the anti-affinity is per stage.
Rendered render_replicated(int replicas = 2) {
  json o = job_object();
  o["spec"]["sharding"]["replicas"] = replicas;
  Rendered r{job_from_json(o), {}, {}};
  r.in.uid = "0b4e6a52-1111-2222-3333-444455556666";
  r.in.ca_cert_pem = "-----CA CERT-----\n";
  r.in.ca_key_pem = "-----CA KEY SECRET-----\n";
  for (int k = 0; k < 4 * replicas; ++k) {
    // The stage's checkpoint key for every replica; each replica's own leaf and ledger key.
    r.in.shards.push_back({"-----LEAF CERT " + std::to_string(k) + "-----\n",
                           "-----LEAF KEY " + std::to_string(k) + "-----\n", key_of(k % 4), ledger_key_of(k)});
  }
  r.in.job_object = o;
  r.in.export_budget_bytes = 1 << 20;
  r.out = render(r.job, r.in);
  return r;
}

TEST(RenderReplicas, EveryReplicaHasItsOwnNamedObjects) {
  const auto r = render_replicated();
  ASSERT_EQ(r.out.pods.size(), 8u);
  ASSERT_EQ(r.out.shard_secrets.size(), 8u);
  ASSERT_EQ(r.out.config_maps.size(), 8u);
  EXPECT_EQ(r.out.all().size(), 1u + 8 + 8 + 1 + 8);
  for (int k = 0; k < 8; ++k) {
    const int i = k % 4, rep = k / 4;
    const std::string name = "fmnist-shard-" + std::to_string(i) + "-r" + std::to_string(rep);
    EXPECT_EQ(slot_of(r.job, i, rep), k);
    EXPECT_EQ(replica_name(r.job, i, rep), name);
    for (const json* o : {&r.out.pods[k], &r.out.shard_secrets[k], &r.out.config_maps[k]}) {
      EXPECT_EQ((*o)["metadata"]["name"], name);
      EXPECT_EQ((*o)["metadata"]["labels"][kLabelShard], std::to_string(i));
      EXPECT_EQ((*o)["metadata"]["labels"][kLabelReplica], std::to_string(rep));
    }
    EXPECT_EQ(r.out.pods[k]["spec"]["hostname"], name);
    EXPECT_EQ(r.out.pods[k]["spec"]["subdomain"], "fmnist");
    for (const auto& v : r.out.pods[k]["spec"]["volumes"]) {
      if (v.contains("secret")) { EXPECT_EQ(v["secret"]["secretName"], name); }
      if (v.contains("configMap")) { EXPECT_EQ(v["configMap"]["name"], name); }
    }
    // Its own leaf and ledger key, the stage's checkpoint key.
    const json& data = r.out.shard_secrets[k]["data"];
    EXPECT_EQ(base64_decode(data["tls.crt"]), "-----LEAF CERT " + std::to_string(k) + "-----\n");
    EXPECT_EQ(base64_decode(data["ledger.key"]), ledger_key_of(k));
    EXPECT_EQ(base64_decode(data["checkpoint.key"]), key_of(i));
  }
  // A job without replicas keeps its names and has no replica label.
  const auto single = render_example();
  EXPECT_EQ(replica_name(single.job, 2, 0), "fmnist-shard-2");
  EXPECT_FALSE(single.out.pods[2]["metadata"]["labels"].contains(kLabelReplica));
  EXPECT_EQ(spiffe_id_of(single.job, 2, 0), spiffe_id_for_shard("shardguard.local", "ml", "fmnist", 2));
}

TEST(RenderReplicas, ReplicaTalksOnlyToItsOwnPipelineUnderItsOwnIdentity) {
  const auto r = render_replicated();
  const auto id = [](int s, int rep) { return spiffe_id_for_replica("shardguard.local", "ml", "fmnist", s, rep); };
  for (int k = 0; k < 8; ++k) {
    const int i = k % 4, rep = k / 4;
    EXPECT_EQ(spiffe_id_of(r.job, i, rep),
              "spiffe://shardguard.local/ns/ml/job/fmnist/shard/" + std::to_string(i) + "/replica/" + std::to_string(rep));
    std::vector<std::string> want;
    for (int p : {i - 1, i + 1}) {
      if (p < 0 || p > 3) continue;
      want.push_back(id(p, rep) + "=fmnist-shard-" + std::to_string(p) + "-r" + std::to_string(rep) +
                     ".fmnist.ml.svc.cluster.local:7443");
    }
    // ... and, for the replica tunnels only, the lesser replica of its own stage (Gloo's
    // greater replica connects; the store is replica 0's).
    if (rep == 1) want.push_back(id(i, 0) + "=fmnist-shard-" + std::to_string(i) + "-r0.fmnist.ml.svc.cluster.local:7443");
    EXPECT_EQ(flag_values(args_of(r.out.pods[k], "sidecar"), "--peer"), want) << k;
    EXPECT_EQ(flag_values(args_of(r.out.pods[k], "sidecar"), "--ledger"),
              std::vector<std::string>{std::string(kLedgerDir) + "/fmnist-shard-" + std::to_string(i) + "-r" +
                                       std::to_string(rep) + ".ledger.json"});
    const auto parsed = policy::parse_policy(r.out.config_maps[k]["data"]["policy.json"].get<std::string>());
    EXPECT_EQ(parsed.shard(), i);
    for (int p = 0; p < 4; ++p) {
      for (int q = 0; q < 2; ++q) {
        const auto d = policy::decide(parsed, policy::Direction::kIngress, id(p, q), policy::kForwardMethod);
        EXPECT_EQ(d.allow, p == i - 1 && q == rep) << k << ": Forward from stage " << p << " replica " << q;
      }
      // Nor a shard identity without a replica.
      EXPECT_FALSE(policy::decide(parsed, policy::Direction::kIngress,
                                  spiffe_id_for_shard("shardguard.local", "ml", "fmnist", p), policy::kForwardMethod)
                       .allow);
    }
    // The replica tunnels: Gloo only from the other replica of its own stage, the store
    // only into replica 0.
    for (int p = 0; p < 4; ++p) {
      for (int q = 0; q < 2; ++q) {
        const auto gloo = policy::decide(parsed, policy::Direction::kIngress, id(p, q), policy::kTunnelGlooMethod);
        EXPECT_EQ(gloo.allow, p == i && q > rep) << k << ": Gloo tunnel from stage " << p << " replica " << q;
        const auto store = policy::decide(parsed, policy::Direction::kIngress, id(p, q), policy::kTunnelStoreMethod);
        EXPECT_EQ(store.allow, p == i && q != rep && rep == 0) << k << ": store tunnel from stage " << p << " replica " << q;
      }
    }
    // The exposure rules are the stage's, whatever the replica.
    EXPECT_EQ(parsed.exports().allowed, true);
  }
}

TEST(RenderReplicas, SharddJoinsItsStagesGroupThroughTheSidecarsTunnels) {
  const auto r = render_replicated();
  const auto id = [](int s, int rep) { return spiffe_id_for_replica("shardguard.local", "ml", "fmnist", s, rep); };
  const std::string map = std::string(kTunnelDir) + "/" + kGlooMapFileName;
  for (int k = 0; k < 8; ++k) {
    const int i = k % 4, rep = k / 4, other = 1 - rep;
    const auto args = args_of(r.out.pods[k], "shardd");
    EXPECT_EQ(flag_values(args, "--stage"), std::vector<std::string>{std::to_string(i)});
    EXPECT_EQ(flag_values(args, "--replica"), std::vector<std::string>{std::to_string(rep)});
    // The store at the pod's own loopback: replica 0's shardd serves it, the other's
    // sidecar tunnels it to replica 0.
    EXPECT_EQ(flag_values(args, "--replica-store"), std::vector<std::string>{"127.0.0.1:7100"});
    EXPECT_TRUE(flag_values(args, "--replica-host").empty());
    EXPECT_EQ(flag_values(args, "--replica-tunnel"),
              std::vector<std::string>{id(i, other) + "=127.77.0." + std::to_string(other + 1) + ":7101"});
    EXPECT_EQ(flag_values(args, "--replica-tunnel-map"), std::vector<std::string>{map});
    const auto side = args_of(r.out.pods[k], "sidecar");
    std::vector<std::string> tunnels;
    if (rep != 0) tunnels = {"gloo@127.77.0.1:7101=" + id(i, 0), "store@127.0.0.1:7100=" + id(i, 0)};
    EXPECT_EQ(flag_values(side, "--tunnel"), tunnels) << k;
    EXPECT_EQ(flag_values(side, "--tunnel-store"),
              rep == 0 ? std::vector<std::string>{"127.0.0.1:7100"} : std::vector<std::string>{});
    EXPECT_EQ(flag_values(side, "--tunnel-map"), std::vector<std::string>{map});
    // No store port is declared and no pod IP is passed (LibTorch's store still binds
    // every interface of replica 0's pod; its keys are named after the stage's secret).
    json shardd, sidecar;
    for (const auto& c : r.out.pods[k]["spec"]["containers"]) {
      if (c["name"] == "shardd") shardd = c;
      if (c["name"] == "sidecar") sidecar = c;
    }
    EXPECT_FALSE(shardd.contains("env"));
    for (const auto& p : shardd["ports"]) EXPECT_NE(p["containerPort"], kReplicaStorePort);
    // The map's volume: shardd writes it, the sidecar only reads it.
    const auto mount_of = [](const json& c) {
      for (const auto& m : c["volumeMounts"]) {
        if (m["name"] == kTunnelVolume) return m;
      }
      return json();
    };
    EXPECT_EQ(mount_of(shardd).value("mountPath", ""), kTunnelDir);
    EXPECT_FALSE(mount_of(shardd).value("readOnly", false));
    EXPECT_EQ(mount_of(sidecar).value("mountPath", ""), kTunnelDir);
    EXPECT_TRUE(mount_of(sidecar).value("readOnly", false));
    // The stage's checkpoints: the same volume and subPath for every replica.
    EXPECT_EQ(flag_values(args, "--checkpoint-dir"), std::vector<std::string>{kCheckpointDir});
  }
  // Without replicas: no replica flags, no env.
  const auto single = render_example();
  EXPECT_TRUE(flag_values(args_of(single.out.pods[1], "shardd"), "--replica").empty());
  EXPECT_TRUE(flag_values(args_of(single.out.pods[1], "shardd"), "--replica-store").empty());
}

TEST(RenderReplicas, AntiAffinityKeepsOtherStagesOffTheNodeOnly) {
  const auto r = render_replicated();
  for (int k = 0; k < 8; ++k) {
    const json& terms =
        r.out.pods[k]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    ASSERT_EQ(terms.size(), 1u);
    EXPECT_EQ(terms[0]["topologyKey"], "topology.kubernetes.io/zone");
    const json& sel = terms[0]["labelSelector"];
    EXPECT_EQ(sel["matchLabels"], json({{kLabelJob, "fmnist"}}));
    EXPECT_EQ(sel["matchExpressions"],
              json::array({{{"key", kLabelShard}, {"operator", "NotIn"}, {"values", {std::to_string(k % 4)}}}}));
  }
  // Unchanged without replicas: against every pod of the job.
  const auto single = render_example();
  EXPECT_FALSE(single.out.pods[0]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                   [0]["labelSelector"]
                       .contains("matchExpressions"));
}

TEST(RenderReplicas, RefusesInputsThatDoNotFitTheReplicas) {
  auto r = render_replicated();
  RenderInputs in = r.in;
  in.shards.resize(4);  // one pipeline's material only
  try {
    render(r.job, in);
    ADD_FAILURE() << "accepted 4 materials for 4 × 2 pods";
  } catch (const RenderError& e) {
    EXPECT_NE(std::string(e.what()).find("spec.sharding.replicas 2"), std::string::npos) << e.what();
  }
  in = r.in;
  in.shards[5].checkpoint_key = key_of(7);  // stage 1 replica 1 with another key
  try {
    render(r.job, in);
    ADD_FAILURE() << "accepted a replica with another checkpoint key";
  } catch (const RenderError& e) {
    EXPECT_NE(std::string(e.what()).find("shard 1 replica 1 checkpoint key differs"), std::string::npos) << e.what();
  }
  in = r.in;
  in.ledger_min_sequence = {0, 0, 0, 0, 0, 0, 7, 0};
  const auto out = render(r.job, in);
  EXPECT_EQ(flag_values(args_of(out.pods[6], "sidecar"), "--ledger-min-sequence"), std::vector<std::string>{"7"});
  EXPECT_TRUE(flag_values(args_of(out.pods[2], "sidecar"), "--ledger-min-sequence").empty());
}

TEST(Render, IsDeterministic) {
  const auto a = render_example();
  const auto b = render_example();
  const auto ja = a.out.all();
  const auto jb = b.out.all();
  ASSERT_EQ(ja.size(), jb.size());
  for (size_t k = 0; k < ja.size(); ++k) EXPECT_EQ(ja[k].dump(), jb[k].dump()) << k;
}

TEST(Render, RefusesAStageLargerThanMaxExposure) {
  json obj = job_object();
  obj["spec"]["protection"]["maxExposure"] = 0.3;
  obj["spec"]["sharding"]["shards"] = 2;
  const JobSpec job = job_from_json(obj);
  const auto model = model::describe_model(job.model);
  const auto stages = model::partition(model, 2, "parameters");
  int worst = 0;
  for (const auto& s : stages) {
    if (model::parameter_share(model, s) > model::parameter_share(model, stages[worst])) worst = s.index;
  }
  ASSERT_GT(model::parameter_share(model, stages[worst]), 0.3);
  try {
    render(job, inputs_for(job, obj));
    FAIL() << "rendered a job whose stage exceeds maxExposure";
  } catch (const RenderError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("spec.protection.maxExposure"), std::string::npos) << msg;
    EXPECT_NE(msg.find("stage " + std::to_string(worst)), std::string::npos) << msg;
    EXPECT_NE(msg.find("maxExposure 0.3000"), std::string::npos) << msg;
    char share[32];
    std::snprintf(share, sizeof share, "%.4f", model::parameter_share(model, stages[worst]));
    EXPECT_NE(msg.find(share), std::string::npos) << msg;
  }
}

TEST(Render, RefusesInputsThatDoNotFitTheJob) {
  const json obj = job_object();
  const JobSpec job = job_from_json(obj);
  {
    auto in = inputs_for(job, obj);
    in.shards.pop_back();
    EXPECT_THROW(render(job, in), RenderError);
  }
  {
    auto in = inputs_for(job, obj);
    in.shards[2].checkpoint_key = "short";
    EXPECT_THROW(render(job, in), RenderError);
  }
  {
    auto in = inputs_for(job, obj);
    in.shards[1].ledger_key.clear();
    try {
      render(job, in);
      ADD_FAILURE() << "an empty ledger key was rendered";
    } catch (const RenderError& e) {
      EXPECT_STREQ(e.what(), "render inputs: shard 1 ledger key is 0 bytes, want 32");
    }
  }
  {
    auto in = inputs_for(job, obj);
    in.uid.clear();
    EXPECT_THROW(render(job, in), RenderError);
  }
  {
    auto in = inputs_for(job, obj);
    in.job_object = json::object();
    EXPECT_THROW(render(job, in), RenderError);
  }
}

TEST(Render, ExampleJobRendersWithDefaults) {
  const json obj = yaml_to_json(R"(apiVersion: shardguard.io/v1alpha1
kind: ShardedTrainingJob
metadata: {name: tiny}
spec:
  model: {architecture: mlp}
  sharding: {shards: 2}
  template: {image: img/shardd}
  sidecar: {image: img/sidecar}
)");
  const JobSpec job = job_from_json(obj);
  const auto out = render(job, inputs_for(job, obj));
  ASSERT_EQ(out.pods.size(), 2u);
  EXPECT_EQ(out.pods[0]["metadata"]["namespace"], "default");
  EXPECT_FALSE(out.pods[0]["spec"].contains("nodeSelector"));
  EXPECT_FALSE(out.pods[0]["spec"]["containers"][0].contains("resources"));
  bool has_empty_dir_checkpoint = false;
  for (const auto& v : out.pods[0]["spec"]["volumes"]) {
    if (v["name"] == "checkpoint") has_empty_dir_checkpoint = v.contains("emptyDir");
  }
  EXPECT_TRUE(has_empty_dir_checkpoint);
  // export not allowed → empty export section in every policy.
  EXPECT_FALSE(policy::parse_policy(out.config_maps[1]["data"]["policy.json"].get<std::string>()).exports().allowed);
}


// ---- a package job (spec.model.package, docs/distribution.md) ----------------------------

// A manifest of 4 blocks cut into 2 shards: [0, 2) and [2, 4).
model::PackageManifest two_shard_manifest(int64_t a = 100, int64_t b = 300, int64_t c = 300, int64_t d = 300) {
  model::PackageManifest m;
  m.split_id = "0123456789abcdef0123456789abcdef";
  m.job = "tuned";
  m.attribute = "blocks";
  const std::vector<int64_t> params = {a, b, c, d};
  for (int i = 0; i < 4; ++i) {
    model::PackageBlock blk;
    blk.index = i;
    blk.source = "blocks." + std::to_string(i);
    blk.type = "__torch__.Layer";
    blk.in_shape = {16, 8};
    blk.out_shape = {16, 8};
    blk.parameters = params[i];
    m.blocks.push_back(blk);
  }
  for (int s = 0; s < 2; ++s) {
    model::PackageShard sh;
    sh.index = s;
    sh.first_block = 2 * s;
    sh.end_block = 2 * s + 2;
    sh.parameters = params[2 * s] + params[2 * s + 1];
    sh.share = static_cast<double>(sh.parameters) / static_cast<double>(a + b + c + d);
    sh.file = model::package_file_name(s);
    sh.sha256 = std::string(64, '0');
    m.shards.push_back(sh);
  }
  return m;
}

json package_job_object(double max_exposure = 0.7, const std::string& volume = "") {
  return yaml_to_json(R"(apiVersion: shardguard.io/v1alpha1
kind: ShardedTrainingJob
metadata: {name: tuned, namespace: ml}
spec:
  model:
    architecture: torchscript
    context: 16
    package: {path: /packages/tuned, keysSecret: tuned-package-keys)" + volume + R"(}
  dataset: {format: tokens, path: /data/text}
  sharding: {shards: 2}
  protection: {maxExposure: )" + std::to_string(max_exposure) + R"(}
  template: {image: example.com/shardd:1}
  sidecar: {image: example.com/sidecar:1}
)");
}

std::string package_key_of(int i) { return std::string(32, static_cast<char>('p' + i)); }

Rendered render_package(const json& obj, const model::PackageManifest& m = two_shard_manifest()) {
  Rendered r{job_from_json(obj), {}, {}};
  r.in = inputs_for(r.job, obj);
  r.in.package_manifest = m;
  for (int i = 0; i < r.job.sharding.shards; ++i) r.in.package_keys.push_back(package_key_of(i));
  r.out = render(r.job, r.in);
  return r;
}

const json* container_of(const json& pod, const std::string& name) {
  for (const auto& c : pod["spec"]["containers"]) {
    if (c["name"] == name) return &c;
  }
  return nullptr;
}

TEST(RenderPackage, EachShardGetsOnlyItsOwnPackageKeyAndItsPackage) {
  const auto r = render_package(package_job_object());
  for (int i = 0; i < 2; ++i) {
    const auto& secret = r.out.shard_secrets[i];
    EXPECT_EQ(secret["data"][kPackageKeyItem], base64_encode(package_key_of(i)));
    const std::string other = base64_encode(package_key_of(1 - i));
    for (const auto& objects : {r.out.shard_secrets, r.out.config_maps, r.out.pods}) {
      EXPECT_EQ(objects[i].dump().find(other), std::string::npos) << "shard " << i << " has the key of " << 1 - i;
    }
    EXPECT_EQ(r.out.ca_secret.dump().find(base64_encode(package_key_of(i))), std::string::npos);

    const json& pod = r.out.pods[i];
    const auto args = args_of(pod, "shardd");
    EXPECT_EQ(flag_values(args, "--package"), std::vector<std::string>{"/packages/tuned"});
    EXPECT_EQ(flag_values(args, "--package-key-file"),
              std::vector<std::string>{std::string(kPackageKeyDir) + "/" + kPackageKeyItem});
    // The manifest shardd trusts is its own Secret's copy, not the one beside the packages.
    EXPECT_EQ(flag_values(args, "--package-manifest"),
              std::vector<std::string>{std::string(kPackageKeyDir) + "/" + kPackageManifestItem});
    EXPECT_EQ(model::parse_manifest(base64_decode(secret["data"][kPackageManifestItem].get<std::string>()), "secret")
                  .shards[1]
                  .sha256,
              two_shard_manifest().shards[1].sha256);
    // The key volume projects this shard's own Secret, package.key and manifest.json only.
    bool key_volume = false, package_volume = false;
    for (const auto& v : pod["spec"]["volumes"]) {
      if (v["name"] == "package-key") {
        key_volume = true;
        EXPECT_EQ(v["secret"]["secretName"], shard_name(r.job, i));
        EXPECT_EQ(v["secret"]["items"], json::array({{{"key", kPackageKeyItem}, {"path", kPackageKeyItem}},
                                                     {{"key", kPackageManifestItem}, {"path", kPackageManifestItem}}}));
      }
      if (v["name"] == kPackageVolume) {
        package_volume = true;
        EXPECT_EQ(v["hostPath"]["path"], "/packages/tuned");  // no volume given: the node's directory
      }
      // The keys Secret itself is never mounted into a pod.
      if (v.contains("secret")) { EXPECT_NE(v["secret"]["secretName"], "tuned-package-keys"); }
    }
    EXPECT_TRUE(key_volume && package_volume) << pod["spec"]["volumes"].dump();
    // shardd only, read-only; the sidecar mounts neither.
    const json* shardd = container_of(pod, "shardd");
    ASSERT_NE(shardd, nullptr);
    int mounts = 0;
    for (const auto& m : (*shardd)["volumeMounts"]) {
      if (m["name"] == "package-key" || m["name"] == kPackageVolume) {
        ++mounts;
        EXPECT_EQ(m["readOnly"], true);
      }
    }
    EXPECT_EQ(mounts, 2);
    EXPECT_EQ((*shardd)["terminationMessagePolicy"], "FallbackToLogsOnError");
    for (const auto& m : (*container_of(pod, "sidecar"))["volumeMounts"]) {
      EXPECT_NE(m["name"], "package-key");
      EXPECT_NE(m["name"], kPackageVolume);
    }
  }
  // The keys Secret's name appears nowhere: the operator copies, pods never read it.
  for (const auto& o : r.out.all()) {
    if (o["kind"] != "ConfigMap") { EXPECT_EQ(o.dump().find("tuned-package-keys"), std::string::npos) << o["kind"]; }
  }
}

// spec.model.package.url: each shardd is given the prefix (it fetches only its own
// shard-<i>.sgpkg), its own Secret's key and manifest; no package volume at all.
TEST(RenderPackage, UrlJobHasNoPackageVolumeAndEachShardItsOwnSecret) {
  json obj = package_job_object();
  obj["spec"]["model"]["package"] = {{"url", "https://models.example.com/tuned/"}, {"keysSecret", "tuned-package-keys"}};
  const auto r = render_package(obj);
  for (int i = 0; i < 2; ++i) {
    const json& pod = r.out.pods[i];
    const auto args = args_of(pod, "shardd");
    EXPECT_EQ(flag_values(args, "--package"), std::vector<std::string>{"https://models.example.com/tuned/"});
    EXPECT_EQ(flag_values(args, "--package-manifest"),
              std::vector<std::string>{std::string(kPackageKeyDir) + "/" + kPackageManifestItem});
    EXPECT_EQ(flag_values(args, "--package-key-file"),
              std::vector<std::string>{std::string(kPackageKeyDir) + "/" + kPackageKeyItem});
    EXPECT_EQ(r.out.shard_secrets[i]["data"][kPackageKeyItem], base64_encode(package_key_of(i)));
    EXPECT_TRUE(r.out.shard_secrets[i]["data"].contains(kPackageManifestItem));
    EXPECT_EQ(r.out.shard_secrets[i].dump().find(base64_encode(package_key_of(1 - i))), std::string::npos);
    int key_volumes = 0;
    for (const auto& v : pod["spec"]["volumes"]) {
      EXPECT_NE(v["name"], kPackageVolume);
      EXPECT_FALSE(v.contains("hostPath"));
      if (v["name"] == "package-key") {
        ++key_volumes;
        EXPECT_EQ(v["secret"]["secretName"], shard_name(r.job, i));
      }
    }
    EXPECT_EQ(key_volumes, 1);
    for (const auto& m : (*container_of(pod, "shardd"))["volumeMounts"]) EXPECT_NE(m["name"], kPackageVolume);
    for (const auto& m : (*container_of(pod, "sidecar"))["volumeMounts"]) EXPECT_NE(m["name"], "package-key");
  }
}

TEST(RenderPackage, VolumeIsMountedAsGiven) {
  const auto r = render_package(package_job_object(0.7, ", volume: {persistentVolumeClaim: {claimName: models}}"));
  bool found = false;
  for (const auto& v : r.out.pods[1]["spec"]["volumes"]) {
    if (v["name"] != kPackageVolume) continue;
    found = true;
    EXPECT_EQ(v["persistentVolumeClaim"]["claimName"], "models");
    EXPECT_FALSE(v.contains("hostPath"));
  }
  EXPECT_TRUE(found);
}

TEST(RenderPackage, ExposureComesFromTheManifest) {
  // Shard 1 holds 600 of 1000 parameters by the manifest: above 0.5, within 0.7.
  EXPECT_NO_THROW(render_package(package_job_object(0.7)));
  try {
    render_package(package_job_object(0.5));
    ADD_FAILURE() << "rendered a stage above maxExposure";
  } catch (const ExposureRefusal& e) {
    EXPECT_NE(std::string(e.what()).find("stage 1 alone holds 0.6"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("600 of 1000"), std::string::npos) << e.what();
  }
  // Other parameter counts in the manifest: both shards 0.5, within it.
  EXPECT_NO_THROW(render_package(package_job_object(0.5), two_shard_manifest(300, 200, 200, 300)));
  const JobSpec job = job_from_json(package_job_object());
  const auto m = two_shard_manifest();
  EXPECT_EQ(stage_parameters(job, &m), (std::vector<int64_t>{400, 600}));
  EXPECT_THROW(stage_parameters(job, nullptr), model::PackageError);
}

TEST(RenderPackage, MissingManifestOrKeyIsRefusedNamingIt) {
  const json obj = package_job_object();
  const JobSpec job = job_from_json(obj);
  RenderInputs in = inputs_for(job, obj);
  try {
    render(job, in);
    ADD_FAILURE() << "rendered without a manifest";
  } catch (const RenderError& e) {
    EXPECT_NE(std::string(e.what()).find("spec.model.package"), std::string::npos) << e.what();
  }
  in.package_manifest = two_shard_manifest();
  in.package_keys = {package_key_of(0), "short"};
  try {
    render(job, in);
    ADD_FAILURE() << "rendered with a 5-byte key";
  } catch (const RenderError& e) {
    EXPECT_NE(std::string(e.what()).find("tuned-package-keys has a key shard-1.key of 5 bytes, want 32 for shard 1"),
              std::string::npos)
        << e.what();
  }
  in.package_keys = {package_key_of(0)};
  try {
    render(job, in);
    ADD_FAILURE() << "rendered without shard 1's key";
  } catch (const RenderError& e) {
    EXPECT_NE(std::string(e.what()).find("has no key shard-1.key for shard 1"), std::string::npos) << e.what();
  }
  // A manifest cut into another number of shards than the job's.
  auto three = two_shard_manifest();
  three.shards.push_back(three.shards.back());
  in.package_manifest = three;
  in.package_keys = {package_key_of(0), package_key_of(1)};
  try {
    render(job, in);
    ADD_FAILURE() << "rendered with a manifest of 3 shards for 2";
  } catch (const RenderError& e) {
    EXPECT_NE(std::string(e.what()).find("spec.sharding.shards: 2, but the packages"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace shardguard::op
