// The decode/validate kit (see decode.h).
#include "shardguard/common/decode.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "shardguard/common/pki.h"
#include "shardguard/common/strings.h"

namespace shardguard {

using json = nlohmann::json;

namespace {

std::string join_errors(const std::string& heading, const std::vector<FieldError>& errors) {
  if (errors.empty()) return heading.empty() ? "invalid document" : heading;
  std::string out = heading;
  const std::string indent = heading.empty() ? "" : "  ";
  for (std::size_t i = 0; i < errors.size(); ++i) {
    if (!out.empty()) out += '\n';
    out += indent + errors[i].str();
  }
  return out;
}

std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      const std::size_t substitute = diagonal + (a[i - 1] == b[j - 1] ? 0 : 1);
      row[j] = std::min({above + 1, row[j - 1] + 1, substitute});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string lower(std::string s) {
  for (char& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

std::string quoted_list(std::initializer_list<const char*> items) {
  std::string out;
  for (const char* item : items) out += (out.empty() ? "" : ", ") + decode::quote(item);
  return out;
}

}  // namespace

DecodeError::DecodeError(const std::string& heading, std::vector<FieldError> errors)
    : std::runtime_error(join_errors(heading, errors)), errors_(std::move(errors)) {}

namespace decode {

std::string quote(const std::string& s) {
  constexpr std::size_t kMax = 160;
  const std::string shown = s.size() > kMax ? s.substr(0, kMax) : s;
  std::string out = json(shown).dump(-1, ' ', true, json::error_handler_t::replace);
  if (s.size() > kMax) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string format_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  return json(v).dump();
}

std::string show(const json& v) {
  std::string out = v.is_number_float() ? format_double(v.get<double>())
                                        : v.dump(-1, ' ', true, json::error_handler_t::replace);
  constexpr std::size_t kMaxShown = 80;
  if (out.size() > kMaxShown) out = out.substr(0, kMaxShown) + "...";
  return out;
}

std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "integer";
    case json::value_t::number_float: return "number";
    case json::value_t::string: return "string";
    case json::value_t::array: return "array";
    case json::value_t::object: return "object";
    default: return "value";
  }
}

std::string got(const json& v) {
  if (v.is_null()) return "got null";
  return "got " + type_name(v) + " " + show(v);
}

std::string required() { return "required, got nothing"; }

std::string wrong_type(const std::string& expected, const json& v) {
  return "expected " + expected + ", " + got(v);
}

std::string unknown_field(const std::string& key, std::initializer_list<const char*> known) {
  std::string message = "unknown field " + quote(key);
  const char* best = nullptr;
  std::size_t best_distance = 3;  // suggest only close matches
  for (const char* k : known) {
    const std::size_t d = lower(key) == lower(k) ? 0 : edit_distance(key, k);
    if (d < best_distance) {
      best_distance = d;
      best = k;
    }
  }
  if (best != nullptr) return message + " (did you mean " + quote(best) + "?)";
  std::string names;
  for (const char* k : known) names += std::string(names.empty() ? "" : ", ") + k;
  return message + " (known fields: " + names + ")";
}

std::string at_least(const std::string& min, const std::string& value) {
  return "must be at least " + min + ", got " + value;
}

std::string at_most(const std::string& max, const std::string& value) {
  return "must be at most " + max + ", got " + value;
}

std::string out_of_range(const std::string& min, const std::string& max, const std::string& value) {
  return "out of range [" + min + ", " + max + "], got " + value;
}

std::string empty_string() { return "must not be empty, got \"\""; }

std::string too_long(std::size_t max, std::size_t size) {
  return "must be at most " + std::to_string(max) + " characters, got " + std::to_string(size);
}

std::string too_many(std::size_t max, std::size_t size) {
  return "must have at most " + std::to_string(max) + " items, got " + std::to_string(size);
}

std::string none_listed(const std::string& what) {
  return "must list at least one " + what + ", got []";
}

std::string not_one_of(const std::string& what, const std::string& value,
                       std::initializer_list<const char*> allowed) {
  const std::string list = " (expected one of: " + quoted_list(allowed) + ")";
  if (value.empty()) return required() + list;
  return "unsupported " + what + " " + quote(value) + list;
}

std::string duplicate(const std::string& value, const std::string& first_path) {
  return "duplicate value " + quote(value) + (first_path.empty() ? "" : " (also at " + first_path + ")");
}

std::string duplicate_key(const std::string& key) { return "duplicate key " + quote(key); }

std::string not_dns_label(const std::string& value) {
  return "must be a DNS-1123 label (lower-case letters, digits and '-', starting and ending with a "
         "letter or digit), got " + quote(value);
}

std::string not_spiffe_id(const std::string& value) {
  const std::string why = validate_spiffe_id(value);
  if (why.empty()) return "";
  return "must be a SPIFFE ID (spiffe://<trust-domain>/<path>): " + why + ", got " + quote(value);
}

std::string child(const std::string& parent, const std::string& key) {
  // An empty key would give an empty path (at the root) or a trailing dot; name it
  // the way JSON does instead, so every problem has a path that points somewhere.
  if (key.empty()) return parent + "[\"\"]";
  return parent.empty() ? key : parent + "." + key;
}

std::string at(const std::string& path, std::size_t index) {
  return path + "[" + std::to_string(index) + "]";
}

// ---- Reader ----

void Reader::fail(std::string path, std::string message) {
  errors.push_back(FieldError{std::move(path), std::move(message)});
}

bool Reader::covers(const std::string& path) const {
  for (const FieldError& e : errors) {
    if (path == e.path) return true;
    if (path.size() > e.path.size() && path.compare(0, e.path.size(), e.path) == 0 &&
        (path[e.path.size()] == '.' || path[e.path.size()] == '[')) {
      return true;
    }
  }
  return false;
}

const json* Reader::find(const json& obj, const char* key) const {
  auto it = obj.find(key);
  if (it == obj.end() || (rules_.null_is_absent && it->is_null())) return nullptr;
  return &*it;
}

const json* Reader::require(const json& obj, const std::string& parent, const char* key) {
  const json* v = find(obj, key);
  if (v == nullptr) fail(child(parent, key), required());
  return v;
}

void Reader::known_fields(const json& obj, const std::string& path,
                          std::initializer_list<const char*> known) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    const std::string& key = it.key();
    const bool found =
        std::any_of(known.begin(), known.end(), [&](const char* k) { return key == k; });
    if (!found) fail(child(path, key), unknown_field(key, known));
  }
}

