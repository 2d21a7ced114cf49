// Issue 3's integration point, with real processes: three shardd stages whose
// stage-to-stage traffic crosses two shard-sidecar processes per hop (mTLS between
// the sidecars, shardd on loopback), compared with the same job run directly.
#include <gtest/gtest.h>

#include "shardguard/common/httplib.h"

#include <cstdlib>
#include <regex>
#include <sstream>

#include "integration/pipeline_fixture.h"
#include "shardguard/common/pki.h"
#include "shardguard/sidecar/audit.h"
#include "shardguard/policy/policy.h"
#include "shardguard/common/prom_text.h"
#include "support/grpc_echo.h"

namespace shardguard {
namespace {

const std::string kTd = "shardguard.local";
const std::string kNs = "default";
const std::string kJobName = "it-mlp";  // job_json's metadata.name

// Sum of the samples of `name` in a Prometheus text page whose labels include every
// pair of `want`.
double scrape_sum(const std::string& page, const std::string& name, const std::map<std::string, std::string>& want) {
  return prometheus_sum(page, name, want);
}

class SidecarPipelineTest : public PipelineFixture {
 protected:
  void TearDown() override {
    sidecars_.clear();
    PipelineFixture::TearDown();
  }

  std::string shard_id(int i) const { return spiffe_id_for_shard(kTd, kNs, kJobName, i); }

  // Issues the PKI, writes each pod's files and starts its sidecar.
  void start_sidecars(int n) {
    const CaBundle ca = create_ca("it-ca", std::chrono::hours(1));
    for (int i = 0; i < n; ++i) {
      inbound_.push_back(pick_free_port());
      outbound_.push_back(pick_free_port());
      metrics_.push_back(pick_free_port());
    }
    for (int i = 0; i < n; ++i) {
      const std::string pod = dir_ + "/pod-" + std::to_string(i);
      make_dirs(pod);
      const Leaf leaf = issue_leaf(ca, shard_id(i), std::chrono::hours(1));
      leaves_.push_back(leaf);
      write_file_atomic(pod + "/cert.pem", leaf.cert_pem);
      write_file_atomic(pod + "/key.pem", leaf.key_pem, 0600);
      write_file_atomic(pod + "/ca.pem", ca.cert_pem);
      write_file_atomic(pod + "/policy.json",
                        policy::to_json(policy::pipeline_policy(kTd, kNs, kJobName, i, n, {})));
      SpawnOptions o;
      o.argv = {kBin + "/shard-sidecar", "--inbound", "127.0.0.1:" + std::to_string(inbound_[i]), "--outbound",
                "127.0.0.1:" + std::to_string(outbound_[i]), "--upstream", "127.0.0.1:" + std::to_string(ports_[i]),
                "--cert", pod + "/cert.pem", "--key", pod + "/key.pem", "--ca", pod + "/ca.pem", "--policy",
                pod + "/policy.json", "--metrics", "127.0.0.1:" + std::to_string(metrics_[i]), "--audit-log",
                pod + "/audit.jsonl"};
      // SHARDGUARD_SIDECAR_DATA_PLANE=h2 runs the sidecars on the HTTP/2 relay (issue 17).
      if (const char* plane = std::getenv("SHARDGUARD_SIDECAR_DATA_PLANE"); plane && *plane) {
        o.argv.push_back("--data-plane");
        o.argv.push_back(plane);
      }
      for (int j : {i - 1, i + 1}) {
        if (j < 0 || j >= n) continue;
        o.argv.push_back("--peer");
        o.argv.push_back(shard_id(j) + "=127.0.0.1:" + std::to_string(inbound_[j]));
      }
      o.log_file = pod + "/sidecar.log";
      sidecars_[i] = std::make_unique<Process>(o);
      // shardd reaches both neighbours through its own sidecar's outbound listener.
      prev_override_[i] = next_override_[i] = "127.0.0.1:" + std::to_string(outbound_[i]);
    }
    for (int i = 0; i < n; ++i) {
      httplib::Client c("127.0.0.1", metrics_[i]);
      c.set_connection_timeout(1);
      bool ready = false;
      for (int tries = 0; tries < 300 && !ready; ++tries) {  // bounded: 30 s
        auto r = c.Get("/readyz");
        ready = r && r->status == 200;
        if (!ready) std::this_thread::sleep_for(100ms);
      }
      ASSERT_TRUE(ready) << "sidecar " << i << " never became ready; see " << dir_ << "/pod-" << i << "/sidecar.log";
    }
  }

  std::string scrape(int i) {
    httplib::Client c("127.0.0.1", metrics_[i]);
    auto r = c.Get("/metrics");
    return r && r->status == 200 ? r->body : std::string();
  }

