// Recombination: what an attacker (or the owner) gets from every shard's
// checkpoint and key — the whole model, evaluated like the distributed one.
#pragma once

#include <string>
#include <vector>

#include <torch/nn/modules/container/sequential.h>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/trainer.h"

namespace shardguard::shardd {

struct ShardFile {
  std::string checkpoint;  // path of one stage's checkpoint
  std::string key;         // that stage's 32-byte key
};

// Authenticates and loads every shard into one model. The shards must cover the
// model's blocks exactly once, all from the same job and step; the error names
// the missing or overlapping blocks otherwise.
torch::nn::Sequential recombine(const JobSpec& job, const std::vector<ShardFile>& shards, int64_t* step = nullptr);

// Picks, for each stage, the newest step that every stage has in `dir`, with the
// key file `<key_dir>/shard-<i>.key`.
std::vector<ShardFile> find_shard_files(const JobSpec& job, const std::string& checkpoint_dir, const std::string& key_dir);
// The same for a given cut (a split TorchScript model's, from its manifest).
std::vector<ShardFile> find_shard_files(const JobSpec& job, const std::vector<model::StageDesc>& stages,
                                        const std::string& checkpoint_dir, const std::string& key_dir);

}  // namespace shardguard::shardd
