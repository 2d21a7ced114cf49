// The ShardedTrainingJob CRD on the real Kubernetes API server (fixture `realapi`):
// it is accepted and Established, every example applies, `kubectl get stj -o wide`
// shows the printer columns, and `kubectl explain` describes every field.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "shardguard/common/jobspec.h"

#include "support/realapi.h"

namespace shardguard {
namespace {

namespace fs = std::filesystem;
using testsupport::RealApi;
using json = nlohmann::json;

// Dotted paths (for kubectl explain) of every object in the schema below `node`,
// array items included, that declares properties.
void object_paths(const json& node, const std::string& path, std::vector<std::string>& out) {
  const json* n = &node;
  if (n->value("type", "") == "array" && n->contains("items")) n = &(*n)["items"];
  if (!n->contains("properties")) return;
  out.push_back(path);
  for (const auto& [key, sub] : (*n)["properties"].items()) object_paths(sub, path + "." + key, out);
}

// From `kubectl explain` output: the fields listed under FIELDS that have no
// description line under them; *listed counts the fields seen.
std::vector<std::string> undescribed_fields(const std::string& text, int* listed) {
  std::vector<std::string> out;
  std::istringstream in(text.substr(std::min(text.find("FIELDS:"), text.size())));
  std::string line, current;
  bool described = true;
  auto flush = [&] {
    if (!current.empty() && !described) out.push_back(current);
  };
  while (std::getline(in, line)) {
    if (line.rfind("  ", 0) == 0 && line.size() > 2 && line[2] != ' ' && line.find('\t') != std::string::npos) {
      flush();
      ++*listed;
      current = line.substr(2, line.find('\t') - 2);
      described = false;
    } else if (line.rfind("    ", 0) == 0 && line.find_first_not_of(' ') != std::string::npos) {
      described = true;
    }
  }
  flush();
  return out;
}

using RealCrd = testsupport::RealApiTest;

TEST_F(RealCrd, InstallsAndIsEstablished) {
  auto r = api_.kubectl({"get", "crd", "shardedtrainingjobs.shardguard.io", "-o",
                         "jsonpath={range .status.conditions[*]}{.type}={.status};{end}"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("Established=True"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("NamesAccepted=True"), std::string::npos) << r.output;
}

TEST_F(RealCrd, EveryExampleApplies) {
  const std::string ns = "default";  // the examples name it
  int applied = 0;
  for (const auto& entry : fs::directory_iterator(std::string(SHARDGUARD_SOURCE_DIR) + "/examples")) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    auto r = api_.kubectl({"apply", "-n", ns, "-f", entry.path().string()});
    EXPECT_EQ(r.code, 0) << r.output;
    EXPECT_NE(r.output.find("shardedtrainingjob.shardguard.io/"), std::string::npos) << r.output;
    ++applied;
  }
  EXPECT_GE(applied, 3);
  // The server filled the defaults in, as the decoder does.
  auto r = api_.kubectl({"get", "stj", "-n", ns, "fmnist-cnn", "-o", "json"});
  ASSERT_EQ(r.code, 0) << r.output;
  const json stored = json::parse(r.output);
  const JobSpec local = load_job_file(std::string(SHARDGUARD_SOURCE_DIR) + "/examples/fashion-mnist-cnn.yaml");
  const JobSpec server = job_from_json(stored);
  EXPECT_EQ(server.training.eval_batch_size, local.training.eval_batch_size);
  EXPECT_EQ(server.training.schedule, local.training.schedule);
  EXPECT_EQ(server.protection.trust_domain, local.protection.trust_domain);
  EXPECT_EQ(server.protection.topology_key, local.protection.topology_key);
  EXPECT_EQ(server.run_policy.backoff_limit, local.run_policy.backoff_limit);
  EXPECT_EQ(stored["spec"]["training"]["evalBatchSize"], 1000);
}

TEST_F(RealCrd, GetWideShowsThePrinterColumns) {
  // EveryExampleApplies may apply the same file at the same moment (ctest -j): both
  // applies find no object and one create loses with AlreadyExists. A second apply
  // then finds the object and patches it.
  const std::string file = std::string(SHARDGUARD_SOURCE_DIR) + "/examples/fashion-mnist-mlp.yaml";
  auto r = api_.kubectl({"apply", "-f", file});
  if (r.code != 0 && r.output.find("AlreadyExists") != std::string::npos) r = api_.kubectl({"apply", "-f", file});
  ASSERT_EQ(r.code, 0) << r.output;
  r = api_.kubectl({"get", "stj", "-n", "default", "-o", "wide"});
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string header = r.output.substr(0, r.output.find('\n'));
  std::size_t at = 0;
  for (const char* column : {"NAME", "PHASE", "SHARDS", "STEP", "ACCURACY", "EVAL-LOSS", "EXPOSURE", "AGE"}) {
    const std::size_t found = header.find(column, at);
    EXPECT_NE(found, std::string::npos) << column << " missing or out of order in: " << header;
    if (found != std::string::npos) at = found;
  }
  EXPECT_NE(r.output.find("fmnist-mlp"), std::string::npos) << r.output;
  // The shards column shows the spec's value.
  std::istringstream rows(r.output);
  std::string row;
  std::getline(rows, row);
  std::getline(rows, row);
  EXPECT_NE(row.find(" 4 "), std::string::npos) << row;
}

TEST_F(RealCrd, ExplainDescribesEveryField) {
  const json crd = yaml_to_json(testsupport::read_text(std::string(SHARDGUARD_SOURCE_DIR) +
                                                       "/crds/shardedtrainingjobs.shardguard.io.yaml"));
  const json& root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
  std::vector<std::string> paths = {"stj"};
  object_paths(root["properties"]["spec"], "stj.spec", paths);
  object_paths(root["properties"]["status"], "stj.status", paths);
  EXPECT_GE(paths.size(), 20u);
  for (const std::string& path : paths) {
    SCOPED_TRACE(path);
    auto r = api_.kubectl({"explain", path});
    ASSERT_EQ(r.code, 0) << r.output;
    EXPECT_NE(r.output.find("FIELDS:"), std::string::npos) << r.output;
    int listed = 0;
    const auto missing = undescribed_fields(r.output, &listed);
    EXPECT_GT(listed, 0) << r.output;
    EXPECT_TRUE(missing.empty()) << "no description for " << json(missing).dump() << " in:\n" << r.output;
    // The object itself is described too.
    const std::size_t d = r.output.find("DESCRIPTION:");
    ASSERT_NE(d, std::string::npos) << r.output;
    EXPECT_NE(r.output.find_first_not_of(" \n", d + 12), r.output.find("FIELDS:")) << "empty description:\n" << r.output;
  }
}

}  // namespace
}  // namespace shardguard
