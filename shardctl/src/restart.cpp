#include "shardguard/shardctl/restart.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "shardguard/model/package.h"

namespace shardguard::shardctl {

std::chrono::milliseconds restart_delay(int n) {
  const int doublings = std::clamp(n - 1, 0, 6);  // 2^6 s = 64 s > the cap
  return std::min(std::chrono::milliseconds(1000) * (1 << doublings), std::chrono::milliseconds(60000));
}

RestartDecision decide_restart(const ExitStatus& status, int restarts, int limit) {
  RestartDecision d;
  if (status.exited && status.code == kBadInputExit) {
    d.why_not = "it exited with status 2 (bad input: started again it would fail the same way), so it is not "
                "restarted";
    return d;
  }
  if (status.exited && status.code == model::kExitPackageRefused) {
    d.why_not = "it refused its package (exit status 3: the same package and key would be refused again), so it is "
                "not restarted";
    return d;
  }
  if (restarts >= limit) {
    d.why_not = "after " + std::to_string(restarts) + " restart(s), the job's runPolicy.backoffLimit";
    return d;
  }
  d.restart = true;
  d.delay = restart_delay(restarts + 1);
  return d;
}

std::string last_error_line(const std::string& text) {
  size_t end = text.size();
  while (end > 0) {
    const size_t nl = end > 0 ? text.rfind('\n', end - 1) : std::string::npos;
    const size_t begin = nl == std::string::npos ? 0 : nl + 1;
    const std::string line = text.substr(begin, end - begin);
    if (line.rfind("shardd:", 0) == 0) return line;
    if (!line.empty() && line.front() == '{') {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_object() && j.value("level", "") == "error") return line;
    }
    if (nl == std::string::npos) break;
    end = nl;
  }
  return "";
}

}  // namespace shardguard::shardctl
