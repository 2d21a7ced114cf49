// Invalid ShardedTrainingJobs against the real Kubernetes API server (fixture
// `realapi`) and against shardctl's decoder: every manifest below is refused by the
// server with the HTTP status and the message a user needs, and refused by
// load_job_file (and, where the binary is built, `shardctl plan` and `shardctl
// render`) naming the same field. The valid controls are accepted by both. A
// difference between the two sides means a job that one of `kubectl apply` and
// `shardctl run` takes and the other refuses.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <fstream>
#include <string>
#include <vector>

#include "shardguard/common/jobspec.h"
#include "support/realapi.h"
#include "support/rest.h"
#include "support/temp_dir.h"

namespace shardguard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testsupport::RealApi;

constexpr const char* kNs = "invalid-manifests";
constexpr const char* kJobs = "/apis/shardguard.io/v1alpha1/namespaces/invalid-manifests/shardedtrainingjobs";

// A whole manifest: `spec` lines under "spec:", `meta` inside metadata's braces,
// `top` as extra top-level lines.
std::string manifest(const std::string& name, const std::string& spec, const std::string& meta = "",
                     const std::string& top = "") {
  return "apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\nmetadata: {name: " + name +
         ", namespace: " + kNs + meta + "}\n" + top + (spec.empty() ? "" : "spec:\n" + spec);
}

const std::string kModel = "  model: {architecture: mlp}\n";

struct Case {
  std::string name;            // job name (metadata.name unless the case is about it)
  std::string yaml;            // the manifest
  int status;                  // what the API server answers a create with
  std::string server_field;    // the field the server's message names
  std::string server_text;     // and a fragment of what it says
  std::string decoder_field;   // the field load_job_file names (prefix match)
};

std::string repeat(char c, std::size_t n) { return std::string(n, c); }

