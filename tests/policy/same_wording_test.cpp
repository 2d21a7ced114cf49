// The job spec decoder and the policy parser are built on one decode kit
// (common/decode.h): the same kind of mistake gets the same message from both.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "shardguard/common/decode.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"
#include "shardguard/policy/policy.h"

namespace shardguard {
namespace {

using json = nlohmann::json;

json minimal_job() {
  return json{{"apiVersion", "shardguard.io/v1alpha1"},
              {"kind", "ShardedTrainingJob"},
              {"metadata", {{"name", "fmnist"}, {"namespace", "ml"}}},
              {"spec", {{"model", {{"architecture", "mlp"}}}}}};
}

json minimal_policy() {
  return json{{"version", 1}, {"trustDomain", "shardguard.local"}, {"namespace", "ml"},
              {"job", "fmnist"}, {"shard", 0}, {"shards", 2}};
}

// The message at `path`, "" when there is none.
std::string job_message(const json& job, const std::string& path) {
  try {
    job_from_json(job);
  } catch (const JobSpecError& e) {
    for (const FieldError& f : e.errors()) {
      if (f.path == path) return f.message;
    }
    ADD_FAILURE() << "no error at " << path << ":\n" << e.what();
    return "";
  }
  ADD_FAILURE() << "job accepted";
  return "";
}

std::string policy_message(const json& doc, const std::string& path) {
  try {
    policy::parse_policy(doc.dump());
  } catch (const policy::PolicyError& e) {
    for (const FieldError& f : e.problems()) {
      if (f.path == path) return f.message;
    }
    ADD_FAILURE() << "no problem at " << path << ":\n" << e.what();
    return "";
  }
  ADD_FAILURE() << "policy accepted";
  return "";
}

TEST(SameWording, UnknownField) {
  json job = minimal_job();
  job["spec"]["model"]["jobb"] = 1;
  json doc = minimal_policy();
  doc["jobb"] = 1;
  const std::string j = job_message(job, "spec.model.jobb");
  const std::string p = policy_message(doc, "jobb");
  EXPECT_EQ(j.substr(0, j.find(" (")), "unknown field \"jobb\"");
  EXPECT_EQ(p.substr(0, p.find(" (")), "unknown field \"jobb\"");
  EXPECT_EQ(p, "unknown field \"jobb\" (did you mean \"job\"?)");
}

TEST(SameWording, WrongTypes) {
  json job = minimal_job();
  job["spec"]["sharding"] = {{"shards", "4"}};
  job["spec"]["runPolicy"] = {{"suspend", "yes"}};
  job["spec"]["training"] = {{"optimizer", {{"name", 7}}}};
  job["spec"]["checkpoint"] = "often";
  json doc = minimal_policy();
  doc["shards"] = "4";
  doc["export"] = {{"allowed", "yes"}};
  doc["job"] = 7;
  doc["ingress"] = "often";
  EXPECT_EQ(job_message(job, "spec.sharding.shards"), policy_message(doc, "shards"));
  EXPECT_EQ(job_message(job, "spec.sharding.shards"), "expected an integer, got string \"4\"");
  EXPECT_EQ(job_message(job, "spec.runPolicy.suspend"), policy_message(doc, "export.allowed"));
  EXPECT_EQ(job_message(job, "spec.training.optimizer.name"), policy_message(doc, "job"));
  EXPECT_EQ(job_message(job, "spec.checkpoint"), "expected an object, got string \"often\"");
  EXPECT_EQ(policy_message(doc, "ingress"), "expected an array, got string \"often\"");
}

TEST(SameWording, OutOfRangeAndMinimum) {
  json job = minimal_job();
  job["spec"]["sharding"] = {{"shards", 3000000000LL}};
  job["spec"]["checkpoint"] = {{"everySteps", 0}};
  json doc = minimal_policy();
  doc["shards"] = 3000000000LL;
  EXPECT_EQ(job_message(job, "spec.sharding.shards"), policy_message(doc, "shards"));
  EXPECT_EQ(policy_message(doc, "shards"), "out of range [-2147483648, 2147483647], got 3000000000");
  doc["shards"] = 0;
  EXPECT_EQ(job_message(job, "spec.checkpoint.everySteps"), policy_message(doc, "shards"));
  EXPECT_EQ(policy_message(doc, "shards"), "must be at least 1, got 0");
}

TEST(SameWording, RequiredDnsLabelSpiffeIdDuplicateAndEmptyList) {
  json job = minimal_job();
  job["metadata"] = {{"name", "Fmnist_1"}, {"namespace", "ml"}};
  job.erase("spec");
  job["spec"] = nullptr;
  json doc = minimal_policy();
  doc.erase("namespace");
  doc["job"] = "Fmnist_1";
  EXPECT_EQ(job_message(job, "spec"), policy_message(doc, "namespace"));
  EXPECT_EQ(job_message(job, "spec"), "required, got nothing");
  EXPECT_EQ(job_message(job, "metadata.name"), policy_message(doc, "job"));

  const std::string exporter = spiffe_id_for_exporter("shardguard.local", "ml", "fmnist");
  job = minimal_job();
  job["spec"]["protection"] = {
      {"export", {{"allowed", true}, {"principals", {exporter, "spiffe://shardguard.local", exporter}}}}};
  doc = minimal_policy();
  doc["export"] = {{"allowed", true},
                   {"principals",
                    {{{"peer", exporter}, {"budgetBytes", 1}},
                     {{"peer", "spiffe://shardguard.local"}, {"budgetBytes", 1}},
                     {{"peer", exporter}, {"budgetBytes", 1}}}}};
  EXPECT_EQ(job_message(job, "spec.protection.export.principals[1]"),
            policy_message(doc, "export.principals[1].peer"));
  EXPECT_EQ(job_message(job, "spec.protection.export.principals[1]"),
            "must be a SPIFFE ID (spiffe://<trust-domain>/<path>): path is empty (workload IDs "
            "need a path), got \"spiffe://shardguard.local\"");
  // The same kind, the same words; the first's path is each document's own.
  EXPECT_EQ(job_message(job, "spec.protection.export.principals[2]"),
            decode::duplicate(exporter, "spec.protection.export.principals[0]"));
  EXPECT_EQ(policy_message(doc, "export.principals[2].peer"),
            decode::duplicate(exporter, "export.principals[0].peer"));

  job = minimal_job();
  job["spec"]["protection"] = {{"export", {{"allowed", true}, {"principals", json::array()}}}};
  doc = minimal_policy();
  doc["export"] = {{"allowed", true}, {"principals", json::array()}};
  EXPECT_EQ(job_message(job, "spec.protection.export.principals"),
            policy_message(doc, "export.principals"));
  EXPECT_EQ(policy_message(doc, "export.principals"),
            "must list at least one principal when export.allowed is true, got []");
}

}  // namespace
}  // namespace shardguard
