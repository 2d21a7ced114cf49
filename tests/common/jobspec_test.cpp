#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace shardguard {
namespace {

using json = nlohmann::json;

// A minimal valid job; tests change one thing at a time.
json minimal_job() {
  return json{
      {"apiVersion", "shardguard.io/v1alpha1"},
      {"kind", "ShardedTrainingJob"},
      {"metadata", {{"name", "fmnist"}}},
      {"spec", {{"model", {{"architecture", "mlp"}}}}},
  };
}

// Runs job_from_json, which must fail, and returns its errors.
std::vector<FieldError> errors_of(const json& object) {
  try {
    job_from_json(object);
  } catch (const JobSpecError& e) {
    return e.errors();
  }
  ADD_FAILURE() << "job_from_json accepted " << object.dump();
  return {};
}

// The single error for `path`, or a failure naming what was reported instead.
std::string error_at(const std::vector<FieldError>& errors, const std::string& path) {
  std::string all;
  for (const FieldError& e : errors) {
    if (e.path == path) return e.str();
    all += e.str() + "\n";
  }
  ADD_FAILURE() << "no error at " << path << "; got:\n" << all;
  return "";
}

std::string one_error(const json& object, const std::string& path) {
  return error_at(errors_of(object), path);
}

std::string example(const std::string& name) {
  return std::string(SHARDGUARD_SOURCE_DIR) + "/examples/" + name;
}

// ---- yaml_to_json ----------------------------------------------------------

TEST(JobSpecYamlTest, TypesPlainScalarsByTheCoreSchema) {
  const json j = yaml_to_json(
      "a: null\n"
      "b: ~\n"
      "c:\n"
      "d: true\n"
      "e: False\n"
      "f: 42\n"
      "g: -7\n"
      "h: 1.5\n"
      "i: .5\n"
      "j: 1e-3\n"
      "k: -2.5E+2\n"
      "s: hello world\n"
      "q: +12\n"
      "r: .inf\n");
  EXPECT_TRUE(j["a"].is_null());
  EXPECT_TRUE(j["b"].is_null());
  EXPECT_TRUE(j["c"].is_null());
  EXPECT_EQ(j["d"], true);
  EXPECT_EQ(j["e"], false);
  ASSERT_TRUE(j["f"].is_number_integer());
  EXPECT_EQ(j["f"].get<int64_t>(), 42);
  ASSERT_TRUE(j["g"].is_number_integer());
  EXPECT_EQ(j["g"].get<int64_t>(), -7);
  ASSERT_TRUE(j["h"].is_number_float());
  EXPECT_DOUBLE_EQ(j["h"].get<double>(), 1.5);
  ASSERT_TRUE(j["i"].is_number_float());
  EXPECT_DOUBLE_EQ(j["i"].get<double>(), 0.5);
  ASSERT_TRUE(j["j"].is_number_float());
  EXPECT_DOUBLE_EQ(j["j"].get<double>(), 0.001);
  EXPECT_DOUBLE_EQ(j["k"].get<double>(), -250.0);
  EXPECT_EQ(j["s"], "hello world");
  EXPECT_EQ(j["q"].get<int64_t>(), 12);
  EXPECT_TRUE(std::isinf(j["r"].get<double>()));
}

// Plain scalars that kubectl (YAML 1.1) and this reader (YAML 1.2) read differently
// are refused, with the line and what to write instead (tests/realapi shows what
// kubectl makes of each on a real API server).
TEST(JobSpecYamlTest, ScalarsYaml11ReadsDifferentlyAreRefused) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"yes", "write true"},   {"No", "write false"},     {"on", "write true"},
      {"OFF", "write false"},  {"y", "write true"},       {"n", "write false"},
      {"064", "leading 0"},    {"-07", "leading 0"},      {"0x1F", "in decimal"},
      {"0o17", "in decimal"},  {"0b101", "in decimal"},   {"-0X1f", "in decimal"},
      {"1_000", "without '_'"}, {"1_000.5", "without '_'"}, {"1:30", "base-60"},
  };
  for (const auto& [text, advice] : cases) {
    SCOPED_TRACE(text);
    try {
      yaml_to_json("a: 1\nb: " + text + "\n");
      ADD_FAILURE() << "accepted";
    } catch (const JobSpecError& e) {
      EXPECT_NE(std::string(e.what()).find("line 2, column 4"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(advice), std::string::npos) << e.what();
    }
    // Quoted, it is a string to both.
    EXPECT_EQ(yaml_to_json("b: \"" + text + "\"\n")["b"], text);
  }
  // Keys too (kubectl turns `y:` into "true"), merge keys, and repeated keys.
  EXPECT_THROW(yaml_to_json("nodeSelector:\n  y: a\n"), JobSpecError);
  EXPECT_THROW(yaml_to_json("a: &x {b: 1}\nc:\n  <<: *x\n"), JobSpecError);
  EXPECT_THROW(yaml_to_json("a: 1\na: 2\n"), JobSpecError);
  // What both read alike stays: 0, decimals, exponents, true/false, null, strings.
  const json same = yaml_to_json("a: 0\nb: 10\nc: 1e-3\nd: 0.5\ne: True\nf: ~\ng: yesterday\nh: 12:30pm\n");
  EXPECT_EQ(same["a"], 0);
  EXPECT_EQ(same["b"], 10);
  EXPECT_EQ(same["e"], true);
  EXPECT_EQ(same["g"], "yesterday");
  EXPECT_EQ(same["h"], "12:30pm");
}

TEST(JobSpecYamlTest, OneDocumentPerText) {
  EXPECT_THROW(yaml_to_json("a: 1\n---\nb: 2\n"), JobSpecError);
  EXPECT_EQ(yaml_to_json("---\na: 1\n---\n")["a"], 1);
}

TEST(JobSpecYamlTest, QuotedAndBlockScalarsStayStrings) {
  const json j = yaml_to_json(
      "a: \"123\"\n"
      "b: 'true'\n"
      "c: \"null\"\n"
      "d: ''\n"
      "e: !!str 1.5\n"
      "f: |\n"
      "  42\n");
  EXPECT_EQ(j["a"], "123");
  EXPECT_EQ(j["b"], "true");
  EXPECT_EQ(j["c"], "null");
  EXPECT_EQ(j["d"], "");
  EXPECT_EQ(j["e"], "1.5");
  EXPECT_EQ(j["f"], "42\n");
}

TEST(JobSpecYamlTest, ConvertsNestedMappingsAndSequences) {
  const json j = yaml_to_json(
      "outer:\n"
      "  list: [1, two, {three: 3}]\n"
      "  empty: {}\n"
      "  none: []\n");
  EXPECT_EQ(j, json::parse(R"({"outer": {"list": [1, "two", {"three": 3}], "empty": {}, "none": []}})"));
}

TEST(JobSpecYamlTest, HugeIntegersBecomeNumbers) {
  const json j = yaml_to_json("a: 18446744073709551615\nb: 99999999999999999999999\n");
  ASSERT_TRUE(j["a"].is_number_unsigned());
  EXPECT_EQ(j["a"].get<uint64_t>(), 18446744073709551615ULL);
  EXPECT_TRUE(j["b"].is_number_float());
}

