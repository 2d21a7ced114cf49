#include "shardguard/common/metrics_server.h"

#include <memory>
#include <stdexcept>
#include <string>

#include <gtest/gtest.h>

// Debian's libcpp-httplib is compiled with these switches, which change class
// layouts; every translation unit that includes httplib.h must see the same ones.
// They come with the httplib::httplib target; this test binary links it only
// through shardguard::common's private link, so repeat them here when absent.
#include "shardguard/common/httplib.h"
#include <prometheus/counter.h>
#include <prometheus/registry.h>

namespace shardguard {
namespace {

class MetricsServerTest : public ::testing::Test {
 protected:
  MetricsServerTest() : registry_(std::make_shared<prometheus::Registry>()), server_(registry_) {}

  httplib::Result get(const std::string& path) {
    httplib::Client client("127.0.0.1", server_.port());
    client.set_connection_timeout(5);
    client.set_read_timeout(5);
    return client.Get(path.c_str());
  }

  std::shared_ptr<prometheus::Registry> registry_;
  MetricsServer server_;
};

TEST_F(MetricsServerTest, PortZeroPicksAFreePortAndServesMetrics) {
  auto& family = prometheus::BuildCounter()
                     .Name("shardguard_test_requests_total")
                     .Help("Requests seen by the test.")
                     .Register(*registry_);
  family.Add({{"method", "Forward"}}).Increment(3);

  server_.start("127.0.0.1", 0);
  ASSERT_GT(server_.port(), 0);

  auto res = get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/plain; version=0.0.4");
  EXPECT_NE(res->body.find("# TYPE shardguard_test_requests_total counter"), std::string::npos) << res->body;
  EXPECT_NE(res->body.find("shardguard_test_requests_total{method=\"Forward\"} 3"), std::string::npos)
      << res->body;
}

TEST_F(MetricsServerTest, MetricsReflectChangesBetweenScrapes) {
  auto& counter = prometheus::BuildCounter().Name("shardguard_test_scrapes_total").Help("h").Register(*registry_).Add({});
  server_.start("127.0.0.1", 0);
  counter.Increment();
  auto first = get("/metrics");
  ASSERT_TRUE(first);
  EXPECT_NE(first->body.find("shardguard_test_scrapes_total 1"), std::string::npos) << first->body;
  counter.Increment(41);
  auto second = get("/metrics");
  ASSERT_TRUE(second);
  EXPECT_NE(second->body.find("shardguard_test_scrapes_total 42"), std::string::npos) << second->body;
}

TEST_F(MetricsServerTest, HealthzIsOk) {
  server_.start("127.0.0.1", 0);
  auto res = get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, "ok");
}

TEST_F(MetricsServerTest, ReadyzFlipsFrom503To200AndBack) {
  server_.start("127.0.0.1", 0);
  auto res = get("/readyz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  EXPECT_EQ(res->body, "starting");

  server_.set_ready(false, "loading shard 2 of 4");
  res = get("/readyz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  EXPECT_EQ(res->body, "loading shard 2 of 4");

  server_.set_ready(true);
  res = get("/readyz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, "ready");

  server_.set_ready(false, "draining");
  res = get("/readyz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  EXPECT_EQ(res->body, "draining");
}

TEST_F(MetricsServerTest, UnknownPathIs404) {
  server_.start("127.0.0.1", 0);
  auto res = get("/nope");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
}

TEST_F(MetricsServerTest, BindingAnAlreadyBoundPortThrowsNamingAddress) {
  server_.start("127.0.0.1", 0);
  const int taken = server_.port();
  MetricsServer second(registry_);
  try {
    second.start("127.0.0.1", taken);
    FAIL() << "second bind to port " << taken << " succeeded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:" + std::to_string(taken)), std::string::npos) << e.what();
  }
  EXPECT_EQ(second.port(), 0);
  // The first server still answers.
  auto res = get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
}

TEST_F(MetricsServerTest, StopIsIdempotentAndClosesThePort) {
  server_.start("127.0.0.1", 0);
  const int port = server_.port();
  server_.stop();
  server_.stop();
  EXPECT_EQ(server_.port(), 0);
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(2);
  EXPECT_FALSE(client.Get("/healthz"));
}

// stop() right after start() returns (a stop that waited for a serving thread that
// had not started yet would hang here; ctest's timeout catches that), every cycle
// really bound and really released its port, and the server still serves afterwards.
TEST_F(MetricsServerTest, StopRightAfterStartDoesNotHang) {
  for (int i = 0; i < 50; ++i) {
    server_.start("127.0.0.1", 0);
    const int port = server_.port();
    ASSERT_GT(port, 0) << "cycle " << i;
    server_.stop();
    EXPECT_EQ(server_.port(), 0) << "cycle " << i;
    httplib::Client client("127.0.0.1", port);
    client.set_connection_timeout(2);
    EXPECT_FALSE(client.Get("/healthz")) << "cycle " << i << ": port " << port << " still answers";
  }
  server_.start("127.0.0.1", 0);
  auto res = get("/healthz");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
}

TEST_F(MetricsServerTest, CanRestartOnTheSamePort) {
  server_.start("127.0.0.1", 0);
  const int port = server_.port();
  ASSERT_TRUE(get("/healthz"));
  server_.stop();
  server_.start("127.0.0.1", port);
  EXPECT_EQ(server_.port(), port);
  auto res = get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->body, "ok");
}

TEST_F(MetricsServerTest, StartTwiceIsALogicError) {
  server_.start("127.0.0.1", 0);
  EXPECT_THROW(server_.start("127.0.0.1", 0), std::logic_error);
}

TEST(MetricsServer, DestructorStopsServing) {
  auto registry = std::make_shared<prometheus::Registry>();
  int port = 0;
  {
    MetricsServer server(registry);
    server.start("127.0.0.1", 0);
    port = server.port();
  }
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(2);
  EXPECT_FALSE(client.Get("/healthz"));
}

TEST(MetricsServer, BadHostThrowsNamingAddress) {
  MetricsServer server(std::make_shared<prometheus::Registry>());
  try {
    server.start("256.1.1.1", 0);
    FAIL() << "bind to an invalid host succeeded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("256.1.1.1:0"), std::string::npos) << e.what();
  }
  EXPECT_THROW(server.start("127.0.0.1", 70000), std::runtime_error);
}

TEST(SplitHostPort, Valid) {
  EXPECT_EQ(split_host_port("127.0.0.1:9100"), std::make_pair(std::string("127.0.0.1"), 9100));
  EXPECT_EQ(split_host_port("localhost:0"), std::make_pair(std::string("localhost"), 0));
  EXPECT_EQ(split_host_port("shardd.ns.svc:65535"), std::make_pair(std::string("shardd.ns.svc"), 65535));
  EXPECT_EQ(split_host_port(":9101"), std::make_pair(std::string("0.0.0.0"), 9101));
  EXPECT_EQ(split_host_port("[::1]:7000"), std::make_pair(std::string("::1"), 7000));
}

TEST(SplitHostPort, InvalidNamesTheText) {
  for (const std::string bad : {"127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:-1", "127.0.0.1:65536",
                                "127.0.0.1:99999999999", "::1:80", "host:12a", "host: 80"}) {
    try {
      split_host_port(bad);
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("\"" + bad + "\""), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace shardguard
