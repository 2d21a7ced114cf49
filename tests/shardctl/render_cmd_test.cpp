// shardctl render, called as a library function: the objects, their order and names,
// the key material in each Secret, the YAML stream, and refused input.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"
#include "shardguard/shardctl/commands.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

using nlohmann::json;
using testing::internal::CaptureStderr;
using testing::internal::CaptureStdout;
using testing::internal::GetCapturedStderr;
using testing::internal::GetCapturedStdout;

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
    maxExposure: 0.9
  template:
    image: example.com/shardd:1
  sidecar:
    image: example.com/sidecar:1
)";

struct Result {
  int rc;
  std::string out;
  std::string err;
};

Result render(const RenderOptions& o) {
  CaptureStdout();
  CaptureStderr();
  const int rc = RunRender(o);
  Result r{rc, "", ""};
  r.out = GetCapturedStdout();
  r.err = GetCapturedStderr();
  return r;
}

std::string b64decode(const std::string& text) {
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (const char c : text) {
    int v = -1;
    if (c >= 'A' && c <= 'Z') v = c - 'A';
    if (c >= 'a' && c <= 'z') v = c - 'a' + 26;
    if (c >= '0' && c <= '9') v = c - '0' + 52;
    if (c == '+') v = 62;
    if (c == '/') v = 63;
    if (v < 0) continue;  // padding
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  return out;
}

std::set<std::string> data_values(const json& secret) {
  std::set<std::string> out;
  for (const auto& [k, v] : secret.at("data").items()) out.insert(v.get<std::string>());
  return out;
}

// Splits a YAML stream at its "---" lines; comment lines before the first are dropped.
std::vector<std::string> yaml_documents(const std::string& stream) {
  std::vector<std::string> docs;
  size_t pos = 0;
  bool started = false;
  while (pos < stream.size()) {
    size_t nl = stream.find('\n', pos);
    if (nl == std::string::npos) nl = stream.size();
    const std::string line = stream.substr(pos, nl - pos);
    if (line == "---") {
      docs.emplace_back();
      started = true;
    } else if (started) {
      docs.back() += line + "\n";
    }
    pos = nl + 1;
  }
  return docs;
}

class RenderCmdTest : public testing::Test {
 protected:
  void SetUp() override {
    write_file_atomic(root_ + "/job.yaml", kJobYaml);
  }

  // Renders job.yaml as a JSON List into a file and returns its items.
  std::vector<json> render_json() {
    RenderOptions o;
    o.job_file = root_ + "/job.yaml";
    o.format = "json";
    o.out_file = root_ + "/out.json";
    const Result r = render(o);
    EXPECT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(r.out, "");
    const json list = json::parse(read_file(o.out_file));
    EXPECT_EQ(list.at("kind"), "List");
    return list.at("items").get<std::vector<json>>();
  }

  const shardguard::testsupport::TempDir tmp_{"shardctl-render"};
  const std::string root_ = tmp_.str();
};

TEST_F(RenderCmdTest, ObjectsKindsAndNamesInApplyOrder) {
  const std::vector<json> items = render_json();
  std::vector<std::string> got;
  for (const json& o : items) {
    got.push_back(o.at("kind").get<std::string>() + " " + o.at("metadata").at("name").get<std::string>());
    EXPECT_EQ(o.at("metadata").at("namespace"), "ml");
  }
  const std::vector<std::string> want = {
      "Secret fmnist-ca",          "Secret fmnist-shard-0",     "Secret fmnist-shard-1",
      "Secret fmnist-shard-2",     "Secret fmnist-shard-3",     "ConfigMap fmnist-shard-0",
      "ConfigMap fmnist-shard-1",  "ConfigMap fmnist-shard-2",  "ConfigMap fmnist-shard-3",
      "Service fmnist",            "Pod fmnist-shard-0",        "Pod fmnist-shard-1",
      "Pod fmnist-shard-2",        "Pod fmnist-shard-3"};
  EXPECT_EQ(got, want);

  // One random uid, the same in every ownerReference.
  const std::string uid = items[0].at("metadata").at("ownerReferences").at(0).at("uid");
  EXPECT_TRUE(std::regex_match(uid, std::regex("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")))
      << uid;
  for (const json& o : items) {
    const json& ref = o.at("metadata").at("ownerReferences").at(0);
    EXPECT_EQ(ref.at("uid"), uid);
    EXPECT_EQ(ref.at("kind"), "ShardedTrainingJob");
    EXPECT_EQ(ref.at("name"), "fmnist");
  }
  // A second render makes a new uid and new keys.
  const std::vector<json> again = render_json();
  EXPECT_NE(again[0].at("metadata").at("ownerReferences").at(0).at("uid"), uid);
  EXPECT_NE(again[1].at("data").at("checkpoint.key"), items[1].at("data").at("checkpoint.key"));
}

TEST_F(RenderCmdTest, EachShardSecretHoldsOnlyItsOwnKeyMaterial) {
  const std::vector<json> items = render_json();
  const json& ca_secret = items[0];
  const std::string ca_crt = ca_secret.at("data").at("ca.crt");
  const std::string ca_pem = b64decode(ca_crt);
  std::set<std::string> checkpoint_keys, ledger_keys;
  for (int i = 0; i < 4; ++i) {
    const json& secret = items[1 + i];
    ASSERT_EQ(secret.at("metadata").at("name"), "fmnist-shard-" + std::to_string(i));
    EXPECT_EQ(secret.at("type"), "kubernetes.io/tls");
    const json& data = secret.at("data");
    std::set<std::string> keys;
    for (const auto& [k, v] : data.items()) keys.insert(k);
    EXPECT_EQ(keys, (std::set<std::string>{"tls.crt", "tls.key", "ca.crt", "checkpoint.key", "ledger.key"}));

    // Its leaf is shard i's SVID, issued by the job CA.
    const SvidCheck check = verify_svid(b64decode(data.at("tls.crt")), ca_pem, std::chrono::system_clock::now(),
                                        SvidRole::server);
    ASSERT_TRUE(check.ok) << check.reason << ": " << check.message;
    EXPECT_EQ(check.spiffe_id, "spiffe://shardguard.local/ns/ml/job/fmnist/shard/" + std::to_string(i));
    EXPECT_NE(b64decode(data.at("tls.key")).find("PRIVATE KEY"), std::string::npos);
    EXPECT_EQ(data.at("ca.crt"), ca_crt);
    const std::string key = b64decode(data.at("checkpoint.key"));
    EXPECT_EQ(key.size(), 32u);
    checkpoint_keys.insert(key);
    const std::string ledger_key = b64decode(data.at("ledger.key"));
    EXPECT_EQ(ledger_key.size(), 32u);
    EXPECT_NE(ledger_key, key);
    ledger_keys.insert(ledger_key);

    // Nothing in it but the CA certificate is shared with another shard's Secret or
    // with the CA Secret (so no CA key, no other leaf key, no other checkpoint key).
    const std::set<std::string> mine = data_values(secret);
    for (int j = 0; j < 5; ++j) {
      if (j == 1 + i) continue;
      for (const std::string& v : data_values(items[j])) {
        if (v == ca_crt) continue;
        EXPECT_EQ(mine.count(v), 0u) << "Secret fmnist-shard-" << i << " carries material of " << items[j]["metadata"]["name"];
        const std::string decoded = b64decode(v);
        for (const std::string& m : mine) {
          EXPECT_EQ(b64decode(m).find(decoded), std::string::npos)
              << "Secret fmnist-shard-" << i << " contains material of " << items[j]["metadata"]["name"];
        }
      }
    }
  }
  EXPECT_EQ(checkpoint_keys.size(), 4u) << "every shard has its own checkpoint key";
  EXPECT_EQ(ledger_keys.size(), 4u) << "every shard has its own ledger key";

  // Each pod mounts only its own Secret.
  for (int i = 0; i < 4; ++i) {
    const json& pod = items[10 + i];
    for (const json& vol : pod.at("spec").at("volumes")) {
      if (vol.contains("secret")) {
        EXPECT_EQ(vol.at("secret").at("secretName"), "fmnist-shard-" + std::to_string(i));
      }
    }
  }
}

// A job with replicas (issue 20): one leaf and ledger key per replica, under the
// replica's own identity, and the stage's checkpoint key in every replica's Secret.
TEST_F(RenderCmdTest, EveryReplicaGetsItsOwnLeafAndTheStagesCheckpointKey) {
  std::string yaml = kJobYaml;
  yaml.replace(yaml.find("    shards: 4\n"), 14, "    shards: 4\n    replicas: 2\n");
  write_file_atomic(root_ + "/job.yaml", yaml);
  const std::vector<json> items = render_json();
  ASSERT_EQ(items.size(), 26u);
  const std::string ca_pem = b64decode(items[0].at("data").at("ca.crt"));
  std::map<std::string, json> secrets;
  for (const json& o : items) {
    if (o.at("kind") == "Secret") secrets[o.at("metadata").at("name")] = o.at("data");
  }
  std::set<std::string> ledger_keys;
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) {
      const std::string name = "fmnist-shard-" + std::to_string(i) + "-r" + std::to_string(r);
      ASSERT_TRUE(secrets.count(name)) << name;
      const json& data = secrets[name];
      const SvidCheck check = verify_svid(b64decode(data.at("tls.crt")), ca_pem, std::chrono::system_clock::now(),
                                          SvidRole::server);
      ASSERT_TRUE(check.ok) << check.message;
      EXPECT_EQ(check.spiffe_id, "spiffe://shardguard.local/ns/ml/job/fmnist/shard/" + std::to_string(i) +
                                     "/replica/" + std::to_string(r));
      EXPECT_EQ(data.at("checkpoint.key"), secrets["fmnist-shard-" + std::to_string(i) + "-r0"].at("checkpoint.key"));
      ledger_keys.insert(data.at("ledger.key").get<std::string>());
    }
    EXPECT_NE(secrets["fmnist-shard-" + std::to_string(i) + "-r0"].at("checkpoint.key"),
              secrets["fmnist-shard-" + std::to_string((i + 1) % 4) + "-r0"].at("checkpoint.key"));
  }
  EXPECT_EQ(ledger_keys.size(), 8u);
}

