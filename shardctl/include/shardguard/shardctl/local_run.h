// `shardctl run`: a ShardedTrainingJob on one machine. The job is rendered with the
// operator's own render(); each shard pod becomes two processes on 127.0.0.1, its
// shardd and its shard-sidecar, started with the pod's arguments (its ports and
// mounted paths mapped to local ones) and the pod's Secret and ConfigMap contents
// as files in <workdir>/shard-<i>/. All stage-to-stage traffic crosses the sidecars
// (mTLS between them, shardd on loopback), as in the cluster. See docs/shardctl.md.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "shardguard/common/jobspec.h"

namespace shardguard::shardctl {

// `shardctl generate`: the same processes as `shardctl run` (shardd behind its sidecar
// per shard, the pod's arguments), but every stage restores the newest checkpoint in
// the workdir and the pipeline generates text instead of training (docs/pipeline.md).
struct LocalGenerate {
  std::string prompt;        // bytes: byte i is token id i
  int64_t tokens = 0;        // how many to generate (1..kMaxGenerateTokens)
  double temperature = 1.0;  // 0: greedy
  int top_k = 0;             // 0: every token
  uint64_t seed = 0;
  std::string out_file;      // "" or where the generated token ids go (little-endian uint16)
};
inline constexpr int64_t kMaxGenerateTokens = 100000;

struct LocalRunOptions {
  std::string job_file;
  std::string workdir;           // default: .shardguard/<job name>
  std::string device = "auto";   // auto | cpu | cuda
  bool resume = false;           // continue from the checkpoints in workdir
  bool fresh = false;            // delete old checkpoints first
  int threads = 0;               // per shard process; 0 = cores / shards (at least 1)
  std::string shardd;            // path of shardd; default: next to shardctl
  std::string sidecar;           // path of shard-sidecar; default: next to shardctl
  std::string package_keys;      // a package job: the keys directory ("" = <spec.model.package.path>.keys)
  double peer_timeout_s = 300;
  bool progress_tty = false;     // draw a live bar (stdout is a terminal)
  bool prometheus = false;       // run a Prometheus that scrapes every process
  std::string prometheus_bin = "prometheus";  // name (searched in PATH) or path
  int prometheus_port = 0;       // on 127.0.0.1; 0 = any free port
  // Bytes each export principal of spec.protection.export may read per shard, as the
  // operator's --export-budget-bytes (the job spec has no budget field); 0 = none.
  int64_t export_budget_bytes = 0;
  std::optional<LocalGenerate> generate;  // set: `shardctl generate` instead of training
};

// Returns the process exit code: 0 done, 1 the run failed, 2 bad input,
// 130 stopped by a signal (checkpoints kept). With options.generate, prints the
// generated text on stdout (everything else on stderr).
int RunLocal(const LocalRunOptions& options);

// Why `shardctl generate` (or `recombine --prompt`) cannot generate with this job and
// these options, naming the flag or spec field and the value; "" when it can.
std::string generation_refusal(const JobSpec& job, const LocalGenerate& generate);

// Generated tokens as text for a terminal: byte tokens that form valid UTF-8 as
// they are (with newlines and tabs), every other byte as \xNN, a token id >= 256 as <id>.
std::string printable_text(const std::vector<uint16_t>& tokens);

}  // namespace shardguard::shardctl
