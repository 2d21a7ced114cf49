// The test Kubernetes API server over real HTTPS: auth, CRUD, conflicts, generation,
// the status subresource, finalizers, garbage collection, selectors, list + watch,
// bookmarks, 410 Expired, fault injection and CRDs.
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>

#include "kube_apiserver.h"
#include "test_client.h"

namespace shardguard::testing {
namespace {

using apitest::Api;
using apitest::WatchStream;
using json = nlohmann::json;

const std::string kCm = "/api/v1/namespaces/default/configmaps";
const std::string kStj = "/apis/shardguard.io/v1alpha1/namespaces/default/shardedtrainingjobs";

// Polls pred() every 5 ms until it holds or `limit` passes.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json cm(const std::string& name, json labels = json::object(), json data = {{"k", "v"}}) {
  return {{"apiVersion", "v1"}, {"kind", "ConfigMap"},
          {"metadata", {{"name", name}, {"labels", labels}}}, {"data", data}};
}

std::string rv(const json& o) { return o["metadata"]["resourceVersion"].get<std::string>(); }

// Installs the ShardedTrainingJob CRD by POSTing the YAML file as it is.
void install_crd(Api& api) {
  auto r = api.post_raw("/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                        read_file(std::string(SHARDGUARD_SOURCE_DIR) + "/crds/shardedtrainingjobs.shardguard.io.yaml"),
                        "application/yaml");
  ASSERT_EQ(r.code, 201) << r.raw;
}

json example_job() {
  return json::parse(R"({"apiVersion":"shardguard.io/v1alpha1","kind":"ShardedTrainingJob",
    "metadata":{"name":"fmnist-cnn","namespace":"default"},
    "spec":{"model":{"architecture":"cnn"},"dataset":{"name":"fashion-mnist","path":"/d"},
            "sharding":{"shards":4}}})");
}

TEST(ApiServer, RejectsMissingOrWrongToken) {
  KubeApiServer s;
  Api wrong(s, "not-the-token");
  auto r = wrong.get(kCm);
  EXPECT_EQ(r.code, 401);
  EXPECT_EQ(r.body["kind"], "Status");
  EXPECT_EQ(r.body["reason"], "Unauthorized");
  EXPECT_EQ(r.body["code"], 401);
  Api right(s);
  EXPECT_EQ(right.get(kCm).code, 200);
  EXPECT_EQ(right.get("/version").code, 200);
}

TEST(ApiServer, CrudOfAConfigMap) {
  KubeApiServer s;
  Api api(s);
  auto c = api.post(kCm, cm("a"));
  ASSERT_EQ(c.code, 201) << c.raw;
  EXPECT_EQ(c.body["metadata"]["namespace"], "default");
  EXPECT_FALSE(c.body["metadata"]["uid"].get<std::string>().empty());
  EXPECT_EQ(c.body["metadata"]["creationTimestamp"].get<std::string>().back(), 'Z');
  EXPECT_EQ(c.body["metadata"]["generation"], 1);

  auto g = api.get(kCm + "/a");
  ASSERT_EQ(g.code, 200);
  EXPECT_EQ(g.body["data"]["k"], "v");
  EXPECT_EQ(g.body["kind"], "ConfigMap");
  EXPECT_EQ(g.body["apiVersion"], "v1");

  json upd = g.body;
  upd["data"]["k"] = "w";
  auto u = api.put(kCm + "/a", upd);
  ASSERT_EQ(u.code, 200) << u.raw;
  EXPECT_GT(std::stoull(rv(u.body)), std::stoull(rv(g.body)));
  EXPECT_EQ(u.body["metadata"]["uid"], g.body["metadata"]["uid"]);

  auto l = api.get(kCm);
  ASSERT_EQ(l.code, 200);
  EXPECT_EQ(l.body["kind"], "ConfigMapList");
  ASSERT_EQ(l.body["items"].size(), 1u);
  EXPECT_EQ(l.body["items"][0]["kind"], "ConfigMap");
  EXPECT_FALSE(l.body["metadata"]["resourceVersion"].get<std::string>().empty());

  EXPECT_EQ(api.del(kCm + "/a").code, 200);
  auto gone = api.get(kCm + "/a");
  EXPECT_EQ(gone.code, 404);
  EXPECT_EQ(gone.body["reason"], "NotFound");
  EXPECT_EQ(gone.body["details"]["name"], "a");
  EXPECT_EQ(api.del(kCm + "/a").code, 404);
}

