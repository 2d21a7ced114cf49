// JSON-lines logging on stderr (see log.h).
#include "shardguard/common/log.h"
#include "shardguard/common/time.h"

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <string>

#include <unistd.h>

namespace shardguard::log {
namespace {

constexpr const char* kEnvLevel = "SHARDGUARD_LOG_LEVEL";

struct State {
  State() {
    const char* env = std::getenv(kEnvLevel);
    if (env != nullptr) {
      if (auto level = parse_level(env)) min_level.store(static_cast<int>(*level));
    }
  }
  std::atomic<int> min_level{static_cast<int>(Level::kInfo)};
  std::mutex mu;  // guards component and serialises the write(2) calls
  std::string component;
};

// Built at first use, which is when SHARDGUARD_LOG_LEVEL is read.
State& state() {
  static State s;
  return s;
}

const char* level_name(Level level) {
  switch (level) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarn: return "warn";
    case Level::kError: return "error";
  }
  return "unknown";
}

// RFC 3339 UTC with milliseconds, e.g. 2026-11-25T19:20:01.123Z.
std::string timestamp() { return format_rfc3339(std::chrono::system_clock::now(), 3); }

bool is_reserved(const std::string& key) {
  return key == "ts" || key == "level" || key == "msg" || key == "component";
}

}  // namespace

std::optional<Level> parse_level(const std::string& text) {
  if (text == "debug") return Level::kDebug;
  if (text == "info") return Level::kInfo;
  if (text == "warn" || text == "warning") return Level::kWarn;
  if (text == "error") return Level::kError;
  return std::nullopt;
}

void set_component(const std::string& component) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.component = component;
}

void set_min_level(Level level) { state().min_level.store(static_cast<int>(level)); }

std::string format_line(Level level, const std::string& msg, const nlohmann::json& fields) {
  std::string component;
  {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    component = s.component;
  }
  // ordered_json keeps ts, level, msg, component first, then the fields in order.
  nlohmann::ordered_json line;
  line["ts"] = timestamp();
  line["level"] = level_name(level);
  line["msg"] = msg;
  line["component"] = component;
  if (fields.is_object()) {
    for (auto it = fields.begin(); it != fields.end(); ++it) {
      // A field may not replace a core key; it is kept under a prefixed name.
      const std::string key = is_reserved(it.key()) ? "field." + it.key() : it.key();
      line[key] = nlohmann::ordered_json(it.value());
    }
  } else if (!fields.is_null()) {
    line["fields"] = nlohmann::ordered_json(fields);
  }
  // Invalid UTF-8 in a message must not make logging throw.
  return line.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

void write(Level level, const std::string& msg, const nlohmann::json& fields) {
  State& s = state();
  if (static_cast<int>(level) < s.min_level.load()) return;
  std::string line;
  try {
    line = format_line(level, msg, fields);
  } catch (const std::exception&) {
    // Logging never throws into the caller; drop the fields that could not be encoded.
    line = format_line(level, msg, nlohmann::json::object());
  }
  std::lock_guard<std::mutex> lock(s.mu);
  // One write(2) per line; loop only for the rare short write or EINTR.
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    const ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // nowhere left to report it
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace shardguard::log
