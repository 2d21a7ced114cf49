// One pipeline stage: holds only its own blocks, trains them with its
// neighbours over gRPC, checkpoints its shard, and resynchronises with the
// pipeline when any stage restarts.
//
// Protocol (proto/shardguard/v1/pipeline.proto). Stage 0 drives:
//   1. Sync down the chain: every stage adds the checkpoint steps it can restore;
//      the intersection comes back (step 0, fresh initialisation, is always in it).
//   2. Resume(generation g, newest common step c) down the chain: every stage
//      restores step c and accepts only frames of generation g from then on.
//   3. Training frames (Forward: activations; Backward: gradients) in the order of
//      the job's schedule (1F1B or GPipe), an optimizer step per stage after the
//      flush, a checkpoint every checkpoint.everySteps, a test-set evaluation after
//      every epoch; then Finish down the chain (final checkpoint on every stage).
// A stage that (re)starts sends a JoinNotice up to stage 0, which runs 1–2 again:
// the whole pipeline continues from the newest checkpoint every stage holds.
#pragma once

#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <map>
#include <string>
#include <vector>

#include <prometheus/registry.h>

#include "shardguard/common/jobspec.h"
#include "shardguard/shardd/package_fetch.h"

namespace shardguard::shardd {

// `shardctl generate` (docs/pipeline.md, "Generation"): instead of training, the
// stages restore their newest common checkpoint and generate `tokens` tokens after
// `prompt`, one forward pass through the pipeline per token. Every stage gets the
// same options; stage 0 uses the prompt and writes out_file, the last stage samples.
struct GenerateOptions {
  int64_t tokens = 0;           // 0: train (the normal mode)
  std::vector<int64_t> prompt;  // stage 0: the prompt's token ids
  std::string out_file;         // stage 0: the generated token ids, little-endian uint16
  double temperature = 1.0;     // 0: greedy (argmax)
  int top_k = 0;                // 0: every token; k: only the k most likely
  uint64_t seed = 0;            // same seed, prompt and model: the same tokens
  bool enabled() const { return tokens > 0; }
};

// One other replica of the stage, as its sidecar tunnel reaches it (--replica-tunnel).
struct ReplicaTunnel {
  std::string peer_id;  // its SPIFFE ID (.../shard/<stage>/replica/<r>)
  std::string address;  // the local sidecar's tunnel listener for it, host:port
};

struct StageOptions {
  JobSpec job;
  int stage = 0;
  // Data-parallel replicas (job.sharding.replicas > 1): which replica of the stage this
  // is, and the rendezvous store of the stage's replica group, host:port (replica 0
  // serves it there; the others connect to it). Replica r talks to replica r of its
  // neighbours only (prev/next); only replica 0 writes checkpoints and evaluates.
  int replica = 0;
  std::string replica_store;
  // The address this replica's Gloo connections use (its own: a pod's IP); empty:
  // the store's host, right when every replica runs on one machine (shardctl run).
  std::string replica_host;
  // Through the sidecars (docs/pipeline.md#the-replica-tunnels): for every other
  // replica r of the stage, its SPIFFE ID and the local sidecar listener that carries
  // Gloo to it (gloo_tunnel_host(r):port); and the file where this replica publishes
  // its own Gloo listeners for its sidecar (--tunnel-map). Empty: Gloo connects
  // directly, from replica_host.
  std::map<int, ReplicaTunnel> replica_tunnels;
  std::string replica_tunnel_map;
  std::string listen = "127.0.0.1:0";  // port 0: any free port (see StageRunner::port)
  std::string prev;                    // Pipeline endpoint of stage-1 (or the sidecar in front of it)
  std::string next;                    // Pipeline endpoint of stage+1
  std::string checkpoint_dir;
  std::string key;                     // this shard's 32-byte checkpoint key
  std::string device = "auto";         // auto | cpu | cuda
  double peer_timeout_s = 300;         // longest wait for a frame from a neighbour
  double retry_budget_s = 60;          // how long an unreachable neighbour is retried
  int64_t max_steps = 0;               // stop after this many steps (0 = every epoch)
  // A stage of a TorchScript model split by `shardctl split` (docs/distribution.md):
  // when package_dir is set, the cut comes from its manifest.json and this stage's
  // blocks from its shard-<stage>.sgpkg, opened with package_key (32 bytes), and are
  // fine-tuned from the weights in it; spec.model's zoo fields are not used to build.
  // Or, with package_url (an http(s) prefix ending in '/'), only <url>shard-<stage>.sgpkg
  // is fetched (package_fetch.h, with fetch's timeouts and retries) once at start and
  // kept sealed in memory.
  // package_manifest: the manifest file to trust (a shard pod's copy from its own
  // Secret); required with package_url, default <package_dir>/manifest.json.
  std::string package_dir;
  std::string package_url;
  std::string package_manifest;
  std::string package_key;
  GenerateOptions generate;
  FetchOptions fetch;
  bool from_package() const { return !package_dir.empty() || !package_url.empty(); }
};

struct StepReport {  // emitted by the last stage after each optimizer step
  int64_t step = 0;  // completed steps
  int64_t total_steps = 0;
  int epoch = 0;
  double loss = 0;
  double accuracy = 0;
};

struct EvalReport {  // emitted by the last stage after each test-set evaluation
  int round = 0;     // epochs completed when it ran
  int64_t step = 0;
  int64_t correct = 0;  // top-1 correct predictions
  int64_t total = 0;    // predictions: test samples, or (gpt) validation windows × context
  double loss_sum = 0;  // cross-entropy summed over the predictions, in nats
  double accuracy() const { return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
  double loss() const { return total ? loss_sum / static_cast<double>(total) : 0.0; }
  double perplexity() const { return std::exp(loss()); }
  // Bits per token: bits per byte for a byte vocabulary (vocab 256).
  double bits_per_token() const { return loss() / std::log(2.0); }
};

struct StageEvents {
  std::function<void(const StepReport&)> on_step;
  std::function<void(const EvalReport&)> on_eval;
  std::function<void(int64_t step)> on_resume;
};

struct StageResult {
  bool ok = false;
  std::string error;             // why the stage stopped, when !ok
  int64_t steps = 0;             // completed steps at the end
  std::vector<double> losses;    // last stage: loss of every step it completed, by step
  std::optional<EvalReport> last_eval;
  double compute_seconds = 0;
  double transport_seconds = 0;  // sender threads delivering frames (overlaps compute)
  double serialise_seconds = 0;  // encoding frames (compute thread) and decoding them (handlers)
  double wall_seconds = 0;
  double train_seconds = 0;      // from the last resume to the end (ok runs)
  int64_t trained_steps = 0;     // steps trained since the last resume
  double allreduce_seconds = 0;  // replicas: in the replica group's collectives (part of compute_seconds)
  uint64_t allreduce_bytes = 0;  // replicas: gradient bytes this replica put into all-reduces
  int64_t parameters = 0;
};

class StageRunner {
 public:
  StageRunner(StageOptions options, std::shared_ptr<prometheus::Registry> registry, StageEvents events = {});
  ~StageRunner();
  StageRunner(const StageRunner&) = delete;
  StageRunner& operator=(const StageRunner&) = delete;

  // Builds this stage's blocks (and nothing else), loads the data it needs and
  // binds the gRPC server. Throws on a bad job, missing data or a busy port.
  void start();
  int port() const;
  int64_t parameters() const;
  // Overrides options.prev/next before run() (e.g. once every stage's port is known).
  void set_neighbours(const std::string& prev, const std::string& next);
  // Trains until Finish, a fatal error, or stop(). Call once, after start().
  StageResult run();
  // Asks run() to return (thread-safe, e.g. from a signal-watching thread).
  void stop(const std::string& reason);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardguard::shardd
