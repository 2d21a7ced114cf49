// The LibTorch half of `shardctl study`: trains (or loads) the victim, runs every
// cell, appends it to results.csv and writes the report.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <malloc.h>
#include <memory>
#include <set>
#include <sstream>

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/functional.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/upsampling.h>
#include <torch/optim/adam.h>
#include <torch/serialize.h>
#include <torch/types.h>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/strings.h"
#include "shardguard/shardctl/progress.h"
#include "shardguard/shardctl/torch_commands.h"
#include "shardguard/shardd/data.h"
#include "shardguard/shardd/model.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/recombine.h"
#include "shardguard/shardd/trainer.h"

namespace fs = std::filesystem;

namespace shardguard::shardctl {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// FNV-1a: a stable hash for deriving per-cell seeds (std::hash is not stable).
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h & 0x7FFFFFFFFFFFFFFFULL;
}

// A model as its stages, each a Sequential of the stage's blocks (parameter
// names "block<k>...." as in every other layout).
struct StagedModel {
  std::vector<torch::nn::Sequential> stages;

  torch::Tensor forward(torch::Tensor x, size_t from, size_t to) {
    for (size_t i = from; i < to; ++i) x = stages[i]->forward(x);
    return x;
  }
  torch::Tensor forward(const torch::Tensor& x) { return forward(x, 0, stages.size()); }
  void train(bool on) {
    for (auto& s : stages) s->train(on);
  }
};

StagedModel build_model(const ModelSpec& spec, const std::vector<model::StageDesc>& cut, uint64_t seed) {
  StagedModel m;
  for (const auto& s : cut) m.stages.push_back(shardd::build_blocks(spec, s.first_block, s.end_block, seed));
  return m;
}

void copy_stage(torch::nn::Sequential& dst, torch::nn::Sequential& src) {
  torch::NoGradGuard no_grad;
  auto from = src->named_parameters();
  for (auto& p : dst->named_parameters()) p.value().copy_(from[p.key()]);
}

void save_model(StagedModel& m, const std::string& path) {
  torch::serialize::OutputArchive ar;
  for (auto& s : m.stages) {
    for (const auto& p : s->named_parameters()) ar.write(p.key(), p.value().detach());
  }
  const std::string tmp = path + ".tmp";
  ar.save_to(tmp);
  fs::rename(tmp, path);
}

void load_model(StagedModel& m, const std::string& path) {
  torch::serialize::InputArchive ar;
  ar.load_from(path);
  torch::NoGradGuard no_grad;
  for (auto& s : m.stages) {
    for (auto& p : s->named_parameters()) {
      torch::Tensor t;
      ar.read(p.key(), t);
      p.value().copy_(t);
    }
  }
}

// Plain minibatch training: `steps` steps of `batch` samples, reshuffled with
// torch::randperm (seeded by the caller) every pass over the data.
// Cosine decay of every parameter group's learning rate from its initial value
// to 0 over `steps`: the attacker's runs end at a small learning rate, so their
// result depends less on where the last few steps happened to land.
std::vector<double> group_lrs(torch::optim::Optimizer& opt) {
  std::vector<double> lrs;
  for (auto& g : opt.param_groups()) lrs.push_back(g.options().get_lr());
  return lrs;
}

void set_cosine_lr(torch::optim::Optimizer& opt, const std::vector<double>& base, int64_t step, int64_t steps) {
  const double f = 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(step) / static_cast<double>(steps)));
  auto& groups = opt.param_groups();
  for (size_t i = 0; i < groups.size(); ++i) groups[i].options().set_lr(base[i] * f);
}

// `schedule`: the job's learning-rate schedule (learning_rate_at), for the victim of a
// job that has one (the gpt example's warm-up and cosine decay); nullptr: none.
void train(StagedModel& m, torch::optim::Optimizer& opt, const torch::Tensor& x, const torch::Tensor& y, int64_t steps,
           int64_t batch, bool cosine, const OptimizerSpec* schedule = nullptr) {
  const auto base_lrs = group_lrs(opt);
  const int64_t n = x.size(0);
  batch = std::min(batch, n);
  m.train(true);
  torch::Tensor perm;
  int64_t cursor = n;
  for (int64_t step = 0; step < steps; ++step) {
    if (cursor + batch > n) {
      perm = torch::randperm(n, torch::kLong);
      cursor = 0;
    }
    const auto idx = perm.slice(0, cursor, cursor + batch);
    cursor += batch;
    if (cosine) set_cosine_lr(opt, base_lrs, step, steps);
    if (schedule) shardd::set_learning_rate(opt, learning_rate_at(*schedule, step, steps));
    opt.zero_grad();
    const auto logits = m.forward(x.index_select(0, idx));
    // A language model's logits [b, t, V] against the next tokens [b, t]: every
    // position counts (shardd's loss); a classifier's as before.
    auto loss = logits.dim() == 3 ? shardd::prediction_loss(logits, y.index_select(0, idx))
                                  : torch::nn::functional::cross_entropy(logits, y.index_select(0, idx));
    loss.backward();
    opt.step();
  }
  m.train(false);
}

torch::Tensor predict(StagedModel& m, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  m.train(false);
  std::vector<torch::Tensor> out;
  for (int64_t b = 0; b < x.size(0); b += 1000) out.push_back(m.forward(x.slice(0, b, b + 1000)).argmax(1));
  return torch::cat(out);
}

// A language model on windows x [n, t] with next tokens y [n, t]: its predictions
// (argmax per position), next-token accuracy and mean loss in nats per token.
struct TokenScores {
  torch::Tensor pred;
  double accuracy = 0;
  double loss = 0;
};
TokenScores score_tokens(StagedModel& m, const torch::Tensor& x, const torch::Tensor& y) {
  torch::NoGradGuard no_grad;
  m.train(false);
  shardd::EvalResult r;
  std::vector<torch::Tensor> out;
  constexpr int64_t kChunk = 64;  // windows per forward pass (the attention scores are [64, heads, t, t])
  for (int64_t b = 0; b < x.size(0); b += kChunk) {
    const auto logits = m.forward(x.slice(0, b, b + kChunk));
    shardd::score_batch(logits, y.slice(0, b, b + kChunk), r);
    out.push_back(logits.argmax(-1));
  }
  return {torch::cat(out), r.accuracy(), r.loss()};
}

