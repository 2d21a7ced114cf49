#include "shardguard/operator/render.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include "shardguard/common/crypto.h"
#include "shardguard/common/replica_tunnel.h"
#include "shardguard/common/shard_files.h"
#include "shardguard/common/strings.h"
#include "shardguard/model/exposure.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/common/pki.h"
#include "shardguard/policy/policy.h"

namespace shardguard::op {

using nlohmann::json;

namespace {

json labels(const JobSpec& job, int shard) {
  json l = {{kLabelJob, job.name}, {kLabelManagedBy, kManagedBy}};
  if (shard >= 0) l[kLabelShard] = std::to_string(shard);
  return l;
}

json metadata(const JobSpec& job, const RenderInputs& in, const std::string& name, int shard) {
  return {{"name", name},
          {"namespace", job.namespace_},
          {"labels", labels(job, shard)},
          {"ownerReferences",
           json::array({{{"apiVersion", kJobApiVersion},
                         {"kind", kJobKind},
                         {"name", job.name},
                         {"uid", in.uid},
                         {"controller", true},
                         {"blockOwnerDeletion", true}}})}};
}

// A per-replica object's metadata: the shard label, and the replica label when the job
// has replicas.
json replica_metadata(const JobSpec& job, const RenderInputs& in, const std::string& name, int shard, int replica) {
  json m = metadata(job, in, name, shard);
  if (job.sharding.replicas > 1) m["labels"][kLabelReplica] = std::to_string(replica);
  return m;
}

// Largest stage's parameter share must fit maxExposure: with one shard per topology
// domain (the anti-affinity below), a domain holds exactly one stage and never both
// neighbours of another, so that share is the smallest exposure any placement gets.
// Returns each stage's parameters.
std::vector<int64_t> check_exposure(const JobSpec& job, const RenderInputs& in) {
  model::JobCut cut;
  try {
    cut = model::job_cut(job, in.package_manifest ? &*in.package_manifest : nullptr);
  } catch (const model::PartitionError& e) {
    throw RenderError(std::string("spec.sharding.shards: ") + e.what());
  } catch (const model::PackageError& e) {
    throw RenderError(e.what());
  }
  const auto& desc = cut.desc;
  const auto& stages = cut.stages;
  std::vector<int64_t> params;
  for (const auto& s : stages) {
    const double share = model::parameter_share(desc, s);
    // A trusted stage stays with the data owner: no untrusted principal holds it.
    if (share > job.protection.max_exposure && !job.protection.trusted_stages.count(s.index)) {
      throw ExposureRefusal("spec.protection.maxExposure: stage " + std::to_string(s.index) + " alone holds " +
                            format_ratio(share) + " of the model's parameters (" + std::to_string(s.parameters) +
                            " of " + std::to_string(desc.parameters()) + "), more than maxExposure " +
                            format_ratio(job.protection.max_exposure) +
                            "; use more shards, raise maxExposure or list the stage in trustedStages");
    }
    params.push_back(s.parameters);
  }
  return params;
}

void check_dns_label(const std::string& what, const std::string& name) {
  if (name.size() > 63) {
    throw RenderError(what + " \"" + name + "\" is " + std::to_string(name.size()) +
                      " characters, more than a DNS label's 63; use a shorter job name");
  }
}

std::string image_of(const std::string& override_image, const json& section, const char* path) {
  if (!override_image.empty()) return override_image;
  if (section.is_object() && section.contains("image") && section["image"].is_string() &&
      !section["image"].get<std::string>().empty()) {
    return section["image"].get<std::string>();
  }
  throw RenderError(std::string(path) + ": no image given (and none in the render inputs)");
}

json container_security_context() {
  return {{"runAsNonRoot", true},
          {"readOnlyRootFilesystem", true},
          {"allowPrivilegeEscalation", false},
          {"privileged", false},
          {"capabilities", {{"drop", json::array({"ALL"})}}},
          {"seccompProfile", {{"type", "RuntimeDefault"}}}};
}

}  // namespace

std::string ledger_file(const std::string& job, int shard) {
  return std::string(kLedgerDir) + "/" + ledger_file_name(job, shard);
}

namespace {

void check_data_size(const json& object) {
  constexpr std::size_t kMaxDataBytes = 1024 * 1024;
  std::size_t bytes = 0;
  const json data = object.value("data", json::object());
  for (const auto& [key, value] : data.items()) {
    bytes += key.size() + (value.is_string() ? value.get_ref<const std::string&>().size() : value.dump().size());
  }
  if (bytes > kMaxDataBytes) {
    throw RenderError(object.value("kind", "") + " " + object["metadata"].value("name", "") + ": data is " +
                      std::to_string(bytes) + " bytes, over the 1 MiB (" + std::to_string(kMaxDataBytes) +
                      " bytes) the API server accepts");
  }
}

std::string loopback(int port) { return "127.0.0.1:" + std::to_string(port); }
// Where a pod's sidecar tunnels Gloo to replica q of its stage.
std::string gloo_tunnel_address(int q) { return gloo_tunnel_host(q) + ":" + std::to_string(kGlooTunnelPort); }
std::string any_addr(int port) { return "0.0.0.0:" + std::to_string(port); }

json make_pod(const JobSpec& job, const RenderInputs& in, int i, int r, const std::string& shardd_image,
              const std::string& sidecar_image) {
  const int n = job.sharding.shards;
  const bool replicated = replica_count(job) > 1;
  const int slot = slot_of(job, i, r);
  const std::string name = replica_name(job, i, r);
  const json& tmpl = job.template_;
  json shardd_args = json::array({"--job", std::string(kConfigDir) + "/job.json", "--stage", std::to_string(i),
                                  "--listen", loopback(kShardGrpcPort)});
  if (i > 0) shardd_args.insert(shardd_args.end(), {"--prev", loopback(kSidecarOutboundPort)});
  if (i < n - 1) shardd_args.insert(shardd_args.end(), {"--next", loopback(kSidecarOutboundPort)});
  shardd_args.insert(shardd_args.end(), {"--checkpoint-dir", kCheckpointDir, "--key-file",
                                         std::string(kKeyDir) + "/checkpoint.key", "--metrics",
                                         any_addr(kShardMetricsPort)});
  const std::string gloo_map = std::string(kTunnelDir) + "/" + kGlooMapFileName;
  if (replicated) {
    // The stage's replica group, entirely through the sidecars: the store at
    // 127.0.0.1:7100 (replica 0's own, the others' store tunnel to it), and a Gloo
    // tunnel to every other replica of the stage (docs/pipeline.md#the-replica-tunnels).
    shardd_args.insert(shardd_args.end(),
                       {"--replica", std::to_string(r), "--replica-store", loopback(kReplicaStorePort),
                        "--replica-tunnel-map", gloo_map});
    for (int q = 0; q < replica_count(job); ++q) {
      if (q == r) continue;
      shardd_args.insert(shardd_args.end(), {"--replica-tunnel", spiffe_id_of(job, i, q) + "=" + gloo_tunnel_address(q)});
    }
  }

  json shardd = {{"name", "shardd"},
                 {"image", shardd_image},
                 {"args", shardd_args},
                 {"ports", json::array({{{"name", "metrics"}, {"containerPort", kShardMetricsPort},
                                         {"protocol", "TCP"}}})},
                 {"securityContext", container_security_context()},
                 {"volumeMounts", json::array({
                                      {{"name", "checkpoint-key"}, {"mountPath", kKeyDir}, {"readOnly", true}},
                                      {{"name", "config"}, {"mountPath", kConfigDir}, {"readOnly", true}},
                                      {{"name", "checkpoint"}, {"mountPath", kCheckpointDir},
                                       {"subPath", kCheckpointSubPath}},
                                      {{"name", "tmp"}, {"mountPath", "/tmp"}},
                                  })}};
  if (replicated) shardd["volumeMounts"].push_back({{"name", kTunnelVolume}, {"mountPath", kTunnelDir}});
  if (job.model.from_package()) {
    // Its own package only: shardd opens shard-<i>.sgpkg with this key, and the key
    // opens nothing else.
    // The manifest it checks the package against is its own Secret's copy of keysSecret's.
    const PackageSpec& pk = *job.model.package;
    shardd["args"].insert(shardd["args"].end(),
                          {"--package", pk.url.empty() ? pk.path : pk.url, "--package-manifest",
                           std::string(kPackageKeyDir) + "/" + kPackageManifestItem, "--package-key-file",
                           std::string(kPackageKeyDir) + "/" + kPackageKeyItem});
    shardd["volumeMounts"].push_back({{"name", "package-key"}, {"mountPath", kPackageKeyDir}, {"readOnly", true}});
    if (pk.url.empty()) {
      shardd["volumeMounts"].push_back({{"name", kPackageVolume}, {"mountPath", pk.path}, {"readOnly", true}});
    }
    // A refused package's reason in the pod's status (the last lines of shardd's log).
    shardd["terminationMessagePolicy"] = "FallbackToLogsOnError";
  }
  if (tmpl.is_object() && tmpl.contains("resources") && tmpl["resources"].is_object()) {
    shardd["resources"] = tmpl["resources"];  // GPU limits and requests as given
  }
  if (tmpl.is_object() && tmpl.contains("imagePullPolicy")) shardd["imagePullPolicy"] = tmpl["imagePullPolicy"];

  json sidecar_args = json::array({"--inbound", any_addr(kSidecarInboundPort), "--outbound",
                                   loopback(kSidecarOutboundPort), "--upstream", loopback(kShardGrpcPort),
                                   "--cert", std::string(kTlsDir) + "/tls.crt", "--key",
                                   std::string(kTlsDir) + "/tls.key", "--ca", std::string(kTlsDir) + "/ca.crt",
                                   "--policy", std::string(kConfigDir) + "/policy.json", "--ledger",
                                   ledger_file(job, i, r), "--ledger-key", std::string(kTlsDir) + "/ledger.key",
                                   "--audit-log", std::string(kSidecarStateDir) + "/" + kAuditFileName,
                                   "--audit-stdout"});
  if (slot < static_cast<int>(in.ledger_min_sequence.size()) && in.ledger_min_sequence[slot] > 0) {
    sidecar_args.insert(sidecar_args.end(),
                        {"--ledger-min-sequence", std::to_string(in.ledger_min_sequence[slot])});
  }
  // Replica r's neighbours are replica r of stages i±1: each replica its own pipeline.
  for (int p : {i - 1, i + 1}) {
    if (p < 0 || p >= n) continue;
    sidecar_args.push_back("--peer");
    sidecar_args.push_back(spiffe_id_of(job, p, r) + "=" + replica_dns_name(job, p, r, in.cluster_domain) + ":" +
                           std::to_string(kSidecarInboundPort));
  }
  if (replicated) {
    // The replica tunnels: out, a Gloo tunnel per other replica of the stage (and the
    // store tunnel to replica 0); in, the store (replica 0) and the Gloo listeners
    // shardd publishes in the map. The policy allows them between replicas of this
    // stage only.
    for (int q = 0; q < r; ++q) {  // Gloo's greater replica connects: tunnels to the lesser ones
      const std::string id = spiffe_id_of(job, i, q);
      sidecar_args.insert(sidecar_args.end(),
                          {"--peer", id + "=" + replica_dns_name(job, i, q, in.cluster_domain) + ":" +
                                         std::to_string(kSidecarInboundPort),
                           "--tunnel", "gloo@" + gloo_tunnel_address(q) + "=" + id});
    }
    if (r == 0) {
      sidecar_args.insert(sidecar_args.end(), {"--tunnel-store", loopback(kReplicaStorePort)});
    } else {
      sidecar_args.insert(sidecar_args.end(),
                          {"--tunnel", "store@" + loopback(kReplicaStorePort) + "=" + spiffe_id_of(job, i, 0)});
    }
    sidecar_args.insert(sidecar_args.end(), {"--tunnel-map", gloo_map});
  }
  sidecar_args.insert(sidecar_args.end(), {"--metrics", any_addr(kSidecarMetricsPort)});

  json sidecar = {{"name", "sidecar"},
                  {"image", sidecar_image},
                  {"args", sidecar_args},
                  {"ports", json::array({{{"name", "mtls"}, {"containerPort", kSidecarInboundPort},
                                          {"protocol", "TCP"}},
                                         {{"name", "sidecar-metrics"}, {"containerPort", kSidecarMetricsPort},
                                          {"protocol", "TCP"}}})},
                  {"securityContext", container_security_context()},
                  {"volumeMounts", json::array({
                                       {{"name", "tls"}, {"mountPath", kTlsDir}, {"readOnly", true}},
                                       {{"name", "config"}, {"mountPath", kConfigDir}, {"readOnly", true}},
                                       {{"name", "checkpoint"}, {"mountPath", kLedgerDir},
                                        {"subPath", kLedgerSubPath}},
                                       {{"name", kSidecarStateVolume}, {"mountPath", kSidecarStateDir}},
                                       {{"name", "tmp"}, {"mountPath", "/tmp"}},
                                   })}};
  if (replicated) {
    sidecar["volumeMounts"].push_back({{"name", kTunnelVolume}, {"mountPath", kTunnelDir}, {"readOnly", true}});
  }
  if (job.sidecar.is_object() && job.sidecar.contains("resources") && job.sidecar["resources"].is_object()) {
    sidecar["resources"] = job.sidecar["resources"];
  }

  // One Secret, two projections: the sidecar sees the TLS files, shardd only the
  // checkpoint key.
  json checkpoint_volume = {{"name", "checkpoint"}};
  if (job.checkpoint.volume.is_object() && !job.checkpoint.volume.empty()) {
    for (const auto& [k, v] : job.checkpoint.volume.items()) {
      if (k != "name") checkpoint_volume[k] = v;
    }
  } else {
    checkpoint_volume["emptyDir"] = json::object();
  }
  json volumes = json::array({
      {{"name", "tls"},
       {"secret", {{"secretName", name}, {"defaultMode", 0440},
                   {"items", json::array({{{"key", "tls.crt"}, {"path", "tls.crt"}},
                                          {{"key", "tls.key"}, {"path", "tls.key"}},
                                          {{"key", "ca.crt"}, {"path", "ca.crt"}},
                                          {{"key", "ledger.key"}, {"path", "ledger.key"}}})}}}},
      {{"name", "checkpoint-key"},
       {"secret", {{"secretName", name}, {"defaultMode", 0440},
                   {"items", json::array({{{"key", "checkpoint.key"}, {"path", "checkpoint.key"}}})}}}},
      {{"name", "config"}, {"configMap", {{"name", name}}}},
      {{"name", "tmp"}, {"emptyDir", json::object()}},
      {{"name", kSidecarStateVolume}, {"emptyDir", json::object()}},
      checkpoint_volume,
  });
  if (replicated) volumes.push_back({{"name", kTunnelVolume}, {"emptyDir", json::object()}});

  if (job.model.from_package()) {
    volumes.push_back({{"name", "package-key"},
                       {"secret", {{"secretName", name}, {"defaultMode", 0440},
                                   {"items", json::array({{{"key", kPackageKeyItem}, {"path", kPackageKeyItem}},
                                                          {{"key", kPackageManifestItem}, {"path", kPackageManifestItem}}})}}}});
    if (job.model.package->url.empty()) {
      json package_volume = {{"name", kPackageVolume}};
      const json& v = job.model.package->volume;
      if (v.is_object() && !v.empty()) {
        for (const auto& [k, source] : v.items()) package_volume[k] = source;
      } else {
        // No volume: the node's own directory (a node the packages were copied to).
        package_volume["hostPath"] = {{"path", job.model.package->path}, {"type", "Directory"}};
      }
      volumes.push_back(package_volume);
    }
  }
  json selector = {{"matchLabels", {{kLabelJob, job.name}}}};
  if (replicated) {
    // Per stage: off every node of another stage of the job (so never two stages, nor
    // both neighbours of one, on a node); the replicas of this stage may share one.
    selector["matchExpressions"] =
        json::array({{{"key", kLabelShard}, {"operator", "NotIn"}, {"values", json::array({std::to_string(i)})}}});
  }
  json spec = {
      {"hostname", name},
      {"subdomain", service_name(job)},
      {"restartPolicy", "Never"},  // the operator recreates failed shards (runPolicy.backoffLimit)
      {"automountServiceAccountToken", false},
      {"enableServiceLinks", false},
      {"securityContext",
       {{"runAsNonRoot", true},
        {"runAsUser", in.run_as_user},
        {"runAsGroup", in.run_as_user},
        {"fsGroup", in.run_as_user},
        {"seccompProfile", {{"type", "RuntimeDefault"}}}}},
      {"affinity",
       {{"podAntiAffinity",
         {{"requiredDuringSchedulingIgnoredDuringExecution",
           json::array({{{"labelSelector", selector}, {"topologyKey", job.protection.topology_key}}})}}}}},
      {"containers", json::array({shardd, sidecar})},
      {"volumes", volumes},
  };
  json pod_meta = replica_metadata(job, in, name, i, r);
  if (i < static_cast<int>(in.avoid_nodes.size()) && !in.avoid_nodes[i].empty()) {
    // By node name (matchFields metadata.name), not by the hostname label, which can
    // differ from it: the history records spec.nodeName.
    spec["affinity"]["nodeAffinity"] = {
        {"requiredDuringSchedulingIgnoredDuringExecution",
         {{"nodeSelectorTerms",
           json::array({{{"matchFields", json::array({{{"key", "metadata.name"},
                                                        {"operator", "NotIn"},
                                                        {"values", in.avoid_nodes[i]}}})}}})}}}};
    // The same list, readable from the trimmed pod the operator caches: a pod still
    // waiting for a node whose list is out of date is replaced (reconcile.cpp).
    pod_meta["annotations"][kAnnotationAvoidNodes] = join(in.avoid_nodes[i], ",");
  }
  if (tmpl.is_object() && tmpl.contains("nodeSelector") && tmpl["nodeSelector"].is_object() &&
      !tmpl["nodeSelector"].empty()) {
    spec["nodeSelector"] = tmpl["nodeSelector"];
  }
  if (job.protection.trusted_stages.count(i)) {
    // Only the data owner's nodes (the decoder refused a selector that contradicts the
    // template's).
    for (const auto& [key, value] : job.protection.trusted_node_selector) spec["nodeSelector"][key] = value;
    pod_meta["labels"][kLabelTrusted] = "true";
  }
  if (tmpl.is_object() && tmpl.contains("tolerations") && tmpl["tolerations"].is_array() &&
      !tmpl["tolerations"].empty()) {
    spec["tolerations"] = tmpl["tolerations"];
  }
  return {{"apiVersion", "v1"}, {"kind", "Pod"}, {"metadata", pod_meta}, {"spec", spec}};
}

}  // namespace

std::string ca_secret_name(const JobSpec& job) { return job.name + "-ca"; }
std::string shard_name(const JobSpec& job, int index) { return job.name + "-shard-" + std::to_string(index); }
int replica_count(const JobSpec& job) { return std::max(1, job.sharding.replicas); }
int slot_of(const JobSpec& job, int index, int replica) { return replica * job.sharding.shards + index; }
std::string slot_label(const JobSpec& job, int slot) {
  const int n = job.sharding.shards;
  return "shard " + std::to_string(slot % n) + (replica_count(job) > 1 ? " replica " + std::to_string(slot / n) : "");
}
std::string replica_name(const JobSpec& job, int index, int replica) {
  return replica_count(job) > 1 ? shard_name(job, index) + "-r" + std::to_string(replica) : shard_name(job, index);
}
std::string spiffe_id_of(const JobSpec& job, int index, int replica) {
  const auto& td = job.protection.trust_domain;
  return replica_count(job) > 1
             ? spiffe_id_for_replica(td, job.namespace_, job.name, static_cast<uint32_t>(index),
                                     static_cast<uint32_t>(replica))
             : spiffe_id_for_shard(td, job.namespace_, job.name, static_cast<uint32_t>(index));
}
std::string ledger_file(const JobSpec& job, int index, int replica) {
  if (replica_count(job) == 1) return ledger_file(job.name, index);
  return std::string(kLedgerDir) + "/" + replica_name(job, index, replica) + ".ledger.json";
}
std::string replica_dns_name(const JobSpec& job, int index, int replica, const std::string& cluster_domain) {
  return replica_name(job, index, replica) + "." + service_name(job) + "." + job.namespace_ + ".svc." +
         cluster_domain;
}
std::string service_name(const JobSpec& job) { return job.name; }
std::string shard_dns_name(const JobSpec& job, int index, const std::string& cluster_domain) {
  return shard_name(job, index) + "." + service_name(job) + "." + job.namespace_ + ".svc." + cluster_domain;
}

std::string base64_encode(const std::string& bytes) { return shardguard::base64_encode(bytes); }

std::string base64_decode(const std::string& text) {
  std::string out, why;
  if (!shardguard::base64_decode(text, out, &why)) throw RenderError("base64: " + why);
  return out;
}

std::vector<json> DesiredObjects::all() const {
  std::vector<json> out;
  out.push_back(ca_secret);
  out.insert(out.end(), shard_secrets.begin(), shard_secrets.end());
  out.insert(out.end(), config_maps.begin(), config_maps.end());
  out.push_back(service);
  out.insert(out.end(), pods.begin(), pods.end());
  return out;
}

std::string shards_text(const std::set<int>& shards) {
  std::string out;
  for (auto it = shards.begin(); it != shards.end();) {
    const int first = *it;
    int last = first;
    for (++it; it != shards.end() && *it == last + 1; ++it) last = *it;
    out += (out.empty() ? "" : ",") + std::to_string(first) + (last == first ? "" : "-" + std::to_string(last));
  }
  return out.empty() ? "none" : out;
}

std::vector<ExportAssignment> assign_export_principals(const JobSpec& job, const std::vector<int64_t>& stage_params) {
  const auto& principals = job.protection.export_.principals;
  if (!job.protection.export_.allowed || principals.empty()) return {};
  const auto runs = model::runs_within(std::vector<double>(stage_params.begin(), stage_params.end()),
                                      job.protection.max_exposure, job.protection.trusted_stages);
  if (runs.empty()) return {};  // every stage is trusted: nothing may be exported
  if (principals.size() < runs.size()) {
    std::vector<std::string> listed;
    for (const auto& r : runs) listed.push_back(shards_text(r));
    throw ExposureRefusal("spec.protection.export.principals: " + std::to_string(principals.size()) + " principal" +
                          (principals.size() == 1 ? "" : "s") + " cannot export all " +
                          std::to_string(stage_params.size() - job.protection.trusted_stages.size()) +
                          (job.protection.trusted_stages.empty() ? " shards" : " untrusted shards") +
                          " within maxExposure " +
                          format_ratio(job.protection.max_exposure) + ": that takes " + std::to_string(runs.size()) +
                          ", one for each run of shards (" + join(listed, ", ") + "); list more principals or raise maxExposure");
  }
  std::vector<ExportAssignment> out;
  for (size_t k = 0; k < principals.size(); ++k) out.push_back({principals[k], runs[k % runs.size()]});
  return out;
}

policy::ExportRules export_rules(const JobSpec& job, const std::vector<ExportAssignment>& assignments, int shard,
                                 int64_t budget_bytes) {
  policy::ExportRules rules;
  for (const auto& a : assignments) {
    if (a.shards.count(shard)) rules.principals.push_back({a.principal, budget_bytes});
  }
  // A policy allows export only with principals to allow it to.
  rules.allowed = job.protection.export_.allowed && !rules.principals.empty();
  return rules;
}

DesiredObjects render(const JobSpec& job, const RenderInputs& in) {
  const int n = job.sharding.shards;
  const int replicas = replica_count(job);
  const int slots = n * replicas;
  auto who = [&](int slot) { return slot_label(job, slot); };
  // Inputs first: a refusal must not depend on which check runs first.
  if (in.uid.empty()) throw RenderError("metadata.uid: empty; ownerReferences need the job's uid");
  if (in.ca_cert_pem.empty() || in.ca_key_pem.empty()) {
    throw RenderError("render inputs: the job CA certificate and key are required");
  }
  if (static_cast<int>(in.shards.size()) != slots) {
    throw RenderError("render inputs: " + std::to_string(in.shards.size()) +
                      " shard certificates/keys for spec.sharding.shards " + std::to_string(n) +
                      (replicas > 1 ? " × spec.sharding.replicas " + std::to_string(replicas) : std::string()));
  }
  for (int k = 0; k < slots; ++k) {
    const auto& s = in.shards[k];
    if (s.cert_pem.empty() || s.key_pem.empty()) {
      throw RenderError("render inputs: " + who(k) + " has no leaf certificate or key");
    }
    if (s.checkpoint_key.size() != 32) {
      throw RenderError("render inputs: " + who(k) + " checkpoint key is " +
                        std::to_string(s.checkpoint_key.size()) + " bytes, want 32");
    }
    if (s.ledger_key.size() != 32) {
      throw RenderError("render inputs: " + who(k) + " ledger key is " + std::to_string(s.ledger_key.size()) +
                        " bytes, want 32");
    }
    // One checkpoint per stage, replica 0's: every replica must be able to read it.
    if (k >= n && s.checkpoint_key != in.shards[k % n].checkpoint_key) {
      throw RenderError("render inputs: " + who(k) + " checkpoint key differs from replica 0's; the replicas of " +
                        "a stage resume from the same checkpoints");
    }
  }
  for (size_t k = 0; k < in.ledger_min_sequence.size(); ++k) {
    if (in.ledger_min_sequence[k] < 0) {
      throw RenderError("render inputs: " + who(static_cast<int>(k)) + " ledger minimum sequence " +
                        std::to_string(in.ledger_min_sequence[k]) + " is negative");
    }
  }
  if (!in.job_object.is_object() || !in.job_object.contains("spec") || !in.job_object["spec"].is_object()) {
    throw RenderError("render inputs: job_object has no spec (shardd --job reads it from job.json)");
  }
  const std::string shardd_image = image_of(in.shardd_image, job.template_, "spec.template.image");
  const std::string sidecar_image = image_of(in.sidecar_image, job.sidecar, "spec.sidecar.image");
  check_dns_label("pod hostname", replica_name(job, n - 1, replicas - 1));
  check_dns_label("service name", service_name(job));
  const std::vector<ExportAssignment> exporters = assign_export_principals(job, check_exposure(job, in));
  if (job.model.from_package()) {
    for (int i = 0; i < n; ++i) {
      const std::size_t size = i < static_cast<int>(in.package_keys.size()) ? in.package_keys[i].size() : 0;
      if (size != 32) {
        throw RenderError("spec.model.package.keysSecret: " + job.model.package->keys_secret + " has " +
                          (size == 0 ? std::string("no key ") + model::package_key_file_name(i)
                                     : "a key " + model::package_key_file_name(i) + " of " + std::to_string(size) +
                                           " bytes, want 32") +
                          " for shard " + std::to_string(i));
      }
    }
  }

  // The manifest as every shard's shardd reads it (the operator's reading of keysSecret's,
  // written again: the same fields, so the same digests; check_exposure needed it).
  const std::string manifest_text =
      job.model.from_package() && in.package_manifest ? model::to_json(*in.package_manifest).dump(2) : "";

  const json job_file = {{"apiVersion", kJobApiVersion},
                         {"kind", kJobKind},
                         {"metadata", {{"name", job.name}, {"namespace", job.namespace_}}},
                         {"spec", in.job_object["spec"]}};

  DesiredObjects out;
  out.ca_secret = {{"apiVersion", "v1"},
                   {"kind", "Secret"},
                   {"metadata", metadata(job, in, ca_secret_name(job), -1)},
                   {"type", "Opaque"},
                   {"immutable", true},
                   {"data", {{"ca.crt", base64_encode(in.ca_cert_pem)}, {"ca.key", base64_encode(in.ca_key_pem)}}}};

  for (int k = 0; k < slots; ++k) {
    const int i = k % n, r = k / n;
    const auto& s = in.shards[k];
    const std::string name = replica_name(job, i, r);
    out.shard_secrets.push_back({{"apiVersion", "v1"},
                                 {"kind", "Secret"},
                                 {"metadata", replica_metadata(job, in, name, i, r)},
                                 {"type", "kubernetes.io/tls"},
                                 {"data",
                                  {{"tls.crt", base64_encode(s.cert_pem)},
                                   {"tls.key", base64_encode(s.key_pem)},
                                   {"ca.crt", base64_encode(in.ca_cert_pem)},
                                   {"checkpoint.key", base64_encode(s.checkpoint_key)},
                                   {"ledger.key", base64_encode(s.ledger_key)}}}});
    // Shard i's package key, and no other shard's: its pod mounts only this Secret.
    if (job.model.from_package()) {
      out.shard_secrets.back()["data"][kPackageKeyItem] = base64_encode(in.package_keys[i]);
      out.shard_secrets.back()["data"][kPackageManifestItem] = base64_encode(manifest_text);
    }

    policy::Policy policy = [&] {
      try {
        return policy::pipeline_policy(job.protection.trust_domain, job.namespace_, job.name, i, n,
                                       export_rules(job, exporters, i, in.export_budget_bytes),
                                       replicas > 1 ? r : -1, replicas);
      } catch (const policy::PolicyError& e) {
        throw RenderError("policy of " + who(k) + ": " + e.what());
      }
    }();
    out.config_maps.push_back({{"apiVersion", "v1"},
                               {"kind", "ConfigMap"},
                               {"metadata", replica_metadata(job, in, name, i, r)},
                               {"data", {{"policy.json", policy::to_json(policy)},
                                         {"job.json", job_file.dump(2) + "\n"}}}});
  }

  out.service = {{"apiVersion", "v1"},
                 {"kind", "Service"},
                 {"metadata", metadata(job, in, service_name(job), -1)},
                 {"spec",
                  {{"clusterIP", "None"},
                   {"publishNotReadyAddresses", true},  // peers must resolve before shards are ready
                   {"selector", {{kLabelJob, job.name}, {kLabelManagedBy, kManagedBy}}},
                   {"ports", json::array({{{"name", "mtls"},
                                           {"port", kSidecarInboundPort},
                                           {"targetPort", "mtls"},
                                           {"protocol", "TCP"}}})}}}};

  for (int k = 0; k < slots; ++k) out.pods.push_back(make_pod(job, in, k % n, k / n, shardd_image, sidecar_image));
  // The API server refuses a ConfigMap or Secret whose data exceeds 1 MiB. The CRD's
  // bounds keep a job far below that; this names the object if they ever do not.
  for (const auto* list : {&out.config_maps, &out.shard_secrets}) {
    for (const json& o : *list) check_data_size(o);
  }
  check_data_size(out.ca_secret);
  return out;
}

}  // namespace shardguard::op
