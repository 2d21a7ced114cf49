// pipeline_bench: what splitting a model into pipeline stages costs on one
// machine. For each example model (cnn, vit) it measures, in one run and with the
// same total number of cores:
//   monolithic  the whole model in one process (this binary in --monolithic mode,
//               a child process so that its peak RSS is measured like a stage's);
//   2-stage     two shardd processes talking gRPC on 127.0.0.1;
//   4-stage     four of them.
// and, for the cnn, the protection overhead (issue 5): the same 2-shard job run
// with `shardctl run` (every shardd behind its own mTLS shard-sidecar, as in the
// cluster) against the direct 2-stage shardd pipeline above (no sidecars), same
// job file, same steps, one after the other in this run:
//   sidecar_overhead    samples/s through the sidecars, baseline = the direct
//                       pipeline; the ratio's target is >= 0.95
// Figures (DESIGN.md §8) go to build/bench/results.jsonl, one JSON object per line:
//   samples_per_second  per configuration, baseline = monolithic
//   peak_rss            per stage (MiB), baseline = the monolithic process, with the
//                       stage's parameter share
//   transport_share     per stage, time its sender threads spent delivering frames
//                       (gRPC round trips; overlaps compute) / train_seconds,
//                       baseline = the 5% target
//   serialise_share     per stage, time spent encoding and decoding tensor frames /
//                       train_seconds, baseline = the 5% target
// and, for the cnn, its pooling against LibTorch's max_pool2d (in this process):
//   images_per_second   per pooled shape and pass, baseline = max_pool2d
// Every child gets OMP_WAIT_POLICY=PASSIVE: spinning OpenMP workers otherwise
// steal the cores the other processes (or OpenBLAS) need.
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/process.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/model.h"
#include "shardguard/shardd/threads.h"
#include "shardguard/shardd/trainer.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace shardguard;
using namespace shardguard::bench;

constexpr double kTransportTarget = 0.05;  // transport should stay under 5% of a stage's time
constexpr int kLogTailLines = 25;

std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw BenchError("cannot read /proc/self/exe");
  return std::string(buf, static_cast<size_t>(n));
}

double cpu_seconds(const struct rusage& ru) {
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return sec(ru.ru_utime) + sec(ru.ru_stime);
}

// Cores that processes other than the benchmark's children kept busy during a run:
// (machine busy time - the children's CPU time) / wall time. The monolithic
// baseline runs one OpenMP/OpenBLAS pool over every core, and its spinning threads
// slow down many times over when anything else competes for those cores.
void warn_if_contended(double busy_before, double children_cpu, double wall_s, int cores) {
  if (wall_s <= 0) return;
  const double other = (machine_busy_seconds() - busy_before - children_cpu) / wall_s;
  if (other > 0.25) {
    std::cout << "      warning: other processes kept " << fixed(other, 1) << " of " << cores
              << " cores busy during this run; its figures are not reliable (rerun on an idle machine)\n"
              << std::flush;
  }
}

// ---- a group of child processes: every one is stopped and reaped ---------------
struct Child {
  std::string name;  // "stage 2", "monolithic"
  fs::path log_file;  // its stdout and stderr
  std::unique_ptr<Process> process;
  std::optional<ExitStatus> status;
};

class ChildGroup {
 public:
  ~ChildGroup() { stop_all(); }

  Child& spawn(const std::string& name, std::vector<std::string> argv, std::map<std::string, std::string> env,
               const fs::path& log_file) {
    SpawnOptions o;
    o.argv = std::move(argv);
    o.env = std::move(env);
    o.log_file = log_file.string();
    Child c;
    c.name = name;
    c.log_file = log_file;
    c.process = std::make_unique<Process>(o);
    children_.push_back(std::move(c));
    return children_.back();
  }

  std::deque<Child>& children() { return children_; }

  // Waits for every child to exit, at most until `deadline`. A child that fails
  // (non-zero exit, signal), the deadline or a signal to this process stops the
  // others and throws with the failing child's last log lines.
  void wait_all(Clock::time_point deadline, double timeout_s) {
    for (;;) {
      bool all_done = true;
      for (auto& c : children_) {
        if (c.status) continue;
        c.status = c.process->wait_for(std::chrono::milliseconds(0));
        if (!c.status) {
          all_done = false;
          continue;
        }
        if (!c.status->exited || c.status->code != 0) {
          const std::string why = c.name + " failed (" + c.status->str() + ")";
          stop_all();
          throw BenchError(why + "; its last log lines:\n" + format_tail(c));
        }
      }
      if (all_done) return;
      if (const int sig = interrupted_signal()) {
        stop_all();
        throw BenchError(std::string("interrupted by ") + strsignal(sig) + "; stopped every child process");
      }
      if (Clock::now() >= deadline) {
        std::string tails;
        for (auto& c : children_) {
          if (!c.status) tails += c.name + " (still running):\n" + format_tail(c);
        }
        stop_all();
        throw BenchError("timed out after " + fixed(timeout_s, 0) + " s; stopped every child process. Last log lines:\n" +
                         tails);
      }
      // Sleep on the first child still running (wakes when it exits).
      for (auto& c : children_) {
        if (!c.status) {
          c.status = c.process->wait_for(std::chrono::milliseconds(200));
          if (c.status && (!c.status->exited || c.status->code != 0)) {
            const std::string why = c.name + " failed (" + c.status->str() + ")";
            stop_all();
            throw BenchError(why + "; its last log lines:\n" + format_tail(c));
          }
          break;
        }
      }
    }
  }

