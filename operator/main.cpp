// shardguard-operator: reconciles ShardedTrainingJobs into isolated shard pods
// (docs/operator.md). Metrics on --metrics-bind-address, /healthz and /readyz on
// --health-probe-bind-address, JSON logs on stderr, optional leader election.
#include <malloc.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>
#include <iostream>
#include <thread>

#include <CLI/CLI.hpp>

#include "shardguard/common/log.h"
#include "shardguard/common/metrics_server.h"
#include "shardguard/common/process.h"
#include "shardguard/kube/api_availability.h"
#include "shardguard/kube/config.h"
#include "shardguard/kube/leader.h"
#include "shardguard/operator/controller.h"

namespace {

using namespace shardguard;

struct Flags {
  std::string kubeconfig;
  std::vector<std::string> namespaces;
  int workers = 2;
  std::string metrics = ":8080";
  std::string health = ":8081";
  bool leader_elect = false;
  std::string leader_ns;
  std::string leader_id = "shardguard-operator";
  double lease_duration = 15, renew_deadline = 10, retry_period = 2;
  int shard_metrics_port = op::kShardMetricsPort;
  int sidecar_metrics_port = op::kSidecarMetricsPort;
  double progress_interval = 15;
  double resync = 600;
  std::string shardd_image = op::kDefaultShardImage;
  std::string sidecar_image = op::kDefaultSidecarImage;
  int64_t export_budget = 0;
  std::string cluster_domain = "cluster.local";
  std::string log_level = "info";
};

std::chrono::milliseconds ms(double s) { return std::chrono::milliseconds(static_cast<int64_t>(s * 1000)); }

std::string identity() {
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  return std::string(host) + "_" + std::to_string(getpid());
}

int Run(const Flags& f) {
  if (auto level = log::parse_level(f.log_level)) {
    log::set_min_level(*level);
  } else {
    throw std::invalid_argument("--log-level: unknown level \"" + f.log_level + "\" (debug, info, warn, error)");
  }
  if (f.workers < 1) throw std::invalid_argument("--workers must be at least 1, got " + std::to_string(f.workers));
  if (!(f.renew_deadline < f.lease_duration) || !(f.retry_period < f.renew_deadline) || !(f.retry_period > 0)) {
    throw std::invalid_argument("leader election needs 0 < --retry-period < --renew-deadline < --lease-duration");
  }
  sigset_t signals = block_stop_signals();

  kube::Config cfg = kube::load_config(f.kubeconfig);
  const std::string self = identity();
  kube::Client client(cfg, "shardguard-operator/" + self);
  auto registry = std::make_shared<prometheus::Registry>();
  auto health_registry = std::make_shared<prometheus::Registry>();
  MetricsServer metrics(registry), health(health_registry);
  {
    auto [host, port] = split_host_port(f.metrics);
    metrics.start(host, port);
    auto [hhost, hport] = split_host_port(f.health);
    health.start(hhost, hport);
  }

  // Resources the server answers 404 for: logged, in shardguard_operator_api_missing,
  // and /readyz stays 503 naming them until they are served.
  kube::ApiAvailability apis(registry.get());
  op::ControllerOptions opt;
  opt.apis = &apis;
  opt.namespaces = f.namespaces;
  opt.workers = f.workers;
  opt.shard_metrics_port = f.shard_metrics_port;
  opt.sidecar_metrics_port = f.sidecar_metrics_port;
  opt.progress_interval = std::chrono::seconds(static_cast<int64_t>(f.progress_interval));
  opt.resync = std::chrono::seconds(static_cast<int64_t>(f.resync));
  opt.shardd_image = f.shardd_image;
  opt.sidecar_image = f.sidecar_image;
  opt.export_budget_bytes = f.export_budget;
  opt.cluster_domain = f.cluster_domain;
  opt.identity = self;
  log::info("starting", {{"server", cfg.server},
                         {"namespaces", f.namespaces.empty() ? std::vector<std::string>{"(all)"} : f.namespaces},
                         {"workers", f.workers},
                         {"leader_elect", f.leader_elect},
                         {"identity", opt.identity},
                         {"metrics_port", metrics.port()},
                         {"health_port", health.port()}});

  std::atomic<bool> stop{false};
  std::atomic<int> exit_code{0};
  // Ready = caches synced (or, with leader election, standing by) and no needed
  // resource missing; the main loop below sets /readyz from these.
  std::atomic<bool> working{false};
  std::unique_ptr<op::Controller> controller;
  std::mutex controller_mu;
  auto start_controller = [&] {
    std::lock_guard<std::mutex> lock(controller_mu);
    controller = std::make_unique<op::Controller>(client, opt, registry);
    if (!controller->start(std::chrono::seconds(60), &stop)) {
      if (stop) return;
      log::error("caches did not sync within 60 s; exiting", {});
      exit_code = 1;
      stop = true;
      return;
    }
    working = true;
  };

  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (!stop) log::info("stopping", {{"signal", strsignal(sig)}});
    stop = true;
  });

  // The controller starts on its own thread (its caches may take seconds to sync),
  // so that the elector keeps renewing the lease meanwhile.
  std::thread starter;
  std::atomic<bool> elector_stop{false};
  std::thread elector_thread;
  std::unique_ptr<kube::LeaderElector> elector;
  std::unique_ptr<kube::Client> lease_client;
  if (f.leader_elect) {
    // The Lease calls have a client of their own whose every call ends within half the
    // renew deadline: a renewal that hangs fails in time for the elector to give up
    // before --lease-duration lets a standby take over (the shared client waits 30 s).
    lease_client = std::make_unique<kube::Client>(
        cfg, "shardguard-operator/" + self,
        std::max(std::chrono::milliseconds(200), ms(f.renew_deadline) / 2));
    kube::LeaderElectionConfig lc;
    lc.ns = f.leader_ns.empty() ? cfg.ns : f.leader_ns;
    lc.name = f.leader_id;
    lc.identity = opt.identity;
    lc.lease_duration = ms(f.lease_duration);
    lc.renew_deadline = ms(f.renew_deadline);
    lc.retry_period = ms(f.retry_period);
    // A candidate that is not leading is healthy and ready: it stands by (unless the
    // server has no Leases for it: then apis names them and it is not ready).
    working = true;
    const std::string lease = lc.ns + "/" + lc.name;
    elector = std::make_unique<kube::LeaderElector>(
        *lease_client, lc,
        [&, lease] {
          log::info("became leader", {{"lease", lease}});
          if (!starter.joinable()) starter = std::thread(start_controller);
        },
        [&, lease] {
          if (!stop) {
            // As controller-runtime does: a lost lease ends the process, and
            // Kubernetes restarts it as a fresh candidate.
            log::error("lost the leader lease; exiting", {{"lease", lease}});
            exit_code = 1;
            stop = true;
          }
        },
        registry.get(), &apis);
    elector_thread = std::thread([&] { elector->run(elector_stop); });
  } else {
    starter = std::thread(start_controller);
  }
  std::string readiness = "starting";  // what /readyz says now ("" = ready)
  while (!stop) {
    std::string why = apis.reason();
    if (why.empty() && !working) why = "starting: waiting for the caches to sync";
    if (why != readiness) {
      readiness = why;
      metrics.set_ready(why.empty(), why);
      health.set_ready(why.empty(), why);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }

  // Wake the signal thread if the stop came from elsewhere.
  pthread_kill(signal_thread.native_handle(), SIGTERM);
  signal_thread.join();
  metrics.set_ready(false, "stopping");
  health.set_ready(false, "stopping");
  // Work stops before the lease is released: the next leader never overlaps with us.
  if (starter.joinable()) starter.join();
  {
    std::lock_guard<std::mutex> lock(controller_mu);
    if (controller) controller->stop();
  }
  if (elector_thread.joinable()) {
    elector_stop = true;
    elector_thread.join();
  }
  health.stop();
  metrics.stop();
  log::info("stopped", {{"exit_code", exit_code.load()}});
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  // Two malloc arenas, not one per thread: the informer, worker and HTTP threads
  // otherwise each keep their own freed cache memory (the RSS target is 100 MB).
  mallopt(M_ARENA_MAX, 2);
  shardguard::log::set_component("shardguard-operator");
  CLI::App app{"shardguard-operator: reconciles ShardedTrainingJobs into isolated, policy-guarded shard pods"};
  Flags f;
  app.add_option("--kubeconfig", f.kubeconfig,
                 "kubeconfig file (default: $KUBECONFIG, in-cluster service account, ~/.kube/config)");
  app.add_option("--namespace", f.namespaces, "namespace to watch (repeatable; default: all)");
  app.add_option("--workers", f.workers, "concurrent reconciles")->capture_default_str();
  app.add_option("--metrics-bind-address", f.metrics, "host:port of /metrics")->capture_default_str();
  app.add_option("--health-probe-bind-address", f.health, "host:port of /healthz and /readyz")->capture_default_str();
  app.add_flag("--leader-elect", f.leader_elect, "run only while holding the coordination.k8s.io Lease");
  app.add_option("--leader-election-namespace", f.leader_ns, "namespace of the Lease (default: the config's)");
  app.add_option("--leader-election-id", f.leader_id, "name of the Lease")->capture_default_str();
  app.add_option("--lease-duration", f.lease_duration, "seconds a lease is valid")->capture_default_str();
  app.add_option("--renew-deadline", f.renew_deadline, "seconds the leader keeps trying to renew")->capture_default_str();
  app.add_option("--retry-period", f.retry_period, "seconds between tries")->capture_default_str();
  app.add_option("--shard-metrics-port", f.shard_metrics_port, "port of shardd's /metrics in the shard pods")
      ->capture_default_str();
  app.add_option("--sidecar-metrics-port", f.sidecar_metrics_port,
                 "port of the sidecar's /metrics in the shard pods (exposure ledger sequence)")
      ->capture_default_str();
  app.add_option("--progress-interval", f.progress_interval, "seconds between progress reads of a running job")
      ->capture_default_str();
  app.add_option("--resync", f.resync, "seconds between full resyncs of every job (0 = never)")->capture_default_str();
  app.add_option("--shardd-image", f.shardd_image, "shardd image when spec.template.image is empty")
      ->capture_default_str();
  app.add_option("--sidecar-image", f.sidecar_image, "sidecar image when spec.sidecar.image is empty")
      ->capture_default_str();
  app.add_option("--export-budget-bytes", f.export_budget, "bytes each export principal may read per shard")
      ->capture_default_str();
  app.add_option("--cluster-domain", f.cluster_domain, "cluster DNS domain")->capture_default_str();
  app.add_option("--log-level", f.log_level, "debug, info, warn or error")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return Run(f);
  } catch (const std::exception& e) {
    shardguard::log::error("cannot start", {{"error", e.what()}});
    std::cerr << "shardguard-operator: " << e.what() << "\n";
    return 2;
  }
}
