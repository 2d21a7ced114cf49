// Informer against the test API server: sync, follow, dropped watches, 410 relist,
// errors with backoff, resync.
#include "shardguard/kube/informer.h"

#include <map>
#include <mutex>
#include <set>

#include <gtest/gtest.h>

#include "kube_apiserver.h"
#include "support/wait.h"

namespace shardguard::kube {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using testing::KubeApiServer;
using testsupport::eventually;

// What the handlers saw, by object name.
struct Recorder {
  std::mutex mu;
  std::map<std::string, int> adds, deletes;
  std::map<std::string, std::vector<std::string>> updates;  // name → new data.k values
  int resyncs = 0;                                          // updates with identical old and new

  Informer::Handlers handlers() {
    Informer::Handlers h;
    h.on_add = [this](const json& o) {
      std::lock_guard<std::mutex> lock(mu);
      adds[o["metadata"]["name"]]++;
    };
    h.on_update = [this](const json& old_obj, const json& new_obj) {
      std::lock_guard<std::mutex> lock(mu);
      if (old_obj == new_obj) {
        resyncs++;
        return;
      }
      updates[new_obj["metadata"]["name"]].push_back(new_obj["data"].value("k", ""));
    };
    h.on_delete = [this](const json& o) {
      std::lock_guard<std::mutex> lock(mu);
      deletes[o["metadata"]["name"]]++;
    };
    return h;
  }
  template <typename F>
  auto with(F f) {
    std::lock_guard<std::mutex> lock(mu);
    return f();
  }
};

class InformerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* n : {"inf", "other"}) srv_.create("", "v1", "namespaces", "", {{"metadata", {{"name", n}}}});
    Config c;
    c.server = srv_.url();
    c.ca_pem = srv_.ca_pem();
    c.token = srv_.token();
    client_ = std::make_unique<Client>(c);
  }

  json create(const std::string& ns, const std::string& name, const std::string& v) {
    return srv_.create("", "v1", "configmaps", ns, {{"metadata", {{"name", name}}}, {"data", {{"k", v}}}});
  }
  void set(const std::string& ns, const std::string& name, const std::string& v) {
    json o = *srv_.get("", "v1", "configmaps", ns, name);
    o["data"]["k"] = v;
    srv_.update("", "v1", "configmaps", ns, o);
  }
  void remove(const std::string& ns, const std::string& name) { srv_.remove("", "v1", "configmaps", ns, name); }

  KubeApiServer srv_;
  std::unique_ptr<Client> client_;
  Recorder rec_;
};

TEST_F(InformerTest, SyncsThenFollowsChanges) {
  create("inf", "a", "1");
  create("inf", "b", "1");
  create("other", "x", "1");
  Informer inf(*client_, kConfigMaps, "inf", "", rec_.handlers());
  EXPECT_FALSE(inf.has_synced());
  inf.start();
  ASSERT_TRUE(inf.wait_for_sync(10s));
  EXPECT_EQ(rec_.with([&] { return rec_.adds; }), (std::map<std::string, int>{{"a", 1}, {"b", 1}}));
  EXPECT_EQ(inf.list().size(), 2u);

  create("inf", "c", "1");
  set("inf", "a", "2");
  remove("inf", "b");
  ASSERT_TRUE(eventually([&] {
    return rec_.with([&] { return rec_.adds.count("c") && rec_.deletes.count("b") && rec_.updates.count("a"); });
  }));
  EXPECT_EQ(rec_.with([&] { return rec_.updates["a"]; }), std::vector<std::string>{"2"});
  ASSERT_TRUE(inf.get("inf", "a").has_value());
  EXPECT_EQ((*inf.get("inf", "a"))["data"]["k"], "2");
  EXPECT_FALSE(inf.get("inf", "b").has_value());
  EXPECT_FALSE(inf.get("other", "x").has_value());
  EXPECT_EQ(inf.list("inf").size(), 2u);
  EXPECT_EQ(inf.list("other").size(), 0u);
  EXPECT_EQ(inf.relists(), 0u);
  inf.stop();
  EXPECT_TRUE(eventually([&] { return srv_.open_watches() == 0u; }));
}

TEST_F(InformerTest, AllNamespacesAndLabelSelector) {
  srv_.create("", "v1", "configmaps", "inf", {{"metadata", {{"name", "l1"}, {"labels", {{"app", "x"}}}}}});
  srv_.create("", "v1", "configmaps", "other", {{"metadata", {{"name", "l2"}, {"labels", {{"app", "x"}}}}}});
  srv_.create("", "v1", "configmaps", "other", {{"metadata", {{"name", "l3"}, {"labels", {{"app", "y"}}}}}});
  Informer inf(*client_, kConfigMaps, "", "app=x", rec_.handlers());
  inf.start();
  ASSERT_TRUE(inf.wait_for_sync(10s));
  EXPECT_EQ(inf.list().size(), 2u);
  EXPECT_TRUE(inf.get("other", "l2").has_value());
  EXPECT_FALSE(inf.get("other", "l3").has_value());
}