  // SIGTERM to every child still running, SIGKILL to any left after a grace
  // period; every child is reaped.
  void stop_all(std::chrono::milliseconds grace = std::chrono::seconds(10)) {
    for (auto& c : children_) {
      if (!c.status && c.process) c.process->signal(SIGTERM);
    }
    const auto until = Clock::now() + grace;
    for (auto& c : children_) {
      if (c.status || !c.process) continue;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
      c.status = c.process->wait_for(std::max(left, std::chrono::milliseconds(0)));
      if (!c.status) {
        c.process->signal(SIGKILL);
        c.status = c.process->wait();
      }
    }
  }

 private:
  static std::string format_tail(const Child& c) {
    std::string out = indented_tail(c.log_file, kLogTailLines);
    if (out.empty()) out = "    (no output; log " + c.log_file.string() + ")\n";
    return out;
  }

  std::deque<Child> children_;  // a deque: references from spawn() stay valid
};

// ---- the job files ---------------------------------------------------------------
// The example job, made benchmark-friendly: `shards` stages, 8 micro-batches of 16
// (enough to hide most of the pipeline bubble: (n-1)/(M+n-1) = 1/9 of a step for
// two stages), a 1000-sample test set for the final evaluation, and no periodic
// checkpoints. The monolithic baseline uses the same micro-batching.
json bench_job(const json& example, int shards) {
  json j = example;
  j["spec"]["sharding"]["shards"] = shards;
  if (j["spec"]["model"].value("architecture", "") == "gpt") {
    // 32 sequences of 128 tokens: a step moves 4096 tokens, and a gpt stage's
    // activations are 32 × 128 × hidden floats, far more than the image models'.
    j["spec"]["training"]["batchSize"] = 32;
    j["spec"]["training"]["microBatches"] = 4;
    j["spec"]["dataset"]["maxTestSamples"] = 256;
  } else {
    j["spec"]["training"]["batchSize"] = 128;
    j["spec"]["training"]["microBatches"] = 8;
    j["spec"]["dataset"]["maxTestSamples"] = 1000;
  }
  j["spec"]["checkpoint"]["everySteps"] = 1000000;
  return j;
}

fs::path write_job(const json& job, const fs::path& file) {
  job_from_json(job);  // validate here: a bad edit fails before any process starts
  std::ofstream out(file);
  out << job.dump(2) << "\n";  // JSON is valid YAML
  out.close();
  if (!out) throw BenchError("cannot write " + file.string());
  return file;
}

// ---- results --------------------------------------------------------------------
struct Figure {
  std::string model;
  std::string config;  // shown in the table
  json row;            // the results-file object
};

struct Settings {
  int cores = 1;
  double timeout_s = 900;
  fs::path shardd;
  fs::path shardctl;
  fs::path self;
};

struct MonolithicOutcome {
  double samples_per_second = 0;
  double train_seconds = 0;
  int64_t steps = 0;
  double peak_rss_mib = 0;
  double cpu_seconds = 0;
};

struct StageOutcome {
  double train_seconds = 0;
  double transport_seconds = 0;
  double serialise_seconds = 0;
  double compute_seconds = 0;
  int64_t trained_steps = 0;
  int64_t parameters = -1;  // from "stage ready"
  double peak_rss_mib = 0;
  double cpu_seconds = 0;
  double allreduce_seconds = 0;  // replicas: time in the replica group's collectives
  fs::path log;                  // shardctl run: its own output (the report)
};

std::map<std::string, std::string> thread_env(int threads) {
  return {{"OPENBLAS_NUM_THREADS", std::to_string(threads)}, {"OMP_NUM_THREADS", std::to_string(threads)}, {"OMP_WAIT_POLICY", "PASSIVE"}};
}

MonolithicOutcome run_monolithic(const Settings& s, const fs::path& job_file, int64_t steps, const fs::path& dir) {
  ChildGroup group;
  const int threads = s.cores;
  auto& child = group.spawn("monolithic",
                            {s.self.string(), "--monolithic", job_file.string(), "--threads", std::to_string(threads),
                             "--steps", std::to_string(steps)},
                            thread_env(threads), dir / "monolithic.log");
  group.wait_all(Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(s.timeout_s * 1000)), s.timeout_s);
  std::optional<json> result;
  for (auto& j : json_lines(child.log_file)) {
    if (j.value("mode", "") == "monolithic") result = j;
  }
  if (!result) {
    throw BenchError("the monolithic run printed no result line; its last log lines:\n" +
                     indented_tail(child.log_file, kLogTailLines));
  }
  MonolithicOutcome o;
  o.samples_per_second = result->at("samples_per_second").get<double>();
  o.train_seconds = result->at("train_seconds").get<double>();
  o.steps = result->at("steps").get<int64_t>();
  o.peak_rss_mib = static_cast<double>(child.status->usage.ru_maxrss) / 1024.0;
  o.cpu_seconds = cpu_seconds(child.status->usage);
  return o;
}

