// shardctl explain, called as a library function: job-derived and file policies.
#include <unistd.h>

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "shardguard/common/files.h"
#include "shardguard/shardctl/commands.h"
#include "shardguard/policy/policy.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

using testing::internal::CaptureStderr;
using testing::internal::CaptureStdout;
using testing::internal::GetCapturedStderr;
using testing::internal::GetCapturedStdout;

constexpr const char* kForward = "/shardguard.v1.Pipeline/Forward";
constexpr const char* kBackward = "/shardguard.v1.Pipeline/Backward";
constexpr const char* kExport = "/shardguard.v1.ShardExport/Export";

std::string shard_id(int i) { return "spiffe://shardguard.local/ns/ml/job/fmnist/shard/" + std::to_string(i); }
const std::string kExporter = "spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter";
const std::string kRegistry = "spiffe://shardguard.local/ns/ml/sa/registry";

constexpr const char* kJobYaml = R"(apiVersion: shardguard.io/v1alpha1
kind: ShardedTrainingJob
metadata:
  name: fmnist
  namespace: ml
spec:
  model:
    architecture: cnn
  training:
    batchSize: 64
    microBatches: 4
  sharding:
    shards: 4
  protection:
    maxExposure: 0.5
    export:
      allowed: true
      principals:
        - spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter
        - spiffe://shardguard.local/ns/ml/sa/registry
        - spiffe://shardguard.local/ns/ml/sa/serving
)";

struct Result {
  int rc;
  std::string out;
  std::string err;
};

Result explain(const ExplainOptions& o) {
  CaptureStdout();
  CaptureStderr();
  const int rc = RunExplain(o);
  Result r{rc, "", ""};
  r.out = GetCapturedStdout();
  r.err = GetCapturedStderr();
  return r;
}

class ExplainCmdTest : public testing::Test {
 protected:
  void SetUp() override {
    write_file_atomic(root_ + "/job.yaml", kJobYaml);
  }

  ExplainOptions job_options(int shard, const std::string& peer, const std::string& method) const {
    ExplainOptions o;
    o.job_file = root_ + "/job.yaml";
    o.shard = shard;
    o.peer = peer;
    o.method = method;
    return o;
  }

  const shardguard::testsupport::TempDir tmp_{"shardctl-explain"};
  const std::string root_ = tmp_.str();
};

