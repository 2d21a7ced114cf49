// Metrics and health endpoint over cpp-httplib (see metrics_server.h).
#include "shardguard/common/metrics_server.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#include <sys/socket.h>

#include "shardguard/common/httplib.h"
#include <prometheus/text_serializer.h>

namespace shardguard {

MetricsServer::MetricsServer(std::shared_ptr<prometheus::Registry> registry) : registry_(std::move(registry)) {
  if (!registry_) throw std::invalid_argument("MetricsServer: registry is null");
}

MetricsServer::~MetricsServer() { stop(); }

void MetricsServer::start(const std::string& host, int port) {
  std::lock_guard<std::mutex> lifecycle(lifecycle_mu_);
  if (thread_.joinable()) throw std::logic_error("MetricsServer already started on port " + std::to_string(port_));
  const std::string address = host + ":" + std::to_string(port);
  if (port < 0 || port > 65535) throw std::runtime_error("cannot listen on " + address + ": port out of range");

  auto server = std::make_unique<httplib::Server>();
  // Four request threads: the clients are Prometheus, the kubelet's probes and the
  // operator, a few requests a second at most, and httplib's default pool (8 or more
  // threads) would sit idle in every sidecar and shardd. An idle keep-alive connection
  // gives its thread back after 2 s.
  server->new_task_queue = [] { return new httplib::ThreadPool(4); };
  server->set_keep_alive_timeout(2);
  // httplib sets SO_REUSEPORT by default, which would let a second server bind a
  // port that is already serving. SO_REUSEADDR alone allows restarts over
  // TIME_WAIT but refuses a port with a live listener.
  server->set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });

  server->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    const prometheus::TextSerializer serializer;
    res.set_content(serializer.Serialize(registry_->Collect()), "text/plain; version=0.0.4");
  });
  server->Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok", "text/plain");
  });
  server->Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
    std::lock_guard<std::mutex> lock(mu_);
    if (ready_) {
      res.set_content("ready", "text/plain");
    } else {
      res.status = 503;
      res.set_content(not_ready_reason_, "text/plain");
    }
  });

  errno = 0;
  int bound = -1;
  if (port == 0) {
    bound = server->bind_to_any_port(host);
  } else if (server->bind_to_port(host, port)) {
    bound = port;
  }
  if (bound <= 0) {
    const int err = errno;
    throw std::runtime_error("cannot listen on " + address + (err != 0 ? std::string(": ") + std::strerror(err) : ""));
  }

  server_ = std::move(server);
  port_ = bound;
  {
    std::lock_guard<std::mutex> lock(mu_);
    listen_done_ = false;
  }
  thread_ = std::thread([this] {
    server_->listen_after_bind();
    {
      std::lock_guard<std::mutex> lock(mu_);
      listen_done_ = true;
    }
    done_cv_.notify_all();
  });
}

void MetricsServer::stop() {
  std::lock_guard<std::mutex> lifecycle(lifecycle_mu_);
  if (!thread_.joinable()) return;
  // httplib's stop() does nothing until the serving loop has marked itself
  // running, so a stop() right after start() could be lost. Repeat it until the
  // serving thread reports that listen_after_bind() returned.
  {
    std::unique_lock<std::mutex> lock(mu_);
    while (!listen_done_) {
      lock.unlock();
      server_->stop();
      lock.lock();
      done_cv_.wait_for(lock, std::chrono::milliseconds(5), [this] { return listen_done_; });
    }
  }
  thread_.join();
  server_.reset();
  port_ = 0;
}

void MetricsServer::set_ready(bool ready, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  ready_ = ready;
  not_ready_reason_ = ready ? "" : (reason.empty() ? "not ready" : reason);
}

std::pair<std::string, int> split_host_port(const std::string& address) {
  const auto bad = [&](const std::string& why) {
    return std::invalid_argument("invalid address \"" + address + "\": " + why + " (want host:port)");
  };
  const auto colon = address.rfind(':');
  if (colon == std::string::npos) throw bad("no ':'");
  std::string host = address.substr(0, colon);
  const std::string port_text = address.substr(colon + 1);

  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);  // [IPv6]
    if (host.empty()) throw bad("empty IPv6 host");
  } else if (host.find_first_of(":[]") != std::string::npos) {
    throw bad("IPv6 hosts must be in brackets");
  }
  if (host.empty()) host = "0.0.0.0";

  if (port_text.empty() || port_text.size() > 5 ||
      port_text.find_first_not_of("0123456789") != std::string::npos) {
    throw bad("port \"" + port_text + "\" is not a number");
  }
  const int port = std::stoi(port_text);
  if (port > 65535) throw bad("port " + port_text + " is out of range 0..65535");
  return {host, port};
}

}  // namespace shardguard