std::vector<StageOutcome> run_pipeline(const Settings& s, const fs::path& job_file, int stages, int64_t steps,
                                       const fs::path& dir) {
  const int threads = std::max(1, s.cores / stages);
  std::vector<int> ports;
  std::set<int> seen;
  while (static_cast<int>(ports.size()) < stages) {
    const int p = pick_listen_port();
    if (seen.insert(p).second) ports.push_back(p);
  }
  auto addr = [&](int i) { return "127.0.0.1:" + std::to_string(ports[static_cast<size_t>(i)]); };

  ChildGroup group;
  for (int i = 0; i < stages; ++i) {
    const fs::path stage_dir = dir / ("stage" + std::to_string(i));
    fs::create_directories(stage_dir / "checkpoints");
    const fs::path key = stage_dir / "shard.key";
    generate_key_file(key.string());
    std::vector<std::string> argv = {s.shardd.string(),
                                     "--job", job_file.string(),
                                     "--stage", std::to_string(i),
                                     "--listen", addr(i),
                                     "--checkpoint-dir", (stage_dir / "checkpoints").string(),
                                     "--key-file", key.string(),
                                     "--metrics", "off",
                                     "--device", "cpu",
                                     "--threads", std::to_string(threads),
                                     "--max-steps", std::to_string(steps),
                                     "--peer-timeout", "120",
                                     "--retry-budget", "60"};
    if (i > 0) argv.insert(argv.end(), {"--prev", addr(i - 1)});
    if (i + 1 < stages) argv.insert(argv.end(), {"--next", addr(i + 1)});
    group.spawn("stage " + std::to_string(i), std::move(argv), thread_env(threads), stage_dir / "shardd.log");
  }
  group.wait_all(Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(s.timeout_s * 1000)), s.timeout_s);

  std::vector<StageOutcome> out;
  for (auto& c : group.children()) {
    StageOutcome o;
    bool finished = false;
    for (auto& j : json_lines(c.log_file)) {
      const std::string msg = j.value("msg", "");
      if (msg == "stage ready") o.parameters = j.value("parameters", int64_t{-1});
      if (msg == "stage finished") {
        finished = true;
        o.train_seconds = j.value("train_seconds", 0.0);
        o.transport_seconds = j.value("transport_seconds", 0.0);
        o.serialise_seconds = j.value("serialise_seconds", 0.0);
        o.compute_seconds = j.value("compute_seconds", 0.0);
        o.trained_steps = j.value("trained_steps", int64_t{0});
      }
    }
    if (!finished) {
      throw BenchError(c.name + " exited 0 but logged no \"stage finished\"; its last log lines:\n" +
                       indented_tail(c.log_file, kLogTailLines));
    }
    o.peak_rss_mib = static_cast<double>(c.status->usage.ru_maxrss) / 1024.0;
    o.cpu_seconds = cpu_seconds(c.status->usage);
    out.push_back(o);
  }
  return out;
}

// The cnn's pooling (max_pool_2x2, shardd/src/model.cpp) against LibTorch's
// max_pool2d(x, 2), in this process on one thread, at the three shapes the example
// cnn pools (batch 64, c = 32): images per second forward without autograd (an
// evaluation, a victim's answer) and forward + backward (a training step's share),
// the best of 5 repetitions of 20 calls each. Baseline: max_pool2d.
void pooling_comparison(std::vector<Figure>& figures) {
  torch::set_num_threads(1);
  const std::vector<std::vector<int64_t>> shapes = {{64, 32, 28, 28}, {64, 64, 14, 14}, {64, 128, 7, 7}};
  constexpr int kCalls = 20, kRepetitions = 5;
  auto images_per_second = [&](const std::function<torch::Tensor(const torch::Tensor&)>& pool, const torch::Tensor& x,
                               bool backward) {
    double best = 0;
    for (int r = 0; r < kRepetitions; ++r) {
      check_interrupted();
      const auto t0 = Clock::now();
      for (int i = 0; i < kCalls; ++i) {
        if (backward) {
          const auto xi = x.detach().requires_grad_(true);
          pool(xi).sum().backward();
        } else {
          torch::NoGradGuard no_grad;
          pool(x);
        }
      }
      best = std::max(best, static_cast<double>(kCalls * x.size(0)) / seconds_since(t0));
    }
    return best;
  };
  const auto libtorch = [](const torch::Tensor& x) { return torch::max_pool2d(x, 2); };
  const auto ours = [](const torch::Tensor& x) { return shardd::max_pool_2x2(x); };
  std::cout << "pooling: max_pool_2x2 vs LibTorch's max_pool2d, 1 thread\n";
  for (const auto& shape : shapes) {
    const auto x = torch::relu(torch::randn(shape));
    const std::string name = std::to_string(shape[1]) + "x" + std::to_string(shape[2]) + "x" + std::to_string(shape[3]);
    for (const bool backward : {false, true}) {
      const std::string pass = backward ? "forward+backward" : "forward";
      const double base = images_per_second(libtorch, x, backward);
      const double got = images_per_second(ours, x, backward);
      std::cout << "      " << name << " " << pass << ": " << fixed(got, 0) << " images/s against " << fixed(base, 0)
                << " (" << fixed(got / base, 2) << "x)\n"
                << std::flush;
      figures.push_back({"cnn", "pool " + name + " " + pass,
                         figure("pipeline.cnn.pool." + name + "." + pass, "images_per_second", got, "images/s", base)});
    }
  }
}

