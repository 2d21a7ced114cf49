// The single-process reference: the whole model in one process, trained with the
// same data order, micro-batching and optimizer as the pipeline. Used as the
// "same math" oracle in tests, the baseline in benchmarks, and by recombination.
// Building the whole model is exactly what shardd never does.
#pragma once

#include <functional>
#include <memory>

#include <torch/nn/modules/container/sequential.h>
#include <torch/optim/optimizer.h>

#include "shardguard/common/jobspec.h"
#include "shardguard/shardd/data.h"

namespace shardguard::shardd {

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerSpec& spec,
                                                        const std::vector<torch::Tensor>& params);
// Sets every parameter group's learning rate (before each step: learning_rate_at).
void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

torch::Device resolve_device(const std::string& device);  // auto | cpu | cuda; throws on cuda without CUDA

// Predictions: one per sample for a classifier, one per position (next token) for
// a language model.
struct EvalResult {
  int64_t correct = 0;   // top-1 correct predictions
  int64_t total = 0;     // predictions
  double loss_sum = 0;   // cross-entropy summed over the predictions (nats)
  double accuracy() const { return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
  double loss() const { return total ? loss_sum / static_cast<double>(total) : 0.0; }
};

// Mean cross-entropy of logits [n, C] against class ids [n], or of a language
// model's logits [n, t, V] against the next tokens [n, t] (every position counts).
torch::Tensor prediction_loss(const torch::Tensor& logits, const torch::Tensor& targets);
// Adds one batch's top-1 hits, predictions and summed loss to `r`.
void score_batch(const torch::Tensor& logits, const torch::Tensor& targets, EvalResult& r);

// Top-1 accuracy and loss of a whole model on images/labels, in batches (no grad).
EvalResult evaluate(torch::nn::Sequential& model, const torch::Tensor& images, const torch::Tensor& labels,
                    int batch_size, torch::Device device);
// The same over a job's split, whatever its format (shardctl recombine, tests).
// `desc`: the model's blocks when they are not spec.model's zoo model (a package's
// manifest), for the tensors format's checks (Samples::load).
EvalResult evaluate(torch::nn::Sequential& model, const JobSpec& job, Split split, torch::Device device,
                    const model::ModelDesc* desc = nullptr);

struct MonolithicStep {
  int64_t step = 0;
  double loss = 0;       // mean over the step's micro-batches
  double accuracy = 0;   // training accuracy of the step's batch (gpt: of its next-token predictions)
};

struct MonolithicOptions {
  int64_t max_steps = 0;  // 0 = every step of every epoch
  std::string device = "cpu";
  bool evaluate_at_end = true;
  std::function<void(const MonolithicStep&)> on_step;
};

struct MonolithicResult {
  std::vector<MonolithicStep> steps;
  EvalResult eval;
  double train_seconds = 0;
  int64_t samples = 0;
};

MonolithicResult train_monolithic(const JobSpec& job, const MonolithicOptions& options);

}  // namespace shardguard::shardd
