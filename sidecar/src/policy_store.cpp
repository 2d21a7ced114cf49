// The live policy with hot reload (see policy_store.h).
#include "shardguard/sidecar/policy_store.h"

#include <cerrno>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <utility>

#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include "shardguard/common/files.h"
#include "shardguard/common/log.h"

namespace shardguard::sidecar {
namespace {

int64_t to_ns(const struct timespec& ts) {
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + static_cast<int64_t>(ts.tv_nsec);
}

policy::Decision no_policy_decision() {
  policy::Decision d;
  d.allow = false;
  d.rule = policy::kRuleNoPolicy;
  d.reason =
      "no valid shard access policy is loaded (the policy file is missing or invalid), "
      "so every call is refused";
  return d;
}

}  // namespace

// A failure here is logged (and counted) by reload() itself.
PolicyStore::PolicyStore(std::string path) : path_(std::move(path)) { reload(); }

PolicyStore::~PolicyStore() { stop(); }

PolicyStore::FileStamp PolicyStore::stamp_of(const std::string& path) {
  FileStamp s;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return s;  // absent (or unreadable): exists=false
  s.exists = true;
  s.dev = st.st_dev;
  s.ino = st.st_ino;
  s.size = st.st_size;
  s.mtime_ns = to_ns(st.st_mtim);
  s.ctime_ns = to_ns(st.st_ctim);
  return s;
}

std::shared_ptr<const policy::Policy> PolicyStore::current() const {
  std::lock_guard<std::mutex> lock(policy_mu_);
  return policy_;
}

policy::Decision PolicyStore::decide(policy::Direction direction, const std::string& peer_spiffe_id,
                             const std::string& method_path) const {
  const std::shared_ptr<const policy::Policy> snapshot = current();
  if (!snapshot) return no_policy_decision();
  return policy::decide(*snapshot, direction, peer_spiffe_id, method_path);
}

ReloadResult PolicyStore::reload() {
  std::lock_guard<std::mutex> reload_lock(reload_mu_);
  // The stamp is taken before reading: if the file changes between the two, the
  // next changed_on_disk() sees a difference and the watcher reads it again.
  seen_ = stamp_of(path_);

  ReloadResult result;
  std::shared_ptr<const policy::Policy> fresh;
  try {
    const std::string text = read_file(path_);
    fresh = std::make_shared<const policy::Policy>(policy::parse_policy(text));
  } catch (const policy::PolicyError& e) {
    result.problems = e.problems();
    result.error = "invalid policy file " + path_ + ": ";
    for (std::size_t i = 0; i < result.problems.size(); ++i) {
      if (i > 0) result.error += "; ";
      result.error += result.problems[i].str();
    }
  } catch (const FileError& e) {
    result.error = e.what();
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    result.error = "cannot load policy file " + path_ + ": " + e.what();
  }

  if (fresh) {
    uint64_t generation = 0;
    {
      std::lock_guard<std::mutex> lock(policy_mu_);
      policy_ = std::move(fresh);
      ++reloads_ok_;
      generation = ++generation_;
    }
    result.ok = true;
    result.generation = generation;
    log::info("policy loaded", {{"path", path_}, {"generation", generation}});
    return result;
  }

  bool have_policy = false;
  {
    std::lock_guard<std::mutex> lock(policy_mu_);
    ++reload_errors_;
    result.generation = generation_;
    have_policy = policy_ != nullptr;
  }
  nlohmann::json problems = nlohmann::json::array();
  for (const policy::PolicyProblem& p : result.problems) {
    problems.push_back({{"path", p.path}, {"message", p.message}});
  }
  log::error(have_policy ? "policy reload failed; keeping the last good policy"
                         : "policy reload failed; no valid policy, refusing every call",
             {{"path", path_},
              {"error", result.error},
              {"problems", problems},
              {"generation", result.generation}});
  return result;
}

bool PolicyStore::changed_on_disk() const {
  const FileStamp now = stamp_of(path_);
  std::lock_guard<std::mutex> lock(reload_mu_);
  return now != seen_;
}

uint64_t PolicyStore::reloads_ok() const {
  std::lock_guard<std::mutex> lock(policy_mu_);
  return reloads_ok_;
}

uint64_t PolicyStore::reload_errors() const {
  std::lock_guard<std::mutex> lock(policy_mu_);
  return reload_errors_;
}

uint64_t PolicyStore::generation() const {
  std::lock_guard<std::mutex> lock(policy_mu_);
  return generation_;
}

void PolicyStore::watch(std::chrono::milliseconds interval) {
  if (interval.count() <= 0) {
    throw std::invalid_argument("PolicyStore::watch: the interval must be positive");
  }
  std::lock_guard<std::mutex> lock(watch_mu_);
  if (watcher_.joinable()) {
    throw std::logic_error("PolicyStore::watch: a watcher is already running");
  }
  const uint64_t epoch = watch_epoch_;
  watcher_ = std::thread([this, interval, epoch] { watch_loop(interval, epoch); });
}

void PolicyStore::stop() {
  std::thread watcher;
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    ++watch_epoch_;
    watcher = std::move(watcher_);
  }
  watch_cv_.notify_all();
  if (watcher.joinable()) watcher.join();
}

void PolicyStore::watch_loop(std::chrono::milliseconds interval, uint64_t epoch) {
  std::unique_lock<std::mutex> lock(watch_mu_);
  for (;;) {
    watch_cv_.wait_for(lock, interval, [&] { return watch_epoch_ != epoch; });
    if (watch_epoch_ != epoch) return;
    lock.unlock();
    try {
      if (changed_on_disk()) reload();
    } catch (const std::exception& e) {  // bad_alloc: log and try again next time
      log::error("policy watcher: reload failed", {{"path", path_}, {"error", e.what()}});
    }
    lock.lock();
  }
}

}  // namespace shardguard::sidecar
