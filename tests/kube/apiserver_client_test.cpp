// Client against the test Kubernetes API server over HTTPS with a bearer token.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "kube_apiserver.h"
#include "shardguard/common/pki.h"
#include "shardguard/kube/client.h"
#include "shardguard/kube/config.h"
#include "support/wait.h"

namespace shardguard::kube {
namespace {

using json = nlohmann::json;
using testing::KubeApiServer;

Config config_of(const KubeApiServer& srv) {
  Config c;
  c.server = srv.url();
  c.ca_pem = srv.ca_pem();
  c.token = srv.token();
  return c;
}

json configmap(const std::string& name, const std::string& value, json labels = json::object()) {
  return {{"apiVersion", "v1"}, {"kind", "ConfigMap"},
          {"metadata", {{"name", name}, {"labels", labels}}}, {"data", {{"k", value}}}};
}

void make_namespaces(KubeApiServer& srv, std::initializer_list<const char*> names) {
  for (const char* n : names) srv.create("", "v1", "namespaces", "", {{"metadata", {{"name", n}}}});
}

int code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ApiError& e) {
    return e.code();
  }
  return -1;
}

TEST(ApiServerClientTest, CrudWithOptimisticConcurrency) {
  KubeApiServer srv;
  make_namespaces(srv, {"ns1", "ns2"});
  Client c(config_of(srv));
  const json created = c.create(kConfigMaps, "ns1", configmap("cm", "1", {{"app", "x"}}));
  const std::string rv1 = created["metadata"]["resourceVersion"];
  EXPECT_FALSE(rv1.empty());
  EXPECT_EQ(c.get(kConfigMaps, "ns1", "cm")["data"]["k"], "1");

  try {
    c.create(kConfigMaps, "ns1", configmap("cm", "dup"));
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 409);
    EXPECT_EQ(e.reason(), "AlreadyExists");
  }

  json next = created;
  next["data"]["k"] = "2";
  const json updated = c.update(kConfigMaps, "ns1", next);
  EXPECT_NE(updated["metadata"]["resourceVersion"], rv1);

  next["data"]["k"] = "stale";  // still carries rv1
  try {
    c.update(kConfigMaps, "ns1", next);
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 409);
    EXPECT_EQ(e.reason(), "Conflict");
    EXPECT_NE(std::string(e.what()).find("/api/v1/namespaces/ns1/configmaps/cm"), std::string::npos) << e.what();
  }

  const json patched = c.patch(kConfigMaps, "ns1", "cm", {{"data", {{"extra", "e"}}}}, PatchType::kMerge);
  EXPECT_EQ(patched["data"]["k"], "2");
  EXPECT_EQ(patched["data"]["extra"], "e");

  c.create(kConfigMaps, "ns1", configmap("other", "o", {{"app", "y"}}));
  c.create(kConfigMaps, "ns2", configmap("elsewhere", "o", {{"app", "x"}}));
  EXPECT_EQ(c.list(kConfigMaps, "ns1").items.size(), 2u);
  EXPECT_EQ(c.list(kConfigMaps, "").items.size(), 3u);
  const ListResult sel = c.list(kConfigMaps, "ns1", "app=x");
  ASSERT_EQ(sel.items.size(), 1u);
  EXPECT_EQ(sel.items[0]["metadata"]["name"], "cm");
  EXPECT_EQ(sel.items[0]["kind"], "ConfigMap");
  EXPECT_FALSE(sel.resource_version.empty());

  // A uid precondition: a stale uid leaves the object alone (409), the right one deletes.
  const std::string uid = c.get(kConfigMaps, "ns1", "cm")["metadata"]["uid"];
  EXPECT_EQ(code_of([&] { c.remove(kConfigMaps, "ns1", "cm", "Background", "not-" + uid); }), 409);
  EXPECT_EQ(c.get(kConfigMaps, "ns1", "cm")["metadata"]["uid"], uid);
  c.remove(kConfigMaps, "ns1", "cm", "Background", uid);
  EXPECT_EQ(code_of([&] { c.get(kConfigMaps, "ns1", "cm"); }), 404);
  EXPECT_EQ(code_of([&] { c.remove(kConfigMaps, "ns1", "cm"); }), 404);
  const ClientStats st = c.stats();
  EXPECT_EQ(st.creates, 4u);
  EXPECT_EQ(st.updates, 2u);
  EXPECT_EQ(st.patches, 1u);
  EXPECT_EQ(st.deletes, 3u);
}

// A client's timeout bounds every call: against a server that answers after 1.5 s, a
// 300 ms client gives up with a transport error (code 0) instead of the answer, and
// a client with the default 30 s waits for it. The two outcomes tell them apart, not a
// stopwatch (which a loaded machine would fail); the lower bound shows the quick
// client did wait for its timeout rather than fail at once.
TEST(ApiServerClientTest, TimeoutBoundsEachCall) {
  KubeApiServer srv;
  make_namespaces(srv, {"ns1"});
  Client(config_of(srv)).create(kConfigMaps, "ns1", configmap("cm", "1"));
  srv.set_latency(std::chrono::milliseconds(1500));
  Client quick(config_of(srv), "test", std::chrono::milliseconds(300));
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(code_of([&] { quick.get(kConfigMaps, "ns1", "cm"); }), 0);
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(waited, std::chrono::milliseconds(250)) << "the call failed before its 300 ms timeout";
  EXPECT_EQ(Client(config_of(srv)).get(kConfigMaps, "ns1", "cm")["data"]["k"], "1");
  EXPECT_THROW(Client(config_of(srv), "test", std::chrono::milliseconds(0)), ConfigError);
}