bool is_language_model(const JobSpec& spec) { return spec.dataset.format == "tokens"; }

// The samples of a split as plain tensors: images [n, 1, 28, 28] and labels [n], or,
// for a language model, its windows [n, t] and their next tokens [n, t] (training
// windows as the first epoch cuts them; test windows from validation.tokens, back to
// back). At most `limit` test samples (0 = all).
void load_split(const JobSpec& spec, shardd::Split split, int64_t limit, torch::Tensor* x, torch::Tensor* y) {
  JobSpec job = spec;
  if (split == shardd::Split::kTest) job.dataset.max_test_samples = limit;
  if (!is_language_model(job)) {
    *x = shardd::load_images(job.dataset, split);
    *y = shardd::load_labels(job.dataset, split);
    return;
  }
  const auto s = shardd::Samples::load(job, split, /*features=*/true, /*targets=*/true);
  const auto idx = shardd::Samples::range(0, s.size());
  *x = s.features(idx, 0);
  *y = s.targets(idx, 0);
}

std::vector<std::string> parse_attacks_list(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream ss(list);
  std::string a;
  while (std::getline(ss, a, ',')) out.push_back(a);
  return out;
}

std::string settings_line(const StudyOptions& o, const std::vector<StudyJob>& jobs) {
  std::ostringstream s;
  // method=2: A2/A3 within the one budget, several scratch runs, a validation split
  // (issue 19). An --out of the first study (no method=) is refused, not mixed in.
  s << "method=2 steps=" << o.steps << " batch=" << o.batch_size << " lr=" << o.learning_rate
    << " low_lr_factor=" << o.low_lr_factor << " fit_steps=" << o.fit_steps << " scratch_runs=" << o.scratch_runs
    << " val_samples=" << o.val_samples << " test_samples=" << o.test_samples
    << " victim_train_samples=" << o.victim_train_samples
    << " victim_epochs=" << o.victim_epochs << " checkpoints=" << (o.checkpoint_dir.empty() ? "no" : o.checkpoint_dir);
  // A4's settings only when it runs: an --out of the other attacks keeps its line, and
  // run() accepts the line with or without this part as long as the rest matches.
  if (const auto attacks = parse_attacks_list(o.attacks);
      std::find(attacks.begin(), attacks.end(), "A4") != attacks.end()) {
    const A4Config& k = a4_config();
    s << " a4(batch" << k.batch << ",dirs" << k.directions << ",eps" << k.epsilon << ",sub" << k.substitute_steps
      << ",z" << k.z_dim << ",lr_s" << k.substitute_lr << ",lr_g" << k.generator_lr << ",gen32x16,balance" << k.balance << ",replay" << k.replay
      << ",samples" << o.a4_samples << ")";
  }
  for (const auto& j : jobs) {
    const auto& m = j.spec.model;
    s << " " << j.model << "(h" << m.hidden << ",d" << m.depth << ",c" << m.channels << ",heads" << m.heads << ",p"
      << m.patch_size << ",shards" << j.spec.sharding.shards << "," << j.spec.sharding.balance << ",seed"
      << j.spec.training.seed << ",epochs" << j.spec.training.epochs << ",batch" << j.spec.training.batch_size;
    // A language model's shape and its victim's schedule (the image jobs' lines stay
    // as they were, so that their --out directories resume).
    if (is_language_model(j.spec)) {
      const auto& opt = j.spec.training.optimizer;
      s << ",vocab" << m.vocab << ",context" << m.context << ",warmup" << opt.warmup_steps << ",decay"
        << (opt.decay.empty() ? "none" : opt.decay) << ",lr" << opt.learning_rate;
    }
    s << ")";
  }
  return s.str();
}

std::vector<std::string> parse_attacks(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream ss(list);
  std::string a;
  while (std::getline(ss, a, ',')) {
    if (std::find(all_attacks().begin(), all_attacks().end(), a) == all_attacks().end()) {
      throw StudyError("--attacks: unknown attack \"" + a + "\" (known: A1-frozen, A1-lowlr, A2, A3, A4)");
    }
    if (std::find(out.begin(), out.end(), a) == out.end()) out.push_back(a);
  }
  if (out.empty()) throw StudyError("--attacks \"" + list + "\": no attack");
  return out;
}

// One planned cell.
struct Cell {
  size_t job = 0;
  int seed = 0;
  int64_t samples = 0;
  StudyRow row;        // name "-" for the controls
  std::string attack;  // scratch | scratch-<k> | victim | A1-frozen | A1-lowlr | A2 | A3 | A4
  double exposure = 0;
  int64_t queries = 0;  // A4: the query budget
};

std::string held_of(const StudyRow& r) {
  std::string s;
  for (size_t i = 0; i < r.held.size(); ++i) s += (i ? "+" : "") + std::to_string(r.held[i]);
  return s;
}

// Everything one model's cells share.
struct ModelState {
  const StudyJob* job = nullptr;
  StagedModel victim;
  double victim_seconds = 0;
  torch::Tensor test_x, test_y, victim_pred;
  double victim_accuracy = 0;
  bool lm = false;         // a language model: cells also carry the loss, and R is on it
  double victim_loss = 0;  // nats per token on the test windows (language models)
  double pixel_lo = 0, pixel_hi = 1;  // the normalised training images' range (A4's generator covers it)
};

// A4's generator: z → a 1×28×28 image, tanh-bounded, mapped by the caller onto the
// range of the normalised training images. Two nearest-neighbour upsamplings of a
// 7×7 map of 32 channels, then 16, batch-normalised (DCGAN-like, small: about 1 M
// multiply-adds per image, less than the example cnn's first stage).
torch::nn::Sequential make_generator(int64_t z_dim) {
  namespace nn = torch::nn;
  return nn::Sequential(
      nn::Linear(z_dim, 32 * 7 * 7), nn::Functional([](const torch::Tensor& x) { return x.view({-1, 32, 7, 7}); }),
      nn::BatchNorm2d(32), nn::ReLU(),
      nn::Upsample(nn::UpsampleOptions().scale_factor(std::vector<double>{2, 2}).mode(torch::kNearest)),
      nn::Conv2d(nn::Conv2dOptions(32, 16, 3).padding(1)), nn::BatchNorm2d(16), nn::ReLU(),
      nn::Upsample(nn::UpsampleOptions().scale_factor(std::vector<double>{2, 2}).mode(torch::kNearest)),
      nn::Conv2d(nn::Conv2dOptions(16, 1, 3).padding(1)), nn::Tanh());
}

