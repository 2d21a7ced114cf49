// The metrics and health endpoint every ShardGuard process runs:
//   GET /metrics  Prometheus text format of the registry
//   GET /healthz  200 "ok" while the process runs
//   GET /readyz   200 "ready" once set_ready(true), else 503 with the reason
// Thread-safe. Not copyable or movable (it owns a listening thread).
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include <prometheus/registry.h>

namespace httplib { class Server; }

namespace shardguard {

class MetricsServer {
 public:
  explicit MetricsServer(std::shared_ptr<prometheus::Registry> registry);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Binds host:port (port 0 = any free port) and serves in a background thread.
  // Throws std::runtime_error naming the address when the bind fails, and
  // std::logic_error when already started.
  void start(const std::string& host, int port);
  // Stops serving and joins the thread. Idempotent; start() may be called again.
  void stop();
  // The bound port while serving, else 0.
  int port() const { return port_.load(); }

  void set_ready(bool ready, const std::string& reason = "");

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<int> port_{0};
  std::mutex lifecycle_mu_;  // serialises start() and stop()
  std::condition_variable done_cv_;
  bool listen_done_ = false;  // guarded by mu_; set when the serving thread returns
  mutable std::mutex mu_;
  bool ready_ = false;
  std::string not_ready_reason_ = "starting";
};

// Splits "host:port" (IPv4, name, or [IPv6]); the port must be 0..65535. An empty
// host (":9100") means every interface, "0.0.0.0". Throws std::invalid_argument
// naming the text.
std::pair<std::string, int> split_host_port(const std::string& address);

}  // namespace shardguard