TEST(JobSpecYamlTest, SyntaxErrorNamesLineAndColumn) {
  try {
    yaml_to_json("a: 1\nb: [1, 2\nc: 3\n");
    FAIL() << "accepted broken YAML";
  } catch (const JobSpecError& e) {
    ASSERT_EQ(e.errors().size(), 1u);
    EXPECT_EQ(e.errors()[0].path, "<yaml>");
    EXPECT_NE(std::string(e.what()).find("line "), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("column "), std::string::npos) << e.what();
  }
  try {
    // A mapping key indented under a scalar value.
    yaml_to_json("kind: ShardedTrainingJob\n  name: x\nspec: {}\n");
    FAIL() << "accepted broken YAML";
  } catch (const JobSpecError& e) {
    EXPECT_EQ(std::string(e.what()).rfind("<yaml>: line 2, column 7", 0), 0u) << e.what();
  }
}

TEST(JobSpecYamlTest, DuplicateKeyIsAnError) {
  try {
    yaml_to_json("a: 1\nb: 2\na: 3\n");
    FAIL() << "accepted a duplicate key";
  } catch (const JobSpecError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("duplicate key \"a\""), std::string::npos) << what;
    EXPECT_NE(what.find("line 3"), std::string::npos) << what;
  }
}

std::string yaml_error(const std::string& text) {
  try {
    yaml_to_json(text);
  } catch (const JobSpecError& e) {
    return e.what();
  }
  return "";
}

// Bounded inputs (issue 16 item 13): deep nesting is refused by a scan before
// yaml-cpp recurses, with the place and the limit, not "bad file" or a crash.
TEST(JobSpecYamlTest, DeepNestingNamesTheLimitAndThePlace) {
  const std::string flow = "spec:\n  model: " + std::string(10000, '[') + std::string(10000, ']') + "\n";
  EXPECT_EQ(yaml_error(flow), "<yaml>: line 2, column 264: nesting deeper than 256 levels");
  std::string block = "spec:\n";
  for (int i = 0; i < 300; ++i) block += std::string(2 + i, ' ') + "a" + std::to_string(i) + ":\n";
  EXPECT_EQ(yaml_error(block), "<yaml>: line 257: nesting deeper than 256 levels");
  std::string dashes;
  for (int i = 0; i < 300; ++i) dashes += "- ";
  EXPECT_EQ(yaml_error(dashes + "x\n"), "<yaml>: line 1: nesting deeper than 256 levels");
  // Brackets in quotes and comments do not count; 200 real levels are within the limit.
  EXPECT_EQ(yaml_error("a: \"" + std::string(1000, '[') + "\"  # " + std::string(1000, '{') + "\n"), "");
  EXPECT_EQ(yaml_error("a: " + std::string(200, '[') + std::string(200, ']') + "\n"), "");
}

// Issue 16 item 4: a path the pods are given is absolute and cannot climb out with "..".
TEST(JobSpecTest, PathFieldsMustBeAbsoluteWithoutDotDot) {
  for (const char* bad : {"datasets/fmnist", "/usr/share/../../etc", "/data/..", "..", "/a/../b"}) {
    SCOPED_TRACE(bad);
    json j = minimal_job();
    j["spec"]["dataset"] = {{"path", bad}};
    EXPECT_EQ(one_error(j, "spec.dataset.path"),
              std::string("spec.dataset.path: must be an absolute path without \"..\" segments, got \"") + bad + "\"");
    j = minimal_job();
    j["spec"]["checkpoint"] = {{"volume", {{"nfs", {{"server", "nfs.local"}, {"path", bad}}}}}};
    EXPECT_NE(one_error(j, "spec.checkpoint.volume.nfs.path").find("must be an absolute path without"), std::string::npos);
  }
  for (const char* good : {"/", "/data", "/data/..x/y", "/a/.../b", "/a/./b"}) {
    json j = minimal_job();
    j["spec"]["dataset"] = {{"path", good}};
    EXPECT_NO_THROW(job_from_json(j)) << good;
  }
}

TEST(JobSpecTest, JobFilesAreReadWithASizeLimit) {
  try {
    load_job_file("/dev/zero");  // grew until std::bad_alloc before
    FAIL() << "read /dev/zero as a job";
  } catch (const JobSpecError& e) {
    EXPECT_NE(std::string(e.what()).find("/dev/zero is larger than 1048576 bytes"), std::string::npos) << e.what();
  }
}

TEST(JobSpecYamlTest, EmptyDocumentIsNull) {
  EXPECT_TRUE(yaml_to_json("").is_null());
  EXPECT_TRUE(yaml_to_json("# only a comment\n").is_null());
}

// ---- job_from_json: decoding and defaults -----------------------------------

