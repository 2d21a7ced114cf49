// When `shardctl run` restarts a shardd that stopped, and what it says when it does
// not: the pure part of the run loop (local_run.cpp carries it out).
//
// A shard that fails at once (full disk, a dataset it cannot read) must not burn its
// runPolicy.backoffLimit restarts in a second: restarts back off exponentially, as the
// kubelet's CrashLoopBackOff does (there from 10 s to 5 min; here from 1 s to 60 s,
// since a local run is watched by someone at the terminal). An exit with status 2 is
// shardd's "bad input" (an invalid job, a file it cannot use): starting it again fails
// the same way, so it is not restarted.
#pragma once

#include <chrono>
#include <string>

#include "shardguard/common/process.h"

namespace shardguard::shardctl {

inline constexpr int kBadInputExit = 2;

struct RestartDecision {
  bool restart = false;
  std::chrono::milliseconds delay{0};  // wait this long before starting it again
  std::string why_not;                  // !restart: one sentence for the failure message
};

// The delay before restart number `n` (1-based): 1 s, 2 s, 4 s, … at most 60 s.
std::chrono::milliseconds restart_delay(int n);

// For a shardd that ended with `status` (not a clean exit 0) after `restarts` restarts
// under a backoff limit of `limit`.
RestartDecision decide_restart(const ExitStatus& status, int restarts, int limit);

// The last line of a shardd log that reports an error — a JSON log line whose level
// is "error", or a plain "shardd: …" line — whole, however long; "" when there is none.
std::string last_error_line(const std::string& log_text);

}  // namespace shardguard::shardctl