TEST(ApiServerClientTest, StatusSubresource) {
  KubeApiServer srv;
  Client c(config_of(srv));
  json pod = {{"metadata", {{"name", "p"}}},
              {"spec", {{"containers", json::array({{{"name", "c"}, {"image", "busybox"}}})}}}};
  json created = c.create(kPods, "default", pod);
  created["status"] = {{"phase", "Running"}};
  const json st = c.update_status(kPods, "default", created);
  EXPECT_EQ(st["status"]["phase"], "Running");
  EXPECT_EQ(c.get(kPods, "default", "p")["status"]["phase"], "Running");
  const json p2 = c.patch(kPods, "default", "p", {{"status", {{"phase", "Succeeded"}}}}, PatchType::kMerge, "status");
  EXPECT_EQ(p2["status"]["phase"], "Succeeded");
}

TEST(ApiServerClientTest, AuthAndTlsFailures) {
  KubeApiServer srv;
  Config bad_token = config_of(srv);
  bad_token.token = "wrong";
  EXPECT_EQ(code_of([&] { Client(bad_token).get(kConfigMaps, "default", "x"); }), 401);

  Config wrong_ca = config_of(srv);
  wrong_ca.ca_pem = create_ca("not the server's CA", std::chrono::hours(1)).cert_pem;
  EXPECT_EQ(code_of([&] { Client(wrong_ca).list(kConfigMaps, "default"); }), 0);

  Config insecure = wrong_ca;
  insecure.insecure_skip_verify = true;
  EXPECT_NO_THROW(Client(insecure).list(kConfigMaps, "default"));
}

TEST(ApiServerClientTest, KubeconfigWrittenByTheServerWorks) {
  KubeApiServer srv;
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("kube_test_kubeconfig_" + std::to_string(::getpid()))).string();
  make_namespaces(srv, {"team"});
  srv.write_kubeconfig(path, "team");
  const Config cfg = kubeconfig_config(path);
  std::filesystem::remove(path);
  EXPECT_EQ(cfg.ns, "team");
  Client c(cfg);
  c.create(kConfigMaps, cfg.ns, configmap("a", "1"));
  EXPECT_EQ(c.get(kConfigMaps, "team", "a")["data"]["k"], "1");
}

TEST(ApiServerClientTest, ListThenWatchFromItsResourceVersion) {
  KubeApiServer srv;
  make_namespaces(srv, {"w", "other"});
  Client c(config_of(srv));
  c.create(kConfigMaps, "w", configmap("a", "1"));
  const ListResult l = c.list(kConfigMaps, "w");
  ASSERT_EQ(l.items.size(), 1u);
  c.create(kConfigMaps, "w", configmap("b", "1"));
  c.patch(kConfigMaps, "w", "a", {{"data", {{"k", "2"}}}}, PatchType::kMerge);
  c.remove(kConfigMaps, "w", "a");
  c.create(kConfigMaps, "other", configmap("z", "1"));  // another namespace: not in this watch

  std::atomic<bool> stop{false};
  std::vector<std::pair<std::string, std::string>> seen;
  c.watch(kConfigMaps, "w", "", l.resource_version, [&](const WatchEvent& e) {
    if (e.type == "BOOKMARK") return true;
    seen.emplace_back(e.type, e.object["metadata"]["name"].get<std::string>());
    return seen.size() < 3;
  }, stop, 10);
  const std::vector<std::pair<std::string, std::string>> want = {
      {"ADDED", "b"}, {"MODIFIED", "a"}, {"DELETED", "a"}};
  EXPECT_EQ(seen, want);
}

TEST(ApiServerClientTest, WatchFromACompactedResourceVersionIs410) {
  KubeApiServer srv;
  make_namespaces(srv, {"w", "other"});
  Client c(config_of(srv));
  c.create(kConfigMaps, "w", configmap("a", "1"));
  const std::string rv = c.list(kConfigMaps, "w").resource_version;
  c.create(kConfigMaps, "w", configmap("b", "1"));
  srv.compact();
  std::atomic<bool> stop{false};
  try {
    c.watch(kConfigMaps, "w", "", rv, [](const WatchEvent&) { return true; }, stop, 5);
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 410);
  }
}

TEST(ApiServerClientTest, WatchEndsWhenTheServerTimesOut) {
  KubeApiServer srv;
  make_namespaces(srv, {"w", "other"});
  Client c(config_of(srv));
  const std::string rv = c.list(kConfigMaps, "w").resource_version;
  std::atomic<bool> stop{false};
  std::atomic<bool> returned{false};
  std::thread t([&] {
    c.watch(kConfigMaps, "w", "", rv, [](const WatchEvent&) { return true; }, stop, 1);
    returned = true;
  });
  // Nobody sets stop before the watch returns: it ends because the server closed it
  // after timeoutSeconds=1. The limit is generous (a loaded machine is slow, the server
  // is not asked to wait longer); past it, stop ends the watch so the test fails
  // instead of hanging.
  const bool by_server = testsupport::eventually([&] { return returned.load(); }, std::chrono::seconds(60));
  stop = true;
  t.join();
  EXPECT_TRUE(by_server) << "the watch outlived the server's 1 s timeout";
}

}  // namespace
}  // namespace shardguard::kube