const json* Reader::object(const json* v, const std::string& path) {
  if (v == nullptr) return nullptr;
  if (!v->is_object()) {
    fail(path, wrong_type("an object", *v));
    return nullptr;
  }
  return v;
}

const json* Reader::array(const json* v, const std::string& path, const std::string& of) {
  if (v == nullptr) return nullptr;
  if (!v->is_array()) {
    fail(path, wrong_type(of.empty() ? "an array" : "an array of " + of, *v));
    return nullptr;
  }
  return v;
}

std::optional<std::string> Reader::string(const json* v, const std::string& path) {
  if (v == nullptr) return std::nullopt;
  if (!v->is_string()) {
    fail(path, wrong_type("a string", *v));
    return std::nullopt;
  }
  return v->get<std::string>();
}

std::optional<bool> Reader::boolean(const json* v, const std::string& path) {
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) {
    fail(path, wrong_type("a boolean (true or false)", *v));
    return std::nullopt;
  }
  return v->get<bool>();
}

std::optional<double> Reader::number(const json* v, const std::string& path) {
  if (v == nullptr) return std::nullopt;
  if (!v->is_number()) {
    fail(path, wrong_type("a number", *v));
    return std::nullopt;
  }
  return v->get<double>();
}

bool Reader::integer_parts(const json& v, const std::string& path, const std::string& expected,
                           bool& negative, uint64_t& magnitude) {
  if (v.is_number_unsigned()) {
    magnitude = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    negative = i < 0;
    magnitude = negative ? static_cast<uint64_t>(-(i + 1)) + 1 : static_cast<uint64_t>(i);
    return true;
  }
  if (v.is_number_float() && rules_.whole_floats_are_integers) {
    const double d = v.get<double>();
    // 2^64 is exactly representable; anything at or above it cannot fit.
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 18446744073709551616.0) {
      negative = d < 0;
      magnitude = static_cast<uint64_t>(std::fabs(d));
      return true;
    }
  }
  fail(path, wrong_type(expected, v));
  return false;
}

void Reader::at_least(const std::string& path, int64_t value, int64_t min) {
  if (value < min) fail(path, decode::at_least(std::to_string(min), std::to_string(value)));
}

void Reader::between(const std::string& path, int64_t value, int64_t min, int64_t max) {
  if (value < min) {
    fail(path, decode::at_least(std::to_string(min), std::to_string(value)));
  } else if (value > max) {
    fail(path, decode::at_most(std::to_string(max), std::to_string(value)));
  }
}

void Reader::not_empty(const std::string& path, const std::string& value) {
  if (value.empty()) fail(path, empty_string());
}

bool Reader::max_length(const std::string& path, const std::string& value, std::size_t max) {
  if (value.size() <= max) return true;
  fail(path, too_long(max, value.size()));
  return false;
}

bool Reader::one_of(const std::string& path, const std::string& value, const std::string& what,
                    std::initializer_list<const char*> allowed) {
  for (const char* a : allowed) {
    if (value == a) return true;
  }
  fail(path, not_one_of(what, value, allowed));
  return false;
}

bool Reader::dns_label(const std::string& path, const std::string& value, std::size_t max) {
  if (value.empty()) {
    fail(path, required());
    return false;
  }
  if (!max_length(path, value, max)) return false;
  if (is_dns_label(value, max)) return true;
  fail(path, not_dns_label(value));
  return false;
}

bool Reader::spiffe_id(const std::string& path, const std::string& value) {
  const std::string why = not_spiffe_id(value);
  if (why.empty()) return true;
  fail(path, why);
  return false;
}

}  // namespace decode
}  // namespace shardguard
