// RFC 3339: the one formatter and parser (common/time.h).
#include "shardguard/common/time.h"

#include <gtest/gtest.h>

#include <chrono>
#include <string>

namespace shardguard {
namespace {

using namespace std::chrono;

TEST(Rfc3339, FormatsWholeSecondsAndFractions) {
  EXPECT_EQ(format_rfc3339(int64_t{0}), "1970-01-01T00:00:00Z");
  EXPECT_EQ(format_rfc3339(int64_t{1795000000}), "2026-11-18T11:06:40Z");
  const system_clock::time_point t = system_clock::time_point(seconds(1795000000)) + microseconds(123456);
  EXPECT_EQ(format_rfc3339(t), "2026-11-18T11:06:40Z");
  EXPECT_EQ(format_rfc3339(t, 3), "2026-11-18T11:06:40.123Z");  // truncated, not rounded
  EXPECT_EQ(format_rfc3339(t, 6), "2026-11-18T11:06:40.123456Z");
  // Before 1970 the second is rounded down, the fraction counts up from it.
  EXPECT_EQ(format_rfc3339(system_clock::time_point(milliseconds(-1)), 3), "1969-12-31T23:59:59.999Z");
}

TEST(Rfc3339, ParsesWhatItFormatsAndOtherZones) {
  EXPECT_EQ(parse_rfc3339_seconds("1970-01-01T00:00:00Z"), 0);
  EXPECT_EQ(parse_rfc3339_seconds(format_rfc3339(int64_t{1795000000})), 1795000000);
  EXPECT_EQ(parse_rfc3339_seconds("2026-11-18T12:06:40+01:00"), 1795000000);
  EXPECT_EQ(parse_rfc3339_seconds("2026-11-18t11:06:40z"), 1795000000);
  EXPECT_EQ(parse_rfc3339_seconds("2024-02-29T00:00:00Z"), 1709164800);  // leap day
  const auto t = parse_rfc3339("2026-11-18T11:06:40.123456789Z");
  ASSERT_TRUE(t.has_value());
  const auto fraction = t->time_since_epoch() - seconds(1795000000);
  EXPECT_EQ(fraction, duration_cast<system_clock::duration>(nanoseconds(123456789)));
  EXPECT_EQ(format_rfc3339(*t, 3), "2026-11-18T11:06:40.123Z");
  // More digits than the clock holds are read and truncated.
  EXPECT_EQ(parse_rfc3339_seconds("2026-11-18T11:06:40.1234567891234Z"), 1795000000);
  EXPECT_EQ(parse_rfc3339_seconds("1969-12-31T23:59:59.5Z"), -1);
}

TEST(Rfc3339, RefusesMalformedText) {
  for (const std::string bad :
       {"", "yesterday", "2026-11-18", "2026-11-18T11:06:40", "2026-11-18 09:46:40Z",
        "2026-11-18T11:06:40ZZ", "2026-11-18T11:06:40.Z", "2026-13-01T00:00:00Z",
        "2026-02-29T00:00:00Z", "2026-11-31T00:00:00Z", "2026-11-18T24:00:00Z",
        "2026-11-18T09:60:00Z", "2026-11-18T09:46:60Z", "2026-11-18T11:06:40+0100",
        "2026-11-18T11:06:40+24:00", "26-11-18T09:46:40Z", "2026-1-18T09:46:40Z",
        "+026-11-18T09:46:40Z"}) {
    EXPECT_FALSE(parse_rfc3339(bad).has_value()) << bad;
    EXPECT_FALSE(parse_rfc3339_seconds(bad).has_value()) << bad;
  }
}

}  // namespace
}  // namespace shardguard
