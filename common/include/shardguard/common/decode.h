// The one decode/validate kit: walks a JSON document with a path, refuses unknown
// fields, missing required fields, wrong types and out-of-range numbers, and words
// each kind of refusal one way. The job spec decoder (jobspec.h) and the shard
// access policy parser (policy/policy.h) are both built on it, so the same mistake
// gets the same message from either:
//
//   kind                    message (after "<path>: ")
//   missing required field  required, got nothing
//   wrong JSON type         expected a string, got integer 7
//   unknown field           unknown field "hiden" (did you mean "hidden"?)
//                           unknown field "x" (known fields: a, b)
//   below a minimum         must be at least 1, got 0
//   above a maximum         must be at most 64, got 65
//   integer out of range    out of range [-2147483648, 2147483647], got 3000000000
//   empty string            must not be empty, got ""
//   too long                must be at most 63 characters, got 70
//   too many items          must have at most 16 items, got 17
//   empty list              must list at least one <what>, got []
//   not in an enum          unsupported <what> "x" (expected one of: "a", "b")
//   duplicate item          duplicate value "x" (also at <path>)
//   duplicate JSON key      duplicate key "x"
//   not a DNS-1123 label    must be a DNS-1123 label (lower-case letters, ...), got "X"
//   not a SPIFFE ID         must be a SPIFFE ID (spiffe://<trust-domain>/<path>): <why>, got "x"
//
// Values in messages are shown as JSON literals (ASCII, invalid UTF-8 replaced, long
// values cut), so whatever a client sends can go into a message or a log line.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

namespace shardguard {

// One refusal: where (a JSON path such as `spec.training.batchSize` or
// `ingress[1].peers[0]`) and what.
struct FieldError {
  std::string path;     // e.g. "spec.training.batchSize"
  std::string message;  // e.g. "must be at least 1, got 0"
  std::string str() const { return path + ": " + message; }
};

// Every refusal of one document. what() is the heading (if any) followed by one
// error a line; errors() gives them one by one.
class DecodeError : public std::runtime_error {
 public:
  DecodeError(const std::string& heading, std::vector<FieldError> errors);
  const std::vector<FieldError>& errors() const { return errors_; }

 private:
  std::vector<FieldError> errors_;
};

namespace decode {

// ---- how values appear in messages ----

// `s` as a JSON string literal: ASCII only, invalid UTF-8 replaced, cut after 160
// bytes with "... (N bytes)".
std::string quote(const std::string& s);
// A double as JSON writes it; "nan", "inf", "-inf" otherwise.
std::string format_double(double v);
// A JSON value as it appears in a message (floats as format_double), cut after 80 characters.
std::string show(const nlohmann::json& v);
// "null", "boolean", "integer", "number", "string", "array", "object".
std::string type_name(const nlohmann::json& v);
// "got string \"64\"", "got null".
std::string got(const nlohmann::json& v);

// ---- the one wording of each kind of refusal (see the table above) ----

std::string required();
std::string wrong_type(const std::string& expected, const nlohmann::json& v);
std::string unknown_field(const std::string& key, std::initializer_list<const char*> known);
std::string at_least(const std::string& min, const std::string& value);
std::string at_most(const std::string& max, const std::string& value);
std::string out_of_range(const std::string& min, const std::string& max, const std::string& value);
std::string empty_string();
std::string too_long(std::size_t max, std::size_t size);
std::string too_many(std::size_t max, std::size_t size);
std::string none_listed(const std::string& what);
std::string not_one_of(const std::string& what, const std::string& value,
                       std::initializer_list<const char*> allowed);
std::string duplicate(const std::string& value, const std::string& first_path = "");
std::string duplicate_key(const std::string& key);
std::string not_dns_label(const std::string& value);
// "" when `value` is a valid SPIFFE ID (common/pki.h validate_spiffe_id).
std::string not_spiffe_id(const std::string& value);

// ---- paths ----

// "parent.key" ("key" at the root).
std::string child(const std::string& parent, const std::string& key);
// "path[index]".
std::string at(const std::string& path, std::size_t index);

// Walks a JSON document and collects every refusal instead of stopping at the first.
class Reader {
 public:
  struct Rules {
    // Kubernetes drops null fields before it stores an object, so for the job spec
    // a null field is an absent one; the policy takes null as a value of the wrong type.
    bool null_is_absent = false;
    // Some clients write 2.0 for 2: the job spec takes a float with no fractional
    // part where an integer is expected; the policy does not.
    bool whole_floats_are_integers = false;
  };