std::vector<Case> invalid_cases() {
  std::vector<Case> c;
  auto spec = [&](const std::string& name, const std::string& lines, int status, const std::string& field,
                  const std::string& text, const std::string& dec = "") {
    c.push_back({name, manifest(name, lines), status, field, text, dec.empty() ? field : dec});
  };
  // ---- types ----
  spec("type-hidden", "  model: {architecture: mlp, hidden: \"128\"}\n", 422, "spec.model.hidden", "must be of type integer");
  spec("type-model", "  model: cnn\n", 422, "spec.model", "must be of type object");
  spec("type-depth", "  model: {architecture: mlp, depth: 1.5}\n", 422, "spec.model.depth", "must be of type integer");
  spec("type-suspend", kModel + "  runPolicy: {suspend: \"true\"}\n", 422, "spec.runPolicy.suspend", "must be of type boolean");
  spec("type-lr", kModel + "  training: {optimizer: {learningRate: fast}}\n", 422, "spec.training.optimizer.learningRate", "must be of type number");
  spec("type-principals", kModel + "  protection: {export: {allowed: true, principals: \"spiffe://td/a\"}}\n", 422,
       "spec.protection.export.principals", "must be of type array");
  spec("type-image", kModel + "  template: {image: 123}\n", 422, "spec.template.image", "must be of type string");
  spec("type-nodeselector", kModel + "  template: {nodeSelector: {disk: 1}}\n", 422, "spec.template.nodeSelector.disk", "must be of type string");
  spec("type-tolerations", kModel + "  template: {tolerations: {key: a}}\n", 400, "spec.template.tolerations", "unknown field");
  spec("type-limits", kModel + "  template: {resources: {limits: [1]}}\n", 422, "spec.template.resources.limits", "must be of type object");
  spec("type-volume", kModel + "  checkpoint: {volume: pvc}\n", 422, "spec.checkpoint.volume", "must be of type object");
  spec("type-sidecar", kModel + "  sidecar: shard-sidecar:1\n", 422, "spec.sidecar", "must be of type object");
  // ---- ranges (int32 / int64 included) ----
  spec("range-hidden-low", "  model: {architecture: mlp, hidden: 0}\n", 422, "spec.model.hidden", "greater than or equal to 1");
  spec("range-hidden-high", "  model: {architecture: mlp, hidden: 5000}\n", 422, "spec.model.hidden", "less than or equal to 4096");
  spec("range-epochs", kModel + "  training: {epochs: 0}\n", 422, "spec.training.epochs", "greater than or equal to 1");
  spec("range-batch", kModel + "  training: {batchSize: 65537}\n", 422, "spec.training.batchSize", "less than or equal to 65536");
  spec("range-shards-low", kModel + "  sharding: {shards: 0}\n", 422, "spec.sharding.shards", "greater than or equal to 1");
  spec("range-shards-high", kModel + "  sharding: {shards: 65}\n", 422, "spec.sharding.shards", "less than or equal to 64");
  spec("range-replicas-low", kModel + "  sharding: {replicas: 0}\n", 422, "spec.sharding.replicas", "greater than or equal to 1");
  spec("range-replicas-high", kModel + "  sharding: {replicas: 17}\n", 422, "spec.sharding.replicas", "less than or equal to 16");
  spec("type-replicas", kModel + "  sharding: {replicas: two}\n", 422, "spec.sharding.replicas", "must be of type integer");
  spec("range-exposure-zero", kModel + "  protection: {maxExposure: 0}\n", 422, "spec.protection.maxExposure", "greater than 0");
  spec("range-exposure-high", kModel + "  protection: {maxExposure: 1.5}\n", 422, "spec.protection.maxExposure", "less than or equal to 1");
  spec("range-lr", kModel + "  training: {optimizer: {learningRate: 0}}\n", 422, "spec.training.optimizer.learningRate", "greater than 0");
  spec("range-momentum", kModel + "  training: {optimizer: {name: sgd, momentum: 1}}\n", 422, "spec.training.optimizer.momentum", "less than 1");
  spec("range-decay", kModel + "  training: {optimizer: {weightDecay: -0.5}}\n", 422, "spec.training.optimizer.weightDecay", "greater than or equal to 0");
  spec("range-backoff", kModel + "  runPolicy: {backoffLimit: 101}\n", 422, "spec.runPolicy.backoffLimit", "less than or equal to 100");
  spec("range-deadline", kModel + "  runPolicy: {activeDeadlineSeconds: 0}\n", 422, "spec.runPolicy.activeDeadlineSeconds", "greater than or equal to 1");
  spec("range-samples", kModel + "  dataset: {maxTrainSamples: -1}\n", 422, "spec.dataset.maxTrainSamples", "greater than or equal to 0");
  spec("range-seed", kModel + "  training: {seed: -1}\n", 422, "spec.training.seed", "greater than or equal to 0");
  spec("range-int32", "  model: {architecture: mlp, heads: 2147483648}\n", 422, "spec.model.heads", "less than or equal to 2147483647");
  spec("range-int64", kModel + "  training: {seed: 9223372036854775808}\n", 422, "spec.training.seed", "must be of type int64");
  spec("range-every", kModel + "  checkpoint: {everySteps: 0}\n", 422, "spec.checkpoint.everySteps", "greater than or equal to 1");
  // ---- enums ----
  spec("enum-arch", "  model: {architecture: resnet}\n", 422, "spec.model.architecture", "Unsupported value: \"resnet\"");
  spec("enum-optimizer", kModel + "  training: {optimizer: {name: rmsprop}}\n", 422, "spec.training.optimizer.name", "Unsupported value: \"rmsprop\"");
  spec("enum-schedule", kModel + "  training: {schedule: zb}\n", 422, "spec.training.schedule", "Unsupported value: \"zb\"");
  spec("enum-balance", kModel + "  sharding: {balance: memory}\n", 422, "spec.sharding.balance", "Unsupported value: \"memory\"");
  spec("enum-dataset", kModel + "  dataset: {format: cifar10}\n", 422, "spec.dataset.format", "Unsupported value: \"cifar10\"");
  spec("enum-pull", kModel + "  template: {imagePullPolicy: Sometimes}\n", 422, "spec.template.imagePullPolicy", "Unsupported value: \"Sometimes\"");
  spec("enum-toleration", kModel + "  template: {tolerations: [{key: gpu, operator: Maybe}]}\n", 422,
       "spec.template.tolerations[0].operator", "Unsupported value: \"Maybe\"");
  spec("enum-medium", kModel + "  checkpoint: {volume: {emptyDir: {medium: Disk}}}\n", 422,
       "spec.checkpoint.volume.emptyDir.medium", "Unsupported value: \"Disk\"");
  // ---- names, labels and string syntax ----
  c.push_back({"name-long", manifest(repeat('a', 53), kModel), 422, "metadata.name", "at most 52 characters", "metadata.name"});
  c.push_back({"name-long-replicated", manifest(repeat('r', 49), kModel + "  sharding: {shards: 2, replicas: 2}\n"), 422,
               "metadata.name", "at most 48 characters when spec.sharding.replicas > 1", "metadata.name"});
  c.push_back({"name-dot", manifest("fmnist.v2", kModel), 422, "metadata.name", "DNS-1123 label", "metadata.name"});
  c.push_back({"label-value", manifest("label-value", kModel, ", labels: {team: 'ml platform'}"), 422, "metadata.labels",
               "a valid label must be", "metadata.labels.team"});
  c.push_back({"label-key", manifest("label-key", kModel, ", labels: {'-team': ml}"), 422, "metadata.labels",
               "name part must consist of", "metadata.labels.-team"});
  spec("trust-domain", kModel + "  protection: {trustDomain: Bad_Domain}\n", 422, "spec.protection.trustDomain", "should match");
  spec("topology-empty", kModel + "  protection: {topologyKey: \"\"}\n", 422, "spec.protection.topologyKey", "at least 1 chars long");
  spec("topology-syntax", kModel + "  protection: {topologyKey: \"zone name\"}\n", 422, "spec.protection.topologyKey", "should match");
  spec("principal-scheme", kModel + "  protection: {export: {allowed: true, principals: [\"https://td/x\"]}}\n", 422,
       "spec.protection.export.principals[0]", "should match");
  spec("principal-no-path", kModel + "  protection: {export: {allowed: true, principals: [\"spiffe://td\"]}}\n", 422,
       "spec.protection.export.principals[0]", "should match");
  spec("principal-duplicate", kModel + "  protection: {export: {allowed: true, principals: [\"spiffe://td/a\", \"spiffe://td/a\"]}}\n", 422,
       "spec.protection.export.principals[1]", "Duplicate value");
  {
    std::string many;
    for (int i = 0; i < 17; ++i) many += std::string(i ? ", " : "") + "\"spiffe://td/p" + std::to_string(i) + "\"";
    spec("principal-count", kModel + "  protection: {export: {allowed: true, principals: [" + many + "]}}\n", 422,
         "spec.protection.export.principals", "must have at most 16 items");
  }
  spec("long-path", kModel + "  dataset: {path: /" + repeat('d', 1024) + "}\n", 422, "spec.dataset.path", "may not be more than 1024 bytes");
  spec("long-image", kModel + "  template: {image: " + repeat('i', 513) + "}\n", 422, "spec.template.image", "may not be more than 512 bytes");
  spec("long-sidecar-image", kModel + "  sidecar: {image: " + repeat('s', 513) + "}\n", 422, "spec.sidecar.image", "may not be more than 512 bytes");
  spec("long-principal", kModel + "  protection: {export: {allowed: true, principals: [\"spiffe://td/" + repeat('p', 2040) + "\"]}}\n", 422,
       "spec.protection.export.principals[0]", "may not be more than 2048 bytes");
  spec("selector-key", kModel + "  template: {nodeSelector: {\"gpu type\": h200}}\n", 422, "spec.template.nodeSelector", "must be a label key",
       "spec.template.nodeSelector.gpu type");
  spec("selector-value", kModel + "  template: {nodeSelector: {gpu: \"h200 sxm\"}}\n", 422, "spec.template.nodeSelector.gpu", "should match");
  spec("quantity-syntax", kModel + "  template: {resources: {limits: {cpu: lots}}}\n", 422, "spec.template.resources.limits.cpu", "should match");
  spec("quantity-long", kModel + "  sidecar: {resources: {requests: {memory: \"" + repeat('1', 65) + "\"}}}\n", 422,
       "spec.sidecar.resources.requests.memory", "may not be more than 64 bytes");
  // ---- unknown fields (kubectl's default --validate=strict) ----
  spec("unknown-spec", kModel + "  epochs: 3\n", 400, "spec.epochs", "unknown field \"spec.epochs\"");
  spec("unknown-training", kModel + "  training: {lr: 0.1}\n", 400, "spec.training.lr", "unknown field \"spec.training.lr\"");
  spec("unknown-template", kModel + "  template: {env: [{name: A, value: b}]}\n", 400, "spec.template.env", "unknown field \"spec.template.env\"");
  spec("unknown-sidecar", kModel + "  sidecar: {command: [sh]}\n", 400, "spec.sidecar.command", "unknown field \"spec.sidecar.command\"");
  spec("unknown-volume", kModel + "  checkpoint: {volume: {hostPath: {path: /data}}}\n", 400, "spec.checkpoint.volume.hostPath",
       "unknown field \"spec.checkpoint.volume.hostPath\"");
  c.push_back({"unknown-top", manifest("unknown-top", kModel, "", "replicas: 2\n"), 400, "replicas", "unknown field \"replicas\"", "replicas"});
  // ---- cross-field rules (CEL) ----
  spec("micro-divides", kModel + "  training: {batchSize: 128, microBatches: 3}\n", 422, "spec.training.microBatches",
       "batchSize must be divisible by microBatches");
  spec("micro-at-most", kModel + "  training: {batchSize: 128, microBatches: 256}\n", 422, "spec.training.microBatches",
       "microBatches must be at most batchSize");
  spec("export-principals", kModel + "  protection: {export: {allowed: true}}\n", 422, "spec.protection.export.principals",
       "at least one SPIFFE ID");
  spec("vit-heads", "  model: {architecture: vit, heads: 0}\n", 422, "spec.model.heads", "heads must be at least 1");
  spec("vit-divides", "  model: {architecture: vit, hidden: 130, heads: 4}\n", 422, "spec.model.heads", "divisible by heads");
  spec("vit-patch", "  model: {architecture: vit, patchSize: 5}\n", 422, "spec.model.patchSize", "patchSize must divide");
  // gpt (issue 18): heads like vit, token data only, and no token data for a classifier.
  spec("gpt-divides", "  model: {architecture: gpt, hidden: 130, heads: 4}\n  dataset: {format: tokens}\n", 422,
       "spec.model.heads", "divisible by heads");
  spec("gpt-images", "  model: {architecture: gpt}\n", 422, "spec.dataset.format", "must be tokens for architecture gpt");
  spec("mlp-tokens", kModel + "  dataset: {format: tokens}\n", 422, "spec.dataset.format",
       "must be tokens for architecture gpt and fashion-mnist or tensors");
  spec("gpt-tensors", "  model: {architecture: gpt}\n  dataset: {format: tensors}\n", 422, "spec.dataset.format",
       "must be tokens for architecture gpt");
  spec("gpt-vocab", "  model: {architecture: gpt, vocab: 65537}\n  dataset: {format: tokens}\n", 422,
       "spec.model.vocab", "less than or equal to 65536");
  spec("volume-two", kModel + "  checkpoint: {volume: {emptyDir: {}, nfs: {server: nfs.local, path: /ckpt}}}\n", 422,
       "spec.checkpoint.volume", "must have at most 1 item");
  spec("volume-none", kModel + "  checkpoint: {volume: {}}\n", 422, "spec.checkpoint.volume", "should have at least 1 properties");
  // Paths given to the pods: absolute, without ".." (issue 16 item 4).
  spec("dataset-relative", kModel + "  dataset: {path: datasets/fashion-mnist}\n", 422, "spec.dataset.path",
       "must be an absolute path without \"..\" segments");
  spec("dataset-dotdot", kModel + "  dataset: {path: /usr/share/../../etc}\n", 422, "spec.dataset.path",
       "must be an absolute path without \"..\" segments");
  spec("nfs-dotdot", kModel + "  checkpoint: {volume: {nfs: {server: nfs.local, path: /exports/..}}}\n", 422,
       "spec.checkpoint.volume.nfs.path", "must be an absolute path without \"..\" segments");
  // Trusted stages (issue 19 item 3): stages of the job, with a node selector, both or neither.
  spec("trusted-out-of-range", kModel + "  sharding: {shards: 2}\n  protection: {trustedStages: [2], trustedNodeSelector: {owner: me}}\n",
       422, "spec.protection.trustedStages", "every trusted stage must be a stage of the job");
  spec("trusted-no-selector", kModel + "  sharding: {shards: 2}\n  protection: {trustedStages: [0]}\n", 422,
       "spec.protection.trustedNodeSelector", "must name at least one node label when trustedStages is set");
  spec("trusted-no-stages", kModel + "  protection: {trustedNodeSelector: {owner: me}}\n", 422,
       "spec.protection.trustedStages", "must list at least one stage when trustedNodeSelector is set");
  spec("trusted-duplicate", kModel + "  sharding: {shards: 2}\n  protection: {trustedStages: [0, 0], trustedNodeSelector: {owner: me}}\n",
       422, "spec.protection.trustedStages", "Duplicate value", "spec.protection.trustedStages[1]");
  spec("trusted-contradicts-template", kModel + "  sharding: {shards: 2}\n  template: {nodeSelector: {pool: gpu}}\n"
       "  protection: {trustedStages: [0], trustedNodeSelector: {pool: owner}}\n",
       422, "spec.protection.trustedNodeSelector", "must not contradict spec.template.nodeSelector",
       "spec.protection.trustedNodeSelector.pool");
  spec("trusted-bad-label", kModel + "  sharding: {shards: 2}\n  protection: {trustedStages: [0], trustedNodeSelector: {\"-x\": me}}\n",
       422, "spec.protection.trustedNodeSelector", "every key must be a label key");
  spec("pvc-claim", kModel + "  checkpoint: {volume: {persistentVolumeClaim: {readOnly: false}}}\n", 422,
       "spec.checkpoint.volume.persistentVolumeClaim.claimName", "Required value");
  // A TorchScript model from packages (issue 18 item 4): package and architecture
  // torchscript together, an absolute path, a Secret name, one volume source.
  spec("torchscript-no-package", "  model: {architecture: torchscript}\n", 422, "spec.model.package",
       "package is required for architecture torchscript");
  spec("package-on-zoo", "  model: {architecture: mlp, package: {path: /packages, keysSecret: keys}}\n", 422,
       "spec.model.package", "package is only for architecture torchscript");
  spec("package-relative", "  model: {architecture: torchscript, package: {path: packages, keysSecret: keys}}\n", 422,
       "spec.model.package.path", "must be an absolute path without \"..\" segments");
  spec("package-no-keys", "  model: {architecture: torchscript, package: {path: /packages}}\n", 422,
       "spec.model.package.keysSecret", "Required value");
  spec("package-keys-name", "  model: {architecture: torchscript, package: {path: /packages, keysSecret: Keys_1}}\n",
       422, "spec.model.package.keysSecret", "should match");
  spec("package-volume-two",
       "  model: {architecture: torchscript, package: {path: /packages, keysSecret: keys,\n"
       "           volume: {persistentVolumeClaim: {claimName: m}, nfs: {server: nfs.local, path: /models}}}}\n",
       422, "spec.model.package.volume", "must have at most 1 item");
  // A URL prefix instead of a path (exactly one of the two; a volume only with a path),
  // and URLs the rule refuses, each as the decoder's is_package_url does.
  spec("package-path-and-url",
       "  model: {architecture: torchscript, package: {path: /p, url: \"https://h/p/\", keysSecret: keys}}\n", 422,
       "spec.model.package", "must have exactly one of path and url");
  spec("package-neither", "  model: {architecture: torchscript, package: {keysSecret: keys}}\n", 422,
       "spec.model.package", "must have exactly one of path and url");
  spec("package-url-volume",
       "  model: {architecture: torchscript, package: {url: \"https://h/p/\", keysSecret: keys,\n"
       "           volume: {persistentVolumeClaim: {claimName: m}}}}\n",
       422, "spec.model.package.volume", "only with spec.model.package.path");
  // ---- required ----
  c.push_back({"no-spec", manifest("no-spec", ""), 422, "spec", "Required value", "spec"});
  spec("no-model", "  training: {epochs: 1}\n", 422, "spec.model", "Required value");
  spec("no-architecture", "  model: {hidden: 64}\n", 422, "spec.model.architecture", "Required value");
  return c;
}

