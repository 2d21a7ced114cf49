// `shardctl run --prometheus`: a real Prometheus (the Debian package's binary) as a
// child process, scraping every shardd and sidecar of the local run with the labels
// the chart's PodMonitor gives shard pods in a cluster (namespace, job, shard, pod,
// container, node), so that the chart's dashboards and rules read a local run as
// they read a cluster. Its TSDB stays in the workdir after the run.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/process.h"

namespace shardguard::shardctl {

struct ScrapeTarget {
  std::string address;                        // host:port of a /metrics endpoint
  std::map<std::string, std::string> labels;  // target labels (job, namespace, pod, …)
};

// The prometheus.yml for `targets`: one scrape job, honor_labels (a metric's own job
// and shard labels win, as with the chart's monitors), scraped every interval.
std::string prometheus_config(const std::vector<ScrapeTarget>& targets, std::chrono::milliseconds interval);

// Each principal's exposure (DESIGN.md §5, held part) as PromQL: the share of each
// shard a principal holds (shardguard_exposure_ratio from the sidecars: 1 for the
// shard's own principal, the exported share for an export principal) weighted by the
// shard's share of the model's parameters (shardguard_shard_parameters from shardd),
// summed per principal. `selector` goes inside every metric's braces (e.g.
// job="fmnist-cnn"); with range non-empty each metric is read as
// last_over_time(metric{selector}[range]), so the query still answers after the
// processes have stopped. Result: one series per (namespace, job, peer).
std::string principal_exposure_query(const std::string& selector, const std::string& range = "");


class LocalPrometheus {
 public:
  // Writes DIR/prometheus.yml and starts `binary` on 127.0.0.1:port with its TSDB in
  // DIR/data and its log in DIR/prometheus.log. Throws std::runtime_error naming the
  // binary when it cannot start.
  LocalPrometheus(const std::string& binary, const std::string& dir, int port,
                  const std::vector<ScrapeTarget>& targets, std::chrono::milliseconds interval);
  ~LocalPrometheus();  // stops the child

  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  const std::string& log_file() const { return log_file_; }

  // Waits (bounded) for /-/ready; "" when ready, else why not (with the log's tail).
  std::string wait_ready(std::chrono::seconds limit);
  // Waits (bounded) until at least `count` targets have been scraped successfully
  // (/api/v1/targets, health "up"). Prometheus hands its targets to the scrapers
  // some seconds after it is ready; shardctl waits for the sidecars' targets before
  // it starts shardd, so that even a short run's shardd processes are scraped.
  // "" when they are, else why not.
  std::string wait_targets_up(size_t count, std::chrono::seconds limit);
  // An instant query's data.result; throws std::runtime_error with Prometheus' error.
  nlohmann::json query(const std::string& promql);
  void stop();

 private:
  // Until done() holds (""), the child exits or `limit` passes (the reason, with the
  // end of its log; why_not() says what was still missing).
  std::string poll(std::chrono::seconds limit, const std::function<bool()>& done,
                   const std::function<std::string()>& why_not);

  int port_;
  std::string log_file_;
  std::unique_ptr<Process> process_;
};

}  // namespace shardguard::shardctl