TEST(JobSpecTest, MinimalJobGetsDefaults) {
  const JobSpec job = job_from_json(minimal_job());
  EXPECT_EQ(job.name, "fmnist");
  EXPECT_EQ(job.namespace_, "default");
  EXPECT_EQ(job.model.architecture, "mlp");
  EXPECT_EQ(job.model.hidden, 128);
  EXPECT_EQ(job.model.depth, 3);
  EXPECT_EQ(job.dataset.name, "fashion-mnist");
  EXPECT_EQ(job.dataset.path, "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(job.dataset.max_train_samples, 0);
  EXPECT_EQ(job.training.epochs, 1);
  EXPECT_EQ(job.training.batch_size, 128);
  EXPECT_EQ(job.training.micro_batches, 4);
  EXPECT_EQ(job.training.optimizer.name, "adam");
  EXPECT_DOUBLE_EQ(job.training.optimizer.learning_rate, 0.001);
  EXPECT_EQ(job.training.seed, 1u);
  EXPECT_EQ(job.training.schedule, "1f1b");
  EXPECT_EQ(job.training.eval_batch_size, 1000);
  EXPECT_EQ(job.sharding.shards, 1);
  EXPECT_EQ(job.sharding.balance, "parameters");
  EXPECT_DOUBLE_EQ(job.protection.max_exposure, 1.0);
  EXPECT_EQ(job.protection.topology_key, "kubernetes.io/hostname");
  EXPECT_EQ(job.protection.trust_domain, "shardguard.local");
  EXPECT_FALSE(job.protection.export_.allowed);
  EXPECT_TRUE(job.protection.export_.principals.empty());
  EXPECT_EQ(job.checkpoint.every_steps, 500);
  EXPECT_EQ(job.checkpoint.volume, json::object());
  EXPECT_EQ(job.template_, json::object());
  EXPECT_EQ(job.sidecar, json::object());
  EXPECT_EQ(job.run_policy.backoff_limit, 3);
  EXPECT_FALSE(job.run_policy.active_deadline_seconds.has_value());
  EXPECT_FALSE(job.run_policy.ttl_seconds_after_finished.has_value());
  EXPECT_FALSE(job.run_policy.suspend);
}

TEST(JobSpecTest, DecodesEveryField) {
  const json object = json::parse(R"({
    "apiVersion": "shardguard.io/v1alpha1",
    "kind": "ShardedTrainingJob",
    "metadata": {"name": "vit-run", "namespace": "ml", "labels": {"team": "a"}, "uid": "x"},
    "spec": {
      "model": {"architecture": "vit", "hidden": 96, "depth": 6, "channels": 16, "heads": 3, "patchSize": 4},
      "dataset": {"name": "fashion-mnist", "path": "/data/fm", "maxTrainSamples": 1000, "maxTestSamples": 200},
      "training": {"epochs": 5, "batchSize": 256, "microBatches": 8,
                   "optimizer": {"name": "sgd", "learningRate": 0.1, "momentum": 0.9, "weightDecay": 0.0005},
                   "seed": 9223372036854775807, "schedule": "gpipe", "evalBatchSize": 500},
      "sharding": {"shards": 6, "balance": "compute"},
      "protection": {"maxExposure": 0.25, "topologyKey": "topology.kubernetes.io/zone",
                     "trustDomain": "example.org",
                     "export": {"allowed": true, "principals": ["spiffe://example.org/ns/ml/job/vit-run/role/exporter"]}},
      "checkpoint": {"everySteps": 100, "volume": {"persistentVolumeClaim": {"claimName": "ckpt"}}},
      "template": {"image": "shardd:dev", "nodeSelector": {"gpu": "yes"}, "tolerations": []},
      "sidecar": {"image": "sidecar:dev"},
      "runPolicy": {"backoffLimit": 0, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 0, "suspend": true}
    },
    "status": {"phase": "Running", "anything": [1, 2, 3]}
  })");
  const JobSpec job = job_from_json(object);
  EXPECT_EQ(job.name, "vit-run");
  EXPECT_EQ(job.namespace_, "ml");
  EXPECT_EQ(job.model.architecture, "vit");
  EXPECT_EQ(job.model.hidden, 96);
  EXPECT_EQ(job.model.depth, 6);
  EXPECT_EQ(job.model.channels, 16);
  EXPECT_EQ(job.model.heads, 3);
  EXPECT_EQ(job.model.patch_size, 4);
  EXPECT_EQ(job.dataset.path, "/data/fm");
  EXPECT_EQ(job.dataset.max_train_samples, 1000);
  EXPECT_EQ(job.dataset.max_test_samples, 200);
  EXPECT_EQ(job.training.epochs, 5);
  EXPECT_EQ(job.training.batch_size, 256);
  EXPECT_EQ(job.training.micro_batches, 8);
  EXPECT_EQ(job.training.optimizer.name, "sgd");
  EXPECT_DOUBLE_EQ(job.training.optimizer.learning_rate, 0.1);
  EXPECT_DOUBLE_EQ(job.training.optimizer.momentum, 0.9);
  EXPECT_DOUBLE_EQ(job.training.optimizer.weight_decay, 0.0005);
  EXPECT_EQ(job.training.seed, 9223372036854775807ULL);
  EXPECT_EQ(job.training.schedule, "gpipe");
  EXPECT_EQ(job.training.eval_batch_size, 500);
  EXPECT_EQ(job.sharding.shards, 6);
  EXPECT_EQ(job.sharding.balance, "compute");
  EXPECT_DOUBLE_EQ(job.protection.max_exposure, 0.25);
  EXPECT_EQ(job.protection.topology_key, "topology.kubernetes.io/zone");
  EXPECT_EQ(job.protection.trust_domain, "example.org");
  EXPECT_TRUE(job.protection.export_.allowed);
  ASSERT_EQ(job.protection.export_.principals.size(), 1u);
  EXPECT_EQ(job.checkpoint.every_steps, 100);
  EXPECT_EQ(job.checkpoint.volume["persistentVolumeClaim"]["claimName"], "ckpt");
  EXPECT_EQ(job.template_, object["spec"]["template"]);
  EXPECT_EQ(job.sidecar, object["spec"]["sidecar"]);
  EXPECT_EQ(job.run_policy.backoff_limit, 0);
  EXPECT_EQ(job.run_policy.active_deadline_seconds, 3600);
  EXPECT_EQ(job.run_policy.ttl_seconds_after_finished, 0);
  EXPECT_TRUE(job.run_policy.suspend);
}

TEST(JobSpecTest, NullFieldsKeepDefaults) {
  json object = minimal_job();
  object["spec"]["runPolicy"] = {{"activeDeadlineSeconds", nullptr},
                                 {"ttlSecondsAfterFinished", nullptr},
                                 {"suspend", false}};
  object["spec"]["training"] = {{"epochs", nullptr}};
  object["spec"]["sharding"] = nullptr;
  const JobSpec job = job_from_json(object);
  EXPECT_FALSE(job.run_policy.active_deadline_seconds.has_value());
  EXPECT_FALSE(job.run_policy.ttl_seconds_after_finished.has_value());
  EXPECT_EQ(job.training.epochs, 1);
  EXPECT_EQ(job.sharding.shards, 1);
}

TEST(JobSpecTest, WholeNumberFloatsAreAcceptedAsIntegers) {
  json object = minimal_job();
  object["spec"]["training"] = {{"batchSize", 64.0}};
  EXPECT_EQ(job_from_json(object).training.batch_size, 64);
  object["spec"]["training"] = {{"batchSize", 64.5}};
  EXPECT_EQ(one_error(object, "spec.training.batchSize"),
            "spec.training.batchSize: expected an integer, got number 64.5");
}

// ---- job_from_json: structural errors --------------------------------------

TEST(JobSpecTest, RejectsWrongApiVersionAndKind) {
  json object = minimal_job();
  object["apiVersion"] = "shardguard.io/v1";
  object["kind"] = "Job";
  const auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "apiVersion"),
            "apiVersion: must be \"shardguard.io/v1alpha1\", got string \"shardguard.io/v1\"");
  EXPECT_EQ(error_at(errors, "kind"), "kind: must be \"ShardedTrainingJob\", got string \"Job\"");

  object.erase("apiVersion");
  EXPECT_NE(one_error(object, "apiVersion").find("required"), std::string::npos);
}

TEST(JobSpecTest, RejectsNonObjects) {
  const auto errors = errors_of(json::array({1, 2}));
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].str().find("got array [1,2]"), std::string::npos) << errors[0].str();

  json object = minimal_job();
  object["spec"]["model"] = "mlp";
  EXPECT_EQ(one_error(object, "spec.model"), "spec.model: expected an object, got string \"mlp\"");
}

TEST(JobSpecTest, MissingMetadataAndSpecAreReportedOnce) {
  json object = minimal_job();
  object.erase("metadata");
  object.erase("spec");
  const auto errors = errors_of(object);
  EXPECT_NE(error_at(errors, "metadata").find("required"), std::string::npos);
  EXPECT_NE(error_at(errors, "spec").find("required"), std::string::npos);
  // No follow-up errors under the missing objects.
  EXPECT_EQ(errors.size(), 2u);
}

