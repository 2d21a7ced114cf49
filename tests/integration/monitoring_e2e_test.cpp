// Monitoring end to end (issue 6): real Prometheus servers scrape the real processes,
// and every expression of the chart's dashboards and alert rules is run against them.
//
//   shard side     `shardctl run --prometheus` of a small job: every shardd and sidecar,
//                  scraped with the PodMonitor's labels. During the run the test makes
//                  the events some panels exist for: a garbage (non-TLS) connection to
//                  a sidecar, a call from a principal the policy refuses, and a
//                  parameter export by the job's export principal, which the rendered
//                  sidecar's exposure ledger records.
//   operator side  shardguard-operator against the test API server with a job whose
//                  pods a careless scheduler put three stages on one node (exposure
//                  above maxExposure), scraped by a second Prometheus as the
//                  ServiceMonitor scrapes it.
//
// Every dashboard query returns data from one of the two, and so does the
// ShardExposureAboveLimit expression; every metric any expression names is one a
// live /metrics page served (Prometheus' label values of __name__), not a list.
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>

#include <grpcpp/grpcpp.h>
#include "shardguard/common/httplib.h"
#include <nlohmann/json.hpp>

#include "apiserver/kube_apiserver.h"
#include "integration/pipeline_fixture.h"
#include "integration/prom_server.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"
#include "shardguard/v1/pipeline.grpc.pb.h"
#include "support/export_client.h"
#include "support/grpc_echo.h"
#include "support/operator_process.h"
#include "support/wait.h"

namespace shardguard {
namespace {

using nlohmann::json;
using testsupport::eventually;
using testsupport::PromServer;

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

class MonitoringE2ETest : public PipelineFixture {};

TEST_F(MonitoringE2ETest, EveryDashboardQueryAndTheExposureAlertReturnDataFromRealPrometheus) {
  const std::string node = SHARDGUARD_NODE;
  if (node.empty() || !fs::exists(std::string(SHARDGUARD_SOURCE_DIR) + "/tools/node_modules/yaml")) {
    FAIL() << "node or tools/node_modules missing: run make deps";
  }
  ASSERT_TRUE(fs::exists("/usr/bin/prometheus")) << "prometheus missing (Debian package prometheus): run make deps";

  // The expressions, from the chart's own files.
  const std::string queries_file = dir_ + "/queries.json";
  SpawnOptions qo;
  qo.argv = {node, std::string(SHARDGUARD_SOURCE_DIR) + "/tests/chart/check_chart.mjs", "queries",
             SHARDGUARD_SOURCE_DIR, queries_file};
  qo.log_file = dir_ + "/queries.log";
  ASSERT_EQ(Process(qo).wait().code, 0) << read_file(qo.log_file);
  const json queries = json::parse(read_file(queries_file));
  ASSERT_GT(queries.size(), 40u);

  // ---- shard side: shardctl run --prometheus, with a probe and a refused call ----
  const double t0 = now_s() - 60;
  auto spec = job_json(3);
  spec["metadata"]["namespace"] = "ml";
  spec["spec"]["protection"]["maxExposure"] = 0.9;
  spec["spec"]["training"]["epochs"] = 3;
  // Export principals, with a budget of 64 KiB per shard (--export-budget): at
  // maxExposure 0.9 the first may export stage 0 (0.85), the second stages 1-2.
  const std::string exporter = spiffe_id_for_exporter("shardguard.local", "ml", "it-mlp");
  spec["spec"]["protection"]["export"] = {
      {"allowed", true}, {"principals", {exporter, "spiffe://shardguard.local/ns/ml/sa/registry"}}};
  const std::string job = write_job(spec);
  const std::string work = dir_ + "/work";
  SpawnOptions ro;
  ro.argv = {kBin + "/shardctl", "run",     job, "--workdir",      work,   "--device", "cpu",
             "--threads",          "1",       "--prometheus", "--export-budget", "65536"};
  ro.log_file = dir_ + "/run.out";
  Process run(ro);
  // Sidecar 0's mTLS port from the header; wait until training is under way.
  int inbound0 = 0;
  ASSERT_TRUE(eventually(
      [&] {
        std::smatch m;
        const std::string out = read_file(ro.log_file);
        if (std::regex_search(out, m, std::regex("shard 0: .* sidecar mTLS :(\\d+)"))) inbound0 = std::stoi(m[1]);
        return inbound0 > 0 && out.find("step ") != std::string::npos && out.find("epoch ") != std::string::npos;
      },
      std::chrono::seconds(120)))
      << read_file(ro.log_file);
  // A probe that does not speak TLS (shardguard_tls_handshake_failures_total).
  {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(inbound0));
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    const std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    ASSERT_GT(::write(fd, junk.data(), junk.size()), 0);
    char buf[64];
    (void)::read(fd, buf, sizeof buf);  // the sidecar closes it
    ::close(fd);
  }
  // Shard 2's principal, with a certificate of the job's own CA, calling stage 0's
  // Forward: not its neighbour, so the policy refuses it (authz deny, audit line).
  // Twice, with a scrape between: a counter series is born at 1 with its first
  // event, so increase() only sees the second.
  const CaBundle ca{read_file(work + "/pki/ca.crt"), read_file(work + "/pki/ca.key")};
  const Leaf leaf = issue_leaf(ca, spiffe_id_for_shard("shardguard.local", "ml", "it-mlp", 2), std::chrono::hours(1));
  auto refused_call = [&] {
    auto stub = v1::Pipeline::NewStub(
        testsupport::tls_channel("127.0.0.1:" + std::to_string(inbound0), leaf.cert_pem, leaf.key_pem));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ForwardRequest req;
    v1::ForwardReply reply;
    const grpc::Status st = stub->Forward(&ctx, req, &reply);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED) << st.error_message();
  };
  refused_call();
  {
    std::smatch m;
    const std::string out = read_file(ro.log_file);
    ASSERT_TRUE(std::regex_search(out, m, std::regex("prometheus http://127\\.0\\.0\\.1:(\\d+)"))) << out;
    const int port = std::stoi(m[1]);
    EXPECT_TRUE(eventually(
        [&] {
          httplib::Client c("127.0.0.1", port);
          auto r = c.Get("/api/v1/query",
                         httplib::Params{{"query", "shardguard_authz_decisions_total{decision=\"deny\"}"}},
                         httplib::Headers{});
          const json j = r ? json::parse(r->body, nullptr, false) : json();
          return j.is_object() && j.contains("data") && !j["data"]["result"].empty();
        },
        std::chrono::seconds(30)))
        << "shardctl's Prometheus never saw the denial";
  }
  refused_call();

