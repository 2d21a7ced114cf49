#include "shardguard/shardctl/local_run.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/httplib.h"
#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/process.h"
#include "shardguard/common/replica_tunnel.h"
#include "shardguard/common/prom_text.h"
#include "shardguard/common/shard_files.h"
#include "shardguard/common/token_file.h"
#include "shardguard/policy/policy.h"
#include "shardguard/operator/reconcile.h"
#include "shardguard/operator/render.h"
#include "shardguard/operator/status.h"
#include "shardguard/shardctl/job_pki.h"
#include "shardguard/shardctl/local_package.h"
#include "shardguard/shardctl/progress.h"
#include "shardguard/shardctl/local_prometheus.h"
#include "shardguard/shardctl/restart.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"

namespace shardguard::shardctl {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

using nlohmann::json;

// One container of a shard pod, as a local process.
struct Child {
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
  std::string log_file;
  std::unique_ptr<Process> process;
};

// Ports of one shard pod on 127.0.0.1 (DESIGN.md §7 gives the in-pod ones).
struct PodPorts {
  int shardd = 0, shardd_metrics = 0, inbound = 0, outbound = 0, sidecar_metrics = 0;
  // Replicas: the sidecar's store tunnel (replicas > 0) and its Gloo tunnel to each
  // other replica q of the stage (gloo_tunnels[q]; 0 for its own).
  int store_tunnel = 0;
  std::vector<int> gloo_tunnels;
};

struct Shard {
  int index = 0;
  int replica = 0;        // spec.sharding.replicas > 1: which replica of stage `index`
  PodPorts ports;
  std::string dir;        // <workdir>/shard-<i>: the pod's Secret and ConfigMap files
  std::string audit_log;  // the sidecar's hash-chained audit log
  Child shardd, sidecar;
  std::streamoff log_start = 0;  // shardd's log before this run
  bool done = false;
  int restarts = 0;
  std::optional<Clock::time_point> restart_at;  // backing off: start shardd again then
};

std::string local(int port) { return "127.0.0.1:" + std::to_string(port); }

// "shard 2", or "shard 2 replica 1" for replica r > 0 of a replicated job.
std::string shard_name(const Shard& s) {
  return "shard " + std::to_string(s.index) + (s.replica > 0 ? " replica " + std::to_string(s.replica) : "");
}

// Where the in-pod paths and addresses of one container of a shard pod land on this
// machine.
struct PodMapping {
  std::map<std::string, std::string> paths;      // mounted file → local path
  std::map<std::string, std::string> dirs;       // mounted directory → local directory
  std::map<std::string, std::string> addresses;  // host:port in the pod → 127.0.0.1:port
};

// The container's own mounts (its volumeMounts against the pod's volumes): a Secret
// item or a ConfigMap key becomes <dir>/<key>, the checkpoint volume's checkpoints
// subPath the shared checkpoint directory and its ledger subPath the sidecar's own
// `state_dir` (only the sidecar mounts it, as only it mounts its state volume,
// `state_dir` too); anything else
// (the tmp emptyDir) is not referenced by any argument. Another container's mounts
// are not this one's: a path only shardd mounts has no counterpart in the sidecar's
// arguments.
void map_mounts(const json& pod, const json& container, const json& config_map, const std::string& dir,
                const std::string& ckpt_dir, const std::string& state_dir, PodMapping& m) {
  std::map<std::string, json> volumes;
  for (const json& v : pod.at("spec").at("volumes")) volumes[v.value("name", "")] = v;
  if (!container.contains("volumeMounts")) return;
  for (const json& vm : container["volumeMounts"]) {
    const std::string mount = vm.value("mountPath", "");
    const json& v = volumes[vm.value("name", "")];
    if (!v.is_object()) continue;
    if (v.contains("secret")) {
      for (const json& item : v.at("secret").at("items")) {
        m.paths[mount + "/" + item.value("path", "")] = dir + "/" + item.value("key", "");
      }
    } else if (v.contains("configMap")) {
      for (const auto& [key, value] : config_map.at("data").items()) m.paths[mount + "/" + key] = dir + "/" + key;
    } else if (v.value("name", "") == "checkpoint") {
      const std::string sub = vm.value("subPath", "");
      if (sub == op::kCheckpointSubPath) m.dirs[mount] = ckpt_dir;
      if (sub == op::kLedgerSubPath) m.dirs[mount] = state_dir;
    } else if (v.value("name", "") == op::kSidecarStateVolume) {
      m.dirs[mount] = state_dir;
    } else if (v.value("name", "") == op::kTunnelVolume) {
      m.dirs[mount] = state_dir + "/tunnel";  // shardd's Gloo map for its sidecar
      make_dirs(state_dir + "/tunnel");
    } else if (v.value("name", "") == op::kPackageVolume) {
      // spec.model.package.path: locally the package directory itself (whatever
      // volume the cluster mounts there).
      m.dirs[mount] = mount;
    }
  }
}

// `arg` as a mounted directory or a file in one (the longest mount path that is a
// prefix of it ending at a '/'), or "" when it is in none or climbs out with "..".
std::string in_mounted_dir(const std::string& arg, const PodMapping& m) {
  if (auto d = m.dirs.find(arg); d != m.dirs.end()) return d->second;
  if (arg.find("/../") != std::string::npos || (arg.size() >= 3 && arg.compare(arg.size() - 3, 3, "/..") == 0)) {
    return "";
  }
  const std::pair<const std::string, std::string>* best = nullptr;
  for (const auto& d : m.dirs) {
    if (arg.size() > d.first.size() + 1 && arg.compare(0, d.first.size(), d.first) == 0 && arg[d.first.size()] == '/' &&
        (!best || d.first.size() > best->first.size())) {
      best = &d;
    }
  }
  return best ? best->second + arg.substr(best->first.size()) : "";
}

// A container's args with every in-pod path and address replaced by its local
// counterpart (also the address of "--peer ID=ADDRESS"). A path or address with no
// counterpart is an error: local mode must never quietly differ from the pod.
std::vector<std::string> localize(const json& container, const PodMapping& m) {
  static const std::regex address(R"(^[A-Za-z0-9.\-]+:[0-9]+$)");
  std::vector<std::string> argv{container.value("image", "")};
  for (const json& a : container.at("args")) {
    const std::string arg = a.get<std::string>();
    const size_t eq = arg.find('=');
    if (auto it = m.addresses.find(arg); it != m.addresses.end()) {
      argv.push_back(it->second);
    } else if (auto p = m.paths.find(arg); p != m.paths.end()) {
      argv.push_back(p->second);
    } else if (const std::string file = in_mounted_dir(arg, m); !file.empty()) {
      argv.push_back(file);
    } else if (eq != std::string::npos && m.addresses.count(arg.substr(eq + 1))) {
      argv.push_back(arg.substr(0, eq + 1) + m.addresses.at(arg.substr(eq + 1)));
    } else if (const size_t at = arg.find('@'); at != std::string::npos && eq != std::string::npos && at < eq &&
                                                  m.addresses.count(arg.substr(at + 1, eq - at - 1))) {
      // "--tunnel SERVICE@ADDRESS=ID": the listener is the address.
      argv.push_back(arg.substr(0, at + 1) + m.addresses.at(arg.substr(at + 1, eq - at - 1)) + arg.substr(eq));
    } else if (arg.rfind("/", 0) == 0 || std::regex_match(arg, address) ||
               (eq != std::string::npos && std::regex_match(arg.substr(eq + 1), address))) {
      throw std::runtime_error("container " + container.value("name", "") + ": argument \"" + arg +
                               "\" has no local counterpart");
    } else {
      argv.push_back(arg);
    }
  }
  return argv;
}

json container_named(const json& pod, const std::string& name) {
  for (const json& c : pod.at("spec").at("containers")) {
    if (c.value("name", "") == name) return c;
  }
  throw std::runtime_error("rendered pod " + pod.at("metadata").value("name", "") + " has no container " + name);
}

// The pod's Secret and ConfigMap contents as files in dir: private keys 0600,
// everything atomic.
void write_pod_files(const json& secret, const json& config_map, const std::string& dir) {
  make_dirs(dir);
  ::chmod(dir.c_str(), 0700);
  for (const auto& [key, value] : secret.at("data").items()) {
    const bool is_private =
        key == "tls.key" || key == "checkpoint.key" || key == "ledger.key" || key == op::kPackageKeyItem;
    write_file_atomic(dir + "/" + key, op::base64_decode(value.get<std::string>()), is_private ? 0600 : 0644);
  }
  for (const auto& [key, value] : config_map.at("data").items()) {
    write_file_atomic(dir + "/" + key, value.get<std::string>());
  }
}

// Deny decisions by rule, from a sidecar's metrics page.
std::map<std::string, double> denials_by_rule(const std::string& page) {
  std::map<std::string, double> out;
  for (const PromSample& s : prometheus_samples(page, "shardguard_authz_decisions_total", {{"decision", "deny"}})) {
    out[s.labels.count("rule") != 0 ? s.labels.at("rule") : "?"] += s.value;
  }
  return out;
}

std::string get_page(int port, const std::string& path) {
  httplib::Client c("127.0.0.1", port);
  c.set_connection_timeout(1);
  c.set_read_timeout(5);
  auto r = c.Get(path);
  return r && r->status == 200 ? r->body : std::string();
}

// What shardd logged as its message bytes ("pipeline traffic", the final value of
// shardguard_pipeline_message_bytes_total, logged after its links closed), summed
// over the processes of this run (a restarted shardd starts from zero; one that was
// killed logs nothing).
struct ShardTraffic {
  double sent = 0, received = 0;
  int reports = 0;
};
// Calls fn(line) for every JSON log line "msg": `msg` written since `from`.
void for_each_log_line(const std::string& log_file, std::streamoff from, const std::string& msg,
                       const std::function<void(const json&)>& fn) {
  std::ifstream in(log_file);
  in.seekg(from);
  std::string line;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, false);
    if (j.is_object() && j.value("msg", "") == msg) fn(j);
  }
}

