// Parameter export through the sidecar (sidecar/proxy.h, ledger.h): the budget is
// checked before anything is forwarded, every received range is recorded, and the
// HMAC-sealed ledger keeps budgets across a restart and refuses to be tampered with,
// and an older sealed copy (or none) put back in its place is refused by its sequence.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <filesystem>
#include <string>

#include <grpcpp/grpcpp.h>
#include <prometheus/registry.h>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/pki.h"
#include "shardguard/sidecar/audit.h"
#include "shardguard/sidecar/ledger.h"
#include "shardguard/policy/policy.h"
#include "shardguard/sidecar/proxy.h"
#include "shardguard/v1/pipeline.grpc.pb.h"
#include "support/export_client.h"
#include "support/grpc_echo.h"
#include "support/wait.h"
#include "support/temp_dir.h"

namespace shardguard::sidecar {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kShardBytes = 3 * kMiB;
const std::string kTd = "shardguard.local";

// What shardd's ShardExport does, over a fixed byte pattern: the sidecar's side of
// the contract is under test here (the integration test uses the real shardd).
class PatternExport final : public v1::ShardExport::Service {
 public:
  grpc::Status Export(grpc::ServerContext*, const v1::ExportRequest* req,
                      grpc::ServerWriter<v1::ExportChunk>* writer) override {
    calls++;
    if (req->length() == 0 || req->offset() + req->length() > kShardBytes) {
      return {grpc::StatusCode::OUT_OF_RANGE, "bad range"};
    }
    for (uint64_t at = req->offset(); at < req->offset() + req->length();) {
      const uint64_t n = std::min<uint64_t>(kMiB, req->offset() + req->length() - at);
      v1::ExportChunk c;
      c.set_offset(rogue ? at + kShardBytes : at);
      c.set_data(std::string(n, static_cast<char>('a' + at / kMiB)));
      c.set_total_bytes(kShardBytes);
      c.set_step(8);
      if (!writer->Write(c)) break;
      at += n;
    }
    return grpc::Status::OK;
  }
  std::atomic<int> calls{0};
  std::atomic<bool> rogue{false};  // sends bytes outside the requested range
};

// Every test runs on both data planes (ProxyConfig::data_plane): the gRPC relay and
// the HTTP/2 relay must behave the same.
class ExportTest : public ::testing::TestWithParam<DataPlane> {
 protected:
  void SetUp() override {
    grpc::ServerBuilder b;
    b.RegisterService(&backend_);
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &backend_port_);
    server_ = b.BuildAndStart();
    ASSERT_TRUE(server_ && backend_port_ > 0);

    ca_ = create_ca("ca", std::chrono::hours(1));
    const CaBundle& ca = ca_;
    exporter_ = issue_leaf(ca, spiffe_id_for_exporter(kTd, "ml", "fm"), std::chrono::hours(1));
    const Leaf me = issue_leaf(ca, spiffe_id_for_shard(kTd, "ml", "fm", 1), std::chrono::hours(1));
    prev_ = issue_leaf(ca, spiffe_id_for_shard(kTd, "ml", "fm", 0), std::chrono::hours(1));
    write_file_atomic(dir_ + "/ca.pem", ca.cert_pem);
    write_file_atomic(dir_ + "/cert.pem", me.cert_pem);
    write_file_atomic(dir_ + "/key.pem", me.key_pem, 0600);
    policy::ExportRules rules;
    rules.allowed = true;
    rules.principals.push_back({spiffe_id_for_exporter(kTd, "ml", "fm"), static_cast<int64_t>(2 * kMiB)});
    write_file_atomic(dir_ + "/policy.json", to_json(policy::pipeline_policy(kTd, "ml", "fm", 1, 3, rules)));
    generate_key_file(dir_ + "/ledger.key");
  }
  void TearDown() override {
    proxy_.reset();
    server_->Shutdown(std::chrono::system_clock::now() + 1s);
  }

