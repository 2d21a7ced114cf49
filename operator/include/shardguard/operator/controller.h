// The ShardedTrainingJob controller: informers for jobs and the objects they own,
// a rate-limited work queue, N workers, and reconcile(key) = gather from the caches
// → plan() (reconcile.h) → carry the plan out with the API client. The shard PKI
// (job CA, leaf SVIDs, checkpoint keys) is made here, kept in the job's Secrets, and
// read back from them on every reconcile, so a restarted operator continues with the
// same identities and keys.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "shardguard/kube/api_availability.h"
#include "shardguard/kube/client.h"
#include "shardguard/kube/informer.h"
#include "shardguard/kube/workqueue.h"
#include "shardguard/operator/reconcile.h"

namespace shardguard::op {

struct ControllerOptions {
  std::vector<std::string> namespaces;  // watched namespaces; empty = all
  int workers = 2;
  // Progress (step, epoch, loss, accuracy) is read from the last stage's shardd
  // metrics at http://<podIP>:<port>/metrics while the job runs.
  int shard_metrics_port = kShardMetricsPort;
  // Every running shard pod's exposure ledger sequence is read from its sidecar's
  // metrics at http://<podIP>:<port>/metrics (shardguard_ledger_sequence) on the same
  // reconciles.
  int sidecar_metrics_port = kSidecarMetricsPort;
  std::chrono::seconds progress_interval{15};
  std::chrono::seconds resync{600};  // informer resync: every cached job is reconciled again
  std::string shardd_image;          // used when spec.template.image is empty
  std::string sidecar_image;         // used when spec.sidecar.image is empty
  int64_t export_budget_bytes = 0;
  std::chrono::seconds leaf_lifetime{24 * 3600};  // re-issued at half-life
  std::chrono::seconds ca_lifetime{365 * 24 * 3600};
  std::string cluster_domain = "cluster.local";
  std::string identity = "shardguard-operator";  // Events' reportingInstance
  // Optional: where the informers report a resource the server does not serve (404).
  // While one is missing, start() waits for it without a timeout.
  kube::ApiAvailability* apis = nullptr;
};

class Controller {
 public:
  Controller(kube::Client& client, ControllerOptions opt, std::shared_ptr<prometheus::Registry> registry);
  ~Controller();
  Controller(const Controller&) = delete;
  Controller& operator=(const Controller&) = delete;

  // Starts the informers, waits for their first list, then starts the workers. False
  // when they did not sync within `sync_timeout` (not counting time during which
  // opt.apis reports a missing resource: that is waited for, logged and shown in
  // /readyz, and picked up when it appears), or when *cancel became true.
  bool start(std::chrono::milliseconds sync_timeout = std::chrono::seconds(60),
             const std::atomic<bool>* cancel = nullptr);
  void stop();  // workers, then informers; idempotent

 private:
  struct Owned;  // the informers of one namespace ("" = all)
  void enqueue_job(const nlohmann::json& job);
  void enqueue_owner(const nlohmann::json& obj);
  void worker();
  // Returns how long until the job wants another look (0 = no requeue). Throws on
  // an API error (the caller requeues with backoff).
  std::chrono::seconds reconcile(const std::string& ns, const std::string& name);
  Owned& owned_for(const std::string& ns);
  RenderInputs prepare_material(const nlohmann::json& job, const JobSpec& spec, Owned& owned, int64_t now);
  void read_package_keys(const JobSpec& spec, Observed& observed);
  std::optional<Progress> read_progress(const std::optional<nlohmann::json>& last_pod);
  std::optional<int64_t> read_ledger_sequence(const std::optional<nlohmann::json>& pod);
  void execute(const std::string& ns, const nlohmann::json& job, const Plan& p);
  void emit_event(const nlohmann::json& job, const EventNote& e);
  void update_metrics(const std::string& ns, const std::string& name, const Plan& p, double max_exposure);
  void forget_job_metrics(const std::string& ns, const std::string& name);
  void update_phase_counts();

  kube::Client& client_;
  const ControllerOptions opt_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<kube::WorkQueue> queue_;
  std::vector<std::unique_ptr<Owned>> owned_;
  std::vector<std::thread> workers_;
  std::atomic<bool> stopped_{false};
  std::atomic<uint64_t> event_seq_{0};

  prometheus::Family<prometheus::Counter>* reconcile_total_;
  prometheus::Counter* reconcile_errors_;
  prometheus::Histogram* reconcile_time_;
  prometheus::Family<prometheus::Gauge>* jobs_by_phase_;
  prometheus::Family<prometheus::Gauge>* node_exposure_;
  prometheus::Family<prometheus::Gauge>* job_max_exposure_;
  prometheus::Family<prometheus::Gauge>* job_exposure_limit_;
  std::mutex metrics_mu_;
  // ns/name → node gauges of that job, to drop the series of nodes and jobs that went.
  std::map<std::string, std::map<std::string, prometheus::Gauge*>> job_node_gauges_;
  std::map<std::string, std::string> job_phase_;  // ns/name → phase, for shardguard_jobs
};

}  // namespace shardguard::op
