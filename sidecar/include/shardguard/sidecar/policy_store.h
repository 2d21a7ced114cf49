// The live shard access policy of one sidecar, with hot reload (issue 3, item 3).
//
// A PolicyStore owns the path of the policy file and the last good Policy parsed
// from it, shared as std::shared_ptr<const Policy>:
// - construction loads the file once and never throws: a missing or invalid file
//   is logged and counted as a reload error, and the store starts with no policy;
// - with no policy, every decision is a deny with rule "no-policy" (fail closed);
// - reload() re-reads the file; a valid policy replaces the current one in one
//   atomic swap (readers see the old or the new one, never a mix), an invalid or
//   missing file keeps the last good policy, counts an error and reports why;
// - changed_on_disk() compares the file's (device, inode, size, mtime, ctime) with
//   those seen by the last reload attempt, so a watcher can poll cheaply. stat(2)
//   follows symbolic links, so both "write a temp file and rename it over" and the
//   Kubernetes ConfigMap symlink swap are noticed;
// - watch(interval) runs a background thread that calls reload() whenever
//   changed_on_disk(); stop() (and the destructor) wakes and joins it at once.
//
// Thread-safety: every member may be called from any thread. current() and decide()
// only copy a shared_ptr under a short mutex; a Policy handed out stays valid for as
// long as the caller holds it, whatever reloads happen meanwhile. Reloads are
// serialised, so generations are published in order.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <sys/types.h>
#include <thread>
#include <vector>

#include "shardguard/policy/policy.h"

namespace shardguard::sidecar {

struct ReloadResult {
  bool ok = false;
  // Failure only: one line naming the file and what went wrong (I/O error, or the
  // policy problems joined with "; ").
  std::string error;
  // Failure only: the validation problems with their JSON paths (empty for I/O errors).
  std::vector<policy::PolicyProblem> problems;
  // The generation in force after this call (unchanged on failure).
  uint64_t generation = 0;
};

class PolicyStore {
 public:
  // Loads `path` now; never throws (except std::bad_alloc).
  explicit PolicyStore(std::string path);
  ~PolicyStore();  // stop()s the watcher

  PolicyStore(const PolicyStore&) = delete;
  PolicyStore& operator=(const PolicyStore&) = delete;

  const std::string& path() const { return path_; }

  // The policy in force, or nullptr when no valid policy has ever been loaded.
  std::shared_ptr<const policy::Policy> current() const;

  // decide() of the current policy; a "no-policy" deny when there is none.
  policy::Decision decide(policy::Direction direction, const std::string& peer_spiffe_id,
                  const std::string& method_path) const;

  // Re-reads and re-validates the file. Never throws (except std::bad_alloc).
  ReloadResult reload();

  // Whether the file differs (device, inode, size, mtime ns, ctime ns, or
  // present/absent) from what the last reload attempt saw. Failed attempts count
  // as seen, so a broken file is not re-parsed on every poll, only once it changes.
  bool changed_on_disk() const;

  uint64_t reloads_ok() const;
  uint64_t reload_errors() const;
  // Incremented by every successful load, the one at construction included:
  // 0 means no policy has ever been loaded.
  uint64_t generation() const;

  // Starts the watcher thread polling every `interval` (must be > 0). Throws
  // std::logic_error if a watcher is already running, std::invalid_argument for a
  // non-positive interval.
  void watch(std::chrono::milliseconds interval);
  // Stops and joins the watcher; returns at once when none runs. Idempotent.
  void stop();

 private:
  struct FileStamp {
    bool exists = false;
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = 0;
    int64_t mtime_ns = 0;
    int64_t ctime_ns = 0;
    bool operator==(const FileStamp& o) const {
      return exists == o.exists && dev == o.dev && ino == o.ino && size == o.size &&
             mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
    }
    bool operator!=(const FileStamp& o) const { return !(*this == o); }
  };
  static FileStamp stamp_of(const std::string& path);
  void watch_loop(std::chrono::milliseconds interval, uint64_t epoch);

  const std::string path_;

  mutable std::mutex policy_mu_;  // guards policy_ and the counters (short sections only)
  std::shared_ptr<const policy::Policy> policy_;
  uint64_t reloads_ok_ = 0;
  uint64_t reload_errors_ = 0;
  uint64_t generation_ = 0;

  mutable std::mutex reload_mu_;  // serialises reload(); guards seen_
  FileStamp seen_;

  std::mutex watch_mu_;  // guards watcher_ and watch_epoch_
  std::condition_variable watch_cv_;
  std::thread watcher_;
  // stop() increments it; a watcher runs while it equals the value it started with,
  // so a watch() right after a stop() cannot revive the old thread.
  uint64_t watch_epoch_ = 0;
};

}  // namespace shardguard::sidecar
