// The test API server against the real one (issue 14, item 5): the same request, on
// the ShardedTrainingJob kind, to the real Kubernetes API server of the `realapi`
// fixture and to the test server (with the same CRD registered); the status code and
// the part of the answer that matters must agree. These are the behaviours the
// operator's tests still rely on the test server for: PUT without resourceVersion,
// null fields, unknown fields (pruned with a 299 warning, or refused under
// fieldValidation=Strict), deletion with finalizers, server-side apply without a
// field manager, and a stale resourceVersion.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <mutex>
#include <thread>
#include <set>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "apiserver/kube_apiserver.h"
#include "shardguard/common/jobspec.h"
#include "support/realapi.h"
#include "support/rest.h"
#include "support/wait.h"

namespace shardguard {
namespace {

using nlohmann::json;
using testing::KubeApiServer;
using testsupport::RestClient;
using testsupport::RestResponse;

std::string crd_file() { return std::string(SHARDGUARD_SOURCE_DIR) + "/crds/shardedtrainingjobs.shardguard.io.yaml"; }

class SameAsRealApi : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    auto api = testsupport::RealApi::find(&why);
    ASSERT_TRUE(api) << why;
    std::string err = "not tried";
    for (int attempt = 0; attempt < 3 && !err.empty(); ++attempt) err = api->install_crd();
    ASSERT_EQ(err, "") << err;
    real_ = std::make_unique<RestClient>(*api);
    std::ifstream in(crd_file());
    std::stringstream ss;
    ss << in.rdbuf();
    test_.create("apiextensions.k8s.io", "v1", "customresourcedefinitions", "", yaml_to_json(ss.str()));
    static int counter = 0;
    ns_ = "cmp-" + std::to_string(getpid()) + "-" + std::to_string(++counter);
    test_.create("", "v1", "namespaces", "", {{"metadata", {{"name", ns_}}}});
    fake_ = std::make_unique<RestClient>(test_.port(), test_.ca_pem(), test_.token());
  }
  void TearDown() override {
    if (!real_) return;
    auto list = real_->get(path());
    for (const auto& j : list.body.is_object() ? list.body.value("items", json::array()) : json::array()) {
      const std::string name = j["metadata"].value("name", "");
      real_->patch(path(name), R"({"metadata":{"finalizers":null}})", "application/merge-patch+json");
      real_->del(path(name));
    }
  }

  std::string path(const std::string& name = "", const std::string& sub = "") const {
    std::string p = "/apis/shardguard.io/v1alpha1/namespaces/" + ns_ + "/shardedtrainingjobs";
    if (!name.empty()) p += "/" + name;
    if (!sub.empty()) p += "/" + sub;
    return p;
  }
  json job(const std::string& name) const {
    return {{"apiVersion", "shardguard.io/v1alpha1"},
            {"kind", "ShardedTrainingJob"},
            {"metadata", {{"name", name}, {"namespace", ns_}}},
            {"spec",
             {{"model", {{"architecture", "vit"}}},
              {"sharding", {{"shards", 4}}},
              {"template", {{"image", "shardd:test"}}},
              {"sidecar", {{"image", "sidecar:test"}}}}}};
  }

  struct Pair {
    RestResponse real, test;
  };
  // The same request to both servers.
  Pair both(const std::string& method, const std::string& p, const std::string& body = "",
            const std::string& content_type = "application/json") {
    return {real_->request(method, p, body, content_type), fake_->request(method, p, body, content_type)};
  }
  Pair create_both(const json& obj, const std::string& query = "") {
    return both("POST", path() + query, obj.dump());
  }

  static std::string reason(const RestResponse& r) { return r.body.is_object() ? r.body.value("reason", "") : ""; }
  static std::set<std::string> warnings(const RestResponse& r) {
    return std::set<std::string>(r.warnings.begin(), r.warnings.end());
  }
  // Status code, reason and message agree.
  static void expect_same_status(const Pair& p, int code) {
    EXPECT_EQ(p.real.code, code) << p.real.raw << p.real.error;
    EXPECT_EQ(p.test.code, code) << p.test.raw << p.test.error;
    EXPECT_EQ(reason(p.test), reason(p.real));
    EXPECT_EQ(p.test.message(), p.real.message());
  }

  KubeApiServer test_;  // declared first: destroyed after its client (an open keep-alive
                        // connection would hold its shutdown for the keep-alive timeout)
  std::unique_ptr<RestClient> real_, fake_;
  std::string ns_;
};