void print_table(const std::vector<Figure>& figures) {
  const std::vector<std::string> head = {"model", "config", "metric", "value", "unit", "baseline", "ratio", "param share"};
  std::vector<std::vector<std::string>> rows;
  for (const auto& f : figures) {
    const auto& r = f.row;
    const int dec = r["unit"] == "fraction" ? 4 : 1;
    rows.push_back({f.model, f.config, r["metric"].get<std::string>(), fixed(r["value"].get<double>(), dec),
                    r["unit"].get<std::string>(), fixed(r["baseline"].get<double>(), dec),
                    fixed(r["ratio"].get<double>(), 3),
                    r.contains("parameter_share") ? fixed(r["parameter_share"].get<double>(), 3) : ""});
  }
  // text columns left-aligned, numbers right-aligned
  bench::print_table(head, rows, [](size_t i) { return i <= 2 || i == 4; });
}

struct BenchOptions {
  fs::path out;
  fs::path examples;
  std::vector<std::string> models = {"cnn", "vit", "gpt"};
  int64_t cnn_steps = 120;
  int64_t vit_steps = 60;
  int64_t gpt_steps = 30;
  double steps_scale = 1.0;
  int cores = 0;
  double timeout_s = 900;
  int64_t sidecar_steps = 100;  // steps of each run of the sidecar comparison
  bool sidecars_only = false;  // run only the sidecar comparison
  int64_t replica_steps = 60;  // steps of each run of the replica comparison
  bool replicas_only = false;  // run only the replica comparison
  bool pooling_only = false;   // run only the pooling comparison
};

// The shard-0 "stage finished" figures of a run of `shardctl run`, from the shardd
// log it writes in <workdir>/logs/ (the same line run_pipeline reads).
StageOutcome run_shardctl(const Settings& s, const fs::path& job_file, int processes, const fs::path& dir) {
  const int threads = std::max(1, s.cores / processes);
  const fs::path work = dir / "work";
  fs::create_directories(dir);
  ChildGroup group;
  auto& child = group.spawn("shardctl run",
                            {s.shardctl.string(), "run", job_file.string(), "--workdir", work.string(), "--device",
                             "cpu", "--threads", std::to_string(threads)},
                            thread_env(threads), dir / "shardctl.log");
  group.wait_all(Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(s.timeout_s * 1000)), s.timeout_s);
  const fs::path log = work / "logs" / "shard-0.log";
  StageOutcome o;
  bool finished = false;
  for (auto& j : json_lines(log)) {
    if (j.value("msg", "") != "stage finished") continue;
    finished = true;
    o.train_seconds = j.value("train_seconds", 0.0);
    o.trained_steps = j.value("trained_steps", int64_t{0});
    o.allreduce_seconds = j.value("allreduce_seconds", 0.0);
  }
  o.log = child.log_file;
  if (!finished) {
    throw BenchError("shardctl run exited 0 but shard 0 logged no \"stage finished\" in " + log.string() +
                     "; shardctl's last lines:\n" + indented_tail(child.log_file, kLogTailLines));
  }
  o.cpu_seconds = cpu_seconds(child.status->usage);
  return o;
}