ShardTraffic shardd_traffic(const std::string& log_file, std::streamoff from) {
  ShardTraffic t;
  for_each_log_line(log_file, from, "pipeline traffic", [&](const json& j) {
    t.sent += j.value("message_bytes_sent", 0.0);
    t.received += j.value("message_bytes_received", 0.0);
    ++t.reports;
  });
  return t;
}

// The sum of `field` over the JSON log lines "msg": `msg` written since `from`.
double json_field_sum(const std::string& log_file, std::streamoff from, const std::string& msg,
                      const std::string& field) {
  double sum = 0;
  for_each_log_line(log_file, from, msg, [&](const json& j) { sum += j.value(field, 0.0); });
  return sum;
}

// The log written since `from` (this run's part of it).
std::string log_since(const std::string& log_file, std::streamoff from) {
  std::ifstream in(log_file, std::ios::binary);
  in.seekg(from);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::streamoff file_size(const std::string& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  return ec ? 0 : static_cast<std::streamoff>(size);
}

// Last stage's JSON log lines that matter to the user.
struct RunState {
  Progress progress;
  std::optional<double> test_accuracy;
  int64_t test_correct = 0, test_total = 0;
  std::optional<double> eval_loss;  // nats per prediction
  std::optional<double> eval_bits;  // language models: bits per token
};

void absorb(const std::string& line, RunState& st, RateMeter& rate, double now) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  if (!j.is_object() || !j.contains("msg")) return;
  const std::string msg = j.value("msg", "");
  if (msg == "step") {
    st.progress.step = j.value("step", int64_t{0});
    st.progress.total_steps = j.value("total_steps", int64_t{0});
    st.progress.epoch = j.value("epoch", 0);
    st.progress.loss = j.value("loss", 0.0);
    st.progress.accuracy = j.value("accuracy", 0.0);
    rate.observe(st.progress.step, now);
    st.progress.samples_per_second = rate.samples_per_second();
    st.progress.eta_seconds = rate.eta_seconds(st.progress.step, st.progress.total_steps);
  } else if (msg == "evaluation") {
    st.test_accuracy = j.value("accuracy", 0.0);
    st.test_correct = j.value("correct", int64_t{0});
    st.test_total = j.value("total", int64_t{0});
    if (j.contains("loss")) st.eval_loss = j.value("loss", 0.0);
    if (j.contains("bits_per_token")) st.eval_bits = j.value("bits_per_token", 0.0);
  }
}

// Only the last stage's stderr is read (progress); the others go to their log
// files only, so no unread pipe can ever fill up and block a shard.
void start(Child& c, bool capture) {
  SpawnOptions o;
  o.argv = c.argv;
  o.env = c.env;
  o.log_file = c.log_file;
  o.capture_stderr = capture;
  c.process = std::make_unique<Process>(o);
}

void stop(std::vector<Shard>& shards, Child Shard::*which) {
  for (auto& s : shards) {
    if ((s.*which).process) (s.*which).process->signal(SIGTERM);
  }
  for (auto& s : shards) {
    if ((s.*which).process) (s.*which).process->terminate(std::chrono::seconds(15));
  }
}

// Every shardd first, then the sidecars (no shardd ever loses its way out while
// it is still running).
void stop_all(std::vector<Shard>& shards) {
  stop(shards, &Shard::shardd);
  stop(shards, &Shard::sidecar);
}

// Waits (bounded) until every sidecar answers /readyz; "" when all are, else why not.
std::string wait_for_sidecars(std::vector<Shard>& shards, std::chrono::seconds limit) {
  const auto deadline = Clock::now() + limit;
  for (auto& s : shards) {
    for (;;) {
      if (auto st = s.sidecar.process->wait_for(std::chrono::milliseconds(0))) {
        return "the sidecar of " + shard_name(s) + " could not start (" + st->str() +
               "); its log " + s.sidecar.log_file + " ends with:\n" + tail_of_file(s.sidecar.log_file, 8);
      }
      httplib::Client c("127.0.0.1", s.ports.sidecar_metrics);
      c.set_connection_timeout(0, 200000);
      c.set_read_timeout(1);
      auto r = c.Get("/readyz");
      if (r && r->status == 200) break;
      if (Clock::now() > deadline) {
        return "the sidecar of " + shard_name(s) + " was not ready after " +
               std::to_string(limit.count()) + " s" + (r ? " (/readyz: " + r->body + ")" : "") + "; its log " +
               s.sidecar.log_file + " ends with:\n" + tail_of_file(s.sidecar.log_file, 8);
      }
      s.sidecar.process->wait_for(std::chrono::milliseconds(100));  // returns early if it exits
    }
  }
  return "";
}

// Short, so that even a short run's shardd processes are scraped before they finish.
constexpr std::chrono::milliseconds kScrapeInterval{500};