// Valid variations: both sides accept them.
std::vector<std::pair<std::string, std::string>> valid_cases() {
  return {
      {"valid-minimal", manifest("valid-minimal", kModel)},
      {"valid-full",
       manifest("valid-full",
                "  model: {architecture: vit, hidden: 64, heads: 4, patchSize: 7, depth: 2}\n"
                "  dataset: {path: /data/fmnist, maxTrainSamples: 1000}\n"
                "  training: {epochs: 2, batchSize: 64, microBatches: 4, seed: 9223372036854775807,\n"
                "             optimizer: {name: sgd, learningRate: 10, momentum: 0.9}}\n"
                "  sharding: {shards: 4, balance: compute}\n"
                "  protection: {maxExposure: 1, topologyKey: topology.kubernetes.io/zone, trustDomain: ml.example.com,\n"
                "               export: {allowed: true, principals: [\"spiffe://ml.example.com/ns/ml/job/j/role/exporter\"]}}\n"
                "  checkpoint: {everySteps: 100, volume: {persistentVolumeClaim: {claimName: ckpt}}}\n"
                "  template:\n"
                "    image: registry.example.com/ml/shardd:0.1\n"
                "    imagePullPolicy: IfNotPresent\n"
                "    resources: {limits: {nvidia.com/gpu: 1, memory: 16Gi}, requests: {cpu: 500m}}\n"
                "    nodeSelector: {gpu.example.com/model: h200, kubernetes.io/os: linux}\n"
                "    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}, {operator: Exists}]\n"
                "  sidecar: {image: shard-sidecar:0.1, resources: {limits: {cpu: 1}}}\n"
                "  runPolicy: {backoffLimit: 0, activeDeadlineSeconds: 3600, ttlSecondsAfterFinished: 0, suspend: true}\n",
                ", labels: {team: ml, app.kubernetes.io/part-of: shardguard}, annotations: {note: \"any text at all\"}")},
      {"valid-gpt", manifest("valid-gpt", "  model: {architecture: gpt, hidden: 192, heads: 4, depth: 4, context: 128}\n"
                                           "  dataset: {name: fortunes, format: tokens, path: /data/fortunes}\n")},
      {"valid-nulls", manifest("valid-nulls", "  model: {architecture: cnn, hidden: null}\n  training: null\n  template: {image: null}\n")},
      {"valid-trusted", manifest("valid-trusted", "  model: {architecture: mlp}\n  sharding: {shards: 3}\n"
                                                  "  protection: {trustedStages: [0], trustedNodeSelector: {example.com/owner: data-team}}\n")},
      {"valid-emptydir", manifest("valid-emptydir", kModel + "  checkpoint: {volume: {emptyDir: {medium: Memory, sizeLimit: 1Gi}}}\n")},
      {"valid-torchscript",
       manifest("valid-torchscript",
                "  model:\n"
                "    architecture: torchscript\n"
                "    context: 128\n"
                "    package: {path: /packages/fortunes, keysSecret: fortunes-package-keys,\n"
                "              volume: {persistentVolumeClaim: {claimName: models, readOnly: true}}}\n"
                "  dataset: {name: fortunes, format: tokens, path: /data/fortunes}\n")},
      {"valid-url",
       manifest("valid-url",
                "  model:\n"
                "    architecture: torchscript\n"
                "    context: 128\n"
                "    package: {url: \"https://models.example.com:8443/fortunes/v1/\", keysSecret: fortunes-package-keys}\n"
                "  dataset: {name: fortunes, format: tokens, path: /data/fortunes}\n")},
      {"valid-url-odd",
       manifest("valid-url-odd",
                "  model:\n"
                "    architecture: torchscript\n"
                "    package: {url: \"http://127.0.0.1:8000/a~b_c-1/(x)/@v=2;k!$&'*+,:/m%20v1/\", keysSecret: k}\n")},
      {"valid-nfs", manifest("valid-nfs", kModel + "  checkpoint: {volume: {nfs: {server: 10.0.0.2, path: /exports/ckpt, readOnly: false}}}\n")},
  };
}