// The sidecar overhead (issue 5 "Benchmark"; gpt, whose activations are much larger
// than the cnn's: issue 18): one job of `model` with `steps` steps (one epoch of
// steps x batchSize samples, so that shardctl run, which has no step limit, trains
// exactly as many as the direct pipeline's --max-steps), run first as the direct
// 2-stage pipeline, then with `shardctl run` through the sidecars. samples/s is
// shard 0's trained samples / train seconds in both.
void sidecar_comparison(const Settings& s, const std::string& model, const json& example_job, int64_t steps,
                        const fs::path& tmp, std::vector<Figure>& figures) {
  constexpr int n = 2;
  const fs::path dir = tmp / (model + "-sidecars");
  fs::create_directories(dir);
  json job = bench_job(example_job, n);
  const int64_t batch = job["spec"]["training"]["batchSize"].get<int64_t>();
  job["spec"]["training"]["epochs"] = 1;
  job["spec"]["dataset"]["maxTrainSamples"] = steps * batch;
  // Two shards of the example cnn: stage 0 holds 0.55 of it, above the example's
  // 0.5, which the operator's render() (behind shardctl run) refuses (likewise gpt's).
  job["spec"]["protection"]["maxExposure"] = 0.6;
  const fs::path job_file = write_job(job, dir / "job.yaml");
  const int threads = std::max(1, s.cores / n);
  auto sps_of = [&](const StageOutcome& o) {
    return o.train_seconds > 0 ? static_cast<double>(o.trained_steps * batch) / o.train_seconds : 0.0;
  };

  std::cout << "[sidecars 1/2] " << model << " 2-stage pipeline without sidecars (" << n << " shardd x " << threads
            << " thread(s), " << steps << " steps) ...\n"
            << std::flush;
  auto t0 = Clock::now();
  double busy0 = machine_busy_seconds();
  const auto direct = run_pipeline(s, job_file, n, steps, dir / "direct");
  const double direct_sps = sps_of(direct.front());
  std::cout << "      " << fixed(direct_sps, 1) << " samples/s (" << fixed(seconds_since(t0), 1) << " s)\n"
            << std::flush;
  double direct_cpu = 0;
  for (const auto& st : direct) direct_cpu += st.cpu_seconds;
  warn_if_contended(busy0, direct_cpu, seconds_since(t0), s.cores);

  std::cout << "[sidecars 2/2] " << model << " the same job with shardctl run (" << n << " shardd, each behind its "
            << "shard-sidecar) ...\n"
            << std::flush;
  t0 = Clock::now();
  busy0 = machine_busy_seconds();
  const StageOutcome through = run_shardctl(s, job_file, n, dir / "shardctl");
  if (through.trained_steps != direct.front().trained_steps) {
    throw BenchError("shardctl run trained " + std::to_string(through.trained_steps) + " steps, the direct pipeline " +
                     std::to_string(direct.front().trained_steps) + ": not the same job");
  }
  const double sidecar_sps = sps_of(through);
  const double ratio = direct_sps > 0 ? sidecar_sps / direct_sps : 0.0;
  std::cout << "      " << fixed(sidecar_sps, 1) << " samples/s (" << fixed(seconds_since(t0), 1)
            << " s); through sidecars / direct = " << fixed(ratio, 3) << " (target >= 0.95)\n"
            << std::flush;
  // shardctl's rusage includes its reaped children: every shardd and sidecar.
  warn_if_contended(busy0, through.cpu_seconds, seconds_since(t0), s.cores);
  const std::string prefix = "pipeline." + model + ".2-stage.";
  figures.push_back({model, "2-stage direct",
                     figure(prefix + "direct", "samples_per_second", direct_sps, "samples/s", direct_sps)});
  figures.push_back({model, "2-stage sidecars",
                     figure(prefix + "sidecars", "samples_per_second", sidecar_sps, "samples/s", direct_sps)});
  figures.push_back({model, "2-stage sidecars", figure(prefix + "sidecars", "sidecar_overhead", ratio, "fraction", 0.95)});
}

// Data-parallel replicas (issue 20): 2 stages of `model` with `steps` steps, run by
// `shardctl run` once as one pipeline and once with spec.sharding.replicas 2 (the same
// batch per replica, so twice the samples a step), on the same cores (one compute
// thread per shardd). samples/s counts every replica's samples; the all-reduce share
// is replica 0 of stage 0's time in the group's collectives over its training time;
// the tunnelled bytes are each sidecar's Gloo bytes as `shardctl run` reports them
// (shardguard_tunnel_bytes_total), equal at both ends of each tunnel.
void replica_comparison(const Settings& s, const std::string& model, const json& example_job, int64_t steps,
                        const fs::path& tmp, std::vector<Figure>& figures) {
  constexpr int n = 2;
  const std::string prefix = "pipeline." + model + ".2-stage.";
  double single_sps = 0;
  for (const int replicas : {1, 2}) {
    const std::string config = "x" + std::to_string(replicas);
    const fs::path dir = tmp / (model + "-replicas-" + config);
    fs::create_directories(dir);
    json job = bench_job(example_job, n);
    const int64_t batch = job["spec"]["training"]["batchSize"].get<int64_t>();
    job["spec"]["training"]["epochs"] = 1;
    job["spec"]["dataset"]["maxTrainSamples"] = steps * batch * replicas;
    job["spec"]["sharding"]["replicas"] = replicas;
    job["spec"]["protection"]["maxExposure"] = 0.6;  // as in sidecar_comparison
    const fs::path job_file = write_job(job, dir / "job.yaml");
    std::cout << "[replicas " << replicas << "/2] " << model << " 2 stages x " << replicas << " replica"
              << (replicas == 1 ? "" : "s") << " with shardctl run (" << n * replicas << " shardd, "
              << std::max(1, s.cores / (n * replicas)) << " thread(s) each, " << steps << " steps of " << batch
              << (replicas == 1 ? "" : " per replica") << ") ...\n"
              << std::flush;
    const auto t0 = Clock::now();
    const double busy0 = machine_busy_seconds();
    const StageOutcome o = run_shardctl(s, job_file, n * replicas, dir / "shardctl");
    warn_if_contended(busy0, o.cpu_seconds, seconds_since(t0), s.cores);
    if (o.trained_steps != steps) {
      throw BenchError("shardctl run trained " + std::to_string(o.trained_steps) + " steps, not " +
                       std::to_string(steps) + " (" + config + ")");
    }
    const double sps = o.train_seconds > 0 ? static_cast<double>(o.trained_steps * batch * replicas) / o.train_seconds : 0;
    if (replicas == 1) single_sps = sps;
    const double share = o.train_seconds > 0 ? o.allreduce_seconds / o.train_seconds : 0.0;
    std::cout << "      " << fixed(sps, 1) << " samples/s (" << fixed(single_sps > 0 ? sps / single_sps : 0.0, 2)
              << "x one pipeline), all-reduce " << fixed(100 * share, 1) << " % of the step ("
              << fixed(seconds_since(t0), 1) << " s)\n"
              << std::flush;
    figures.push_back({model, "2-stage " + config,
                       figure(prefix + config, "samples_per_second", sps, "samples/s", single_sps)});
    if (replicas == 1) continue;
    figures.push_back({model, "2-stage " + config, figure(prefix + config, "allreduce_share", share, "fraction", 0)});
    // "shard <i> replica <r> tunnels: Gloo sent S received R, all-reduced A  (…)"
    static const std::regex line(R"(shard (\d+) replica (\d+) tunnels: Gloo sent (\d+) received (\d+), all-reduced (\d+))");
    const std::string report = read_file(o.log.string());
    int sidecars = 0;
    for (std::sregex_iterator it(report.begin(), report.end(), line), end; it != end; ++it, ++sidecars) {
      const auto& m = *it;
      const std::string slot = "stage" + std::string(m[1]) + ".r" + std::string(m[2]);
      const double sent = std::stod(m[3]), payload = std::stod(m[5]);
      std::cout << "      sidecar of stage " << m[1] << " replica " << m[2] << ": tunnelled " << m[3] << " bytes out, "
                << m[4] << " in; its shardd all-reduced " << m[5] << " bytes of gradients\n";
      figures.push_back({model, "2-stage x2 " + slot,
                         figure(prefix + config + "." + slot, "tunnelled_bytes", sent, "bytes", payload)});
    }
    if (sidecars != n * replicas) {
      throw BenchError("shardctl run reported the tunnels of " + std::to_string(sidecars) + " sidecars, not " +
                       std::to_string(n * replicas) + "; its output: " + o.log.string());
    }
  }
}

