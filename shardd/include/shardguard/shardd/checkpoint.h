// Encrypted shard checkpoints. A file holds one stage's parameters, optimizer
// state and step, sealed with AES-256-GCM under that shard's own key; the
// plaintext header (job, stage, blocks, step) is authenticated as AAD, so a file
// cannot be passed off as another stage's or another step's.
//
// File layout: "SGCKPT01" | u32 little-endian header length | header JSON |
//              nonce(12) | ciphertext | tag(16)
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/nn/modules/container/sequential.h>
#include <torch/optim/optimizer.h>

namespace shardguard::shardd {

class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CheckpointId {
  std::string job;
  int stage = 0;
  int first_block = 0;
  int end_block = 0;
};

struct CheckpointHeader {
  CheckpointId id;
  int64_t step = 0;
};

class CheckpointStore {
 public:
  // key: the shard's 32-byte key. keep: how many newest checkpoints to keep
  // (two, so that every stage still holds one that all the others hold too).
  CheckpointStore(std::string dir, CheckpointId id, std::string key, int keep = 2);

  std::string path_for(int64_t step) const;
  // Steps of this stage's checkpoint files in dir, ascending (by file name; a
  // file is only trusted once load() has authenticated it).
  std::vector<int64_t> steps() const;

  // Atomic (temp file, fsync, rename) and then prunes older files. Returns bytes written.
  size_t save(int64_t step, torch::nn::Sequential& model, torch::optim::Optimizer& optimizer);
  // Loads into model/optimizer. Throws CheckpointError (file named, reason given)
  // for a missing, truncated, tampered or wrong-key file, or one of another
  // job/stage/step; model and optimizer are untouched then.
  void load(int64_t step, torch::nn::Sequential& model, torch::optim::Optimizer& optimizer,
            torch::Device device) const;
  // Renames the checkpoint of `step` to "<name>.rejected" (kept for inspection,
  // no longer listed by steps()). Returns the new path ("" if there was no file).
  std::string quarantine(int64_t step) const;

 private:
  std::string dir_;
  CheckpointId id_;
  std::string key_;
  int keep_;
};

// Reads and authenticates a checkpoint file; returns the header and fills
// `model` (built for the header's blocks) with its parameters. For recombination.
CheckpointHeader read_checkpoint_header(const std::string& path);
void load_checkpoint_model(const std::string& path, const std::string& key, torch::nn::Sequential& model);

}  // namespace shardguard::shardd
