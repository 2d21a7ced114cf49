// operator_bench: N ShardedTrainingJobs × 4 shards against the test Kubernetes API
// server (tests/apiserver, in this process, real HTTPS), reconciled by a real
// shardguard-operator process (issue 4, Benchmark).
//
// Figures (build/bench/results.jsonl, DESIGN.md §8):
//   converge_seconds   from the first job created until every job's 14 objects exist
//                      and its status is written.           target <= 60 s
//                      baseline: the same objects and status written by a plain
//                      client with as many threads as the operator has workers, no
//                      operator logic (API throughput in this run), scaled to N jobs.
//   peak_rss           the operator's VmHWM at the end.      target <= 100 MB
//                      baseline: its VmRSS once its caches synced with no job.
//   writes_per_job     creates/updates/patches/deletes by the operator, Events apart.
//                      target <= 15; baseline 15 (14 objects + 1 status).
//   settled_writes     writes per minute once everything is settled, while every job
//                      is resynced (--resync); target 0.
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>
#include "shardguard/common/httplib.h"

#include "apiserver/kube_apiserver.h"
#include "bench_util.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/process.h"
#include "shardguard/kube/client.h"
#include "shardguard/kube/config.h"
#include "shardguard/operator/render.h"
#include "shardguard/common/prom_text.h"

namespace {

using namespace shardguard;
using namespace shardguard::bench;
using nlohmann::json;
using namespace std::chrono_literals;

struct Options {
  int jobs = 1000;
  int workers = 2;
  int baseline_jobs = 100;
  double settle_seconds = 60;
  int resync_seconds = 20;
  std::filesystem::path out = default_results_file();
};

constexpr const char* kNs = "bench";
constexpr double kTargetConvergeS = 60, kTargetRssMB = 100, kTargetWritesPerJob = 15;

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

double mb(int64_t bytes) { return static_cast<double>(bytes) / 1e6; }

json job_object(const std::string& name) {
  return yaml_to_json("apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\n"
                      "metadata: {name: " + name + ", namespace: bench}\n"
                      "spec:\n"
                      "  model: {architecture: vit}\n"
                      "  sharding: {shards: 4}\n"
                      "  protection: {maxExposure: 0.5}\n"
                      "  template: {image: shardd:bench}\n"
                      "  sidecar: {image: sidecar:bench}\n");
}

bool is_write(const std::string& verb) {
  return verb == "create" || verb == "update" || verb == "patch" || verb == "delete";
}

// The API throughput baseline: a plain client writes what the operator writes for a
// job (its rendered 14 objects, then the job's status), `threads` jobs at a time.
double baseline_seconds_per_job(testing::KubeApiServer& api, const kube::Config& cfg, int jobs, int threads) {
  const std::string ns = "baseline";
  api.create("", "v1", "namespaces", "", {{"metadata", {{"name", ns}}}});
  kube::Client client(cfg, "baseline-writer");
  std::vector<std::pair<json, op::DesiredObjects>> work;
  for (int j = 0; j < jobs; ++j) {
    json obj = job_object("base-" + std::to_string(j));
    obj["metadata"]["namespace"] = ns;
    obj = api.create("shardguard.io", "v1alpha1", "shardedtrainingjobs", ns, obj);
    const JobSpec spec = job_from_json(obj);
    op::RenderInputs in;
    in.uid = obj["metadata"]["uid"];
    in.ca_cert_pem = "-----BEGIN CERTIFICATE-----\nbaseline\n-----END CERTIFICATE-----\n";
    in.ca_key_pem = "-----BEGIN PRIVATE KEY-----\nbaseline\n-----END PRIVATE KEY-----\n";
    for (int i = 0; i < spec.sharding.shards; ++i) in.shards.push_back({in.ca_cert_pem, in.ca_key_pem, std::string(32, 'k'), std::string(32, 'l')});
    in.job_object = obj;
    work.emplace_back(obj, op::render(spec, in));
  }
  const auto t0 = Clock::now();
  std::atomic<int> next{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int j = next++; j < jobs; j = next++) {
        for (const auto& o : work[j].second.all()) {
          const std::string kind = o["kind"];
          client.create(kind == "Secret"      ? kube::kSecrets
                        : kind == "ConfigMap" ? kube::kConfigMaps
                        : kind == "Service"   ? kube::kServices
                                              : kube::kPods,
                        ns, o);
        }
        json st = work[j].first;
        st["status"] = {{"phase", "Pending"}};
        client.update_status(kube::kShardedTrainingJobs, ns, st);
      }
    });
  }
  for (auto& t : pool) t.join();
  return seconds_since(t0) / jobs;
}

double metric_sum(int port, const std::string& name) {
  httplib::Client cli("127.0.0.1", port);
  auto res = cli.Get("/metrics");
  if (!res || res->status != 200) return -1;
  return prometheus_sum(res->body, name);
}

