#include "shardguard/shardctl/local_run.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/process.h"
#include "shardguard/shardctl/progress.h"
#include "shardguard/shardd/model_desc.h"
#include "shardguard/shardd/partition.h"

namespace shardguard::shardctl {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Shard {
  int index = 0;
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
  std::string log_file;
  std::unique_ptr<Process> process;
  bool done = false;
  int restarts = 0;
};

std::string tail_of(const std::string& path, size_t lines) {
  std::string text;
  try {
    text = read_file(path);
  } catch (const std::exception&) {
    return "";
  }
  size_t pos = text.size();
  for (size_t n = 0; n <= lines && pos > 0; ++n) {
    pos = text.rfind('\n', pos - 1);
    if (pos == std::string::npos) {
      pos = 0;
      break;
    }
  }
  return text.substr(pos == 0 ? 0 : pos + 1);
}

// Last stage's JSON log lines that matter to the user.
struct RunState {
  Progress progress;
  std::optional<double> test_accuracy;
  int64_t test_correct = 0, test_total = 0;
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
  }
}

// Only the last stage's stderr is read (progress); the others go to their log
// files only, so no unread pipe can ever fill up and block a shard.
void start(Shard& s, bool capture) {
  SpawnOptions o;
  o.argv = s.argv;
  o.env = s.env;
  o.log_file = s.log_file;
  o.capture_stderr = capture;
  s.process = std::make_unique<Process>(o);
}

void stop_all(std::vector<Shard>& shards) {
  for (auto& s : shards) {
    if (s.process) s.process->signal(SIGTERM);
  }
  for (auto& s : shards) {
    if (s.process) s.process->terminate(std::chrono::seconds(15));
  }
}

}  // namespace