  // The export principal reads bytes [0, 4096) of shard 0 through its sidecar, once
  // shardd has a checkpoint to serve (UNAVAILABLE before). The sidecar's ledger
  // records them, so shard 0 counts 4096 bytes exposed to it; then [4096, 65537),
  // within the 64 KiB budget on its own but not with the 4 KiB already read, is
  // refused before shardd sees it.
  const Leaf exporter_leaf = issue_leaf(ca, exporter, std::chrono::hours(1));
  auto export_call = [&](uint64_t offset, uint64_t length, uint64_t* got) {
    std::string bytes;
    const grpc::Status st = testsupport::export_pull(
        "127.0.0.1:" + std::to_string(inbound0), exporter_leaf.cert_pem, exporter_leaf.key_pem, offset, length, &bytes,
        [&](const v1::ExportChunk& c) {
          EXPECT_GE(c.offset(), offset);
          EXPECT_LE(c.offset() + c.data().size(), offset + length);
        });
    *got = bytes.size();
    return st;
  };
  uint64_t exported = 0;
  grpc::Status export_status;
  EXPECT_TRUE(eventually(
      [&] {
        export_status = export_call(0, 4096, &exported);
        return export_status.error_code() != grpc::StatusCode::UNAVAILABLE;
      },
      std::chrono::seconds(60)))
      << "shard 0 never had a checkpoint to export: " << export_status.error_message();
  EXPECT_TRUE(export_status.ok()) << export_status.error_message();
  EXPECT_EQ(exported, 4096u);
  uint64_t refused_bytes = 0;
  const grpc::Status over = export_call(4096, 65537 - 4096, &refused_bytes);
  EXPECT_EQ(over.error_code(), grpc::StatusCode::PERMISSION_DENIED) << over.error_message();
  EXPECT_EQ(refused_bytes, 0u);

  const auto st = run.wait_for(std::chrono::seconds(300));
  ASSERT_TRUE(st.has_value()) << "shardctl run did not finish in 300 s";
  ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << read_file(ro.log_file);
  ASSERT_NE(read_file(ro.log_file).find("scraped 6 of 6 targets"), std::string::npos) << read_file(ro.log_file);
  const double t1 = now_s() + 5;
  PromServer shard_side(dir_, "shard-side", work + "/prometheus/data", "");
  ASSERT_TRUE(shard_side.ready()) << shard_side.log();
  // The export as the sidecar counted it, and its sealed ledger in the sidecar's own state
  // directory (its subPath of the checkpoint volume in a pod), not beside the checkpoints.
  const json exposed = shard_side.instant("max_over_time(shardguard_param_bytes_exposed_total{shard=\"0\",peer=\"" +
                                          exporter + "\"}[10m])");
  ASSERT_EQ(exposed.size(), 1u) << exposed.dump();
  EXPECT_EQ(exposed[0]["value"][1], "4096");
  EXPECT_TRUE(fs::exists(work + "/logs/sidecar-state-0/it-mlp-shard-0.ledger.json"));
  EXPECT_FALSE(fs::exists(work + "/checkpoints/it-mlp-shard-0.ledger.json"));
  // Every save of a ledger raised its sequence, which the sidecars publish for the
  // operator (which renders it as --ledger-min-sequence).
  const json seq = shard_side.instant("max(max_over_time(shardguard_ledger_sequence[10m]))");
  ASSERT_EQ(seq.size(), 1u) << seq.dump();
  EXPECT_GE(std::stod(seq[0]["value"][1].get<std::string>()), 1.0) << seq.dump();