TEST(ApiServer, ConflictsAndBadRequests) {
  KubeApiServer s;
  Api api(s);
  ASSERT_EQ(api.post(kCm, cm("a")).code, 201);
  auto dup = api.post(kCm, cm("a"));
  EXPECT_EQ(dup.code, 409);
  EXPECT_EQ(dup.body["reason"], "AlreadyExists");

  auto first = api.get(kCm + "/a").body;
  json one = first;
  one["data"]["k"] = "1";
  ASSERT_EQ(api.put(kCm + "/a", one).code, 200);
  json stale = first;  // still carries the old resourceVersion
  stale["data"]["k"] = "2";
  auto conflict = api.put(kCm + "/a", stale);
  EXPECT_EQ(conflict.code, 409);
  EXPECT_EQ(conflict.body["reason"], "Conflict");
  EXPECT_NE(conflict.body["message"].get<std::string>().find(
                "the object has been modified; please apply your changes to the latest version and try again"),
            std::string::npos);
  stale["metadata"].erase("resourceVersion");  // unconditional
  EXPECT_EQ(api.put(kCm + "/a", stale).code, 200);
  EXPECT_EQ(api.get(kCm + "/a").body["data"]["k"], "2");

  json other_ns = cm("b");
  other_ns["metadata"]["namespace"] = "kube-system";
  EXPECT_EQ(api.post(kCm, other_ns).code, 400);
  EXPECT_EQ(api.post("/api/v1/namespaces/nope/configmaps", cm("c")).code, 404);
  EXPECT_EQ(api.get("/api/v1/namespaces/default/widgets").code, 404);
  EXPECT_EQ(api.get("/apis/example.com/v1/namespaces/default/widgets").code, 404);
  EXPECT_EQ(api.put(kCm + "/missing", cm("missing")).code, 404);

  json gen = cm("");
  gen["metadata"].erase("name");
  gen["metadata"]["generateName"] = "gen-";
  auto g = api.post(kCm, gen);
  ASSERT_EQ(g.code, 201);
  EXPECT_EQ(g.body["metadata"]["name"].get<std::string>().rfind("gen-", 0), 0u);
  EXPECT_EQ(g.body["metadata"]["name"].get<std::string>().size(), 9u);
}

TEST(ApiServer, PatchVariants) {
  KubeApiServer s;
  Api api(s);
  ASSERT_EQ(api.post(kCm, cm("a", {{"x", "1"}})).code, 201);
  auto m = api.patch(kCm + "/a", {{"metadata", {{"labels", {{"y", "2"}, {"x", nullptr}}}}}});
  ASSERT_EQ(m.code, 200) << m.raw;
  EXPECT_EQ(m.body["metadata"]["labels"], json({{"y", "2"}}));
  auto sm = api.patch(kCm + "/a", {{"data", {{"z", "3"}}}}, "application/strategic-merge-patch+json");
  ASSERT_EQ(sm.code, 200);
  EXPECT_EQ(sm.body["data"], json({{"k", "v"}, {"z", "3"}}));
  auto jp = api.patch(kCm + "/a", json::array({{{"op", "replace"}, {"path", "/data/k"}, {"value", "j"}}}),
                      "application/json-patch+json");
  ASSERT_EQ(jp.code, 200) << jp.raw;
  EXPECT_EQ(jp.body["data"]["k"], "j");
  auto stale = api.patch(kCm + "/a", {{"metadata", {{"resourceVersion", "1"}}}, {"data", {{"k", "s"}}}});
  EXPECT_EQ(stale.code, 409);
  EXPECT_EQ(api.patch(kCm + "/nope", {{"data", {{"k", "s"}}}}).code, 404);
}

