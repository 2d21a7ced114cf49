// The live policy with hot reload: start-up with a good, missing or broken file,
// reloads that keep the last good policy, change detection, the watcher thread and
// readers racing reloads. Reloads are driven by reload() directly; the watcher tests
// wait for the generation with a bounded deadline, never a fixed sleep.
#include "shardguard/sidecar/policy_store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "shardguard/common/files.h"
#include "shardguard/common/pki.h"
#include "support/temp_dir.h"

namespace shardguard::sidecar {
namespace {

using nlohmann::json;

const std::string kTd = "shardguard.local";
const std::string kNs = "ml";
const std::string kJob = "fmnist";

std::string shard_id(int i) { return spiffe_id_for_shard(kTd, kNs, kJob, i); }

// Shard 1 of 4 with one ingress rule: Forward from shard 0 (and, when
// `with_backward`, Backward from shard 2), under the given rule name.
std::string policy_text(const std::string& rule, bool with_backward = false) {
  json rules = json::array();
  rules.push_back({{"name", rule}, {"peers", {shard_id(0)}}, {"methods", {policy::kForwardMethod}}});
  if (with_backward) {
    rules.push_back(
        {{"name", "backward-from-next"}, {"peers", {shard_id(2)}}, {"methods", {policy::kBackwardMethod}}});
  }
  return json{{"version", 1},  {"trustDomain", kTd}, {"namespace", kNs}, {"job", kJob},
              {"shard", 1},    {"shards", 4},        {"ingress", rules}}
      .dump(2);
}

// Valid JSON, invalid policy: a non-canonical method at ingress[0].methods[0].
std::string invalid_policy_text() {
  json doc = json::parse(policy_text("forward-from-prev"));
  doc["ingress"][0]["methods"][0] = "/x";
  return doc.dump();
}

using testsupport::TempDir;

// Writes the file the way the operator does: temp file + rename over the target.
void replace(const std::string& path, const std::string& text) { write_file_atomic(path, text); }

// Waits until store.generation() >= want, for at most 10 s.
bool wait_for_generation(const PolicyStore& store, uint64_t want) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::mutex mu;
  std::condition_variable cv;
  std::unique_lock<std::mutex> lock(mu);
  while (store.generation() < want) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    cv.wait_for(lock, std::chrono::milliseconds(2));
  }
  return true;
}

bool has_problem_at(const ReloadResult& r, const std::string& path) {
  for (const policy::PolicyProblem& p : r.problems) {
    if (p.path == path) return true;
  }
  return false;
}

TEST(PolicyStore, ValidFileAtStartDecides) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  replace(path, policy_text("forward-from-prev"));

  PolicyStore store(path);
  ASSERT_NE(store.current(), nullptr);
  EXPECT_EQ(store.generation(), 1u);
  EXPECT_EQ(store.reloads_ok(), 1u);
  EXPECT_EQ(store.reload_errors(), 0u);
  EXPECT_EQ(store.path(), path);

  const policy::Decision allow = store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod);
  EXPECT_TRUE(allow.allow);
  EXPECT_EQ(allow.rule, "forward-from-prev");

  const policy::Decision deny = store.decide(policy::Direction::kIngress, shard_id(3), policy::kForwardMethod);
  EXPECT_FALSE(deny.allow);
  EXPECT_EQ(deny.rule, policy::kRuleDefaultDeny);

  // Same as the pure function on the same policy.
  const policy::Decision pure = policy::decide(*store.current(), policy::Direction::kIngress, shard_id(0),
                                        policy::kForwardMethod);
  EXPECT_EQ(pure.rule, allow.rule);
}

TEST(PolicyStore, MissingFileAtStartRefusesEverythingUntilLoaded) {
  TempDir dir;
  const std::string path = dir.file("policy.json");

  PolicyStore store(path);  // must not throw
  EXPECT_EQ(store.current(), nullptr);
  EXPECT_EQ(store.generation(), 0u);
  EXPECT_EQ(store.reloads_ok(), 0u);
  EXPECT_EQ(store.reload_errors(), 1u);

  for (policy::Direction d : {policy::Direction::kIngress, policy::Direction::kEgress}) {
    const policy::Decision deny = store.decide(d, shard_id(0), policy::kForwardMethod);
    EXPECT_FALSE(deny.allow);
    EXPECT_EQ(deny.rule, policy::kRuleNoPolicy);
    EXPECT_NE(deny.reason.find("missing or invalid"), std::string::npos) << deny.reason;
  }

  // A failed reload of a still-missing file names the file and counts again.
  const ReloadResult still = store.reload();
  EXPECT_FALSE(still.ok);
  EXPECT_NE(still.error.find(path), std::string::npos) << still.error;
  EXPECT_TRUE(still.problems.empty());
  EXPECT_EQ(store.reload_errors(), 2u);

  replace(path, policy_text("forward-from-prev"));
  const ReloadResult r = store.reload();
  EXPECT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.generation, 1u);
  EXPECT_EQ(store.generation(), 1u);
  const policy::Decision allow = store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod);
  EXPECT_TRUE(allow.allow);
  EXPECT_EQ(allow.rule, "forward-from-prev");
}

