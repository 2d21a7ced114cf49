#include "shardguard/shardd/recombine.h"

#include <map>
#include <set>

#include "shardguard/common/crypto.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/model.h"
#include "shardguard/model/partition.h"

namespace shardguard::shardd {

torch::nn::Sequential recombine(const JobSpec& job, const std::vector<ShardFile>& shards, int64_t* step) {
  const model::ModelDesc desc = model::describe_model(job.model);
  const int blocks = static_cast<int>(desc.blocks.size());
  std::vector<int> owner(blocks, -1);
  auto whole = build_blocks(job.model, 0, blocks, job.training.seed);
  auto whole_params = whole->named_parameters();
  std::set<int64_t> steps;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < shards.size(); ++i) {
    const auto header = read_checkpoint_header(shards[i].checkpoint);
    if (header.id.job != job.name) {
      throw CheckpointError("checkpoint " + shards[i].checkpoint + " belongs to job " + header.id.job + ", not " + job.name);
    }
    if (header.id.first_block < 0 || header.id.end_block > blocks || header.id.first_block >= header.id.end_block) {
      throw CheckpointError("checkpoint " + shards[i].checkpoint + " claims blocks outside the model");
    }
    for (int b = header.id.first_block; b < header.id.end_block; ++b) {
      if (owner[b] >= 0) {
        throw CheckpointError("block " + std::to_string(b) + " is in both " + shards[owner[b]].checkpoint + " and " +
                              shards[i].checkpoint);
      }
      owner[b] = static_cast<int>(i);
    }
    steps.insert(header.step);
    auto part = build_blocks(job.model, header.id.first_block, header.id.end_block, job.training.seed);
    load_checkpoint_model(shards[i].checkpoint, shards[i].key, part);
    for (const auto& p : part->named_parameters()) whole_params[p.key()].copy_(p.value());
  }
  for (int b = 0; b < blocks; ++b) {
    if (owner[b] < 0) throw CheckpointError("no checkpoint holds block " + std::to_string(b) + " (" + desc.blocks[b].name + ")");
  }
  if (steps.size() > 1) {
    throw CheckpointError("the checkpoints are of different steps (" + std::to_string(*steps.begin()) + " and " +
                          std::to_string(*steps.rbegin()) + ")");
  }
  if (step) *step = *steps.begin();
  return whole;
}

std::vector<ShardFile> find_shard_files(const JobSpec& job, const std::string& checkpoint_dir, const std::string& key_dir) {
  const model::ModelDesc desc = model::describe_model(job.model);
  return find_shard_files(job, model::partition(desc, job.sharding.shards, job.sharding.balance), checkpoint_dir,
                          key_dir);
}

std::vector<ShardFile> find_shard_files(const JobSpec& job, const std::vector<model::StageDesc>& stages,
                                        const std::string& checkpoint_dir, const std::string& key_dir) {
  std::vector<CheckpointStore> stores;
  std::vector<std::string> keys;
  std::map<int64_t, int> count;
  for (const auto& s : stages) {
    keys.push_back(load_key_file(key_dir + "/shard-" + std::to_string(s.index) + ".key"));
    stores.emplace_back(checkpoint_dir, CheckpointId{job.name, s.index, s.first_block, s.end_block}, keys.back());
    for (auto st : stores.back().steps()) ++count[st];
  }
  int64_t newest = -1;
  for (const auto& [st, c] : count) {
    if (c == static_cast<int>(stages.size())) newest = st;
  }
  if (newest < 0) {
    throw CheckpointError("no step has a checkpoint of every one of the " + std::to_string(stages.size()) +
                          " shards in " + checkpoint_dir);
  }
  std::vector<ShardFile> files;
  for (size_t i = 0; i < stages.size(); ++i) files.push_back({stores[i].path_for(newest), keys[i]});
  return files;
}

}  // namespace shardguard::shardd
