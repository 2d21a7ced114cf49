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

namespace shardguard::shardd {

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerSpec& spec,
                                                        const std::vector<torch::Tensor>& params);

torch::Device resolve_device(const std::string& device);  // auto | cpu | cuda; throws on cuda without CUDA

struct EvalResult {
  int64_t correct = 0;
  int64_t total = 0;
  double accuracy() const { return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
};

// Top-1 accuracy of a whole model on images/labels, in batches (no grad).
EvalResult evaluate(torch::nn::Sequential& model, const torch::Tensor& images, const torch::Tensor& labels,
                    int batch_size, torch::Device device);

struct MonolithicStep {
  int64_t step = 0;
  double loss = 0;       // mean over the step's micro-batches
  double accuracy = 0;   // training accuracy of the step's batch
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
