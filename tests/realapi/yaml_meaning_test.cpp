// One meaning for one file: kubectl reads a job file as YAML 1.1, shardctl as YAML
// 1.2. For every scalar and construct the two read differently, this test shows what
// kubectl makes of it on the real API server (fixture `realapi`, server-side dry
// run) and that shardctl refuses the file, naming the line and how to write it;
// written the portable way, both read the same values.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "shardguard/common/jobspec.h"
#include "support/realapi.h"

namespace shardguard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testsupport::RealApi;

struct YamlCase {
  std::string name;
  std::string spec;        // lines under spec:, YAML 1.1/1.2 ambiguous
  std::string pointer;     // JSON pointer of the value kubectl stores
  json kubectl_value;      // what kubectl stores there (null: kubectl or the server refuses)
  int line;                // the line shardctl names
  std::string advice;      // a fragment of shardctl's message
  std::string portable;    // the same intent, written so that both agree
  json portable_value;     // the value both then read
};

std::string job(const std::string& name, const std::string& spec) {
  return "apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\nmetadata:\n  name: " + name +
         "\n  namespace: yaml-meaning\nspec:\n  model: {architecture: mlp}\n" + spec;
}

// Line numbers: the spec lines start at line 8.
std::vector<YamlCase> cases() {
  return {
      {"bool-yes", "  runPolicy:\n    suspend: yes\n", "/spec/runPolicy/suspend", true, 9, "write true",
       "  runPolicy:\n    suspend: true\n", true},
      {"bool-off", "  protection:\n    export: {allowed: off}\n", "/spec/protection/export/allowed", false, 9, "write false",
       "  protection:\n    export: {allowed: false}\n", false},
      {"octal", "  training:\n    batchSize: 064\n    microBatches: 4\n", "/spec/training/batchSize", 52, 9, "leading 0",
       "  training:\n    batchSize: 64\n    microBatches: 4\n", 64},
      {"underscore", "  dataset:\n    maxTrainSamples: 1_000\n", "/spec/dataset/maxTrainSamples", 1000, 9, "without '_'",
       "  dataset:\n    maxTrainSamples: 1000\n", 1000},
      {"binary", "  training:\n    seed: 0b101\n", "/spec/training/seed", 5, 9, "in decimal",
       "  training:\n    seed: 5\n", 5},
      {"hex", "  training:\n    seed: 0x1F\n", "/spec/training/seed", 31, 9, "in decimal",
       "  training:\n    seed: 31\n", 31},
      {"merge-key", "  training: &t {epochs: 2}\n  checkpoint:\n    <<: *t\n", "/spec/checkpoint/epochs", nullptr, 10, "write the fields out",
       "  training: {epochs: 2}\n", nullptr},
      {"repeated-key", "  training:\n    epochs: 1\n    epochs: 3\n", "/spec/training/epochs", 3, 10, "write each key once",
       "  training:\n    epochs: 3\n", 3},
      {"label-on", "  template:\n    nodeSelector: {gpu: on}\n", "/spec/template/nodeSelector/gpu", nullptr, 9, "quote it",
       "  template:\n    nodeSelector: {gpu: \"on\"}\n", "on"},
      {"key-y", "  template:\n    nodeSelector:\n      y: \"1\"\n", "/spec/template/nodeSelector/true", "1", 10, "key",
       "  template:\n    nodeSelector:\n      \"y\": \"1\"\n", nullptr},
  };
}

class YamlMeaning : public testsupport::RealApiTest {
 protected:
  // What the cluster would store for the file, as kubectl sends it (server-side dry run).
  std::optional<json> kubectl_stores(const std::string& file) {
    auto r = api_.kubectl({"create", "--dry-run=server", "-o", "json", "-f", file});
    if (r.code != 0) return std::nullopt;
    json j = json::parse(r.output, nullptr, false);
    if (j.is_discarded()) return std::nullopt;
    return j;
  }
};

TEST_F(YamlMeaning, AmbiguousScalarsAndConstructsAreRefusedByShardctl) {
  for (const YamlCase& c : cases()) {
    SCOPED_TRACE(c.name);
    const std::string file = write(c.name + ".yaml", job(c.name, c.spec));
    // kubectl's reading, on the real server.
    const auto stored = kubectl_stores(file);
    if (c.kubectl_value.is_null()) {
      if (stored) {
        EXPECT_FALSE(stored->contains(json::json_pointer(c.pointer)) &&
                     (*stored)[json::json_pointer(c.pointer)].is_string())
            << "kubectl stored " << stored->dump();
      }
    } else {
      ASSERT_TRUE(stored) << "kubectl refused " << file;
      ASSERT_TRUE(stored->contains(json::json_pointer(c.pointer))) << stored->dump();
      EXPECT_EQ((*stored)[json::json_pointer(c.pointer)], c.kubectl_value);
    }
    // shardctl's: refused, with the line and the advice.
    try {
      load_job_file(file);
      ADD_FAILURE() << "shardctl read " << file << " without an error";
    } catch (const JobSpecError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(file), std::string::npos) << what;
      EXPECT_NE(what.find("line " + std::to_string(c.line) + ","), std::string::npos) << what;
      EXPECT_NE(what.find(c.advice), std::string::npos) << what;
    }
  }
}

TEST_F(YamlMeaning, PortableSpellingMeansTheSameToBoth) {
  for (const YamlCase& c : cases()) {
    if (c.portable_value.is_null()) continue;
    SCOPED_TRACE(c.name);
    const std::string file = write(c.name + "-portable.yaml", job(c.name, c.portable));
    const auto stored = kubectl_stores(file);
    ASSERT_TRUE(stored) << "kubectl refused " << file;
    EXPECT_EQ((*stored)[json::json_pointer(c.pointer)], c.portable_value);
    const json mine = yaml_to_json(job(c.name, c.portable));
    EXPECT_EQ(mine[json::json_pointer(c.pointer)], c.portable_value);
    EXPECT_NO_THROW(load_job_file(file));
  }
}

// kubectl apply acts on every document of a file; shardctl runs one job per file.
TEST_F(YamlMeaning, SeveralDocumentsAreRefused) {
  const std::string file = write("two.yaml", job("first", "") + "---\n" + job("second", ""));
  auto r = api_.kubectl({"create", "--dry-run=server", "-o", "name", "-f", file});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("first"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("second"), std::string::npos) << r.output;
  try {
    load_job_file(file);
    ADD_FAILURE() << "two documents read as one job";
  } catch (const JobSpecError& e) {
    EXPECT_NE(std::string(e.what()).find("second YAML document"), std::string::npos) << e.what();
  }
  // A leading "---" or a trailing empty document is still one job.
  EXPECT_NO_THROW(load_job_file(write("one.yaml", "---\n" + job("only", "") + "---\n")));
}

}  // namespace
}  // namespace shardguard
