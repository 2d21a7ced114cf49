// The ShardedTrainingJob CustomResourceDefinition (crds/shardedtrainingjobs.shardguard.io.yaml)
// against the C++ decoder and validator (common/src/jobspec.cpp).
//
// The API server validates a job with the CRD's OpenAPI schema; shardd, shardctl
// and the operator decode the same object with job_from_json. The two must agree,
// or a job the cluster accepts fails in the pods (or the other way round). This
// test checks the CRD is a structural schema, that every default equals the C++
// default, and -- by probing both sides with the same objects -- that every enum,
// bound, pattern and known-field set agrees. It carries a small OpenAPI validator
// for that (types, enum, minimum/maximum, lengths, pattern, required, closed
// objects, defaulting, as the API server applies them). CEL rules cannot be run
// here: each cross-field rule of the decoder is matched to a CEL rule by name,
// and each rule must have a rule and a message.
#include "shardguard/common/jobspec.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace shardguard {
namespace {

using json = nlohmann::json;

const std::string kSourceDir = SHARDGUARD_SOURCE_DIR;
const std::string kCrdPath = kSourceDir + "/crds/shardedtrainingjobs.shardguard.io.yaml";

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot read " << path;
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

const json& crd() {
  static const json doc = yaml_to_json(read_text(kCrdPath));
  return doc;
}

const json& root_schema() {
  static const json empty = json::object();
  const json& c = crd();
  if (!c.contains("spec") || !c["spec"].contains("versions") || c["spec"]["versions"].empty()) {
    return empty;
  }
  return c["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
}

std::vector<std::string> split(const std::string& path) {
  std::vector<std::string> out;
  std::string part;
  std::istringstream in(path);
  while (std::getline(in, part, '.')) out.push_back(part);
  return out;
}

// The schema node of a dotted field path ("spec.training.batchSize"); "" is the root.
const json* schema_at(const std::string& path) {
  const json* node = &root_schema();
  if (path.empty()) return node;
  for (const std::string& key : split(path)) {
    if (!node->contains("properties") || !(*node)["properties"].contains(key)) return nullptr;
    node = &(*node)["properties"][key];
  }
  return node;
}

json* value_at(json& object, const std::string& path) {
  json* node = &object;
  for (const std::string& key : split(path)) {
    if (!node->is_object() || !node->contains(key)) return nullptr;
    node = &(*node)[key];
  }
  return node;
}

void set_at(json& object, const std::string& path, json value) {
  json* node = &object;
  for (const std::string& key : split(path)) {
    if (!node->is_object()) *node = json::object();
    node = &(*node)[key];
  }
  *node = std::move(value);
}

// ---- a small OpenAPI v3 validator, as the API server applies a CRD schema ----

bool is_int_or_string(const json& s) {
  return s.value("x-kubernetes-int-or-string", false);
}

bool preserves_unknown(const json& s) {
  return s.value("x-kubernetes-preserve-unknown-fields", false);
}

// Defaults are applied top-down before validation; a defaulted object gets its
// own fields' defaults too. null (on a field that is not nullable) is pruned
// first, so it is defaulted like an absent field -- as the decoder treats it.
void apply_defaults(const json& schema, json& value) {
  if (value.is_object() && schema.contains("properties")) {
    for (const auto& [key, sub] : schema["properties"].items()) {
      auto it = value.find(key);
      if (it != value.end() && it->is_null() && !sub.value("nullable", false)) {
        value.erase(it);
        it = value.end();
      }
      if (it == value.end()) {
        if (!sub.contains("default")) continue;
        value[key] = sub["default"];
      }
      apply_defaults(sub, value[key]);
    }
  }
  if (value.is_object() && schema.contains("additionalProperties") &&
      schema["additionalProperties"].is_object()) {
    for (auto& [key, item] : value.items()) apply_defaults(schema["additionalProperties"], item);
  }
  if (value.is_array() && schema.contains("items")) {
    for (json& item : value) apply_defaults(schema["items"], item);
  }
}

bool is_integral(const json& v) {
  if (v.is_number_integer()) return true;
  if (!v.is_number_float()) return false;
  const double d = v.get<double>();
  return std::isfinite(d) && d == std::floor(d);
}

class SchemaValidator {
 public:
  std::vector<std::string> errors;

  void check(const json& s, const json& v, const std::string& path) {
    if (is_int_or_string(s)) {
      if (!is_integral(v) && !v.is_string()) return fail(path, "must be an integer or a string");
      if (v.is_string()) strings(s, v, path);
      return;
    }
    const std::string type = s.value("type", "");
    bool ok = true;
    if (type == "object") ok = v.is_object();
    else if (type == "array") ok = v.is_array();
    else if (type == "string") ok = v.is_string();
    else if (type == "integer") ok = is_integral(v);
    else if (type == "number") ok = v.is_number();
    else if (type == "boolean") ok = v.is_boolean();
    if (!ok) return fail(path, "must be of type " + type + ", got " + v.dump());

    if (s.contains("enum")) {
      const json& e = s["enum"];
      if (std::find(e.begin(), e.end(), v) == e.end()) {
        return fail(path, "unsupported value " + v.dump() + ", expected one of " + e.dump());
      }
    }
    if (v.is_number()) numbers(s, v.get<double>(), path);
    if (v.is_string()) strings(s, v, path);
    if (v.is_array()) {
      if (s.contains("minItems") && v.size() < s["minItems"].get<std::size_t>()) {
        fail(path, "too few items");
      }
      if (s.contains("maxItems") && v.size() > s["maxItems"].get<std::size_t>()) {
        fail(path, "too many items");
      }
      for (std::size_t i = 0; i < v.size(); ++i) {
        if (s.contains("items")) check(s["items"], v[i], path + "[" + std::to_string(i) + "]");
      }
    }
    if (v.is_object()) objects(s, v, path);
  }

 private:
  void fail(const std::string& path, const std::string& message) {
    errors.push_back(path + ": " + message);
  }

  void numbers(const json& s, double d, const std::string& path) {
    if (s.contains("minimum")) {
      const double min = s["minimum"].get<double>();
      if (s.value("exclusiveMinimum", false) ? !(d > min) : !(d >= min)) {
        fail(path, "should be greater than" + std::string(s.value("exclusiveMinimum", false) ? "" : " or equal to") + " " + s["minimum"].dump());
      }
    }
    if (s.contains("maximum")) {
      const double max = s["maximum"].get<double>();
      if (s.value("exclusiveMaximum", false) ? !(d < max) : !(d <= max)) {
        fail(path, "should be less than" + std::string(s.value("exclusiveMaximum", false) ? "" : " or equal to") + " " + s["maximum"].dump());
      }
    }
  }

  void strings(const json& s, const json& v, const std::string& path) {
    const std::string& text = v.get_ref<const std::string&>();
    if (s.contains("minLength") && text.size() < s["minLength"].get<std::size_t>()) {
      fail(path, "should be at least " + s["minLength"].dump() + " chars long");
    }
    if (s.contains("maxLength") && text.size() > s["maxLength"].get<std::size_t>()) {
      fail(path, "may not be longer than " + s["maxLength"].dump());
    }
    if (s.contains("pattern")) {
      // OpenAPI patterns are searched for, not matched whole (hence ^...$ in the CRD).
      const std::regex re(s["pattern"].get<std::string>(), std::regex::ECMAScript);
      if (!std::regex_search(text, re)) fail(path, "should match " + s["pattern"].dump());
    }
  }

  void objects(const json& s, const json& v, const std::string& path) {
    const std::string prefix = path.empty() ? "" : path + ".";
    // ObjectMeta is validated by the API server itself, not by the CRD schema.
    if (path == "metadata") return;
    for (const json& r : s.value("required", json::array())) {
      const std::string key = r.get<std::string>();
      if (!v.contains(key) || v[key].is_null()) fail(prefix + key, "Required value");
    }
    for (const auto& [key, item] : v.items()) {
      if (item.is_null()) continue;  // pruned
      if (s.contains("properties") && s["properties"].contains(key)) {
        check(s["properties"][key], item, prefix + key);
      } else if (s.contains("additionalProperties") && s["additionalProperties"].is_object()) {
        check(s["additionalProperties"], item, prefix + key);
      } else if (!preserves_unknown(s)) {
        fail(prefix + key, "unknown field \"" + key + "\"");
      }
    }
  }
};

// Defaults the object as the API server would and returns the schema errors.
std::vector<std::string> schema_errors(json object) {
  apply_defaults(root_schema(), object);
  SchemaValidator v;
  v.check(root_schema(), object, "");
  return v.errors;
}

bool schema_rejects_at(const json& object, const std::string& path) {
  for (const std::string& e : schema_errors(object)) {
    if (e.compare(0, path.size() + 1, path + ":") == 0 ||
        e.compare(0, path.size() + 1, path + "[") == 0) {
      return true;
    }
  }
  return false;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

// ---- the decoder side --------------------------------------------------------

json minimal_job() {
  return json{
      {"apiVersion", "shardguard.io/v1alpha1"},
      {"kind", "ShardedTrainingJob"},
      {"metadata", {{"name", "fmnist"}}},
      {"spec", {{"model", {{"architecture", "mlp"}}}}},
  };
}

std::vector<FieldError> decoder_errors(const json& object) {
  try {
    job_from_json(object);
  } catch (const JobSpecError& e) {
    return e.errors();
  }
  return {};
}

std::string joined(const std::vector<FieldError>& errors) {
  std::string out;
  for (const FieldError& e : errors) out += e.str() + "\n";
  return out;
}

const FieldError* decoder_error_at(const std::vector<FieldError>& errors, const std::string& path) {
  for (const FieldError& e : errors) {
    if (e.path == path || e.path.compare(0, path.size() + 1, path + "[") == 0) return &e;
  }
  return nullptr;
}

// A decoded job written back with the CRD's field names, so that it can be
// compared with the schema path by path (and decoded again).
json spec_json(const JobSpec& j) {
  json run_policy = {{"backoffLimit", j.run_policy.backoff_limit},
                     {"suspend", j.run_policy.suspend}};
  if (j.run_policy.active_deadline_seconds) {
    run_policy["activeDeadlineSeconds"] = *j.run_policy.active_deadline_seconds;
  }
  if (j.run_policy.ttl_seconds_after_finished) {
    run_policy["ttlSecondsAfterFinished"] = *j.run_policy.ttl_seconds_after_finished;
  }
  const auto& m = j.model;
  const auto& t = j.training;
  const auto& o = t.optimizer;
  const auto& p = j.protection;
  json model = {{"architecture", m.architecture}, {"hidden", m.hidden},   {"depth", m.depth},
                {"channels", m.channels},         {"heads", m.heads},     {"patchSize", m.patch_size},
                {"vocab", m.vocab},               {"context", m.context}};
  if (m.package) {
    model["package"] = {{"path", m.package->path}, {"keysSecret", m.package->keys_secret}};
    if (!m.package->volume.empty()) model["package"]["volume"] = m.package->volume;
  }
  return json{
      {"model", model},
      {"dataset",
       {{"name", j.dataset.name},
        {"format", j.dataset.format},
        {"path", j.dataset.path},
        {"maxTrainSamples", j.dataset.max_train_samples},
        {"maxTestSamples", j.dataset.max_test_samples}}},
      {"training",
       {{"epochs", t.epochs},
        {"batchSize", t.batch_size},
        {"microBatches", t.micro_batches},
        {"optimizer",
         {{"name", o.name},
          {"learningRate", o.learning_rate},
          {"momentum", o.momentum},
          {"weightDecay", o.weight_decay},
          {"warmupSteps", o.warmup_steps},
          {"decay", o.decay}}},
        {"seed", t.seed},
        {"schedule", t.schedule},
        {"evalBatchSize", t.eval_batch_size}}},
      {"sharding",
       {{"shards", j.sharding.shards}, {"balance", j.sharding.balance}, {"replicas", j.sharding.replicas}}},
      {"protection",
       {{"maxExposure", p.max_exposure},
        {"topologyKey", p.topology_key},
        {"trustDomain", p.trust_domain},
        {"export", {{"allowed", p.export_.allowed}, {"principals", p.export_.principals}}}}},
      {"checkpoint", {{"everySteps", j.checkpoint.every_steps}, {"volume", j.checkpoint.volume}}},
      {"template", j.template_},
      {"sidecar", j.sidecar},
      {"runPolicy", run_policy},
  };
}

json job_json(const JobSpec& j) {
  return json{{"apiVersion", "shardguard.io/v1alpha1"},
              {"kind", "ShardedTrainingJob"},
              {"metadata", {{"name", j.name}, {"namespace", j.namespace_}}},
              {"spec", spec_json(j)}};
}

// The spec subtrees the decoder passes through unchanged: the CRD types what
// DESIGN §6 names there and keeps the rest, the decoder checks nothing inside.
bool passed_through(const std::string& path) {
  for (const char* raw : {"spec.template", "spec.sidecar", "spec.checkpoint.volume"}) {
    const std::string r = raw;
    if (path == r || path.compare(0, r.size() + 1, r + ".") == 0) return true;
  }
  return false;
}

// Every schema node under spec the decoder reads: (path, node).
void decoded_leaves(const json& node, const std::string& path,
                    std::vector<std::pair<std::string, const json*>>& out) {
  if (passed_through(path)) return;
  if (node.contains("properties")) {
    for (const auto& [key, sub] : node["properties"].items()) {
      decoded_leaves(sub, path + "." + key, out);
    }
  } else {
    out.emplace_back(path, &node);
  }
}

std::vector<std::pair<std::string, const json*>> decoded_leaves() {
  std::vector<std::pair<std::string, const json*>> out;
  if (const json* spec = schema_at("spec")) decoded_leaves(*spec, "spec", out);
  return out;
}

// ---- the CRD object ----------------------------------------------------------

// Stops a test early (rather than indexing a missing key) when the CRD is not there.
#define ASSERT_CRD_LOADED()                                                              \
  ASSERT_TRUE(crd().is_object() && crd().contains("metadata") && crd().contains("spec") && \
              crd()["spec"].contains("versions") && !crd()["spec"]["versions"].empty())  \
      << "cannot load " << kCrdPath

TEST(Crd, NamesScopeAndVersion) {
  ASSERT_CRD_LOADED();
  const json& c = crd();
  EXPECT_EQ(c.value("apiVersion", ""), "apiextensions.k8s.io/v1");
  EXPECT_EQ(c.value("kind", ""), "CustomResourceDefinition");
  EXPECT_EQ(c["metadata"].value("name", ""), "shardedtrainingjobs.shardguard.io");
  const json& spec = c["spec"];
  EXPECT_EQ(spec.value("group", ""), "shardguard.io");
  EXPECT_EQ(spec.value("scope", ""), "Namespaced");
  const json& names = spec["names"];
  EXPECT_EQ(names.value("kind", ""), "ShardedTrainingJob");
  EXPECT_EQ(names.value("listKind", ""), "ShardedTrainingJobList");
  EXPECT_EQ(names.value("plural", ""), "shardedtrainingjobs");
  EXPECT_EQ(names.value("singular", ""), "shardedtrainingjob");
  EXPECT_EQ(names["shortNames"], json::array({"stj"}));
  EXPECT_EQ(names["categories"], json::array({"shardguard"}));
  // The CRD's name is <plural>.<group>, as the API server requires.
  EXPECT_EQ(c["metadata"].value("name", ""),
            names.value("plural", "") + "." + spec.value("group", ""));

  ASSERT_EQ(spec["versions"].size(), 1u);
  const json& v = spec["versions"][0];
  EXPECT_EQ(v.value("name", ""), "v1alpha1");
  EXPECT_EQ(v.value("served", false), true);
  EXPECT_EQ(v.value("storage", false), true);
  ASSERT_TRUE(v.contains("subresources"));
  EXPECT_EQ(v["subresources"], json({{"status", json::object()}}));
  EXPECT_FALSE(v["subresources"].contains("scale"));
}

TEST(Crd, PrinterColumns) {
  ASSERT_CRD_LOADED();
  const json& columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"];
  const std::vector<std::vector<std::string>> expected = {
      {"Phase", "string", ".status.phase"},
      {"Shards", "integer", ".spec.sharding.shards"},
      {"Step", "integer", ".status.progress.step"},
      {"Accuracy", "number", ".status.progress.accuracy"},
      {"Eval-Loss", "number", ".status.progress.evalLoss"},
      {"Exposure", "number", ".status.exposure.maxNode"},
      {"Age", "date", ".metadata.creationTimestamp"},
  };
  ASSERT_EQ(columns.size(), expected.size()) << columns.dump(2);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    SCOPED_TRACE(expected[i][0]);
    EXPECT_EQ(columns[i].value("name", ""), expected[i][0]);
    EXPECT_EQ(columns[i].value("type", ""), expected[i][1]);
    EXPECT_EQ(columns[i].value("jsonPath", ""), expected[i][2]);
    // Every column but Age reads a field the schema declares, with the same type.
    if (expected[i][0] == "Age") continue;
    const json* field = schema_at(expected[i][2].substr(1));
    ASSERT_NE(field, nullptr) << expected[i][2] << " is not in the schema";
    EXPECT_EQ(field->value("type", ""), expected[i][1]);
  }
}

// ---- structural schema -------------------------------------------------------

const std::set<std::string> kAllowedKeywords = {
    "type", "format", "description", "properties", "additionalProperties", "items",
    "required", "enum", "default", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "minProperties", "maxProperties",
    "anyOf", "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type"};

// Where unknown fields are kept: nowhere. The template, sidecar and volume source
// declare what the operator uses, so that every field is bounded (the rendered
// ConfigMap stays far below 1 MiB) and a field the operator would ignore is refused.
const std::set<std::string> kPreserveUnknown = {};

void check_structural(const json& node, const std::string& path, int& rules) {
  SCOPED_TRACE("schema node " + (path.empty() ? std::string("<root>") : path));
  ASSERT_TRUE(node.is_object());
  for (const auto& [key, value] : node.items()) {
    EXPECT_TRUE(kAllowedKeywords.count(key)) << "keyword " << key;
  }
  EXPECT_FALSE(node.contains("x-kubernetes-embedded-resource"));
  if (is_int_or_string(node)) {
    EXPECT_FALSE(node.contains("type"));
    EXPECT_EQ(node.value("anyOf", json()),
              json::parse(R"([{"type": "integer"}, {"type": "string"}])"));
    return;
  }
  EXPECT_FALSE(node.contains("anyOf")) << "anyOf only for x-kubernetes-int-or-string";
  ASSERT_TRUE(node.contains("type")) << "every node needs a type";
  const std::string type = node["type"].get<std::string>();
  EXPECT_TRUE(type == "object" || type == "array" || type == "string" || type == "integer" ||
              type == "number" || type == "boolean")
      << type;
  EXPECT_FALSE(node.contains("properties") && node.contains("additionalProperties"))
      << "properties and additionalProperties together";
  EXPECT_EQ(preserves_unknown(node), kPreserveUnknown.count(path) == 1)
      << "x-kubernetes-preserve-unknown-fields only at " << json(kPreserveUnknown).dump();

  if (node.contains("properties")) {
    EXPECT_EQ(type, "object");
    for (const auto& [key, sub] : node["properties"].items()) {
      check_structural(sub, path.empty() ? key : path + "." + key, rules);
    }
  }
  for (const json& r : node.value("required", json::array())) {
    EXPECT_TRUE(node.contains("properties") && node["properties"].contains(r.get<std::string>()))
        << "required field " << r << " is not a property";
  }
  if (node.contains("additionalProperties")) {
    EXPECT_EQ(type, "object");
    ASSERT_TRUE(node["additionalProperties"].is_object());
    check_structural(node["additionalProperties"], path + ".*", rules);
  }
  if (type == "array") {
    ASSERT_TRUE(node.contains("items")) << "an array needs items";
    check_structural(node["items"], path + "[]", rules);
    if (node.value("x-kubernetes-list-type", "") == "map") {
      // List-map keys must be required (or defaulted) scalar fields of the items.
      for (const json& k : node.value("x-kubernetes-list-map-keys", json::array())) {
        const json req = node["items"].value("required", json::array());
        EXPECT_NE(std::find(req.begin(), req.end(), k), req.end()) << "map key " << k;
      }
    }
  }
  if (node.contains("default")) {
    // The API server rejects a CRD whose defaults do not validate (after their own defaulting).
    json value = node["default"];
    apply_defaults(node, value);
    SchemaValidator v;
    v.check(node, value, path);
    EXPECT_TRUE(v.errors.empty()) << "default " << node["default"] << ": " << joined(v.errors);
  }
  for (const json& rule : node.value("x-kubernetes-validations", json::array())) {
    ++rules;
    ASSERT_TRUE(rule.is_object());
    for (const auto& [key, value] : rule.items()) {
      EXPECT_TRUE(key == "rule" || key == "message" || key == "fieldPath" || key == "reason")
          << "validation key " << key;
    }
    EXPECT_TRUE(rule.contains("rule") && rule["rule"].is_string() &&
                !rule["rule"].get<std::string>().empty())
        << rule;
    EXPECT_TRUE(rule.contains("message") && rule["message"].is_string() &&
                !rule["message"].get<std::string>().empty())
        << rule;
  }
}

TEST(Crd, SchemaIsStructural) {
  const json& root = root_schema();
  ASSERT_FALSE(root.empty());
  int rules = 0;
  check_structural(root, "", rules);
  EXPECT_EQ(root.value("type", ""), "object");
  EXPECT_EQ(root.value("required", json()), json::array({"spec"}));
  // At the root only metadata.name/generateName may be restricted; name is declared
  // (as a plain string) so that the root rules can name it in fieldPath.
  EXPECT_EQ(root["properties"]["metadata"],
            json::parse(R"({"type": "object", "properties": {"name": {"type": "string"}}})"));
  EXPECT_GT(rules, 0);
}

// ---- spec: the schema against the decoder ------------------------------------

TEST(Crd, EveryDecodedFieldIsInTheSchemaAndNoOther) {
  // For a field it does not know and cannot guess, the decoder lists the fields
  // it knows; each object's list must be the schema's properties.
  const std::regex known(R"(\(known fields: ([^)]*)\))");
  for (const char* p : {"spec", "spec.model", "spec.dataset", "spec.training",
                        "spec.training.optimizer", "spec.sharding", "spec.protection",
                        "spec.protection.export", "spec.checkpoint", "spec.runPolicy"}) {
    const std::string path = p;
    SCOPED_TRACE(path);
    json job = minimal_job();
    json* object = value_at(job, path);
    if (object == nullptr) {
      set_at(job, path, json::object());
      object = value_at(job, path);
    }
    (*object)["qqqqqqqqqqqq"] = 1;
    const auto errors = decoder_errors(job);
    const FieldError* e = decoder_error_at(errors, path + ".qqqqqqqqqqqq");
    ASSERT_NE(e, nullptr) << joined(errors);
    std::smatch m;
    ASSERT_TRUE(std::regex_search(e->message, m, known)) << e->message;
    std::set<std::string> decoder_fields;
    std::istringstream list(m[1].str());
    for (std::string f; std::getline(list, f, ',');) {
      decoder_fields.insert(f.substr(f.find_first_not_of(' ')));
    }
    std::set<std::string> schema_fields;
    const json* node = schema_at(path);
    ASSERT_NE(node, nullptr);
    for (const auto& [key, sub] : (*node)["properties"].items()) schema_fields.insert(key);
    EXPECT_EQ(decoder_fields, schema_fields);
    EXPECT_TRUE(schema_rejects_at(job, path + ".qqqqqqqqqqqq")) << joined(schema_errors(job));
  }
}

TEST(Crd, DefaultsAreTheDecoderDefaults) {
  // The C++ defaults (the initialisers in jobspec.h) with the CRD's field names.
  const json cpp = spec_json(JobSpec{});
  std::set<std::string> with_default;
  for (const auto& [path, node] : decoded_leaves()) {
    SCOPED_TRACE(path);
    json c = cpp;
    const json* expected = value_at(c, path.substr(5));
    if (path == "spec.model.architecture") {
      // Required: no default on either side.
      EXPECT_FALSE(node->contains("default"));
      EXPECT_EQ(*expected, "");
      continue;
    }
    if (expected == nullptr || (path == "spec.protection.export.principals")) {
      // Optional without a default: runPolicy deadlines (std::nullopt), principals ([]).
      EXPECT_FALSE(node->contains("default"));
      continue;
    }
    ASSERT_TRUE(node->contains("default")) << "no default; C++ default is " << *expected;
    EXPECT_EQ((*node)["default"], *expected);
    with_default.insert(path);
  }
  EXPECT_EQ(with_default.size(), 34u) << json(with_default).dump();

  // Defaulting a minimal job by the schema gives the same job the decoder makes of it.
  json minimal = minimal_job();
  json defaulted = minimal;
  apply_defaults(root_schema(), defaulted);
  EXPECT_TRUE(schema_errors(defaulted).empty()) << joined(schema_errors(defaulted));
  const JobSpec a = job_from_json(minimal);
  const JobSpec b = job_from_json(defaulted);
  EXPECT_EQ(spec_json(a), spec_json(b));
  // And every defaulted leaf holds the C++ value.
  for (const std::string& path : with_default) {
    json d = defaulted;
    json c = cpp;
    ASSERT_NE(value_at(d, path), nullptr) << path << " not defaulted";
    EXPECT_EQ(*value_at(d, path), *value_at(c, path.substr(5))) << path;
  }
}

// Enums: the schema's list, the decoder's "(expected one of: ...)" list where it
// gives one, every value accepted by both and an unknown one rejected by both.
TEST(Crd, EnumsMatchTheDecoder) {
  struct Enum {
    const char* path;
    std::vector<std::string> values;
    bool decoder_lists_them;
  };
  const std::vector<Enum> enums = {
      {"spec.model.architecture", {"mlp", "cnn", "vit", "gpt", "torchscript"}, true},
      {"spec.dataset.format", {"fashion-mnist", "tokens", "tensors"}, true},
      {"spec.training.optimizer.name", {"sgd", "adam"}, true},
      {"spec.training.optimizer.decay", {"constant", "cosine"}, true},
      {"spec.training.schedule", {"1f1b", "gpipe"}, true},
      {"spec.sharding.balance", {"parameters", "compute"}, true},
  };
  std::set<std::string> listed;
  for (const Enum& e : enums) {
    SCOPED_TRACE(e.path);
    listed.insert(e.path);
    const json* node = schema_at(e.path);
    ASSERT_NE(node, nullptr);
    EXPECT_EQ((*node)["enum"], json(e.values));
    for (const std::string& v : e.values) {
      json job = minimal_job();
      set_at(job, e.path, v);
      if (v == "gpt" || v == "tokens") {  // a language model and its token data come together
        set_at(job, "spec.model.architecture", "gpt");
        set_at(job, "spec.dataset.format", "tokens");
      }
      if (v == "torchscript") {  // the blocks come from packages
        set_at(job, "spec.model.package.path", "/packages");
        set_at(job, "spec.model.package.keysSecret", "package-keys");
      }
      EXPECT_TRUE(decoder_errors(job).empty()) << v << ": " << joined(decoder_errors(job));
      EXPECT_TRUE(schema_errors(job).empty()) << v << ": " << joined(schema_errors(job));
    }
    json job = minimal_job();
    set_at(job, e.path, "transformer-xl");
    const auto errors = decoder_errors(job);
    const FieldError* err = decoder_error_at(errors, e.path);
    ASSERT_NE(err, nullptr) << joined(errors);
    EXPECT_TRUE(schema_rejects_at(job, e.path));
    if (e.decoder_lists_them) {
      std::string list;
      for (const std::string& v : e.values) list += (list.empty() ? "" : ", ") + json(v).dump();
      EXPECT_NE(err->message.find("(expected one of: " + list + ")"), std::string::npos)
          << err->message;
    }
  }
  // No other enum on a decoded field.
  for (const auto& [path, node] : decoded_leaves()) {
    EXPECT_EQ(node->contains("enum"), listed.count(path) == 1) << path;
  }
}

constexpr double kInt32Min = std::numeric_limits<int32_t>::min();
constexpr double kInt32Max = std::numeric_limits<int32_t>::max();

// Bounds as jobspec.cpp enforces them; an int field with no range check is
// bounded by int's range (the decoder reports "out of range" beyond it).
struct Bound {
  const char* path;
  bool integer;
  std::optional<double> min;
  bool exclusive_min;
  std::optional<double> max;
  bool exclusive_max;
  // Set where a value at max is refused by a cross-field rule (a CEL rule in the CRD).
  const char* cross_field_at_max = nullptr;
};

const std::vector<Bound>& bounds() {
  static const std::vector<Bound> b = {
      {"spec.model.hidden", true, 1, false, 4096, false},
      {"spec.model.depth", true, 1, false, 64, false},
      {"spec.model.channels", true, 1, false, 512, false},
      // heads and patchSize are checked for vit only (CEL rules); here: an mlp job.
      {"spec.model.heads", true, kInt32Min, false, kInt32Max, false},
      {"spec.model.patchSize", true, kInt32Min, false, kInt32Max, false},
      {"spec.model.vocab", true, 2, false, 65536, false},
      {"spec.model.context", true, 1, false, 4096, false},
      {"spec.dataset.maxTrainSamples", true, 0, false, std::nullopt, false},
      {"spec.dataset.maxTestSamples", true, 0, false, std::nullopt, false},
      {"spec.training.epochs", true, 1, false, 1000, false},
      {"spec.training.batchSize", true, 1, false, 65536, false},
      {"spec.training.microBatches", true, 1, false, kInt32Max, false, "must be at most batchSize"},
      {"spec.training.optimizer.learningRate", false, 0, true, 10, false},
      {"spec.training.optimizer.momentum", false, 0, false, 1, true},
      {"spec.training.optimizer.weightDecay", false, 0, false, std::nullopt, false},
      {"spec.training.optimizer.warmupSteps", true, 0, false, 1000000, false},
      {"spec.training.seed", true, 0, false, std::nullopt, false},
      {"spec.training.evalBatchSize", true, 1, false, kInt32Max, false},
      {"spec.sharding.shards", true, 1, false, 64, false},
      {"spec.sharding.replicas", true, 1, false, 16, false},
      {"spec.protection.maxExposure", false, 0, true, 1, false},
      {"spec.checkpoint.everySteps", true, 1, false, kInt32Max, false},
      {"spec.runPolicy.backoffLimit", true, 0, false, 100, false},
      {"spec.runPolicy.activeDeadlineSeconds", true, 1, false, std::nullopt, false},
      {"spec.runPolicy.ttlSecondsAfterFinished", true, 0, false, std::nullopt, false},
  };
  return b;
}

json number(bool integer, double v) {
  if (integer) return json(static_cast<int64_t>(v));
  return json(v);
}

TEST(Crd, BoundsMatchTheDecoder) {
  std::set<std::string> listed;
  for (const Bound& b : bounds()) {
    SCOPED_TRACE(b.path);
    listed.insert(b.path);
    const json* node = schema_at(b.path);
    ASSERT_NE(node, nullptr);
    EXPECT_EQ(node->value("type", ""), b.integer ? "integer" : "number");
    EXPECT_EQ(node->contains("minimum"), b.min.has_value());
    EXPECT_EQ(node->contains("maximum"), b.max.has_value());
    if (b.min) {
      EXPECT_EQ((*node)["minimum"].get<double>(), *b.min);
    }
    if (b.max) {
      EXPECT_EQ((*node)["maximum"].get<double>(), *b.max);
    }
    EXPECT_EQ(node->value("exclusiveMinimum", false), b.exclusive_min);
    EXPECT_EQ(node->value("exclusiveMaximum", false), b.exclusive_max);

    // Probe both sides on and just past each bound.
    auto probe = [&](double value, bool accepted, const char* cross_field) {
      SCOPED_TRACE("value " + number(b.integer, value).dump());
      json job = minimal_job();
      set_at(job, b.path, number(b.integer, value));
      const auto errors = decoder_errors(job);
      const FieldError* e = decoder_error_at(errors, b.path);
      if (accepted && cross_field != nullptr) {
        ASSERT_NE(e, nullptr);
        EXPECT_NE(e->message.find(cross_field), std::string::npos) << e->message;
      } else {
        EXPECT_EQ(e == nullptr, accepted) << joined(errors);
      }
      EXPECT_EQ(!schema_rejects_at(job, b.path), accepted) << joined(schema_errors(job));
    };
    if (b.min) {
      const double outside = b.integer ? *b.min - 1 : std::nextafter(*b.min, -INFINITY);
      const double inside = b.integer ? *b.min + 1 : std::nextafter(*b.min, INFINITY);
      probe(*b.min, !b.exclusive_min, nullptr);
      probe(b.exclusive_min ? inside : outside, b.exclusive_min, nullptr);
    }
    if (b.max) {
      const double outside = b.integer ? *b.max + 1 : std::nextafter(*b.max, INFINITY);
      const double inside = b.integer ? *b.max - 1 : std::nextafter(*b.max, -INFINITY);
      probe(*b.max, !b.exclusive_max, b.exclusive_max ? nullptr : b.cross_field_at_max);
      probe(b.exclusive_max ? inside : outside, b.exclusive_max,
            b.exclusive_max ? b.cross_field_at_max : nullptr);
    }
  }
  // No other bound on a decoded field.
  for (const auto& [path, node] : decoded_leaves()) {
    const bool bounded = node->contains("minimum") || node->contains("maximum");
    EXPECT_EQ(bounded, listed.count(path) == 1) << path;
  }
}

TEST(Crd, StringRulesMatchTheDecoder) {
  struct Case {
    const char* path;
    std::vector<std::string> good;
    std::vector<std::string> bad;
  };
  const std::string label63(63, 'a');
  const std::string long_name = label63 + "." + label63 + "." + label63 + "." + std::string(62, 'b');
  const std::vector<Case> cases = {
      // (Relative and ".." paths are a CEL rule's: EveryCrossFieldRuleOfTheDecoderHasACelRule.)
      {"spec.dataset.path", {"/data", "/", "/a/..b/c"}, {""}},
      {"spec.dataset.name", {"fashion-mnist", "fortunes", "a", label63}, {"", label63 + "a"}},
      {"spec.protection.topologyKey", {"kubernetes.io/hostname", "zone"}, {""}},
      {"spec.protection.trustDomain",
       {"shardguard.local", "a", "a-b.c0", label63, label63 + ".x", long_name.substr(1)},
       {"", "A.b", "-a", "a-", "a..b", ".a", "a.", "a_b", "a b", label63 + "a", long_name + "x"}},
      {"spec.protection.export.principals",
       {"spiffe://a/b", "spiffe://shardguard.local/ns/ml/sa/trainer", "spiffe://x_y-1.z/A.b_c",
        "spiffe://a/.b", "spiffe://a/b./c", "spiffe://a/...", "spiffe://a/..b"},
       {"spiffe://", "spiffe://A/b", "spiffe://a/", "spiffe://a//b", "spiffe://a/./b",
        "spiffe://a/..", "http://a/b", "spiffe://a/b c", "spiffe://a:8080/b", "spiffe://a/b?c",
        "spiffe:///b", "spiffe://a"}},
  };
  for (const Case& c : cases) {
    const bool list = std::string(c.path) == "spec.protection.export.principals";
    for (const auto* values : {&c.good, &c.bad}) {
      const bool good = values == &c.good;
      for (const std::string& v : *values) {
        SCOPED_TRACE(std::string(c.path) + " = " + json(v).dump());
        json job = minimal_job();
        if (list) {
          set_at(job, "spec.protection.export.allowed", true);
          set_at(job, c.path, json::array({v}));
        } else {
          set_at(job, c.path, v);
        }
        const auto errors = decoder_errors(job);
        EXPECT_EQ(decoder_error_at(errors, c.path) == nullptr, good) << joined(errors);
        EXPECT_EQ(!schema_rejects_at(job, c.path), good) << joined(schema_errors(job));
      }
    }
  }
}

// ---- cross-field rules: the decoder's checks carried by CEL rules ------------

const json* rule_containing(const std::string& path, const std::string& fragment) {
  const json* node = schema_at(path);
  if (node == nullptr || !node->contains("x-kubernetes-validations")) return nullptr;
  for (const json& r : (*node)["x-kubernetes-validations"]) {
    if (r.value("rule", "").find(fragment) != std::string::npos) return &r;
  }
  return nullptr;
}

// What a job's shards, keys and placement history are tied to cannot change under it
// (CEL transition rules; the API server evaluates them on update only).
TEST(Crd, ModelDataTrainingShardingAndProtectionAreImmutable) {
  for (const char* field : {"spec.model", "spec.dataset", "spec.training", "spec.sharding", "spec.protection"}) {
    SCOPED_TRACE(field);
    const json* rule = rule_containing(field, "self == oldSelf");
    ASSERT_NE(rule, nullptr);
    EXPECT_EQ((*rule)["rule"], "self == oldSelf");
    EXPECT_NE((*rule)["message"].get<std::string>().find(std::string(field) + " is immutable"), std::string::npos);
  }
  // runPolicy (suspend), template and sidecar stay editable.
  for (const char* field : {"spec.runPolicy", "spec.template", "spec.sidecar"}) {
    EXPECT_EQ(rule_containing(field, "oldSelf"), nullptr) << field;
  }
}

TEST(Crd, EveryCrossFieldRuleOfTheDecoderHasACelRule) {
  struct Case {
    const char* what;
    std::string patch;          // JSON merged into the minimal job
    const char* decoder_path;   // where the decoder reports it
    const char* schema_node;    // where the CEL rule sits ("" = root)
    const char* rule_fragment;  // in the rule
    const char* message_fragment;
  };
  const std::vector<Case> cases = {
      {"name longer than 52", R"({"metadata": {"name": ")" + std::string(53, 'a') + R"("}})",
       "metadata.name", "", "size(self.metadata.name) <= 52", "52"},
      {"replicated job's name longer than 48",
       R"({"metadata": {"name": ")" + std::string(49, 'a') + R"("}, "spec": {"sharding": {"replicas": 2}}})",
       "metadata.name", "", "size(self.metadata.name) <= 48", "<name>-shard-<index>-r<replica>"},
      {"name with a dot", R"({"metadata": {"name": "a.b"}})", "metadata.name", "",
       "!self.metadata.name.contains('.')", "DNS-1123 label"},
      {"vit heads 0", R"({"spec": {"model": {"architecture": "vit", "heads": 0}}})",
       "spec.model.heads", "spec.model", "self.heads >= 1", "heads must be at least 1"},
      {"vit hidden not divisible by heads (gpt: the same rule)",
       R"({"spec": {"model": {"architecture": "vit", "hidden": 66, "heads": 4}}})",
       "spec.model.heads", "spec.model", "self.hidden % self.heads == 0", "divisible by heads"},
      {"gpt with image data", R"({"spec": {"model": {"architecture": "gpt"}}})", "spec.dataset.format", "spec",
       "(self.model.architecture == 'gpt') == (self.dataset.format == 'tokens')", "must be tokens for architecture gpt"},
      {"vit patch size 5", R"({"spec": {"model": {"architecture": "vit", "patchSize": 5}}})",
       "spec.model.patchSize", "spec.model", "self.patchSize in [1, 2, 4, 7, 14, 28]",
       "patchSize"},
      {"microBatches above batchSize",
       R"({"spec": {"training": {"batchSize": 128, "microBatches": 256}}})",
       "spec.training.microBatches", "spec.training", "self.microBatches <= self.batchSize",
       "at most batchSize"},
      {"batchSize not divisible by microBatches",
       R"({"spec": {"training": {"batchSize": 100, "microBatches": 3}}})",
       "spec.training.microBatches", "spec.training", "self.batchSize % self.microBatches == 0",
       "divisible by microBatches"},
      {"export allowed without principals",
       R"({"spec": {"protection": {"export": {"allowed": true}}}})",
       "spec.protection.export.principals", "spec.protection.export",
       "size(self.principals) > 0", "at least one SPIFFE ID"},
      {"relative dataset path", R"({"spec": {"dataset": {"path": "data"}}})", "spec.dataset.path",
       "spec.dataset.path", "self.startsWith('/')", "absolute path without"},
      {"nfs path with ..",
       R"({"spec": {"checkpoint": {"volume": {"nfs": {"server": "n", "path": "/a/../b"}}}}})",
       "spec.checkpoint.volume.nfs.path", "spec.checkpoint.volume.nfs.path", "[.][.]", "absolute path without"},
      {"nodeSelector key that is no label key",
       R"({"spec": {"template": {"nodeSelector": {"gpu type": "h200"}}}})",
       "spec.template.nodeSelector.gpu type", "spec.template.nodeSelector", "self.all(k",
       "must be a label key"},
      {"trusted stage that is not a stage of the job",
       R"({"spec": {"sharding": {"shards": 2}, "protection": {"trustedStages": [2], "trustedNodeSelector": {"o": "me"}}}})",
       "spec.protection.trustedStages", "spec", "self.protection.trustedStages.all(s",
       "must be a stage of the job"},
      {"trusted stages without a node selector",
       R"({"spec": {"sharding": {"shards": 2}, "protection": {"trustedStages": [0]}}})",
       "spec.protection.trustedNodeSelector", "spec.protection", "has(self.trustedNodeSelector) &&",
       "must name at least one node label"},
      {"a trusted node selector without stages",
       R"({"spec": {"protection": {"trustedNodeSelector": {"o": "me"}}}})", "spec.protection.trustedStages",
       "spec.protection", "has(self.trustedStages) &&", "must list at least one stage"},
      {"trusted node selector that contradicts the template's",
       R"({"spec": {"sharding": {"shards": 2}, "template": {"nodeSelector": {"pool": "gpu"}}, "protection": {"trustedStages": [0], "trustedNodeSelector": {"pool": "owner"}}}})",
       "spec.protection.trustedNodeSelector.pool", "spec", "self.template.nodeSelector[k]",
       "must not contradict spec.template.nodeSelector"},
      {"torchscript without a package", R"({"spec": {"model": {"architecture": "torchscript"}}})",
       "spec.model.package", "spec.model", "has(self.package)", "package is required for architecture torchscript"},
      {"a package for a zoo model",
       R"({"spec": {"model": {"package": {"path": "/packages", "keysSecret": "keys"}}}})", "spec.model.package",
       "spec.model", "self.architecture == 'torchscript' || !has(self.package)", "only for architecture torchscript"},
      {"relative package path",
       R"({"spec": {"model": {"architecture": "torchscript", "package": {"path": "packages", "keysSecret": "k"}}}})",
       "spec.model.package.path", "spec.model.package.path", "self.startsWith('/')", "absolute path without"},
      {"package nfs path with ..",
       R"({"spec": {"model": {"architecture": "torchscript", "package": {"path": "/p", "keysSecret": "k", "volume": {"nfs": {"server": "n", "path": "/a/.."}}}}}})",
       "spec.model.package.volume.nfs.path", "spec.model.package.volume.nfs.path", "[.][.]", "absolute path without"},
      {"a package with both path and url",
       R"({"spec": {"model": {"architecture": "torchscript", "package": {"path": "/p", "url": "https://h/p/", "keysSecret": "k"}}}})",
       "spec.model.package", "spec.model.package", "has(self.path) != has(self.url)",
       "must have exactly one of path and url"},
      {"a package volume with a url",
       R"({"spec": {"model": {"architecture": "torchscript", "package": {"url": "https://h/p/", "keysSecret": "k", "volume": {"persistentVolumeClaim": {"claimName": "m"}}}}}})",
       "spec.model.package.volume", "spec.model.package", "!has(self.volume) || has(self.path)",
       "only with spec.model.package.path"},
      {"a package url that is no http(s) prefix",
       R"({"spec": {"model": {"architecture": "torchscript", "package": {"url": "ftp://h/p/", "keysSecret": "k"}}}})",
       "spec.model.package.url", "spec.model.package.url", "self.matches(\"^https?://", "URL prefix ending in '/'"},
      {"trusted node selector key that is no label key",
       R"({"spec": {"sharding": {"shards": 2}, "protection": {"trustedStages": [0], "trustedNodeSelector": {"a b": "me"}}}})",
       "spec.protection.trustedNodeSelector.a b", "spec.protection.trustedNodeSelector", "self.all(k",
       "must be a label key"},
  };
  int rules = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    json job = minimal_job();
    job.merge_patch(json::parse(c.patch));
    // Only a CEL rule can catch it: the decoder refuses, the rest of the schema does not.
    const auto errors = decoder_errors(job);
    EXPECT_NE(decoder_error_at(errors, c.decoder_path), nullptr) << joined(errors);
    EXPECT_TRUE(schema_errors(job).empty()) << joined(schema_errors(job));
    const json* rule = rule_containing(c.schema_node, c.rule_fragment);
    ASSERT_NE(rule, nullptr) << "no CEL rule with " << c.rule_fragment;
    EXPECT_NE((*rule)["message"].get<std::string>().find(c.message_fragment), std::string::npos)
        << (*rule)["message"];
    ++rules;
  }
  // ... and the same fix for each: no CEL rule without a decoder check behind it.
  // (Transition rules, which compare with oldSelf, concern updates only: they have
  // their own test, ModelDataTrainingShardingAndProtectionAreImmutable.)
  int total = 0;
  std::function<void(const json&)> count = [&](const json& node) {
    for (const auto& r : node.value("x-kubernetes-validations", json::array())) {
      if (r.value("rule", "").find("oldSelf") == std::string::npos) ++total;
    }
    for (const char* k : {"properties"}) {
      if (node.contains(k)) {
        for (const auto& [key, sub] : node[k].items()) count(sub);
      }
    }
    if (node.contains("items")) count(node["items"]);
  };
  count(root_schema());
  EXPECT_EQ(total, rules);
}

// ---- examples and bad jobs ---------------------------------------------------

std::vector<std::string> example_files() {
  std::vector<std::string> out;
  for (const auto& entry : std::filesystem::directory_iterator(kSourceDir + "/examples")) {
    if (entry.path().extension() == ".yaml") out.push_back(entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(Crd, ExamplesAreValidForTheDecoderAndTheSchema) {
  const auto files = example_files();
  ASSERT_GE(files.size(), 3u);
  for (const std::string& file : files) {
    SCOPED_TRACE(file);
    const json object = yaml_to_json(read_text(file));
    EXPECT_EQ(object.value("apiVersion", ""), "shardguard.io/v1alpha1");
    EXPECT_EQ(object.value("kind", ""), "ShardedTrainingJob");
    ASSERT_TRUE(object.contains("metadata"));
    EXPECT_FALSE(object["metadata"].value("name", "").empty());
    JobSpec decoded;
    ASSERT_NO_THROW(decoded = load_job_file(file));
    EXPECT_TRUE(schema_errors(object).empty()) << joined(schema_errors(object));
    // The API server's defaulting changes nothing the job means.
    json defaulted = object;
    apply_defaults(root_schema(), defaulted);
    EXPECT_EQ(spec_json(job_from_json(defaulted)), spec_json(decoded));
    // A decoded job written back is valid for both too (and decodes the same).
    const json again = job_json(decoded);
    EXPECT_TRUE(schema_errors(again).empty()) << joined(schema_errors(again));
    EXPECT_EQ(spec_json(job_from_json(again)), spec_json(decoded));
  }
}

TEST(Crd, BadJobsAreRejectedByBoth) {
  struct Bad {
    const char* what;
    std::string patch;  // JSON merged into the minimal job
    const char* path;
  };
  const std::vector<Bad> bad = {
      {"unknown architecture", R"({"spec": {"model": {"architecture": "resnet"}}})",
       "spec.model.architecture"},
      {"no architecture", R"({"spec": {"model": {"architecture": null, "hidden": 8}}})",
       "spec.model.architecture"},
      {"zero shards", R"({"spec": {"sharding": {"shards": 0}}})", "spec.sharding.shards"},
      {"65 shards", R"({"spec": {"sharding": {"shards": 65}}})", "spec.sharding.shards"},
      {"negative learning rate",
       R"({"spec": {"training": {"optimizer": {"learningRate": -0.01}}}})",
       "spec.training.optimizer.learningRate"},
      {"unknown balance", R"({"spec": {"sharding": {"balance": "memory"}}})",
       "spec.sharding.balance"},
      {"exposure above 1", R"({"spec": {"protection": {"maxExposure": 1.5}}})",
       "spec.protection.maxExposure"},
      {"quoted number", R"({"spec": {"model": {"hidden": "64"}}})", "spec.model.hidden"},
      {"fractional integer", R"({"spec": {"training": {"epochs": 1.5}}})",
       "spec.training.epochs"},
      {"string for boolean", R"({"spec": {"runPolicy": {"suspend": "yes"}}})",
       "spec.runPolicy.suspend"},
      {"model not an object", R"({"spec": {"model": "mlp"}})", "spec.model"},
      {"misspelt field", R"({"spec": {"training": {"batchsize": 64}}})",
       "spec.training.batchsize"},
      {"negative seed", R"({"spec": {"training": {"seed": -1}}})", "spec.training.seed"},
      {"non-string principal",
       R"({"spec": {"protection": {"export": {"allowed": true, "principals": [7]}}}})",
       "spec.protection.export.principals"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    json job = minimal_job();
    job.merge_patch(json::parse(b.patch));
    const auto errors = decoder_errors(job);
    EXPECT_NE(decoder_error_at(errors, b.path), nullptr) << joined(errors);
    EXPECT_TRUE(schema_rejects_at(job, b.path)) << joined(schema_errors(job));
  }
  // A job without spec: both refuse.
  json no_spec = minimal_job();
  no_spec.erase("spec");
  EXPECT_NE(decoder_error_at(decoder_errors(no_spec), "spec"), nullptr);
  EXPECT_TRUE(schema_rejects_at(no_spec, "spec"));
}

TEST(Crd, TemplateSidecarAndVolumeAreTypedByBoth) {
  // The fields the operator uses are accepted by both ...
  json job = minimal_job();
  job["spec"]["template"] = {{"image", "img"},
                             {"imagePullPolicy", "IfNotPresent"},
                             {"resources", {{"limits", {{"nvidia.com/gpu", 1}, {"memory", "8Gi"}}}}},
                             {"nodeSelector", {{"pool", "gpu"}}},
                             {"tolerations", {{{"key", "gpu"}, {"operator", "Exists"},
                                               {"effect", "NoSchedule"}}}}};
  job["spec"]["sidecar"] = {{"image", "s"}, {"resources", {{"requests", {{"cpu", "100m"}}}}}};
  job["spec"]["checkpoint"] = {{"volume", {{"persistentVolumeClaim", {{"claimName", "ckpt"}}}}}};
  EXPECT_TRUE(decoder_errors(job).empty()) << joined(decoder_errors(job));
  EXPECT_TRUE(schema_errors(job).empty()) << joined(schema_errors(job));

  // ... and what it would ignore, or what a pod could not take, is refused by both
  // (tests/realapi checks the same on the real API server).
  for (const auto& [path, value] :
       std::vector<std::pair<std::string, json>>{
           {"spec.template.image", 5},
           {"spec.template.env", json::array()},
           {"spec.template.resources.limits.memory", "eight gigs"},
           {"spec.template.nodeSelector.pool", 1},
           {"spec.template.tolerations", json::array({{{"operator", "Maybe"}}})},
           {"spec.sidecar.image", false},
           {"spec.sidecar.command", json::array()},
           {"spec.checkpoint.volume.hostPath", {{"path", "/data"}}}}) {
    SCOPED_TRACE(path);
    json bad = job;
    set_at(bad, path, value);
    EXPECT_FALSE(decoder_errors(bad).empty());
    EXPECT_FALSE(schema_errors(bad).empty());
  }
}

// ---- status ------------------------------------------------------------------

std::set<std::string> property_names(const std::string& path, bool items = false) {
  std::set<std::string> out;
  const json* node = schema_at(path);
  if (node == nullptr) return out;
  const json& n = items ? (*node)["items"] : *node;
  for (const auto& [key, sub] : n["properties"].items()) out.insert(key);
  return out;
}

TEST(Crd, StatusSchema) {
  const json* phase = schema_at("status.phase");
  ASSERT_NE(phase, nullptr);
  EXPECT_EQ((*phase)["enum"],
            json::array({"Pending", "Running", "Succeeded", "Failed", "Suspended"}));
  EXPECT_EQ(property_names("status"),
            (std::set<std::string>{"phase", "observedGeneration", "conditions", "shards",
                                   "failedPods", "startTime", "completionTime", "exposure",
                                   "progress"}));
  EXPECT_EQ(property_names("status.conditions", true),
            (std::set<std::string>{"type", "status", "reason", "message", "lastTransitionTime",
                                   "observedGeneration"}));
  EXPECT_EQ(property_names("status.shards", true),
            (std::set<std::string>{"index", "pod", "node", "phase", "parameters", "restarts",
                                   "lastFailedPodUID", "ledgerSequence", "replicas"}));
  std::set<std::string> replica_fields;
  for (const auto& [key, sub] : (*schema_at("status.shards"))["items"]["properties"]["replicas"]["items"]["properties"].items()) {
    replica_fields.insert(key);
  }
  EXPECT_EQ(replica_fields, (std::set<std::string>{"replica", "pod", "node", "phase", "restarts", "lastFailedPodUID",
                                                   "groupRestartPodUID", "ledgerSequence"}));
  EXPECT_EQ(property_names("status.exposure"),
            (std::set<std::string>{"maxNode", "maxPrincipal", "nodes", "exportPrincipals"}));
  EXPECT_EQ(property_names("status.exposure.nodes", true),
            (std::set<std::string>{"node", "shards", "exposedShards", "ratio", "trusted"}));
  EXPECT_EQ(property_names("status.exposure.exportPrincipals", true),
            (std::set<std::string>{"principal", "shards", "exposedShards", "ratio"}));
  EXPECT_EQ(property_names("status.progress"),
            (std::set<std::string>{"step", "epoch", "loss", "accuracy", "evalLoss"}));
  // Status is written by the operator only: nothing there is defaulted.
  EXPECT_EQ(root_schema()["properties"]["status"].dump().find("\"default\""), std::string::npos);

  // The status of DESIGN §6 validates.
  json job = minimal_job();
  job["status"] = json::parse(R"({
    "phase": "Running", "observedGeneration": 3,
    "conditions": [{"type": "ShardIsolation", "status": "True", "reason": "Isolated",
                    "message": "4 shards on 4 nodes", "observedGeneration": 3,
                    "lastTransitionTime": "2024-05-01T12:00:00Z"}],
    "shards": [{"index": 0, "pod": "fmnist-shard-0", "node": "n1", "phase": "Running",
                "parameters": 12345, "restarts": 0, "ledgerSequence": 42}],
    "exposure": {"maxNode": 0.25, "maxPrincipal": 0.25,
                 "nodes": [{"node": "n1", "shards": [0], "exposedShards": [0], "ratio": 0.25}]},
    "failedPods": 0, "startTime": "2024-05-01T12:00:00Z",
    "progress": {"step": 420, "epoch": 1, "loss": 0.41, "accuracy": 0.87}})");
  EXPECT_TRUE(schema_errors(job).empty()) << joined(schema_errors(job));
  // The decoder ignores status (it is never input).
  EXPECT_TRUE(decoder_errors(job).empty()) << joined(decoder_errors(job));

  for (const auto& [path, value] : std::vector<std::pair<std::string, json>>{
           {"status.phase", "Exploding"},
           {"status.conditions", json::array({{{"type", "Ready"}, {"status", "Maybe"}}})},
           {"status.conditions", json::array({{{"status", "True"}}})},
           {"status.exposure.maxNode", 1.5},
           {"status.shards", json::array({{{"index", 64}}})},
           {"status.shards", json::array({{{"index", 0}, {"ledgerSequence", -1}}})},
           {"status.progress.step", -1}}) {
    SCOPED_TRACE(path + " = " + value.dump());
    json bad = job;
    set_at(bad, path, value);
    EXPECT_FALSE(schema_errors(bad).empty());
  }
}

}  // namespace
}  // namespace shardguard
