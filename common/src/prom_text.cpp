// Prometheus text exposition parsing (see prom_text.h).
#include "shardguard/common/prom_text.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>

namespace shardguard {
namespace {

bool name_char(char c, bool first) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
         (!first && c >= '0' && c <= '9');
}

// A metric or label name at text[pos]; advances pos.
bool read_name(const std::string& text, std::size_t& pos, std::string& out) {
  const std::size_t begin = pos;
  while (pos < text.size() && name_char(text[pos], pos == begin)) ++pos;
  out = text.substr(begin, pos - begin);
  return !out.empty();
}

void skip_spaces(const std::string& text, std::size_t& pos) {
  while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\t')) ++pos;
}

// `a="1",b="2"` (a trailing comma allowed) up to `end` (the closing brace or the end).
bool read_labels(const std::string& text, std::size_t& pos, char end,
                 std::map<std::string, std::string>& out) {
  while (true) {
    skip_spaces(text, pos);
    if (pos < text.size() && text[pos] == end) return true;
    if (end == '\0' && pos == text.size()) return true;
    std::string key;
    if (!read_name(text, pos, key)) return false;
    skip_spaces(text, pos);
    if (pos >= text.size() || text[pos] != '=') return false;
    ++pos;
    skip_spaces(text, pos);
    if (pos >= text.size() || text[pos] != '"') return false;
    ++pos;
    std::string value;
    while (true) {
      if (pos >= text.size()) return false;
      const char c = text[pos++];
      if (c == '"') break;
      if (c != '\\') {
        value += c;
        continue;
      }
      if (pos >= text.size()) return false;
      const char e = text[pos++];
      value += e == 'n' ? '\n' : e;  // \\ and \" stand for themselves
    }
    out[key] = std::move(value);
    skip_spaces(text, pos);
    if (pos < text.size() && text[pos] == ',') ++pos;
  }
}

bool read_value(const std::string& text, double& out) {
  if (text == "NaN") {
    out = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  if (text == "+Inf" || text == "Inf") {
    out = std::numeric_limits<double>::infinity();
    return true;
  }
  if (text == "-Inf") {
    out = -std::numeric_limits<double>::infinity();
    return true;
  }
  if (text.empty()) return false;
  char* end = nullptr;
  out = std::strtod(text.c_str(), &end);
  return end == text.c_str() + text.size() && std::isfinite(out);
}

std::optional<PromSample> parse_line(const std::string& line) {
  std::size_t pos = 0;
  skip_spaces(line, pos);
  PromSample s;
  if (!read_name(line, pos, s.name)) return std::nullopt;
  if (pos < line.size() && line[pos] == '{') {
    ++pos;
    if (!read_labels(line, pos, '}', s.labels)) return std::nullopt;
    ++pos;  // the '}'
  }
  if (pos >= line.size() || (line[pos] != ' ' && line[pos] != '\t')) return std::nullopt;
  skip_spaces(line, pos);
  std::size_t end = pos;
  while (end < line.size() && line[end] != ' ' && line[end] != '\t' && line[end] != '\r') ++end;
  if (!read_value(line.substr(pos, end - pos), s.value)) return std::nullopt;
  // An optional timestamp follows; nothing else may.
  pos = end;
  skip_spaces(line, pos);
  while (pos < line.size() && ((line[pos] >= '0' && line[pos] <= '9') || line[pos] == '-')) ++pos;
  skip_spaces(line, pos);
  if (pos < line.size() && line[pos] == '\r') ++pos;
  if (pos != line.size()) return std::nullopt;
  return s;
}

}  // namespace

std::vector<PromSample> parse_prometheus_text(const std::string& page) {
  std::vector<PromSample> out;
  std::istringstream in(page);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (auto s = parse_line(line)) out.push_back(std::move(*s));
  }
  return out;
}

std::optional<std::map<std::string, std::string>> parse_prometheus_labels(const std::string& text) {
  std::map<std::string, std::string> out;
  std::size_t pos = 0;
  skip_spaces(text, pos);
  const bool braces = pos < text.size() && text[pos] == '{';
  if (braces) ++pos;
  if (!read_labels(text, pos, braces ? '}' : '\0', out)) return std::nullopt;
  if (braces) ++pos;
  skip_spaces(text, pos);
  if (pos != text.size()) return std::nullopt;
  return out;
}

std::vector<PromSample> prometheus_samples(const std::string& page, const std::string& name,
                                           const std::map<std::string, std::string>& want) {
  std::vector<PromSample> out;
  for (PromSample& s : parse_prometheus_text(page)) {
    if (s.name != name) continue;
    bool match = true;
    for (const auto& [k, v] : want) {
      const auto it = s.labels.find(k);
      match = match && it != s.labels.end() && it->second == v;
    }
    if (match) out.push_back(std::move(s));
  }
  return out;
}

double prometheus_sum(const std::string& page, const std::string& name,
                      const std::map<std::string, std::string>& want) {
  double total = 0;
  for (const PromSample& s : prometheus_samples(page, name, want)) total += s.value;
  return total;
}

}  // namespace shardguard