class RealApiValidation : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string why;
    auto api = RealApi::find(&why);
    if (!api) {
      setup_error_ = why;
      return;
    }
    api_ = *api;
    setup_error_ = api_.install_crd();
  }
  void SetUp() override {
    ASSERT_EQ(setup_error_, "") << setup_error_;
    tmp_ = std::make_unique<testsupport::TempDir>("shardguard-manifests");
    dir_ = tmp_->str();
  }
  void TearDown() override {
    if (tmp_ && HasFailure()) tmp_->keep();  // left for a look at what failed
  }

  // POST (dry run, strict field validation, as kubectl apply does by default).
  std::pair<int, std::string> server_create(const json& object) {
    const auto r = testsupport::RestClient(api_).post(std::string(kJobs) + "?dryRun=All&fieldValidation=Strict", object);
    if (r.code == 0) return {0, "no answer: " + r.error};
    return {r.code, r.message()};
  }

  std::string write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name + ".yaml";
    std::ofstream(path) << text;
    return path;
  }

  static std::string decoder_errors(const std::string& path) {
    try {
      load_job_file(path);
    } catch (const JobSpecError& e) {
      return e.what();
    }
    return "";
  }

  static RealApi api_;
  static std::string setup_error_;
  std::unique_ptr<testsupport::TempDir> tmp_;
  std::string dir_;
};

