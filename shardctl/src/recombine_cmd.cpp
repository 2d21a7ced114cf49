// `shardctl recombine`: the whole model from every shard's checkpoint and key,
// evaluated on the test set (LibTorch; library shardguard_shardctl_torch).
#include <cmath>
#include <cstdio>
#include <iostream>

#include <torch/types.h>

#include <sstream>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/model/package.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/shardctl/local_package.h"
#include "shardguard/shardctl/torch_commands.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/data.h"
#include "shardguard/shardd/generate.h"
#include "shardguard/common/token_file.h"
#include "shardguard/shardctl/local_run.h"
#include "shardguard/shardd/recombine.h"
#include "shardguard/shardd/script_model.h"
#include "shardguard/shardd/trainer.h"

namespace shardguard::shardctl {
namespace {

void print_eval(const JobSpec& job, const shardd::EvalResult& r) {
  if (job.dataset.format == "tokens") {
    std::printf("validation loss %.4f nats/token, perplexity %.2f, %.3f bits/token over %lld tokens\n", r.loss(),
                std::exp(r.loss()), r.loss() / std::log(2.0), static_cast<long long>(r.total));
  } else {
    std::printf("test accuracy %.4f (%lld/%lld)\n", r.accuracy(), static_cast<long long>(r.correct),
                static_cast<long long>(r.total));
  }
}

// --prompt: the recombined model generates in this process, with the window and the
// sampling of the pipeline (shardd/generate.h), so the same seed gives the same text
// as `shardctl generate` of the same checkpoints.
void generate_monolithic(torch::nn::Sequential& model, const JobSpec& job, const RecombineOptions& o,
                         const torch::Device& device) {
  LocalGenerate g{*o.prompt, o.tokens, o.temperature, o.top_k, o.seed, o.tokens_out};
  if (const std::string why = generation_refusal(job, g); !why.empty()) throw std::invalid_argument(why);
  shardd::GenerateOptions opt;
  opt.tokens = o.tokens;
  opt.temperature = o.temperature;
  opt.top_k = o.top_k;
  opt.seed = o.seed;
  std::vector<int64_t> tokens;
  for (const unsigned char c : *o.prompt) tokens.push_back(c);
  std::vector<uint16_t> generated;
  torch::NoGradGuard no_grad;
  model->eval();
  for (int64_t i = 0; i < o.tokens; ++i) {
    int position = 0;
    const auto logits = model->forward(shardd::generation_window(tokens, job.model.context, &position).to(device));
    const int64_t t = shardd::sample_token(logits[0][position], opt, i);
    tokens.push_back(t);
    generated.push_back(static_cast<uint16_t>(t));
  }
  if (!o.tokens_out.empty()) write_token_file(o.tokens_out, generated);
  const std::vector<uint16_t> prompt(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(o.prompt->size()));
  std::printf("generated %lld tokens in one process (temperature %g, top-k %d, seed %llu):\n%s%s\n",
              static_cast<long long>(o.tokens), o.temperature, o.top_k, static_cast<unsigned long long>(o.seed),
              printable_text(prompt).c_str(), printable_text(generated).c_str());
}

// A split TorchScript model: every package with its key and every shard's checkpoint
// with its key, written as one TorchScript model and evaluated.
int RecombinePackages(const JobSpec& job, const RecombineOptions& o) {
  if (o.package_key_dir.empty()) throw model::PackageError("--package needs --package-keys (the keys of split)");
  auto r = shardd::recombine_packages(job, o.package_dir, o.package_key_dir, o.checkpoint_dir, o.key_dir);
  if (!o.out_file.empty()) {
    std::ostringstream archive;
    r.module.save(archive);
    write_file_atomic(o.out_file, archive.str(), 0600);
  }
  const auto device = shardd::resolve_device(o.device);
  r.view->to(device);
  r.view->eval();
  const model::ModelDesc desc = r.manifest.desc();
  const auto ev = shardd::evaluate(r.view, job, shardd::Split::kTest, device, &desc);
  std::printf("recombined %zu packages and checkpoints of job %s at step %lld: %lld parameters\n",
              r.manifest.shards.size(), job.name.c_str(), static_cast<long long>(r.step),
              static_cast<long long>(r.manifest.parameters()));
  if (!o.out_file.empty()) std::printf("wrote the fine-tuned TorchScript model to %s (mode 0600)\n", o.out_file.c_str());
  print_eval(job, ev);
  if (o.prompt) generate_monolithic(r.view, job, o, device);
  return 0;
}

}  // namespace

int RunRecombine(const RecombineOptions& o) {
  try {
    const JobSpec job = load_job_file(o.job_file);
    if (!o.package_dir.empty() || job.model.from_package()) {
      // A package job names its packages (spec.model.package.path) and, by default,
      // split's keys beside them.
      RecombineOptions p = o;
      if (p.package_dir.empty()) p.package_dir = job.model.package->path;
      if (p.package_dir.empty()) {
        std::cerr << "shardctl recombine: --package: required for a job with spec.model.package.url (the directory "
                     "`shardctl split --out` wrote)\n";
        return 2;
      }
      if (p.package_key_dir.empty() && job.model.from_package()) p.package_key_dir = package_keys_dir(job, "");
      return RecombinePackages(job, p);
    }
    const auto files = shardd::find_shard_files(job, o.checkpoint_dir, o.key_dir);
    int64_t step = 0;
    auto whole = shardd::recombine(job, files, &step);
    const auto device = shardd::resolve_device(o.device);
    whole->to(device);
    whole->eval();
    const auto r = shardd::evaluate(whole, job, shardd::Split::kTest, device);
    std::printf("recombined %zu shards of job %s at step %lld: %lld parameters\n", files.size(), job.name.c_str(),
                static_cast<long long>(step), static_cast<long long>(model::describe_model(job.model).parameters()));
    print_eval(job, r);
    if (o.prompt) generate_monolithic(whole, job, o, device);
    return 0;
  } catch (const JobSpecError& e) {
    std::cerr << "shardctl recombine: invalid job " << o.job_file << ":\n" << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "shardctl recombine: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace shardguard::shardctl
