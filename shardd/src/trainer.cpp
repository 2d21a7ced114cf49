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

EvalResult evaluate(torch::nn::Sequential& model, const torch::Tensor& images, const torch::Tensor& labels,
                    int batch_size, torch::Device device) {
  torch::NoGradGuard no_grad;
  EvalResult r;
  const int64_t n = images.size(0);
  for (int64_t begin = 0; begin < n; begin += batch_size) {
    const int64_t end = std::min<int64_t>(n, begin + batch_size);
    auto logits = model->forward(images.slice(0, begin, end).to(device));
    r.correct += logits.argmax(1).eq(labels.slice(0, begin, end).to(device)).sum().item<int64_t>();
    r.total += end - begin;
  }
  return r;
}

MonolithicResult train_monolithic(const JobSpec& job, const MonolithicOptions& options) {
  const torch::Device device = resolve_device(options.device);
  const model::ModelDesc desc = model::describe_model(job.model);
  auto model = build_blocks(job.model, 0, static_cast<int>(desc.blocks.size()), job.training.seed);
  model->to(device);
  auto optimizer = make_optimizer(job.training.optimizer, model->parameters());

  const auto images = load_images(job.dataset, Split::kTrain);
  const auto labels = load_labels(job.dataset, Split::kTrain);
  BatchSampler sampler(make_batch_plan(job, labels.size(0)));
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
    int64_t correct = 0;
    for (int m = 0; m < plan.micro_batches; ++m) {
      const auto idx = sampler.indices(step, m);
      auto logits = model->forward(images.index_select(0, idx).to(device));
      const auto y = labels.index_select(0, idx).to(device);
      auto loss = torch::nn::functional::cross_entropy(logits, y);
      (loss / plan.micro_batches).backward();
      s.loss += loss.item<double>() / plan.micro_batches;
      correct += logits.argmax(1).eq(y).sum().item<int64_t>();
    }
    optimizer->step();
    s.accuracy = static_cast<double>(correct) / plan.batch_size;
    result.samples += plan.batch_size;
    result.steps.push_back(s);
    if (options.on_step) options.on_step(s);
  }
  result.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (options.evaluate_at_end) {
    model->eval();
    result.eval = evaluate(model, load_images(job.dataset, Split::kTest), load_labels(job.dataset, Split::kTest),
                           job.training.eval_batch_size, device);
  }
  return result;
}

}  // namespace shardguard::shardd
