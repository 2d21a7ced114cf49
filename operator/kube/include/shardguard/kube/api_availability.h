// Which of the resources the operator needs the API server does not serve: it
// answered 404 to a list or watch of the collection, or to creating the Lease. The
// operator cannot work without them, so each one that goes missing is logged at error
// level (naming it), shown in the gauge shardguard_operator_api_missing{resource}
// (1 while missing), and main() keeps /readyz at 503 with a reason naming it. The
// informers and the leader elector keep trying with backoff, and clear the mark when a
// call succeeds: an API that appears later is picked up without a restart.
// Thread-safe.
#pragma once

#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "shardguard/kube/resource.h"

namespace prometheus {
class Registry;
class Gauge;
template <typename T>
class Family;
}  // namespace prometheus

namespace shardguard::kube {

// "pods", "leases.coordination.k8s.io": the plural, then the group when not core
// (the form kubectl and RBAC messages use).
std::string resource_name(const Resource& res);

class ApiAvailability {
 public:
  explicit ApiAvailability(prometheus::Registry* registry = nullptr);
  ApiAvailability(const ApiAvailability&) = delete;
  ApiAvailability& operator=(const ApiAvailability&) = delete;

  // A resource the operator needs: its gauge exists (at 0) from now on.
  void need(const Resource& res);
  // The server answered 404 for `res` as seen by `scope` (an informer's namespace, the
  // Lease's namespace: one resource may be used from several places). `error` is the
  // server's answer, for the log. Logs at error level when the resource goes missing.
  void missing(const Resource& res, const std::string& scope, const std::string& error);
  // A call on `res` from `scope` succeeded. Logs at info level when it comes back.
  void served(const Resource& res, const std::string& scope);

  // Names of the resources missing now, sorted; empty when every one is served.
  std::vector<std::string> missing_now() const;
  // "" when nothing is missing, else a sentence naming them, for /readyz.
  std::string reason() const;

 private:
  void set_gauge(const std::string& name, double v);  // mu_ held

  mutable std::mutex mu_;
  prometheus::Family<prometheus::Gauge>* family_ = nullptr;
  std::map<std::string, prometheus::Gauge*> gauges_;          // name -> gauge
  std::map<std::string, std::set<std::string>> missing_;      // name -> scopes that got 404
  std::map<std::string, std::string> last_error_;             // name -> the server's answer
};

}  // namespace shardguard::kube
