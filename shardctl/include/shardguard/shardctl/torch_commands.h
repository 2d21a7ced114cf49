// The shardctl subcommands that build models with LibTorch (library
// shardguard_shardctl_torch, only in trees built with SHARDGUARD_WITH_TORCH):
// `recombine`, `split` and the runner of `study`. Everything else shardctl does, the
// study's plan and report included, is in the torch-free shardguard_shardctl.
#pragma once

#include <optional>
#include <string>

#include "shardguard/shardctl/study_report.h"

namespace shardguard::shardctl {

// `shardctl recombine`: assembles the whole model from every shard's checkpoint
// and key and evaluates it on the test set.
struct RecombineOptions {
  std::string job_file;
  std::string checkpoint_dir;
  std::string key_dir;
  std::string device = "cpu";
  // A split TorchScript model (docs/distribution.md): the packages, their keys, and
  // where the fine-tuned TorchScript model goes.
  std::string package_dir;
  std::string package_key_dir;
  std::string out_file;
  // --prompt: also generate from the recombined model in this one process (the
  // monolithic counterpart of `shardctl generate`, same window and sampling).
  std::optional<std::string> prompt;
  int64_t tokens = 100;
  double temperature = 0.8;
  int top_k = 0;
  uint64_t seed = 0;
  std::string tokens_out;  // the generated token ids (little-endian uint16)
};
int RunRecombine(const RecombineOptions& options);

// `shardctl split`: cuts a TorchScript model (its blocks in one nn.Sequential or
// nn.ModuleList attribute) by the job's sharding into one AES-256-GCM package per
// shard, a manifest and one key per shard (docs/distribution.md). Exit 0 written,
// 2 a model, job or directory split refuses (the message names the attribute or
// flag), 1 any other error; nothing is left half-written.
struct SplitOptions {
  std::string model_file;
  std::string job_file;
  std::string out_dir;
  std::string key_dir;    // default: <out_dir>.keys
  std::string attribute;  // the blocks attribute; default: the only Sequential/ModuleList child
};
int RunSplit(const SplitOptions& options);

// Checks every option that can be checked before training, throwing StudyError
// naming the flag and the value: no job, seeds < 1, steps < 1, an unknown attack
// or row, a size above the training set, --checkpoints without --keys or with
// more than one job, a checkpoint directory without a complete set.
void validate_study(const StudyOptions& options);

// Runs (or resumes) the study and writes the report (--report-only: RunStudyReport).
// Exit 0 done, 1 failure during the run, 2 bad input (the message names the flag
// and the value).
int RunStudy(const StudyOptions& options);

}  // namespace shardguard::shardctl
