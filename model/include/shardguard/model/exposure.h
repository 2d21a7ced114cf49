// Exposure, DESIGN.md §5 — the one definition, used by the operator's status and
// placement, `shardctl`'s report and the exposure study.
//
// A domain (a node, a principal, or any set that may collude) that holds some
// stages also observes the input and the output activations of every stage both
// of whose neighbours it holds, so such a stage counts as exposed too:
//   exposed(D)  = held(D) ∪ { i : i-1 ∈ held(D) and i+1 ∈ held(D) }
//   exposure(D) = Σ_{i ∈ exposed(D)} w_i / Σ_i w_i      (w_i: stage i's parameters)
#pragma once

#include <cstdint>
#include <set>
#include <vector>

namespace shardguard::model {

// held ∪ sandwiched, for a model of `num_stages` stages; indices outside
// [0, num_stages) are ignored.
std::set<int> exposed_stages(const std::set<int>& held, int num_stages);

// The weight of exposed_stages(held) over the total weight, in [0, 1]; 0 when the
// total is not positive. Weights are parameter counts or parameter shares.
double exposure_of(const std::vector<double>& stage_weights, const std::set<int>& held);

// The same for an untrusted principal of a job with trusted stages
// (spec.protection.trustedStages: kept on the data owner's nodes): the trusted stages
// are left out of what it exposes, even when it sandwiches one; the total stays the
// whole model's. With no trusted stages, exposure_of(stage_weights, held).
double exposure_of(const std::vector<double>& stage_weights, const std::set<int>& held, const std::set<int>& trusted);

// The stages cut into the fewest runs of consecutive stages whose exposure each stays
// within max_exposure, in order (a greedy cut, which is optimal for consecutive runs).
// A stage that alone exceeds max_exposure is a run by itself: callers refuse such a
// model before (the operator's maxExposure check). An export principal reads one run
// (docs/operator.md#export-principals). Trusted stages are in no run and end the run
// before them. Empty for no stages.
std::vector<std::set<int>> runs_within(const std::vector<double>& stage_weights, double max_exposure,
                                       const std::set<int>& trusted = {});

}  // namespace shardguard::model