TEST(JobSpecTest, WrongTypesNameExpectedTypeAndValue) {
  json object = minimal_job();
  object["spec"]["training"] = {{"batchSize", "64"}, {"seed", -1}};
  object["spec"]["runPolicy"] = {{"suspend", "yes"}};
  object["spec"]["protection"] = {{"maxExposure", "half"},
                                  {"export", {{"principals", "spiffe://a/b"}}}};
  object["spec"]["template"] = "shardd:latest";
  object["spec"]["model"]["hidden"] = 10000000000LL;
  const auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.training.batchSize"),
            "spec.training.batchSize: expected an integer, got string \"64\"");
  EXPECT_EQ(error_at(errors, "spec.training.seed"),
            "spec.training.seed: must be at least 0, got -1");
  EXPECT_EQ(error_at(errors, "spec.runPolicy.suspend"),
            "spec.runPolicy.suspend: expected a boolean (true or false), got string \"yes\"");
  EXPECT_EQ(error_at(errors, "spec.protection.maxExposure"),
            "spec.protection.maxExposure: expected a number, got string \"half\"");
  EXPECT_EQ(error_at(errors, "spec.protection.export.principals"),
            "spec.protection.export.principals: expected an array of strings, got string "
            "\"spiffe://a/b\"");
  EXPECT_EQ(error_at(errors, "spec.template"),
            "spec.template: expected an object, got string \"shardd:latest\"");
  EXPECT_NE(error_at(errors, "spec.model.hidden").find("out of range"), std::string::npos);
  EXPECT_NE(error_at(errors, "spec.model.hidden").find("10000000000"), std::string::npos);
  // Type errors are not repeated by validation of the default left in place.
  EXPECT_EQ(errors.size(), 7u);
}

TEST(JobSpecTest, NonStringPrincipalNamesItsIndex) {
  json object = minimal_job();
  object["spec"]["protection"] = {
      {"export", {{"allowed", true}, {"principals", {"spiffe://shardguard.local/x", 7}}}}};
  EXPECT_EQ(one_error(object, "spec.protection.export.principals[1]"),
            "spec.protection.export.principals[1]: expected a string, got integer 7");
}

TEST(JobSpecTest, UnknownFieldsAreRejected) {
  json object = minimal_job();
  object["spec"]["model"]["hiden"] = 64;
  object["spec"]["trainning"] = {{"epochs", 1}};
  object["spec"]["training"] = {{"optimizer", {{"lr", 0.1}}}};
  object["spec"]["runPolicy"] = {{"restartPolicy", "Never"}};
  const auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.model.hiden"),
            "spec.model.hiden: unknown field \"hiden\" (did you mean \"hidden\"?)");
  EXPECT_NE(error_at(errors, "spec.trainning").find("unknown field \"trainning\""),
            std::string::npos);
  EXPECT_NE(error_at(errors, "spec.training.optimizer.lr").find("unknown field \"lr\""),
            std::string::npos);
  EXPECT_NE(error_at(errors, "spec.runPolicy.restartPolicy").find("known fields: backoffLimit"),
            std::string::npos);
  EXPECT_EQ(errors.size(), 4u);
}

// template, sidecar and the volume source are kept as given for the pods, but
// only with the fields the CRD declares (the operator would ignore any other).
TEST(JobSpecTest, TemplateSidecarVolumeAndRootAreClosed) {
  json object = minimal_job();
  object["spec"]["template"] = {{"anything", {{"goes", true}}}};
  object["spec"]["sidecar"] = {{"image", "s"}, {"env", json::array()}};
  object["spec"]["checkpoint"] = {{"volume", {{"hostPath", {{"path", "/ckpt"}}}}}};
  object["metadata"]["annotations"] = {{"a", "b"}};
  object["somethingTopLevel"] = 1;
  const auto errors = errors_of(object);
  EXPECT_NE(error_at(errors, "spec.template.anything").find("unknown field"), std::string::npos);
  EXPECT_NE(error_at(errors, "spec.sidecar.env").find("unknown field"), std::string::npos);
  EXPECT_NE(error_at(errors, "spec.checkpoint.volume.hostPath").find("unknown field"), std::string::npos);
  EXPECT_NE(error_at(errors, "somethingTopLevel").find("unknown field"), std::string::npos);
  EXPECT_EQ(errors.size(), 4u);

  json good = minimal_job();
  good["spec"]["template"] = {{"image", "shardd:1"}, {"nodeSelector", {{"pool", "gpu"}}}};
  good["spec"]["checkpoint"] = {{"volume", {{"nfs", {{"server", "nfs"}, {"path", "/ckpt"}}}}}};
  const JobSpec job = job_from_json(good);
  EXPECT_EQ(job.template_, good["spec"]["template"]);
  EXPECT_EQ(job.checkpoint.volume, good["spec"]["checkpoint"]["volume"]);
}

TEST(JobSpecTest, CollectsAllErrorsIntoOneException) {
  json object = minimal_job();
  object["spec"]["model"]["architecture"] = "resnet";
  object["spec"]["training"] = {{"batchSize", 0}, {"epochs", 0}};
  object["spec"]["sharding"] = {{"shards", 65}};
  try {
    job_from_json(object);
    FAIL() << "accepted an invalid job";
  } catch (const JobSpecError& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.errors().size(), 4u) << what;
    EXPECT_NE(what.find("spec.model.architecture: unsupported architecture \"resnet\" (expected one "
                        "of: \"mlp\", \"cnn\", \"vit\", \"gpt\", \"torchscript\")"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("spec.training.batchSize: must be at least 1, got 0"), std::string::npos)
        << what;
    EXPECT_NE(what.find("spec.training.epochs: must be at least 1, got 0"), std::string::npos)
        << what;
    EXPECT_NE(what.find("spec.sharding.shards: must be at most 64, got 65"), std::string::npos)
        << what;
    // One error per line.
    EXPECT_EQ(std::count(what.begin(), what.end(), '\n'), 3) << what;
  }
}

// ---- validation ------------------------------------------------------------

TEST(JobSpecTest, ArchitectureIsRequired) {
  json object = minimal_job();
  object["spec"]["model"].erase("architecture");
  EXPECT_EQ(one_error(object, "spec.model.architecture"),
            "spec.model.architecture: required, got nothing (expected one of: \"mlp\", \"cnn\", \"vit\", \"gpt\", "
            "\"torchscript\")");
}

TEST(JobSpecTest, ModelRanges) {
  json object = minimal_job();
  object["spec"]["model"] = {{"architecture", "cnn"}, {"hidden", 0}, {"depth", 65}, {"channels", 513}};
  const auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.model.hidden"), "spec.model.hidden: must be at least 1, got 0");
  EXPECT_EQ(error_at(errors, "spec.model.depth"), "spec.model.depth: must be at most 64, got 65");
  EXPECT_EQ(error_at(errors, "spec.model.channels"),
            "spec.model.channels: must be at most 512, got 513");

  object["spec"]["model"] = {{"architecture", "mlp"}, {"hidden", 4097}};
  EXPECT_EQ(one_error(object, "spec.model.hidden"),
            "spec.model.hidden: must be at most 4096, got 4097");
}

