// The engine's compute: one optimizer step under the stage's schedule,
// evaluation rounds, checkpoints. Main-loop thread only.
#include "engine_impl.h"

#include <cmath>

#include <torch/nn/functional/loss.h>
#include <torch/utils.h>

#include "shardguard/common/log.h"
#include "shardguard/common/token_file.h"
#include "shardguard/shardd/generate.h"

namespace shardguard::shardd {

void Engine::Impl::run_eval_round() {
  if (!evaluates_) return;  // replicas: replica 0's pipeline evaluates for all
  const int round = static_cast<int>(done_ / plan_.steps_per_epoch());
  const int64_t n = test_.size();
  const int batch = opt_.job.training.eval_batch_size;
  model_->eval();
  torch::NoGradGuard no_grad;
  for (int64_t b = 0; b * batch < n; ++b) {
    auto x = test_.features(Samples::range(b * batch, std::min<int64_t>(n, (b + 1) * batch))).to(device_);
    auto out = model_->forward(x);
    if (last_) {
      eval_batch(b, round, out);
    } else {
      transport_.send_down(frame(Phase::kEval, b, 0, round, out));
    }
  }
  model_->train();
}

void Engine::Impl::eval_forward(Inbound& in) {
  torch::NoGradGuard no_grad;
  model_->eval();
  auto out = model_->forward(in.tensor.to(device_));
  model_->train();
  if (last_) {
    eval_batch(in.step, in.epoch, out);
  } else {
    transport_.send_down(frame(Phase::kEval, in.step, 0, in.epoch, out));
  }
}

void Engine::Impl::eval_batch(int64_t batch, int round, const torch::Tensor& logits) {
  if (batch != next_eval_batch_) {
    fail("protocol error: expected evaluation batch " + std::to_string(next_eval_batch_) + ", received " +
         std::to_string(batch));
    throw Stopped{};
  }
  const int64_t begin = batch * opt_.job.training.eval_batch_size;
  if (begin + logits.size(0) > test_.size()) {
    fail("evaluation batch " + std::to_string(batch) + " has more samples than the test set");
    throw Stopped{};
  }
  const auto y = test_.targets(Samples::range(begin, begin + logits.size(0))).to(device_);
  score_batch(logits, y, eval_sum_);
  eval_seen_ += logits.size(0);
  ++next_eval_batch_;
  if (eval_seen_ == test_.size()) {
    EvalReport r;
    r.round = round;
    r.step = done_;
    r.correct = eval_sum_.correct;
    r.total = eval_sum_.total;
    r.loss_sum = eval_sum_.loss_sum;
    last_eval_ = r;
    metrics_.eval_accuracy.Set(r.accuracy());
    metrics_.eval_loss.Set(r.loss());
    nlohmann::json fields = {{"round", round}, {"step", done_}, {"accuracy", r.accuracy()}, {"correct", r.correct},
                             {"total", r.total}, {"loss", r.loss()}};
    if (opt_.job.model.language_model()) {
      fields["perplexity"] = r.perplexity();
      fields["bits_per_token"] = r.bits_per_token();
    }
    log::info("evaluation", fields);
    if (events_.on_eval) events_.on_eval(r);
    eval_seen_ = 0;
    eval_sum_ = EvalResult{};
    next_eval_batch_ = 0;
  }
}

// One optimizer step: the schedule's forwards and backwards (receiving from and
// sending to the neighbours as it goes), then the optimizer. `first_in` is the
// frame that started the step on a follower (its micro-batch 0 activation).
void Engine::Impl::train_step(int64_t step, Inbound* first_in) {
  const int m_count = opt_.job.training.micro_batches;
  const int epoch = first_in ? first_in->epoch : plan_.epoch_of(step);
  std::vector<torch::Tensor> inputs(m_count), outputs(m_count);
  double loss_sum = 0;
  int64_t correct = 0, predictions = 0;
  const int data_epoch = sampler_ ? plan_.epoch_of(step) : 0;  // stage 0 and the last stage have a plan
  optimizer_->zero_grad();
  for (const PipeOp& op : schedule_) {
    const int m = op.micro_batch;
    if (op.kind == PipeOp::kForward) {
      torch::Tensor x;
      if (first_) {
        x = train_.features(sampler_->indices(step, m), data_epoch).to(device_);
      } else {
        Inbound in = (m == 0 && first_in) ? std::move(*first_in) : expect(fwd_, "activation", step, m);
        if (in.step != step || in.micro_batch != m) {
          fail("protocol error: step " + std::to_string(step) + " began with micro-batch " +
               std::to_string(in.micro_batch));
          throw Stopped{};
        }
        x = in.tensor.to(device_).requires_grad_(true);
      }
      const auto t0 = Clock::now();
      auto out = model_->forward(x);
      if (last_) {
        const auto y = train_.targets(sampler_->indices(step, m), data_epoch).to(device_);
        auto loss = prediction_loss(out, y);
        loss_sum += loss.item<double>();
        correct += out.argmax(-1).eq(y).sum().item<int64_t>();
        predictions += y.numel();
        out = loss / m_count;
      }
      observe(metrics_.forward_seconds, t0);
      inputs[m] = x;
      outputs[m] = out;
      if (!last_) transport_.send_down(frame(Phase::kTrain, step, m, epoch, out));
    } else {
      torch::Tensor grad;
      if (!last_) grad = expect(bwd_, "gradient", step, m).tensor.to(device_);
      const auto t0 = Clock::now();
      if (last_) {
        outputs[m].backward();
      } else {
        outputs[m].backward(grad);
      }
      observe(metrics_.backward_seconds, t0);
      if (!first_) transport_.send_up(frame(Phase::kTrain, step, m, epoch, inputs[m].grad()));
      inputs[m] = torch::Tensor();
      outputs[m] = torch::Tensor();
    }
  }
  if (group_) {
    // Synchronous data parallelism: every replica of this stage averages its
    // gradients with the others before the optimizer step; the last stages also
    // add up the loss and counts, so each reports the step of the global batch.
    const auto t_group = Clock::now();
    group_->check_step(step);
    group_->average_gradients(model_->parameters());
    if (last_) {
      const auto totals = group_->sum({loss_sum, static_cast<double>(correct), static_cast<double>(predictions)});
      const double r = group_->replicas();
      loss_sum = totals[0] / r;
      correct = static_cast<int64_t>(totals[1]);
      predictions = static_cast<int64_t>(totals[2]);
    }
    observe(metrics_.allreduce_seconds, t_group);
  }
  set_learning_rate(*optimizer_, learning_rate_at(opt_.job.training.optimizer, step, schedule_steps_));
  const auto t0 = Clock::now();
  optimizer_->step();
  observe(metrics_.optimizer_seconds, t0);
  done_ = step + 1;
  metrics_.steps.Increment();
  metrics_.samples.Increment(opt_.job.training.batch_size);
  metrics_.step.Set(static_cast<double>(done_));
  metrics_.epoch.Set(epoch);
  if (last_) {
    StepReport r;
    r.step = done_;
    r.total_steps = total_steps_;
    r.epoch = epoch;
    r.loss = loss_sum / m_count;
    r.accuracy = predictions ? static_cast<double>(correct) / static_cast<double>(predictions) : 0.0;
    losses_.resize(static_cast<size_t>(step));
    losses_.push_back(r.loss);
    metrics_.loss.Set(r.loss);
    metrics_.train_accuracy.Set(r.accuracy);
    if (events_.on_step) events_.on_step(r);
  }
}

// ---- generation (`shardctl generate`, docs/pipeline.md) ----------------------------------
// Stage 0: restore the newest checkpoint every stage holds, then one window through
// the pipeline per token; the last stage answers with the token it sampled.
void Engine::Impl::generate() {
  resync_with_retries();  // Sync + Resume: every stage restores the same step
  if (done_ == 0) {
    fail("no checkpoint that every stage can restore in " + opt_.checkpoint_dir +
         ": train the job first (shardctl run)");
    throw Stopped{};
  }
  const auto start = Clock::now();
  const GenerateOptions& g = opt_.generate;
  const int64_t context = opt_.job.model.context, vocab = opt_.job.model.vocab;
  std::vector<int64_t> tokens = g.prompt;
  std::vector<uint16_t> generated;
  torch::NoGradGuard no_grad;
  model_->eval();
  for (int64_t i = 0; i < g.tokens; ++i) {
    if (stopping()) throw Stopped{};
    int position = 0;
    const auto x = generation_window(tokens, context, &position).to(device_);
    const auto t0 = Clock::now();
    const auto out = model_->forward(x);
    observe(metrics_.forward_seconds, t0);
    int64_t token = 0;
    if (last_) {
      token = sample_token(out[0][position], g, i);
    } else {
      torch::Tensor back;
      try {
        back = token_from_below(i, out, position);
      } catch (const Aborted&) {
        fail("a stage restarted during generation (token " + std::to_string(i) + "); generate again");
        throw Stopped{};
      }
      // Checked as a float before it becomes an integer: a peer's NaN, infinity or
      // 1e30 has no int64 value (converting it would be undefined behaviour).
      const float value = back.item<float>();
      if (!std::isfinite(value) || value < 0 || value >= static_cast<float>(vocab) || value != std::floor(value)) {
        fail("the last stage sent token " + std::to_string(value) + ", not an id of the " + std::to_string(vocab) +
             "-token vocabulary");
        throw Stopped{};
      }
      token = static_cast<int64_t>(value);
    }
    tokens.push_back(token);
    generated.push_back(static_cast<uint16_t>(token));
    metrics_.generated_tokens.Increment();
  }
  const double seconds = seconds_since(start);
  if (!g.out_file.empty()) write_token_file(g.out_file, generated);
  log::info("generation finished", {{"stage", opt_.stage}, {"step", done_}, {"prompt_tokens", g.prompt.size()},
                                    {"tokens", g.tokens}, {"seconds", seconds},
                                    {"tokens_per_second", seconds > 0 ? g.tokens / seconds : 0.0}});
  if (last_) return;
  transport_.flush_down();
  if (stopping()) throw Stopped{};
  const std::string err = prefixed(transport_.finish({generation_.load(), done_}));
  if (!err.empty()) {
    fail("finish: " + err);
    throw Stopped{};
  }
}

// Stages 1..n-1: this stage's blocks on the window (no gradients, eval mode); the
// last stage samples the next token from the logits at the window's position, the
// others pass the token it sends back up unchanged.
void Engine::Impl::generate_forward(Inbound& in) {
  torch::NoGradGuard no_grad;
  model_->eval();
  const auto t0 = Clock::now();
  const auto out = model_->forward(in.tensor.to(device_));
  observe(metrics_.forward_seconds, t0);
  torch::Tensor token;
  if (last_) {
    if (out.dim() != 3 || in.position < 0 || in.position >= out.size(1)) {
      fail("generation frame " + std::to_string(in.step) + ": position " + std::to_string(in.position) +
           " is not within the model's " + model::shape_str(out.sizes().vec()) + " logits");
      throw Stopped{};
    }
    const int64_t id = sample_token(out[0][in.position], opt_.generate, in.step);
    token = torch::full({1, 1}, static_cast<float>(id));
  } else {
    token = token_from_below(in.step, out, in.position);
  }
  transport_.send_up(frame(Phase::kGenerate, in.step, 0, 0, token));
}

// Sends generation frame i (this stage's output and the position to sample) down the
// chain and waits for the token the last stage sends back up ([1, 1], float32: the
// frame checks enforce the shape; its value is checked by stage 0).
torch::Tensor Engine::Impl::token_from_below(int64_t i, const torch::Tensor& out, int position) {
  OutFrame f = frame(Phase::kGenerate, i, 0, 0, out);
  f.header.position = position;
  transport_.send_down(std::move(f));
  Inbound back = wait_for(bwd_, "generated token");
  if (back.phase != Phase::kGenerate || back.step != i) {
    fail("protocol error: expected generated token " + std::to_string(i) + ", received step " +
         std::to_string(back.step));
    throw Stopped{};
  }
  return back.tensor;
}

void Engine::Impl::after_step() {
  if (done_ % opt_.job.checkpoint.every_steps == 0) write_checkpoint(done_);
}

void Engine::Impl::finish_local(int64_t step) {
  if (step != done_) {
    throw std::runtime_error("finish at step " + std::to_string(step) + " but this stage completed " +
                             std::to_string(done_) + " steps");
  }
  if (generating_) return;  // generation changes no parameter: nothing to write
  if (last_checkpoint_ != done_) write_checkpoint(done_);
}

void Engine::Impl::write_checkpoint(int64_t step) {
  if (!writes_checkpoints_) {
    // Replicas: one checkpoint per stage, replica 0's; the others resume from it.
    last_checkpoint_ = step;
    return;
  }
  const auto t0 = Clock::now();
  try {
    const size_t bytes = store_->save(step, model_, *optimizer_);
    metrics_.checkpoint_bytes.Set(static_cast<double>(bytes));
  } catch (const std::exception& e) {
    metrics_.checkpoint_failures.Increment();
    throw std::runtime_error(std::string("writing checkpoint of step ") + std::to_string(step) + ": " + e.what());
  }
  observe(metrics_.checkpoint_seconds, t0);
  metrics_.checkpoint_writes.Increment();
  metrics_.checkpoint_step.Set(static_cast<double>(step));
  last_checkpoint_ = step;
  if (publish_) publish_(model_, step);
  log::info("checkpoint written", {{"stage", opt_.stage}, {"step", step}, {"path", store_->path_for(step)}});
}

void Engine::Impl::observe(prometheus::Histogram& h, Clock::time_point t0) {
  const double s = seconds_since(t0);
  h.Observe(s);
  compute_seconds_ += s;
}

// Tagged with the current generation: a resynchronisation before it is sent drops it.
OutFrame Engine::Impl::frame(Phase phase, int64_t step, int m, int epoch, const torch::Tensor& t) const {
  return {{generation_.load(), phase, step, m, epoch}, t};
}

}  // namespace shardguard::shardd
