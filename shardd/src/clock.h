// The monotonic clock shardd times its steps, deliveries and retries with.
#pragma once

#include <chrono>

namespace shardguard::shardd {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace shardguard::shardd