TEST_F(RenderCmdTest, YamlStreamReadsBackAsTheSameObjects) {
  const std::vector<json> items = render_json();
  const std::vector<std::string> docs = yaml_documents(ToYamlStream(items));
  ASSERT_EQ(docs.size(), items.size());
  for (size_t i = 0; i < docs.size(); ++i) {
    EXPECT_EQ(yaml_to_json(docs[i]), items[i]) << docs[i];
  }

  // Strings a YAML reader could take for something else, and text blocks.
  const json tricky = {
      {"strings", {"true", "False", "yes", "on", "Off", "y", "N", "null", "~", "", "1", "0.1.0", "1e3", "0x1F",
                   "-x", "- x", "a: b", "a:", "key:value", "#c", "x #c", "'q'", "\"d\"", "@at", "`b`", "*ref",
                   "&anchor", "!tag", "%p", "{a}", "[a]", "a,b", " lead", "trail ", "tab\there", "é ü",
                   "ghcr.io/shardguard/shardd:0.1.0", ".inf", "12:30", "2024-01-01", "<<", "=", "---", "..."}},
      {"text", {"one\n", "no newline\nat end", "two\n\n", "\nleading\n", "indented\n  more\n", " first\nline",
                "a\r\nb\n", "\n\n", "line\n---\nx\n"}},
      {"numbers", {0, -7, 3.5, 1e-9, 9007199254740993LL}},
      {"empty", {{"obj", json::object()}, {"arr", json::array()}, {"null", nullptr}, {"b", false}}},
      {"nested", {{{"a", {1, {2, 3}, json::array()}}}, json::array({json::array({"x"})})}},
      {"true", "key that is a word"},
      {"app.kubernetes.io/name", "shardguard"},
  };
  const std::string stream = ToYamlStream({tricky});
  const std::vector<std::string> one = yaml_documents(stream);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(yaml_to_json(one[0]), tricky) << stream;
  EXPECT_NE(stream.find("\"true\""), std::string::npos) << "a string that reads as a boolean is quoted";
  const std::string rendered = ToYamlStream(items);
  EXPECT_NE(rendered.find("image: example.com/shardd:1\n"), std::string::npos) << rendered;
  EXPECT_NE(rendered.find("job.json: |\n"), std::string::npos) << "multi-line text is a literal block";
}