// Log-probabilities minus their mean over the classes: the logits up to the constant
// a black box's probabilities cannot tell (DFME's logit recovery).
torch::Tensor centred_log_probs(const torch::Tensor& logits) {
  auto lp = torch::log_softmax(logits, 1);
  return lp - lp.mean(1, /*keepdim=*/true);
}

// The validation images of one seed and the victim's predictions on them.
struct Validation {
  torch::Tensor x, y, victim_pred;
  double victim_loss = 0;  // language models
};

class Runner {
 public:
  Runner(const StudyOptions& o, std::vector<StudyJob> jobs) : o_(o), jobs_(std::move(jobs)) {}

  int run();

 private:
  void prepare_model(size_t j);
  CellResult run_cell(const Cell& c);
  std::vector<int64_t> seed_order(int seed) const;
  void attacker_data(int seed, int64_t n, torch::Tensor* x, torch::Tensor* y) const;
  const Validation& validation(int seed);
  StagedModel& substitute_model(const Cell& c, int64_t steps);
  int64_t train_cell(StagedModel& m, const std::vector<int>& frozen, const std::vector<int>& low, const Cell& c,
                     int64_t steps, const std::string& salt = "");
  void evaluate(StagedModel& m, int seed, CellResult* r);
  int64_t run_a4(StagedModel& m, const std::vector<int>& known, const Cell& c);

  const StudyOptions& o_;
  std::vector<StudyJob> jobs_;
  torch::Tensor train_x_, train_y_;
  size_t loaded_ = static_cast<size_t>(-1);
  ModelState state_;
  std::map<std::string, StagedModel> substitutes_;
  std::map<int, Validation> validation_;
};

void Runner::prepare_model(size_t j) {
  if (loaded_ == j) return;
  substitutes_.clear();
  validation_.clear();
  const StudyJob& job = jobs_[j];
  state_ = ModelState{};
  state_.job = &job;
  state_.lm = is_language_model(job.spec);
  // Each job its own data (an image job and the gpt's token files in one run).
  load_split(job.spec, shardd::Split::kTrain, 0, &train_x_, &train_y_);
  load_split(job.spec, shardd::Split::kTest, o_.test_samples, &state_.test_x, &state_.test_y);

  state_.victim = build_model(job.spec.model, job.cut, job.spec.training.seed);
  if (!o_.checkpoint_dir.empty()) {
    std::vector<shardd::ShardFile> files;
    try {
      files = shardd::find_shard_files(job.spec, o_.checkpoint_dir, o_.key_dir);
    } catch (const std::exception& e) {
      throw StudyError("--checkpoints " + o_.checkpoint_dir + ": " + e.what());
    }
    int64_t step = 0;
    auto whole = shardd::recombine(job.spec, files, &step);
    for (auto& s : state_.victim.stages) copy_stage(s, whole);
    std::printf("victim %s: recombined from %zu shard checkpoints at step %lld\n", job.model.c_str(), files.size(),
                static_cast<long long>(step));
  } else {
    const int epochs = o_.victim_epochs > 0 ? o_.victim_epochs : job.spec.training.epochs;
    const int64_t n = o_.victim_train_samples > 0 ? std::min<int64_t>(o_.victim_train_samples, train_x_.size(0))
                                                  : train_x_.size(0);
    const std::string path = o_.out_dir + "/models/victim-" + job.model + "-n" + std::to_string(n) + "-e" +
                             std::to_string(epochs) + "-seed" + std::to_string(job.spec.training.seed) + ".pt";
    if (fs::exists(path)) {
      load_model(state_.victim, path);
      std::printf("victim %s: loaded %s\n", job.model.c_str(), path.c_str());
    } else {
      const auto t0 = Clock::now();
      const int64_t batch = job.spec.training.batch_size;
      const int64_t steps = epochs * (n / batch);
      std::printf("victim %s: training on %lld samples, %d epoch(s), %lld steps of %lld\n", job.model.c_str(),
                  static_cast<long long>(n), epochs, static_cast<long long>(steps), static_cast<long long>(batch));
      std::fflush(stdout);
      torch::manual_seed(job.spec.training.seed);
      std::vector<torch::Tensor> params;
      for (auto& s : state_.victim.stages) {
        for (auto& p : s->parameters()) params.push_back(p);
      }
      const auto& ospec = job.spec.training.optimizer;
      auto opt = shardd::make_optimizer(ospec, params);
      // The job's schedule where it has one (the gpt example: warm-up, cosine decay).
      const bool scheduled = ospec.warmup_steps > 0 || ospec.decay == "cosine";
      train(state_.victim, *opt, train_x_.slice(0, 0, n), train_y_.slice(0, 0, n), steps, batch, /*cosine=*/false,
            scheduled ? &ospec : nullptr);
      state_.victim_seconds = seconds_since(t0);
      save_model(state_.victim, path);
    }
  }
  state_.pixel_lo = train_x_.defined() ? train_x_.min().item<double>() : 0.0;
  state_.pixel_hi = train_x_.defined() ? train_x_.max().item<double>() : 1.0;
  if (state_.lm) {
    const auto sc = score_tokens(state_.victim, state_.test_x, state_.test_y);
    state_.victim_pred = sc.pred;
    state_.victim_accuracy = sc.accuracy;
    state_.victim_loss = sc.loss;
    std::printf("victim %s: test loss %.4f nats/token (%.3f bits/token), next-token accuracy %.4f, on %lld test windows\n",
                job.model.c_str(), sc.loss, sc.loss / std::log(2.0), sc.accuracy,
                static_cast<long long>(state_.test_x.size(0)));
  } else {
    state_.victim_pred = predict(state_.victim, state_.test_x);
    state_.victim_accuracy = state_.victim_pred.eq(state_.test_y).to(torch::kDouble).mean().item<double>();
    std::printf("victim %s: test accuracy %.4f on %lld test samples\n", job.model.c_str(), state_.victim_accuracy,
                static_cast<long long>(state_.test_x.size(0)));
  }
  std::fflush(stdout);
  loaded_ = j;
}