RealApi RealApiValidation::api_;
std::string RealApiValidation::setup_error_;

TEST_F(RealApiValidation, AtLeastFortyInvalidManifests) { EXPECT_GE(invalid_cases().size(), 40u); }

TEST_F(RealApiValidation, InvalidJobsAreRefusedByTheServerAndTheDecoder) {
  for (const Case& k : invalid_cases()) {
    SCOPED_TRACE(k.name);
    const std::string file = write(k.name, k.yaml);
    const json object = yaml_to_json(k.yaml);
    const auto [status, message] = server_create(object);
    EXPECT_EQ(status, k.status) << message;
    EXPECT_NE(message.find(k.server_field), std::string::npos) << "server message does not name " << k.server_field << ": " << message;
    EXPECT_NE(message.find(k.server_text), std::string::npos) << "server message: " << message;
    // Our rules name their field: no "<nil>" where one of our rules failed.
    if (message.find("some validation rules were not checked") == std::string::npos &&
        message.find("Checked value must be of type") == std::string::npos) {
      EXPECT_EQ(message.find("<nil>"), std::string::npos) << message;
    }
    const std::string errors = decoder_errors(file);
    EXPECT_NE(errors, "") << "shardctl's decoder accepts what the API server refuses";
    EXPECT_NE(errors.find(k.decoder_field), std::string::npos)
        << "decoder does not name " << k.decoder_field << ":\n" << errors;
  }
}

