// `shardctl run`: a ShardedTrainingJob on one machine, one shardd process per
// shard on 127.0.0.1, each with its own key and checkpoint files.
#pragma once

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
  double peer_timeout_s = 300;
  bool progress_tty = false;     // draw a live bar (stdout is a terminal)
};

// Returns the process exit code: 0 done, 1 the run failed, 2 bad input,
// 130 stopped by a signal (checkpoints kept).
int RunLocal(const LocalRunOptions& options);

}  // namespace shardguard::shardctl
