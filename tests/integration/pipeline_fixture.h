// Shared by the integration tests: a small MLP job, and a fixture that runs its
// shardd stages as real processes on 127.0.0.1 and reads their JSON log lines.
#pragma once

#include <gtest/gtest.h>

#include <signal.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/process.h"
#include "support/temp_dir.h"

namespace shardguard {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

inline const std::string kBin = SHARDGUARD_BIN_DIR;

// Every process's command line (arguments joined by spaces), by pid.
inline std::map<pid_t, std::string> command_lines() {
  std::map<pid_t, std::string> out;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string pid = e.path().filename();
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(e.path() / "cmdline", std::ios::binary);
    std::string cmd((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (char& c : cmd) c = c == '\0' ? ' ' : c;
    out[static_cast<pid_t>(std::stol(pid))] = cmd;
  }
  return out;
}

// Processes whose command line mentions `needle` (the run's workdir is in every
// child's arguments), as "pid: cmdline".
inline std::vector<std::string> processes_mentioning(const std::string& needle) {
  std::vector<std::string> out;
  for (const auto& [pid, cmd] : command_lines()) {
    if (cmd.find(needle) != std::string::npos) out.push_back(std::to_string(pid) + ": " + cmd);
  }
  return out;
}

inline nlohmann::json job_json(int shards) {
  return {{"apiVersion", "shardguard.io/v1alpha1"},
          {"kind", "ShardedTrainingJob"},
          {"metadata", {{"name", "it-mlp"}}},
          {"spec",
           {{"model", {{"architecture", "mlp"}, {"hidden", 64}, {"depth", 3}}},
            {"dataset", {{"maxTrainSamples", 1536}, {"maxTestSamples", 500}}},
            {"training", {{"epochs", 1}, {"batchSize", 32}, {"microBatches", 4}, {"seed", 3},
                          {"optimizer", {{"name", "adam"}, {"learningRate", 0.002}}}, {"evalBatchSize", 100}}},
            {"sharding", {{"shards", shards}}},
            {"checkpoint", {{"everySteps", 8}}}}}};
}

class PipelineFixture : public ::testing::Test {
 protected:
  void TearDown() override {
    stages_.clear();  // kills and reaps anything still running
  }

  std::string write_job(const nlohmann::json& j, const std::string& name = "job.yaml") {
    const std::string path = dir_ + "/" + name;
    write_file_atomic(path, j.dump(2));  // JSON is YAML
    return path;
  }

  // argv of stage i of n with fixed ports; the run's files live under `run`.
  std::vector<std::string> stage_argv(const std::string& job, const std::string& run, int i, int n) {
    const std::string key = run + "/shard-" + std::to_string(i) + ".key";
    if (!fs::exists(key)) {
      make_dirs(run);
      generate_key_file(key);
    }
    std::vector<std::string> argv{kBin + "/shardd", "--job", job, "--stage", std::to_string(i),
                                  "--listen", "127.0.0.1:" + std::to_string(ports_[i]),
                                  "--checkpoint-dir", run + "/checkpoints", "--key-file", key, "--metrics", "off",
                                  "--device", "cpu", "--threads", "1", "--peer-timeout", "60", "--retry-budget", "30"};
    // Neighbours directly, unless a test routes them elsewhere (through sidecars).
    auto route = [&](const std::map<int, std::string>& over, int j) {
      return over.count(i) ? over.at(i) : "127.0.0.1:" + std::to_string(ports_[j]);
    };
    if (i > 0) argv.insert(argv.end(), {"--prev", route(prev_override_, i - 1)});
    if (i + 1 < n) argv.insert(argv.end(), {"--next", route(next_override_, i + 1)});
    return argv;
  }

  void start_stage(const std::string& job, const std::string& run, int i, int n) {
    SpawnOptions o;
    o.argv = stage_argv(job, run, i, n);
    o.env = {{"OMP_NUM_THREADS", "1"}, {"OPENBLAS_NUM_THREADS", "1"}};
    o.log_file = run + "/stage-" + std::to_string(i) + ".log";
    o.capture_stderr = true;
    stages_[i] = std::make_unique<Process>(o);
    all_lines_[i].clear();
  }

  // Reads a stage's JSON log lines until `stop` returns true for one (or EOF / 5 min).
  template <class Pred>
  bool read_until(int i, Pred stop, std::vector<nlohmann::json>* seen = nullptr) {
    const auto deadline = std::chrono::steady_clock::now() + 5min;
    while (std::chrono::steady_clock::now() < deadline) {
      auto line = stages_[i]->read_line(1s);
      if (!line) {
        if (stages_[i]->eof()) return false;
        continue;
      }
      auto j = nlohmann::json::parse(*line, nullptr, false);
      if (!j.is_object()) continue;
      all_lines_[i].push_back(j);
      if (seen) seen->push_back(j);
      if (stop(j)) return true;
    }
    return false;
  }


  struct Outcome {
    std::map<int64_t, double> losses;  // step → loss, from the last stage
    int64_t correct = -1;
    std::vector<int64_t> resumes;      // steps the last stage resumed at
  };

  // Drains the last stage until it exits; all stages must exit 0.
  Outcome finish(int n, Outcome out) {
    std::vector<nlohmann::json> lines;
    read_until(n - 1, [](const nlohmann::json&) { return false; }, &lines);
    for (const auto& j : lines) absorb(j, out);
    for (int i = 0; i < n; ++i) {
      const auto st = stages_[i]->wait_for(120s);
      EXPECT_TRUE(st.has_value()) << "stage " << i << " did not exit";
      if (st) {
        EXPECT_TRUE(st->exited && st->code == 0) << "stage " << i << ": " << st->str();
      }
    }
    return out;
  }

  static void absorb(const nlohmann::json& j, Outcome& out) {
    const std::string msg = j.value("msg", "");
    if (msg == "step") out.losses[j.at("step").get<int64_t>()] = j.at("loss").get<double>();
    if (msg == "evaluation") out.correct = j.at("correct").get<int64_t>();
    if (msg == "pipeline resumed") out.resumes.push_back(j.at("step").get<int64_t>());
  }

  const shardguard::testsupport::TempDir tmp_{"shardguard-it"};  // removed after the stages are gone
  const std::string dir_ = tmp_.str();
  std::vector<int> ports_;
  std::map<int, std::string> prev_override_, next_override_;  // stage → address
  std::map<int, std::vector<nlohmann::json>> all_lines_;        // every JSON line read, by stage
  std::map<int, std::unique_ptr<Process>> stages_;
};


}  // namespace shardguard
