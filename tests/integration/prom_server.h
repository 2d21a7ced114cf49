// A Prometheus server (the Debian package's binary) for the process-level tests: over a
// TSDB directory (a fresh one, or the one `shardctl run --prometheus` left behind),
// scraping what a config fragment lists (possibly nothing), queried over HTTP. Ready
// (bounded wait for /-/ready) when the constructor returns, or ready() says not.
#pragma once

#include <chrono>
#include <fstream>
#include <memory>
#include <set>
#include <string>

#include "shardguard/common/httplib.h"
#include <nlohmann/json.hpp>

#include "shardguard/common/process.h"
#include "support/operator_process.h"
#include "support/wait.h"

namespace shardguard::testsupport {

using json = nlohmann::json;

// A Prometheus server over `data_dir` scraping what `scrape_yaml` lists (may be none).
class PromServer {
 public:
  PromServer(const std::string& dir, const std::string& name, const std::string& data_dir,
             const std::string& scrape_yaml) {
    const std::string cfg = dir + "/" + name + ".yml";
    std::ofstream(cfg) << "global:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\n" << scrape_yaml;
    port_ = pick_free_port();
    SpawnOptions o;
    o.argv = {"/usr/bin/prometheus", "--config.file=" + cfg, "--storage.tsdb.path=" + data_dir,
              "--web.listen-address=127.0.0.1:" + std::to_string(port_)};
    o.log_file = dir + "/" + name + ".log";
    log_ = o.log_file;
    process_ = std::make_unique<Process>(o);
    ready_ = eventually(
        [&] {
          httplib::Client c("127.0.0.1", port_);
          auto r = c.Get("/-/ready");
          return r && r->status == 200;
        },
        std::chrono::seconds(30));
  }
  ~PromServer() { process_->terminate(std::chrono::seconds(10)); }
  bool ready() const { return ready_; }
  std::string log() const { return testsupport::slurp(log_); }

  // data.result of a query_range over [start, end] (empty on error, reason in *error).
  json range(const std::string& q, double start, double end, std::string* error) const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(20);
    auto r = c.Get("/api/v1/query_range",
                   httplib::Params{{"query", q}, {"start", std::to_string(start)}, {"end", std::to_string(end)},
                                   {"step", "2"}},
                   httplib::Headers{});
    const json j = r ? json::parse(r->body, nullptr, false) : json();
    if (!j.is_object() || j.value("status", "") != "success") {
      *error = r ? r->body : "no answer";
      return json::array();
    }
    return j["data"]["result"];
  }
  // data.result of an instant query now (empty on error, reason in *error when given).
  json instant(const std::string& q, std::string* error = nullptr) const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(10);
    auto r = c.Get("/api/v1/query", httplib::Params{{"query", q}}, httplib::Headers{});
    const json j = r ? json::parse(r->body, nullptr, false) : json();
    if (!j.is_object() || j.value("status", "") != "success") {
      if (error) *error = r ? r->body : "no answer";
      return json::array();
    }
    return j["data"]["result"];
  }
  std::set<std::string> metric_names() const {
    httplib::Client c("127.0.0.1", port_);
    auto r = c.Get("/api/v1/label/__name__/values");
    std::set<std::string> out;
    const json j = r ? json::parse(r->body, nullptr, false) : json();
    if (j.is_object() && j.contains("data")) {
      for (const auto& n : j["data"]) out.insert(n.get<std::string>());
    }
    return out;
  }

 private:
  int port_ = 0;
  std::string log_;
  bool ready_ = false;
  std::unique_ptr<Process> process_;
};

}  // namespace shardguard::testsupport