// Every shardd and sidecar, labelled as the chart's PodMonitor labels shard pods.
std::vector<ScrapeTarget> scrape_targets(const JobSpec& job, const op::DesiredObjects& objects,
                                         const std::vector<Shard>& shards) {
  std::vector<ScrapeTarget> out;
  for (const Shard& s : shards) {
    std::map<std::string, std::string> labels{
        {"namespace", job.namespace_},
        {"job", job.name},
        {"shard", std::to_string(s.index)},
        {"pod", objects.pods[s.index].at("metadata").value("name", "") +
                    (s.replica > 0 ? "-r" + std::to_string(s.replica) : "")},
        {"node", "local-shard-" + std::to_string(s.index)}};
    if (job.sharding.replicas > 1) labels["replica"] = std::to_string(s.replica);
    labels["container"] = "shardd";
    out.push_back({local(s.ports.shardd_metrics), labels});
    labels["container"] = "sidecar";
    out.push_back({local(s.ports.sidecar_metrics), labels});
  }
  return out;
}

// The report's Prometheus part: which targets were ever scraped, and each
// principal's exposure as PromQL computes it (read over the run, as the processes
// have stopped). False when a target was never scraped, a query failed, or an
// exposure is above maxExposure.
bool report_from_prometheus(LocalPrometheus& prometheus, const JobSpec& job, int n, double wall_s) {
  const std::string selector = "namespace=\"" + job.namespace_ + "\", job=\"" + job.name + "\"";
  const std::string range = std::to_string(static_cast<int64_t>(wall_s) + 60) + "s";
  try {
    const json up = prometheus.query("max by (pod, container) (max_over_time(up{" + selector + "}[" + range + "]))");
    int scraped = 0;
    std::vector<std::string> missed;
    for (const json& r : up) {
      if (r.at("value").at(1).get<std::string>() == "1") {
        ++scraped;
      } else {
        missed.push_back(r.at("metric").value("pod", "?") + "/" + r.at("metric").value("container", "?"));
      }
    }
    std::printf("  prometheus      %s scraped %d of %d targets\n", prometheus.url().c_str(), scraped, 2 * n);
    for (const auto& m : missed) std::printf("  prometheus      NEVER scraped successfully: %s\n", m.c_str());

    const json exposure = prometheus.query(principal_exposure_query(selector, range));
    double largest = 0;
    std::vector<std::pair<std::string, double>> rows;
    for (const json& r : exposure) {
      const double v = std::stod(r.at("value").at(1).get<std::string>());
      rows.emplace_back(r.at("metric").value("peer", "?"), v);
      largest = std::max(largest, v);
    }
    std::sort(rows.begin(), rows.end());
    for (const auto& [peer, v] : rows) std::printf("  exposure (PromQL) principal %s %.4f\n", peer.c_str(), v);
    const bool within = largest <= job.protection.max_exposure + 1e-9;
    std::printf("  exposure (PromQL) max %.4f over %zu principal(s)  (%s maxExposure %.4f)\n", largest, rows.size(),
                within ? "within" : "ABOVE", job.protection.max_exposure);
    return scraped == 2 * n && !rows.empty() && within;
  } catch (const std::exception& e) {
    std::cerr << "shardctl run: --prometheus: " << e.what() << "\n";
    return false;
  }
}

// The text on stdout (only it), the summary on stderr.
int report_generation(const LocalGenerate& g, const std::string& tokens_file, const std::string& stage0_log, int n,
                      double wall, double denied) {
  std::vector<uint16_t> tokens;
  try {
    tokens = read_token_file(tokens_file);
  } catch (const std::exception& e) {
    std::cerr << "shardctl generate: stage 0 finished but its tokens are unreadable: " << e.what() << "\n";
    return 1;
  }
  if (static_cast<int64_t>(tokens.size()) != g.tokens) {
    std::cerr << "shardctl generate: stage 0 wrote " << tokens.size() << " tokens, not the " << g.tokens
              << " asked for\n";
    return 1;
  }
  json finished;
  std::istringstream lines(stage0_log);
  for (std::string line; std::getline(lines, line);) {
    const json j = json::parse(line, nullptr, false);
    if (j.is_object() && j.value("msg", "") == "generation finished") finished = j;
  }
  std::vector<uint16_t> prompt;
  for (const unsigned char c : g.prompt) prompt.push_back(c);  // bytes, not sign-extended chars
  std::cout << printable_text(prompt) << printable_text(tokens) << "\n" << std::flush;
  if (!g.out_file.empty()) write_token_file(g.out_file, tokens);
  std::fprintf(stderr,
               "shardctl generate: %lld tokens through %d stages (one forward pass per token) from the checkpoints of "
               "step %lld in %s (%.1f tokens/s); temperature %g, top-k %d, seed %llu\n",
               static_cast<long long>(tokens.size()), n, static_cast<long long>(finished.value("step", int64_t{0})),
               format_duration(wall).c_str(), finished.value("tokens_per_second", 0.0), g.temperature, g.top_k,
               static_cast<unsigned long long>(g.seed));
  // Every frame went as a Forward or Backward call between neighbours, which the shard
  // policy allows; anything else would have been refused and counted here.
  std::fprintf(stderr, "  policy denials  %.0f\n", denied);
  return 0;
}

}  // namespace

// Why `shardctl generate` cannot run this job with these options, naming the flag or
// the spec field and the value; "" when it can.
std::string generation_refusal(const JobSpec& job, const LocalGenerate& g) {
  if (!job.model.language_model()) {
    return "job " + job.name + " is not a language model (spec.model.architecture " + job.model.architecture +
           (job.model.from_package() ? " with spec.dataset.format " + job.dataset.format : std::string()) +
           "); generate needs architecture gpt, or torchscript with format tokens";
  }
  if (g.tokens < 1 || g.tokens > kMaxGenerateTokens) {
    return "--tokens " + std::to_string(g.tokens) + " is out of range (1.." + std::to_string(kMaxGenerateTokens) + ")";
  }
  if (g.prompt.empty()) return "--prompt is empty: give at least one byte to continue from";
  for (size_t i = 0; i < g.prompt.size(); ++i) {
    const int byte = static_cast<unsigned char>(g.prompt[i]);
    if (byte >= job.model.vocab) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", byte);
      return "--prompt: byte " + std::to_string(i) + " (" + hex + ") is outside the model's vocabulary of " +
             std::to_string(job.model.vocab) + " tokens (spec.model.vocab)";
    }
  }
  if (!(g.temperature >= 0) || !std::isfinite(g.temperature)) {
    return "--temperature " + std::to_string(g.temperature) + " must be a number >= 0 (0 = greedy)";
  }
  if (g.top_k < 0 || g.top_k > job.model.vocab) {
    return "--top-k " + std::to_string(g.top_k) + " is out of range (0 = every token, or 1.." +
           std::to_string(job.model.vocab) + ")";
  }
  return "";
}