TEST(ApiServer, CrdRegistersTheResourceAppliesDefaultsAndStatusSubresource) {
  KubeApiServer s;
  Api api(s);
  EXPECT_EQ(api.get(kStj).code, 404);
  install_crd(api);
  auto crd = api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/shardedtrainingjobs.shardguard.io");
  ASSERT_EQ(crd.code, 200);
  bool established = false;
  for (const auto& c : crd.body["status"]["conditions"])
    established = established || (c["type"] == "Established" && c["status"] == "True");
  EXPECT_TRUE(established);

  auto disc = api.get("/apis/shardguard.io/v1alpha1");
  ASSERT_EQ(disc.code, 200);
  EXPECT_EQ(disc.body["kind"], "APIResourceList");
  bool found = false;
  for (const auto& r : disc.body["resources"])
    if (r["name"] == "shardedtrainingjobs") {
      found = true;
      EXPECT_EQ(r["kind"], "ShardedTrainingJob");
      EXPECT_EQ(r["namespaced"], true);
      EXPECT_EQ(r["shortNames"], json({"stj"}));
      EXPECT_EQ(r["singularName"], "shardedtrainingjob");
    }
  EXPECT_TRUE(found);

  json job = example_job();
  job["status"] = {{"phase", "Running"}};  // create cannot set status
  auto c = api.post(kStj, job);
  ASSERT_EQ(c.code, 201) << c.raw;
  EXPECT_FALSE(c.body.contains("status"));
  EXPECT_EQ(c.body["metadata"]["generation"], 1);
  // Structural defaults from the CRD schema.
  EXPECT_EQ(c.body["spec"]["model"]["depth"], 3);
  EXPECT_EQ(c.body["spec"]["runPolicy"]["backoffLimit"], 3);

  // Main resource: spec change bumps generation, status changes are ignored.
  json upd = c.body;
  upd["spec"]["sharding"]["shards"] = 2;
  upd["status"] = {{"phase", "Running"}};
  auto u = api.put(kStj + "/fmnist-cnn", upd);
  ASSERT_EQ(u.code, 200) << u.raw;
  EXPECT_EQ(u.body["metadata"]["generation"], 2);
  EXPECT_FALSE(u.body.contains("status"));

  // Metadata-only change: no new generation.
  auto lab = api.patch(kStj + "/fmnist-cnn", {{"metadata", {{"labels", {{"a", "b"}}}}}});
  ASSERT_EQ(lab.code, 200);
  EXPECT_EQ(lab.body["metadata"]["generation"], 2);

  // Status subresource: only status changes, generation stays.
  json st = lab.body;
  st["status"] = {{"phase", "Running"}, {"progress", {{"step", 10}}}};
  st["spec"]["sharding"]["shards"] = 7;
  auto su = api.put(kStj + "/fmnist-cnn/status", st);
  ASSERT_EQ(su.code, 200) << su.raw;
  EXPECT_EQ(su.body["status"]["phase"], "Running");
  EXPECT_EQ(su.body["spec"]["sharding"]["shards"], 2);
  EXPECT_EQ(su.body["metadata"]["generation"], 2);
  auto sp = api.patch(kStj + "/fmnist-cnn/status", {{"status", {{"phase", "Succeeded"}}}});
  ASSERT_EQ(sp.code, 200);
  EXPECT_EQ(sp.body["status"]["phase"], "Succeeded");
  EXPECT_EQ(sp.body["status"]["progress"]["step"], 10);

  // A no-op update writes nothing.
  auto again = api.put(kStj + "/fmnist-cnn/status", sp.body);
  ASSERT_EQ(again.code, 200);
  EXPECT_EQ(rv(again.body), rv(sp.body));

  // The printer columns as a Table.
  auto table = api.get(kStj, "application/json;as=Table;v=v1;g=meta.k8s.io,application/json");
  ASSERT_EQ(table.code, 200);
  EXPECT_EQ(table.body["kind"], "Table");
  std::vector<std::string> names;
  for (const auto& col : table.body["columnDefinitions"]) names.push_back(col["name"]);
  EXPECT_EQ(names, (std::vector<std::string>{"Name", "Phase", "Shards", "Step", "Accuracy", "Eval-Loss", "Exposure", "Age"}));
  ASSERT_EQ(table.body["rows"].size(), 1u);
  const json& cells = table.body["rows"][0]["cells"];
  EXPECT_EQ(cells[0], "fmnist-cnn");
  EXPECT_EQ(cells[1], "Succeeded");
  EXPECT_EQ(cells[2], 2);
  EXPECT_EQ(cells[3], 10);
  EXPECT_TRUE(cells[4].is_null());
  EXPECT_TRUE(cells[5].is_null());
  EXPECT_TRUE(cells[7].is_string());

  // Deleting the CRD deletes its resources and the resource itself.
  EXPECT_EQ(api.del("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/shardedtrainingjobs.shardguard.io").code, 200);
  EXPECT_EQ(api.get(kStj).code, 404);
}

TEST(ApiServer, PodStatusSubresource) {
  KubeApiServer s;
  Api api(s);
  const std::string pods = "/api/v1/namespaces/default/pods";
  auto c = api.post(pods, {{"metadata", {{"name", "p"}}}, {"spec", {{"containers", json::array()}}},
                           {"status", {{"phase", "Running"}}}});
  ASSERT_EQ(c.code, 201);
  EXPECT_EQ(c.body["status"]["phase"], "Pending");
  auto sp = api.patch(pods + "/p/status", {{"status", {{"phase", "Running"}}}});
  ASSERT_EQ(sp.code, 200);
  EXPECT_EQ(sp.body["status"]["phase"], "Running");
  auto ignored = api.patch(pods + "/p", {{"status", {{"phase", "Failed"}}}, {"spec", {{"nodeName", "n1"}}}});
  ASSERT_EQ(ignored.code, 200);
  EXPECT_EQ(ignored.body["status"]["phase"], "Running");
  EXPECT_EQ(ignored.body["spec"]["nodeName"], "n1");
  EXPECT_EQ(api.get(kCm + "/x/status").code, 404);  // configmaps have no status subresource
}