int Run(const Options& opt) {
  install_signal_handlers();
  const auto bench_start = Clock::now();
  TempDir dir("shardguard-operator-bench");
  testing::KubeApiServer::Options ao;
  ao.history_limit = 1000000;  // no 410s from sheer volume: the benchmark measures steady work
  ao.threads = 64;
  testing::KubeApiServer api(ao);
  const std::string kubeconfig = api.write_kubeconfig((dir.path() / "kubeconfig").string(), kNs);
  api.create("apiextensions.k8s.io", "v1", "customresourcedefinitions", "",
             yaml_to_json(read_file(std::string(SHARDGUARD_SOURCE_DIR) + "/crds/shardedtrainingjobs.shardguard.io.yaml")));
  api.create("", "v1", "namespaces", "", {{"metadata", {{"name", kNs}}}});

  std::cout << "baseline: a plain client writes " << opt.baseline_jobs << " jobs' objects and status ("
            << opt.workers << " threads) ..." << std::endl;
  const double base_per_job = baseline_seconds_per_job(api, kube::kubeconfig_config(kubeconfig), opt.baseline_jobs,
                                                       opt.workers);
  const double base_converge = base_per_job * opt.jobs;
  check_interrupted();

  const std::string log = (dir.path() / "operator.log").string();
  SpawnOptions so;
  so.argv = {std::string(SHARDGUARD_BIN_DIR) + "/shardguard-operator", "--kubeconfig", kubeconfig, "--namespace", kNs,
             "--workers", std::to_string(opt.workers), "--resync", std::to_string(opt.resync_seconds),
             "--metrics-bind-address", "127.0.0.1:0", "--health-probe-bind-address", "127.0.0.1:0"};
  so.log_file = log;
  Process op(so);
  int metrics_port = 0;
  for (const auto start = Clock::now(); metrics_port == 0 && seconds_since(start) < 30;) {
    for (const auto& j : json_lines(log)) {
      if (j.value("msg", "") == "starting") metrics_port = j.value("metrics_port", 0);
    }
    if (!op.running()) throw BenchError("shardguard-operator exited:\n" + indented_tail(log, 20));
    std::this_thread::sleep_for(50ms);
  }
  bool synced = false;
  for (const auto start = Clock::now(); !synced && seconds_since(start) < 30;) {
    for (const auto& j : json_lines(log)) synced = synced || j.value("msg", "") == "caches synced";
    std::this_thread::sleep_for(50ms);
  }
  if (metrics_port == 0 || !synced) throw BenchError("shardguard-operator did not start:\n" + indented_tail(log, 20));
  const int64_t idle_rss = proc_status_bytes(op.pid(), "VmRSS");

  std::cout << "creating " << opt.jobs << " jobs × 4 shards ..." << std::endl;
  api.clear_requests();
  const auto t0 = Clock::now();
  for (int j = 0; j < opt.jobs; ++j) api.create("shardguard.io", "v1alpha1", "shardedtrainingjobs", kNs, job_object("job-" + std::to_string(j)));
  double converge = -1;
  size_t last_done = 0;
  auto last_print = Clock::now();
  while (seconds_since(t0) < 600) {
    check_interrupted();
    size_t with_status = 0;
    for (const auto& j : api.list("shardguard.io", "v1alpha1", "shardedtrainingjobs", kNs)) {
      with_status += j.contains("status") && j["status"].contains("phase") ? 1 : 0;
    }
    const size_t objects = api.list("", "v1", "pods", kNs).size() + api.list("", "v1", "secrets", kNs).size() +
                           api.list("", "v1", "configmaps", kNs).size() + api.list("", "v1", "services", kNs).size();
    if (with_status == static_cast<size_t>(opt.jobs) && objects == static_cast<size_t>(14 * opt.jobs)) {
      converge = seconds_since(t0);
      break;
    }
    if (seconds_since(last_print) > 5 || with_status != last_done) {
      if (seconds_since(last_print) > 5) {
        std::cout << "  " << fixed(seconds_since(t0), 0) << " s: " << with_status << " of " << opt.jobs
                  << " jobs with status, " << objects << " of " << 14 * opt.jobs << " objects" << std::endl;
        last_print = Clock::now();
      }
      last_done = with_status;
    }
    if (!op.running()) throw BenchError("shardguard-operator exited:\n" + indented_tail(log, 20));
    // Listing every object costs this process (which also serves the API) CPU: not too often.
    std::this_thread::sleep_for(250ms);
  }
  if (converge < 0) throw BenchError("the jobs did not converge within 600 s:\n" + indented_tail(log, 20));
  std::cout << "converged in " << fixed(converge, 1) << " s\n";

  uint64_t writes = 0, event_writes = 0;
  for (const auto& r : api.requests()) {
    if (r.user_agent.find("shardguard-operator") == std::string::npos || !is_write(r.verb)) continue;
    (r.resource == "events" ? event_writes : writes) += 1;
  }
  // Anything still in flight (Events after status, requeues) lands before the quiet window.
  std::this_thread::sleep_for(2s);
  api.clear_requests();
  const double reconciles_before = metric_sum(metrics_port, "controller_runtime_reconcile_total");
  std::cout << "settled: watching writes for " << fixed(opt.settle_seconds, 0) << " s (resync every "
            << opt.resync_seconds << " s) ...\n";
  const auto q0 = Clock::now();
  while (seconds_since(q0) < opt.settle_seconds) {
    check_interrupted();
    std::this_thread::sleep_for(200ms);
  }
  uint64_t settled_writes = 0;
  for (const auto& r : api.requests()) {
    if (r.user_agent.find("shardguard-operator") != std::string::npos && is_write(r.verb)) ++settled_writes;
  }
  const double resync_reconciles = metric_sum(metrics_port, "controller_runtime_reconcile_total") - reconciles_before;
  const double settled_per_min = settled_writes * 60.0 / opt.settle_seconds;
  const int64_t peak = proc_status_bytes(op.pid(), "VmHWM");
  const int64_t settled_rss = proc_status_bytes(op.pid(), "VmRSS");
  const ExitStatus exit = op.terminate(10s);

  const double per_job = static_cast<double>(writes) / opt.jobs;
  std::vector<json> rows;
  std::vector<std::vector<std::string>> table;
  auto add = [&](json j, const std::string& what, const std::string& target, bool met, int decimals) {
    j["target"] = target;
    j["met"] = met;
    table.push_back({what, fixed(j["value"].get<double>(), decimals), j["unit"], fixed(j["baseline"].get<double>(), decimals),
                     j["ratio"].is_null() ? "-" : fixed(j["ratio"].get<double>(), 2), target, met ? "met" : "MISSED"});
    rows.push_back(std::move(j));
  };
  const std::string b = "operator." + std::to_string(opt.jobs) + "x4";
  add(figure(b, "converge_seconds", converge, "s", base_converge), "converge (objects + status)", "<= 60 s",
      converge <= kTargetConvergeS, 1);
  add(figure(b, "peak_rss", mb(peak), "MB", mb(idle_rss)), "operator VmHWM", "<= 100 MB", mb(peak) <= kTargetRssMB, 1);
  add(figure(b, "writes_per_job", per_job, "writes", 15), "writes per job (Events apart)", "<= 15",
      per_job <= kTargetWritesPerJob, 2);
  add(figure(b, "event_writes_per_job", static_cast<double>(event_writes) / opt.jobs, "writes", 0), "Events per job",
      "-", true, 2);
  add(figure(b, "settled_writes_per_minute", settled_per_min, "writes/min", 0), "writes/min when settled", "0",
      settled_writes == 0, 1);
  write_results(rows, opt.out, WriteMode::kAppend);

  std::cout << "\n";
  print_table({"figure", "value", "unit", "baseline", "ratio", "target", ""}, table, [](size_t i) { return i == 0 || i == 6; });
  std::cout << "\nbaselines: converge = a plain client (" << opt.workers << " threads) writing the same objects and "
            << "status, " << fixed(base_per_job * 1000, 2) << " ms per job, times " << opt.jobs
            << "; RSS = the operator with synced caches and no job (" << fixed(mb(idle_rss), 1)
            << " MB); writes = 14 objects + 1 status.\n"
            << "settled window: " << fixed(resync_reconciles, 0) << " reconciles (resyncs) and " << settled_writes
            << " writes in " << fixed(opt.settle_seconds, 0) << " s; operator VmRSS then " << fixed(mb(settled_rss), 1)
            << " MB. Operator exit: " << exit.str() << ".\n"
            << rows.size() << " figures appended to " << opt.out.string() << " ("
            << fixed(seconds_since(bench_start), 0) << " s in all)\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"operator_bench: N jobs × 4 shards reconciled by shardguard-operator against the test API server"};
  Options opt;
  app.add_option("--jobs", opt.jobs, "jobs to create")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--workers", opt.workers, "operator workers (and baseline threads)")->capture_default_str()->check(CLI::Range(1, 64));
  app.add_option("--baseline-jobs", opt.baseline_jobs, "jobs the baseline client writes")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--settle-seconds", opt.settle_seconds, "quiet window for the settled writes")->capture_default_str();
  app.add_option("--resync", opt.resync_seconds, "operator --resync in seconds")->capture_default_str();
  app.add_option("--out", opt.out, "results file (appended)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return Run(opt);
  } catch (const std::exception& e) {
    std::cerr << "operator_bench: " << e.what() << "\n";
    return 1;
  }
}