// spec.model.package.url: the CRD's CEL rule and the decoder's is_package_url are the
// same language (each URL the server refuses, the decoder refuses, naming the field;
// the ones it accepts are in valid_cases). A test of its own, outside invalid_cases,
// so that ShardctlAgreesWithTheServer does not start shardctl twice for each URL.
TEST_F(RealApiValidation, PackageUrlsAreJudgedAlikeByTheServerAndTheDecoder) {
  auto job = [](const std::string& name, const std::string& url_yaml) {
    return manifest(name, "  model: {architecture: torchscript, package: {url: " + url_yaml + ", keysSecret: keys}}\n");
  };
  int n = 0;
  std::vector<std::string> bad = {"https://h", "https://h/p", "ftp://h/", "HTTPS://h/", "https:///p/", "https://-h/",
                                  "https://h-/", "https://user@h/", "https://h:/", "https://h:123456/", "https://h//",
                                  "https://h/a//b/", "https://h/?q=1/", "https://h/#f/", "https://h/a b/",
                                  "https://[::1]/", "https://h/\xc3\xa9/", "//h/", "/packages/", "https://h:80x/"};
  bad.push_back("https://h/" + repeat('a', 2040) + "/");
  for (const std::string& url : bad) {
    const std::string name = "package-url-" + std::to_string(n++);
    SCOPED_TRACE(name + " " + url.substr(0, 40));
    const std::string yaml = job(name, json(url).dump());
    const auto [status, message] = server_create(yaml_to_json(yaml));
    EXPECT_EQ(status, 422) << message;
    EXPECT_NE(message.find("spec.model.package.url"), std::string::npos) << message;
    EXPECT_TRUE(message.find("must be an http:// or https:// URL prefix") != std::string::npos ||
                message.find("may not be more than 2048 bytes") != std::string::npos)
        << message;
    const std::string errors = decoder_errors(write(name, yaml));
    EXPECT_NE(errors.find("spec.model.package.url: "), std::string::npos) << errors;
  }
  for (const std::string url : {"http://127.0.0.1:8000/", "https://h/", "https://a-b.c/x/y.z/",
                                "https://bucket.s3.amazonaws.com/m%20v1/", "http://h/a~b_c-1/(x)/@v=2;k!$&'*+,:/",
                                "https://h:1/", "http://x1/"}) {
    SCOPED_TRACE(url);
    const std::string yaml = job("package-url-ok", json(url).dump());
    const auto [status, message] = server_create(yaml_to_json(yaml));
    EXPECT_EQ(status, 201) << message;
    EXPECT_EQ(decoder_errors(write("package-url-ok", yaml)), "");
  }
}