TEST(ApiServer, FinalizersKeepTheObjectUntilEmptied) {
  KubeApiServer s;
  Api api(s);
  json o = cm("f");
  o["metadata"]["finalizers"] = {"example.com/cleanup"};
  auto c = api.post(kCm, o);
  ASSERT_EQ(c.code, 201);
  WatchStream w(s, kCm + "?watch=1&resourceVersion=" + rv(c.body));
  auto d = api.del(kCm + "/f");
  ASSERT_EQ(d.code, 200);
  EXPECT_TRUE(d.body["metadata"].contains("deletionTimestamp"));
  EXPECT_EQ(d.body["metadata"]["deletionGracePeriodSeconds"], 0);
  auto g = api.get(kCm + "/f");
  ASSERT_EQ(g.code, 200);
  EXPECT_TRUE(g.body["metadata"].contains("deletionTimestamp"));
  EXPECT_EQ(api.del(kCm + "/f").code, 200);  // again: fine, nothing changes
  EXPECT_EQ(rv(api.get(kCm + "/f").body), rv(g.body));
  // No new finalizers while being deleted.
  EXPECT_EQ(api.patch(kCm + "/f", {{"metadata", {{"finalizers", {"example.com/cleanup", "x/y"}}}}}).code, 422);

  auto emptied = api.patch(kCm + "/f", {{"metadata", {{"finalizers", nullptr}}}});
  ASSERT_EQ(emptied.code, 200) << emptied.raw;
  EXPECT_EQ(api.get(kCm + "/f").code, 404);
  ASSERT_TRUE(eventually([&] { return w.changes().size() >= 3; }));
  auto ev = w.changes();
  EXPECT_EQ(ev[0]["type"], "MODIFIED");  // deletionTimestamp set
  EXPECT_TRUE(ev[0]["object"]["metadata"].contains("deletionTimestamp"));
  EXPECT_EQ(ev[1]["type"], "MODIFIED");  // finalizers emptied
  EXPECT_EQ(ev[2]["type"], "DELETED");
}

TEST(ApiServer, GarbageCollectionCascades) {
  KubeApiServer s;
  Api api(s);
  auto owner = api.post(kCm, cm("owner")).body;
  auto ref = [](const json& o) {
    return json::array({{{"apiVersion", "v1"}, {"kind", "ConfigMap"}, {"name", o["metadata"]["name"]},
                         {"uid", o["metadata"]["uid"]}, {"controller", true}}});
  };
  json child = cm("child");
  child["metadata"]["ownerReferences"] = ref(owner);
  auto c = api.post(kCm, child).body;
  json grandchild = {{"metadata", {{"name", "gc"}, {"ownerReferences", ref(c)}}}, {"type", "Opaque"},
                     {"stringData", {{"key", "secret"}}}};
  auto gc = api.post("/api/v1/namespaces/default/secrets", grandchild);
  ASSERT_EQ(gc.code, 201);
  EXPECT_EQ(gc.body["data"]["key"], "c2VjcmV0");  // stringData is merged into data
  EXPECT_FALSE(gc.body.contains("stringData"));
  json held = cm("held");
  held["metadata"]["ownerReferences"] = ref(owner);
  held["metadata"]["finalizers"] = {"example.com/keep"};
  ASSERT_EQ(api.post(kCm, held).code, 201);
  auto other = api.post(kCm, cm("other")).body;
  json shared = cm("shared");
  shared["metadata"]["ownerReferences"] = ref(owner);
  shared["metadata"]["ownerReferences"].push_back(ref(other)[0]);
  ASSERT_EQ(api.post(kCm, shared).code, 201);

  ASSERT_EQ(api.del(kCm + "/owner").code, 200);
  EXPECT_EQ(api.get(kCm + "/owner").code, 404);
  EXPECT_EQ(api.get(kCm + "/child").code, 404);
  EXPECT_EQ(api.get("/api/v1/namespaces/default/secrets/gc").code, 404);
  auto h = api.get(kCm + "/held");  // its finalizer holds it, marked for deletion
  ASSERT_EQ(h.code, 200);
  EXPECT_TRUE(h.body["metadata"].contains("deletionTimestamp"));
  auto sh = api.get(kCm + "/shared");  // another owner still exists: only the dangling reference goes
  ASSERT_EQ(sh.code, 200);
  ASSERT_EQ(sh.body["metadata"]["ownerReferences"].size(), 1u);
  EXPECT_EQ(sh.body["metadata"]["ownerReferences"][0]["name"], "other");

  // Orphan propagation leaves dependents without the reference.
  json orphan = cm("orphan");
  orphan["metadata"]["ownerReferences"] = ref(other);
  ASSERT_EQ(api.post(kCm, orphan).code, 201);
  ASSERT_EQ(api.del(kCm + "/other", {{"kind", "DeleteOptions"}, {"apiVersion", "v1"},
                                     {"propagationPolicy", "Orphan"}}).code, 200);
  auto o = api.get(kCm + "/orphan");
  ASSERT_EQ(o.code, 200);
  EXPECT_FALSE(o.body["metadata"].contains("ownerReferences"));
  EXPECT_EQ(api.get(kCm + "/shared").code, 200);
}

