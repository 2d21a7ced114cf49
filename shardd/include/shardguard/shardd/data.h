// The data of a job (spec.dataset.format): Fashion-MNIST from Debian's
// dataset-fashion-mnist (gzipped IDX files), NumPy .npy tensors of a classifier's
// inputs and labels, or token files for a language model (common/token_file.h); and the deterministic data order every stage derives on
// its own. Stage 0 loads only the features, the last stage only the targets.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/types.h>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/model_desc.h"

namespace shardguard::shardd {

class DatasetError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Split { kTrain, kTest };  // tokens: kTest is the validation file

// Normalised float images [N, 1, 28, 28]; at most `limit` (0 = all).
// Throws DatasetError naming the file (and `make deps` when it is missing).
torch::Tensor load_images(const DatasetSpec& dataset, Split split);
// int64 labels [N]; at most `limit` (0 = all).
torch::Tensor load_labels(const DatasetSpec& dataset, Split split);
// Number of samples of a split without reading the data (the IDX header only).
int64_t count_samples(const DatasetSpec& dataset, Split split);

// The samples of one split as a stage sees them, whatever the format:
//   fashion-mnist: sample i is image i (features [n, 1, 28, 28] float) and label i
//     (targets [n] int64);
//   tokens: sample i is a window of context + 1 tokens; features are its first
//     `context` tokens, targets the last `context` ([n, context] int64 each: the
//     next token at every position). Validation windows lie back to back from the
//     file's start; training windows too, but shifted by an offset drawn per epoch
//     from (seed, epoch), so that each epoch cuts the text differently.
class Samples {
 public:
  // Loads what `features` and `targets` ask for. Throws DatasetError naming the
  // file when it is missing or does not fit the model (a token ≥ vocab, too few
  // tokens for one window).
  // `model`: the job's blocks (a package's manifest); nullptr: the zoo model of
  // spec.model. Tensor files are checked against its first block's input and its
  // number of classes.
  static Samples load(const JobSpec& job, Split split, bool features, bool targets,
                      const model::ModelDesc* model = nullptr);
  int64_t size() const { return count_; }
  torch::Tensor features(const torch::Tensor& idx, int epoch = 0) const;
  torch::Tensor targets(const torch::Tensor& idx, int epoch = 0) const;
  // int64 [end - begin]: begin, begin+1, …
  static torch::Tensor range(int64_t begin, int64_t end);

 private:
  torch::Tensor windows(const torch::Tensor& idx, int epoch) const;  // tokens: [n, context + 1]
  bool tokens_ = false;
  int64_t count_ = 0;
  torch::Tensor x_, y_;      // fashion-mnist
  torch::Tensor ids_;        // tokens: the whole file, int64 [L]
  int context_ = 0;
  bool train_ = false;
  uint64_t seed_ = 0;
  int64_t max_offset_ = 0;   // training windows start at offset + i·context, offset ≤ this
};

// Number of samples of a split without loading the data (IDX header; token file
// size; .npy headers, checked against `model` as Samples::load does).
int64_t count_samples(const JobSpec& job, Split split, const model::ModelDesc* model = nullptr);

// What a job's data feeds the first block and what its loss takes from the last,
// per sample — written down here once for every spec.dataset.format:
//   fashion-mnist: float32 [1, 28, 28] → float logits [10];
//   tokens: int64 ids [context] → float logits [context, vocab] (the next token at
//     every position);
//   tensors: float32 of train-inputs.npy's per-sample shape (read from its header)
//     → float logits [classes], for any number of classes ≥ 2 (the model's own).
struct DataShapes {
  std::string format;
  std::vector<int64_t> input;
  bool token_input = false;     // int64 ids (tokens), else float32
  std::vector<int64_t> output;  // tensors: {} (any [classes])
  // "" when a last block giving `out` per sample suits the loss, else what the loss
  // needs ("[10] float logits (one per class)").
  std::string refuses_output(const std::vector<int64_t>& out) const;
  // An input batch of `batch` samples of these shapes: token ids covering the
  // vocabulary, or float32 values in [0, 1].
  torch::Tensor example(int64_t batch, int vocab) const;
};
// `with_input` false: not the input's shape (for tensors it is read from the inputs
// file, which only stage 0 has). Throws DatasetError for a tensors dataset whose
// inputs file is missing or damaged.
DataShapes data_shapes(const JobSpec& job, bool with_input = true);

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
  // Data-parallel replicas (spec.sharding.replicas): a step takes batch_size × replicas
  // samples of the epoch's order, replica r the r-th run of batch_size of them, so R
  // replicas see exactly the samples of one pipeline with batch_size × R, in its order.
  int replicas = 1;
  int replica = 0;
  int64_t global_batch() const { return static_cast<int64_t>(batch_size) * replicas; }
  // The last partial (global) batch is dropped.
  int64_t steps_per_epoch() const { return train_samples / global_batch(); }
  int64_t total_steps() const { return steps_per_epoch() * epochs; }
  int micro_batch_size() const { return batch_size / micro_batches; }
  int epoch_of(int64_t step) const { return static_cast<int>(step / steps_per_epoch()); }
};
// `replica`: which of spec.sharding.replicas this stage is (0 when not replicated).
BatchPlan make_batch_plan(const JobSpec& job, int64_t train_samples, int replica = 0);

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
