#include "shardguard/shardd/trainer.h"

#include <chrono>

#include <torch/cuda.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim.h>
#include <torch/utils.h>

#include "shardguard/shardd/data.h"
#include "shardguard/shardd/model.h"

namespace shardguard::shardd {

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerSpec& spec,
                                                        const std::vector<torch::Tensor>& params) {
  if (spec.name == "sgd") {
    return std::make_unique<torch::optim::SGD>(
        params, torch::optim::SGDOptions(spec.learning_rate).momentum(spec.momentum).weight_decay(spec.weight_decay));
  }
  if (spec.name == "adam") {
    return std::make_unique<torch::optim::Adam>(
        params, torch::optim::AdamOptions(spec.learning_rate).weight_decay(spec.weight_decay));
  }
  throw JobSpecError({{"spec.training.optimizer.name", "unknown optimizer \"" + spec.name + "\" (expected sgd or adam)"}});
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

torch::Device resolve_device(const std::string& device) {
  if (device == "cpu") return torch::kCPU;
  if (device == "cuda") {
    if (!torch::cuda::is_available()) {
      throw std::runtime_error("--device cuda: this LibTorch has no usable CUDA device (use --device auto or cpu)");
    }
    return torch::kCUDA;
  }
  if (device == "auto") return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  throw std::invalid_argument("--device: unknown device \"" + device + "\" (expected auto, cpu or cuda)");
}

torch::Tensor prediction_loss(const torch::Tensor& logits, const torch::Tensor& targets) {
  if (logits.dim() == 3) {
    return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(2)}), targets.reshape({-1}));
  }
  return torch::nn::functional::cross_entropy(logits, targets);
}

void score_batch(const torch::Tensor& logits, const torch::Tensor& targets, EvalResult& r) {
  const auto flat = logits.reshape({-1, logits.size(-1)});
  const auto y = targets.reshape({-1});
  r.correct += flat.argmax(1).eq(y).sum().item<int64_t>();
  r.total += y.size(0);
  r.loss_sum += torch::nn::functional::cross_entropy(
                    flat, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
}

EvalResult evaluate(torch::nn::Sequential& model, const torch::Tensor& images, const torch::Tensor& labels,
                    int batch_size, torch::Device device) {
  torch::NoGradGuard no_grad;
  EvalResult r;
  const int64_t n = images.size(0);
  for (int64_t begin = 0; begin < n; begin += batch_size) {
    const int64_t end = std::min<int64_t>(n, begin + batch_size);
    auto logits = model->forward(images.slice(0, begin, end).to(device));
    score_batch(logits, labels.slice(0, begin, end).to(device), r);
  }
  return r;
}

EvalResult evaluate(torch::nn::Sequential& model, const JobSpec& job, Split split, torch::Device device,
                    const model::ModelDesc* desc) {
  torch::NoGradGuard no_grad;
  const Samples data = Samples::load(job, split, true, true, desc);
  EvalResult r;
  const int64_t n = data.size();
  const int batch_size = job.training.eval_batch_size;
  for (int64_t begin = 0; begin < n; begin += batch_size) {
    const auto idx = Samples::range(begin, std::min<int64_t>(n, begin + batch_size));
    score_batch(model->forward(data.features(idx).to(device)), data.targets(idx).to(device), r);
  }
  return r;
}

MonolithicResult train_monolithic(const JobSpec& job, const MonolithicOptions& options) {
  if (job.sharding.replicas != 1) {
    // One process is one pipeline: its equivalent is the job with replicas 1 and
    // batchSize × replicas (docs/pipeline.md#data-parallel-replicas).
    throw std::invalid_argument("train_monolithic: spec.sharding.replicas is " + std::to_string(job.sharding.replicas) +
                                "; train the job with replicas 1 and batchSize × replicas instead");
  }
  const torch::Device device = resolve_device(options.device);
  const model::ModelDesc desc = model::describe_model(job.model);
  auto model = build_blocks(job.model, 0, static_cast<int>(desc.blocks.size()), job.training.seed);
  model->to(device);
  auto optimizer = make_optimizer(job.training.optimizer, model->parameters());

  const Samples train = Samples::load(job, Split::kTrain, true, true);
  BatchSampler sampler(make_batch_plan(job, train.size()));
  const BatchPlan& plan = sampler.plan();
  int64_t steps = plan.total_steps();
  if (options.max_steps > 0) steps = std::min(steps, options.max_steps);

  MonolithicResult result;
  const auto start = std::chrono::steady_clock::now();
  model->train();
  for (int64_t step = 0; step < steps; ++step) {
    optimizer->zero_grad();
    MonolithicStep s;
    s.step = step;
    int64_t correct = 0, predictions = 0;
    const int epoch = plan.epoch_of(step);
    for (int m = 0; m < plan.micro_batches; ++m) {
      const auto idx = sampler.indices(step, m);
      auto logits = model->forward(train.features(idx, epoch).to(device));
      const auto y = train.targets(idx, epoch).to(device);
      auto loss = prediction_loss(logits, y);
      (loss / plan.micro_batches).backward();
      s.loss += loss.item<double>() / plan.micro_batches;
      correct += logits.argmax(-1).eq(y).sum().item<int64_t>();
      predictions += y.numel();
    }
    set_learning_rate(*optimizer, learning_rate_at(job.training.optimizer, step, plan.total_steps()));
    optimizer->step();
    s.accuracy = static_cast<double>(correct) / static_cast<double>(predictions);
    result.samples += plan.batch_size;
    result.steps.push_back(s);
    if (options.on_step) options.on_step(s);
  }
  result.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (options.evaluate_at_end) {
    model->eval();
    result.eval = evaluate(model, job, Split::kTest, device);
  }
  return result;
}

}  // namespace shardguard::shardd