// A permutation of the training set drawn from the seed. The attacker's labelled
// samples are its first n, so that for one seed the 60 lie inside the 600, and the
// 600 inside the 6,000; the seed's validation images are its last --val-samples,
// which no attacker of that seed trains on (validate_study keeps them apart).
std::vector<int64_t> Runner::seed_order(int seed) const {
  return shardd::epoch_order(fnv1a("attacker-data") ^ static_cast<uint64_t>(seed), 0, train_x_.size(0));
}

void Runner::attacker_data(int seed, int64_t n, torch::Tensor* x, torch::Tensor* y) const {
  const auto order = seed_order(seed);
  auto idx = torch::tensor(std::vector<int64_t>(order.begin(), order.begin() + n), torch::kLong);
  *x = train_x_.index_select(0, idx);
  *y = train_y_.index_select(0, idx);
}

const Validation& Runner::validation(int seed) {
  auto it = validation_.find(seed);
  if (it != validation_.end()) return it->second;
  const auto order = seed_order(seed);
  auto idx = torch::tensor(std::vector<int64_t>(order.end() - o_.val_samples, order.end()), torch::kLong);
  Validation v;
  v.x = train_x_.index_select(0, idx);
  v.y = train_y_.index_select(0, idx);
  if (state_.lm) {
    const auto sc = score_tokens(state_.victim, v.x, v.y);
    v.victim_pred = sc.pred;
    v.victim_loss = sc.loss;
  } else {
    v.victim_pred = predict(state_.victim, v.x);
  }
  return validation_.emplace(seed, std::move(v)).first->second;
}

// The seed of one random choice of a cell: a hash of model, row, what it seeds,
// size and seed. The attack is deliberately not in it: the attacks of one row start
// from the same initialisation of their unknown stages and see the same batch order
// (common random numbers), so they differ only by what they do. Scratch runs after
// the first add their run ("init-2", "batches-2", … through `salt`).
uint64_t cell_seed(const Cell& c, const std::string& model, const std::string& what) {
  return fnv1a(model + "|" + c.row.name + "|" + what + "|" + std::to_string(c.samples) + "|" + std::to_string(c.seed));
}

// "-<k>" for the k-th scratch run (k ≥ 2), "" otherwise.
std::string run_salt(const std::string& attack) {
  return is_scratch(attack) && attack != "scratch" ? attack.substr(std::string("scratch").size()) : "";
}

// Trains the stages not in `frozen` for `steps` steps; stages in `low` at lr ×
// low_lr_factor. Returns the optimiser steps taken (0 when nothing is trainable).
int64_t Runner::train_cell(StagedModel& m, const std::vector<int>& frozen, const std::vector<int>& low, const Cell& c,
                           int64_t steps, const std::string& salt) {
  std::vector<torch::Tensor> normal, slow;
  for (size_t i = 0; i < m.stages.size(); ++i) {
    const int si = static_cast<int>(i);
    const bool is_frozen = std::find(frozen.begin(), frozen.end(), si) != frozen.end();
    const bool is_low = std::find(low.begin(), low.end(), si) != low.end();
    for (auto& p : m.stages[i]->parameters()) {
      p.set_requires_grad(!is_frozen);
      if (is_frozen) continue;
      (is_low ? slow : normal).push_back(p);
    }
  }
  if (normal.empty() && slow.empty()) return 0;
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!normal.empty()) groups.emplace_back(normal, std::make_unique<torch::optim::AdamOptions>(o_.learning_rate));
  if (!slow.empty()) {
    groups.emplace_back(slow, std::make_unique<torch::optim::AdamOptions>(o_.learning_rate * o_.low_lr_factor));
  }
  torch::optim::Adam opt(std::move(groups), torch::optim::AdamOptions(o_.learning_rate));
  torch::Tensor x, y;
  attacker_data(c.seed, c.samples, &x, &y);
  torch::manual_seed(cell_seed(c, state_.job->model, "batches" + salt));
  train(m, opt, x, y, steps, o_.batch_size, /*cosine=*/true);
  return steps;
}

// A2's substitute: the attacker's own model trained from scratch on its data for
// the first phase of A2's budget (`steps`, its own cosine schedule), from the first
// scratch run's initialisation and batch order. Shared by the A2 cells of one size
// and seed, and kept in models/ for a resumed run.
StagedModel& Runner::substitute_model(const Cell& c, int64_t steps) {
  const std::string key = std::to_string(c.samples) + "|" + std::to_string(c.seed);
  auto it = substitutes_.find(key);
  if (it != substitutes_.end()) return it->second;
  Cell sc = c;
  sc.row = StudyRow{"-", {}, -1};
  sc.attack = "scratch";
  StagedModel m = build_model(state_.job->spec.model, state_.job->cut, cell_seed(sc, state_.job->model, "init"));
  const std::string path = o_.out_dir + "/models/substitute-" + state_.job->model + "-n" + std::to_string(c.samples) +
                           "-seed" + std::to_string(c.seed) + "-steps" + std::to_string(steps) + ".pt";
  if (fs::exists(path)) {
    load_model(m, path);
  } else {
    train_cell(m, {}, {}, sc, steps);
    save_model(m, path);
  }
  return substitutes_.emplace(key, std::move(m)).first->second;
}

void Runner::evaluate(StagedModel& m, int seed, CellResult* r) {
  if (state_.lm) {
    // Per predicted token: accuracy, agreement with the victim, and the loss R is on.
    const auto t = score_tokens(m, state_.test_x, state_.test_y);
    r->accuracy = t.accuracy;
    r->fidelity = t.pred.eq(state_.victim_pred).to(torch::kDouble).mean().item<double>();
    r->loss = t.loss;
    const Validation& v = validation(seed);
    const auto vs = score_tokens(m, v.x, v.y);
    r->val_accuracy = vs.accuracy;
    r->val_loss = vs.loss;
    return;
  }
  const auto pred = predict(m, state_.test_x);
  r->accuracy = pred.eq(state_.test_y).to(torch::kDouble).mean().item<double>();
  r->fidelity = pred.eq(state_.victim_pred).to(torch::kDouble).mean().item<double>();
  const Validation& v = validation(seed);
  r->val_accuracy = predict(m, v.x).eq(v.y).to(torch::kDouble).mean().item<double>();
}

