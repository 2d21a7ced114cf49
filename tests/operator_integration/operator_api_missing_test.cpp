// The shardguard-operator process against servers that lack an API it needs
// (issue 14 item 6). The operator must say so: an error-level log line naming the
// resource, shardguard_operator_api_missing{resource} at 1, /readyz 503 with a reason
// naming it; with --leader-elect the 404 Lease create is retried with backoff, not
// every retry period forever. And it recovers without a restart when the API appears.
//
// RealApiServer.*: the real Kubernetes API server of the ctest fixture `realapi`
// (tests/realapi), which serves the CRD but no core kinds: Pods, Secrets, ConfigMaps,
// Services and Leases all answer 404 there, exactly as a cluster without them would.
// TestApiServer.*: the test API server (tests/apiserver) with injected 404s that end,
// for the recovery, which the real server cannot show (it never gains core kinds).
#include <gtest/gtest.h>
#include "shardguard/common/httplib.h"
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "apiserver/kube_apiserver.h"
#include "shardguard/common/jobspec.h"
#include "support/operator_process.h"
#include "support/realapi.h"
#include "support/wait.h"

namespace shardguard {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::KubeApiServer;
using testsupport::eventually;
using testsupport::OperatorProcess;
using testsupport::RealApi;
using namespace std::chrono_literals;

constexpr const char* kNs = "ml";
const std::vector<std::string> kCoreNeeded = {"pods", "secrets", "configmaps", "services"};
constexpr const char* kLeases = "leases.coordination.k8s.io";
constexpr const char* kJobs = "shardedtrainingjobs.shardguard.io";

// The operator's JSON log lines.
std::vector<json> log_lines(const OperatorProcess& op) {
  std::vector<json> out;
  std::istringstream in(op.log());
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (j.is_object()) out.push_back(std::move(j));
  }
  return out;
}

// The health port from the "starting" line.
int health_port(const OperatorProcess& op) {
  for (const auto& j : log_lines(op)) {
    if (j.value("msg", "") == "starting" && j.contains("health_port")) return j["health_port"].get<int>();
  }
  return 0;
}

struct Answer {
  int status = 0;
  std::string body;
};
Answer http_get(int port, const std::string& path) {
  httplib::Client cli("127.0.0.1", port);
  cli.set_connection_timeout(2s);
  cli.set_read_timeout(2s);
  auto res = cli.Get(path);
  return res ? Answer{res->status, res->body} : Answer{};
}

// An error-level line saying that `resource` is not served.
bool logged_missing_at_error(const OperatorProcess& op, const std::string& resource) {
  for (const auto& j : log_lines(op)) {
    if (j.value("level", "") == "error" && j.value("resource", "") == resource &&
        j.value("msg", "").find("does not serve") != std::string::npos) {
      return true;
    }
  }
  return false;
}

std::string metric_labels(const std::string& resource) { return "resource=\"" + resource + "\""; }

