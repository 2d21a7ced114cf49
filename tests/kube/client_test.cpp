// Client against a small local HTTP server (no TLS): the request shapes, error
// mapping and the watch stream. The HTTPS path and real semantics are tested against
// the test API server (apiserver_client_test.cpp).
#include "shardguard/kube/client.h"

#include <atomic>
#include <mutex>
#include <thread>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include "shardguard/common/httplib.h"

#include "shardguard/common/pki.h"
#include "support/wait.h"

namespace shardguard::kube {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using testsupport::eventually;

json status(int code, const std::string& reason, const std::string& message) {
  return {{"kind", "Status"}, {"apiVersion", "v1"}, {"status", "Failure"},
          {"code", code}, {"reason", reason}, {"message", message}};
}

std::string event(const std::string& type, const json& obj) { return json{{"type", type}, {"object", obj}}.dump() + "\n"; }

json pod(const std::string& name, const std::string& rv) {
  return {{"metadata", {{"name", name}, {"namespace", "default"}, {"resourceVersion", rv}}}};
}

class FakeServer {
 public:
  FakeServer() {
    srv_.Get("/api/v1/namespaces/default/pods/p1", [this](const httplib::Request& req, httplib::Response& res) {
      record(req);
      res.set_content(pod("p1", "5").dump(), "application/json");
    });
    srv_.Get("/api/v1/namespaces/default/pods/missing", [this](const httplib::Request& req, httplib::Response& res) {
      record(req);
      res.status = 404;
      res.set_content(status(404, "NotFound", "pods \"missing\" not found").dump(), "application/json");
    });
    srv_.Get("/api/v1/namespaces/forbidden/pods", [](const httplib::Request&, httplib::Response& res) {
      res.status = 403;
      res.set_content(status(403, "Forbidden", "no").dump(), "application/json");
    });
    srv_.Get("/api/v1/namespaces/default/pods", [this](const httplib::Request& req, httplib::Response& res) {
      record(req);
      if (!req.has_param("watch")) {
        json list = {{"kind", "PodList"}, {"metadata", {{"resourceVersion", "10"}}},
                     {"items", json::array({pod("a", "3"), pod("b", "4")})}};
        res.set_content(list.dump(), "application/json");
        return;
      }
      const std::string rv = req.get_param_value("resourceVersion");
      res.set_chunked_content_provider("application/json", [this, rv](size_t, httplib::DataSink& sink) {
        if (rv == "10") {
          const std::string all = event("ADDED", pod("c", "11")) + event("MODIFIED", pod("a", "12")) +
                                  event("BOOKMARK", {{"metadata", {{"resourceVersion", "13"}}}});
          // Split across writes in the middle of an event.
          sink.write(all.data(), 30);
          sink.write(all.data() + 30, all.size() - 30);
          sink.done();
          return true;
        }
        if (rv == "old") {
          const std::string e = event("ERROR", status(410, "Expired", "too old resource version: 1 (9)"));
          sink.write(e.data(), e.size());
          sink.done();
          return true;
        }
        // "hang": one event, then an open stream until the client goes or the test ends.
        const std::string e = event("ADDED", pod("h", "20"));
        sink.write(e.data(), e.size());
        const auto deadline = std::chrono::steady_clock::now() + 20s;
        while (!quit_.load() && sink.is_writable() && std::chrono::steady_clock::now() < deadline) {
          std::this_thread::sleep_for(5ms);
        }
        sink.done();
        return true;
      });
    });
    srv_.Post("/api/v1/namespaces/default/configmaps", [this](const httplib::Request& req, httplib::Response& res) {
      record(req);
      res.status = 201;
      res.set_content(req.body, "application/json");
    });
    srv_.Put(R"(/api/v1/namespaces/default/configmaps/(\w+)(/status)?)",
             [this](const httplib::Request& req, httplib::Response& res) {
               record(req);
               res.status = 409;
               res.set_content(status(409, "Conflict", "the object has been modified").dump(), "application/json");
             });
    srv_.Patch("/apis/shardguard.io/v1alpha1/namespaces/default/shardedtrainingjobs/j/status",
               [this](const httplib::Request& req, httplib::Response& res) {
                 record(req);
                 res.set_content(req.body, "application/json");
               });
    srv_.Delete("/api/v1/namespaces/default/secrets/s", [this](const httplib::Request& req, httplib::Response& res) {
      record(req);
      res.set_content(status(200, "", "").dump(), "application/json");
    });
    srv_.Get("/api/v1/namespaces/default/services/notjson", [](const httplib::Request&, httplib::Response& res) {
      res.status = 502;
      res.set_content("<html>bad gateway</html>", "text/html");
    });
    port_ = srv_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { srv_.listen_after_bind(); });
  }
  ~FakeServer() {
    quit_.store(true);
    srv_.stop();
    thread_.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  httplib::Request last() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_;
  }

 private:
  void record(const httplib::Request& req) {
    std::lock_guard<std::mutex> lock(mu_);
    last_ = req;
  }

