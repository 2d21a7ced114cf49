// shardctl subcommands other than `run` (see local_run.h). Each returns the
// process exit code and prints its own errors.
#pragma once

#include <string>

namespace shardguard::shardctl {

// `shardctl plan JOB.yaml`: validates the job and prints its partition.
int RunPlan(const std::string& job_file);

// `shardctl recombine`: assembles the whole model from every shard's checkpoint
// and key and evaluates it on the test set.
struct RecombineOptions {
  std::string job_file;
  std::string checkpoint_dir;
  std::string key_dir;
  std::string device = "cpu";
};
int RunRecombine(const RecombineOptions& options);

}  // namespace shardguard::shardctl