TEST_F(ExplainCmdTest, Stage1AcceptsForwardFromShard0) {
  const Result r = explain(job_options(1, shard_id(0), kForward));
  EXPECT_EQ(r.rc, 0) << r.out << r.err;
  EXPECT_EQ(r.out.rfind("ALLOW\n", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("rule       forward-from-prev"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("shard 1 of 4"), std::string::npos) << r.out;
}

TEST_F(ExplainCmdTest, Stage1DeniesForwardFromShard2) {
  const Result r = explain(job_options(1, shard_id(2), kForward));
  EXPECT_EQ(r.rc, 1) << r.out << r.err;
  EXPECT_EQ(r.out.rfind("DENY\n", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("rule       default-deny"), std::string::npos) << r.out;
  // But Backward from shard 2 is its neighbour's right.
  const Result back = explain(job_options(1, shard_id(2), kBackward));
  EXPECT_EQ(back.rc, 0) << back.out;
  EXPECT_NE(back.out.find("backward-from-next"), std::string::npos) << back.out;
}

TEST_F(ExplainCmdTest, UnknownMethodIsMalformed) {
  for (const char* method : {"/shardguard.v1.pipeline/forward", "//shardguard.v1.Pipeline/Forward",
                             "/shardguard.v1.Pipeline/Forward/", "nonsense"}) {
    const Result r = explain(job_options(1, shard_id(0), method));
    EXPECT_EQ(r.rc, 1) << method << "\n" << r.out;
    EXPECT_EQ(r.out.rfind("DENY\n", 0), 0u) << r.out;
    EXPECT_NE(r.out.find("rule       malformed-method"), std::string::npos) << method << "\n" << r.out;
  }
}

TEST_F(ExplainCmdTest, EgressAndExport) {
  ExplainOptions egress = job_options(1, shard_id(2), kForward);
  egress.direction = "egress";
  const Result to_next = explain(egress);
  EXPECT_EQ(to_next.rc, 0) << to_next.out;
  EXPECT_NE(to_next.out.find("forward-to-next"), std::string::npos) << to_next.out;

  // Shards of 7.8 %, 30.6 %, 61.1 % and 0.5 % at maxExposure 0.5: the three
  // principals may export shards 0-1, 2 and 3 in turn.
  ExplainOptions ex = job_options(1, kExporter, kExport);
  ex.export_budget_bytes = 4096;
  const Result allowed = explain(ex);
  EXPECT_EQ(allowed.rc, 0) << allowed.out;
  EXPECT_NE(allowed.out.find("rule       export\n"), std::string::npos) << allowed.out;
  EXPECT_NE(allowed.out.find("budget     4096 bytes"), std::string::npos) << allowed.out;
  EXPECT_NE(allowed.out.find("exporter   " + kExporter + " may export shards 0-1 (exposure 0.3837, maxExposure 0.5000)\n"
                             "  exporter   " + kRegistry + " may export shards 2 (exposure 0.6110, maxExposure 0.5000)\n"),
            std::string::npos)
      << allowed.out;

  // The same principal, at a shard it was not assigned.
  const Result elsewhere = explain(job_options(3, kExporter, kExport));
  EXPECT_EQ(elsewhere.rc, 1) << elsewhere.out;
  EXPECT_NE(elsewhere.out.find("is not an export principal of shard 3"), std::string::npos) << elsewhere.out;
  EXPECT_EQ(explain(job_options(3, "spiffe://shardguard.local/ns/ml/sa/serving", kExport)).rc, 0);

  const Result by_shard = explain(job_options(3, shard_id(2), kExport));
  EXPECT_EQ(by_shard.rc, 1) << by_shard.out;
  EXPECT_NE(by_shard.out.find("export-denied"), std::string::npos) << by_shard.out;
}

// Fewer principals than the job needs: explain says so, as the operator refuses it.
TEST_F(ExplainCmdTest, TooFewExportPrincipalsAreRefused) {
  std::string yaml = kJobYaml;
  yaml.erase(yaml.find("        - spiffe://shardguard.local/ns/ml/sa/serving\n"));
  write_file_atomic(root_ + "/job.yaml", yaml);
  const Result r = explain(job_options(0, kExporter, kExport));
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("spec.protection.export.principals: 2 principals cannot export all 4 shards within "
                       "maxExposure 0.5000: that takes 3, one for each run of shards (0-1, 2, 3)"),
            std::string::npos)
      << r.err;
}

TEST_F(ExplainCmdTest, ShowPolicyPrintsWhatTheOperatorRenders) {
  ExplainOptions o = job_options(0, shard_id(1), kBackward);
  o.show_policy = true;
  const Result r = explain(o);
  EXPECT_EQ(r.rc, 0) << r.out;
  const std::string json = r.out.substr(0, r.out.find("\nALLOW\n") + 1);
  const policy::Policy p = policy::parse_policy(json);
  EXPECT_EQ(p.shard(), 0);
  EXPECT_EQ(p.shards(), 4);
  EXPECT_EQ(p.ns(), "ml");
  EXPECT_EQ(p.job(), "fmnist");
}

TEST_F(ExplainCmdTest, ShardOutOfRangeOrBadJob) {
  const Result r = explain(job_options(4, shard_id(3), kForward));
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("--shard: 4"), std::string::npos) << r.err;

  write_file_atomic(root_ + "/bad.yaml", std::string(kJobYaml) + "  bogus: 1\n");
  ExplainOptions bad = job_options(0, shard_id(1), kBackward);
  bad.job_file = root_ + "/bad.yaml";
  const Result invalid = explain(bad);
  EXPECT_EQ(invalid.rc, 2);
  EXPECT_NE(invalid.err.find("spec.bogus"), std::string::npos) << invalid.err;
}

TEST_F(ExplainCmdTest, PolicyFileAllowAndDeny) {
  const policy::Policy p =
      policy::pipeline_policy("shardguard.local", "ml", "fmnist", 2, 4, policy::ExportRules{});
  write_file_atomic(root_ + "/policy.json", policy::to_json(p));
  ExplainOptions o;
  o.policy_file = root_ + "/policy.json";
  o.peer = shard_id(1);
  o.method = kForward;
  const Result allow = explain(o);
  EXPECT_EQ(allow.rc, 0) << allow.out << allow.err;
  EXPECT_NE(allow.out.find("forward-from-prev"), std::string::npos) << allow.out;

  o.peer = "spiffe://evil.example/ns/ml/job/fmnist/shard/1";
  const Result bad_peer = explain(o);
  EXPECT_EQ(bad_peer.rc, 1);
  EXPECT_NE(bad_peer.out.find("bad-peer"), std::string::npos) << bad_peer.out;
}

TEST_F(ExplainCmdTest, PolicyFileWithSyntaxErrorExits2) {
  const std::string path = root_ + "/broken.json";
  write_file_atomic(path, R"({"version": 1, "trustDomain": "shardguard.local",)");
  ExplainOptions o;
  o.policy_file = path;
  o.peer = shard_id(0);
  o.method = kForward;
  const Result r = explain(o);
  EXPECT_EQ(r.rc, 2);
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find(path), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("  policy: is not valid JSON"), std::string::npos) << r.err;
}

TEST_F(ExplainCmdTest, PolicyFileProblemsListedWithJsonPaths) {
  const std::string path = root_ + "/invalid.json";
  write_file_atomic(path, R"({"version": 1, "trustDomain": "shardguard.local", "namespace": "ml",
    "job": "fmnist", "shard": 1, "shards": 4,
    "ingress": [{"name": "Bad_Name", "peers": ["spiffe://shardguard.local/ns/ml/job/fmnist/shard/0"],
                 "methods": ["/shardguard.v1.Pipeline//Forward"]}]})");
  ExplainOptions o;
  o.policy_file = path;
  o.peer = shard_id(0);
  o.method = kForward;
  const Result r = explain(o);
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("  ingress[0].name: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("  ingress[0].methods[0]: "), std::string::npos) << r.err;
}

TEST_F(ExplainCmdTest, BadArguments) {
  ExplainOptions none;
  none.peer = shard_id(0);
  none.method = kForward;
  EXPECT_EQ(explain(none).rc, 2);

  ExplainOptions no_shard = job_options(-1, shard_id(0), kForward);
  EXPECT_EQ(explain(no_shard).rc, 2);

  ExplainOptions dir = job_options(1, shard_id(0), kForward);
  dir.direction = "sideways";
  const Result r = explain(dir);
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("--direction"), std::string::npos) << r.err;

  ExplainOptions missing;
  missing.policy_file = root_ + "/nope.json";
  missing.peer = shard_id(0);
  missing.method = kForward;
  const Result m = explain(missing);
  EXPECT_EQ(m.rc, 2);
  EXPECT_NE(m.err.find("nope.json"), std::string::npos) << m.err;
}

}  // namespace
}  // namespace shardguard::shardctl