TEST(ApiServer, LabelAndFieldSelectors) {
  KubeApiServer s;
  Api api(s);
  ASSERT_EQ(api.post(kCm, cm("a", {{"app", "x"}, {"tier", "web"}})).code, 201);
  ASSERT_EQ(api.post(kCm, cm("b", {{"app", "y"}, {"tier", "db"}})).code, 201);
  ASSERT_EQ(api.post(kCm, cm("c", {{"app", "x"}})).code, 201);
  auto names = [&](const std::string& query) {
    std::vector<std::string> out;
    auto r = api.get(kCm + "?" + query);
    EXPECT_EQ(r.code, 200) << query << " " << r.raw;
    for (const auto& i : r.body["items"]) out.push_back(i["metadata"]["name"]);
    std::sort(out.begin(), out.end());
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(names("labelSelector=app%3Dx"), (V{"a", "c"}));
  EXPECT_EQ(names("labelSelector=app%3D%3Dx%2Ctier%3Dweb"), (V{"a"}));
  EXPECT_EQ(names("labelSelector=app%21%3Dx"), (V{"b"}));
  EXPECT_EQ(names("labelSelector=tier%20in%20(web%2Cdb)"), (V{"a", "b"}));
  EXPECT_EQ(names("labelSelector=tier%20notin%20(web)"), (V{"b", "c"}));
  EXPECT_EQ(names("labelSelector=tier"), (V{"a", "b"}));
  EXPECT_EQ(names("labelSelector=%21tier"), (V{"c"}));
  EXPECT_EQ(names("fieldSelector=metadata.name%3Db"), (V{"b"}));
  EXPECT_EQ(names("fieldSelector=metadata.name%21%3Db"), (V{"a", "c"}));
  EXPECT_EQ(names("fieldSelector=metadata.namespace%3Ddefault&labelSelector=app%3Dy"), (V{"b"}));
  EXPECT_EQ(api.get(kCm + "?labelSelector=tier%20in%20web").code, 400);
  // All namespaces.
  ASSERT_EQ(api.post("/api/v1/namespaces/kube-system/configmaps", cm("d", {{"app", "x"}})).code, 201);
  auto all = api.get("/api/v1/configmaps?labelSelector=app%3Dx");
  ASSERT_EQ(all.code, 200);
  EXPECT_EQ(all.body["items"].size(), 3u);
  // The direct API agrees.
  EXPECT_EQ(s.list("", "v1", "configmaps", "", "app=x").size(), 3u);
  EXPECT_EQ(s.list("", "v1", "configmaps", "default", "app=x").size(), 2u);
}

TEST(ApiServer, ListThenWatchFromItsResourceVersionMissesNothing) {
  KubeApiServer s;
  Api api(s);
  ASSERT_EQ(api.post(kCm, cm("before")).code, 201);
  auto list = api.get(kCm);
  ASSERT_EQ(list.code, 200);
  const std::string list_rv = list.body["metadata"]["resourceVersion"];
  // Changes between the list and the watch must be replayed from history.
  s.create("", "v1", "configmaps", "default", cm("gap1"));
  auto upd = s.get("", "v1", "configmaps", "default", "before").value();
  upd["data"]["k"] = "changed";
  s.update("", "v1", "configmaps", "default", upd);
  WatchStream w(s, kCm + "?watch=true&resourceVersion=" + list_rv);
  ASSERT_TRUE(eventually([&] { return s.open_watches() == 1; }));
  s.remove("", "v1", "configmaps", "default", "gap1");
  ASSERT_TRUE(eventually([&] { return w.changes().size() >= 3; }));
  auto ev = w.changes();
  ASSERT_EQ(ev.size(), 3u);
  EXPECT_EQ(ev[0]["type"], "ADDED");
  EXPECT_EQ(ev[0]["object"]["metadata"]["name"], "gap1");
  EXPECT_EQ(ev[1]["type"], "MODIFIED");
  EXPECT_EQ(ev[1]["object"]["data"]["k"], "changed");
  EXPECT_EQ(ev[2]["type"], "DELETED");
  EXPECT_EQ(ev[2]["object"]["kind"], "ConfigMap");
  uint64_t last = 0;
  for (const auto& e : ev) {
    uint64_t r = std::stoull(rv(e["object"]));
    EXPECT_GT(r, last);
    last = r;
  }
  EXPECT_EQ(std::to_string(last), s.resource_version());
}

TEST(ApiServer, WatchFromZeroSendsTheCurrentStateThenLiveEvents) {
  KubeApiServer s;
  Api api(s);
  ASSERT_EQ(api.post(kCm, cm("a", {{"app", "x"}})).code, 201);
  ASSERT_EQ(api.post(kCm, cm("b", {{"app", "y"}})).code, 201);
  WatchStream all(s, kCm + "?watch=1&resourceVersion=0");
  WatchStream sel(s, kCm + "?watch=1&labelSelector=app%3Dx");
  ASSERT_TRUE(eventually([&] { return all.changes().size() == 2 && sel.changes().size() == 1; }));
  // b starts matching app=x → ADDED for the selector watch; a stops → DELETED.
  ASSERT_EQ(api.patch(kCm + "/b", {{"metadata", {{"labels", {{"app", "x"}}}}}}).code, 200);
  ASSERT_EQ(api.patch(kCm + "/a", {{"metadata", {{"labels", {{"app", "z"}}}}}}).code, 200);
  ASSERT_TRUE(eventually([&] { return all.changes().size() == 4 && sel.changes().size() == 3; }));
  auto ev = sel.changes();
  EXPECT_EQ(ev[0]["type"], "ADDED");
  EXPECT_EQ(ev[0]["object"]["metadata"]["name"], "a");
  EXPECT_EQ(ev[1]["type"], "ADDED");
  EXPECT_EQ(ev[1]["object"]["metadata"]["name"], "b");
  EXPECT_EQ(ev[2]["type"], "DELETED");
  EXPECT_EQ(ev[2]["object"]["metadata"]["name"], "a");
  EXPECT_EQ(all.changes()[3]["type"], "MODIFIED");
}

// Go clients (kubectl, client-go) send Accept-Encoding: gzip; a compressed watch stream
// would hold events back in the compressor, so watch responses are never compressed.
TEST(ApiServer, WatchEventsArriveAtOnceForClientsAcceptingGzip) {
  KubeApiServer s;
  WatchStream w(s, kCm + "?watch=true&resourceVersion=" + s.resource_version(),
                {{"Accept-Encoding", "gzip, deflate"}});
  ASSERT_TRUE(eventually([&] { return s.open_watches() == 1; }));
  s.create("", "v1", "configmaps", "default", cm("a"));
  ASSERT_TRUE(eventually([&] { return w.changes().size() == 1; }, std::chrono::seconds(5)));
  EXPECT_EQ(w.changes()[0]["type"], "ADDED");
}

TEST(ApiServer, BookmarksArrive) {
  KubeApiServer::Options opt;
  opt.bookmark_interval = std::chrono::milliseconds(50);
  KubeApiServer s(opt);
  s.create("", "v1", "configmaps", "default", cm("a"));
  WatchStream w(s, kCm + "?watch=1&allowWatchBookmarks=true&resourceVersion=" + s.resource_version());
  ASSERT_TRUE(eventually([&] {
    for (const auto& e : w.events())
      if (e["type"] == "BOOKMARK") return true;
    return false;
  }));
  json bm;
  for (const auto& e : w.events())
    if (e["type"] == "BOOKMARK") bm = e;
  EXPECT_EQ(bm["object"]["kind"], "ConfigMap");
  EXPECT_EQ(rv(bm["object"]), s.resource_version());
  EXPECT_TRUE(w.changes().empty());
  // Without allowWatchBookmarks: none.
  WatchStream plain(s, kCm + "?watch=1&timeoutSeconds=1&resourceVersion=" + s.resource_version());
  ASSERT_TRUE(eventually([&] { return plain.ended(); }));
  EXPECT_TRUE(plain.events().empty());
}

TEST(ApiServer, WatchFromACompactedResourceVersionGets410) {
  KubeApiServer s;
  auto a = s.create("", "v1", "configmaps", "default", cm("a"));
  s.create("", "v1", "configmaps", "default", cm("b"));
  s.compact();
  WatchStream w(s, kCm + "?watch=1&resourceVersion=" + rv(a));
  ASSERT_TRUE(eventually([&] { return w.ended(); }));
  auto ev = w.events();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0]["type"], "ERROR");
  EXPECT_EQ(ev[0]["object"]["kind"], "Status");
  EXPECT_EQ(ev[0]["object"]["code"], 410);
  EXPECT_EQ(ev[0]["object"]["reason"], "Expired");
  // From the current resourceVersion it works.
  WatchStream ok(s, kCm + "?watch=1&resourceVersion=" + s.resource_version());
  s.create("", "v1", "configmaps", "default", cm("c"));
  ASSERT_TRUE(eventually([&] { return ok.changes().size() == 1; }));
}