// A4, the query attacker (DFME style): the held stages frozen, the missing ones
// trained to agree with the victim — which it can only query, as a black box that
// returns probabilities — on images from a generator trained to find where they
// disagree. Returns the queries spent (≤ the budget; 0 for `all`, which is the victim).
int64_t Runner::run_a4(StagedModel& m, const std::vector<int>& known, const Cell& c) {
  const A4Config& k = a4_config();
  std::vector<torch::Tensor> params;
  for (size_t i = 0; i < m.stages.size(); ++i) {
    const bool held = std::find(known.begin(), known.end(), static_cast<int>(i)) != known.end();
    for (auto& p : m.stages[i]->parameters()) {
      p.set_requires_grad(!held);
      if (!held) params.push_back(p);
    }
  }
  if (params.empty()) return 0;
  torch::manual_seed(cell_seed(c, state_.job->model, "a4"));
  auto gen = make_generator(k.z_dim);
  torch::optim::Adam sub_opt(params, torch::optim::AdamOptions(k.substitute_lr));
  torch::optim::Adam gen_opt(gen->parameters(), torch::optim::AdamOptions(k.generator_lr));
  const auto sub_lrs = group_lrs(sub_opt);
  const double lo = state_.pixel_lo, hi = state_.pixel_hi;
  const int64_t B = k.batch, dirs = k.directions;
  std::vector<int64_t> image_shape(train_x_.sizes().begin() + 1, train_x_.sizes().end());
  const double dim = static_cast<double>(train_x_[0].numel());
  auto shape_of = [&](int64_t n) {
    std::vector<int64_t> s{n};
    s.insert(s.end(), image_shape.begin(), image_shape.end());
    return s;
  };
  int64_t used = 0;
  // The black box: every image it evaluates is a query.
  auto query = [&](const torch::Tensor& x) {
    torch::NoGradGuard no_grad;
    used += x.size(0);
    return centred_log_probs(state_.victim.forward(x));
  };
  auto generate = [&](int64_t n) { return lo + (gen->forward(torch::randn({n, k.z_dim})) + 1.0) * (0.5 * (hi - lo)); };
  // Replay: the latest k.replay queries (image, victim's answer), a ring.
  const int64_t cap = std::min<int64_t>(k.replay, std::max<int64_t>(c.queries, B));
  torch::Tensor mem_x = torch::empty(shape_of(cap)), mem_y;
  int64_t mem_n = 0, mem_pos = 0;
  auto remember = [&](const torch::Tensor& x, const torch::Tensor& y) {
    if (!mem_y.defined()) mem_y = torch::empty({cap, y.size(1)});
    const auto idx = torch::arange(mem_pos, mem_pos + x.size(0), torch::kLong).remainder(cap);
    mem_x.index_copy_(0, idx, x);
    mem_y.index_copy_(0, idx, y);
    mem_pos = (mem_pos + x.size(0)) % cap;
    mem_n = std::min(cap, mem_n + x.size(0));
  };
  torch::Tensor lx, ly;
  if (c.samples > 0) attacker_data(c.seed, c.samples, &lx, &ly);

  const int64_t rounds = k.rounds(c.queries);
  const int64_t sub_total = rounds * k.substitute_steps;
  int64_t sub_step = 0;
  gen->train(true);
  for (int64_t round = 0; round < rounds; ++round) {
    // Generator step: ascend the substitute–victim L1 disagreement ℓ(x) at x = G(z).
    // ∇x ℓ through the black box by forward differences along `dirs` random unit
    // directions u per image: g ≈ (dim / dirs) Σ (ℓ(x + ε u) − ℓ(x)) / ε · u.
    m.train(false);
    torch::Tensor x = generate(B);
    torch::Tensor grad;
    torch::Tensor xd = x.detach();
    {
      torch::NoGradGuard no_grad;
      std::vector<int64_t> per_image{-1};  // one norm per image, broadcast over its pixels
      per_image.insert(per_image.end(), image_shape.size(), 1);
      auto u = torch::randn(shape_of(B * dirs));
      u = u / u.flatten(1).norm(2, 1).clamp_min(1e-12).view(per_image);
      const auto base = xd.repeat_interleave(dirs, 0);  // image i's copies next to each other
      const auto xp = base + k.epsilon * u;
      const auto v0 = query(xd);
      const auto vp = query(xp);
      const auto l0 = (centred_log_probs(m.forward(xd)) - v0).abs().mean(1);
      const auto lp = (centred_log_probs(m.forward(xp)) - vp).abs().mean(1).view({B, dirs});
      const auto coef = (lp - l0.unsqueeze(1)) * (dim / (k.epsilon * static_cast<double>(dirs)));
      grad = (coef.reshape({B * dirs, 1}) * u.flatten(1)).view({B, dirs, -1}).sum(1).view(shape_of(B));
      remember(xd, v0);
    }
    // Gradient ascent on ℓ (the estimate enters as a linear term in x), plus a class
    // balance term through the substitute, which the attacker holds (no queries): the
    // negative entropy of the batch's mean predicted class distribution, so that the
    // generator does not collapse onto one class of the victim.
    gen_opt.zero_grad();
    const auto mean_p = torch::softmax(m.forward(x), 1).mean(0);
    const auto neg_entropy = (mean_p * torch::log(mean_p.clamp_min(1e-12))).sum();
    const auto gen_loss = -(x * grad).sum() / static_cast<double>(B) + k.balance * neg_entropy;
    gen_loss.backward();
    gen_opt.step();
    // Substitute steps: agree with the victim (L1 on centred log-probabilities) on
    // fresh generated images and as many replayed past queries (and, with labelled
    // samples, cross-entropy on a batch of them).
    for (int64_t s = 0; s < k.substitute_steps; ++s, ++sub_step) {
      torch::Tensor xq;
      {
        torch::NoGradGuard no_grad;
        xq = generate(B);
      }
      const auto vq = query(xq);
      torch::Tensor xb = xq, yb = vq;
      if (mem_n > 0) {
        const auto idx = torch::randint(mem_n, {B}, torch::kLong);
        xb = torch::cat({xq, mem_x.index_select(0, idx)});
        yb = torch::cat({vq, mem_y.index_select(0, idx)});
      }
      remember(xq, vq);
      m.train(true);
      set_cosine_lr(sub_opt, sub_lrs, sub_step, sub_total);
      sub_opt.zero_grad();
      auto loss = (centred_log_probs(m.forward(xb)) - yb).abs().mean(1).mean();
      if (lx.defined()) {
        const auto idx = torch::randint(lx.size(0), {std::min<int64_t>(B, lx.size(0))}, torch::kLong);
        loss = loss + torch::nn::functional::cross_entropy(m.forward(lx.index_select(0, idx)), ly.index_select(0, idx));
      }
      loss.backward();
      sub_opt.step();
    }
  }
  m.train(false);
  if (used > c.queries || used != rounds * k.queries_per_round()) {
    throw std::logic_error("study: A4 cell spent " + std::to_string(used) + " queries of a budget of " +
                           std::to_string(c.queries) + " (" + std::to_string(rounds) + " rounds of " +
                           std::to_string(k.queries_per_round()) + ")");
  }
  return used;
}