// The example job of a model: examples/fashion-mnist-{cnn,vit}.yaml, or for gpt
// examples/fortunes-gpt.yaml with its dataset made once per run in `tmp` by
// `shardctl data tokens` from Debian's fortunes (installed by make deps).
json read_example(const Settings& s, const fs::path& examples, const std::string& model, const fs::path& tmp) {
  const fs::path example = examples / (model == "gpt" ? "fortunes-gpt.yaml" : "fashion-mnist-" + model + ".yaml");
  std::ifstream in(example);
  if (!in) throw BenchError("cannot read " + example.string());
  std::stringstream text;
  text << in.rdbuf();
  json job = yaml_to_json(text.str());
  if (model == "gpt") {
    const fs::path corpus = "/usr/share/games/fortunes";
    const fs::path data = tmp / "fortunes-tokens";
    if (!fs::exists(data / "train.tokens")) {
      if (!fs::exists(corpus)) throw BenchError(corpus.string() + " is missing (make deps installs fortunes)");
      ChildGroup group;
      auto& child = group.spawn("shardctl data tokens",
                                {s.shardctl.string(), "data", "tokens", corpus.string(), "--out", data.string()}, {},
                                tmp / "data-tokens.log");
      group.wait_all(Clock::now() + std::chrono::seconds(120), 120);
      if (!fs::exists(data / "train.tokens")) {
        throw BenchError("shardctl data tokens made no " + (data / "train.tokens").string() + ":\n" +
                         indented_tail(child.log_file, kLogTailLines));
      }
    }
    job["spec"]["dataset"]["path"] = data.string();
  }
  return job;
}

