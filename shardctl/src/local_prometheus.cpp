#include "shardguard/shardctl/local_prometheus.h"

#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <sstream>
#include <stdexcept>

#include <httplib.h>

#include "shardguard/common/files.h"

namespace shardguard::shardctl {

namespace {

// A YAML double-quoted scalar (JSON strings are valid YAML).
std::string quoted(const std::string& s) { return nlohmann::json(s).dump(); }

}  // namespace

std::string prometheus_config(const std::vector<ScrapeTarget>& targets, std::chrono::milliseconds interval) {
  std::ostringstream y;
  y << "# Written by shardctl run --prometheus; one target per shardd and sidecar.\n"
    << "global:\n"
    << "  scrape_interval: " << interval.count() << "ms\n"
    << "  scrape_timeout: " << interval.count() << "ms\n"
    << "  evaluation_interval: " << interval.count() << "ms\n"
    << "scrape_configs:\n"
    << "  - job_name: shardguard-local\n"
    << "    honor_labels: true\n"
    << "    static_configs:\n";
  for (const auto& t : targets) {
    y << "      - targets: [" << quoted(t.address) << "]\n";
    if (t.labels.empty()) continue;
    y << "        labels:\n";
    for (const auto& [k, v] : t.labels) y << "          " << k << ": " << quoted(v) << "\n";
  }
  return y.str();
}

std::string principal_exposure_query(const std::string& selector, const std::string& range) {
  auto metric = [&](const std::string& name) {
    const std::string m = name + "{" + selector + "}";
    return range.empty() ? m : "last_over_time(" + m + "[" + range + "])";
  };
  const std::string params = "max by (namespace, job, shard) (" + metric("shardguard_shard_parameters") + ")";
  return "sum by (namespace, job, peer) (max by (namespace, job, peer, shard) (" +
         metric("shardguard_exposure_ratio") + ") * on (namespace, job, shard) group_left () (" + params +
         " / on (namespace, job) group_left () sum by (namespace, job) (" + params + ")))";
}

LocalPrometheus::LocalPrometheus(const std::string& binary, const std::string& dir, int port,
                                 const std::vector<ScrapeTarget>& targets, std::chrono::milliseconds interval)
    : port_(port), log_file_(dir + "/prometheus.log") {
  make_dirs(dir + "/data");
  write_file_atomic(dir + "/prometheus.yml", prometheus_config(targets, interval));
  SpawnOptions o;
  o.argv = {binary,
            "--config.file=" + dir + "/prometheus.yml",
            "--storage.tsdb.path=" + dir + "/data",
            "--web.listen-address=127.0.0.1:" + std::to_string(port),
            "--log.format=json"};
  o.log_file = log_file_;
  process_ = std::make_unique<Process>(o);
}

LocalPrometheus::~LocalPrometheus() { stop(); }

void LocalPrometheus::stop() {
  if (process_) process_->terminate(std::chrono::seconds(20));
  process_.reset();
}

std::string LocalPrometheus::poll(std::chrono::seconds limit, const std::function<bool()>& done,
                                  const std::function<std::string()>& why_not) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (auto st = process_->wait_for(std::chrono::milliseconds(0))) {
      return "prometheus exited (" + st->str() + "); its log " + log_file_ + " ends with:\n" +
             tail_of_file(log_file_, 12);
    }
    if (done()) return "";
    if (std::chrono::steady_clock::now() > deadline) {
      return why_not() + " after " + std::to_string(limit.count()) + " s; its log " + log_file_ + " ends with:\n" +
             tail_of_file(log_file_, 12);
    }
    process_->wait_for(std::chrono::milliseconds(200));  // returns early if it exits
  }
}

std::string LocalPrometheus::wait_ready(std::chrono::seconds limit) {
  return poll(
      limit,
      [&] {
        httplib::Client c("127.0.0.1", port_);
        c.set_connection_timeout(0, 200000);
        c.set_read_timeout(1);
        auto r = c.Get("/-/ready");
        return r && r->status == 200;
      },
      [&] { return "prometheus was not ready on " + url(); });
}

std::string LocalPrometheus::wait_targets_up(size_t count, std::chrono::seconds limit) {
  size_t up = 0, active = 0;
  return poll(
      limit,
      [&] {
        httplib::Client c("127.0.0.1", port_);
        c.set_connection_timeout(1);
        c.set_read_timeout(5);
        auto r = c.Get("/api/v1/targets?state=active");
        if (!r || r->status != 200) return false;
        const auto j = nlohmann::json::parse(r->body, nullptr, false);
        up = active = 0;
        if (j.is_object() && j.contains("data") && j["data"].contains("activeTargets")) {
          for (const auto& t : j["data"]["activeTargets"]) {
            ++active;
            up += t.value("health", "") == "up";
          }
        }
        return up >= count;
      },
      [&] {
        return "prometheus scraped " + std::to_string(up) + " of the " + std::to_string(count) +
               " targets expected up (" + std::to_string(active) + " active; " + url() + "/targets)";
      });
}

nlohmann::json LocalPrometheus::query(const std::string& promql) {
  httplib::Client c("127.0.0.1", port_);
  c.set_connection_timeout(2);
  c.set_read_timeout(10);
  auto r = c.Get("/api/v1/query", httplib::Params{{"query", promql}}, httplib::Headers{});
  if (!r) throw std::runtime_error("prometheus at " + url() + " did not answer: " + httplib::to_string(r.error()));
  const auto j = nlohmann::json::parse(r->body, nullptr, false);
  if (!j.is_object() || j.value("status", "") != "success") {
    throw std::runtime_error("prometheus refused the query " + promql + " (HTTP " + std::to_string(r->status) +
                             "): " + (j.is_object() ? j.value("error", r->body) : r->body));
  }
  return j.at("data").at("result");
}

}  // namespace shardguard::shardctl
