// Structured logging: one JSON object per line on stderr with ts (RFC 3339,
// UTC, milliseconds), level, msg, component and any extra fields.
// Thread-safe: each line is written with one write(2).
#pragma once

#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace shardguard::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// "debug", "info", "warn" (or "warning"), "error"; nullopt for anything else.
// SHARDGUARD_LOG_LEVEL is parsed with this at first use to give the default
// minimum level (info when unset or unrecognised).
std::optional<Level> parse_level(const std::string& text);

// Set once at start-up by main(); every line carries it.
void set_component(const std::string& component);
void set_min_level(Level level);

void write(Level level, const std::string& msg, const nlohmann::json& fields = nlohmann::json::object());
inline void debug(const std::string& m, const nlohmann::json& f = nlohmann::json::object()) { write(Level::kDebug, m, f); }
inline void info(const std::string& m, const nlohmann::json& f = nlohmann::json::object()) { write(Level::kInfo, m, f); }
inline void warn(const std::string& m, const nlohmann::json& f = nlohmann::json::object()) { write(Level::kWarn, m, f); }
inline void error(const std::string& m, const nlohmann::json& f = nlohmann::json::object()) { write(Level::kError, m, f); }

// The line that write() would emit (exposed for tests).
std::string format_line(Level level, const std::string& msg, const nlohmann::json& fields);

}  // namespace shardguard::log
