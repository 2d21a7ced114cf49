// render(job, inputs) → the Kubernetes objects the operator wants to exist for one
// ShardedTrainingJob (DESIGN.md §3–§8, issue 4 item 3). Pure and deterministic: no
// I/O, no clock, no randomness. Everything secret or random (the job CA, each shard's
// leaf certificate and key, each shard's 32-byte checkpoint and ledger keys) is made by the caller
// (the reconciler, later `shardctl render`/`run`) and passed in RenderInputs, so
// rendering the same inputs twice yields byte-identical JSON.
//
// Objects (names for job J; every object carries the labels shardguard.io/job=J,
// app.kubernetes.io/managed-by=shardguard-operator, per-shard objects also
// shardguard.io/shard=<i>, and one ownerReference to the job with controller=true
// and blockOwnerDeletion=true):
//   Secret    J-ca             CA cert + key (operator only; no pod mounts it)
//   Secret    J-shard-<i>      type kubernetes.io/tls: tls.crt, tls.key (shard i's leaf),
//                              ca.crt (CA cert only), checkpoint.key (shard i's 32 bytes),
//                              ledger.key (the 32-byte HMAC key of its sidecar's exposure ledger),
//                              package.key (a package job: shard i's package key, no other's)
//   ConfigMap J-shard-<i>      policy.json (sidecar::pipeline_policy of stage i) and
//                              job.json (the ShardedTrainingJob that shardd --job reads)
//   Service   J                headless (clusterIP None), publishNotReadyAddresses,
//                              port 7443 "mtls", selects shardguard.io/job=J
//   Pod       J-shard-<i>      hostname J-shard-<i>, subdomain J; containers shardd and
//                              sidecar (each mounting its own subPath of the checkpoint
//                              volume); restricted securityContext; required pod
//                              anti-affinity on spec.protection.topologyKey against all
//                              pods of the job
//
// With data-parallel replicas (spec.sharding.replicas R > 1) each replica r of stage i
// is its own pipeline member with its own identity: Secret, ConfigMap and Pod
// J-shard-<i>-r<r> (label shardguard.io/replica=<r>), leaf
// spiffe://<td>/ns/<ns>/job/J/shard/<i>/replica/<r>, policy and sidecar peers naming
// replica r of stages i±1 only, shardd --replica r --replica-store (replica 0 of stage
// i's DNS name, kReplicaStorePort) --replica-host (the pod's own IP, for Gloo). The
// anti-affinity is against the pods of the *other* stages only: the replicas of a
// stage may share a node, two stages never do. The checkpoint key is the stage's
// (every replica reads replica 0's checkpoints); the ledger file is the replica's own.
// The per-replica vectors are indexed by slot r·n + i (slot_of), so replica 0's
// objects are slots 0..n-1, the shard indices of a job without replicas.
//
// plan() (reconcile.h) decides when to render and what to write; see docs/operator.md.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/package.h"
#include "shardguard/policy/policy.h"