int run_bench(const BenchOptions& opt) {
  Settings s;
  s.cores = opt.cores > 0 ? opt.cores : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  s.timeout_s = opt.timeout_s;
  s.self = self_exe();
  s.shardd = fs::path(self_dir()) / "shardd";
  if (::access(s.shardd.c_str(), X_OK) != 0) {
    throw BenchError("cannot run " + s.shardd.string() + " (build it: cmake --build build --target shardd)");
  }
  s.shardctl = fs::path(self_dir()) / "shardctl";
  for (const fs::path& p : {s.shardctl, fs::path(self_dir()) / "shard-sidecar"}) {
    if (::access(p.c_str(), X_OK) != 0) {
      throw BenchError("cannot run " + p.string() + " (build it: cmake --build build --target shardctl shard-sidecar)");
    }
  }
  install_signal_handlers();
  TempDir tmp("pipeline_bench");
  const std::vector<int> stage_counts = {2, 4};
  const std::vector<std::string> models =
      opt.sidecars_only || opt.replicas_only || opt.pooling_only ? std::vector<std::string>{} : opt.models;
  const int total_runs = static_cast<int>(models.size() * (1 + stage_counts.size()));
  std::cout << "pipeline_bench: " << s.cores << " cores; results to " << opt.out.string() << "\n" << std::flush;

  std::vector<Figure> figures;
  int run = 0;
  const auto bench_start = Clock::now();
  for (const auto& model : models) {
    const json example_job = read_example(s, opt.examples, model, tmp.path());
    const int64_t base_steps = model == "vit" ? opt.vit_steps : model == "gpt" ? opt.gpt_steps : opt.cnn_steps;
    const int64_t steps = std::max<int64_t>(1, std::llround(static_cast<double>(base_steps) * opt.steps_scale));
    const JobSpec spec = job_from_json(bench_job(example_job, 1));  // what every configuration runs
    const int batch = spec.training.batch_size;
    const model::ModelDesc desc = model::describe_model(spec.model);
    const std::string prefix = "pipeline." + model + ".";

    // (a) monolithic
    const fs::path mono_dir = tmp.path() / (model + "-monolithic");
    fs::create_directories(mono_dir);
    const fs::path mono_job = write_job(bench_job(example_job, 1), mono_dir / "job.yaml");
    std::cout << "[" << ++run << "/" << total_runs << "] " << model << " monolithic (" << s.cores << " threads, "
              << steps << " steps of " << batch << ") ...\n"
              << std::flush;
    auto t0 = Clock::now();
    double busy0 = machine_busy_seconds();
    const MonolithicOutcome mono = run_monolithic(s, mono_job, steps, mono_dir);
    std::cout << "      " << fixed(mono.samples_per_second, 1) << " samples/s, peak RSS "
              << fixed(mono.peak_rss_mib, 0) << " MiB (" << fixed(seconds_since(t0), 1) << " s)\n"
              << std::flush;
    warn_if_contended(busy0, mono.cpu_seconds, seconds_since(t0), s.cores);
    figures.push_back({model, "monolithic",
                       figure(prefix + "monolithic", "samples_per_second", mono.samples_per_second, "samples/s",
                              mono.samples_per_second)});
    {
      json r = figure(prefix + "monolithic", "peak_rss", mono.peak_rss_mib, "MiB", mono.peak_rss_mib);
      r["parameter_share"] = 1.0;
      figures.push_back({model, "monolithic", r});
    }

    // (b), (c) pipelines
    for (const int n : stage_counts) {
      const std::string config = std::to_string(n) + "-stage";
      const fs::path dir = tmp.path() / (model + "-" + config);
      fs::create_directories(dir);
      const json job = bench_job(example_job, n);
      const fs::path job_file = write_job(job, dir / "job.yaml");
      const auto parts = model::partition(desc, n, job_from_json(job).sharding.balance);
      const int threads = std::max(1, s.cores / n);
      std::cout << "[" << ++run << "/" << total_runs << "] " << model << " " << config << " pipeline (" << n
                << " shardd x " << threads << " thread" << (threads == 1 ? "" : "s") << ", " << steps
                << " steps) ...\n"
                << std::flush;
      t0 = Clock::now();
      busy0 = machine_busy_seconds();
      const auto stages = run_pipeline(s, job_file, n, steps, dir);
      const StageOutcome& first = stages.front();
      const double sps =
          first.train_seconds > 0 ? static_cast<double>(first.trained_steps * batch) / first.train_seconds : 0.0;
      std::cout << "      " << fixed(sps, 1) << " samples/s (" << fixed(sps / mono.samples_per_second, 2)
                << "x monolithic; " << fixed(seconds_since(t0), 1) << " s)\n"
                << std::flush;
      double stages_cpu = 0;
      for (const auto& st : stages) stages_cpu += st.cpu_seconds;
      warn_if_contended(busy0, stages_cpu, seconds_since(t0), s.cores);
      figures.push_back({model, config,
                         figure(prefix + config, "samples_per_second", sps, "samples/s", mono.samples_per_second)});
      for (int i = 0; i < n; ++i) {
        const auto& st = stages[static_cast<size_t>(i)];
        const double share = model::parameter_share(desc, parts[static_cast<size_t>(i)]);
        if (st.parameters >= 0 && st.parameters != parts[static_cast<size_t>(i)].parameters) {
          std::cout << "      note: stage " << i << " reports " << st.parameters << " parameters, partition() says "
                    << parts[static_cast<size_t>(i)].parameters << "\n";
        }
        const std::string bench = prefix + config + ".stage" + std::to_string(i);
        const std::string label = config + " stage " + std::to_string(i);
        json rss = figure(bench, "peak_rss", st.peak_rss_mib, "MiB", mono.peak_rss_mib);
        rss["parameter_share"] = rounded(share, 4);
        figures.push_back({model, label, rss});
        const double transport = st.train_seconds > 0 ? st.transport_seconds / st.train_seconds : 0.0;
        figures.push_back({model, label, figure(bench, "transport_share", transport, "fraction", kTransportTarget)});
        const double serialise = st.train_seconds > 0 ? st.serialise_seconds / st.train_seconds : 0.0;
        figures.push_back({model, label, figure(bench, "serialise_share", serialise, "fraction", kTransportTarget)});
      }
    }
  }
  const auto wanted = [&](const std::string& model) {
    return std::find(opt.models.begin(), opt.models.end(), model) != opt.models.end();
  };
  // The sidecar comparison for cnn and gpt, when they are among --models.
  for (const std::string model : {"cnn", "gpt"}) {
    if (opt.replicas_only || opt.pooling_only || !wanted(model)) continue;
    const int64_t base = model == "gpt" ? opt.gpt_steps : opt.sidecar_steps;
    const int64_t steps = std::max<int64_t>(1, std::llround(static_cast<double>(base) * opt.steps_scale));
    sidecar_comparison(s, model, read_example(s, opt.examples, model, tmp.path()), steps, tmp.path(), figures);
  }
  // The cnn's pooling against LibTorch's, with the full run.
  if (!opt.sidecars_only && !opt.replicas_only && wanted("cnn")) pooling_comparison(figures);
  // The replica comparison for cnn, when it is among --models.
  if (!opt.sidecars_only && !opt.pooling_only && wanted("cnn")) {
    const int64_t steps = std::max<int64_t>(1, std::llround(static_cast<double>(opt.replica_steps) * opt.steps_scale));
    replica_comparison(s, "cnn", read_example(s, opt.examples, "cnn", tmp.path()), steps, tmp.path(), figures);
  }
  {
    std::vector<json> rows;
    for (const auto& f : figures) rows.push_back(f.row);
    write_results(rows, opt.out, WriteMode::kTruncate);
  }
  std::cout << "\n";
  print_table(figures);
  std::cout << "\n"
            << figures.size() << " figures written to " << opt.out.string() << " (" << fixed(seconds_since(bench_start), 0)
            << " s in all)\n";
  return 0;
}

