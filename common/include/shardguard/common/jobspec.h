// ShardedTrainingJob: the typed spec shared by every binary, and the one place
// where it is parsed and validated. The operator decodes the API object (JSON)
// with job_from_json; shardctl and shardd read the same object from YAML with
// load_job_file. Both paths produce the same errors, naming the field by its
// path (`spec.sharding.shards`) and the offending value.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/decode.h"

namespace shardguard {

// Thrown when a job cannot be decoded or fails validation. what() lists every
// error, one per line; errors() gives them one by one (FieldError: decode.h).
class JobSpecError : public DecodeError {
 public:
  explicit JobSpecError(std::vector<FieldError> errors) : DecodeError("", std::move(errors)) {}
};

// spec.model.package: a TorchScript model split by `shardctl split` into sealed
// per-shard packages (docs/distribution.md).
struct PackageSpec {
  // Exactly one of path and url.
  // The directory with manifest.json and shard-<i>.sgpkg: in a shard pod, where
  // `volume` is mounted (or the node's directory when no volume is given); locally
  // (shardctl run, plan, render), a directory of this machine.
  std::string path;
  // An http:// or https:// prefix ending in '/': each shard's shardd fetches only
  // <url>shard-<i>.sgpkg and checks it against the manifest of its own Secret (the
  // server is untrusted storage; the manifest never comes from it).
  std::string url;
  nlohmann::json volume = nlohmann::json::object();  // persistentVolumeClaim | nfs, or empty (path only)
  // The Secret (in the job's namespace) with manifest.json and shard-<i>.key for every
  // shard; the operator copies key i only into shard i's own Secret.
  std::string keys_secret;
};

struct ModelSpec {
  std::string architecture;  // mlp | cnn | vit | gpt | torchscript (package)
  int hidden = 128;          // mlp width; cnn classifier width; vit/gpt embedding dim
  int depth = 3;             // mlp hidden layers; vit/gpt transformer blocks (cnn: unused)
  int channels = 32;         // cnn: channels of the first conv block (doubles per block)
  int heads = 4;             // vit/gpt: attention heads (hidden % heads == 0)
  int patch_size = 7;        // vit: patch side, divides 28
  int vocab = 256;           // gpt: token ids 0 .. vocab-1 (256: bytes)
  int context = 128;         // gpt: tokens per sequence
  std::optional<PackageSpec> package;  // architecture torchscript only
  // Set by the decoder: spec.dataset.format is tokens (a torchscript model is a
  // language model when it reads token windows).
  bool token_data = false;
  bool language_model() const { return architecture == "gpt" || (architecture == "torchscript" && token_data); }
  bool from_package() const { return architecture == "torchscript"; }
};

struct DatasetSpec {
  std::string name = "fashion-mnist";   // a label for logs and reports
  std::string format = "fashion-mnist"; // fashion-mnist (gzipped IDX) | tokens (uint16 LE files) | tensors (.npy)
  std::string path = "/usr/share/datasets/fashion-mnist";
  int64_t max_train_samples = 0;  // 0 = all; for quick runs and tests (tokens: windows per epoch)
  int64_t max_test_samples = 0;   // 0 = all (tokens: validation windows)
};

struct OptimizerSpec {
  std::string name = "adam";  // sgd | adam
  double learning_rate = 0.001;
  double momentum = 0.0;      // sgd only
  double weight_decay = 0.0;
  // The learning-rate schedule (learning_rate_at): a linear warm-up over the first
  // warmup_steps steps, then constant or a cosine decay to a tenth of learning_rate
  // at the job's last step.
  int64_t warmup_steps = 0;
  std::string decay = "constant";  // constant | cosine
};

// The learning rate of optimizer step `step` (0-based) of a job of `total_steps`
// steps: learning_rate × min(1, (step + 1) / warmup_steps), and with cosine decay,
// after the warm-up, × (0.1 + 0.9 × (1 + cos(π · p)) / 2), p = (step − warmup) /
// (total − warmup − 1), so the last step runs at a tenth of the peak. Every stage and replica computes the same value from
// the same step, so the pipeline equals the monolithic run.
double learning_rate_at(const OptimizerSpec& o, int64_t step, int64_t total_steps);

struct TrainingSpec {
  int epochs = 1;
  int batch_size = 128;
  int micro_batches = 4;       // batch_size % micro_batches == 0
  OptimizerSpec optimizer;
  uint64_t seed = 1;
  std::string schedule = "1f1b";  // 1f1b | gpipe
  int eval_batch_size = 1000;
};

struct ShardingSpec {
  int shards = 1;
  std::string balance = "parameters";  // parameters | compute
  // Data-parallel replicas of the whole pipeline (1-16): replica r of stage i talks only
  // to replica r of stages i±1; the replicas of a stage average their gradients after
  // every step, so the job trains like one pipeline with batch_size × replicas.
  int replicas = 1;
};

struct ExportSpec {
  bool allowed = false;
  std::vector<std::string> principals;
};

struct ProtectionSpec {
  double max_exposure = 1.0;  // (0, 1]
  std::string topology_key = "kubernetes.io/hostname";
  std::string trust_domain = "shardguard.local";
  ExportSpec export_;
  // Stages kept on the data owner's nodes (those matching trusted_node_selector): left
  // out of every untrusted principal's exposure (docs/operator.md#trusted-stages).
  std::set<int> trusted_stages;
  std::map<std::string, std::string> trusted_node_selector;
};

struct CheckpointSpec {
  int every_steps = 500;
  nlohmann::json volume = nlohmann::json::object();  // a Kubernetes volume source
};

struct RunPolicySpec {
  int backoff_limit = 3;
  std::optional<int64_t> active_deadline_seconds;
  std::optional<int64_t> ttl_seconds_after_finished;
  bool suspend = false;
};

struct JobSpec {
  std::string name;                    // metadata.name
  std::string namespace_ = "default";  // metadata.namespace
  ModelSpec model;
  DatasetSpec dataset;
  TrainingSpec training;
  ShardingSpec sharding;
  ProtectionSpec protection;
  CheckpointSpec checkpoint;
  nlohmann::json template_ = nlohmann::json::object();  // spec.template, kept as given
  nlohmann::json sidecar = nlohmann::json::object();    // spec.sidecar, kept as given
  RunPolicySpec run_policy;
};

// YAML text → JSON (mappings, sequences, scalars typed as YAML 1.2 core schema).
// Throws JobSpecError with path "<yaml>" and the line/column on a syntax error.
nlohmann::json yaml_to_json(const std::string& yaml_text);

// Decodes a whole ShardedTrainingJob object (apiVersion, kind, metadata, spec),
// applies defaults and validates; throws JobSpecError listing every problem.
JobSpec job_from_json(const nlohmann::json& object);

// What spec.model.package.url accepts: an http:// or https:// prefix ending in '/'
// (host name or IPv4 address, optional port, non-empty path segments; no user,
// query or fragment). The CRD's rule is the same language.
bool is_package_url(const std::string& url);

// Reads a YAML (or JSON) file and calls job_from_json. A missing file is an error
// naming the path.
JobSpec load_job_file(const std::string& path);

// Cross-field and range validation of an already decoded spec (job_from_json
// calls it). Empty when valid.
std::vector<FieldError> validate(const JobSpec& job);

}  // namespace shardguard