  void start_proxy(bool with_ledger = true, uint64_t ledger_min_sequence = 0) {
    ProxyConfig c;
    c.data_plane = GetParam();
    c.reload_interval = std::chrono::milliseconds(50);
    c.inbound_listen = c.outbound_listen = "127.0.0.1:0";
    c.upstream = "127.0.0.1:" + std::to_string(backend_port_);
    c.cert_file = dir_ + "/cert.pem";
    c.key_file = dir_ + "/key.pem";
    c.ca_file = dir_ + "/ca.pem";
    c.policy_file = dir_ + "/policy.json";
    c.audit_file = dir_ + "/audit.jsonl";
    if (with_ledger) {
      c.ledger_file = dir_ + "/ledger.json";
      c.ledger_key_file = dir_ + "/ledger.key";
      c.ledger_min_sequence = ledger_min_sequence;
    }
    registry_ = std::make_shared<prometheus::Registry>();
    proxy_ = std::make_unique<Proxy>(c, registry_);
    proxy_->start();
  }

  // Pulls [offset, offset+length) as the exporter; returns the status and the bytes.
  grpc::Status pull(uint64_t offset, uint64_t length, std::string* got = nullptr) {
    return testsupport::export_pull("127.0.0.1:" + std::to_string(proxy_->inbound_port()), exporter_.cert_pem,
                                    exporter_.key_pem, offset, length, got);
  }

  // A Forward from the previous stage (allowed by the policy): the backend has no
  // Pipeline service, so UNIMPLEMENTED means the call was relayed to it.
  grpc::Status forward_from_prev() {
    auto stub = v1::Pipeline::NewStub(testsupport::tls_channel("127.0.0.1:" + std::to_string(proxy_->inbound_port()),
                                                               prev_.cert_pem, prev_.key_pem));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::ForwardRequest req;
    v1::ForwardReply reply;
    return stub->Forward(&ctx, req, &reply);
  }

  double metric(const std::string& name, const std::map<std::string, std::string>& labels) {
    return testsupport::registry_sum(*registry_, name, labels);
  }
  std::map<std::string, std::string> exporter_labels() const {
    return {{"peer", spiffe_id_for_exporter(kTd, "ml", "fm")}, {"shard", "1"}};
  }

  const testsupport::TempDir tmp_{"export_test"};
  const std::string dir_ = tmp_.str();
  PatternExport backend_;
  CaBundle ca_;
  int backend_port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  Leaf exporter_;
  Leaf prev_;  // shard 0, the previous stage
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<Proxy> proxy_;
};