CellResult Runner::run_cell(const Cell& c) {
  prepare_model(c.job);
  const StudyJob& job = jobs_[c.job];
  CellResult r;
  r.model = job.model;
  r.row = c.row.name;
  r.held = held_of(c.row);
  r.exposure = c.exposure;
  r.attack = c.attack;
  r.samples = c.samples;
  r.seed = c.seed;
  const auto t0 = Clock::now();
  const int n = static_cast<int>(job.cut.size());

  if (c.attack == "victim") {
    r.accuracy = state_.victim_accuracy;
    r.fidelity = 1.0;
    const Validation& v = validation(c.seed);
    r.val_accuracy = v.victim_pred.eq(v.y).to(torch::kDouble).mean().item<double>();
    if (state_.lm) {
      r.loss = state_.victim_loss;
      r.val_loss = v.victim_loss;
    }
    r.wall_seconds = state_.victim_seconds;
    return r;
  }
  // The budget, phase by phase (attack_phases: the same total for every cell).
  const auto phases = attack_phases(c.attack, o_.steps, o_.fit_steps);
  int64_t spent = 0;
  const std::string salt = run_salt(c.attack);
  StagedModel m = build_model(job.spec.model, job.cut, cell_seed(c, job.model, "init" + salt));
  if (is_scratch(c.attack)) {
    // A data-free attacker's scratch level (A4 without labelled samples): a model
    // with no data and no queries, its initialisation untrained.
    if (c.samples > 0) spent += train_cell(m, {}, {}, c, phases[0].steps, salt);
    evaluate(m, c.seed, &r);
    r.wall_seconds = seconds_since(t0);
    return r;
  }
  std::vector<int> known = c.row.held;
  std::vector<int> unknown;
  for (int i = 0; i < n; ++i) {
    if (std::find(known.begin(), known.end(), i) == known.end()) unknown.push_back(i);
  }
  for (int i : known) copy_stage(m.stages[i], state_.victim.stages[i]);

  if (c.attack == "A4") {
    // Its budget is in queries and rounds (a4_config), not --steps.
    r.queries = c.queries;
    run_a4(m, known, c);
    evaluate(m, c.seed, &r);
    r.wall_seconds = seconds_since(t0);
    return r;
  }
  if (c.attack == "A1-frozen") {
    spent += train_cell(m, known, {}, c, phases[0].steps);
  } else if (c.attack == "A1-lowlr") {
    spent += train_cell(m, {}, known, c, phases[0].steps);
  } else if (c.attack == "A2") {
    // The substitute's training is A2's first phase, the fine-tuning its second.
    if (!unknown.empty()) {
      StagedModel& sub = substitute_model(c, phases[0].steps);
      spent += phases[0].steps;
      for (int i : unknown) copy_stage(m.stages[i], sub.stages[i]);
      spent += train_cell(m, known, {}, c, phases[1].steps);
    }
  } else if (c.attack == "A3") {
    // Fit the sandwiched stage to the (input, output) pairs recorded at its two
    // boundaries while the attacker's samples flowed through the victim.
    const int s = c.row.sandwiched;
    torch::Tensor x, y;
    attacker_data(c.seed, c.samples, &x, &y);
    torch::Tensor in, out;
    {
      torch::NoGradGuard no_grad;
      in = state_.victim.forward(x, 0, s);
      out = state_.victim.forward(in, s, s + 1);
    }
    auto params = m.stages[s]->parameters();
    torch::optim::Adam opt(params, torch::optim::AdamOptions(o_.learning_rate));
    const auto fit_lrs = group_lrs(opt);
    torch::manual_seed(cell_seed(c, job.model, "fit"));
    const int64_t rows = in.size(0), batch = std::min<int64_t>(o_.batch_size, rows);
    // With nothing left to train after the fit (a 3-stage model's sw1), the fit gets
    // the whole budget.
    const bool rest = std::any_of(unknown.begin(), unknown.end(), [&](int i) { return i != s; });
    const int64_t fit_steps = rest ? phases[0].steps : o_.steps;
    m.stages[s]->train(true);
    torch::Tensor perm;
    int64_t cursor = rows;
    for (int64_t step = 0; step < fit_steps; ++step) {
      if (cursor + batch > rows) {
        perm = torch::randperm(rows, torch::kLong);
        cursor = 0;
      }
      const auto idx = perm.slice(0, cursor, cursor + batch);
      cursor += batch;
      set_cosine_lr(opt, fit_lrs, step, fit_steps);
      opt.zero_grad();
      auto loss = torch::mse_loss(m.stages[s]->forward(in.index_select(0, idx)), out.index_select(0, idx));
      loss.backward();
      opt.step();
    }
    spent += fit_steps;
    // Then the stages still unknown, as in A1-frozen, for the rest of the budget.
    std::vector<int> fixed = known;
    fixed.push_back(s);
    spent += train_cell(m, fixed, {}, c, phases[1].steps);
  }
  // Nothing trainable (`all`) spends nothing; any cell that trains spends the budget.
  if (spent != 0 && spent != o_.steps) {
    throw std::logic_error("study: cell " + r.key() + " trained " + std::to_string(spent) + " steps, not the " +
                           std::to_string(o_.steps) + " of --steps");
  }
  evaluate(m, c.seed, &r);
  r.wall_seconds = seconds_since(t0);
  return r;
}