TEST(JobSpecTest, VitHeadsAndPatchSize) {
  json object = minimal_job();
  object["spec"]["model"] = {{"architecture", "vit"}, {"hidden", 64}, {"heads", 5}, {"patchSize", 5}};
  const auto errors = errors_of(object);
  const std::string heads = error_at(errors, "spec.model.heads");
  EXPECT_NE(heads.find("64"), std::string::npos) << heads;
  EXPECT_NE(heads.find("heads 5"), std::string::npos) << heads;
  const std::string patch = error_at(errors, "spec.model.patchSize");
  EXPECT_NE(patch.find("got 5"), std::string::npos) << patch;
  EXPECT_NE(patch.find("1, 2, 4, 7, 14, 28"), std::string::npos) << patch;

  object["spec"]["model"]["heads"] = 0;
  object["spec"]["model"]["patchSize"] = 14;
  EXPECT_EQ(one_error(object, "spec.model.heads"), "spec.model.heads: must be at least 1, got 0");

  // Not checked for other architectures, where they are unused.
  object["spec"]["model"] = {{"architecture", "mlp"}, {"hidden", 64}, {"heads", 5}, {"patchSize", 5}};
  EXPECT_NO_THROW(job_from_json(object));
}

TEST(JobSpecTest, PackageOfATorchScriptModel) {
  json j = minimal_job();
  j["spec"]["model"] = {{"architecture", "torchscript"},
                        {"context", 16},
                        {"package",
                         {{"path", "/packages/lm"},
                          {"keysSecret", "lm-package-keys"},
                          {"volume", {{"persistentVolumeClaim", {{"claimName", "models"}, {"readOnly", true}}}}}}}};
  j["spec"]["dataset"] = {{"format", "tokens"}, {"path", "/data/text"}};
  const JobSpec job = job_from_json(j);
  ASSERT_TRUE(job.model.package.has_value());
  EXPECT_TRUE(job.model.from_package());
  EXPECT_TRUE(job.model.language_model()) << "token data: a language model";
  EXPECT_EQ(job.model.package->path, "/packages/lm");
  EXPECT_EQ(job.model.package->keys_secret, "lm-package-keys");
  EXPECT_EQ(job.model.package->volume["persistentVolumeClaim"]["claimName"], "models");
  // Image data: a classifier, which is fine for a torchscript model (its manifest's
  // shapes are checked against the data when it starts).
  j["spec"].erase("dataset");
  const JobSpec images = job_from_json(j);
  EXPECT_FALSE(images.model.language_model());

  json no_package = minimal_job();
  no_package["spec"]["model"] = {{"architecture", "torchscript"}};
  EXPECT_NE(one_error(no_package, "spec.model.package").find("required for architecture torchscript"),
            std::string::npos);

  json zoo = minimal_job();
  zoo["spec"]["model"]["package"] = {{"path", "/p"}, {"keysSecret", "k"}};
  EXPECT_EQ(one_error(zoo, "spec.model.package"),
            "spec.model.package: only for architecture torchscript, got architecture \"mlp\" (a zoo model is built, "
            "not loaded)");

  auto with_package = [](const json& package) {
    json k = minimal_job();
    k["spec"]["model"] = {{"architecture", "torchscript"}, {"package", package}};
    return k;
  };
  EXPECT_EQ(one_error(with_package({{"path", "packages"}, {"keysSecret", "k"}}), "spec.model.package.path"),
            "spec.model.package.path: must be an absolute path without \"..\" segments, got \"packages\"");
  EXPECT_EQ(one_error(with_package({{"path", "/p"}, {"keysSecret", "Keys_1"}}), "spec.model.package.keysSecret"),
            "spec.model.package.keysSecret: must be a Secret name (a DNS-1123 subdomain of at most 253 characters), "
            "got \"Keys_1\"");
  EXPECT_NE(one_error(with_package({{"path", "/p"}}), "spec.model.package.keysSecret").find("required"),
            std::string::npos);
  EXPECT_NE(one_error(with_package({{"path", "/p"}, {"keysSecret", "k"}, {"volume", {{"emptyDir", json::object()}}}}),
                      "spec.model.package.volume.emptyDir")
                .find("unknown field"),
            std::string::npos);
  // Exactly one of path and url; a volume only with a path.
  EXPECT_EQ(one_error(with_package({{"path", "/p"}, {"keysSecret", "k"}, {"url", "https://x/"}}),
                      "spec.model.package"),
            "spec.model.package: must have exactly one of path and url, got both");
  EXPECT_EQ(one_error(with_package({{"keysSecret", "k"}}), "spec.model.package"),
            "spec.model.package: must have exactly one of path and url, got neither");
  EXPECT_EQ(one_error(with_package({{"url", "https://x/p/"},
                                    {"keysSecret", "k"},
                                    {"volume", {{"persistentVolumeClaim", {{"claimName", "m"}}}}}}),
                      "spec.model.package.volume"),
            "spec.model.package.volume: only with spec.model.package.path (a url is fetched, not mounted)");
}

TEST(JobSpecTest, PackageUrl) {
  auto with_url = [](const std::string& url) {
    json k = minimal_job();
    k["spec"]["model"] = {{"architecture", "torchscript"}, {"package", {{"url", url}, {"keysSecret", "k"}}}};
    return k;
  };
  const JobSpec job = job_from_json(with_url("https://models.example.com:8443/fortunes/v1/"));
  ASSERT_TRUE(job.model.package.has_value());
  EXPECT_EQ(job.model.package->url, "https://models.example.com:8443/fortunes/v1/");
  EXPECT_EQ(job.model.package->path, "");
  EXPECT_TRUE(job.model.package->volume.empty());
  for (const std::string good : {"http://127.0.0.1:8000/", "https://h/", "https://a-b.c/x/y.z/",
                                 "https://bucket.s3.amazonaws.com/m%20v1/", "http://h/a~b_c-1/(x)/@v=2;k!$&'*+,:/",
                                 "https://h:1/", "http://x1/"}) {
    SCOPED_TRACE(good);
    EXPECT_TRUE(is_package_url(good));
    EXPECT_NO_THROW(job_from_json(with_url(good)));
  }
  for (const std::string bad : {"https://h", "https://h/p", "ftp://h/", "HTTPS://h/", "https:///p/", "https://-h/",
                                "https://h-/", "https://user@h/", "https://h:/", "https://h:123456/", "https://h//",
                                "https://h/a//b/", "https://h/?q=1/", "https://h/#f/", "https://h/a b/",
                                "https://[::1]/", "https://h/\xc3\xa9/", "//h/", "/packages/", "https://h:80x/"}) {
    SCOPED_TRACE(bad);
    EXPECT_FALSE(is_package_url(bad));
    EXPECT_NE(one_error(with_url(bad), "spec.model.package.url").find("must be an http:// or https:// URL prefix"),
              std::string::npos);
  }
  EXPECT_NE(one_error(with_url("https://h/" + std::string(2040, 'a') + "/"), "spec.model.package.url")
                .find("2048"),
            std::string::npos);
}