TEST(PolicyStore, InvalidFileAtStartRefusesEverything) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  replace(path, invalid_policy_text());

  PolicyStore store(path);
  EXPECT_EQ(store.current(), nullptr);
  EXPECT_EQ(store.reload_errors(), 1u);
  EXPECT_EQ(store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod).rule, policy::kRuleNoPolicy);
}

TEST(PolicyStore, BrokenFileKeepsTheLastGoodPolicy) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  replace(path, policy_text("forward-from-prev"));
  PolicyStore store(path);
  ASSERT_EQ(store.generation(), 1u);
  const std::shared_ptr<const policy::Policy> good = store.current();

  // Not JSON at all.
  replace(path, "{\"version\": 1, \"ingress\": [");
  const ReloadResult syntax = store.reload();
  EXPECT_FALSE(syntax.ok);
  EXPECT_FALSE(syntax.problems.empty());
  EXPECT_NE(syntax.error.find(path), std::string::npos) << syntax.error;
  EXPECT_EQ(syntax.generation, 1u);
  EXPECT_EQ(store.reload_errors(), 1u);
  EXPECT_EQ(store.current(), good);
  policy::Decision d = store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod);
  EXPECT_TRUE(d.allow);
  EXPECT_EQ(d.rule, "forward-from-prev");

  // Valid JSON, invalid policy: the problem comes with its JSON path.
  replace(path, invalid_policy_text());
  const ReloadResult invalid = store.reload();
  EXPECT_FALSE(invalid.ok);
  EXPECT_TRUE(has_problem_at(invalid, "ingress[0].methods[0]")) << invalid.error;
  EXPECT_NE(invalid.error.find("ingress[0].methods[0]"), std::string::npos) << invalid.error;
  EXPECT_EQ(store.reload_errors(), 2u);
  EXPECT_EQ(store.current(), good);

  // The file deleted: also an error, the policy stays.
  ASSERT_EQ(std::remove(path.c_str()), 0);
  const ReloadResult gone = store.reload();
  EXPECT_FALSE(gone.ok);
  EXPECT_EQ(store.reload_errors(), 3u);
  EXPECT_EQ(store.current(), good);

  EXPECT_EQ(store.generation(), 1u);
  EXPECT_EQ(store.reloads_ok(), 1u);

  // A good file again: swapped in, generation moves on.
  replace(path, policy_text("forward-b", /*with_backward=*/true));
  const ReloadResult fixed = store.reload();
  EXPECT_TRUE(fixed.ok) << fixed.error;
  EXPECT_TRUE(fixed.error.empty());
  EXPECT_EQ(fixed.generation, 2u);
  EXPECT_EQ(store.generation(), 2u);
  EXPECT_EQ(store.reloads_ok(), 2u);
  EXPECT_EQ(store.reload_errors(), 3u);
  d = store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod);
  EXPECT_TRUE(d.allow);
  EXPECT_EQ(d.rule, "forward-b");
  EXPECT_TRUE(store.decide(policy::Direction::kIngress, shard_id(2), policy::kBackwardMethod).allow);

  // The old policy a reader still holds is untouched.
  EXPECT_EQ(good->ingress().at(0).name, "forward-from-prev");
}

TEST(PolicyStore, ChangedOnDiskSeesAtomicRename) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  replace(path, policy_text("forward-from-prev"));
  PolicyStore store(path);

  EXPECT_FALSE(store.changed_on_disk());
  EXPECT_FALSE(store.changed_on_disk());

  // Same content, new inode: still a change (the watcher cannot know it is equal).
  replace(path, policy_text("forward-from-prev"));
  EXPECT_TRUE(store.changed_on_disk());
  ASSERT_TRUE(store.reload().ok);
  EXPECT_FALSE(store.changed_on_disk());

  // A broken file is a change; once it has been tried it is no longer one.
  replace(path, "not json");
  EXPECT_TRUE(store.changed_on_disk());
  EXPECT_FALSE(store.reload().ok);
  EXPECT_FALSE(store.changed_on_disk());

  // Deleted: a change.
  ASSERT_EQ(std::remove(path.c_str()), 0);
  EXPECT_TRUE(store.changed_on_disk());
  EXPECT_FALSE(store.reload().ok);
  EXPECT_FALSE(store.changed_on_disk());
}