std::string printable_text(const std::vector<uint16_t>& tokens) {
  std::string out;
  char buf[16];
  for (size_t i = 0; i < tokens.size();) {
    const uint16_t t = tokens[i];
    if (t >= 256) {
      out += "<" + std::to_string(t) + ">";
      ++i;
      continue;
    }
    // A whole UTF-8 sequence of byte tokens (no overlong forms, no surrogates), as it is.
    size_t len = t < 0x80 ? 1 : (t >= 0xc2 && t <= 0xdf) ? 2 : (t >= 0xe0 && t <= 0xef) ? 3 : (t >= 0xf0 && t <= 0xf4) ? 4 : 0;
    bool ok = len > 0 && i + len <= tokens.size();
    for (size_t k = 1; ok && k < len; ++k) ok = tokens[i + k] >= 0x80 && tokens[i + k] <= 0xbf;
    if (ok && len == 3) {
      const uint16_t b1 = tokens[i + 1];
      ok = !(t == 0xe0 && b1 < 0xa0) && !(t == 0xed && b1 > 0x9f);
    }
    if (ok && len == 4) {
      const uint16_t b1 = tokens[i + 1];
      ok = !(t == 0xf0 && b1 < 0x90) && !(t == 0xf4 && b1 > 0x8f);
    }
    // Control characters other than newline and tab would drive the terminal.
    if (ok && len == 1 && ((t < 0x20 && t != '\n' && t != '\t') || t == 0x7f)) ok = false;
    if (!ok) {
      std::snprintf(buf, sizeof buf, "\\x%02x", t);
      out += buf;
      ++i;
      continue;
    }
    for (size_t k = 0; k < len; ++k) out += static_cast<char>(tokens[i + k]);
    i += len;
  }
  return out;
}

