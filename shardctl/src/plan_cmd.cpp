// `shardctl plan`: the job's partition and whether it can fit its maxExposure.
#include "shardguard/shardctl/commands.h"

#include <algorithm>
#include <cstdio>
#include <iostream>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/strings.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/operator/status.h"
#include "shardguard/shardctl/local_package.h"
#include "shardguard/shardctl/study_report.h"

namespace shardguard::shardctl {

namespace {

void print_risk(const std::string& csv, const JobSpec& job, const std::vector<int64_t>& params) {
  std::string text;
  try {
    text = read_file(csv);
  } catch (const std::exception& e) {
    throw StudyError("--risk: cannot read " + csv + ": " + e.what());
  }
  // A study's table is read whole or not at all: a line that is not a result could be
  // the row that decides the worst case.
  CsvSkipped skipped;
  const auto cells = parse_csv(text, &skipped);
  if (skipped.any()) throw StudyError("--risk: " + describe_skipped(csv, skipped));
  if (cells.empty()) throw StudyError("--risk: " + csv + " holds no study results (a shardctl study's results.csv)");
  const RiskReport risk = worst_reachable_risk(cells, job, params);
  std::printf("risk (study %s, %s in %d stages): the worst R one untrusted principal can reach within "
              "maxExposure %.4f\n",
              csv.c_str(), risk.model.c_str(), risk.stages, job.protection.max_exposure);
  for (const auto& w : risk.worst) {
    // The attacker's label with its size right-aligned in 6 columns.
    const size_t digits = std::to_string(w.samples).size();
    const std::string attacker = std::string(digits < 6 ? 6 - digits : 0, ' ') + attacker_label(w);
    std::printf("  %s  R%s %.2f ± %.2f  row %s (%s), exposure %s\n", attacker.c_str(), w.on_loss ? " on the loss" : "",
                w.r.mean, w.r.std, w.row.c_str(), w.attack.c_str(), format_ratio(w.exposure).c_str());
  }
  if (!risk.out_of_reach.empty()) std::printf("  out of reach: %s\n", join(risk.out_of_reach, ", ").c_str());
}

}  // namespace

int RunPlan(const std::string& job_file, const std::string& risk_csv, const std::string& package_keys) {
  try {
    const JobSpec job = load_job_file(job_file);
    // A package job's cut is the one split made, from the manifest.
    const auto cut = local_job_cut(job, package_keys);
    const auto& desc = cut.desc;
    const auto& stages = cut.stages;
    std::printf("job %s/%s: %s, %lld parameters, %.2f MFLOP per sample, %zu blocks, %d shards by %s\n",
                job.namespace_.c_str(), job.name.c_str(), job.model.architecture.c_str(),
                static_cast<long long>(desc.parameters()), desc.flops() / 1e6, desc.blocks.size(),
                job.sharding.shards, job.sharding.balance.c_str());
    for (const auto& b : desc.blocks) {
      std::printf("  block %-2d %-10s %-16s → %-16s %10lld params %9.3f MFLOP\n", b.index, b.name.c_str(),
                  model::shape_str(b.in_shape).c_str(), model::shape_str(b.out_shape).c_str(),
                  static_cast<long long>(b.parameters), b.flops / 1e6);
    }
    double largest = 0;
    std::vector<int64_t> params;
    for (const auto& s : stages) {
      params.push_back(s.parameters);
      const double share = model::parameter_share(desc, s);
      // A trusted stage stays with the data owner: the operator leaves it out of this check.
      if (!job.protection.trusted_stages.count(s.index)) largest = std::max(largest, share);
      std::printf("  shard %-2d blocks %d..%d  %10lld params (%5.1f%%)  %9.3f MFLOP\n", s.index, s.first_block,
                  s.end_block - 1, static_cast<long long>(s.parameters), 100 * share, s.flops / 1e6);
    }
    std::printf("largest %sshard holds %.1f%% of the parameters; spec.protection.maxExposure is %.1f%%%s\n",
                job.protection.trusted_stages.empty() ? "" : "untrusted ",
                100 * largest, 100 * job.protection.max_exposure,
                largest > job.protection.max_exposure ? " — EXCEEDED: no placement can keep this job within it" : "");
    bool refused = largest > job.protection.max_exposure;
    try {
      for (const auto& a : op::assign_export_principals(job, params)) {
        std::printf("export principal %s may export shards %s (%.1f%% exposed)\n", a.principal.c_str(),
                    op::shards_text(a.shards).c_str(), 100 * op::exposure_of(params, a.shards));
      }
    } catch (const op::ExposureRefusal& e) {
      std::printf("%s — EXCEEDED\n", e.what());
      refused = true;
    }
    if (!job.protection.trusted_stages.empty()) {
      std::vector<std::string> list;
      for (int i : job.protection.trusted_stages) list.push_back(std::to_string(i));
      std::printf("trusted stages %s: only on the data owner's nodes, left out of every untrusted principal's exposure\n",
                  join(list, ", ").c_str());
    }
    if (!risk_csv.empty()) print_risk(risk_csv, job, params);
    return refused ? 1 : 0;
  } catch (const StudyError& e) {
    std::cerr << "shardctl plan: " << e.what() << "\n";
    return 2;
  } catch (const model::PackageError& e) {
    std::cerr << "shardctl plan: the packages of job " << job_file << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "shardctl plan: invalid job " << job_file << ":\n" << e.what() << "\n";
    return 2;
  }
}

}  // namespace shardguard::shardctl