TEST_F(InformerTest, SurvivesDroppedWatchesWithoutLosingEvents) {
  Informer inf(*client_, kConfigMaps, "inf", "", rec_.handlers());
  inf.start();
  ASSERT_TRUE(inf.wait_for_sync(10s));
  constexpr int kN = 30;
  for (int i = 0; i < kN; ++i) {
    const std::string name = "cm" + std::to_string(i);
    create("inf", name, "1");
    if (i % 5 == 0) {
      // Once the watch has delivered this one, cut it: the next creates race the re-watch.
      ASSERT_TRUE(eventually([&] { return inf.get("inf", name).has_value(); }));
      srv_.drop_watches();
    }
  }
  ASSERT_TRUE(eventually([&] { return inf.list().size() == static_cast<size_t>(kN); }, 20s));
  rec_.with([&] {
    EXPECT_EQ(rec_.adds.size(), static_cast<size_t>(kN));
    for (const auto& [name, n] : rec_.adds) EXPECT_EQ(n, 1) << name;
    return 0;
  });
  size_t watches = 0;
  for (const auto& r : srv_.requests()) watches += r.verb == "watch";
  EXPECT_GE(watches, 2u);  // it did re-watch
}

TEST_F(InformerTest, RelistsAfter410AndEmitsTheDifference) {
  create("inf", "keep", "1");
  create("inf", "change", "1");
  create("inf", "gone", "1");
  InformerOptions opt;
  opt.initial_backoff = 50ms;
  Informer inf(*client_, kConfigMaps, "inf", "", rec_.handlers(), opt);
  inf.start();
  ASSERT_TRUE(inf.wait_for_sync(10s));
  ASSERT_TRUE(eventually([&] { return srv_.open_watches() == 1; }));

  // Hold every HTTP request back while the world changes and the history is forgotten:
  // the informer's next watch starts from a resourceVersion the server no longer has.
  srv_.set_latency(700ms);
  srv_.drop_watches();
  set("inf", "change", "2");
  remove("inf", "gone");
  create("inf", "new", "1");
  srv_.compact();
  srv_.set_latency(0ms);

  // The handlers run after the relist replaced the cache: wait for them too.
  ASSERT_TRUE(eventually([&] {
    return inf.relists() >= 1 && inf.list().size() == 3u && rec_.with([&] {
             return rec_.adds.count("new") > 0 && rec_.deletes.count("gone") > 0 && rec_.updates.count("change") > 0;
           });
  }, 20s));
  rec_.with([&] {
    EXPECT_EQ(rec_.adds["new"], 1);
    EXPECT_EQ(rec_.deletes["gone"], 1);
    EXPECT_EQ(rec_.updates["change"], std::vector<std::string>{"2"});
    EXPECT_EQ(rec_.updates.count("keep"), 0u);  // unchanged: no update on relist
    EXPECT_EQ(rec_.adds["keep"], 1);
    return 0;
  });
  // And it keeps following after the relist.
  create("inf", "after", "1");
  EXPECT_TRUE(eventually([&] { return inf.get("inf", "after").has_value(); }, 10s));
}

TEST_F(InformerTest, RetriesErrorsWithBackoff) {
  srv_.fail_next(3, 500, "GET", "/namespaces/inf/configmaps");
  InformerOptions opt;
  opt.initial_backoff = 20ms;
  opt.max_backoff = 100ms;
  Informer inf(*client_, kConfigMaps, "inf", "", rec_.handlers(), opt);
  inf.start();
  ASSERT_TRUE(inf.wait_for_sync(10s));
  EXPECT_GE(inf.reconnects(), 3u);
  srv_.fail_next(2, 503, "GET", "/namespaces/inf/configmaps");
  srv_.drop_watches();
  create("inf", "late", "1");
  EXPECT_TRUE(eventually([&] { return inf.get("inf", "late").has_value(); }, 10s));
}

TEST_F(InformerTest, ResyncCallsUpdateWithTheCachedObject) {
  create("inf", "a", "1");
  InformerOptions opt;
  opt.resync = 1s;
  Informer inf(*client_, kConfigMaps, "inf", "", rec_.handlers(), opt);
  inf.start();
  ASSERT_TRUE(inf.wait_for_sync(10s));
  EXPECT_TRUE(eventually([&] { return rec_.with([&] { return rec_.resyncs >= 1; }); }, 10s));
}

TEST_F(InformerTest, StopIsPromptAndRestartIsRefused) {
  Informer inf(*client_, kConfigMaps, "inf", "", rec_.handlers());
  inf.start();
  ASSERT_TRUE(inf.wait_for_sync(10s));
  ASSERT_TRUE(eventually([&] { return srv_.open_watches() == 1; }));
  const auto t0 = std::chrono::steady_clock::now();
  inf.stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  inf.start();  // no-op after stop
  inf.stop();
}

}  // namespace
}  // namespace shardguard::kube