TEST_F(RealApiValidation, ValidJobsAreAcceptedByBoth) {
  for (const auto& [name, yaml] : valid_cases()) {
    SCOPED_TRACE(name);
    const auto [status, message] = server_create(yaml_to_json(yaml));
    EXPECT_EQ(status, 201) << message;
    EXPECT_EQ(decoder_errors(write(name, yaml)), "");
  }
}

// `shardctl plan` and `shardctl render` give the same verdict as the server.
TEST_F(RealApiValidation, ShardctlAgreesWithTheServer) {
  const std::string shardctl = std::string(SHARDGUARD_BIN_DIR) + "/shardctl";
  if (::access(shardctl.c_str(), X_OK) != 0) {
    GTEST_SKIP() << shardctl << " is not built (build the shardctl target): the decoder it uses is checked "
                 << "by the tests above";
  }
  for (const Case& k : invalid_cases()) {
    SCOPED_TRACE(k.name);
    const std::string file = write(k.name, k.yaml);
    for (const char* verb : {"plan", "render"}) {
      const auto r = testsupport::run_command({shardctl, verb, file});
      EXPECT_NE(r.code, 0) << "shardctl " << verb << " accepted it:\n" << r.output;
      EXPECT_NE(r.output.find(k.decoder_field), std::string::npos) << "shardctl " << verb << ":\n" << r.output;
    }
  }
  for (const auto& [name, yaml] : valid_cases()) {
    SCOPED_TRACE(name);
    const std::string file = write(name, yaml);
    for (const char* verb : {"plan", "render"}) {
      const auto r = testsupport::run_command({shardctl, verb, file});
      if (name == "valid-url" || name == "valid-url-odd") {
        // The manifest of a url job is read locally from the keys directory (the
        // stand-in for keysSecret), never from the URL: without one, refused naming it.
        EXPECT_NE(r.code, 0) << "shardctl " << verb << ":\n" << r.output;
        EXPECT_NE(r.output.find("spec.model.package.url: "), std::string::npos) << r.output;
        EXPECT_EQ(r.output.find("invalid job"), std::string::npos) << r.output;
        continue;
      }
      if (name == "valid-torchscript") {
        // Accepted by the decoder; the cut then comes from the packages' manifest,
        // which is not on this machine: refused naming where it was looked for.
        EXPECT_NE(r.code, 0) << "shardctl " << verb << ":\n" << r.output;
        EXPECT_NE(r.output.find("spec.model.package.path: "), std::string::npos) << r.output;
        EXPECT_NE(r.output.find("/packages/fortunes/manifest.json"), std::string::npos) << r.output;
        EXPECT_EQ(r.output.find("invalid job"), std::string::npos) << r.output;
        continue;
      }
      EXPECT_EQ(r.code, 0) << "shardctl " << verb << ":\n" << r.output;
    }
  }
}