TEST(ApiServer, HistoryLimitExpiresOldResourceVersions) {
  KubeApiServer::Options opt;
  opt.history_limit = 3;
  KubeApiServer s(opt);
  auto a = s.create("", "v1", "configmaps", "default", cm("a"));
  for (int i = 0; i < 5; ++i) s.create("", "v1", "configmaps", "default", cm("x" + std::to_string(i)));
  WatchStream old(s, kCm + "?watch=1&resourceVersion=" + rv(a));
  ASSERT_TRUE(eventually([&] { return old.ended(); }));
  ASSERT_EQ(old.events().size(), 1u);
  EXPECT_EQ(old.events()[0]["object"]["code"], 410);
  auto recent = s.get("", "v1", "configmaps", "default", "x1").value();
  WatchStream fresh(s, kCm + "?watch=1&resourceVersion=" + rv(recent));
  ASSERT_TRUE(eventually([&] { return fresh.changes().size() == 3; }));
}

TEST(ApiServer, WatchTimeoutAndDropWatches) {
  KubeApiServer s;
  {
    WatchStream t(s, kCm + "?watch=1&timeoutSeconds=1");
    ASSERT_TRUE(eventually([&] { return t.ended(); }, std::chrono::seconds(5)));
    EXPECT_EQ(t.status(), 200);
  }
  ASSERT_TRUE(eventually([&] { return s.open_watches() == 0; }));
  WatchStream a(s, kCm + "?watch=1");
  WatchStream b(s, "/api/v1/namespaces/default/pods?watch=1");
  ASSERT_TRUE(eventually([&] { return s.open_watches() == 2; }));
  s.drop_watches();
  ASSERT_TRUE(eventually([&] { return a.ended() && b.ended(); }));
  ASSERT_TRUE(eventually([&] { return s.open_watches() == 0; }));
}