namespace shardguard::op {

inline constexpr const char* kJobApiVersion = "shardguard.io/v1alpha1";
inline constexpr const char* kJobKind = "ShardedTrainingJob";
inline constexpr const char* kLabelJob = "shardguard.io/job";
inline constexpr const char* kLabelShard = "shardguard.io/shard";
// On the objects of replica r of a job with spec.sharding.replicas > 1: "<r>".
inline constexpr const char* kLabelReplica = "shardguard.io/replica";
inline constexpr const char* kLabelManagedBy = "app.kubernetes.io/managed-by";
inline constexpr const char* kManagedBy = "shardguard-operator";
// On the pod of a trusted stage (spec.protection.trustedStages): "true".
inline constexpr const char* kLabelTrusted = "shardguard.io/trusted";
// On a shard pod: the comma-separated nodes its node affinity keeps it off.
inline constexpr const char* kAnnotationAvoidNodes = "shardguard.io/avoid-nodes";

// Ports (DESIGN.md §7).
inline constexpr int kShardGrpcPort = 7000;      // shardd, loopback
inline constexpr int kSidecarOutboundPort = 7001;  // sidecar, loopback
inline constexpr int kSidecarInboundPort = 7443;   // sidecar, mTLS, pod IP
inline constexpr int kShardMetricsPort = 9100;
inline constexpr int kSidecarMetricsPort = 9101;
// Replicas: the store of a stage's replica group (common/kv_store.h). Replica 0's
// shardd serves it on 127.0.0.1:kReplicaStorePort only, and every replica reaches it
// there: replica 0 directly, the others through their sidecar's store tunnel. Gloo's
// connections go through the sidecars' Gloo tunnels at
// gloo_tunnel_host(q):kGlooTunnelPort (common/replica_tunnel.h).
inline constexpr int kReplicaStorePort = 7100;
// The emptyDir where shardd publishes its Gloo listeners for its sidecar's
// --tunnel-map (shardd writes, the sidecar reads).
inline constexpr const char* kTunnelVolume = "tunnel";
inline constexpr const char* kTunnelDir = "/run/shardguard/tunnel";
inline constexpr const char* kGlooMapFileName = "gloo.map";

// Paths inside the shard pod.
inline constexpr const char* kTlsDir = "/etc/shardguard/tls";          // sidecar: tls.crt, tls.key, ca.crt, ledger.key
inline constexpr const char* kKeyDir = "/etc/shardguard/key";          // shardd: checkpoint.key
inline constexpr const char* kConfigDir = "/etc/shardguard/config";    // policy.json, job.json
// The checkpoint volume holds two disjoint directories, each mounted (subPath) in
// one container only: shardd's checkpoints in kCheckpointSubPath at kCheckpointDir,
// the sidecar's exposure ledger in kLedgerSubPath at kLedgerDir. The ledger so lasts
// as long as the checkpoints whose bytes it counts, while shardd can neither delete
// it nor put an older copy back. The kubelet creates a missing subPath directory
// with the mode of the volume's root (group-writable under the pod's fsGroup, or
// 0777 for an emptyDir). File names carry the job and the shard (a volume may be
// shared by the job's pods, or by several jobs).
inline constexpr const char* kCheckpointDir = "/var/lib/shardguard/checkpoint";
inline constexpr const char* kCheckpointSubPath = "checkpoints";
inline constexpr const char* kLedgerDir = "/var/lib/shardguard/ledger";
inline constexpr const char* kLedgerSubPath = "ledger";
std::string ledger_file(const std::string& job, int shard);  // kLedgerDir + "/<job>-shard-<i>.ledger.json"
// The sidecar's own volume (an emptyDir that shardd does not mount): its hash-chained
// audit log, which it also writes to stdout for the cluster's log pipeline.
inline constexpr const char* kSidecarStateVolume = "sidecar-state";
inline constexpr const char* kSidecarStateDir = "/var/lib/shardguard/sidecar";
inline constexpr const char* kAuditFileName = "audit.jsonl";
// A package job (spec.model.package): with a path, the package volume, mounted
// read-only into shardd only at spec.model.package.path (with a url, no volume:
// shardd fetches its own package); and shard i's package key and the manifest (the
// Secret's items package.key and manifest.json) in kPackageKeyDir, also shardd's only.
inline constexpr const char* kPackageVolume = "package";
inline constexpr const char* kPackageKeyDir = "/etc/shardguard/package-key";
inline constexpr const char* kPackageKeyItem = "package.key";
// ... and beside it the manifest (of keysSecret) that shardd checks its package
// against: never the one next to the packages, which is storage's.
inline constexpr const char* kPackageManifestItem = "manifest.json";

// What shard i gets; made by the caller.
struct ShardMaterial {
  std::string cert_pem;        // leaf for spiffe://<td>/ns/<ns>/job/<job>/shard/<i>
  std::string key_pem;         // its private key
  std::string checkpoint_key;  // exactly 32 raw bytes
  // Exactly 32 raw bytes: HMAC key of the sidecar's exposure ledger. Like the
  // checkpoint key it is never replaced, or the ledger it sealed no longer verifies
  // and the sidecar refuses to start.
  std::string ledger_key;
};

// The images a job gets when it names none: the operator's --shardd-image and
// --sidecar-image defaults and `shardctl render`'s. tests/images checks that they are
// the chart's values.yaml repositories with its appVersion.
inline constexpr const char* kDefaultShardImage = "ghcr.io/shardguard/shardd:0.1.0";
inline constexpr const char* kDefaultSidecarImage = "ghcr.io/shardguard/shard-sidecar:0.1.0";

struct RenderInputs {
  // metadata.uid of the ShardedTrainingJob, for the ownerReferences. The namespace
  // and the job name come from JobSpec (namespace_, name), which the caller decoded
  // from the same object, so they cannot disagree.
  std::string uid;
  std::string ca_cert_pem;
  std::string ca_key_pem;
  // Exactly shards × replicas entries, index = slot (slot_of): each replica its own
  // leaf (spiffe_id_of) and ledger key; the replicas of a stage share replica 0's
  // checkpoint key (RenderError otherwise).
  std::vector<ShardMaterial> shards;
  // The ShardedTrainingJob object as read (at least "spec"); job.json in each
  // ConfigMap is {apiVersion, kind, metadata: {name, namespace}, spec} of it.
  nlohmann::json job_object = nlohmann::json::object();
  // Images; empty = spec.template.image / spec.sidecar.image. Callers pass the
  // defaults below when the spec names none.
  std::string shardd_image;
  std::string sidecar_image;
  // Byte budget of each export principal of spec.protection.export (the spec has no
  // per-principal budget yet; 0 = nothing may actually be exported).
  int64_t export_budget_bytes = 0;
  std::string cluster_domain = "cluster.local";
  int64_t run_as_user = 65532;  // non-root uid/gid/fsGroup of both containers
  // Per shard index (may be shorter than the shard count): nodes the pod must not be
  // scheduled on, because its shard there would push that node's exposure (with what
  // it held before, DESIGN.md §5) above maxExposure. Rendered as a required node
  // affinity term `matchFields metadata.name NotIn [...]` and the annotation
  // kAnnotationAvoidNodes.
  std::vector<std::vector<std::string>> avoid_nodes;
  // Per slot (may be shorter than the slot count): the highest exposure
  // ledger sequence the operator has seen that pod's sidecar publish
  // (status.shards[i].ledgerSequence, or its replicas[r] entry). Above 0 it is rendered as the sidecar's
  // `--ledger-min-sequence`, so that a pod created later refuses exports from an
  // older copy of the ledger, or from none. Negative: RenderError.
  std::vector<int64_t> ledger_min_sequence;
  // A package job (architecture torchscript): the manifest of its packages and each
  // shard's 32-byte package key, index = shard, as read from
  // spec.model.package.keysSecret (manifest.json, shard-<i>.key). Key i goes into
  // shard i's Secret only; the cut and the exposure come from the manifest. Missing
  // or of another size: RenderError naming the shard.
  std::optional<model::PackageManifest> package_manifest;
  std::vector<std::string> package_keys;
};

struct DesiredObjects {
  nlohmann::json ca_secret;
  std::vector<nlohmann::json> shard_secrets;  // index = slot (= shard without replicas)
  std::vector<nlohmann::json> config_maps;    // index = slot
  nlohmann::json service;
  std::vector<nlohmann::json> pods;           // index = slot
  // Every object, in apply order: CA Secret, shard Secrets, ConfigMaps, Service, Pods.
  std::vector<nlohmann::json> all() const;
};

// A job render() refuses, or inputs that do not fit the job. what() names the field
// and the value (e.g. the stage whose parameter share exceeds maxExposure).
class RenderError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A refusal on exposure grounds (condition reason ExposureRefused): a stage whose
// parameter share alone exceeds maxExposure, or export principals too few to export
// every shard within it.
class ExposureRefusal : public RenderError {
 public:
  using RenderError::RenderError;
};

// An export principal of spec.protection.export and the shards it may export.
struct ExportAssignment {
  std::string principal;  // SPIFFE ID
  std::set<int> shards;   // consecutive stages
};

// Who may export what (docs/operator.md#export-principals). An export principal reads
// what it exports, so it is bound by maxExposure like every other principal: the
// untrusted stages are cut into the fewest consecutive runs whose exposure each stays
// within maxExposure (model::runs_within; trusted stages are never exported), and
// principal k, in the order the spec lists them, may export run k mod R. Empty when
// export is not allowed or every stage is trusted. Throws ExposureRefusal when
// there are fewer principals than runs (some shard could never be exported), naming
// how many the job needs. stage_params: stage_parameters(job).
std::vector<ExportAssignment> assign_export_principals(const JobSpec& job, const std::vector<int64_t>& stage_params);

// "0-1", "2", "0,2-3"; "none" for no shards.
std::string shards_text(const std::set<int>& shards);

// The export section of shard `shard`'s policy: allowed as in the spec, and the
// principals assigned that shard, each with budget_bytes.
policy::ExportRules export_rules(const JobSpec& job, const std::vector<ExportAssignment>& assignments, int shard,
                                 int64_t budget_bytes);

// The spec is assumed valid (job_from_json validated it). Refuses, with RenderError:
// - with ExposureRefusal, a largest untrusted stage (model::partition with
//   spec.sharding.balance) whose parameter share alone exceeds maxExposure, and export
//   principals too few for the job (assign_export_principals);
// - inputs that do not match the job (shard count, checkpoint key size, empty uid,
//   certificate or image, no spec in job_object), and names longer than a DNS label.
DesiredObjects render(const JobSpec& job, const RenderInputs& in);

// Names, shared with the reconciler and shardctl.
std::string ca_secret_name(const JobSpec& job);
std::string shard_name(const JobSpec& job, int index);  // Secret, ConfigMap and Pod (replicas 1)
// Replicas: spec.sharding.replicas (at least 1); replica r of stage i is slot r·n + i.
int replica_count(const JobSpec& job);
int slot_of(const JobSpec& job, int index, int replica);
// How messages name slot k: "shard 2", or "shard 2 replica 1" for a job with replicas.
std::string slot_label(const JobSpec& job, int slot);
// Secret, ConfigMap and Pod of replica r of stage i: shard_name(job, i) without
// replicas, "<job>-shard-<i>-r<r>" with.
std::string replica_name(const JobSpec& job, int index, int replica);
// The identity of replica r of stage i: spiffe_id_for_shard without replicas,
// spiffe_id_for_replica with (DESIGN.md §3).
std::string spiffe_id_of(const JobSpec& job, int index, int replica);
// Its sidecar's ledger: ledger_file(job.name, i) without replicas, kLedgerDir +
// "/<job>-shard-<i>-r<r>.ledger.json" with (replicas may share a checkpoint volume).
std::string ledger_file(const JobSpec& job, int index, int replica);
std::string service_name(const JobSpec& job);
// <pod>.<service>.<namespace>.svc.<cluster domain>
std::string shard_dns_name(const JobSpec& job, int index, const std::string& cluster_domain);
std::string replica_dns_name(const JobSpec& job, int index, int replica, const std::string& cluster_domain);

// Standard base64 (with padding), for Secret data. base64_decode throws RenderError
// on a character outside the alphabet or a bad length.
std::string base64_encode(const std::string& bytes);
std::string base64_decode(const std::string& text);

}  // namespace shardguard::op
