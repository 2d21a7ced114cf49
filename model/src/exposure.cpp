#include "shardguard/model/exposure.h"

#include <algorithm>

namespace shardguard::model {

std::set<int> exposed_stages(const std::set<int>& held, int num_stages) {
  std::set<int> out;
  for (int i : held) {
    if (i >= 0 && i < num_stages) out.insert(i);
  }
  for (int i = 1; i + 1 < num_stages; ++i) {
    if (held.count(i - 1) && held.count(i + 1)) out.insert(i);
  }
  return out;
}

double exposure_of(const std::vector<double>& stage_weights, const std::set<int>& held) {
  return exposure_of(stage_weights, held, {});
}

double exposure_of(const std::vector<double>& stage_weights, const std::set<int>& held, const std::set<int>& trusted) {
  double total = 0;
  for (double w : stage_weights) total += w;
  if (!(total > 0)) return 0;
  double sum = 0;
  for (int i : exposed_stages(held, static_cast<int>(stage_weights.size()))) {
    if (!trusted.count(i)) sum += stage_weights[i];
  }
  return std::clamp(sum / total, 0.0, 1.0);
}

std::vector<std::set<int>> runs_within(const std::vector<double>& stage_weights, double max_exposure,
                                       const std::set<int>& trusted) {
  std::vector<std::set<int>> runs;
  std::set<int> run;
  for (int i = 0; i < static_cast<int>(stage_weights.size()); ++i) {
    if (trusted.count(i)) {
      if (!run.empty()) runs.push_back(std::move(run));
      run.clear();
      continue;
    }
    std::set<int> longer = run;
    longer.insert(i);
    // The tolerance of the operator's other exposure checks: shares are ratios of
    // integers, maxExposure a decimal.
    if (!run.empty() && exposure_of(stage_weights, longer, trusted) > max_exposure + 1e-12) {
      runs.push_back(std::move(run));
      longer = {i};
    }
    run = std::move(longer);
  }
  if (!run.empty()) runs.push_back(std::move(run));
  return runs;
}

}  // namespace shardguard::model