TEST(JobSpecTest, DatasetFormatsAndNames) {
  json object = minimal_job();
  object["spec"]["dataset"] = {{"name", ""}, {"format", "cifar10"}, {"maxTrainSamples", -1}};
  const auto errors = errors_of(object);
  const std::string format = error_at(errors, "spec.dataset.format");
  EXPECT_NE(format.find("unsupported dataset format \"cifar10\" (expected one of: \"fashion-mnist\", \"tokens\", \"tensors\")"),
            std::string::npos) << format;
  EXPECT_NE(error_at(errors, "spec.dataset.name"), "");
  EXPECT_EQ(error_at(errors, "spec.dataset.maxTrainSamples"),
            "spec.dataset.maxTrainSamples: must be at least 0, got -1");
  // The name is a free label.
  object["spec"]["dataset"] = {{"name", "fortunes"}};
  EXPECT_EQ(job_from_json(object).dataset.name, "fortunes");
  EXPECT_EQ(job_from_json(object).dataset.format, "fashion-mnist");
}

// gpt: vocab and context (defaults 256 and 128), heads dividing hidden, and token
// data; a classifier cannot read tokens, gpt cannot read images.
TEST(JobSpecTest, GptFieldsAndItsDataFormat) {
  json object = minimal_job();
  object["spec"]["model"] = {{"architecture", "gpt"}};
  object["spec"]["dataset"] = {{"name", "fortunes"}, {"format", "tokens"}, {"path", "/data/fortunes"}};
  JobSpec job = job_from_json(object);
  EXPECT_EQ(job.model.vocab, 256);
  EXPECT_EQ(job.model.context, 128);
  EXPECT_TRUE(job.model.language_model());

  object["spec"]["model"] = {{"architecture", "gpt"}, {"hidden", 100}, {"heads", 3}, {"vocab", 70000},
                             {"context", 0}};
  auto errors = errors_of(object);
  EXPECT_NE(error_at(errors, "spec.model.heads").find("hidden 100 is not divisible by heads 3"), std::string::npos);
  EXPECT_EQ(error_at(errors, "spec.model.vocab"), "spec.model.vocab: must be at most 65536, got 70000");
  EXPECT_EQ(error_at(errors, "spec.model.context"), "spec.model.context: must be at least 1, got 0");

  object["spec"]["model"] = {{"architecture", "gpt"}};
  object["spec"]["dataset"] = {{"path", "/usr/share/datasets/fashion-mnist"}};
  const std::string e = one_error(object, "spec.dataset.format");
  EXPECT_NE(e.find("architecture gpt needs format tokens, got \"fashion-mnist\""), std::string::npos) << e;

  object["spec"]["model"] = {{"architecture", "cnn"}};
  object["spec"]["dataset"] = {{"format", "tokens"}};
  const std::string c = one_error(object, "spec.dataset.format");
  EXPECT_NE(c.find("architecture cnn needs format fashion-mnist or tensors, got \"tokens\""), std::string::npos) << c;

  object["spec"]["model"] = {{"architecture", "gpt"}};
  object["spec"]["dataset"] = {{"format", "tensors"}, {"path", "/data/x"}};
  const std::string t = one_error(object, "spec.dataset.format");
  EXPECT_NE(t.find("architecture gpt needs format tokens, got \"tensors\""), std::string::npos) << t;
  object["spec"]["model"] = {{"architecture", "mlp"}};
  EXPECT_EQ(job_from_json(object).dataset.format, "tensors");  // a classifier takes .npy tensors
}

TEST(JobSpecTest, MicroBatchesMustDivideBatchSize) {
  json object = minimal_job();
  object["spec"]["training"] = {{"batchSize", 100}, {"microBatches", 8}};
  const std::string e = one_error(object, "spec.training.microBatches");
  EXPECT_EQ(e, "spec.training.microBatches: batchSize 100 is not divisible by microBatches 8");

  object["spec"]["training"] = {{"batchSize", 4}, {"microBatches", 8}};
  EXPECT_EQ(one_error(object, "spec.training.microBatches"),
            "spec.training.microBatches: must be at most batchSize (4), got 8");

  object["spec"]["training"] = {{"microBatches", 0}};
  EXPECT_EQ(one_error(object, "spec.training.microBatches"),
            "spec.training.microBatches: must be at least 1, got 0");

  object["spec"]["training"] = {{"batchSize", 65537}};
  EXPECT_EQ(one_error(object, "spec.training.batchSize"),
            "spec.training.batchSize: must be at most 65536, got 65537");
}

TEST(JobSpecTest, OptimizerRanges) {
  json object = minimal_job();
  object["spec"]["training"] = {
      {"optimizer", {{"name", "rmsprop"}, {"learningRate", 0}, {"momentum", 1.0}, {"weightDecay", -0.1}}},
      {"schedule", "interleaved"},
      {"evalBatchSize", 0},
      {"epochs", 1001}};
  const auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.training.optimizer.name"),
            "spec.training.optimizer.name: unsupported optimizer \"rmsprop\" (expected one of: \"sgd\", \"adam\")");
  EXPECT_EQ(error_at(errors, "spec.training.optimizer.learningRate"),
            "spec.training.optimizer.learningRate: must be greater than 0, got 0.0");
  EXPECT_EQ(error_at(errors, "spec.training.optimizer.momentum"),
            "spec.training.optimizer.momentum: must be in [0, 1), got 1.0");
  EXPECT_NE(error_at(errors, "spec.training.optimizer.weightDecay").find("got -0.1"),
            std::string::npos);
  EXPECT_EQ(error_at(errors, "spec.training.schedule"),
            "spec.training.schedule: unsupported schedule \"interleaved\" (expected one of: \"1f1b\", \"gpipe\")");
  EXPECT_EQ(error_at(errors, "spec.training.evalBatchSize"),
            "spec.training.evalBatchSize: must be at least 1, got 0");
  EXPECT_EQ(error_at(errors, "spec.training.epochs"),
            "spec.training.epochs: must be at most 1000, got 1001");

  object["spec"]["training"] = {{"optimizer", {{"learningRate", 10.5}}}};
  EXPECT_EQ(one_error(object, "spec.training.optimizer.learningRate"),
            "spec.training.optimizer.learningRate: must be at most 10, got 10.5");

  object["spec"]["training"] = {{"optimizer", {{"warmupSteps", -1}, {"decay", "linear"}}}};
  const auto schedule = errors_of(object);
  EXPECT_EQ(error_at(schedule, "spec.training.optimizer.warmupSteps"),
            "spec.training.optimizer.warmupSteps: must be at least 0, got -1");
  EXPECT_EQ(error_at(schedule, "spec.training.optimizer.decay"),
            "spec.training.optimizer.decay: unsupported learning-rate decay \"linear\" (expected one of: "
            "\"constant\", \"cosine\")");
}

TEST(JobSpecTest, LearningRateScheduleWarmsUpThenDecays) {
  OptimizerSpec o;
  o.learning_rate = 0.01;
  // Constant (the default): every step at the rate.
  EXPECT_EQ(learning_rate_at(o, 0, 100), 0.01);
  EXPECT_EQ(learning_rate_at(o, 99, 100), 0.01);
  // Warm-up: (step + 1) / warmup of the rate, then the rate.
  o.warmup_steps = 4;
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 0, 100), 0.0025);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 2, 100), 0.0075);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 3, 100), 0.01);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 50, 100), 0.01);
  // Cosine: the peak right after the warm-up, half-way (0.1 + 0.9 / 2) at the
  // middle, a tenth at the last step and after it.
  o.decay = "cosine";
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 2, 100), 0.0075);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 4, 105), 0.01);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 54, 105), 0.0055);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 104, 105), 0.001);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 200, 105), 0.001);
  double previous = 1;
  for (int64_t step = 4; step < 105; ++step) {
    const double lr = learning_rate_at(o, step, 105);
    EXPECT_LT(lr, previous) << step;
    previous = lr;
  }
  // A job of one step runs it at the peak; of two, at the peak and then a tenth.
  o.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 0, 1), 0.01);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 1, 2), 0.001);
  EXPECT_DOUBLE_EQ(learning_rate_at(o, 0, 2), 0.01);
}