int Runner::run() {
  fs::create_directories(o_.out_dir + "/models");
  const std::string csv = o_.out_dir + "/results.csv";
  const std::string settings_file = o_.out_dir + "/settings.txt";
  const std::string settings = settings_line(o_, jobs_);
  if (fs::exists(settings_file)) {
    const std::string old = trim(read_file(settings_file));
    // The A4 part (" a4(...)") is present only when A4 runs: the rest must match, and
    // the A4 parts where both have one; a first A4 run records its part.
    const auto a4_part = [](const std::string& line) {
      const auto at = line.find(" a4(");
      return at == std::string::npos ? std::string() : line.substr(at, line.find(')', at) + 1 - at);
    };
    const auto without_a4 = [&](std::string line) {
      const std::string p = a4_part(line);
      if (!p.empty()) line.erase(line.find(p), p.size());
      return line;
    };
    const bool same = without_a4(old) == without_a4(settings) &&
                      (a4_part(old).empty() || a4_part(settings).empty() || a4_part(old) == a4_part(settings));
    if (same && a4_part(old).empty() && !a4_part(settings).empty()) write_file_atomic(settings_file, settings + "\n");
    if (!same) {
      throw StudyError("--out " + o_.out_dir + ": holds results of other settings (" + old +
                       "); use another --out, or the same flags");
    }
  } else {
    write_file_atomic(settings_file, settings + "\n");
  }

  // Cells already measured; a line cut short by an interruption is dropped.
  std::set<std::string> done;
  if (fs::exists(csv)) {
    const std::string text = read_file(csv);
    CsvSkipped skipped;
    for (const auto& c : parse_csv(text, &skipped)) done.insert(c.key());
    // A line cut short is the normal trace of an interruption, dropped below; the others
    // stay in the file, and a cell that only they held is measured again.
    if (skipped.lines > 0) {
      std::cerr << "study: " << describe_skipped(csv, CsvSkipped{skipped.lines, skipped.first, 0}) << "\n";
    }
    const auto last_nl = text.rfind('\n');
    const size_t keep = last_nl == std::string::npos ? 0 : last_nl + 1;
    if (keep != text.size()) fs::resize_file(csv, keep);
  }
  const bool fresh = !fs::exists(csv) || fs::file_size(csv) == 0;
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> out(std::fopen(csv.c_str(), "a"), &std::fclose);
  if (!out) throw std::runtime_error("cannot open " + csv + " for appending: " + std::strerror(errno));
  // One whole line per finished cell, flushed at once: a full disk or a lost volume
  // stops the study with the reason instead of training cells whose results vanish.
  const auto append = [&](const std::string& line) {
    if (std::fprintf(out.get(), "%s\n", line.c_str()) < 0 || std::fflush(out.get()) != 0) {
      throw std::runtime_error("cannot append to " + csv + ": " + std::strerror(errno));
    }
  };
  if (fresh) append(csv_header());

  // The plan.
  const auto sizes = parse_sizes("--samples", o_.samples);
  auto attacks = parse_attacks(o_.attacks);
  const bool a4 = std::find(attacks.begin(), attacks.end(), "A4") != attacks.end();
  attacks.erase(std::remove(attacks.begin(), attacks.end(), "A4"), attacks.end());
  const auto budgets = a4 ? parse_sizes("--queries", o_.queries) : std::vector<int64_t>{};
  std::vector<Cell> cells;
  for (size_t j = 0; j < jobs_.size(); ++j) {
    const int n = static_cast<int>(jobs_[j].cut.size());
    const auto rows = parse_rows(o_.rows, n);
    for (int seed = o_.first_seed; seed < o_.first_seed + o_.seeds; ++seed) {
      std::set<int64_t> controls;  // sizes whose scratch runs and victim are planned
      const auto add_controls = [&](int64_t size) {
        Cell base;
        base.job = j;
        base.seed = seed;
        base.samples = size;
        base.row = StudyRow{"-", {}, -1};
        if (!controls.insert(size).second) return base;
        for (int run = 1; run <= o_.scratch_runs; ++run) {
          base.attack = scratch_run_name(run);
          cells.push_back(base);
        }
        base.attack = "victim";
        base.exposure = 1.0;
        cells.push_back(base);
        return base;
      };
      for (int64_t size : attacks.empty() ? std::vector<int64_t>{} : sizes) {
        const Cell base = add_controls(size);
        for (const auto& row : rows) {
          for (const auto& a : row_attacks(row, n, attacks)) {
            Cell c = base;
            c.row = row;
            c.attack = a;
            c.exposure = row_exposure(row, jobs_[j].shares);
            cells.push_back(c);
          }
        }
      }
      // A4: every row and budget at its own labelled size (0: data-free, whose scratch
      // level is an untrained model), after the other attacks of the seed.
      if (a4) {
        const Cell base = add_controls(o_.a4_samples);
        for (const auto& row : rows) {
          for (int64_t q : budgets) {
            Cell c = base;
            c.row = row;
            c.attack = "A4";
            c.queries = q;
            c.exposure = row_exposure(row, jobs_[j].shares);
            cells.push_back(c);
          }
        }
      }
    }
  }
  const auto key_of = [&](const Cell& c) {
    return jobs_[c.job].model + "|" + c.row.name + "|" + c.attack + "|" + std::to_string(c.samples) + "|" +
           std::to_string(c.seed) + (c.queries > 0 ? "|q" + std::to_string(c.queries) : "");
  };
  size_t todo = 0;
  for (const auto& c : cells) todo += done.count(key_of(c)) ? 0 : 1;
  std::printf("study: %zu cells (%zu model(s)), %zu already in %s, %zu to run\n", cells.size(), jobs_.size(),
              cells.size() - todo, csv.c_str(), todo);
  std::fflush(stdout);

  // Each model's training data is loaded with it (prepare_model).
  const auto start = Clock::now();
  size_t ran = 0;
  for (size_t i = 0; i < cells.size(); ++i) {
    const Cell& c = cells[i];
    if (done.count(key_of(c))) continue;
    const CellResult r = run_cell(c);
    append(to_csv_line(r));
    ++ran;
    const double elapsed = seconds_since(start);
    const double eta = elapsed / static_cast<double>(ran) * static_cast<double>(todo - ran);
    const std::string q = r.queries > 0 ? " q=" + std::to_string(r.queries) : "";
    // A language model's cell shows its loss (nats per token) first: its R is on it.
    char loss[32] = "";
    if (r.on_loss()) std::snprintf(loss, sizeof loss, "  loss %.4f", r.loss);
    std::printf("cell %zu of %zu  %s %-8s %-9s n=%-5lld seed %d%s%s  acc %.4f  fid %.4f  %.1fs  ETA %s\n", i + 1,
                cells.size(), r.model.c_str(), r.row.c_str(), r.attack.c_str(), static_cast<long long>(r.samples),
                r.seed, q.c_str(), loss, r.accuracy, r.fidelity, r.wall_seconds, format_duration(eta).c_str());
    std::fflush(stdout);
  }
  if (std::fclose(out.release()) != 0) throw std::runtime_error("cannot close " + csv + ": " + std::strerror(errno));
  return 0;
}

}  // namespace