TEST_F(RenderCmdTest, YamlToStdoutByDefault) {
  RenderOptions o;
  o.job_file = root_ + "/job.yaml";
  const Result r = render(o);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_EQ(r.out.rfind("# 14 objects", 0), 0u) << r.out.substr(0, 200);
  const std::vector<std::string> docs = yaml_documents(r.out);
  ASSERT_EQ(docs.size(), 14u);
  const json pod = yaml_to_json(docs[13]);
  EXPECT_EQ(pod.at("kind"), "Pod");
  EXPECT_EQ(pod.at("metadata").at("name"), "fmnist-shard-3");
}

TEST_F(RenderCmdTest, OutFileIsOwnerOnly) {
  RenderOptions o;
  o.job_file = root_ + "/job.yaml";
  o.out_file = root_ + "/objects.yaml";
  const Result r = render(o);
  ASSERT_EQ(r.rc, 0) << r.err;
  struct stat st {};
  ASSERT_EQ(::stat(o.out_file.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_NE(r.err.find("wrote 14 objects"), std::string::npos) << r.err;
}

TEST_F(RenderCmdTest, MalformedJobNamesTheFieldAndTheValue) {
  std::string yaml = kJobYaml;
  yaml.replace(yaml.find("shards: 4"), 9, "shards: 0");
  write_file_atomic(root_ + "/bad.yaml", yaml);
  RenderOptions o;
  o.job_file = root_ + "/bad.yaml";
  Result r = render(o);
  EXPECT_EQ(r.rc, 2);
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find("spec.sharding.shards"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("got 0"), std::string::npos) << r.err;

  yaml = kJobYaml;
  yaml.replace(yaml.find("architecture: cnn"), 17, "architecture: rnn");
  write_file_atomic(root_ + "/bad.yaml", yaml);
  r = render(o);
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("spec.model.architecture"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("rnn"), std::string::npos) << r.err;

  o.job_file = root_ + "/missing.yaml";
  r = render(o);
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("missing.yaml"), std::string::npos) << r.err;

  o.job_file = root_ + "/job.yaml";
  o.format = "xml";
  r = render(o);
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("xml"), std::string::npos) << r.err;
}