TEST(JobSpecTest, ShardingRanges) {
  json object = minimal_job();
  object["spec"]["sharding"] = {{"shards", 0}, {"balance", "memory"}};
  const auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.sharding.shards"), "spec.sharding.shards: must be at least 1, got 0");
  EXPECT_EQ(error_at(errors, "spec.sharding.balance"),
            "spec.sharding.balance: unsupported balance \"memory\" (expected one of: \"parameters\", \"compute\")");
}

TEST(JobSpecTest, ReplicasDefaultBoundsAndNameLength) {
  json object = minimal_job();
  EXPECT_EQ(job_from_json(object).sharding.replicas, 1);
  object["spec"]["sharding"] = {{"shards", 2}, {"replicas", 4}};
  EXPECT_EQ(job_from_json(object).sharding.replicas, 4);

  object["spec"]["sharding"] = {{"replicas", 0}};
  EXPECT_EQ(one_error(object, "spec.sharding.replicas"), "spec.sharding.replicas: must be at least 1, got 0");
  object["spec"]["sharding"] = {{"replicas", 17}};
  EXPECT_EQ(one_error(object, "spec.sharding.replicas"), "spec.sharding.replicas: must be at most 16, got 17");
  object["spec"]["sharding"] = {{"replicas", "two"}};
  EXPECT_NE(error_at(errors_of(object), "spec.sharding.replicas").find("\"two\""), std::string::npos);

  // "<name>-shard-63-r15" must stay within 63 characters: 48 for a replicated job, 52 otherwise.
  object["spec"]["sharding"] = {{"replicas", 2}};
  object["metadata"]["name"] = std::string(48, 'a');
  EXPECT_NO_THROW(job_from_json(object));
  object["metadata"]["name"] = std::string(49, 'a');
  EXPECT_NE(error_at(errors_of(object), "metadata.name").find("when spec.sharding.replicas > 1"), std::string::npos);
  object["spec"]["sharding"] = {{"replicas", 1}};
  EXPECT_NO_THROW(job_from_json(object));
}

TEST(JobSpecTest, ProtectionRules) {
  json object = minimal_job();
  object["spec"]["protection"] = {{"maxExposure", 0},
                                  {"topologyKey", ""},
                                  {"trustDomain", "ShardGuard.Local"},
                                  {"export", {{"allowed", true}}}};
  auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.protection.maxExposure"),
            "spec.protection.maxExposure: must be in (0, 1], got 0.0");
  EXPECT_NE(error_at(errors, "spec.protection.topologyKey").find("must not be empty"),
            std::string::npos);
  EXPECT_NE(error_at(errors, "spec.protection.trustDomain").find("\"ShardGuard.Local\""),
            std::string::npos);
  EXPECT_NE(error_at(errors, "spec.protection.export.principals").find("export.allowed is true"),
            std::string::npos);

  object["spec"]["protection"] = {
      {"maxExposure", 1.5},
      {"export",
       {{"allowed", true},
        {"principals", {"spiffe://shardguard.local/ns/default/job/fmnist/role/exporter",
                        "https://example.org/x", "spiffe:///no-domain", "spiffe://td/a//b"}}}}};
  errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.protection.maxExposure"),
            "spec.protection.maxExposure: must be in (0, 1], got 1.5");
  EXPECT_NE(error_at(errors, "spec.protection.export.principals[1]").find("\"https://example.org/x\""),
            std::string::npos);
  error_at(errors, "spec.protection.export.principals[2]");
  error_at(errors, "spec.protection.export.principals[3]");
  EXPECT_EQ(errors.size(), 4u);
}

// One SPIFFE ID rule for the job, the policy and the certificates (pki.h): a trust
// domain alone names no workload, so a job cannot name it as an export principal and
// then fail at render when its policy is built.
TEST(JobSpecTest, PrincipalWithoutAPathIsRefusedWithTheReason) {
  json object = minimal_job();
  object["spec"]["protection"] = {{"export", {{"allowed", true}, {"principals", {"spiffe://td"}}}}};
  const std::string e = one_error(object, "spec.protection.export.principals[0]");
  EXPECT_NE(e.find("path is empty"), std::string::npos) << e;
  EXPECT_NE(e.find(validate_spiffe_id("spiffe://td")), std::string::npos) << e;
}

TEST(JobSpecTest, CheckpointAndRunPolicyRanges) {
  json object = minimal_job();
  object["spec"]["checkpoint"] = {{"everySteps", 0}};
  object["spec"]["runPolicy"] = {{"backoffLimit", 101},
                                 {"activeDeadlineSeconds", 0},
                                 {"ttlSecondsAfterFinished", -5}};
  const auto errors = errors_of(object);
  EXPECT_EQ(error_at(errors, "spec.checkpoint.everySteps"),
            "spec.checkpoint.everySteps: must be at least 1, got 0");
  EXPECT_EQ(error_at(errors, "spec.runPolicy.backoffLimit"),
            "spec.runPolicy.backoffLimit: must be at most 100, got 101");
  EXPECT_EQ(error_at(errors, "spec.runPolicy.activeDeadlineSeconds"),
            "spec.runPolicy.activeDeadlineSeconds: must be at least 1, got 0");
  EXPECT_EQ(error_at(errors, "spec.runPolicy.ttlSecondsAfterFinished"),
            "spec.runPolicy.ttlSecondsAfterFinished: must be at least 0, got -5");
}

TEST(JobSpecTest, NamesAreDnsLabels) {
  json object = minimal_job();
  object["metadata"] = {{"name", "Fmnist_CNN"}, {"namespace", "-ml"}};
  auto errors = errors_of(object);
  EXPECT_NE(error_at(errors, "metadata.name").find("got \"Fmnist_CNN\""), std::string::npos);
  EXPECT_NE(error_at(errors, "metadata.namespace").find("got \"-ml\""), std::string::npos);

  // 52 characters fit ("<name>-shard-63" is 61); 53 do not.
  object["metadata"] = {{"name", std::string(52, 'a')}};
  EXPECT_NO_THROW(job_from_json(object));
  object["metadata"] = {{"name", std::string(53, 'a')}};
  const std::string e = one_error(object, "metadata.name");
  EXPECT_NE(e.find("at most 52 characters"), std::string::npos) << e;
  EXPECT_NE(e.find("got 53"), std::string::npos) << e;

  object["metadata"] = json::object();
  EXPECT_NE(one_error(object, "metadata.name").find("required"), std::string::npos);
}