  httplib::Server srv_;
  int port_ = 0;
  std::thread thread_;
  std::atomic<bool> quit_{false};
  std::mutex mu_;
  httplib::Request last_;
};

Config config_for(const FakeServer& s) {
  Config c;
  c.server = s.url();
  c.token = "secret-token";
  return c;
}

TEST(ClientTest, GetSendsBearerTokenAndUserAgent) {
  FakeServer s;
  Client c(config_for(s), "test-agent/1");
  const json p = c.get(kPods, "default", "p1");
  EXPECT_EQ(p["metadata"]["name"], "p1");
  const auto req = s.last();
  EXPECT_EQ(req.get_header_value("Authorization"), "Bearer secret-token");
  EXPECT_EQ(req.get_header_value("User-Agent"), "test-agent/1");
  EXPECT_EQ(c.stats().gets, 1u);
  EXPECT_EQ(c.config().token, "secret-token");
}

TEST(ClientTest, StatusErrorsBecomeApiErrors) {
  FakeServer s;
  Client c(config_for(s));
  try {
    c.get(kPods, "default", "missing");
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 404);
    EXPECT_EQ(e.reason(), "NotFound");
    const std::string what = e.what();
    EXPECT_NE(what.find("/api/v1/namespaces/default/pods/missing"), std::string::npos) << what;
    EXPECT_NE(what.find("not found"), std::string::npos) << what;
    EXPECT_NE(what.find("get"), std::string::npos) << what;
  }
  try {
    c.get(kServices, "default", "notjson");
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 502);
    EXPECT_NE(std::string(e.what()).find("bad gateway"), std::string::npos) << e.what();
  }
}

TEST(ClientTest, ListFillsKindAndSendsEncodedSelector) {
  FakeServer s;
  Client c(config_for(s));
  const ListResult r = c.list(kPods, "default", "app=x,tier in (a,b)");
  EXPECT_EQ(r.resource_version, "10");
  ASSERT_EQ(r.items.size(), 2u);
  EXPECT_EQ(r.items[0]["kind"], "Pod");
  EXPECT_EQ(r.items[0]["apiVersion"], "v1");
  EXPECT_EQ(s.last().get_param_value("labelSelector"), "app=x,tier in (a,b)");
  EXPECT_EQ(c.stats().lists, 1u);
}

TEST(ClientTest, WritesUseTheRightMethodsBodiesAndContentTypes) {
  FakeServer s;
  Client c(config_for(s));
  const json cm = {{"metadata", {{"name", "cm1"}, {"resourceVersion", "3"}}}, {"data", {{"k", "v"}}}};
  EXPECT_EQ(c.create(kConfigMaps, "default", cm), cm);
  EXPECT_EQ(s.last().method, "POST");
  try {
    c.update(kConfigMaps, "default", cm);
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 409);
    EXPECT_EQ(e.reason(), "Conflict");
  }
  EXPECT_EQ(s.last().path, "/api/v1/namespaces/default/configmaps/cm1");
  EXPECT_EQ(json::parse(s.last().body)["metadata"]["resourceVersion"], "3");
  EXPECT_THROW(c.update_status(kConfigMaps, "default", cm), ApiError);
  EXPECT_EQ(s.last().path, "/api/v1/namespaces/default/configmaps/cm1/status");
  EXPECT_THROW(c.update(kConfigMaps, "default", json{{"data", 1}}), ApiError);  // no name

  const json patch = {{"status", {{"phase", "Running"}}}};
  EXPECT_EQ(c.patch(kShardedTrainingJobs, "default", "j", patch, PatchType::kMerge, "status"), patch);
  EXPECT_EQ(s.last().get_header_value("Content-Type"), "application/merge-patch+json");
  c.patch(kShardedTrainingJobs, "default", "j", patch, PatchType::kStrategicMerge, "status");
  EXPECT_EQ(s.last().get_header_value("Content-Type"), "application/strategic-merge-patch+json");
  c.patch(kShardedTrainingJobs, "default", "j", json::array(), PatchType::kJson, "status");
  EXPECT_EQ(s.last().get_header_value("Content-Type"), "application/json-patch+json");

  c.remove(kSecrets, "default", "s", "Foreground");
  EXPECT_EQ(s.last().method, "DELETE");
  EXPECT_EQ(json::parse(s.last().body)["propagationPolicy"], "Foreground");
  EXPECT_FALSE(json::parse(s.last().body).contains("preconditions"));
  c.remove(kSecrets, "default", "s", "Background", "u-1");
  EXPECT_EQ(json::parse(s.last().body)["preconditions"], (json{{"uid", "u-1"}}));
  const ClientStats st = c.stats();
  EXPECT_EQ(st.creates, 1u);
  EXPECT_EQ(st.updates, 3u);
  EXPECT_EQ(st.patches, 3u);
  EXPECT_EQ(st.deletes, 2u);
  EXPECT_EQ(st.writes(), 9u);
}