TEST_F(RenderCmdTest, RefusedLikeTheOperatorWhenAStageExceedsMaxExposure) {
  std::string yaml = kJobYaml;
  yaml.replace(yaml.find("maxExposure: 0.9"), 16, "maxExposure: 0.05");
  write_file_atomic(root_ + "/greedy.yaml", yaml);
  RenderOptions o;
  o.job_file = root_ + "/greedy.yaml";
  const Result r = render(o);
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find("maxExposure"), std::string::npos) << r.err;
}

// --export-budget reaches every shard's policy as the operator's --export-budget-bytes
// does, and the sidecar is given its ledger, so what render prints can export.
TEST_F(RenderCmdTest, ExportBudgetReachesEveryPolicyAndTheSidecarKeepsALedger) {
  std::string yaml = kJobYaml;
  yaml.replace(yaml.find("    maxExposure: 0.9\n"), std::string("    maxExposure: 0.9\n").size(),
               "    maxExposure: 0.9\n    export:\n      allowed: true\n      principals:\n"
               "        - spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter\n"
               "        - spiffe://shardguard.local/ns/ml/sa/registry\n");
  write_file_atomic(root_ + "/job.yaml", yaml);
  RenderOptions o;
  o.job_file = root_ + "/job.yaml";
  o.format = "json";
  o.out_file = root_ + "/out.json";
  o.export_budget_bytes = 1234;
  const Result r = render(o);
  ASSERT_EQ(r.rc, 0) << r.err;
  const std::vector<json> items = json::parse(read_file(o.out_file)).at("items").get<std::vector<json>>();
  int policies = 0;
  for (const json& item : items) {
    if (item.at("kind") == "ConfigMap") {
      const json policy = json::parse(item.at("data").at("policy.json").get<std::string>());
      EXPECT_NE(policy.dump().find("\"budgetBytes\":1234"), std::string::npos) << policy.dump();
      ++policies;
    }
    if (item.at("kind") == "Pod") {
      for (const json& c : item.at("spec").at("containers")) {
        if (c.at("name") != "sidecar") continue;
        const std::string args = c.at("args").dump();
        EXPECT_NE(args.find("\"--ledger\""), std::string::npos) << args;
        EXPECT_NE(args.find("\"/etc/shardguard/tls/ledger.key\""), std::string::npos) << args;
      }
    }
  }
  EXPECT_EQ(policies, 4);
}

}  // namespace
}  // namespace shardguard::shardctl
