#include "shardguard/kube/api_availability.h"

#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "shardguard/common/log.h"

namespace shardguard::kube {

std::string resource_name(const Resource& res) {
  return res.group.empty() ? res.plural : res.plural + "." + res.group;
}

ApiAvailability::ApiAvailability(prometheus::Registry* registry) {
  if (registry) {
    family_ = &prometheus::BuildGauge()
                   .Name("shardguard_operator_api_missing")
                   .Help("1 while the API server answers 404 for a resource the operator needs (the API is not "
                         "served there, or for leases the namespace is missing); the operator is not ready then")
                   .Register(*registry);
  }
}

void ApiAvailability::set_gauge(const std::string& name, double v) {
  if (!family_) return;
  auto it = gauges_.find(name);
  if (it == gauges_.end()) it = gauges_.emplace(name, &family_->Add({{"resource", name}})).first;
  it->second->Set(v);
}

void ApiAvailability::need(const Resource& res) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string name = resource_name(res);
  set_gauge(name, missing_.count(name) ? 1 : 0);
}

void ApiAvailability::missing(const Resource& res, const std::string& scope, const std::string& error) {
  const std::string name = resource_name(res);
  bool went_missing = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& scopes = missing_[name];
    went_missing = scopes.empty();
    scopes.insert(scope);
    last_error_[name] = error;
    set_gauge(name, 1);
  }
  if (went_missing) {
    log::error("the API server does not serve a resource the operator needs; not ready until it does",
               {{"resource", name}, {"api_version", res.api_version()}, {"scope", scope.empty() ? "(all)" : scope},
                {"error", error}});
  }
}

void ApiAvailability::served(const Resource& res, const std::string& scope) {
  const std::string name = resource_name(res);
  bool came_back = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = missing_.find(name);
    if (it == missing_.end()) return;
    it->second.erase(scope);
    if (!it->second.empty()) return;
    missing_.erase(it);
    last_error_.erase(name);
    set_gauge(name, 0);
    came_back = true;
  }
  if (came_back) log::info("the API server serves the resource again", {{"resource", name}});
}

std::vector<std::string> ApiAvailability::missing_now() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& [name, scopes] : missing_) out.push_back(name);
  return out;
}

std::string ApiAvailability::reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (missing_.empty()) return "";
  std::string names;
  for (const auto& [name, scopes] : missing_) names += (names.empty() ? "" : ", ") + name;
  const auto& first = *missing_.begin();
  return "the API server answers 404 for " + names + ", which the operator needs (" + first.first + ": " +
         last_error_.at(first.first) + ")";
}

}  // namespace shardguard::kube