TEST(ApiServer, FailNextLatencyAndTheRequestLog) {
  KubeApiServer s;
  Api api(s);
  s.fail_next(2, 500, "GET", "/configmaps");
  EXPECT_EQ(api.post(kCm, cm("a")).code, 201);  // POST does not match
  auto f1 = api.get(kCm + "/a");
  EXPECT_EQ(f1.code, 500);
  EXPECT_EQ(f1.body["kind"], "Status");
  EXPECT_EQ(f1.body["reason"], "InternalError");
  EXPECT_EQ(api.get(kCm).code, 500);
  EXPECT_EQ(api.get(kCm + "/a").code, 200);
  s.fail_next(1, 503);
  EXPECT_EQ(api.get("/api/v1/namespaces/default/pods").code, 503);
  EXPECT_EQ(api.get("/api/v1/namespaces/default/pods").code, 200);

  auto log = s.requests();
  ASSERT_GE(log.size(), 6u);
  EXPECT_EQ(log[0].verb, "create");
  EXPECT_EQ(log[0].code, 201);
  EXPECT_EQ(log[0].resource, "configmaps");
  EXPECT_EQ(log[0].ns, "default");
  EXPECT_EQ(log[0].user_agent, "apiserver-test");
  EXPECT_EQ(log[1].verb, "get");
  EXPECT_EQ(log[1].name, "a");
  EXPECT_EQ(log[1].code, 500);
  EXPECT_EQ(log[2].verb, "list");
  s.clear_requests();
  EXPECT_TRUE(s.requests().empty());

  s.set_latency(std::chrono::milliseconds(200));
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(api.get(kCm).code, 200);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(200));
  s.set_latency(std::chrono::milliseconds(0));
  api.patch(kCm + "/a", {{"data", {{"k", "p"}}}});
  api.del(kCm + "/a");
  log = s.requests();
  ASSERT_EQ(log.size(), 3u);
  EXPECT_EQ(log[1].verb, "patch");
  EXPECT_EQ(log[2].verb, "delete");
}