// Every field that decides the shards is immutable once the job exists.
TEST_F(RealApiValidation, ImmutableFieldsRefuseUpdates) {
  auto cli = api_.client();
  const std::string name = "immutable";
  cli->Delete(std::string(kJobs) + "/" + name);
  const json job = yaml_to_json(manifest(name, kModel));
  auto res = cli->Post(kJobs, job.dump(), "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 201) << res->body;
  const json created = json::parse(res->body);
  const std::vector<std::pair<std::string, json>> changes = {
      {"model", {{"architecture", "cnn"}}},
      {"dataset", {{"maxTrainSamples", 10}}},
      {"training", {{"epochs", 5}}},
      {"sharding", {{"shards", 2}}},
      {"protection", {{"maxExposure", 0.5}}},
  };
  for (const auto& [field, value] : changes) {
    SCOPED_TRACE(field);
    json updated = created;
    updated["spec"][field] = value;
    auto put = cli->Put(std::string(kJobs) + "/" + name, updated.dump(), "application/json");
    ASSERT_TRUE(put);
    EXPECT_EQ(put->status, 422) << put->body;
    EXPECT_NE(put->body.find("spec." + field + " is immutable"), std::string::npos) << put->body;
  }
  // What may change does: the run policy (suspend) and the checkpoint interval.
  json updated = created;
  updated["spec"]["runPolicy"]["suspend"] = true;
  updated["spec"]["checkpoint"]["everySteps"] = 50;
  auto put = cli->Put(std::string(kJobs) + "/" + name, updated.dump(), "application/json");
  ASSERT_TRUE(put);
  EXPECT_EQ(put->status, 200) << put->body;
  cli->Delete(std::string(kJobs) + "/" + name);
}

}  // namespace
}  // namespace shardguard