// Custom resources need metadata.resourceVersion on update (their strategy does not
// allow an unconditional one), on the main resource and on /status alike.
TEST_F(SameAsRealApi, PutWithoutResourceVersionIs422) {
  auto created = create_both(job("a"));
  ASSERT_EQ(created.real.code, 201) << created.real.raw;
  ASSERT_EQ(created.test.code, 201) << created.test.raw;
  json changed = job("a");
  changed["spec"]["runPolicy"] = {{"suspend", true}};
  Pair put = both("PUT", path("a"), changed.dump());
  expect_same_status(put, 422);
  EXPECT_EQ(reason(put.real), "Invalid");
  EXPECT_NE(put.real.message().find("metadata.resourceVersion: Invalid value: 0: must be specified for an update"),
            std::string::npos)
      << put.real.message();
  changed["status"] = {{"phase", "Running"}};
  expect_same_status(both("PUT", path("a", "status"), changed.dump()), 422);

  // A stale resourceVersion is a 409 Conflict on both; the current one is accepted.
  changed["metadata"]["resourceVersion"] = created.real.body["metadata"]["resourceVersion"];
  Pair ok_real_first = {real_->put(path("a"), changed), {}};
  EXPECT_EQ(ok_real_first.real.code, 200) << ok_real_first.real.raw;
  changed["metadata"]["resourceVersion"] = created.test.body["metadata"]["resourceVersion"];
  EXPECT_EQ(fake_->put(path("a"), changed).code, 200);
  changed["metadata"]["resourceVersion"] = created.real.body["metadata"]["resourceVersion"];
  RestResponse stale_real = real_->put(path("a"), changed);
  changed["metadata"]["resourceVersion"] = created.test.body["metadata"]["resourceVersion"];
  RestResponse stale_test = fake_->put(path("a"), changed);
  expect_same_status({stale_real, stale_test}, 409);
}

// The core kinds the test server serves keep Kubernetes' unconditional update (their
// strategies allow it: ConfigMap, Secret, Pod, Service, Lease, Event). No real server
// here serves them, so this is the documented semantics, not a comparison.
TEST_F(SameAsRealApi, CoreKindsStillAllowAnUnconditionalUpdate) {
  json cm = {{"apiVersion", "v1"}, {"kind", "ConfigMap"}, {"metadata", {{"name", "c"}}}, {"data", {{"k", "1"}}}};
  ASSERT_EQ(fake_->post("/api/v1/namespaces/" + ns_ + "/configmaps", cm).code, 201);
  cm["data"]["k"] = "2";
  const RestResponse r = fake_->put("/api/v1/namespaces/" + ns_ + "/configmaps/c", cm);
  EXPECT_EQ(r.code, 200) << r.raw;
  EXPECT_EQ(r.body["data"]["k"], "2");
}

// A null field is "not set": dropped, and then defaulted like a missing one; a null
// label value becomes "".
TEST_F(SameAsRealApi, NullFieldsAreDropped) {
  json j = job("n");
  j["metadata"]["labels"] = {{"a", "b"}, {"c", nullptr}};
  j["metadata"]["annotations"] = nullptr;
  j["spec"]["checkpoint"] = nullptr;
  j["spec"]["template"]["nodeSelector"] = nullptr;
  j["spec"]["runPolicy"] = {{"activeDeadlineSeconds", nullptr}};
  Pair p = create_both(j);
  ASSERT_EQ(p.real.code, 201) << p.real.raw;
  ASSERT_EQ(p.test.code, 201) << p.test.raw;
  EXPECT_EQ(p.test.body["metadata"]["labels"], p.real.body["metadata"]["labels"]);
  EXPECT_EQ(p.real.body["metadata"]["labels"], json({{"a", "b"}, {"c", ""}}));
  EXPECT_FALSE(p.real.body["metadata"].contains("annotations"));
  EXPECT_FALSE(p.test.body["metadata"].contains("annotations"));
  EXPECT_FALSE(p.real.body["spec"]["template"].contains("nodeSelector"));
  EXPECT_FALSE(p.real.body["spec"]["runPolicy"].contains("activeDeadlineSeconds"));
  // The whole spec, defaults included, is the same on both.
  EXPECT_EQ(p.test.body["spec"], p.real.body["spec"]) << "real: " << p.real.body["spec"].dump()
                                                      << "\ntest: " << p.test.body["spec"].dump();
}