TEST(JobSpecTest, ValidateWorksOnAStructDirectly) {
  JobSpec job;
  job.name = "direct";
  job.model.architecture = "mlp";
  EXPECT_TRUE(validate(job).empty());

  job.sharding.shards = 100;
  job.training.micro_batches = 3;  // 128 % 3 != 0
  const auto errors = validate(job);
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_EQ(error_at(errors, "spec.sharding.shards"), "spec.sharding.shards: must be at most 64, got 100");
  EXPECT_EQ(error_at(errors, "spec.training.microBatches"),
            "spec.training.microBatches: batchSize 128 is not divisible by microBatches 3");
}

// ---- YAML documents and files ----------------------------------------------

TEST(JobSpecYamlTest, QuotedNumberIsAStringAndFailsTheTypeCheck) {
  const json object = yaml_to_json(
      "apiVersion: shardguard.io/v1alpha1\n"
      "kind: ShardedTrainingJob\n"
      "metadata: {name: quoted}\n"
      "spec:\n"
      "  model: {architecture: mlp}\n"
      "  training: {batchSize: \"123\"}\n");
  EXPECT_EQ(object["spec"]["training"]["batchSize"], "123");
  EXPECT_EQ(one_error(object, "spec.training.batchSize"),
            "spec.training.batchSize: expected an integer, got string \"123\"");
}

class JobSpecFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("jobspec_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    const auto path = dir_ / name;
    std::ofstream(path) << text;
    return path.string();
  }

  std::filesystem::path dir_;
};

TEST_F(JobSpecFileTest, MissingFileNamesThePath) {
  const std::string path = (dir_ / "nope.yaml").string();
  try {
    load_job_file(path);
    FAIL() << "loaded a missing file";
  } catch (const JobSpecError& e) {
    ASSERT_EQ(e.errors().size(), 1u);
    EXPECT_EQ(e.errors()[0].path, path);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
  }
  EXPECT_THROW(load_job_file(dir_.string()), JobSpecError);
}

TEST_F(JobSpecFileTest, SyntaxErrorNamesTheFileAndLine) {
  const std::string path = write("broken.yaml", "apiVersion: shardguard.io/v1alpha1\nspec: [\n");
  try {
    load_job_file(path);
    FAIL() << "loaded broken YAML";
  } catch (const JobSpecError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind(path + ": line ", 0), 0u) << what;
  }
}

TEST_F(JobSpecFileTest, DecodeErrorsKeepFieldPaths) {
  const std::string path = write("bad.yaml",
                                 "apiVersion: shardguard.io/v1alpha1\n"
                                 "kind: ShardedTrainingJob\n"
                                 "metadata: {name: bad}\n"
                                 "spec:\n"
                                 "  model: {architecture: resnet}\n"
                                 "  training: {batchSize: 0}\n");
  try {
    load_job_file(path);
    FAIL() << "loaded an invalid job";
  } catch (const JobSpecError& e) {
    EXPECT_EQ(error_at(e.errors(), "spec.model.architecture"),
              "spec.model.architecture: unsupported architecture \"resnet\" (expected one of: "
              "\"mlp\", \"cnn\", \"vit\", \"gpt\", \"torchscript\")");
    EXPECT_EQ(error_at(e.errors(), "spec.training.batchSize"),
              "spec.training.batchSize: must be at least 1, got 0");
  }
}

TEST_F(JobSpecFileTest, ReadsJson) {
  const std::string path = write("job.json", minimal_job().dump(2));
  EXPECT_EQ(load_job_file(path).name, "fmnist");
}

TEST(JobSpecExamplesTest, CnnExampleLoads) {
  const JobSpec job = load_job_file(example("fashion-mnist-cnn.yaml"));
  EXPECT_TRUE(validate(job).empty());
  EXPECT_EQ(job.name, "fmnist-cnn");
  EXPECT_EQ(job.namespace_, "default");
  EXPECT_EQ(job.model.architecture, "cnn");
  EXPECT_EQ(job.model.channels, 32);
  EXPECT_EQ(job.model.hidden, 64);
  EXPECT_EQ(job.dataset.path, "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(job.training.epochs, 2);
  EXPECT_EQ(job.training.batch_size, 64);
  EXPECT_EQ(job.training.micro_batches, 4);
  EXPECT_EQ(job.training.optimizer.name, "adam");
  EXPECT_DOUBLE_EQ(job.training.optimizer.learning_rate, 0.001);
  EXPECT_EQ(job.training.seed, 1u);
  EXPECT_EQ(job.training.schedule, "1f1b");
  EXPECT_EQ(job.sharding.shards, 4);
  EXPECT_EQ(job.sharding.balance, "parameters");
  EXPECT_DOUBLE_EQ(job.protection.max_exposure, 0.5);
  EXPECT_EQ(job.protection.topology_key, "kubernetes.io/hostname");
  EXPECT_FALSE(job.protection.export_.allowed);
  EXPECT_EQ(job.checkpoint.every_steps, 200);
  EXPECT_EQ(job.checkpoint.volume, json::parse(R"({"emptyDir": {}})"));
  EXPECT_EQ(job.template_["image"], "ghcr.io/shardguard/shardd:0.1.0");
  EXPECT_EQ(job.template_["resources"]["limits"]["nvidia.com/gpu"], 1);
  EXPECT_EQ(job.sidecar["image"], "ghcr.io/shardguard/shard-sidecar:0.1.0");
  EXPECT_EQ(job.run_policy.backoff_limit, 3);
}

TEST(JobSpecExamplesTest, MlpExampleLoads) {
  const JobSpec job = load_job_file(example("fashion-mnist-mlp.yaml"));
  EXPECT_TRUE(validate(job).empty());
  EXPECT_EQ(job.name, "fmnist-mlp");
  EXPECT_EQ(job.model.architecture, "mlp");
  EXPECT_EQ(job.model.hidden, 256);
  EXPECT_EQ(job.model.depth, 3);
  EXPECT_EQ(job.sharding.shards, 4);
  EXPECT_EQ(job.training.epochs, 2);
  EXPECT_EQ(job.training.batch_size, 64);
  EXPECT_EQ(job.training.micro_batches, 4);
  EXPECT_DOUBLE_EQ(job.protection.max_exposure, 0.65);
}

TEST(JobSpecExamplesTest, VitExampleLoads) {
  const JobSpec job = load_job_file(example("fashion-mnist-vit.yaml"));
  EXPECT_TRUE(validate(job).empty());
  EXPECT_EQ(job.name, "fmnist-vit");
  EXPECT_EQ(job.model.architecture, "vit");
  EXPECT_EQ(job.model.hidden, 64);
  EXPECT_EQ(job.model.depth, 4);
  EXPECT_EQ(job.model.heads, 4);
  EXPECT_EQ(job.model.patch_size, 7);
  EXPECT_EQ(job.sharding.shards, 4);
  EXPECT_EQ(job.training.epochs, 2);
  EXPECT_EQ(job.training.batch_size, 64);
  EXPECT_EQ(job.training.micro_batches, 4);
  EXPECT_DOUBLE_EQ(job.protection.max_exposure, 0.5);
}

}  // namespace
}  // namespace shardguard