void validate_study(const StudyOptions& o) {
  if (o.job_files.empty()) throw StudyError("--job: at least one ShardedTrainingJob file is needed");
  if (o.out_dir.empty()) throw StudyError("--out: an output directory is needed");
  if (o.seeds < 1) throw StudyError("--seeds " + std::to_string(o.seeds) + ": must be at least 1");
  if (o.steps < 1) throw StudyError("--steps " + std::to_string(o.steps) + ": must be at least 1");
  if (o.fit_steps < 0) throw StudyError("--fit-steps " + std::to_string(o.fit_steps) + ": must be ≥ 0 (0 = half of --steps)");
  attack_phases("A2", o.steps, o.fit_steps);  // the first phase leaves steps to the second
  if (o.scratch_runs < 1) {
    throw StudyError("--scratch-runs " + std::to_string(o.scratch_runs) + ": must be at least 1");
  }
  if (o.val_samples < 1) throw StudyError("--val-samples " + std::to_string(o.val_samples) + ": must be at least 1");
  if (o.batch_size < 1) throw StudyError("--batch " + std::to_string(o.batch_size) + ": must be at least 1");
  if (!(o.learning_rate > 0)) throw StudyError("--lr " + std::to_string(o.learning_rate) + ": must be positive");
  if (!(o.low_lr_factor > 0)) {
    throw StudyError("--low-lr-factor " + std::to_string(o.low_lr_factor) + ": must be positive");
  }
  if (o.test_samples < 0) throw StudyError("--test-samples " + std::to_string(o.test_samples) + ": must be ≥ 0");
  const auto attacks = parse_attacks(o.attacks);
  const bool a4 = std::find(attacks.begin(), attacks.end(), "A4") != attacks.end();
  if (a4) {
    const int64_t round = a4_config().queries_per_round();
    for (int64_t q : parse_sizes("--queries", o.queries)) {
      if (q < round) {
        throw StudyError("--queries " + std::to_string(q) + ": below one round of A4 (" + std::to_string(round) +
                         " queries: a generator step and its forward differences, then the substitute steps)");
      }
    }
    if (o.a4_samples < 0) throw StudyError("--a4-samples " + std::to_string(o.a4_samples) + ": must be ≥ 0");
  }
  const auto jobs = load_study_jobs(o);
  const auto sizes = parse_sizes("--samples", o.samples);
  for (const auto& j : jobs) {
    parse_rows(o.rows, static_cast<int>(j.cut.size()));
    int64_t train_n = 0;
    try {
      train_n = shardd::count_samples(j.spec, shardd::Split::kTrain);  // a language model: training windows
    } catch (const std::exception& e) {
      throw StudyError("--job " + j.file + ": " + e.what());
    }
    if (a4 && j.spec.model.language_model()) {
      throw StudyError("--attacks A4: the query attacker generates images; model " + j.model + " of --job " + j.file +
                       " takes tokens");
    }
    std::vector<std::pair<const char*, int64_t>> checked;  // (flag, size): the error names the flag given
    for (int64_t s : sizes) checked.emplace_back("--samples", s);
    if (a4) checked.emplace_back("--a4-samples", o.a4_samples);
    for (const auto& [flag, s] : checked) {
      if (s > train_n) {
        throw StudyError(std::string(flag) + " " + std::to_string(s) + ": above the " + std::to_string(train_n) +
                         (is_language_model(j.spec) ? " training windows (of context + 1 tokens) in " : " samples of the training set of ") +
                         j.spec.dataset.path);
      }
      if (s + o.val_samples > train_n) {
        throw StudyError(std::string(flag) + " " + std::to_string(s) + " with --val-samples " + std::to_string(o.val_samples) +
                         ": the attacker's samples and the validation images overlap (" + std::to_string(train_n) +
                         " samples in the training set of " + j.spec.dataset.path + ")");
      }
    }
    if (o.victim_train_samples > train_n) {
      throw StudyError("--victim-samples " + std::to_string(o.victim_train_samples) + ": above the " +
                       std::to_string(train_n) + " samples of the training set");
    }
  }
  if (!o.checkpoint_dir.empty() || !o.key_dir.empty()) {
    if (o.checkpoint_dir.empty() || o.key_dir.empty()) {
      throw StudyError("--checkpoints and --keys go together (got only " +
                       std::string(o.checkpoint_dir.empty() ? "--keys " + o.key_dir : "--checkpoints " + o.checkpoint_dir) +
                       ")");
    }
    if (jobs.size() != 1) throw StudyError("--checkpoints: the victim can be loaded for one --job only");
    if (!fs::is_directory(o.checkpoint_dir)) {
      throw StudyError("--checkpoints " + o.checkpoint_dir + ": no such directory");
    }
    try {
      shardd::find_shard_files(jobs[0].spec, o.checkpoint_dir, o.key_dir);
    } catch (const std::exception& e) {
      throw StudyError("--checkpoints " + o.checkpoint_dir + ": " + e.what());
    }
  }
}

// The runner frees and allocates the same large tensors every step (activations,
// convolution workspaces). By default glibc gives blocks above 128 KiB back to the
// kernel at once and trims the heap's top, so every step faults its pages in again,
// zeroed: 15 % of an A4 cell's time in the kernel, measured. A study is one long-lived
// process that reaches its peak in the first steps, so keep what it freed.
void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // the most glibc allows on 64 bit
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 256 << 20);
}

int RunStudy(const StudyOptions& options) {
  if (options.report_only) return RunStudyReport(options);
  return study_exit_code([&] {
    validate_study(options);
    keep_freed_memory();
    auto jobs = load_study_jobs(options);
    make_dirs(options.out_dir);
    const auto lock = lock_study_out(options.out_dir);  // held through the run and its report
    const auto shares = shares_by_model(jobs);
    Runner runner(options, std::move(jobs));
    const int rc = runner.run();
    if (rc != 0) return rc;
    write_report(options.out_dir, !options.no_plots, shares);
    return 0;
  });
}

}  // namespace shardguard::shardctl
