// `shardctl explain`: what the sidecar's policy decides for one (peer, method, direction).
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/strings.h"
#include "shardguard/operator/reconcile.h"
#include "shardguard/shardctl/commands.h"
#include "shardguard/shardctl/local_package.h"
#include "shardguard/policy/policy.h"

namespace shardguard::shardctl {
namespace {

using policy::Decision;
using policy::Direction;
using policy::Policy;
using policy::PolicyError;

void print_policy_error(const std::string& source, const PolicyError& e) {
  std::cerr << "shardctl explain: invalid policy " << source << ":\n";
  for (const auto& p : e.problems()) std::cerr << "  " << p.str() << "\n";
}

// The policy the operator renders for shard `shard` of the job in job_file, and in
// *exports a line per export principal: the shards it may export and its exposure.
Policy job_policy(const ExplainOptions& o, std::string* source, std::string* exports) {
  const JobSpec job = load_job_file(o.job_file);
  if (o.shard < 0 || o.shard >= job.sharding.shards) {
    throw std::invalid_argument("--shard: " + std::to_string(o.shard) + " is not a shard of job " + job.name +
                                " (it has " + std::to_string(job.sharding.shards) + ", numbered 0 to " +
                                std::to_string(job.sharding.shards - 1) + ")");
  }
  const auto manifest = local_manifest(job);
  const std::vector<int64_t> params = op::stage_parameters(job, manifest ? &*manifest : nullptr);
  const std::vector<op::ExportAssignment> assignments = op::assign_export_principals(job, params);
  for (const auto& a : assignments) {
    *exports += "  exporter   " + a.principal + " may export shards " + op::shards_text(a.shards) + " (exposure " +
                format_ratio(op::exposure_of(params, a.shards)) + ", maxExposure " +
                format_ratio(job.protection.max_exposure) + ")\n";
  }
  *source = "derived from " + o.job_file + " (job " + job.namespace_ + "/" + job.name + ", shard " +
            std::to_string(o.shard) + " of " + std::to_string(job.sharding.shards) + ")";
  return policy::pipeline_policy(job.protection.trust_domain, job.namespace_, job.name,
                                  static_cast<int>(o.shard), job.sharding.shards,
                                  op::export_rules(job, assignments, static_cast<int>(o.shard), o.export_budget_bytes));
}

}  // namespace

int RunExplain(const ExplainOptions& o) {
  const char* cmd = "shardctl explain: ";
  Direction direction = Direction::kIngress;
  if (o.direction == "egress") {
    direction = Direction::kEgress;
  } else if (o.direction != "ingress") {
    std::cerr << cmd << "--direction: \"" << o.direction << "\" is not one of ingress, egress\n";
    return 2;
  }
  if (o.policy_file.empty() == o.job_file.empty()) {
    std::cerr << cmd << "give exactly one of --policy FILE and --job JOB.yaml\n";
    return 2;
  }
  if (!o.job_file.empty() && o.shard < 0) {
    std::cerr << cmd << "--job needs --shard N\n";
    return 2;
  }
  if (o.policy_file.empty() && o.export_budget_bytes < 0) {
    std::cerr << cmd << "--export-budget: must be at least 0, got " << o.export_budget_bytes << "\n";
    return 2;
  }

  std::optional<Policy> loaded;
  std::string source;
  std::string exports;
  try {
    if (!o.policy_file.empty()) {
      source = o.policy_file;
      loaded.emplace(policy::parse_policy(read_file(o.policy_file)));
    } else {
      loaded.emplace(job_policy(o, &source, &exports));
    }
  } catch (const PolicyError& e) {
    print_policy_error(source, e);
    return 2;
  } catch (const JobSpecError& e) {
    std::cerr << cmd << "invalid job " << o.job_file << ":\n";
    for (const auto& fe : e.errors()) std::cerr << "  " << fe.str() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 2;
  }

  if (o.show_policy) std::cout << policy::to_json(*loaded) << "\n";
  const Decision d = policy::decide(*loaded, direction, o.peer, o.method);
  std::cout << (d.allow ? "ALLOW" : "DENY") << "\n"
            << "  rule       " << d.rule << "\n"
            << "  reason     " << d.reason << "\n";
  if (d.allow && d.rule == policy::kRuleExport) {
    std::cout << "  budget     " << d.export_budget_bytes << " bytes\n";
  }
  std::cout << "  policy     " << source << ", " << o.direction << "\n" << exports;
  return d.allow ? 0 : 1;
}

}  // namespace shardguard::shardctl
