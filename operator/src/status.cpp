#include "shardguard/operator/status.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <numeric>

namespace shardguard::op {

using nlohmann::json;

namespace {

bool holds_any(const std::set<int>& held, const std::set<int>& trusted) {
  for (int i : held) {
    if (trusted.count(i)) return true;
  }
  return false;
}

}  // namespace

ExposureReport compute_exposure(const std::vector<int64_t>& stage_params, const PlacementHistory& history,
                                const std::vector<ExportAssignment>& exporters, const std::set<int>& trusted) {
  ExposureReport r;
  const int n = static_cast<int>(stage_params.size());
  for (const auto& [node, held] : history) {
    NodeExposure e;
    e.node = node;
    e.held = held;
    e.exposed = exposed_stages(held, n);
    e.trusted = holds_any(held, trusted);
    e.ratio = e.trusted ? exposure_of(stage_params, held) : exposure_of(stage_params, held, trusted);
    if (!e.trusted) r.max_node = std::max(r.max_node, e.ratio);
    r.nodes.push_back(std::move(e));
  }
  for (int i = 0; i < n; ++i) {
    if (!trusted.count(i)) r.max_principal = std::max(r.max_principal, exposure_of(stage_params, {i}));
  }
  for (const auto& a : exporters) {
    ExporterExposure e{a.principal, a.shards, exposed_stages(a.shards, n), exposure_of(stage_params, a.shards, trusted)};
    r.max_principal = std::max(r.max_principal, e.ratio);
    r.exporters.push_back(std::move(e));
  }
  return r;
}

std::vector<std::string> nodes_to_avoid(const std::vector<int64_t>& stage_params, const PlacementHistory& history,
                                        int shard, double max_exposure, const std::set<int>& trusted) {
  std::vector<std::string> out;
  for (const auto& [node, held] : history) {
    if (holds_any(held, trusted)) continue;  // the data owner's node
    std::set<int> with = held;
    with.insert(shard);
    // A tiny tolerance: shares are ratios of integers and maxExposure a decimal.
    if (exposure_of(stage_params, with, trusted) > max_exposure + 1e-12) out.push_back(node);
  }
  return out;  // std::map iteration: already sorted
}

PlacementHistory history_from_status(const json& status) {
  PlacementHistory h;
  if (!status.is_object() || !status.contains("exposure") || !status["exposure"].is_object()) return h;
  const json& nodes = status["exposure"].value("nodes", json::array());
  if (!nodes.is_array()) return h;
  for (const auto& e : nodes) {
    if (!e.is_object() || !e.contains("node") || !e["node"].is_string() || !e.contains("shards") ||
        !e["shards"].is_array()) {
      continue;
    }
    auto& held = h[e["node"].get<std::string>()];
    for (const auto& s : e["shards"]) {
      if (s.is_number_integer()) held.insert(s.get<int>());
    }
  }
  return h;
}

double round4(double v) { return std::round(v * 10000.0) / 10000.0; }

namespace {

// One entry of status.exposure.nodes[] or exportPrincipals[]: who, what it holds, what
// that exposes and its ratio.
json exposure_entry(const char* who_key, const std::string& who, const std::set<int>& shards,
                    const std::set<int>& exposed, double ratio) {
  return {{who_key, who},
          {"shards", json(std::vector<int>(shards.begin(), shards.end()))},
          {"exposedShards", json(std::vector<int>(exposed.begin(), exposed.end()))},
          {"ratio", round4(ratio)}};
}

}  // namespace

json exposure_to_json(const ExposureReport& report) {
  json nodes = json::array();
  for (const auto& e : report.nodes) {
    nodes.push_back(exposure_entry("node", e.node, e.held, e.exposed, e.ratio));
    if (e.trusted) nodes.back()["trusted"] = true;
  }
  json out = {{"maxNode", round4(report.max_node)}, {"maxPrincipal", round4(report.max_principal)}, {"nodes", nodes}};
  if (!report.exporters.empty()) {
    json exporters = json::array();
    for (const auto& e : report.exporters) {
      exporters.push_back(exposure_entry("principal", e.principal, e.shards, e.exposed, e.ratio));
    }
    out["exportPrincipals"] = std::move(exporters);
  }
  return out;
}

void set_condition(json& conditions, const std::string& type, bool status, const std::string& reason,
                   const std::string& message, int64_t generation, const std::string& now) {
  if (!conditions.is_array()) conditions = json::array();
  const std::string value = status ? "True" : "False";
  for (auto& c : conditions) {
    if (!c.is_object() || c.value("type", "") != type) continue;
    if (c.value("status", "") != value) {
      c["status"] = value;
      c["lastTransitionTime"] = now;
    }
    c["reason"] = reason;
    c["message"] = message;
    c["observedGeneration"] = generation;
    return;
  }
  conditions.push_back({{"type", type},
                        {"status", value},
                        {"reason", reason},
                        {"message", message},
                        {"lastTransitionTime", now},
                        {"observedGeneration", generation}});
}

bool condition_true(const json& conditions, const std::string& type) {
  if (!conditions.is_array()) return false;
  for (const auto& c : conditions) {
    if (c.is_object() && c.value("type", "") == type) return c.value("status", "") == "True";
  }
  return false;
}

}  // namespace shardguard::op
