// LeaderElector against the test API server: one leader of two, takeover after a
// lease expires (by the follower's own clock) and at once after a release, loss on
// failed renewals.
#include "shardguard/kube/leader.h"

#include <regex>
#include <thread>

#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include "kube_apiserver.h"
#include "shardguard/common/time.h"
#include "support/wait.h"

namespace shardguard::kube {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using testing::KubeApiServer;
using testsupport::eventually;
using testsupport::registry_sum;
using Clock = std::chrono::steady_clock;

// One candidate: its own Client and thread, counting its callbacks.
class Candidate {
 public:
  Candidate(const KubeApiServer& srv, const std::string& id, LeaderElectionConfig base,
            prometheus::Registry* reg = nullptr)
      : client_(config_of(srv)) {
    base.identity = id;
    elector_ = std::make_unique<LeaderElector>(client_, base, [this] { started_++; }, [this] { stopped_++; }, reg);
  }
  ~Candidate() { stop(); }
  void start() {
    thread_ = std::thread([this] { elector_->run(stop_); });
  }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  bool leader() const { return elector_->is_leader(); }
  int started() const { return started_.load(); }
  int stopped() const { return stopped_.load(); }

 private:
  static Config config_of(const KubeApiServer& srv) {
    Config c;
    c.server = srv.url();
    c.ca_pem = srv.ca_pem();
    c.token = srv.token();
    return c;
  }
  Client client_;
  std::unique_ptr<LeaderElector> elector_;
  std::atomic<bool> stop_{false};
  std::atomic<int> started_{0}, stopped_{0};
  std::thread thread_;
};

LeaderElectionConfig fast_config() {
  LeaderElectionConfig c;
  c.ns = "default";
  c.name = "shardguard-operator";
  c.lease_duration = 3000ms;
  c.renew_deadline = 2000ms;
  c.retry_period = 100ms;
  return c;
}

json lease(const KubeApiServer& srv) {
  const auto l = srv.get("coordination.k8s.io", "v1", "leases", "default", "shardguard-operator");
  return l ? (*l)["spec"] : json();
}

// A Lease's MicroTime is common/time.h's RFC 3339 with six fraction digits.
TEST(LeaderTest, MicroTimeFormat) {
  const auto t = std::chrono::system_clock::time_point(std::chrono::microseconds(1795664400123456LL));
  EXPECT_EQ(format_rfc3339(t, 6), "2026-11-26T03:40:00.123456Z");
}

TEST(LeaderTest, OneOfTwoLeadsAndTheLeaseSaysWho) {
  KubeApiServer srv;
  prometheus::Registry reg;
  Candidate a(srv, "a", fast_config(), &reg);
  Candidate b(srv, "b", fast_config());
  a.start();
  b.start();
  ASSERT_TRUE(eventually([&] { return a.leader() || b.leader(); }));
  const bool a_leads = a.leader();
  // Over several renewals, exactly one leads.
  const auto until = Clock::now() + 600ms;
  while (Clock::now() < until) {
    ASSERT_NE(a.leader(), b.leader());
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(a.leader(), a_leads);
  const json spec = lease(srv);
  EXPECT_EQ(spec["holderIdentity"], a_leads ? "a" : "b");
  EXPECT_EQ(spec["leaseDurationSeconds"], 3);
  const std::regex micro(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z)");
  EXPECT_TRUE(std::regex_match(spec["renewTime"].get<std::string>(), micro)) << spec.dump();
  EXPECT_TRUE(std::regex_match(spec["acquireTime"].get<std::string>(), micro)) << spec.dump();
  EXPECT_EQ(registry_sum(reg, "leader_election_master_status", {{"name", "shardguard-operator"}}), a_leads ? 1 : 0);
  EXPECT_EQ((a_leads ? a : b).started(), 1);
  EXPECT_EQ((a_leads ? b : a).started(), 0);
}

// The lease lasts 120 s here, so b can only lead before it expires if a's release
// handed it over: the event shows "at once", not a stopwatch.
TEST(LeaderTest, ReleaseOnStopHandsOverAtOnce) {
  KubeApiServer srv;
  LeaderElectionConfig config = fast_config();
  config.lease_duration = 120s;
  config.renew_deadline = 60s;
  Candidate a(srv, "a", config);
  a.start();
  ASSERT_TRUE(eventually([&] { return a.leader(); }));
  Candidate b(srv, "b", config);
  b.start();
  ASSERT_TRUE(eventually([&] { return lease(srv)["holderIdentity"] == "a"; }));
  a.stop();
  EXPECT_EQ(a.stopped(), 1);
  EXPECT_FALSE(a.leader());
  ASSERT_TRUE(eventually([&] { return b.leader(); }, 60s));  // half the lease
  EXPECT_EQ(lease(srv)["holderIdentity"], "b");
  EXPECT_GE(lease(srv)["leaseTransitions"].get<int>(), 1);
}

TEST(LeaderTest, TakesOverAnAbandonedLeaseAfterLeaseDurationByItsOwnClock) {
  KubeApiServer srv;
  // A leader that crashed: its lease stays, never renewed again. Its renewTime is far in
  // the future, which must not matter: only the local time since the last change does.
  srv.create("coordination.k8s.io", "v1", "leases", "default",
             {{"metadata", {{"name", "shardguard-operator"}}},
              {"spec", {{"holderIdentity", "ghost"}, {"leaseDurationSeconds", 3},
                        {"acquireTime", "2099-01-01T00:00:00.000000Z"},
                        {"renewTime", "2099-01-01T00:00:00.000000Z"}, {"leaseTransitions", 4}}}});
  Candidate b(srv, "b", fast_config());
  const auto t0 = Clock::now();
  b.start();
  // Not before the lease duration by b's own clock (a lower bound, which load cannot
  // break); when after it is up to the machine, so the limit is generous.
  ASSERT_TRUE(eventually([&] { return b.leader(); }, 60s));
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 2900ms);
  const json spec = lease(srv);
  EXPECT_EQ(spec["holderIdentity"], "b");
  EXPECT_EQ(spec["leaseTransitions"], 5);
}

TEST(LeaderTest, FollowerTakesOverWhenTheLeaderStopsWithoutRelease) {
  KubeApiServer srv;
  Candidate a(srv, "a", fast_config());
  a.start();
  ASSERT_TRUE(eventually([&] { return a.leader(); }));
  Candidate b(srv, "b", fast_config());
  b.start();
  ASSERT_TRUE(eventually([&] { return lease(srv)["holderIdentity"] == "a"; }));
  // The leader's last renewals and its release fail: it goes away still holding the lease.
  srv.fail_next(3, 503, "PUT", "/leases/");
  const auto t0 = Clock::now();
  a.stop();
  EXPECT_FALSE(a.leader());
  // Not at once: the lease had to expire (a lower bound, which load cannot break). The
  // limit on when is generous: only that b takes over is the behaviour.
  ASSERT_TRUE(eventually([&] { return b.leader(); }, 60s));
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 1500ms);
}

TEST(LeaderTest, LosesLeadershipWhenRenewalsFailPastTheDeadlineThenReacquires) {
  KubeApiServer srv;
  Candidate a(srv, "a", fast_config());
  a.start();
  ASSERT_TRUE(eventually([&] { return a.leader(); }));
  // 2 s of renew deadline at 100 ms retries: 30 failed PUTs outlast it.
  srv.fail_next(30, 500, "PUT", "/leases/");
  ASSERT_TRUE(eventually([&] { return a.stopped() == 1; }, 10s));
  EXPECT_TRUE(eventually([&] { return a.leader() && a.started() == 2; }, 10s));
}

}  // namespace
}  // namespace shardguard::kube
