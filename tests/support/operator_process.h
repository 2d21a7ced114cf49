// One shardguard-operator process for the process-level tests (operator
// integration, monitoring end to end): started against a kubeconfig with metrics and
// health on free ports, its log in a file; the "starting" log line names the metrics
// port and the leader-election identity.
#pragma once

#include <gtest/gtest.h>
#include "shardguard/common/httplib.h"

#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/process.h"
#include "shardguard/common/prom_text.h"
#include "support/wait.h"

namespace shardguard::testsupport {

inline std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One shardguard-operator process; its log goes to a file in the test's directory.
class OperatorProcess {
 public:
  OperatorProcess(const std::string& bin_dir, const std::string& kubeconfig, const std::string& log_file,
                  std::vector<std::string> extra) {
    SpawnOptions so;
    so.argv = {bin_dir + "/shardguard-operator",
               "--kubeconfig", kubeconfig,
               "--metrics-bind-address", "127.0.0.1:0",
               "--health-probe-bind-address", "127.0.0.1:0",
               "--progress-interval", "1",
               "--workers", "2"};
    so.argv.insert(so.argv.end(), extra.begin(), extra.end());
    so.log_file = log_file;
    log_file_ = log_file;
    process_ = std::make_unique<Process>(so);
    // The "starting" line names the metrics port and the identity.
    EXPECT_TRUE(eventually([&] { return parse_start(); }, std::chrono::seconds(20))) << testsupport::slurp(log_file_);
  }
  ~OperatorProcess() {
    if (process_ && process_->running()) process_->terminate(std::chrono::seconds(10));
  }
  pid_t pid() const { return process_->pid(); }
  int metrics_port() const { return metrics_port_; }
  const std::string& identity() const { return identity_; }
  ExitStatus stop() { return process_->terminate(std::chrono::seconds(10)); }
  void kill9() {
    process_->signal(SIGKILL);
    process_->wait();
  }
  std::string log() const { return testsupport::slurp(log_file_); }
  std::string metrics() const {
    httplib::Client cli("127.0.0.1", metrics_port_);
    auto res = cli.Get("/metrics");
    return res && res->status == 200 ? res->body : "";
  }
  // The value of the first sample of `metric` whose labels include every pair of
  // `labels`, label text such as `phase="Running"` (common/prom_text.h).
  std::optional<double> sample(const std::string& metric, const std::string& labels = "") const {
    const auto want = parse_prometheus_labels(labels);
    if (!want) throw std::invalid_argument("not label text: " + labels);
    const std::vector<PromSample> found = prometheus_samples(metrics(), metric, *want);
    if (found.empty()) return std::nullopt;
    return found.front().value;
  }

 private:
  bool parse_start() {
    std::istringstream in(testsupport::slurp(log_file_));
    std::string line;
    while (std::getline(in, line)) {
      if (line.find("\"msg\":\"starting\"") == std::string::npos) continue;
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("metrics_port")) continue;
      metrics_port_ = j["metrics_port"].get<int>();
      identity_ = j.value("identity", "");
      return metrics_port_ > 0;
    }
    return false;
  }
  std::unique_ptr<Process> process_;
  std::string log_file_;
  int metrics_port_ = 0;
  std::string identity_;
};

}  // namespace shardguard::testsupport
