// Leader election on a coordination.k8s.io/v1 Lease, as client-go does it: the
// lease is taken over once it has not changed for lease_duration by this process's
// own clock (never by comparing remote timestamps).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "shardguard/kube/api_availability.h"
#include "shardguard/kube/client.h"

namespace prometheus {
class Registry;
class Gauge;
}  // namespace prometheus

namespace shardguard::kube {

struct LeaderElectionConfig {
  std::string ns, name, identity;
  std::chrono::milliseconds lease_duration{15000}, renew_deadline{10000}, retry_period{2000};
  // While creating the Lease answers 404 (no coordination.k8s.io/v1 Leases on the
  // server, or no such namespace), tries are spaced from retry_period doubling up to this.
  std::chrono::milliseconds max_backoff{30000};
};

class LeaderElector {
 public:
  // registry (optional): leader_election_master_status{name} gauge 0/1.
  // apis (optional): told when the Lease cannot be created for a 404, and when it can.
  LeaderElector(Client& client, LeaderElectionConfig cfg, std::function<void()> on_started_leading,
                std::function<void()> on_stopped_leading, prometheus::Registry* registry = nullptr,
                ApiAvailability* apis = nullptr);
  LeaderElector(const LeaderElector&) = delete;
  LeaderElector& operator=(const LeaderElector&) = delete;

  // Until stop: try to acquire every retry_period (creating the Lease if missing;
  // when the create answers 404 the Lease cannot exist here: the resource is reported
  // to `apis` as missing, and tries back off exponentially up to cfg.max_backoff);
  // while leading renew every retry_period; when no renewal succeeded for
  // renew_deadline, leadership is lost (on_stopped_leading) and acquisition resumes.
  // On stop while leading, releases the Lease (holderIdentity "") so another
  // candidate takes over at once, then calls on_stopped_leading. Callbacks run on
  // the calling thread. Returns within about retry_period/10 + one API call of stop.
  void run(const std::atomic<bool>& stop);
  bool is_leader() const;

 private:
  bool try_acquire_or_renew();
  void release();
  void set_leader(bool leading);

  Client& client_;
  const LeaderElectionConfig cfg_;
  const std::function<void()> on_started_, on_stopped_;
  prometheus::Gauge* gauge_ = nullptr;
  ApiAvailability* apis_ = nullptr;
  std::atomic<bool> leader_{false};
  bool lease_missing_ = false;  // the last try's create answered 404 (run()'s thread only)

  // What this process last saw of the lease and when (its own steady clock).
  nlohmann::json observed_spec_;
  std::chrono::steady_clock::time_point observed_time_{};
};

}  // namespace shardguard::kube