int RunLocal(const LocalRunOptions& options) {
  const auto started = Clock::now();
  JobSpec job;
  std::vector<shardd::StageDesc> stages;
  shardd::ModelDesc desc;
  try {
    job = load_job_file(options.job_file);
    desc = shardd::describe_model(job.model);
    stages = shardd::partition(desc, job.sharding.shards, job.sharding.balance);
  } catch (const JobSpecError& e) {
    std::cerr << "shardctl run: invalid job " << options.job_file << ":\n" << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "shardctl run: invalid job " << options.job_file << ":\n" << e.what() << "\n";
    return 2;
  }
  const int n = static_cast<int>(stages.size());
  const std::string workdir = options.workdir.empty() ? ".shardguard/" + job.name : options.workdir;
  const std::string ckpt_dir = workdir + "/checkpoints", key_dir = workdir + "/keys", log_dir = workdir + "/logs";
  const std::string shardd_path = options.shardd.empty() ? self_dir() + "/shardd" : options.shardd;
  if (::access(shardd_path.c_str(), X_OK) != 0) {
    std::cerr << "shardctl run: cannot run " << shardd_path << " (build it with `make build`, or pass --shardd)\n";
    return 2;
  }

  // Old checkpoints are never silently reused or thrown away.
  bool has_checkpoints = fs::exists(ckpt_dir) && !fs::is_empty(ckpt_dir);
  if (has_checkpoints && options.fresh) {
    fs::remove_all(ckpt_dir);
    has_checkpoints = false;
  }
  if (has_checkpoints && !options.resume) {
    std::cerr << "shardctl run: " << ckpt_dir << " holds checkpoints of an earlier run; pass --resume to continue it "
              << "or --fresh to start over\n";
    return 2;
  }
  if (options.resume && !has_checkpoints) {
    std::cerr << "shardctl run: --resume given but " << ckpt_dir << " holds no checkpoints; starting from step 0\n";
  }
  try {
    make_dirs(ckpt_dir);
    make_dirs(key_dir);
    make_dirs(log_dir);
    ::chmod(key_dir.c_str(), 0700);
  } catch (const std::exception& e) {
    std::cerr << "shardctl run: " << e.what() << "\n";
    return 2;
  }

  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const int threads = options.threads > 0 ? options.threads : std::max(1, static_cast<int>(cores) / n);
  std::vector<int> ports(n);
  std::vector<Shard> shards(n);
  try {
    for (int i = 0; i < n; ++i) ports[i] = pick_free_port();
    for (int i = 0; i < n; ++i) {
      Shard& s = shards[i];
      s.index = i;
      const std::string key_file = key_dir + "/shard-" + std::to_string(i) + ".key";
      if (!fs::exists(key_file)) generate_key_file(key_file);
      s.log_file = log_dir + "/shard-" + std::to_string(i) + ".log";
      s.argv = {shardd_path,
                "--job", options.job_file,
                "--stage", std::to_string(i),
                "--listen", "127.0.0.1:" + std::to_string(ports[i]),
                "--checkpoint-dir", ckpt_dir,
                "--key-file", key_file,
                "--metrics", "127.0.0.1:0",
                "--device", options.device,
                "--threads", std::to_string(threads),
                "--peer-timeout", std::to_string(options.peer_timeout_s)};
      if (i > 0) s.argv.insert(s.argv.end(), {"--prev", "127.0.0.1:" + std::to_string(ports[i - 1])});
      if (i + 1 < n) s.argv.insert(s.argv.end(), {"--next", "127.0.0.1:" + std::to_string(ports[i + 1])});
      const std::string t = std::to_string(threads);
      // Passive OpenMP workers: spinning ones steal the cores the other shards need.
      s.env = {{"OMP_NUM_THREADS", t}, {"OPENBLAS_NUM_THREADS", t}, {"OMP_WAIT_POLICY", "PASSIVE"}};
    }
  } catch (const std::exception& e) {
    std::cerr << "shardctl run: " << e.what() << "\n";
    return 2;
  }

  // Signals are taken synchronously in the loop below, never in a handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigprocmask(SIG_BLOCK, &signals, nullptr);

  std::cout << "shardctl run: job " << job.name << ", model " << job.model.architecture << " ("
            << desc.parameters() << " parameters), " << n << " shards, " << threads << " thread(s) each\n";
  for (const auto& st : stages) {
    std::printf("  shard %d: blocks %d..%d  %lld parameters (%.1f%%)\n", st.index, st.first_block, st.end_block - 1,
                static_cast<long long>(st.parameters), 100.0 * shardd::parameter_share(desc, st));
  }
  std::cout << "  workdir " << workdir << "  (logs in " << log_dir << ")\n" << std::flush;

  try {
    for (auto& s : shards) start(s, &s == &shards.back());
  } catch (const std::exception& e) {
    std::cerr << "shardctl run: " << e.what() << "\n";
    stop_all(shards);
    return 2;
  }

  RunState state;
  state.progress.epochs = job.training.epochs;
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
    Shard& tail = shards.back();
    if (tail.process && !tail.process->eof()) {
      if (auto line = tail.process->read_line(std::chrono::milliseconds(200))) {
        absorb(*line, state, rate, std::chrono::duration<double>(Clock::now() - started).count());
      }
    } else {
      // Nothing to read: wait for a child to change state instead of spinning.
      for (auto& s : shards) {
        if (s.process && !s.done) {
          s.process->wait_for(std::chrono::milliseconds(200));
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
    // 3. Children that ended.
    bool all_done = true;
    for (auto& s : shards) {
      if (s.done) continue;
      auto st = s.process->wait_for(std::chrono::milliseconds(0));
      if (!st) {
        all_done = false;
        continue;
      }
      if (&s == &shards.back()) {
        while (auto line = s.process->read_line(std::chrono::milliseconds(0))) {
          absorb(*line, state, rate, std::chrono::duration<double>(Clock::now() - started).count());
        }
      }
      if (st->exited && st->code == 0) {
        s.done = true;
        continue;
      }
      all_done = false;
      if (s.restarts >= job.run_policy.backoff_limit) {
        failure = "shard " + std::to_string(s.index) + " failed (" + st->str() + ") after " +
                  std::to_string(s.restarts) + " restart(s), the job's runPolicy.backoffLimit; its log ends with:\n" +
                  tail_of(s.log_file, 8);
        break;
      }
      ++s.restarts;
      if (options.progress_tty) std::cout << "\n";
      std::cout << "shard " << s.index << " stopped (" << st->str() << "); restarting it from its checkpoint ("
                << s.restarts << "/" << job.run_policy.backoff_limit << ")\n" << std::flush;
      try {
        start(s, &s == &shards.back());
      } catch (const std::exception& e) {
        failure = std::string("restarting shard ") + std::to_string(s.index) + ": " + e.what();
        break;
      }
    }
    if (!failure.empty()) break;
    if (all_done) break;
  }
  if (options.progress_tty) std::cout << "\n";
  stop_all(shards);
  const double wall = std::chrono::duration<double>(Clock::now() - started).count();

  if (interrupted) {
    std::cout << "shardctl run: stopped by signal; every shard process was stopped. Checkpoints are kept in "
              << ckpt_dir << "; continue with `shardctl run " << options.job_file << " --resume"
              << (options.workdir.empty() ? "" : " --workdir " + options.workdir) << "`\n";
    return 130;
  }
  if (!failure.empty()) {
    std::cerr << "shardctl run: the run failed: " << failure << "\n";
    return 1;
  }
  std::cout << "\nshardctl run: done in " << format_duration(wall) << "\n";
  if (state.test_accuracy) {
    std::printf("  test accuracy   %.4f (%lld/%lld)\n", *state.test_accuracy, static_cast<long long>(state.test_correct),
                static_cast<long long>(state.test_total));
  }
  if (state.progress.step > 0) {  // a resumed run that was already complete trains no step
    std::printf("  final loss      %.4f after %lld steps\n", state.progress.loss,
                static_cast<long long>(state.progress.step));
  }
  for (const auto& st : stages) {
    std::printf("  shard %d         %lld parameters (%.1f%% of the model), restarts %d\n", st.index,
                static_cast<long long>(st.parameters), 100.0 * shardd::parameter_share(desc, st), shards[st.index].restarts);
  }
  std::cout << "  checkpoints     " << ckpt_dir << " (each shard encrypted under its own key in " << key_dir << ")\n";
  std::cout << "  logs            " << log_dir << "\n";
  return 0;
}

}  // namespace shardguard::shardctl
