// RFC 3339 timestamps, the one formatter and the one parser (Kubernetes status and
// metadata times, log lines, certificate dates in messages, the test API server).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace shardguard {

// `t` in UTC as RFC 3339: "2026-11-25T19:20:01Z", or with `fraction_digits` (1 to 9)
// digits of the second, truncated: "2026-11-25T19:20:01.123Z" for 3.
std::string format_rfc3339(std::chrono::system_clock::time_point t, int fraction_digits = 0);
// Whole seconds since the epoch: "1970-01-01T00:00:00Z" for 0.
std::string format_rfc3339(int64_t unix_seconds);

// An RFC 3339 date-time, `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` ('T' and
// 'Z' in either case), as a UTC time point; nullopt when it is malformed (a missing
// zone, a field out of range, February 30, trailing text, ...). A fraction finer
// than the clock is truncated; a leap second (":60") is refused.
std::optional<std::chrono::system_clock::time_point> parse_rfc3339(const std::string& text);
// The same, in whole seconds since the epoch (rounded down).
std::optional<int64_t> parse_rfc3339_seconds(const std::string& text);

}  // namespace shardguard