  // The "pipeline traffic" line of stage i (reads what is left of its stderr).
  nlohmann::json traffic_line(int i) {
    read_until(i, [](const nlohmann::json&) { return false; });
    nlohmann::json found;
    for (const auto& j : all_lines_[i]) {
      if (j.value("msg", "") == "pipeline traffic") found = j;
    }
    return found;
  }

  std::vector<int> inbound_, outbound_, metrics_;
  std::vector<Leaf> leaves_;
  std::map<int, std::unique_ptr<Process>> sidecars_;
};

TEST_F(SidecarPipelineTest, TrainsThroughSidecarsWithTheSameLossesAndEqualByteCounts) {
  constexpr int n = 3;
  const std::string job = write_job(job_json(n));
  for (int i = 0; i < n; ++i) ports_.push_back(pick_free_port());

  // Reference: the same job with the stages talking directly.
  for (int i = 0; i < n; ++i) start_stage(job, dir_ + "/direct", i, n);
  const Outcome direct = finish(n, Outcome{});
  ASSERT_EQ(direct.losses.size(), 48u);

  // Through the sidecars.
  start_sidecars(n);
  for (int i = 0; i < n; ++i) start_stage(job, dir_ + "/sidecars", i, n);
  const Outcome through = finish(n, Outcome{});
  ASSERT_EQ(through.losses.size(), direct.losses.size());
  for (const auto& [step, loss] : direct.losses) {
    EXPECT_NEAR(through.losses.at(step), loss, 1e-6) << "step " << step;
  }
  EXPECT_EQ(through.correct, direct.correct);

  // Every byte shardd sent or received crossed its sidecar: the counters agree
  // exactly, stage by stage, and each hop shows on both of its sidecars.
  for (int i = 0; i < n; ++i) {
    SCOPED_TRACE("stage " + std::to_string(i));
    const auto fin = traffic_line(i);
    ASSERT_TRUE(fin.contains("message_bytes_sent")) << fin.dump();
    const std::string page = scrape(i);
    ASSERT_FALSE(page.empty());
    const double sent = scrape_sum(page, "shardguard_proxy_bytes_total", {{"direction", "sent"}});
    const double received = scrape_sum(page, "shardguard_proxy_bytes_total", {{"direction", "received"}});
    EXPECT_GT(sent, 100000);
    EXPECT_EQ(sent, fin.at("message_bytes_sent").get<double>());
    EXPECT_EQ(received, fin.at("message_bytes_received").get<double>());
    EXPECT_EQ(scrape_sum(page, "shardguard_authz_decisions_total", {{"decision", "deny"}}), 0);
    if (i + 1 < n) {
      // What i+1 received from i, i sent to i+1. (Not always equal: a message that
      // crossed the mTLS hop while stage i+1's shardd was not listening yet is
      // counted as sent by i and retried by shardd.)
      const std::string next_page = scrape(i + 1);
      const double hop_sent =
          scrape_sum(page, "shardguard_proxy_bytes_total", {{"direction", "sent"}, {"peer", shard_id(i + 1)}});
      const double hop_received =
          scrape_sum(next_page, "shardguard_proxy_bytes_total", {{"direction", "received"}, {"peer", shard_id(i)}});
      EXPECT_GT(hop_received, 100000);
      EXPECT_GE(hop_sent, hop_received);
      EXPECT_LT(hop_sent - hop_received, 1000);
    }
  }

  // A valid certificate of a non-neighbour shard (stage 2 is not next to stage 0)
  // is refused by stage 0's sidecar and counted; stage 0's shardd is gone, so any
  // call that got through would fail differently (UNAVAILABLE).
  auto channel = testsupport::tls_channel("127.0.0.1:" + std::to_string(inbound_[0]), leaves_[2].cert_pem,
                                          leaves_[2].key_pem);
  const auto r = testsupport::unary_call(channel, policy::kBackwardMethod, "not a frame", {}, 10s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << r.status.error_message();
  const std::string page0 = scrape(0);
  EXPECT_EQ(scrape_sum(page0, "shardguard_authz_decisions_total",
                       {{"decision", "deny"}, {"rule", "default-deny"}, {"peer", shard_id(2)}}),
            1);
  const auto audit = sidecar::verify_audit_log(dir_ + "/pod-0/audit.jsonl");
  EXPECT_TRUE(audit.ok) << audit.reason;
  EXPECT_EQ(audit.lines, 1u);

  // The sidecars stop cleanly on SIGTERM.
  for (auto& [i, p] : sidecars_) {
    const auto st = p->terminate(10s);
    EXPECT_TRUE(st.exited && st.code == 0) << "sidecar " << i << ": " << st.str();
  }
}

}  // namespace
}  // namespace shardguard
