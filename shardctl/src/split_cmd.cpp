// `shardctl split MODEL.pt --job JOB.yaml --out DIR`: a TorchScript model cut into
// one encrypted package per shard (LibTorch; library shardguard_shardctl_torch).
// docs/shardctl.md and docs/distribution.md.
#include <algorithm>
#include <cstdio>
#include <iostream>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/package.h"
#include "shardguard/shardctl/torch_commands.h"
#include "shardguard/shardd/script_model.h"

namespace shardguard::shardctl {

int RunSplit(const SplitOptions& o) {
  JobSpec job;
  try {
    job = load_job_file(o.job_file);
  } catch (const JobSpecError& e) {
    std::cerr << "shardctl split: invalid job " << o.job_file << ":\n" << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "shardctl split: " << e.what() << "\n";
    return 2;
  }
  // A package job names where its packages go: spec.model.package.path (a url job's
  // are uploaded there from --out).
  const std::string out_dir = !o.out_dir.empty() ? o.out_dir : job.model.from_package() ? job.model.package->path : "";
  if (out_dir.empty()) {
    std::cerr << "shardctl split: --out: required (a job without spec.model.package.path names no package "
                 "directory)\n";
    return 2;
  }
  std::string out = out_dir;
  while (out.size() > 1 && out.back() == '/') out.pop_back();  // "pkg/" → keys in "pkg.keys"
  const std::string key_dir = o.key_dir.empty() ? out + ".keys" : o.key_dir;
  try {
    auto sm = shardd::load_script_model(o.model_file, job, o.attribute);
    const auto m = shardd::split_model(sm, job, out_dir, key_dir);
    std::printf("split %s (%zu blocks of \"%s\", %lld parameters) into %zu shards for job %s:\n",
                o.model_file.c_str(), m.blocks.size(), m.attribute.c_str(), static_cast<long long>(m.parameters()),
                m.shards.size(), job.name.c_str());
    for (const auto& b : m.blocks) {
      std::printf("  block %-3d %-12s %-9s %-16s → %-16s %10lld params\n", b.index, b.source.c_str(),
                  b.in_dtype.c_str(), model::shape_str(b.in_shape).c_str(), model::shape_str(b.out_shape).c_str(),
                  static_cast<long long>(b.parameters));
    }
    for (const auto& s : m.shards) {
      std::printf("  shard %d  blocks %d..%d  %10lld params (%5.1f%%)  %s  %lld bytes  sha256 %.16s…\n", s.index,
                  s.first_block, s.end_block - 1, static_cast<long long>(s.parameters), 100.0 * s.share,
                  s.file.c_str(), static_cast<long long>(s.bytes), s.sha256.c_str());
    }
    double largest = 0;
    for (const auto& s : m.shards) largest = std::max(largest, s.share);
    std::printf("largest shard holds %.1f%% of the parameters; spec.protection.maxExposure is %.1f%%%s\n",
                100.0 * largest, 100.0 * job.protection.max_exposure,
                largest > job.protection.max_exposure ? " (EXCEEDED: check the job with shardctl plan)" : "");
    std::printf("packages and manifest.json in %s; one key per shard and manifest.json in %s (keys mode 0600: "
                "hand each only to its shard)\n",
                out_dir.c_str(), key_dir.c_str());
    if (job.model.from_package() && !job.model.package->url.empty()) {
      std::printf("upload the shard-<i>.sgpkg of %s to %s (manifest.json need not go: each shard reads the "
                  "keys Secret's copy)\n",
                  out_dir.c_str(), job.model.package->url.c_str());
    }
    return 0;
  } catch (const model::PackageError& e) {
    std::cerr << "shardctl split: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "shardctl split: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace shardguard::shardctl
