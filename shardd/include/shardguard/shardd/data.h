// Fashion-MNIST from Debian's dataset-fashion-mnist (gzipped IDX files), and the
// deterministic data order every stage derives on its own. Stage 0 loads only
// the images, the last stage only the labels.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/types.h>

#include "shardguard/common/jobspec.h"

namespace shardguard::shardd {

class DatasetError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Split { kTrain, kTest };

// Normalised float images [N, 1, 28, 28]; at most `limit` (0 = all).
// Throws DatasetError naming the file (and `make deps` when it is missing).
torch::Tensor load_images(const DatasetSpec& dataset, Split split);
// int64 labels [N]; at most `limit` (0 = all).
torch::Tensor load_labels(const DatasetSpec& dataset, Split split);
// Number of samples of a split without reading the data (the IDX header only).
int64_t count_samples(const DatasetSpec& dataset, Split split);

// The order of the training samples in `epoch`: a Fisher-Yates shuffle driven
// by a SplitMix64 stream of (seed, epoch). The same on every stage and platform.
std::vector<int64_t> epoch_order(uint64_t seed, int epoch, int64_t n);

// Which training samples step `step` and micro-batch `micro_batch` use.
struct BatchPlan {
  int64_t train_samples = 0;
  int batch_size = 0;
  int micro_batches = 0;
  int epochs = 0;
  uint64_t seed = 0;
  int64_t steps_per_epoch() const { return train_samples / batch_size; }  // the last partial batch is dropped
  int64_t total_steps() const { return steps_per_epoch() * epochs; }
  int micro_batch_size() const { return batch_size / micro_batches; }
  int epoch_of(int64_t step) const { return static_cast<int>(step / steps_per_epoch()); }
};
BatchPlan make_batch_plan(const JobSpec& job, int64_t train_samples);

// Caches the current epoch's order; indices of (step, micro_batch).
class BatchSampler {
 public:
  explicit BatchSampler(BatchPlan plan) : plan_(plan) {}
  torch::Tensor indices(int64_t step, int micro_batch);
  const BatchPlan& plan() const { return plan_; }

 private:
  BatchPlan plan_;
  int cached_epoch_ = -1;
  std::vector<int64_t> order_;
};

}  // namespace shardguard::shardd