TEST(ClientTest, WatchDeliversEventsSplitAcrossChunksAndReturnsAtStreamEnd) {
  FakeServer s;
  Client c(config_for(s));
  std::atomic<bool> stop{false};
  std::vector<WatchEvent> events;
  c.watch(kPods, "default", "app=x", "10", [&](const WatchEvent& e) {
    events.push_back(e);
    return true;
  }, stop, 7);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].type, "ADDED");
  EXPECT_EQ(events[0].object["metadata"]["name"], "c");
  EXPECT_EQ(events[1].type, "MODIFIED");
  EXPECT_EQ(events[2].type, "BOOKMARK");
  EXPECT_EQ(events[2].object["metadata"]["resourceVersion"], "13");
  const auto req = s.last();
  EXPECT_EQ(req.get_param_value("watch"), "1");
  EXPECT_EQ(req.get_param_value("allowWatchBookmarks"), "true");
  EXPECT_EQ(req.get_param_value("timeoutSeconds"), "7");
  EXPECT_EQ(req.get_param_value("labelSelector"), "app=x");
  EXPECT_EQ(c.stats().watches, 1u);
}

TEST(ClientTest, WatchHandlerReturningFalseEndsTheWatch) {
  FakeServer s;
  Client c(config_for(s));
  std::atomic<bool> stop{false};
  int n = 0;
  c.watch(kPods, "default", "", "10", [&](const WatchEvent&) { return ++n < 2; }, stop);
  EXPECT_EQ(n, 2);
}

TEST(ClientTest, WatchErrorEventThrowsItsCode) {
  FakeServer s;
  Client c(config_for(s));
  std::atomic<bool> stop{false};
  try {
    c.watch(kPods, "default", "", "old", [](const WatchEvent&) { return true; }, stop);
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 410);
    EXPECT_EQ(e.reason(), "Expired");
  }
}

TEST(ClientTest, WatchHttpErrorThrows) {
  FakeServer s;
  Client c(config_for(s));
  std::atomic<bool> stop{false};
  try {
    c.watch(kPods, "forbidden", "", "1", [](const WatchEvent&) { return true; }, stop);
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 403);
    EXPECT_EQ(e.reason(), "Forbidden");
  }
}

TEST(ClientTest, WatchReturnsSoonAfterStop) {
  FakeServer s;
  Client c(config_for(s));
  std::atomic<bool> stop{false};
  std::atomic<int> events{0};
  std::atomic<bool> returned{false};
  std::thread t([&] {
    c.watch(kPods, "default", "", "hang", [&](const WatchEvent&) {
      events++;
      return true;
    }, stop);
    returned = true;
  });
  ASSERT_TRUE(eventually([&] { return events.load() == 1; }));
  EXPECT_FALSE(returned.load());
  stop = true;
  // The fake server never ends a "hang" watch, so returning at all shows that stop
  // ended it; the limit is generous so that a loaded machine does not fail the test.
  EXPECT_TRUE(eventually([&] { return returned.load(); }, 30s));
  EXPECT_EQ(events.load(), 1);
  t.join();
}

TEST(ClientTest, TransportErrorsHaveCodeZero) {
  // Find a port nothing listens on: bind one, then close it.
  int port = 0;
  {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    socklen_t len = sizeof addr;
    ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port = ntohs(addr.sin_port);
    ::close(fd);  // bound, never listening, closed: connections are refused
  }
  Config cfg;
  cfg.server = "http://127.0.0.1:" + std::to_string(port);
  Client c(cfg);
  try {
    c.get(kPods, "default", "p");
    FAIL() << "no ApiError";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.code(), 0);
  }
  std::atomic<bool> stop{false};
  EXPECT_THROW(c.watch(kPods, "default", "", "1", [](const WatchEvent&) { return true; }, stop), ApiError);
}

TEST(ClientTest, BadConfigIsRefusedUpFront) {
  Config bad;
  bad.server = "ftp://x";
  EXPECT_THROW(Client{bad}, ConfigError);
  bad.server = "https://[::1";
  EXPECT_THROW(Client{bad}, ConfigError);
  bad.server = "https://h:99999";
  EXPECT_THROW(Client{bad}, ConfigError);
  bad.server = "https://h:6443";
  bad.ca_pem = "not a pem";
  EXPECT_THROW(Client{bad}, ConfigError);

  const CaBundle one = create_ca("one", std::chrono::hours(1));
  const CaBundle two = create_ca("two", std::chrono::hours(1));
  Config mismatched;
  mismatched.server = "https://h:6443";
  mismatched.client_cert_pem = one.cert_pem;
  mismatched.client_key_pem = two.key_pem;
  try {
    Client c(mismatched);
    FAIL() << "no ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("client_key_pem"), std::string::npos) << e.what();
  }
  Config ok = mismatched;
  ok.client_key_pem = one.key_pem;
  ok.ca_pem = one.cert_pem + two.cert_pem;
  EXPECT_NO_THROW(Client{ok});
  Config v6;
  v6.server = "https://[::1]:6443";
  EXPECT_NO_THROW(Client{v6});
}

}  // namespace
}  // namespace shardguard::kube