int RunLocal(const LocalRunOptions& options) {
  const auto started = Clock::now();
  // `shardctl generate` runs the same processes; it trains nothing and prints the
  // generated text on stdout, so everything else goes to stderr.
  const bool generating = options.generate.has_value();
  const char* who = generating ? "shardctl generate" : "shardctl run";
  std::ostream& info = generating ? std::cerr : std::cout;
  FILE* info_file = generating ? stderr : stdout;
  JobSpec job;
  json object;
  std::vector<model::StageDesc> stages;
  model::ModelDesc desc;
  try {
    // Decoded and validated exactly as the operator does (job_from_json behind
    // load_job_file); the object itself goes into each shard's job.json.
    job = load_job_file(options.job_file);
    object = yaml_to_json(read_file(options.job_file));
    // A package job's cut comes from its manifest (spec.model.package.path, or the
    // keys directory for a url job).
    auto cut = local_job_cut(job, options.package_keys);
    desc = std::move(cut.desc);
    stages = std::move(cut.stages);
  } catch (const JobSpecError& e) {
    std::cerr << who << ": invalid job " << options.job_file << ":\n" << e.what() << "\n";
    return 2;
  } catch (const model::PackageError& e) {
    std::cerr << who << ": the packages of job " << options.job_file << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << who << ": invalid job " << options.job_file << ":\n" << e.what() << "\n";
    return 2;
  }
  if (generating) {
    if (const std::string why = generation_refusal(job, *options.generate); !why.empty()) {
      std::cerr << who << ": " << why << "\n";
      return 2;
    }
  }
  // Data that does not fit the model is refused before any process starts
  // (generation reads no data).
  std::optional<double> unigram_bits;
  if (job.dataset.format == "tokens" && !generating) {
    try {
      const auto train = read_token_file(token_file_path(job.dataset.path, true));
      check_tokens(train, token_file_path(job.dataset.path, true), job.model.vocab, job.model.context);
      const auto validation = read_token_file(token_file_path(job.dataset.path, false));
      check_tokens(validation, token_file_path(job.dataset.path, false), job.model.vocab, job.model.context);
      unigram_bits = unigram_bits_per_token(train, validation, job.model.vocab);
    } catch (const std::exception& e) {
      std::cerr << who << ": the data of job " << options.job_file << " does not fit its model: " << e.what()
                << "\n";
      return 2;
    }
  }
  const int n = static_cast<int>(stages.size());
  const std::string workdir = options.workdir.empty() ? ".shardguard/" + job.name : options.workdir;
  const std::string ckpt_dir = workdir + "/checkpoints", key_dir = workdir + "/keys", log_dir = workdir + "/logs";
  const std::string shardd_path = options.shardd.empty() ? self_dir() + "/shardd" : options.shardd;
  const std::string sidecar_path = options.sidecar.empty() ? self_dir() + "/shard-sidecar" : options.sidecar;
  for (const auto& [path, flag] : {std::pair{shardd_path, "--shardd"}, std::pair{sidecar_path, "--sidecar"}}) {
    if (::access(path.c_str(), X_OK) != 0) {
      std::cerr << who << ": cannot run " << path << " (build it with `make build`, or pass " << flag << ")\n";
      return 2;
    }
  }

  std::string prometheus_path;
  if (options.prometheus) {
    prometheus_path = find_in_path(options.prometheus_bin);
    if (prometheus_path.empty()) {
      std::cerr << who << ": --prometheus: cannot find " << options.prometheus_bin
                << (options.prometheus_bin.find('/') == std::string::npos ? " in PATH" : "")
                << " (Debian package prometheus, installed by `make deps`; or pass --prometheus-bin)\n";
      return 2;
    }
    if (options.prometheus_port != 0 && !port_free(options.prometheus_port)) {
      std::cerr << who << ": --prometheus-port " << options.prometheus_port << ": 127.0.0.1:"
                << options.prometheus_port << " is already in use\n";
      return 2;
    }
  }

  // One run per workdir, for the whole run: a second one (even --fresh) must not
  // delete this one's checkpoints or hand its sidecars a new CA. Taken before
  // anything in the workdir is read or changed; released when this process ends.
  std::optional<FileLock> workdir_lock;
  try {
    make_dirs(workdir);
    workdir_lock.emplace(workdir + "/run.lock");
  } catch (const FileLockBusy& e) {
    std::cerr << who << ": " << workdir << " is in use by another shardctl run (" << e.holder() << ", lock " << workdir
              << "/run.lock); wait for it to end, stop it, or pass another --workdir\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << who << ": --workdir " << workdir << ": " << e.what() << "\n";
    return 2;
  }

  // Old checkpoints are never silently reused or thrown away.
  bool has_checkpoints = fs::exists(ckpt_dir) && !fs::is_empty(ckpt_dir);
  if (generating && !has_checkpoints) {
    std::cerr << who << ": " << ckpt_dir << " holds no checkpoints: train the job first with `shardctl run "
              << options.job_file << (options.workdir.empty() ? "" : " --workdir " + options.workdir)
              << "` (or pass the --workdir it used)\n";
    return 2;
  }
  if (has_checkpoints && !options.resume && !options.fresh && !generating) {
    std::cerr << who << ": " << ckpt_dir << " holds checkpoints of an earlier run; pass --resume to continue it "
              << "or --fresh to start over\n";
    return 2;
  }

  // The job's PKI (reused by --resume; checkpoint keys always), then the objects the
  // operator would create, rendered by its own code. Nothing is written before
  // render() has accepted the job.
  LocalPki pki;
  op::DesiredObjects objects;
  // Generation runs one pipeline, replica 0's, whatever spec.sharding.replicas says.
  JobSpec run_job = job;
  json run_object = object;
  if (generating && job.sharding.replicas > 1) {
    run_job.sharding.replicas = 1;
    run_object["spec"]["sharding"]["replicas"] = 1;
  }
  try {
    pki = load_or_create_local_pki(run_job, workdir, options.resume || generating, options.fresh ? "" : ckpt_dir);
    op::RenderInputs in = make_render_inputs(run_object, pki.ca, pki.shards);
    in.shardd_image = shardd_path;  // locally, a container's image is its binary
    in.sidecar_image = sidecar_path;
    in.export_budget_bytes = options.export_budget_bytes;
    // A package job: the manifest, and the keys as the operator copies them from the
    // keys Secret (each into its own shard's Secret, so into shard-<i>/package.key).
    add_local_package(job, options.package_keys, in);
    // Every replica its own pod's objects, identity, policy and tunnels, as the
    // operator renders them (generation: replica 0's pipeline, see run_job).
    objects = op::render(run_job, in);
  } catch (const op::RenderError& e) {
    std::cerr << who << ": the operator would refuse job " << job.namespace_ << "/" << job.name << ": "
              << e.what() << "\n";
    return 2;
  } catch (const model::PackageError& e) {
    std::cerr << who << ": the packages of job " << options.job_file << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << who << ": the job's PKI in " << workdir << ": " << e.what() << "\n";
    return 2;
  }

  if (has_checkpoints && options.fresh) {
    fs::remove_all(ckpt_dir);
    has_checkpoints = false;
  }
  if (options.resume && !has_checkpoints) {
    std::cerr << who << ": --resume given but " << ckpt_dir << " holds no checkpoints; starting from step 0\n";
  }

  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  // Replicas (spec.sharding.replicas): R pipelines of the same stages. shards[r·n + i]
  // is replica r of stage i, so shards[0 .. n-1] are replica 0's, as without replicas.
  const int replicas = generating ? 1 : job.sharding.replicas;  // generation: replica 0's pipeline
  const int processes = n * replicas;
  const int threads = options.threads > 0 ? options.threads : std::max(1, static_cast<int>(cores) / processes);
  std::vector<Shard> shards(processes);
  std::vector<int> group_ports(n, 0);  // each stage's replica-group store (replica 0 serves it)
  int prometheus_port = options.prometheus_port;  // 0: picked below
  const std::string generate_dir = workdir + "/generate";  // the prompt and the tokens, 0700
  try {
    make_dirs(ckpt_dir);
    make_dirs(log_dir);
    save_local_pki(pki, workdir);
    if (generating) {
      make_dirs(generate_dir);
      ::chmod(generate_dir.c_str(), 0700);
      std::vector<uint16_t> prompt;
      for (const unsigned char c : options.generate->prompt) prompt.push_back(c);
      write_token_file(generate_dir + "/prompt.tokens", prompt);
      fs::remove(generate_dir + "/generated.tokens");
    }
    std::set<int> taken;  // five distinct ports per shard, none handed out twice
    if (options.prometheus_port != 0) taken.insert(options.prometheus_port);
    auto take_port = [&](int* port) {
      // Below the ephemeral range: the children bind these later, and the connections the
      // run opens meanwhile (Gloo's among them) take their source ports from that range.
      for (int tries = 0; tries < 100 && (*port == 0 || taken.count(*port)); ++tries) *port = pick_listen_port();
      if (!taken.insert(*port).second) throw std::runtime_error("could not find enough free ports on 127.0.0.1");
    };
    for (int k = 0; k < processes; ++k) {
      PodPorts& p = shards[k].ports;
      for (int* port : {&p.shardd, &p.shardd_metrics, &p.inbound, &p.outbound, &p.sidecar_metrics}) take_port(port);
    }
    if (replicas > 1) {
      for (int& port : group_ports) take_port(&port);
      // The replica tunnels' listeners: the store tunnel of every replica but 0, and
      // one Gloo tunnel per other replica (gloo_tunnel_host(q) differs per q, the port
      // per listening sidecar, since locally they share one loopback).
      for (int k = 0; k < processes; ++k) {
        if (k >= n) take_port(&shards[k].ports.store_tunnel);
        shards[k].ports.gloo_tunnels.assign(replicas, 0);
        for (int q = 0; q < replicas; ++q) {
          if (q != k / n) take_port(&shards[k].ports.gloo_tunnels[q]);
        }
      }
    }
    if (options.prometheus) {
      for (int tries = 0; tries < 100 && (prometheus_port == 0 || taken.count(prometheus_port)); ++tries) {
        prometheus_port = pick_listen_port();
      }
      if (!taken.insert(prometheus_port).second || prometheus_port == 0) {
        throw std::runtime_error("could not find a free port on 127.0.0.1 for Prometheus");
      }
    }
    for (int k = 0; k < processes; ++k) {
      const int i = k % n, r = k / n;
      // Replica r > 0 of stage i: its own processes, ports and logs ("-r<r>"), the
      // pod files and checkpoints of stage i (only replica 0 writes checkpoints).
      const std::string suffix = r > 0 ? "-r" + std::to_string(r) : "";
      Shard& s = shards[k];
      s.index = i;
      s.replica = r;
      s.dir = workdir + "/shard-" + std::to_string(i);
      // The sidecar's own volume (its audit log) and its part of the checkpoint volume
      // (its exposure ledger) under logs/, kept across runs; --fresh starts a new
      // ledger with the new training, as it starts new checkpoints.
      const std::string state_dir = local_sidecar_state_dir(workdir, i) + suffix;
      make_dirs(state_dir);
      const std::string ledger = "/" + fs::path(op::ledger_file(run_job, i, r)).filename().string();
      if (options.fresh) {
        fs::remove(state_dir + ledger);
      } else if (fs::exists(ckpt_dir + ledger) && !fs::exists(state_dir + ledger)) {
        fs::rename(ckpt_dir + ledger, state_dir + ledger);  // where a run before issue 16 kept it
      }
      s.audit_log = state_dir + "/" + op::kAuditFileName;
      const json& pod = objects.pods[k];
      s.dir += suffix;  // its own leaf and policy (the stage's keys)
      write_pod_files(objects.shard_secrets[k], objects.config_maps[k], s.dir);

      // The pod's addresses: its own listeners, and every peer's inbound mTLS port
      // under its headless-Service DNS name.
      PodMapping m;
      m.addresses = {{"127.0.0.1:" + std::to_string(op::kShardGrpcPort), local(s.ports.shardd)},
                     {"127.0.0.1:" + std::to_string(op::kSidecarOutboundPort), local(s.ports.outbound)},
                     {"0.0.0.0:" + std::to_string(op::kSidecarInboundPort), local(s.ports.inbound)},
                     {"0.0.0.0:" + std::to_string(op::kShardMetricsPort), local(s.ports.shardd_metrics)},
                     {"0.0.0.0:" + std::to_string(op::kSidecarMetricsPort), local(s.ports.sidecar_metrics)}};
      // Every pod's DNS name (replica r's neighbours are replica r's stages; the
      // replicas of stage i are its tunnels' peers).
      for (int j = 0; j < processes; ++j) {
        m.addresses[op::replica_dns_name(run_job, j % n, j / n, "cluster.local") + ":" +
                    std::to_string(op::kSidecarInboundPort)] = local(shards[j].ports.inbound);
      }
      if (replicas > 1) {
        // The group's store at the pod's 127.0.0.1:7100: replica 0's shardd serves it
        // (on that loopback address only: common/kv_store.h); the others' sidecars
        // tunnel it there. And the Gloo tunnels' listeners.
        m.addresses[local(op::kReplicaStorePort)] = local(r == 0 ? group_ports[i] : s.ports.store_tunnel);
        for (int q = 0; q < replicas; ++q) {
          if (q == r) continue;
          m.addresses[gloo_tunnel_host(q) + ":" + std::to_string(kGlooTunnelPort)] =
              gloo_tunnel_host(q) + ":" + std::to_string(s.ports.gloo_tunnels[q]);
        }
      }
      const auto argv_of = [&](const char* name) {
        const json c = container_named(pod, name);
        PodMapping cm = m;  // the pod's addresses, and this container's own mounts
        map_mounts(pod, c, objects.config_maps[k], s.dir, ckpt_dir, state_dir, cm);
        return localize(c, cm);
      };
      s.sidecar.argv = argv_of("sidecar");  // --audit-log on its state volume, as rendered
      s.sidecar.log_file = log_dir + "/sidecar-" + std::to_string(i) + suffix + ".log";

      s.shardd.argv = argv_of("shardd");
      s.shardd.argv.insert(s.shardd.argv.end(), {"--device", options.device, "--threads", std::to_string(threads),
                                                 "--peer-timeout", std::to_string(options.peer_timeout_s)});
      if (generating) {
        // Every stage samples alike; only stage 0 sees the prompt and the tokens.
        const LocalGenerate& g = *options.generate;
        s.shardd.argv.insert(s.shardd.argv.end(),
                             {"--generate-tokens", std::to_string(g.tokens), "--temperature", std::to_string(g.temperature),
                              "--top-k", std::to_string(g.top_k), "--sample-seed", std::to_string(g.seed)});
        if (i == 0) {
          s.shardd.argv.insert(s.shardd.argv.end(),
                               {"--generate-prompt", generate_dir + "/prompt.tokens", "--generate-out",
                                generate_dir + "/generated.tokens"});
        }
      }
      s.shardd.log_file = log_dir + "/shard-" + std::to_string(i) + suffix + ".log";
      s.log_start = file_size(s.shardd.log_file);
      const std::string t = std::to_string(threads);
      // Passive OpenMP workers: spinning ones steal the cores the other shards need.
      s.shardd.env = {{"OMP_NUM_THREADS", t}, {"OPENBLAS_NUM_THREADS", t}, {"OMP_WAIT_POLICY", "PASSIVE"}};
    }
  } catch (const std::exception& e) {
    std::cerr << who << ": " << e.what() << "\n";
    return 2;
  }

  // Signals are taken synchronously in the loop below, never in a handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigprocmask(SIG_BLOCK, &signals, nullptr);

  info << who << ": job " << job.name << ", model " << job.model.architecture << " ("
       << desc.parameters() << " parameters), " << n << " shards"
            << (replicas > 1 ? " × " + std::to_string(replicas) + " replicas" : std::string()) << ", " << threads
            << " thread(s) each" << (generating ? ", restoring the newest checkpoints in " + ckpt_dir : "") << "\n"
            << std::flush;
  for (const auto& st : stages) {
    const PodPorts& p = shards[st.index].ports;
    std::fprintf(info_file, "  shard %d: blocks %d..%d  %lld parameters (%.1f%%)  sidecar mTLS :%d, shardd :%d\n", st.index,
                st.first_block, st.end_block - 1, static_cast<long long>(st.parameters),
                100.0 * model::parameter_share(desc, st), p.inbound, p.shardd);
  }
  {
    std::vector<int64_t> params;
    for (const auto& s : stages) params.push_back(s.parameters);
    for (const auto& a : op::assign_export_principals(job, params)) {
      std::fprintf(info_file, "  export principal %s may export shards %s (exposure %.4f)\n", a.principal.c_str(),
                  op::shards_text(a.shards).c_str(), op::exposure_of(params, a.shards));
    }
  }
  std::fflush(info_file);
  info << "  workdir " << workdir << "  (pod files in shard-<i>/, logs in " << log_dir << ")\n" << std::flush;

  // Sidecars first and ready (certificates and policy loaded), then shardd.
  try {
    for (auto& s : shards) start(s.sidecar, false);
  } catch (const std::exception& e) {
    std::cerr << who << ": " << e.what() << "\n";
    stop_all(shards);
    return 2;
  }
  if (const std::string why = wait_for_sidecars(shards, std::chrono::seconds(30)); !why.empty()) {
    std::cerr << who << ": " << why << "\n";
    stop_all(shards);
    std::cerr << who << ": every started process was stopped\n";
    return 2;
  }
  // Prometheus before shardd, so that it sees every shardd from its first steps.
  std::unique_ptr<LocalPrometheus> prometheus;
  if (options.prometheus) {
    std::string why;
    try {
      prometheus = std::make_unique<LocalPrometheus>(prometheus_path, workdir + "/prometheus", prometheus_port,
                                                     scrape_targets(job, objects, shards), kScrapeInterval);
      why = prometheus->wait_ready(std::chrono::seconds(30));
      // The sidecars are up already: once Prometheus scrapes them, it scrapes.
      if (why.empty()) why = prometheus->wait_targets_up(static_cast<size_t>(processes), std::chrono::seconds(30));
    } catch (const std::exception& e) {
      why = e.what();
    }
    if (!why.empty()) {
      std::cerr << who << ": --prometheus: " << why << "\n";
      if (prometheus) prometheus->stop();
      stop_all(shards);
      std::cerr << who << ": every started process was stopped\n";
      return 2;
    }
    std::cout << "  prometheus " << prometheus->url() << "  (scraping " << 2 * processes << " targets every "
              << kScrapeInterval.count() << " ms; config, data and log in " << workdir << "/prometheus)\n"
              << std::flush;
  }
  try {
    for (auto& s : shards) start(s.shardd, &s == &shards[n - 1]);
  } catch (const std::exception& e) {
    std::cerr << who << ": " << e.what() << "\n";
    stop_all(shards);
    return 2;
  }

  RunState state;
  state.progress.epochs = job.training.epochs;
  if (job.model.language_model()) state.progress.bits_unit = job.model.vocab == 256 ? "bits/byte" : "bits/token";
  RateMeter rate(job.training.batch_size);
  auto last_print = Clock::now() - std::chrono::hours(1);
  int64_t last_printed_step = -1;
  std::string failure;
  bool interrupted = false;

  for (;;) {
    // 1. Ctrl-C / SIGTERM: stop every child, keep the checkpoints.
    timespec zero{0, 0};
    const int sig = sigtimedwait(&signals, nullptr, &zero);
    if (sig == SIGINT || sig == SIGTERM) {
      interrupted = true;
      break;
    }
    // 2. Progress from the last stage's log lines.
    Shard& tail = shards[n - 1];  // replica 0's last stage
    if (tail.shardd.process && !tail.shardd.process->eof()) {
      if (auto line = tail.shardd.process->read_line(std::chrono::milliseconds(200))) {
        absorb(*line, state, rate, std::chrono::duration<double>(Clock::now() - started).count());
      }
    } else {
      // Nothing to read: wait for a child to change state instead of spinning, or,
      // when every shardd is backing off, for a stop signal until the next restart.
      bool waited = false;
      for (auto& s : shards) {
        if (s.shardd.process && !s.done && !s.restart_at) {
          s.shardd.process->wait_for(std::chrono::milliseconds(200));
          waited = true;
          break;
        }
      }
      if (!waited) {
        timespec pause{0, 200 * 1000 * 1000};
        const int got = sigtimedwait(&signals, nullptr, &pause);
        if (got == SIGINT || got == SIGTERM) {
          interrupted = true;
          break;
        }
      }
    }
    const auto now = Clock::now();
    const bool step_moved = state.progress.step > 0 && state.progress.step != last_printed_step;
    if (options.progress_tty ? (step_moved && now - last_print > std::chrono::milliseconds(200))
                             : (step_moved && now - last_print > std::chrono::seconds(10))) {
      const std::string line = format_progress(state.progress, options.progress_tty);
      if (options.progress_tty) {
        std::cout << "\r" << line << "\033[K" << std::flush;
      } else {
        std::cout << line << "\n" << std::flush;
      }
      last_print = now;
      last_printed_step = state.progress.step;
    }
    // 3. A sidecar that ended takes its shard's only way in and out with it.
    for (auto& s : shards) {
      if (auto st = s.sidecar.process->wait_for(std::chrono::milliseconds(0))) {
        failure = "the sidecar of " + shard_name(s) + " exited (" + st->str() + "); its log " +
                  s.sidecar.log_file + " ends with:\n" + tail_of_file(s.sidecar.log_file, 8);
        break;
      }
    }
    if (!failure.empty()) break;
    // 4. shardd processes that ended, and those whose backoff is over.
    bool all_done = true;
    for (auto& s : shards) {
      if (s.done) continue;
      if (s.restart_at) {
        all_done = false;
        if (Clock::now() < *s.restart_at) continue;
        s.restart_at.reset();
        try {
          start(s.shardd, &s == &shards[n - 1]);
        } catch (const std::exception& e) {
          failure = "restarting " + shard_name(s) + ": " + e.what();
          break;
        }
        continue;
      }
      auto st = s.shardd.process->wait_for(std::chrono::milliseconds(0));
      if (!st) {
        all_done = false;
        continue;
      }
      if (&s == &shards[n - 1]) {
        while (auto line = s.shardd.process->read_line(std::chrono::milliseconds(0))) {
          absorb(*line, state, rate, std::chrono::duration<double>(Clock::now() - started).count());
        }
      }
      if (st->exited && st->code == 0) {
        s.done = true;
        continue;
      }
      all_done = false;
      // A generation is not resumed: a stage that stops fails it.
      const RestartDecision d = decide_restart(*st, s.restarts, generating ? 0 : job.run_policy.backoff_limit);
      if (!d.restart) {
        failure = shard_name(s) + " failed (" + st->str() + ") " + d.why_not + ".";
        const std::string log_text = log_since(s.shardd.log_file, s.log_start);
        if (const std::string cause = last_error_line(log_text); !cause.empty()) {
          failure += "\nIts last error: " + cause;
        }
        failure += "\nIts log " + s.shardd.log_file + " ends with:\n" + tail_of_file(s.shardd.log_file, 8);
        break;
      }
      ++s.restarts;
      s.restart_at = Clock::now() + d.delay;
      if (options.progress_tty) std::cout << "\n";
      std::cout << shard_name(s) << " stopped (" << st->str() << "); restarting "
                << (replicas > 1 ? "every shardd of the job" : "it") << " from its checkpoint in "
                << format_duration(std::chrono::duration<double>(d.delay).count()) << " (" << s.restarts << "/"
                << job.run_policy.backoff_limit << ")\n" << std::flush;
      if (replicas > 1) {
        // Replicas: the replicas of a stage must stay at the same step, and a pipeline
        // that resynchronises on its own would roll its stages back while their replica
        // peers move on. So all of them stop and start again together, meet in new
        // replica groups and resume from the newest common checkpoint (only the shard
        // that failed counts a restart; docs/shardctl.md).
        for (auto& o : shards) {
          if (&o != &s && !o.done && !o.restart_at && o.shardd.process) o.shardd.process->signal(SIGTERM);
        }
        for (auto& o : shards) {
          if (&o == &s || o.done || o.restart_at) continue;
          if (o.shardd.process) o.shardd.process->terminate(std::chrono::seconds(15));
          o.restart_at = s.restart_at;
        }
      }
    }
    if (!failure.empty()) break;
    if (all_done) break;
  }
  if (options.progress_tty) std::cout << "\n";
  // shardd first; the sidecars' counters are read once nothing moves any more, then
  // the sidecars are stopped too.
  stop(shards, &Shard::shardd);
  std::vector<std::string> pages(processes);  // every sidecar's, by slot
  for (int k = 0; k < processes; ++k) {
    if (shards[k].sidecar.process && shards[k].sidecar.process->running()) {
      pages[k] = get_page(shards[k].ports.sidecar_metrics, "/metrics");
    }
  }
  stop(shards, &Shard::sidecar);
  const double wall = std::chrono::duration<double>(Clock::now() - started).count();

  double denied = 0;
  for (const auto& page : pages) denied += prometheus_sum(page, "shardguard_authz_decisions_total", {{"decision", "deny"}});
  auto print_denials = [&](std::ostream& out) {
    for (int i = 0; i < n; ++i) {
      for (const auto& [rule, count] : denials_by_rule(pages[i])) {
        out << "  shard " << i << " sidecar denied " << count << " call(s) by rule " << rule << " (audit log "
            << shards[i].audit_log << ")\n";
      }
    }
  };

  auto print_traffic = [&](FILE* out) {
    // Every byte a shardd sent or received crossed its sidecar: the sidecar's relayed
    // bytes (shardguard_proxy_bytes_total) against shardd's own count
    // (shardguard_pipeline_message_bytes_total, as its last log line reports it).
    std::fprintf(out, "%s%s\n", "  traffic         bytes relayed by each sidecar vs sent/received by its shardd",
                   replicas > 1 ? " (replica 0)" : "");
    for (int i = 0; i < n; ++i) {
      const ShardTraffic t = shardd_traffic(shards[i].shardd.log_file, shards[i].log_start);
      // The pipeline's calls only: a replica's sidecar also carries its group's tunnels
      // (in shardguard_proxy_bytes_total too, and on their own in the tunnel family).
      const auto relayed = [&](const char* direction) {
        return prometheus_sum(pages[i], "shardguard_proxy_bytes_total", {{"direction", direction}}) -
               prometheus_sum(pages[i], "shardguard_tunnel_bytes_total", {{"direction", direction}});
      };
      const double sent = relayed("sent");
      const double received = relayed("received");
      const bool match = !pages[i].empty() && t.reports > 0 && sent == t.sent && received == t.received;
      std::fprintf(out, "  shard %d traffic sidecar sent %.0f received %.0f; shardd sent %.0f received %.0f  %s\n", i, sent,
                  received, t.sent, t.received,
                  pages[i].empty() ? "(sidecar metrics unreadable)"
                  : match          ? "(equal: all through the sidecar)"
                  : shards[i].restarts > 0 ? "(differ: a killed shardd reports no count)"
                                           : "(DIFFER)");
    }
  };
  // Replicas: each stage's Gloo traffic went through its sidecars' tunnels. What one
  // sidecar took in from its Gloo for a peer is what the peer's sidecar handed to the
  // peer's Gloo, both ways, and it carries at least the gradients shardd all-reduced.
  auto print_tunnels = [&](FILE* out) {
    if (replicas < 2) return;
    std::fprintf(out, "  replica groups  Gloo bytes through each sidecar's tunnels vs the gradients its shardd all-reduced\n");
    // bytes[k][q] = {sent, received}: slot k's sidecar's Gloo bytes for replica q of its
    // stage, each page parsed once per figure.
    std::vector<std::vector<std::pair<double, double>>> bytes(processes);
    for (int k = 0; k < processes; ++k) {
      for (int q = 0; q < replicas; ++q) {
        const auto sum = [&](const char* direction) {
          return prometheus_sum(pages[k], "shardguard_tunnel_bytes_total",
                                {{"direction", direction}, {"peer", op::spiffe_id_of(run_job, k % n, q)},
                                 {"method", policy::kTunnelGlooMethod}});
        };
        bytes[k].emplace_back(q == k / n ? 0.0 : sum("sent"), q == k / n ? 0.0 : sum("received"));
      }
    }
    for (int k = 0; k < processes; ++k) {
      const int i = k % n, r = k / n;
      double sent = 0, received = 0;
      bool paired = !pages[k].empty();
      for (int q = 0; q < replicas; ++q) {
        if (q == r) continue;
        const int peer = q * n + i;
        const auto [out_bytes, in_bytes] = bytes[k][q];
        sent += out_bytes;
        received += in_bytes;
        paired = paired && !pages[peer].empty() && out_bytes == bytes[peer][r].second &&
                 in_bytes == bytes[peer][r].first;
      }
      const double payload = json_field_sum(shards[k].shardd.log_file, shards[k].log_start, "stage finished",
                                            "allreduce_bytes");
      std::fprintf(out, "  %s tunnels: Gloo sent %.0f received %.0f, all-reduced %.0f  %s\n",
                   op::slot_label(run_job, k).c_str(), sent, received, payload,
                   pages[k].empty()                          ? "(sidecar metrics unreadable)"
                   : !paired                                 ? (shards[k].restarts > 0 ? "(differ: restarted)" : "(DIFFER from the peers' sidecars)")
                   : payload > 0 && sent < payload           ? "(LESS than the gradients: not all through the sidecar)"
                                                             : "(equal at both ends of every tunnel)");
    }
  };
  if (interrupted && generating) {
    std::cerr << who << ": stopped by signal; every shard process and sidecar was stopped\n";
    return 130;
  }
  if (interrupted) {
    std::cout << "shardctl run: stopped by signal; every shard process and sidecar was stopped. Checkpoints are kept in "
              << ckpt_dir << "; continue with `shardctl run " << options.job_file << " --resume"
              << (options.workdir.empty() ? "" : " --workdir " + options.workdir) << "`\n";
    return 130;
  }
  if (!failure.empty()) {
    std::cerr << who << ": the run failed: " << failure << "\n";
    print_denials(std::cerr);
    std::cerr << who << ": every shard process and sidecar was stopped\n";
    return 1;
  }
  if (generating) {
    print_traffic(stderr);
    return report_generation(*options.generate, generate_dir + "/generated.tokens",
                             log_since(shards[0].shardd.log_file, shards[0].log_start), n, wall, denied);
  }
  std::cout << "\nshardctl run: done in " << format_duration(wall) << "\n";
  if (job.model.language_model() && state.eval_loss) {
    const char* unit = state.progress.bits_unit.c_str();
    std::printf("  validation loss %.4f nats/token, perplexity %.2f, %.3f %s over %lld tokens\n", *state.eval_loss,
                std::exp(*state.eval_loss), state.eval_bits.value_or(*state.eval_loss / std::log(2.0)), unit,
                static_cast<long long>(state.test_total));
    if (unigram_bits) {
      std::printf("  unigram baseline %.3f %s (token frequencies of train.tokens, on validation.tokens)\n",
                  *unigram_bits, unit);
    }
  } else if (state.test_accuracy) {
    std::printf("  test accuracy   %.4f (%lld/%lld)\n", *state.test_accuracy, static_cast<long long>(state.test_correct),
                static_cast<long long>(state.test_total));
  }
  if (state.progress.step > 0) {  // a resumed run that was already complete trains no step
    std::printf("  final loss      %.4f after %lld steps\n", state.progress.loss,
                static_cast<long long>(state.progress.step));
  }
  for (const auto& st : stages) {
    int restarts = 0;  // over the stage's replicas
    for (const auto& s : shards) restarts += s.index == st.index ? s.restarts : 0;
    std::printf("  shard %d         %lld parameters (%.1f%% of the model), restarts %d\n", st.index,
                static_cast<long long>(st.parameters), 100.0 * model::parameter_share(desc, st), restarts);
  }
  // Exposure, computed as the operator computes status.exposure: each shard's
  // principal (its SPIFFE ID) holds its own stage only; locally every shard pod is
  // its own node (local-shard-<i>), so the placement history is {node i: {i}}.
  {
    std::vector<int64_t> params;
    for (const auto& s : stages) params.push_back(s.parameters);
    op::PlacementHistory history;
    for (int i = 0; i < n; ++i) history["local-shard-" + std::to_string(i)] = {i};
    // render() accepted the job, so its export principals are assigned.
    const op::ExposureReport report =
        op::compute_exposure(params, history, op::assign_export_principals(job, params), job.protection.trusted_stages);
    std::printf("  exposure        per principal and per node (each shard is its own node here); maxExposure %.4f\n",
                job.protection.max_exposure);
    for (int i = 0; i < n; ++i) {
      const std::string node = "local-shard-" + std::to_string(i);
      double node_ratio = 0;
      for (const auto& ne : report.nodes) {
        if (ne.node == node) node_ratio = ne.ratio;
      }
      const bool trusted = job.protection.trusted_stages.count(i) > 0;
      // With replicas, each replica's identity holds stage i, and nothing more.
      std::string principals = op::spiffe_id_of(run_job, i, 0);
      for (int r = 1; r < replicas; ++r) principals += ", " + op::spiffe_id_of(run_job, i, r);
      std::printf("  exposure shard %d principal%s %s %.4f node %s %.4f%s\n", i, replicas > 1 ? "s" : "",
                  principals.c_str(), op::exposure_of(params, {i}), node.c_str(), node_ratio,
                  trusted ? "  (trusted stage: not in the maximum)" : "");
    }
    for (const auto& e : report.exporters) {
      std::printf("  exposure export principal %s %.4f (shards %s)\n", e.principal.c_str(), e.ratio,
                  op::shards_text(e.shards).c_str());
    }
    std::printf("  exposure max    principal %.4f, node %.4f  (%s maxExposure %.4f)\n", report.max_principal,
                report.max_node,
                std::max(report.max_principal, report.max_node) <= job.protection.max_exposure + 1e-9 ? "within"
                                                                                                       : "ABOVE",
                job.protection.max_exposure);
  }
  print_traffic(stdout);
  print_tunnels(stdout);
  std::printf("  policy denials  %.0f\n", denied);
  print_denials(std::cout);
  std::cout << "  checkpoints     " << ckpt_dir << " (each shard encrypted under its own key in " << key_dir << ")\n";
  std::cout << "  job PKI         " << workdir << "/pki (CA), " << workdir << "/shard-<i>/ (each pod's files)\n";
  std::vector<std::string> audits;
  for (const auto& s : shards) {
    if (fs::exists(s.audit_log) && fs::file_size(s.audit_log) > 0) audits.push_back(s.audit_log);
  }
  std::cout << "  audit logs      "
            << (audits.empty() ? "none written (nothing was refused, exported or reloaded)"
                               : log_dir + "/sidecar-state-<i>/" + op::kAuditFileName) << "\n";
  std::cout << "  logs            " << log_dir << "\n";
  if (prometheus) {
    const bool ok = report_from_prometheus(*prometheus, job, processes, wall);
    prometheus->stop();
    std::cout << "  prometheus      stopped; to look again: prometheus --config.file=" << workdir
              << "/prometheus/prometheus.yml --storage.tsdb.path=" << workdir << "/prometheus/data\n";
    if (!ok) return 1;
  }
  return 0;
}

}  // namespace shardguard::shardctl