// Unknown fields are pruned, each named in a `299` warning; the rest is stored.
TEST_F(SameAsRealApi, UnknownFieldsArePrunedWithAWarning) {
  json j = job("u");
  j["top"] = 1;
  j["metadata"]["bogus"] = 2;
  j["spec"]["bogus"] = 3;
  j["spec"]["model"]["extra"] = {{"deep", 1}};
  Pair p = create_both(j);
  ASSERT_EQ(p.real.code, 201) << p.real.raw;
  ASSERT_EQ(p.test.code, 201) << p.test.raw;
  EXPECT_EQ(warnings(p.test), warnings(p.real));
  EXPECT_EQ(warnings(p.real), (std::set<std::string>{R"(299 - "unknown field \"top\"")",
                                                     R"(299 - "unknown field \"metadata.bogus\"")",
                                                     R"(299 - "unknown field \"spec.bogus\"")",
                                                     R"(299 - "unknown field \"spec.model.extra\"")"}));
  for (const RestResponse* r : {&p.real, &p.test}) {
    EXPECT_FALSE(r->body.contains("top"));
    EXPECT_FALSE(r->body["metadata"].contains("bogus"));
    EXPECT_FALSE(r->body["spec"].contains("bogus"));
    EXPECT_FALSE(r->body["spec"]["model"].contains("extra"));
  }
  EXPECT_EQ(p.test.body["spec"], p.real.body["spec"]);

  // The same on a status write.
  Pair s = both("PATCH", path("u", "status"), R"({"status":{"phase":"Running","bogus":1}})",
                "application/merge-patch+json");
  EXPECT_EQ(s.real.code, 200) << s.real.raw;
  EXPECT_EQ(s.test.code, 200) << s.test.raw;
  EXPECT_EQ(warnings(s.test), warnings(s.real));
  EXPECT_EQ(warnings(s.real), (std::set<std::string>{R"(299 - "unknown field \"status.bogus\"")"}));
  EXPECT_EQ(s.test.body["status"], s.real.body["status"]);
}

// fieldValidation=Strict: an unknown field refuses the whole request (400), naming each.
TEST_F(SameAsRealApi, StrictFieldValidationRefusesUnknownFields) {
  json j = job("s");
  j["top"] = 1;
  j["spec"]["bogus"] = 3;
  Pair p = create_both(j, "?fieldValidation=Strict");
  expect_same_status(p, 400);
  EXPECT_EQ(reason(p.real), "BadRequest");
  EXPECT_NE(p.real.message().find(R"(strict decoding error: unknown field "spec.bogus", unknown field "top")"),
            std::string::npos)
      << p.real.message();
  EXPECT_EQ(real_->get(path("s")).code, 404);
  EXPECT_EQ(fake_->get(path("s")).code, 404);
  // Without unknown fields Strict accepts.
  Pair ok = create_both(job("s"), "?fieldValidation=Strict");
  EXPECT_EQ(ok.real.code, 201) << ok.real.raw;
  EXPECT_EQ(ok.test.code, 201) << ok.test.raw;
}

// DELETE of an object with finalizers marks it (deletionTimestamp, grace 0) and bumps
// its generation; it goes when the last finalizer is removed.
TEST_F(SameAsRealApi, DeletingAnObjectWithFinalizersMarksItAndBumpsGeneration) {
  json j = job("f");
  j["metadata"]["finalizers"] = {"example.com/hold"};
  Pair c = create_both(j);
  ASSERT_EQ(c.real.code, 201) << c.real.raw;
  ASSERT_EQ(c.test.code, 201) << c.test.raw;
  Pair d = both("DELETE", path("f"));
  ASSERT_EQ(d.real.code, 200) << d.real.raw;
  EXPECT_EQ(d.test.code, 200) << d.test.raw;
  for (const RestResponse* r : {&d.real, &d.test}) {
    const json& md = r->body["metadata"];
    EXPECT_TRUE(md.contains("deletionTimestamp")) << md.dump();
    EXPECT_EQ(md.value("deletionGracePeriodSeconds", -1), 0) << md.dump();
    EXPECT_EQ(md.value("generation", 0), 2) << md.dump();
  }
  // Still there; a second DELETE changes nothing.
  Pair again = both("DELETE", path("f"));
  EXPECT_EQ(again.test.code, again.real.code);
  EXPECT_EQ(again.test.body["metadata"].value("generation", 0), again.real.body["metadata"].value("generation", 0));
  // Removing the finalizer deletes it.
  Pair un = both("PATCH", path("f"), R"({"metadata":{"finalizers":null}})", "application/merge-patch+json");
  EXPECT_EQ(un.real.code, 200) << un.real.raw;
  EXPECT_EQ(un.test.code, 200) << un.test.raw;
  expect_same_status(both("GET", path("f")), 404);
}

// Server-side apply needs a field manager: without one the request is invalid (422).
TEST_F(SameAsRealApi, ServerSideApplyWithoutFieldManagerIsRefused) {
  const std::string body = job("ssa").dump();
  Pair p = both("PATCH", path("ssa"), body, "application/apply-patch+yaml");
  expect_same_status(p, 422);
  EXPECT_EQ(p.real.message(),
            R"(PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch)");
  Pair ok = both("PATCH", path("ssa") + "?fieldManager=test", body, "application/apply-patch+yaml");
  EXPECT_EQ(ok.real.code, 201) << ok.real.raw;
  EXPECT_EQ(ok.test.code, 201) << ok.test.raw;
}

// One address for both: a test server that routes /apis/shardguard.io to the real
// server serves the real server's jobs (requests, warnings, watches, discovery) while
// its fault injection, request log and drop_watches() still apply.
TEST_F(SameAsRealApi, RouteServesTheRealServersGroupAtOneAddress) {
  std::string why;
  const auto api = testsupport::RealApi::find(&why);
  ASSERT_TRUE(api) << why;
  KubeApiServer::Options opt;
  testing::KubeApiRoute route;
  route.prefix = "/apis/shardguard.io/";
  route.port = api->port;
  route.ca_file = api->ca_file;
  route.cert_file = api->cert_file;
  route.key_file = api->key_file;
  opt.routes.push_back(route);
  KubeApiServer front(opt);
  front.create("", "v1", "namespaces", "", {{"metadata", {{"name", ns_}}}});
  RestClient via(front.port(), front.ca_pem(), front.token());

  // Discovery lists both servers' groups.
  const RestResponse groups = via.get("/apis");
  ASSERT_EQ(groups.code, 200) << groups.raw;
  std::set<std::string> names;
  for (const auto& g : groups.body["groups"]) names.insert(g.value("name", ""));
  EXPECT_TRUE(names.count("shardguard.io")) << groups.raw;
  EXPECT_TRUE(names.count("coordination.k8s.io")) << groups.raw;

  // A job written through the front is on the real server, with its warnings passed on.
  json j = job("routed");
  j["spec"]["bogus"] = 1;
  const RestResponse created = via.post(path(), j);
  ASSERT_EQ(created.code, 201) << created.raw;
  EXPECT_EQ(warnings(created), (std::set<std::string>{R"(299 - "unknown field \"spec.bogus\"")"}));
  const RestResponse direct = real_->get(path("routed"));
  ASSERT_EQ(direct.code, 200);
  EXPECT_EQ(direct.body["metadata"]["uid"], created.body["metadata"]["uid"]);
  EXPECT_FALSE(front.get("", "v1", "namespaces", "", ns_)->is_null());  // core kinds stay here

  // A watch through the front sees a change made on the real server; drop_watches()
  // ends it.
  std::mutex mu;
  std::string stream;
  std::atomic<bool> ended{false};
  std::thread watcher([&] {
    httplib::SSLClient cli("127.0.0.1", front.port());
    cli.enable_server_certificate_verification(false);  // the content is what is tested here
    cli.set_read_timeout(std::chrono::seconds(30));
    cli.Get((path() + "?watch=1&resourceVersion=" + created.body["metadata"].value("resourceVersion", "")).c_str(),
            {{"Authorization", "Bearer " + front.token()}}, [&](const char* data, size_t n) {
              std::lock_guard<std::mutex> lock(mu);
              stream.append(data, n);
              return true;
            });
    ended = true;
  });
  ASSERT_TRUE(testsupport::eventually([&] { return front.open_watches() == 1; }, std::chrono::seconds(10)));
  const RestResponse labelled =
      real_->patch(path("routed"), R"({"metadata":{"labels":{"seen":"yes"}}})", "application/merge-patch+json");
  ASSERT_EQ(labelled.code, 200) << labelled.raw;
  EXPECT_TRUE(testsupport::eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return stream.find("\"MODIFIED\"") != std::string::npos && stream.find("\"seen\":\"yes\"") != std::string::npos;
  }, std::chrono::seconds(10))) << stream;
  front.drop_watches();
  EXPECT_TRUE(testsupport::eventually([&] { return ended.load(); }, std::chrono::seconds(10)));
  watcher.join();
  // The count drops when the server side lets go of the stream, just after the client saw its end.
  EXPECT_TRUE(testsupport::eventually([&] { return front.open_watches() == 0; }, std::chrono::seconds(10)));

  // Injected faults and the request log cover routed requests too.
  front.fail_next(1, 503, "GET", "/apis/shardguard.io/");
  EXPECT_EQ(via.get(path("routed")).code, 503);
  EXPECT_EQ(via.get(path("routed")).code, 200);
  bool logged = false;
  for (const auto& r : front.requests())
    logged = logged || (r.verb == "watch" && r.group == "shardguard.io" && r.resource == "shardedtrainingjobs");
  EXPECT_TRUE(logged);
}

}  // namespace
}  // namespace shardguard