int run_monolithic_child(const std::string& job_file, int threads, int64_t steps) {
  const JobSpec job = load_job_file(job_file);
  shardd::set_compute_threads(threads);
  shardd::MonolithicOptions o;
  o.max_steps = steps;
  o.device = "cpu";
  o.evaluate_at_end = false;
  const auto r = shardd::train_monolithic(job, o);
  const json line = {{"mode", "monolithic"},
                     {"job", job.name},
                     {"threads", threads},
                     {"steps", static_cast<int64_t>(r.steps.size())},
                     {"samples", r.samples},
                     {"train_seconds", r.train_seconds},
                     {"samples_per_second", r.train_seconds > 0 ? static_cast<double>(r.samples) / r.train_seconds : 0.0}};
  std::cout << line.dump() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pipeline_bench: monolithic training vs 2- and 4-stage shardd pipelines on this machine"};
  BenchOptions opt;
  opt.out = shardguard::bench::default_results_file();
  opt.examples = fs::path(SHARDGUARD_SOURCE_DIR) / "examples";
  std::string out = opt.out.string();
  std::string examples = opt.examples.string();
  std::string monolithic_job;
  int threads = 0;
  int64_t steps = 0;
  app.add_option("--out", out, "results file (JSON lines)")->capture_default_str();
  app.add_option("--examples-dir", examples, "directory holding fashion-mnist-{cnn,vit}.yaml and fortunes-gpt.yaml")->capture_default_str();
  app.add_option("--models", opt.models, "models to benchmark (cnn, vit, gpt)")->capture_default_str()
      ->check(CLI::IsMember({"cnn", "vit", "gpt"}));
  app.add_option("--cnn-steps", opt.cnn_steps, "training steps per cnn run")->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--vit-steps", opt.vit_steps, "training steps per vit run")->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--gpt-steps", opt.gpt_steps, "training steps per gpt run (its sidecar comparison included)")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--steps-scale", opt.steps_scale, "multiplies every step count (e.g. 0.1 for a quick check)")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--cores", opt.cores, "cores shared by every configuration (0 = all of this machine's)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--timeout", opt.timeout_s, "seconds one configuration may run before its processes are killed")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--sidecar-steps", opt.sidecar_steps, "training steps per run of the cnn sidecar comparison")
      ->capture_default_str()->check(CLI::PositiveNumber);
  auto* sidecars_only = app.add_flag("--sidecars-only", opt.sidecars_only,
               "run only the sidecar comparison (2 stages: shardctl run through the sidecars vs direct), for cnn "
               "and gpt where --models names them");
  app.add_option("--replica-steps", opt.replica_steps, "training steps per run of the cnn replica comparison")
      ->capture_default_str()->check(CLI::PositiveNumber);
  auto* pooling_only = app.add_flag("--pooling-only", opt.pooling_only,
               "run only the pooling comparison (the cnn's max_pool_2x2 against LibTorch's max_pool2d, in process)");
  auto* replicas_only = app.add_flag("--replicas-only", opt.replicas_only,
               "run only the replica comparison (cnn, 2 stages x 1 and x 2 replicas with shardctl run)");
  sidecars_only->excludes(replicas_only)->excludes(pooling_only);
  replicas_only->excludes(pooling_only);
  // Internal: the monolithic baseline runs as a child process of the benchmark.
  app.add_option("--monolithic", monolithic_job, "(internal) train JOB whole in this process and print one JSON line");
  app.add_option("--threads", threads, "(internal, with --monolithic) compute threads");
  app.add_option("--steps", steps, "(internal, with --monolithic) training steps");
  CLI11_PARSE(app, argc, argv);
  opt.out = out;
  opt.examples = examples;
  const bool cnn = std::find(opt.models.begin(), opt.models.end(), "cnn") != opt.models.end();
  if ((opt.pooling_only || opt.replicas_only) && !cnn) {
    std::cerr << "pipeline_bench: " << (opt.pooling_only ? "--pooling-only" : "--replicas-only")
              << " benchmarks the cnn, which --models leaves out\n";
    return 2;
  }
  try {
    if (!monolithic_job.empty()) return run_monolithic_child(monolithic_job, threads, steps);
    return run_bench(opt);
  } catch (const shardguard::JobSpecError& e) {
    std::cerr << "pipeline_bench: invalid job:\n" << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "pipeline_bench: " << e.what() << "\n";
    return 1;
  }
}