  // ---- operator side: the operator and a Prometheus scraping it ----
  testing::KubeApiServer api;
  const std::string kubeconfig = api.write_kubeconfig(dir_ + "/kubeconfig", "ml");
  api.create("apiextensions.k8s.io", "v1", "customresourcedefinitions", "",
             yaml_to_json(read_file(std::string(SHARDGUARD_SOURCE_DIR) + "/crds/shardedtrainingjobs.shardguard.io.yaml")));
  api.create("", "v1", "namespaces", "", {{"metadata", {{"name", "ml"}}}});
  testsupport::OperatorProcess op(kBin, kubeconfig, dir_ + "/operator.log",
                                  {"--leader-elect", "--leader-election-namespace", "ml", "--resync", "1"});
  ASSERT_GT(op.metrics_port(), 0) << op.log();
  PromServer operator_side(dir_, "operator-side", dir_ + "/operator-tsdb",
                           "scrape_configs:\n  - job_name: operator\n    honor_labels: true\n    static_configs:\n"
                           "      - targets: [\"127.0.0.1:" + std::to_string(op.metrics_port()) + "\"]\n"
                           "        labels: {namespace: shardguard-system, job: shardguard-operator}\n");
  ASSERT_TRUE(operator_side.ready()) << operator_side.log();
  // A ViT in 4 stages (shares about 0.02 / 0.33 / 0.33 / 0.33), maxExposure 0.5.
  api.create("shardguard.io", "v1alpha1", "shardedtrainingjobs", "ml",
             yaml_to_json("apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\n"
                          "metadata: {name: crowded, namespace: ml}\n"
                          "spec:\n  model: {architecture: vit}\n  sharding: {shards: 4}\n"
                          "  protection: {maxExposure: 0.5}\n"
                          "  template: {image: shardd:test}\n  sidecar: {image: sidecar:test}\n"));
  // The scheduler ignored the anti-affinity: stages 0, 1 and 2 on node-a.
  for (int i = 0; i < 4; ++i) {
    const std::string name = "crowded-shard-" + std::to_string(i);
    ASSERT_TRUE(eventually([&] { return api.get("", "v1", "pods", "ml", name).has_value(); },
                           std::chrono::seconds(30)))
        << op.log();
    json p = *api.get("", "v1", "pods", "ml", name);
    p["spec"]["nodeName"] = i < 3 ? "node-a" : "node-b";
    p["metadata"].erase("resourceVersion");
    p = api.update("", "v1", "pods", "ml", p);
    p["status"] = {{"phase", "Running"},
                   {"podIP", "10.0.0." + std::to_string(i + 1)},
                   {"conditions", json::array({{{"type", "Ready"}, {"status", "True"}}})}};
    p["metadata"].erase("resourceVersion");
    api.update("", "v1", "pods", "ml", p, /*status=*/true);
  }
  std::string exposure_alert;
  for (const auto& q : queries) {
    if (q.value("alert", "") == "ShardExposureAboveLimit") exposure_alert = q["expr"];
  }
  ASSERT_FALSE(exposure_alert.empty());
  EXPECT_TRUE(eventually([&] { return !operator_side.instant(exposure_alert).empty(); }, std::chrono::seconds(60)))
      << "the ShardExposureAboveLimit expression returned nothing\n" << op.log();
  // rate() needs two scrapes of a series: wait until the operator's counters have them.
  EXPECT_TRUE(eventually([&] { return !operator_side.instant("rate(workqueue_adds_total[5m]) > 0").empty(); },
                         std::chrono::seconds(30)))
      << "the operator's counters were not scraped twice";
  const double t2 = now_s() + 5;

  // ---- every expression returns data from one side; every metric is a live one ----
  std::set<std::string> live = shard_side.metric_names();
  for (const auto& n : operator_side.metric_names()) live.insert(n);
  int with_data = 0;
  for (const auto& q : queries) {
    const std::string where = q["where"], expr = q["expr"];
    for (const auto& m : q["metrics"]) {
      const std::string name = m;
      const std::string base = std::regex_replace(name, std::regex("_(bucket|sum|count)$"), "");
      EXPECT_TRUE(live.count(name) || live.count(base + "_count") || name == "up")
          << where << ": metric " << name << " was on no live /metrics page";
    }
    if (!q["alert"].get<std::string>().empty() && q["alert"] != "ShardExposureAboveLimit") continue;
    std::string e1, e2;
    const bool data = !shard_side.range(expr, t0, t1, &e1).empty() || !operator_side.range(expr, t0, t2, &e2).empty();
    EXPECT_TRUE(data) << where << " returned no data: " << expr << "\n" << e1 << e2;
    with_data += data;
  }
  std::cout << "[ figures  ] " << with_data << " dashboard queries and the exposure alert returned data; "
            << live.size() << " live metric names\n";
}

}  // namespace
}  // namespace shardguard