fs::path test_dir(const std::string& suite) {
  const fs::path dir = fs::temp_directory_path() /
                       ("shardguard-" + suite + "-" + std::to_string(getpid()) + "-" +
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// ---- against the real API server (no core kinds) ------------------------------------

class RealApiServer : public testsupport::RealApiTest {
 protected:
  void TearDown() override {
    op_.reset();
    RealApiTest::TearDown();
  }
  OperatorProcess& start(std::vector<std::string> extra) {
    op_ = std::make_unique<OperatorProcess>(SHARDGUARD_BIN_DIR, api_.kubeconfig, dir_ + "/operator.log", extra);
    return *op_;
  }

  std::unique_ptr<OperatorProcess> op_;
};

TEST_F(RealApiServer, OperatorWithoutCoreApisLogsThemShowsThemAndIsNotReady) {
  const auto t0 = std::chrono::steady_clock::now();
  OperatorProcess& op = start({});
  const int hp = health_port(op);
  ASSERT_GT(hp, 0) << op.log();
  for (const auto& r : kCoreNeeded) {
    EXPECT_TRUE(eventually([&] { return op.sample("shardguard_operator_api_missing", metric_labels(r)) == 1.0; }, 20s))
        << r << "\n" << op.metrics();
    // The gauge is set before the line is logged (outside the lock): wait for both.
    EXPECT_TRUE(eventually([&] { return logged_missing_at_error(op, r); }, 20s)) << r << "\n" << op.log();
  }
  // The CRD is served: its resource is needed and not missing.
  EXPECT_EQ(op.sample("shardguard_operator_api_missing", metric_labels(kJobs)), 0.0) << op.metrics();
  // Not leader-electing: Leases are not needed, so not reported.
  EXPECT_FALSE(op.sample("shardguard_operator_api_missing", metric_labels(kLeases))) << op.metrics();

  // /readyz follows within a moment (the operator's main loop sets it).
  Answer ready;
  EXPECT_TRUE(eventually([&] {
    ready = http_get(hp, "/readyz");
    for (const auto& r : kCoreNeeded) {
      if (ready.body.find(r) == std::string::npos) return false;
    }
    return ready.status == 503;
  }, 10s)) << ready.status << " " << ready.body;
  EXPECT_EQ(http_get(hp, "/healthz").status, 200);  // alive: waiting for the API, not broken
  // It waits (it does not exit, nor report itself ready) and reconciles nothing.
  EXPECT_TRUE(kill(op.pid(), 0) == 0);
  EXPECT_EQ(op.sample("controller_runtime_reconcile_total", "result=\"success\""), 0.0);
  const ExitStatus st = op.stop();
  EXPECT_TRUE(st.exited && st.code == 0) << op.log();
  std::printf("without --leader-elect: 4 missing APIs reported, stopped cleanly, in %.2f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

TEST_F(RealApiServer, OperatorWithLeaderElectionBacksOffTheMissingLeaseApiAndIsNotReady) {
  OperatorProcess& op = start({"--leader-elect", "--leader-election-namespace", kNs, "--lease-duration", "3",
                               "--renew-deadline", "2", "--retry-period", "0.2"});
  const int hp = health_port(op);
  ASSERT_GT(hp, 0) << op.log();
  ASSERT_TRUE(eventually([&] { return op.sample("shardguard_operator_api_missing", metric_labels(kLeases)) == 1.0; },
                         20s))
      << op.metrics() << op.log();
  EXPECT_TRUE(eventually([&] { return logged_missing_at_error(op, kLeases); }, 20s)) << op.log();
  EXPECT_TRUE(eventually([&] {
    const Answer a = http_get(hp, "/readyz");
    return a.status == 503 && a.body.find(kLeases) != std::string::npos;
  }, 10s)) << http_get(hp, "/readyz").body;
  EXPECT_EQ(op.sample("leader_election_master_status"), 0.0);

  // Tries are spaced 0.2, 0.4, 0.8, 1.6 s, ...: wait until the 4th retry is announced,
  // then every announced spacing must be double the one before (a fixed 0.2 s retry,
  // as before, would show 0.2 s each time and ask the server 5 times a second forever).
  std::vector<int64_t> spacing;
  auto read_spacing = [&] {
    spacing.clear();
    for (const auto& j : log_lines(op)) {
      if (j.value("resource", "") == kLeases && j.contains("retry_in_ms")) spacing.push_back(j["retry_in_ms"]);
    }
    return spacing.size() >= 4;
  };
  ASSERT_TRUE(eventually(read_spacing, 20s)) << op.log();
  EXPECT_EQ(spacing[0], 200);
  for (size_t i = 1; i < spacing.size(); ++i) EXPECT_EQ(spacing[i], 2 * spacing[i - 1]) << "try " << i;
  // Still standing by, not leading, not ready.
  EXPECT_EQ(http_get(hp, "/readyz").status, 503);
  EXPECT_EQ(op.sample("leader_election_master_status"), 0.0);
  const ExitStatus st = op.stop();
  EXPECT_TRUE(st.exited && st.code == 0) << op.log();
}

// ---- against the test API server: the API appears later -----------------------------

class TestApiServer : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test_dir("apirecover");
    kubeconfig_ = api_.write_kubeconfig((dir_ / "kubeconfig").string(), kNs);
    std::ifstream in(std::string(SHARDGUARD_SOURCE_DIR) + "/crds/shardedtrainingjobs.shardguard.io.yaml");
    std::stringstream ss;
    ss << in.rdbuf();
    api_.create("apiextensions.k8s.io", "v1", "customresourcedefinitions", "", yaml_to_json(ss.str()));
    api_.create("", "v1", "namespaces", "", {{"metadata", {{"name", kNs}}}});
  }
  void TearDown() override {
    op_.reset();
    if (!HasFailure()) fs::remove_all(dir_);
  }
  OperatorProcess& start(std::vector<std::string> extra) {
    op_ = std::make_unique<OperatorProcess>(SHARDGUARD_BIN_DIR, kubeconfig_, (dir_ / "operator.log").string(),
                                            extra);
    return *op_;
  }
  void create_job(const std::string& name) {
    api_.create("shardguard.io", "v1alpha1", "shardedtrainingjobs", kNs,
                yaml_to_json("apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\n"
                             "metadata: {name: " + name + ", namespace: ml}\n"
                             "spec:\n  model: {architecture: vit}\n  sharding: {shards: 4}\n  protection: {maxExposure: 0.5}\n"
                             "  template: {image: shardd:test}\n  sidecar: {image: sidecar:test}\n"));
  }
  size_t pods_of(const std::string& job) const {
    return api_.list("", "v1", "pods", kNs, "shardguard.io/job=" + job).size();
  }
  // Waits for "missing" (gauge 1, /readyz 503 naming it), then for recovery (gauge 0,
  // /readyz 200, the "again" log line). The faults end after a few tries spaced by
  // backoff: several seconds, in which the missing state is seen.
  void expect_missing_then_recovered(OperatorProcess& op, const std::string& resource) {
    const int hp = health_port(op);
    ASSERT_GT(hp, 0) << op.log();
    EXPECT_TRUE(eventually([&] {
      const Answer a = http_get(hp, "/readyz");
      return op.sample("shardguard_operator_api_missing", metric_labels(resource)) == 1.0 && a.status == 503 &&
             a.body.find(resource) != std::string::npos;
    }, 20s)) << op.metrics() << op.log();
    EXPECT_TRUE(eventually([&] { return logged_missing_at_error(op, resource); }, 20s)) << op.log();
    EXPECT_TRUE(eventually([&] {
      return op.sample("shardguard_operator_api_missing", metric_labels(resource)) == 0.0 &&
             http_get(hp, "/readyz").status == 200;
    }, 30s)) << op.metrics() << op.log();
    bool again = false;
    for (const auto& j : log_lines(op)) {
      again = again || (j.value("msg", "").find("serves the resource again") != std::string::npos &&
                        j.value("resource", "") == resource);
    }
    EXPECT_TRUE(again) << op.log();
  }

  KubeApiServer api_;
  fs::path dir_;
  std::string kubeconfig_;
  std::unique_ptr<OperatorProcess> op_;
};

TEST_F(TestApiServer, OperatorRecoversWithoutARestartWhenPodsAppear) {
  // Five lists of Pods answer 404 (spaced 0.2..3.2 s by the informer's backoff), then
  // Pods are served.
  api_.fail_next(5, 404, "GET", "/pods");
  create_job("late");
  OperatorProcess& op = start({});
  expect_missing_then_recovered(op, "pods");
  // Working now: the job gets its pods, from the same process.
  EXPECT_TRUE(eventually([&] { return pods_of("late") == 4; }, 30s)) << op.log();
}

TEST_F(TestApiServer, LeaderRecoversWithoutARestartWhenLeasesAppear) {
  // Five Lease creates answer 404 (spaced 0.2..3.2 s by the elector's backoff).
  api_.fail_next(5, 404, "POST", "/leases");
  create_job("led");
  OperatorProcess& op = start({"--leader-elect", "--leader-election-namespace", kNs, "--lease-duration", "3",
                               "--renew-deadline", "2", "--retry-period", "0.2"});
  expect_missing_then_recovered(op, kLeases);
  EXPECT_TRUE(eventually([&] { return op.sample("leader_election_master_status") == 1.0; }, 20s)) << op.log();
  EXPECT_TRUE(eventually([&] { return pods_of("led") == 4; }, 30s)) << op.log();
  int creates = 0;
  for (const auto& r : api_.requests()) creates += r.verb == "create" && r.resource == "leases";
  EXPECT_EQ(creates, 6);  // 5 refused, then the one that made the Lease
}

}  // namespace
}  // namespace shardguard