TEST(ApiServer, DirectApiMatchesHttpSemantics) {
  KubeApiServer s;
  auto a = s.create("", "v1", "configmaps", "default", cm("a"));
  EXPECT_EQ(a["kind"], "ConfigMap");
  try {
    s.create("", "v1", "configmaps", "default", cm("a"));
    FAIL() << "expected AlreadyExists";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 409);
    EXPECT_EQ(e.reason(), "AlreadyExists");
    EXPECT_EQ(e.status()["kind"], "Status");
  }
  json stale = a;
  s.update("", "v1", "configmaps", "default", a);  // no-op, same RV
  json b = a;
  b["data"]["k"] = "x";
  s.update("", "v1", "configmaps", "default", b);
  stale["data"]["k"] = "y";
  EXPECT_THROW(s.update("", "v1", "configmaps", "default", stale), ApiError);
  EXPECT_FALSE(s.get("", "v1", "configmaps", "default", "zzz").has_value());
  EXPECT_THROW(s.remove("", "v1", "configmaps", "default", "zzz"), ApiError);
  EXPECT_THROW(s.list("nope.io", "v1", "things"), ApiError);
  // Nodes are cluster-scoped; nodes keep the status they are created with (the kubelet's).
  auto n = s.create("", "v1", "nodes", "", {{"metadata", {{"name", "n1"}, {"labels", {{"kubernetes.io/hostname", "n1"}}}}},
                                            {"status", {{"allocatable", {{"nvidia.com/gpu", "1"}}}}}});
  EXPECT_EQ(n["status"]["allocatable"]["nvidia.com/gpu"], "1");
  EXPECT_FALSE(n["metadata"].contains("namespace"));
  auto d = s.dump();
  bool has_node = false;
  for (const auto& o : d["items"]) has_node = has_node || (o["kind"] == "Node" && o["metadata"]["name"] == "n1");
  EXPECT_TRUE(has_node);
  // Leases work (leader election).
  auto l = s.create("coordination.k8s.io", "v1", "leases", "default",
                    {{"metadata", {{"name", "leader"}}}, {"spec", {{"holderIdentity", "a"}}}});
  EXPECT_EQ(l["apiVersion"], "coordination.k8s.io/v1");
}

TEST(ApiServer, DiscoveryDocuments) {
  KubeApiServer s;
  Api api(s);
  auto v = api.get("/version");
  ASSERT_EQ(v.code, 200);
  EXPECT_EQ(v.body["major"], "1");
  auto core = api.get("/api");
  EXPECT_EQ(core.body["versions"], json({"v1"}));
  auto groups = api.get("/apis");
  ASSERT_EQ(groups.code, 200);
  bool coordination = false;
  for (const auto& g : groups.body["groups"]) coordination = coordination || g["name"] == "coordination.k8s.io";
  EXPECT_TRUE(coordination);
  auto v1 = api.get("/api/v1");
  ASSERT_EQ(v1.code, 200);
  bool pods_status = false, nodes_cluster = false;
  for (const auto& r : v1.body["resources"]) {
    pods_status = pods_status || r["name"] == "pods/status";
    if (r["name"] == "nodes") nodes_cluster = r["namespaced"] == false;
  }
  EXPECT_TRUE(pods_status);
  EXPECT_TRUE(nodes_cluster);
  EXPECT_EQ(api.get("/apis/nope.io/v1").code, 404);
  s.write_kubeconfig(::testing::TempDir() + "/apiserver-test-kubeconfig");
  EXPECT_NE(read_file(::testing::TempDir() + "/apiserver-test-kubeconfig").find(s.url()), std::string::npos);
}

TEST(ApiServer, NamespaceDeletionRemovesItsObjects) {
  KubeApiServer s;
  Api api(s);
  ASSERT_EQ(api.post("/api/v1/namespaces", {{"metadata", {{"name", "team"}}}}).code, 201);
  ASSERT_EQ(api.post("/api/v1/namespaces/team/configmaps", cm("a")).code, 201);
  ASSERT_EQ(api.del("/api/v1/namespaces/team").code, 200);
  EXPECT_EQ(api.get("/api/v1/namespaces/team/configmaps/a").code, 404);
  EXPECT_EQ(api.get("/api/v1/namespaces/team").code, 404);
}

}  // namespace
}  // namespace shardguard::testing
