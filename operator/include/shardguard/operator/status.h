// Pure status arithmetic of the operator (DESIGN.md §5, issue 4 item 4): exposure from
// a job's placement history, the nodes a shard may no longer be placed on, and
// Kubernetes-style conditions. No I/O, no clock (the caller passes `now`).
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/model/exposure.h"
#include "shardguard/operator/render.h"

namespace shardguard::op {

// Node → every shard index a pod on that node has ever held (status.exposure.nodes).
using PlacementHistory = std::map<std::string, std::set<int>>;

// Stages a domain is exposed to (held ∪ sandwiched) and its exposure: the one
// definition of DESIGN.md §5, in model/exposure.h, over parameter counts.
using model::exposed_stages;
inline double exposure_of(const std::vector<int64_t>& stage_params, const std::set<int>& held) {
  return model::exposure_of(std::vector<double>(stage_params.begin(), stage_params.end()), held);
}
inline double exposure_of(const std::vector<int64_t>& stage_params, const std::set<int>& held,
                          const std::set<int>& trusted) {
  return model::exposure_of(std::vector<double>(stage_params.begin(), stage_params.end()), held, trusted);
}

struct NodeExposure {
  std::string node;
  std::set<int> held;     // shards placed there (history)
  std::set<int> exposed;  // held ∪ sandwiched
  // A node that held a trusted stage matches spec.protection.trustedNodeSelector: it
  // is the data owner's, its ratio (everything it holds) is not in max_node.
  bool trusted = false;
  double ratio = 0;  // trusted stages left out unless the node is trusted
};

// An export principal's exposure: what it may export (its ExportAssignment).
struct ExporterExposure {
  std::string principal;
  std::set<int> shards;   // it may export
  std::set<int> exposed;  // shards ∪ sandwiched
  double ratio = 0;
};

struct ExposureReport {
  std::vector<NodeExposure> nodes;          // sorted by node name
  std::vector<ExporterExposure> exporters;  // in the spec's order
  double max_node = 0;                      // largest node exposure (0 before any placement)
  // Largest principal exposure: each shard identity (its own stage, p_i / P) and each
  // export principal (the shards it may export).
  double max_principal = 0;
};

// `trusted`: spec.protection.trustedStages, left out of every untrusted principal's
// exposure (model::exposure_of with trusted stages) and of max_principal.
ExposureReport compute_exposure(const std::vector<int64_t>& stage_params, const PlacementHistory& history,
                                const std::vector<ExportAssignment>& exporters = {}, const std::set<int>& trusted = {});

// Nodes on which a new pod for `shard` would push that node's exposure above
// max_exposure (given everything it already held). Sorted.
// With trusted stages: a trusted node (one that held a trusted stage) is never avoided,
// and an untrusted node's exposure leaves the trusted stages out.
std::vector<std::string> nodes_to_avoid(const std::vector<int64_t>& stage_params, const PlacementHistory& history,
                                        int shard, double max_exposure, const std::set<int>& trusted = {});

// status.exposure.nodes[] ⇄ PlacementHistory. Entries that do not parse are skipped.
PlacementHistory history_from_status(const nlohmann::json& status);
nlohmann::json exposure_to_json(const ExposureReport& report);

// Sets condition `type` in a conditions array (metav1.Condition shape). The
// lastTransitionTime changes only when the status value changes; reason, message and
// observedGeneration are always updated. `now` is RFC 3339 UTC.
void set_condition(nlohmann::json& conditions, const std::string& type, bool status, const std::string& reason,
                   const std::string& message, int64_t generation, const std::string& now);
// The condition's status is "True".
bool condition_true(const nlohmann::json& conditions, const std::string& type);

// A ratio rounded to 4 decimals, so status stays byte-stable between reconciles (the
// same as text for conditions, Events and refusals: format_ratio, common/strings.h).
double round4(double v);

}  // namespace shardguard::op
