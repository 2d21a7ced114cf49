// A TorchScript model brought by the user (`shardctl split`, docs/models.md and
// docs/distribution.md): its blocks found in one ordered attribute, probed with an
// example input for their shapes, cut by the partitioner, and written as one
// encrypted package per shard, each a TorchScript archive of that shard's blocks
// only. Also the other way: a package opened and loaded alone, as a stage does.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/csrc/jit/api/module.h>
#include <torch/nn/modules/container/sequential.h>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/package.h"

namespace shardguard::shardd {

// A batch of `batch` example inputs for the job's data: spec.dataset.format tokens →
// int64 ids [batch, context] in 0..vocab-1; fashion-mnist → float32 [batch, 1, 28, 28].
torch::Tensor example_input(const JobSpec& job, int64_t batch);

// "float32", "int64", … (numpy's names).
std::string dtype_name(c10::ScalarType type);

struct ScriptModel {
  torch::jit::Module module;               // the whole model: only where split runs
  std::vector<torch::jit::Module> blocks;  // the children of the blocks attribute, in order
  model::PackageManifest manifest;         // blocks filled in; no shards yet
};

// Loads MODEL.pt and checks that it can be split for `job`:
// - the blocks are one nn.Sequential or nn.ModuleList attribute (`attribute`, or
//   the only such child when empty);
// - every parameter and buffer lies inside a block, and no two blocks share one;
// - the example input goes through the blocks one after the other, each giving a
//   tensor, the first taking the job's input and the last giving what its loss needs;
// - forward(example) is the blocks applied in order.
// Throws model::PackageError naming the attribute (and the block) otherwise.
ScriptModel load_script_model(const std::string& path, const JobSpec& job, const std::string& attribute = "");

// A TorchScript module holding only `blocks[first, end)`, as children block<i>
// (global index, as zoo stages name theirs), whose forward applies them in order.
torch::jit::Module stage_module(const std::vector<torch::jit::Module>& blocks, int first, int end);

// The parameter names, shapes and counts of a module, in its order.
std::vector<model::PackageParam> package_params(const torch::jit::Module& module);

// Cuts the model by job.sharding and writes DIR/manifest.json and DIR/shard-<i>.sgpkg
// (AES-256-GCM, a fresh random key per shard) and KEYS/shard-<i>.key (mode 0600,
// directory 0700). Both directories are written under temporary names and renamed
// into place at the end, so nothing half-written is left; either may exist only as
// an empty directory. Returns the manifest.
model::PackageManifest split_model(ScriptModel& model, const JobSpec& job, const std::string& out_dir,
                                   const std::string& key_dir);

// Reads DIR/manifest.json; load_manifest_file any manifest file (a shard pod's copy
// from its own Secret).
model::PackageManifest load_manifest(const std::string& package_dir);
model::PackageManifest load_manifest_file(const std::string& path);

// Opens shard `shard`'s package (digest, header, key: model::open_package) and loads
// the TorchScript archive in it, checking its parameter names, shapes and counts
// against the manifest. Throws model::PackageError naming the file.
torch::jit::Module load_package(const std::string& package_dir, const model::PackageManifest& manifest, int shard,
                                const std::string& key);
// The same for a package's bytes already in memory (fetched from a URL); `path`
// names them in errors.
torch::jit::Module open_package_bytes(const std::string& bytes, const std::string& path,
                                      const model::PackageManifest& manifest, int shard, const std::string& key);

// Blocks [first, end) of a package (or of any module with children block<i>) as the
// Sequential a stage trains: child block<i> runs the TorchScript block's forward, and
// holds the very same parameter and buffer tensors under the same names
// ("block3.ln1.weight"), so optimizers, checkpoints, export and recombination work on
// it as on a zoo stage, and what they change is the TorchScript block's.
torch::nn::Sequential package_stage(const torch::jit::Module& package, int first, int end);

// Every package with its key (KEYS/shard-<i>.key) and every shard's checkpoint of
// one step (the newest every shard has in checkpoint_dir, keys in checkpoint_key_dir):
// the fine-tuned model as one TorchScript module (children block<i>, forward applies
// them in order), and a Sequential view of it for evaluation.
struct RecombinedScript {
  torch::jit::Module module;
  torch::nn::Sequential view{nullptr};
  int64_t step = 0;
  model::PackageManifest manifest;
};
RecombinedScript recombine_packages(const JobSpec& job, const std::string& package_dir,
                                    const std::string& package_key_dir, const std::string& checkpoint_dir,
                                    const std::string& checkpoint_key_dir);

}  // namespace shardguard::shardd