  explicit Reader(Rules rules) : rules_(rules) {}

  std::vector<FieldError> errors;

  void fail(std::string path, std::string message);
  // True when `path` lies at or under a path that already has an error.
  bool covers(const std::string& path) const;

  // obj[key] when present (and, with null_is_absent, not null), else nullptr.
  const nlohmann::json* find(const nlohmann::json& obj, const char* key) const;
  // find(), and "required, got nothing" at parent.key when absent.
  const nlohmann::json* require(const nlohmann::json& obj, const std::string& parent,
                                const char* key);
  // Reports every key of `obj` not in `known`, with the closest known name.
  void known_fields(const nlohmann::json& obj, const std::string& path,
                    std::initializer_list<const char*> known);

  // Each takes the value (nullptr: absent, nothing to report) and its path; a
  // value of another JSON type is reported and gives nothing.
  const nlohmann::json* object(const nlohmann::json* v, const std::string& path);
  const nlohmann::json* array(const nlohmann::json* v, const std::string& path,
                              const std::string& of = "");
  std::optional<std::string> string(const nlohmann::json* v, const std::string& path);
  std::optional<bool> boolean(const nlohmann::json* v, const std::string& path);
  std::optional<double> number(const nlohmann::json* v, const std::string& path);
  // An integer that fits in T ("out of range [min, max]" otherwise); unsigned T
  // refuses negative values as the wrong type.
  template <class T>
  std::optional<T> integer(const nlohmann::json* v, const std::string& path);

  // Range checks on decoded values.
  void at_least(const std::string& path, int64_t value, int64_t min);
  void between(const std::string& path, int64_t value, int64_t min, int64_t max);
  void not_empty(const std::string& path, const std::string& value);
  // False (and an error) when value is longer than max bytes.
  bool max_length(const std::string& path, const std::string& value, std::size_t max);
  // False (and an error) when value is not one of `allowed`.
  bool one_of(const std::string& path, const std::string& value, const std::string& what,
              std::initializer_list<const char*> allowed);
  // False (and an error) when value is not a DNS-1123 label of at most `max`.
  bool dns_label(const std::string& path, const std::string& value, std::size_t max = 63);
  // False (and an error) when value is not a SPIFFE ID.
  bool spiffe_id(const std::string& path, const std::string& value);

 private:
  bool integer_parts(const nlohmann::json& v, const std::string& path, const std::string& expected,
                     bool& negative, uint64_t& magnitude);
  Rules rules_;
};

template <class T>
std::optional<T> Reader::integer(const nlohmann::json* v, const std::string& path) {
  static_assert(std::is_integral_v<T> && sizeof(T) <= 8);
  if (v == nullptr) return std::nullopt;
  const std::string expected = std::is_signed_v<T> ? "an integer" : "a non-negative integer";
  bool negative = false;
  uint64_t magnitude = 0;
  if (!integer_parts(*v, path, expected, negative, magnitude)) return std::nullopt;
  const uint64_t max = static_cast<uint64_t>(std::numeric_limits<T>::max());
  const uint64_t min_magnitude =
      std::is_signed_v<T>
          ? static_cast<uint64_t>(-(static_cast<int64_t>(std::numeric_limits<T>::min()) + 1)) + 1
          : 0;
  if (negative ? magnitude > min_magnitude : magnitude > max) {
    if (negative && min_magnitude == 0) {
      fail(path, wrong_type(expected, *v));
    } else {
      fail(path, out_of_range(std::to_string(std::numeric_limits<T>::min()),
                              std::to_string(std::numeric_limits<T>::max()), show(*v)));
    }
    return std::nullopt;
  }
  // magnitude <= min_magnitude when negative, so this stays within T.
  if (negative) return static_cast<T>(-static_cast<int64_t>(magnitude - 1) - 1);
  return static_cast<T>(magnitude);
}

}  // namespace decode
}  // namespace shardguard