TEST(PolicyStore, WatchPicksUpAnAtomicRename) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  replace(path, policy_text("forward-from-prev"));
  PolicyStore store(path);
  ASSERT_EQ(store.generation(), 1u);

  store.watch(std::chrono::milliseconds(5));
  EXPECT_THROW(store.watch(std::chrono::milliseconds(5)), std::logic_error);

  replace(path, policy_text("forward-b"));
  ASSERT_TRUE(wait_for_generation(store, 2)) << "watcher did not reload within 10 s";
  EXPECT_EQ(store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod).rule, "forward-b");

  // A broken file: counted once, the policy stays.
  replace(path, "{");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (store.reload_errors() < 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  EXPECT_EQ(store.reload_errors(), 1u);
  EXPECT_EQ(store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod).rule, "forward-b");

  replace(path, policy_text("forward-from-prev"));
  ASSERT_TRUE(wait_for_generation(store, 3));
  EXPECT_EQ(store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod).rule,
            "forward-from-prev");
  store.stop();
  store.stop();  // idempotent
  EXPECT_EQ(store.reload_errors(), 1u);
}

TEST(PolicyStore, WatchLoadsAFileThatAppearsLater) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  PolicyStore store(path);
  ASSERT_EQ(store.current(), nullptr);
  store.watch(std::chrono::milliseconds(5));
  replace(path, policy_text("forward-from-prev"));
  ASSERT_TRUE(wait_for_generation(store, 1));
  EXPECT_TRUE(store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod).allow);
  // The destructor stops the watcher.
}

TEST(PolicyStore, StopReturnsAtOnceAndWatchCanRestart) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  replace(path, policy_text("forward-from-prev"));
  PolicyStore store(path);
  EXPECT_THROW(store.watch(std::chrono::milliseconds(0)), std::invalid_argument);

  store.watch(std::chrono::hours(1));
  const auto t0 = std::chrono::steady_clock::now();
  store.stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));

  store.watch(std::chrono::milliseconds(5));
  replace(path, policy_text("forward-b"));
  ASSERT_TRUE(wait_for_generation(store, 2));
  store.stop();
}

TEST(PolicyStore, ConcurrentReadersDuringReloads) {
  TempDir dir;
  const std::string path = dir.file("policy.json");
  replace(path, policy_text("forward-from-prev"));
  PolicyStore store(path);
  ASSERT_NE(store.current(), nullptr);

  constexpr int kReaders = 4;
  constexpr int kDecisions = 10000;
  std::atomic<bool> go{false};
  std::atomic<int> bad{0};
  std::atomic<int> done{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < kReaders; ++t) {
    readers.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      for (int i = 0; i < kDecisions; ++i) {
        const policy::Decision d = store.decide(policy::Direction::kIngress, shard_id(0), policy::kForwardMethod);
        if (!d.allow || (d.rule != "forward-from-prev" && d.rule != "forward-b")) ++bad;
        if (i % 64 == 0) {
          const std::shared_ptr<const policy::Policy> p = store.current();
          if (!p || p->ingress().empty()) ++bad;
        }
      }
      ++done;
    });
  }

  go = true;
  int ok = 0;
  for (int i = 0; i < 50; ++i) {
    if (i % 3 == 2) {
      replace(path, "{ broken");
      EXPECT_FALSE(store.reload().ok);
    } else {
      replace(path, policy_text(i % 2 == 0 ? "forward-b" : "forward-from-prev", i % 2 == 0));
      const ReloadResult r = store.reload();
      EXPECT_TRUE(r.ok) << r.error;
      ++ok;
    }
  }
  for (std::thread& t : readers) t.join();

  EXPECT_EQ(done.load(), kReaders);
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(store.generation(), static_cast<uint64_t>(1 + ok));
  EXPECT_EQ(store.reloads_ok(), static_cast<uint64_t>(1 + ok));
  EXPECT_EQ(store.reload_errors(), static_cast<uint64_t>(50 - ok));
}

}  // namespace
}  // namespace shardguard::sidecar
