// `shardctl recombine`: the whole model from every shard's checkpoint and key,
// evaluated on the test set (LibTorch; library shardguard_shardctl_torch).
#include <cmath>
#include <cstdio>
#include <iostream>

#include <torch/types.h>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/shardctl/torch_commands.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/data.h"
#include "shardguard/shardd/recombine.h"
#include "shardguard/shardd/trainer.h"

namespace shardguard::shardctl {

int RunRecombine(const RecombineOptions& o) {
  try {
    const JobSpec job = load_job_file(o.job_file);
    const auto files = shardd::find_shard_files(job, o.checkpoint_dir, o.key_dir);
    int64_t step = 0;
    auto whole = shardd::recombine(job, files, &step);
    const auto device = shardd::resolve_device(o.device);
    whole->to(device);
    whole->eval();
    const auto r = shardd::evaluate(whole, job, shardd::Split::kTest, device);
    std::printf("recombined %zu shards of job %s at step %lld: %lld parameters\n", files.size(), job.name.c_str(),
                static_cast<long long>(step), static_cast<long long>(model::describe_model(job.model).parameters()));
    if (job.model.language_model()) {
      std::printf("validation loss %.4f nats/token, perplexity %.2f, %.3f bits/token over %lld tokens\n", r.loss(),
                  std::exp(r.loss()), r.loss() / std::log(2.0), static_cast<long long>(r.total));
    } else {
      std::printf("test accuracy %.4f (%lld/%lld)\n", r.accuracy(), static_cast<long long>(r.correct),
                  static_cast<long long>(r.total));
    }
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
