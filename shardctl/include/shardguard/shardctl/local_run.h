// `shardctl run`: a ShardedTrainingJob on one machine. The job is rendered with the
// operator's own render(); each shard pod becomes two processes on 127.0.0.1, its
// shardd and its shard-sidecar, started with the pod's arguments (its ports and
// mounted paths mapped to local ones) and the pod's Secret and ConfigMap contents
// as files in <workdir>/shard-<i>/. All stage-to-stage traffic crosses the sidecars
// (mTLS between them, shardd on loopback), as in the cluster. See docs/shardctl.md.
#pragma once

#include <cstdint>
#include <string>

namespace shardguard::shardctl {

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
};

// Returns the process exit code: 0 done, 1 the run failed, 2 bad input,
// 130 stopped by a signal (checkpoints kept).
int RunLocal(const LocalRunOptions& options);

}  // namespace shardguard::shardctl