TEST_P(ExportTest, WithinBudgetIsRecordedAndBeyondBudgetIsRefusedAcrossARestart) {
  start_proxy();
  // The policy's export principal has its series before any export, at 0.
  EXPECT_EQ(testsupport::registry_series(*registry_, "shardguard_param_bytes_exposed_total", exporter_labels()), 1);
  EXPECT_EQ(testsupport::registry_series(*registry_, "shardguard_exposure_ratio", exporter_labels()), 1);
  EXPECT_EQ(metric("shardguard_param_bytes_exposed_total", exporter_labels()), 0.0);
  std::string got;
  ASSERT_TRUE(pull(0, kMiB, &got).ok());
  EXPECT_EQ(got, std::string(kMiB, 'a'));
  EXPECT_EQ(metric("shardguard_param_bytes_exposed_total", exporter_labels()), kMiB);
  EXPECT_NEAR(metric("shardguard_exposure_ratio", exporter_labels()), 1.0 / 3, 1e-9);
  // The shard's own principal holds all of it; no other shard principal holds any.
  EXPECT_EQ(metric("shardguard_exposure_ratio", {{"peer", spiffe_id_for_shard(kTd, "ml", "fm", 1)}, {"shard", "1"}}),
            1.0);
  EXPECT_EQ(metric("shardguard_exposure_ratio", {{"peer", spiffe_id_for_shard(kTd, "ml", "fm", 0)}}), 0.0);
  // The same bytes again cost nothing; half new, half old costs the new half.
  ASSERT_TRUE(pull(0, kMiB).ok());
  ASSERT_TRUE(pull(kMiB / 2, kMiB).ok());
  EXPECT_EQ(metric("shardguard_param_bytes_exposed_total", exporter_labels()), 1.5 * kMiB);
  ASSERT_TRUE(pull(kMiB, kMiB).ok());  // exactly the 2 MiB budget now
  const int calls = backend_.calls.load();

  // One byte more is refused before anything reaches shardd.
  const auto over = pull(2 * kMiB, 1);
  EXPECT_EQ(over.error_code(), grpc::StatusCode::PERMISSION_DENIED) << over.error_message();
  EXPECT_NE(over.error_message().find("budget"), std::string::npos) << over.error_message();
  EXPECT_EQ(backend_.calls.load(), calls);
  EXPECT_EQ(metric("shardguard_authz_decisions_total", {{"decision", "deny"}, {"rule", policy::kRuleExportDenied}}), 1);

  // A restart neither resets the budget nor the metrics.
  proxy_.reset();
  start_proxy();
  EXPECT_EQ(metric("shardguard_param_bytes_exposed_total", exporter_labels()), 2 * kMiB);
  EXPECT_EQ(pull(2 * kMiB, kMiB).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(pull(0, 2 * kMiB).ok());  // already received: still free
  EXPECT_EQ(backend_.calls.load(), calls + 1);

  // The audit log holds every allow with its bytes and every deny, chained.
  const auto v = verify_audit_log(dir_ + "/audit.jsonl");
  EXPECT_TRUE(v.ok) << v.reason;
  EXPECT_EQ(v.lines, 7u);
}

TEST_P(ExportTest, RolledBackLedgerIsRefusedForExportsOnly) {
  start_proxy();
  const std::string ledger = dir_ + "/ledger.json";
  EXPECT_EQ(metric("shardguard_ledger_sequence", {}), 0.0);  // no file yet
  ASSERT_TRUE(pull(0, kMiB).ok());
  const double old_seq = metric("shardguard_ledger_sequence", {});
  EXPECT_GT(old_seq, 0.0);
  EXPECT_EQ(old_seq, static_cast<double>(ExposureLedger::load(ledger, read_file(dir_ + "/ledger.key")).sequence()));
  const std::string older = read_file(ledger);  // the copy someone keeps
  ASSERT_TRUE(pull(kMiB, kMiB).ok());          // the whole 2 MiB budget
  const double seq = metric("shardguard_ledger_sequence", {});
  EXPECT_GT(seq, old_seq);
  EXPECT_EQ(pull(2 * kMiB, 1).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  proxy_.reset();

  // Put back, the older copy verifies (it is genuine) and would give back 1 MiB of
  // budget: without the recorded sequence it is taken as it is...
  write_file_atomic(ledger, older, 0600);
  start_proxy(true, 0);
  EXPECT_EQ(metric("shardguard_ledger_sequence", {}), old_seq);
  proxy_.reset();
  write_file_atomic(ledger, older, 0600);  // (nothing was exported: unchanged anyway)

  // ...with it (what the operator renders), every export is refused, before shardd
  // sees anything, counted, logged and audited under its own rule.
  start_proxy(true, static_cast<uint64_t>(seq));
  EXPECT_EQ(metric("shardguard_ledger_sequence", {}), old_seq);
  EXPECT_EQ(metric("shardguard_ledger_min_sequence", {}), seq);
  const int calls = backend_.calls.load();
  const auto refused = pull(2 * kMiB, kMiB);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED) << refused.error_message();
  const std::string msg = refused.error_message();
  EXPECT_NE(msg.find("(rule ledger-rolled-back)"), std::string::npos) << msg;
  EXPECT_NE(msg.find(ledger), std::string::npos) << msg;
  EXPECT_NE(msg.find("sequence " + std::to_string(static_cast<uint64_t>(old_seq))), std::string::npos) << msg;
  EXPECT_NE(msg.find("the " + std::to_string(static_cast<uint64_t>(seq)) + " recorded"), std::string::npos) << msg;
  EXPECT_EQ(pull(0, kMiB).error_code(), grpc::StatusCode::PERMISSION_DENIED);  // even bytes it already had
  EXPECT_EQ(backend_.calls.load(), calls);
  EXPECT_EQ(metric("shardguard_authz_decisions_total",
                   {{"decision", "deny"}, {"rule", policy::kRuleLedgerRolledBack}, {"method", policy::kExportMethod}}),
            2);
  // (counted when the server side of the call is done, which can follow the reply)
  EXPECT_TRUE(testsupport::eventually([&] {
    return metric("shardguard_proxy_requests_total", {{"method", policy::kExportMethod}, {"code", "PERMISSION_DENIED"}}) ==
           2;
  }, 5s));
  // Pipeline traffic is not affected.
  EXPECT_EQ(forward_from_prev().error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(metric("shardguard_authz_decisions_total", {{"decision", "allow"}, {"method", policy::kForwardMethod}}), 1);
  // The refused file is kept as it was.
  EXPECT_EQ(read_file(ledger), older);
  proxy_.reset();
  const auto v = verify_audit_log(dir_ + "/audit.jsonl");
  ASSERT_TRUE(v.ok) << v.reason;
  const std::string audit = read_file(dir_ + "/audit.jsonl");
  size_t rolled_back = 0;
  for (size_t at = 0; (at = audit.find("\"rule\":\"ledger-rolled-back\",\"decision\":\"deny\"", at)) != std::string::npos; ++at) {
    ++rolled_back;
  }
  EXPECT_EQ(rolled_back, 2u) << audit;

  // The current ledger back in place (or a later one) is accepted again.
  write_file_atomic(ledger, older, 0600);
  start_proxy(true, static_cast<uint64_t>(old_seq));
  EXPECT_TRUE(pull(0, kMiB).ok());
  EXPECT_GT(metric("shardguard_ledger_sequence", {}), old_seq);  // and it goes on counting from there
}

TEST_P(ExportTest, DeletedLedgerIsRefusedWhenASequenceWasRecorded) {
  start_proxy();
  ASSERT_TRUE(pull(0, kMiB).ok());
  const double seq = metric("shardguard_ledger_sequence", {});
  ASSERT_GT(seq, 0.0);
  proxy_.reset();
  std::filesystem::remove(dir_ + "/ledger.json");
  start_proxy(true, static_cast<uint64_t>(seq));
  EXPECT_EQ(metric("shardguard_ledger_sequence", {}), 0.0);
  const auto refused = pull(0, kMiB);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(refused.error_message().find("is missing"), std::string::npos) << refused.error_message();
  EXPECT_NE(refused.error_message().find("(rule ledger-rolled-back)"), std::string::npos) << refused.error_message();
  EXPECT_EQ(backend_.calls.load(), 1);
  EXPECT_EQ(metric("shardguard_authz_decisions_total", {{"decision", "deny"}, {"rule", policy::kRuleLedgerRolledBack}}),
            1);
  // No new (empty) ledger is written in its place.
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/ledger.json"));
  EXPECT_EQ(forward_from_prev().error_code(), grpc::StatusCode::UNIMPLEMENTED);
  proxy_.reset();
  // A sidecar that never exported (sequence 0 recorded) starts without a file.
  start_proxy(true, 0);
  EXPECT_TRUE(pull(0, kMiB).ok());
}

TEST_P(ExportTest, MinSequenceNeedsALedger) {
  ProxyConfig c;
  c.cert_file = c.key_file = c.ca_file = c.policy_file = dir_ + "/x";
  c.ledger_min_sequence = 3;
  try {
    Proxy p(c, std::make_shared<prometheus::Registry>());
    FAIL() << "accepted --ledger-min-sequence without --ledger";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("--ledger-min-sequence 3"), std::string::npos) << e.what();
  }
}

TEST_P(ExportTest, TamperedLedgerStopsTheStart) {
  start_proxy();
  ASSERT_TRUE(pull(0, kMiB).ok());
  proxy_.reset();
  std::string text = read_file(dir_ + "/ledger.json");
  const auto at = text.find("1048576");
  ASSERT_NE(at, std::string::npos) << text;
  text.replace(at, 7, "0000001");
  write_file_atomic(dir_ + "/ledger.json", text, 0600);
  try {
    start_proxy();
    FAIL() << "started with a tampered ledger";
  } catch (const LedgerError& e) {
    EXPECT_NE(std::string(e.what()).find("ledger.json"), std::string::npos) << e.what();
  }
}

TEST_P(ExportTest, MalformedRequestsAndRogueRepliesAreStopped) {
  start_proxy();
  EXPECT_EQ(pull(0, 0).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(pull(UINT64_MAX, 2).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(backend_.calls.load(), 0);
  // shardd answering outside the requested range: nothing is forwarded or recorded.
  backend_.rogue = true;
  std::string got;
  const auto st = pull(0, kMiB, &got);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INTERNAL) << st.error_message();
  EXPECT_TRUE(got.empty());
  EXPECT_EQ(metric("shardguard_param_bytes_exposed_total", exporter_labels()), 0);
}

TEST_P(ExportTest, WithoutALedgerNothingIsExported) {
  start_proxy(/*with_ledger=*/false);
  const auto st = pull(0, kMiB);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(st.error_message().find("ledger"), std::string::npos) << st.error_message();
  EXPECT_EQ(backend_.calls.load(), 0);
}

// A stage with replicas: each replica's sidecar holds an SVID of its own
// (…/shard/1/replica/<r>), and that replica is the principal holding the shard.
TEST_P(ExportTest, AReplicasOwnSvidIsThePrincipalHoldingItsShard) {
  const std::string replica = spiffe_id_for_replica(kTd, "ml", "fm", 1, 2);
  const Leaf me = issue_leaf(ca_, replica, std::chrono::hours(1));
  write_file_atomic(dir_ + "/cert.pem", me.cert_pem);
  write_file_atomic(dir_ + "/key.pem", me.key_pem, 0600);
  start_proxy();
  EXPECT_EQ(metric("shardguard_exposure_ratio", {{"peer", replica}, {"shard", "1"}}), 1.0);
  EXPECT_EQ(testsupport::registry_series(*registry_, "shardguard_exposure_ratio",
                                         {{"peer", spiffe_id_for_shard(kTd, "ml", "fm", 1)}}),
            0);
  // A rotated certificate of another job's shard-1 replica is not this shard's: the
  // series goes back to the shard's ID, and the replica's goes away.
  const std::string stranger = spiffe_id_for_replica(kTd, "ml", "other", 1, 2);
  const Leaf other = issue_leaf(ca_, stranger, std::chrono::hours(1));
  write_file_atomic(dir_ + "/key.pem", other.key_pem, 0600);
  write_file_atomic(dir_ + "/cert.pem", other.cert_pem);
  const prometheus::Labels shard{{"peer", spiffe_id_for_shard(kTd, "ml", "fm", 1)}, {"shard", "1"}};
  ASSERT_TRUE(testsupport::eventually(
      [&] { return testsupport::registry_series(*registry_, "shardguard_exposure_ratio", shard) == 1; }));
  EXPECT_EQ(metric("shardguard_exposure_ratio", shard), 1.0);
  EXPECT_EQ(testsupport::registry_series(*registry_, "shardguard_exposure_ratio", {{"peer", replica}}), 0);
  EXPECT_EQ(testsupport::registry_series(*registry_, "shardguard_exposure_ratio", {{"peer", stranger}}), 0);
}

INSTANTIATE_TEST_SUITE_P(Planes, ExportTest, ::testing::Values(DataPlane::grpc, DataPlane::h2),
                         [](const ::testing::TestParamInfo<DataPlane>& info) { return data_plane_name(info.param); });

}  // namespace
}  // namespace shardguard::sidecar
