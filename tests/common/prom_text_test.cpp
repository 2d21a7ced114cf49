// The one Prometheus text parser (common/prom_text.h), against a page our own
// MetricsServer serves and against hand-written edge cases.
#include "shardguard/common/prom_text.h"

#include <gtest/gtest.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <cmath>
#include <string>

namespace shardguard {
namespace {

TEST(PromText, ReadsWhatPrometheusCppWrites) {
  prometheus::Registry reg;
  auto& bytes = prometheus::BuildCounter().Name("shardguard_proxy_bytes_total").Help("h").Register(reg);
  bytes.Add({{"direction", "sent"}, {"peer", "spiffe://td/ns/a/job/j/shard/1"}}).Increment(10);
  bytes.Add({{"direction", "sent"}, {"peer", "spiffe://td/ns/a/job/j/shard/2"}}).Increment(5);
  bytes.Add({{"direction", "received"}, {"peer", "spiffe://td/ns/a/job/j/shard/1"}}).Increment(7);
  prometheus::BuildGauge().Name("shardguard_proxy_bytes").Help("a prefix of the other").Register(reg).Add({}).Set(99);
  prometheus::BuildGauge().Name("odd").Help("h").Register(reg).Add({{"text", "a \"quoted\" \\ back\nslash"}}).Set(-2.5);
  prometheus::BuildHistogram().Name("lat_seconds").Help("h").Register(reg).Add({}, prometheus::Histogram::BucketBoundaries{1}).Observe(0.5);
  const std::string page = prometheus::TextSerializer().Serialize(reg.Collect());

  EXPECT_EQ(prometheus_sum(page, "shardguard_proxy_bytes_total"), 22);
  EXPECT_EQ(prometheus_sum(page, "shardguard_proxy_bytes_total", {{"direction", "sent"}}), 15);
  EXPECT_EQ(prometheus_sum(page, "shardguard_proxy_bytes_total",
                           {{"direction", "sent"}, {"peer", "spiffe://td/ns/a/job/j/shard/2"}}),
            5);
  EXPECT_EQ(prometheus_sum(page, "shardguard_proxy_bytes_total", {{"direction", "lost"}}), 0);
  EXPECT_EQ(prometheus_sum(page, "shardguard_proxy_bytes"), 99);  // not the _total series
  const auto odd = prometheus_samples(page, "odd");
  ASSERT_EQ(odd.size(), 1u);
  EXPECT_EQ(odd[0].labels.at("text"), "a \"quoted\" \\ back\nslash");
  EXPECT_EQ(odd[0].value, -2.5);
  EXPECT_EQ(prometheus_sum(page, "lat_seconds_bucket", {{"le", "+Inf"}}), 1);
  EXPECT_EQ(prometheus_sum(page, "lat_seconds_count"), 1);
}

TEST(PromText, EdgeCasesAndMalformedLines) {
  const std::string page =
      "# HELP x help text\n"
      "# TYPE x gauge\n"
      "x 1\n"
      "x{a=\"1\",} 2 1700000000000\n"
      "x{a=\"2\"} +Inf\n"
      "x{a=\"3\"} NaN\r\n"
      "\n"
      "x{a=\"4\" 5\n"        // unclosed braces
      "x{a=\"5\"} five\n"    // not a number
      "x{a=\"6\"} 6 7 8\n"   // trailing text
      "x{a=6} 6\n"           // unquoted value
      "x6\n"                 // no value
      "xy 3\n";
  const auto all = parse_prometheus_text(page);
  ASSERT_EQ(all.size(), 5u);
  EXPECT_EQ(all[1].labels.at("a"), "1");
  EXPECT_EQ(all[1].value, 2);
  EXPECT_TRUE(std::isinf(all[2].value));
  EXPECT_TRUE(std::isnan(all[3].value));
  EXPECT_EQ(all[4].name, "xy");
  EXPECT_EQ(prometheus_samples(page, "x").size(), 4u);
}

TEST(PromText, LabelText) {
  EXPECT_EQ(parse_prometheus_labels("phase=\"Running\""),
            (std::map<std::string, std::string>{{"phase", "Running"}}));
  EXPECT_EQ(parse_prometheus_labels("{a=\"1\", b=\"x,y\"}"),
            (std::map<std::string, std::string>{{"a", "1"}, {"b", "x,y"}}));
  EXPECT_EQ(parse_prometheus_labels(""), (std::map<std::string, std::string>{}));
  EXPECT_FALSE(parse_prometheus_labels("a=1"));
  EXPECT_FALSE(parse_prometheus_labels("{a=\"1\""));
}

}  // namespace
}  // namespace shardguard
