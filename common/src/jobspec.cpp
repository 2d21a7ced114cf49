// ShardedTrainingJob decoding and validation (see jobspec.h).
//
// Three layers, each usable on its own:
//   yaml_to_json   YAML text -> JSON, scalars typed by the YAML 1.2 core schema
//   job_from_json  JSON object -> JobSpec: structure, JSON types, unknown fields
//   validate       JobSpec -> errors: ranges and cross-field rules
// job_from_json runs validate too and throws one JobSpecError listing every
// problem found by either layer.
#include "shardguard/common/jobspec.h"

#include "shardguard/common/files.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/strings.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <regex>
#include <system_error>
#include <type_traits>
#include <utility>

namespace shardguard {

using json = nlohmann::json;

namespace {

constexpr const char* kApiVersion = "shardguard.io/v1alpha1";
constexpr const char* kKind = "ShardedTrainingJob";

// Pod names are "<job>-shard-<index>" with index < 64 ("-shard-63" is 9
// characters); they must stay DNS-1123 labels of at most 63 characters.
constexpr std::size_t kMaxJobNameLength = 52;
// With replicas, pod names are "<job>-shard-<index>-r<replica>" with replica < 16
// ("-r15" is 4 more characters).
constexpr std::size_t kMaxReplicatedJobNameLength = 48;
constexpr int kMaxReplicas = 16;
constexpr std::size_t kMaxLabelLength = 63;
constexpr std::size_t kMaxDnsNameLength = 253;

using decode::format_double;
using decode::got;
using decode::child;
using decode::quote;

// ---- YAML -> JSON ----------------------------------------------------------

constexpr int kMaxYamlDepth = 256;
constexpr std::size_t kMaxJobFileBytes = 1 << 20;  // 1 MiB
// The CRD's message for both path fields (x-kubernetes-validations).
constexpr const char* kSafePathText = "an absolute path without \"..\" segments";
constexpr const char* kPackageUrlText =
    "an http:// or https:// URL prefix ending in '/': a host name or IPv4 address, an optional port, and "
    "path segments of letters, digits and -._~%!$&'()*+,;=:@ (no user, query or fragment)";
// Aliases are expanded while converting; this bounds "billion laughs" input.
constexpr std::size_t kMaxYamlNodes = 1000000;

std::string mark_text(const YAML::Mark& mark) {
  if (mark.is_null()) return "";
  return "line " + std::to_string(mark.line + 1) + ", column " + std::to_string(mark.column + 1) +
         ": ";
}

[[noreturn]] void yaml_fail(const YAML::Mark& mark, const std::string& message) {
  throw JobSpecError({FieldError{"<yaml>", mark_text(mark) + message}});
}

bool is_digits(const std::string& s, std::size_t from, int base) {
  if (from >= s.size()) return false;
  for (std::size_t i = from; i < s.size(); ++i) {
    const char c = s[i];
    bool ok = false;
    if (base == 8) ok = c >= '0' && c <= '7';
    else if (base == 10) ok = c >= '0' && c <= '9';
    else ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    if (!ok) return false;
  }
  return true;
}

std::optional<double> parse_double(const std::string& text) {
  std::string s = text;
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  double value = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ptr != s.data() + s.size()) return std::nullopt;
  if (ec == std::errc::result_out_of_range) {
    // Overflow becomes infinity, underflow zero, as YAML loaders do.
    const bool negative = !s.empty() && s[0] == '-';
    const auto e = s.find_first_of("eE");
    const bool big = e == std::string::npos || s[e + 1] != '-';
    if (big) return negative ? -std::numeric_limits<double>::infinity()
                             : std::numeric_limits<double>::infinity();
    return negative ? -0.0 : 0.0;
  }
  if (ec != std::errc()) return std::nullopt;
  return value;
}

// Core schema int: [-+]?[0-9]+ | 0o[0-7]+ | 0x[0-9a-fA-F]+ . Integers beyond
// 64 bits become floating point numbers rather than failing.
std::optional<json> resolve_int(const std::string& s) {
  int base = 10;
  std::size_t start = 0;
  bool negative = false;
  if (s.size() > 2 && s[0] == '0' && s[1] == 'o') {
    base = 8;
    start = 2;
  } else if (s.size() > 2 && s[0] == '0' && s[1] == 'x') {
    base = 16;
    start = 2;
  } else if (!s.empty() && (s[0] == '-' || s[0] == '+')) {
    negative = s[0] == '-';
    start = 1;
  }
  if (!is_digits(s, start, base)) return std::nullopt;
  uint64_t magnitude = 0;
  const auto [ptr, ec] = std::from_chars(s.data() + start, s.data() + s.size(), magnitude, base);
  if (ec == std::errc::result_out_of_range) {
    if (base != 10) return std::nullopt;
    auto d = parse_double(s);
    if (!d) return std::nullopt;
    return json(*d);
  }
  if (ec != std::errc() || ptr != s.data() + s.size()) return std::nullopt;
  if (!negative) {
    if (magnitude <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return json(static_cast<int64_t>(magnitude));
    }
    return json(magnitude);
  }
  constexpr uint64_t kMinMagnitude = static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) + 1;
  if (magnitude < kMinMagnitude) return json(-static_cast<int64_t>(magnitude));
  if (magnitude == kMinMagnitude) return json(std::numeric_limits<int64_t>::min());
  return json(-static_cast<double>(magnitude));
}

// Core schema float:
//   [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
//   [-+]?(\.inf|\.Inf|\.INF)   \.nan|\.NaN|\.NAN
std::optional<double> resolve_float(const std::string& s) {
  if (s == ".nan" || s == ".NaN" || s == ".NAN") return std::numeric_limits<double>::quiet_NaN();
  std::size_t i = 0;
  bool negative = false;
  if (i < s.size() && (s[i] == '-' || s[i] == '+')) {
    negative = s[i] == '-';
    ++i;
  }
  const std::string rest = s.substr(i);
  if (rest == ".inf" || rest == ".Inf" || rest == ".INF") {
    return negative ? -std::numeric_limits<double>::infinity()
                    : std::numeric_limits<double>::infinity();
  }
  auto digits = [&](std::size_t& pos) {
    const std::size_t begin = pos;
    while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') ++pos;
    return pos - begin;
  };
  if (i < s.size() && s[i] == '.') {
    ++i;
    if (digits(i) == 0) return std::nullopt;
  } else {
    if (digits(i) == 0) return std::nullopt;
    if (i < s.size() && s[i] == '.') {
      ++i;
      digits(i);
    }
  }
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
    if (digits(i) == 0) return std::nullopt;
  }
  if (i != s.size()) return std::nullopt;
  return parse_double(s);
}

std::optional<bool> resolve_bool(const std::string& s) {
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  return std::nullopt;
}

bool is_null_text(const std::string& s) {
  return s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL";
}

// ---- one meaning for one file ------------------------------------------------
// kubectl reads YAML 1.1 (sigs.k8s.io/yaml): `yes` is true, `064` is 52, `1_000` is
// 1000, `<<:` merges. shardctl reads YAML 1.2, where those are a string, 64, a
// string and a key. A job file must mean the same to both, so every plain scalar
// that the two read differently (or that YAML 1.1 reads as a number in a form
// YAML 1.2 does not have) is refused with the way to write it. Quoting makes any
// of them a plain string for both.

bool all_of_chars(const std::string& s, std::size_t from, const char* allowed) {
  if (from >= s.size()) return false;
  return s.find_first_not_of(allowed, from) == std::string::npos;
}

// Why `s`, written plain, means something else to kubectl; nullopt when it does not.
std::optional<std::string> yaml11_difference(const std::string& s) {
  static const char* const kBool11[] = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No",
                                        "NO", "on", "On", "ON", "off", "Off", "OFF"};
  for (const char* b : kBool11) {
    if (s == b) {
      const bool value = s[0] == 'y' || s[0] == 'Y' || s == "on" || s == "On" || s == "ON";
      return quote(s) + " is the boolean " + (value ? "true" : "false") +
             " to kubectl (YAML 1.1) but the string " + quote(s) +
             " here (YAML 1.2); write " + (value ? "true" : "false") +
             ", or quote it for a string";
    }
  }
  const std::size_t sign = !s.empty() && (s[0] == '-' || s[0] == '+') ? 1 : 0;
  const std::string body = s.substr(sign);
  if (body.size() > 1 && body[0] == '0' &&
      (body[1] == 'x' || body[1] == 'X' || body[1] == 'o' || body[1] == 'O' || body[1] == 'b' ||
       body[1] == 'B') &&
      all_of_chars(body, 2, "0123456789abcdefABCDEF_")) {
    return quote(s) + " is a hexadecimal, octal or binary number, which YAML 1.1 (kubectl) and "
           "YAML 1.2 read differently; write the number in decimal, or quote it for a string";
  }
  if (body.size() > 1 && body[0] == '0' && all_of_chars(body, 1, "0123456789_")) {
    return quote(s) + " has a leading 0: kubectl (YAML 1.1) reads it as an octal number, this "
           "file's reader (YAML 1.2) as decimal; write it without the leading 0, or quote it "
           "for a string";
  }
  if (!body.empty() && body[0] >= '0' && body[0] <= '9' && body.find('_') != std::string::npos &&
      all_of_chars(body, 0, "0123456789_.eE+-")) {
    return quote(s) + " is a number to kubectl (YAML 1.1 drops the '_') but a string here "
           "(YAML 1.2); write it without '_', or quote it for a string";
  }
  if (!body.empty() && body[0] >= '0' && body[0] <= '9' && body.find(':') != std::string::npos &&
      all_of_chars(body, 0, "0123456789_:.")) {
    return quote(s) + " is a base-60 number in YAML 1.1 but a string in YAML 1.2; quote it "
           "for a string";
  }
  return std::nullopt;
}

json resolve_plain(const std::string& s) {
  if (is_null_text(s)) return nullptr;
  if (auto b = resolve_bool(s)) return *b;
  if (auto i = resolve_int(s)) return *i;
  if (auto f = resolve_float(s)) return *f;
  return s;
}

// The nesting depth of a YAML text, estimated before yaml-cpp parses it: its
// parser recurses once per level, so a file of ten thousand '[' would exhaust the
// stack or fail as "bad file". Counts block levels (indentation and "- " entries) and
// flow levels ('[' '{' outside quotes and comments) and refuses the first place where
// they exceed kMaxYamlDepth, with its line and column. An estimate that errs high:
// a document the scan passes can still be refused by YamlConverter's exact count.
void check_yaml_depth(const std::string& text) {
  // Where the limit was crossed: a line, and a column when a flow bracket did it.
  const auto too_deep = [](std::size_t line, std::size_t column) {
    throw JobSpecError({FieldError{"<yaml>", "line " + std::to_string(line + 1) +
                                                 (column ? ", column " + std::to_string(column) : std::string()) +
                                                 ": nesting deeper than " + std::to_string(kMaxYamlDepth) +
                                                 " levels"}});
  };
  std::vector<std::size_t> indents;  // block levels open at the current line
  int flow = 0;
  char quote = 0;  // inside a '…' or "…" flow scalar (they may span lines)
  std::size_t line = 0, begin = 0;
  while (begin <= text.size()) {
    std::size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    std::size_t i = begin;
    int dashes = 0;
    if (flow == 0 && quote == 0) {
      while (i < end && text[i] == ' ') ++i;
      const std::size_t indent = i - begin;
      const bool content = i < end && text[i] != '#' && text[i] != '\r';
      if (content) {
        while (!indents.empty() && indents.back() >= indent) indents.pop_back();
        indents.push_back(indent);
        // "- - - x": each entry marker opens one more level on the same line.
        while (i + 1 < end && text[i] == '-' && (text[i + 1] == ' ' || text[i + 1] == '\t')) {
          ++dashes;
          i += 2;
          while (i < end && text[i] == ' ') ++i;
        }
      }
    }
    for (; i < end; ++i) {
      const char c = text[i];
      if (quote) {
        if (c == '\\' && quote == '"') ++i;
        else if (c == quote) quote = 0;
        continue;
      }
      if (c == '#' && (i == begin || text[i - 1] == ' ' || text[i - 1] == '\t')) break;
      if (c == '"' || c == '\'') {
        quote = c;
      } else if (c == '[' || c == '{') {
        if (static_cast<int>(indents.size()) + dashes + ++flow > kMaxYamlDepth) too_deep(line, i - begin + 1);
      } else if ((c == ']' || c == '}') && flow > 0) {
        --flow;
      }
    }
    if (static_cast<int>(indents.size()) + dashes + flow > kMaxYamlDepth) too_deep(line, 0);
    ++line;
    begin = end + 1;
  }
}

class YamlConverter {
 public:
  json convert(const YAML::Node& node, int depth) {
    if (++nodes_ > kMaxYamlNodes) {
      yaml_fail(node.Mark(), "document has more than " + std::to_string(kMaxYamlNodes) +
                                 " nodes (after expanding aliases)");
    }
    if (depth > kMaxYamlDepth) {
      yaml_fail(node.Mark(), "nesting deeper than " + std::to_string(kMaxYamlDepth) + " levels");
    }
    switch (node.Type()) {
      case YAML::NodeType::Undefined:
      case YAML::NodeType::Null:
        return nullptr;
      case YAML::NodeType::Scalar:
        return scalar(node);
      case YAML::NodeType::Sequence: {
        json out = json::array();
        for (const YAML::Node& item : node) out.push_back(convert(item, depth + 1));
        return out;
      }
      case YAML::NodeType::Map: {
        json out = json::object();
        for (const auto& entry : node) {
          const YAML::Node& key = entry.first;
          if (!key.IsScalar()) yaml_fail(key.Mark(), "mapping keys must be non-null scalars");
          const std::string& name = key.Scalar();
          if (key.Tag() == "?" && name != "<<") {
            if (auto why = yaml11_difference(name)) yaml_fail(key.Mark(), "key " + *why);
          }
          if (name == "<<" && key.Tag() == "?") {
            yaml_fail(key.Mark(), "merge keys (<<) merge a mapping in YAML 1.1 (kubectl) but are "
                                  "a plain key in YAML 1.2; write the fields out");
          }
          if (out.contains(name)) {
            yaml_fail(key.Mark(), decode::duplicate_key(name) +
                                      " (kubectl would keep the last one); write each key once");
          }
          out[name] = convert(entry.second, depth + 1);
        }
        return out;
      }
    }
    return nullptr;
  }

 private:
  static json scalar(const YAML::Node& node) {
    const std::string& tag = node.Tag();
    const std::string& text = node.Scalar();
    // yaml-cpp tags plain scalars "?" and quoted or block scalars "!".
    if (tag == "?" || tag.empty()) {
      if (auto why = yaml11_difference(text)) yaml_fail(node.Mark(), *why);
      return resolve_plain(text);
    }
    if (tag == "!" || tag == "tag:yaml.org,2002:str") return text;
    if (tag == "tag:yaml.org,2002:int") {
      if (auto v = resolve_int(text)) return *v;
      yaml_fail(node.Mark(), "!!int value " + quote(text) + " is not an integer");
    }
    if (tag == "tag:yaml.org,2002:float") {
      if (auto v = resolve_float(text)) return *v;
      if (auto v = resolve_int(text)) return v->get<double>();
      yaml_fail(node.Mark(), "!!float value " + quote(text) + " is not a number");
    }
    if (tag == "tag:yaml.org,2002:bool") {
      if (auto v = resolve_bool(text)) return *v;
      yaml_fail(node.Mark(), "!!bool value " + quote(text) + " is not true or false");
    }
    if (tag == "tag:yaml.org,2002:null") {
      if (is_null_text(text)) return nullptr;
      yaml_fail(node.Mark(), "!!null value " + quote(text) + " is not null");
    }
    yaml_fail(node.Mark(), "unsupported tag " + quote(tag));
  }

  std::size_t nodes_ = 0;
};

// ---- JSON -> JobSpec -------------------------------------------------------

// A copy without the object fields that are null, at any depth: the API server
// drops them before it stores an object, so the pods never see them either.
json without_nulls(const json& v) {
  if (v.is_object()) {
    json out = json::object();
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!it->is_null()) out[it.key()] = without_nulls(*it);
    }
    return out;
  }
  if (v.is_array()) {
    json out = json::array();
    for (const json& item : v) out.push_back(without_nulls(item));
    return out;
  }
  return v;
}

// The CRD's patterns, each compiled once and matched whole (each is anchored),
// after the length check that keeps std::regex's recursion short.

// A Kubernetes resource quantity (500m, 2, 1.5Gi, 1e3), as the CRD's pattern.
bool is_quantity(const std::string& s) {
  static const std::regex re(R"(^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$)");
  return std::regex_match(s, re);
}

// spec.model.package.url, by hand (no std::regex recursion on 2048 characters), the
// same language as the CRD's rule
//   ^https?://[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?/([-A-Za-z0-9._~%!$&'()*+,;=:@]+/)*$
// a host name or IPv4 address, an optional port, and a path of non-empty segments
// each ending in '/' (no user part, query or fragment: the file name is appended).
bool valid_package_url(const std::string& s) {
  auto alnum = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) != 0; };
  std::size_t i = 0;
  if (s.rfind("https://", 0) == 0) {
    i = 8;
  } else if (s.rfind("http://", 0) == 0) {
    i = 7;
  } else {
    return false;
  }
  const std::size_t host = i;
  while (i < s.size() && (alnum(s[i]) || s[i] == '-' || s[i] == '.')) ++i;
  if (i == host || !alnum(s[host]) || !alnum(s[i - 1])) return false;
  if (i < s.size() && s[i] == ':') {
    const std::size_t port = ++i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])) != 0) ++i;
    if (i == port || i - port > 5) return false;
  }
  if (i >= s.size() || s[i] != '/') return false;
  ++i;
  static const std::string path_chars = "-._~%!$&'()*+,;=:@";
  bool in_segment = false;
  for (; i < s.size(); ++i) {
    if (s[i] == '/') {
      if (!in_segment) return false;  // an empty segment ("//")
      in_segment = false;
    } else if (alnum(s[i]) || path_chars.find(s[i]) != std::string::npos) {
      in_segment = true;
    } else {
      return false;
    }
  }
  return !in_segment;  // ends with '/'
}

// A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63.
bool is_label_key(const std::string& s) {
  static const std::regex re(R"(^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$)");
  return std::regex_match(s, re);
}

bool is_label_value(const std::string& s) {
  static const std::regex re(R"(^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$)");
  return std::regex_match(s, re);
}

// Reads one object into the typed spec, collecting every problem instead of
// stopping at the first. A null or absent field keeps its default.
class Decoder : public decode::Reader {
 public:
  Decoder() : Reader(Rules{/*null_is_absent=*/true, /*whole_floats_are_integers=*/true}) {}

  using Reader::object;
  using Reader::boolean;

  // obj[key] when it is an object; reports a type error otherwise.
  const json* object(const json& obj, const char* key, const std::string& parent) {
    return object(find(obj, key), child(parent, key));
  }

  void get(const json& obj, const char* key, const std::string& parent, std::string& out) {
    if (auto v = string(find(obj, key), child(parent, key))) out = std::move(*v);
  }

  void get(const json& obj, const char* key, const std::string& parent, bool& out) {
    if (auto v = boolean(find(obj, key), child(parent, key))) out = *v;
  }

  void get(const json& obj, const char* key, const std::string& parent, double& out) {
    if (auto v = number(find(obj, key), child(parent, key))) out = *v;
  }

  template <class T>
  void get(const json& obj, const char* key, const std::string& parent, T& out) {
    static_assert(std::is_integral_v<T>);
    if (auto v = integer<T>(find(obj, key), child(parent, key))) out = *v;
  }

  template <class T>
  void get(const json& obj, const char* key, const std::string& parent, std::optional<T>& out) {
    if (auto v = integer<T>(find(obj, key), child(parent, key))) out = *v;
  }

  // ---- the schema of the objects passed on to the pods as given ----
  // (spec.template, spec.sidecar, spec.checkpoint.volume, metadata.labels): the
  // same types, enums and bounds as the CRD, so that a file shardctl runs is one
  // the API server takes.

  // A string of min..max bytes; an empty `pattern_check` accepts any text.
  void bounded_string(const json& obj, const char* key, const std::string& parent,
                      std::size_t min, std::size_t max, bool (*valid)(const std::string&) = nullptr,
                      const char* what = nullptr) {
    const json* v = find(obj, key);
    if (v == nullptr) return;
    const std::string path = child(parent, key);
    if (!v->is_string()) return fail(path, decode::wrong_type("a string", *v));
    length_and_syntax(path, v->get_ref<const std::string&>(), min, max, valid, what);
  }

  void length_and_syntax(const std::string& path, const std::string& text, std::size_t min,
                         std::size_t max, bool (*valid)(const std::string&), const char* what) {
    if (text.size() < min) return fail(path, decode::empty_string());
    if (text.size() > max) return fail(path, decode::too_long(max, text.size()));
    if (valid != nullptr && !valid(text)) fail(path, std::string("must be ") + what + ", got " + quote(text));
  }

  void enum_string(const json& obj, const char* key, const std::string& parent,
                   std::initializer_list<const char*> allowed) {
    const std::string path = child(parent, key);
    if (auto v = string(find(obj, key), path)) one_of(path, *v, "value", allowed);
  }

  void boolean(const json& obj, const char* key, const std::string& parent) {
    bool ignored = false;
    get(obj, key, parent, ignored);
  }

  // A map of at most max_entries entries, each checked by `entry(path, value)`.
  template <class F>
  const json* map_of(const json& obj, const char* key, const std::string& parent,
                     std::size_t max_entries, F entry) {
    const json* m = object(obj, key, parent);
    if (m == nullptr) return nullptr;
    const std::string path = child(parent, key);
    if (m->size() > max_entries) {
      fail(path, decode::too_many(max_entries, m->size()));
    }
    for (auto it = m->begin(); it != m->end(); ++it) {
      if (it->is_null()) continue;  // the API server drops null values
      entry(path + "." + it.key(), it.key(), *it);
    }
    return m;
  }

  // A node selector: label key → label value, at most max_entries, into *out.
  void label_map(const json& obj, const char* key, const std::string& parent, std::size_t max_entries,
                 std::map<std::string, std::string>& out) {
    map_of(obj, key, parent, max_entries, [&](const std::string& path, const std::string& k, const json& v) {
      length_and_syntax(path, k, 1, 317, &is_label_key,
                        "a label key ([prefix/]name, the name at most 63 letters, digits, '-', "
                        "'_' or '.', starting and ending with a letter or digit) for its key");
      if (!v.is_string()) return fail(path, decode::wrong_type("a string", v));
      length_and_syntax(path, v.get_ref<const std::string&>(), 0, 63, &is_label_value,
                        "a label value (letters, digits, '-', '_' and '.', starting and ending "
                        "with a letter or digit)");
      out[k] = v.get<std::string>();
    });
  }

  // limits / requests: resource name → quantity (an integer or a quantity string).
  void resources(const json& obj, const char* key, const std::string& parent) {
    const json* r = object(obj, key, parent);
    if (r == nullptr) return;
    const std::string path = child(parent, key);
    known_fields(*r, path, {"limits", "requests"});
    for (const char* k : {"limits", "requests"}) {
      map_of(*r, k, path, 16, [&](const std::string& p, const std::string&, const json& v) {
        if (v.is_string()) {
          length_and_syntax(p, v.get_ref<const std::string&>(), 0, 64, &is_quantity,
                            "a quantity such as 500m, 2, 1.5Gi or 1e3");
        } else if (!v.is_number_integer() && !v.is_number_unsigned()) {
          fail(p, decode::wrong_type("an integer or a quantity string", v));
        }
      });
    }
  }

  // Checks spec.template; returns it when it is an object (to keep as given).
  const json* decode_template(const json& spec) {
    const json* t = object(spec, "template", "spec");
    if (t == nullptr) return nullptr;
    const std::string p = "spec.template";
    known_fields(*t, p, {"image", "imagePullPolicy", "resources", "nodeSelector", "tolerations"});
    bounded_string(*t, "image", p, 1, 512);
    enum_string(*t, "imagePullPolicy", p, {"Always", "IfNotPresent", "Never"});
    resources(*t, "resources", p);
    std::map<std::string, std::string> ignored;
    label_map(*t, "nodeSelector", p, 64, ignored);
    if (const json* tol = find(*t, "tolerations")) {
      const std::string tp = p + ".tolerations";
      if (array(tol, tp, "tolerations") == nullptr) return t;
      if (tol->size() > 32) fail(tp, decode::too_many(32, tol->size()));
      for (std::size_t i = 0; i < tol->size(); ++i) {
        const std::string ip = tp + "[" + std::to_string(i) + "]";
        const json& item = (*tol)[i];
        if (object(&item, ip) == nullptr) continue;
        known_fields(item, ip, {"key", "operator", "value", "effect", "tolerationSeconds"});
        bounded_string(item, "key", ip, 0, 317);
        enum_string(item, "operator", ip, {"Exists", "Equal"});
        bounded_string(item, "value", ip, 0, 63);
        enum_string(item, "effect", ip, {"", "NoSchedule", "PreferNoSchedule", "NoExecute"});
        std::optional<int64_t> seconds;
        get(item, "tolerationSeconds", ip, seconds);
      }
    }
    return t;
  }

  const json* decode_sidecar(const json& spec) {
    const json* sc = object(spec, "sidecar", "spec");
    if (sc == nullptr) return nullptr;
    const std::string p = "spec.sidecar";
    known_fields(*sc, p, {"image", "resources"});
    bounded_string(*sc, "image", p, 1, 512);
    resources(*sc, "resources", p);
    return sc;
  }

  // Exactly one volume source of those the CRD declares: emptyDir, persistentVolumeClaim
  // or nfs (the package volume: no emptyDir, which would hold nothing).
  const json* decode_volume(const json& parent, const std::string& parent_path, bool empty_dir = true) {
    const json* v = object(parent, "volume", parent_path);
    if (v == nullptr) return nullptr;
    const std::string p = parent_path + ".volume";
    if (empty_dir) {
      known_fields(*v, p, {"emptyDir", "persistentVolumeClaim", "nfs"});
    } else {
      known_fields(*v, p, {"persistentVolumeClaim", "nfs"});
    }
    if (v->size() != 1) {
      fail(p, std::string("must have exactly one volume source (") +
                  (empty_dir ? "emptyDir, persistentVolumeClaim or nfs" : "persistentVolumeClaim or nfs") +
                  "), got " + std::to_string(v->size()));
    }
    if (const json* e = object(*v, "emptyDir", p)) {
      const std::string ep = p + ".emptyDir";
      known_fields(*e, ep, {"medium", "sizeLimit"});
      enum_string(*e, "medium", ep, {"", "Memory"});
      if (const json* size = find(*e, "sizeLimit")) {
        if (size->is_string()) {
          length_and_syntax(ep + ".sizeLimit", size->get_ref<const std::string&>(), 0, 64,
                            &is_quantity, "a quantity such as 1Gi");
        } else if (!size->is_number_integer() && !size->is_number_unsigned()) {
          fail(ep + ".sizeLimit", decode::wrong_type("an integer or a quantity string", *size));
        }
      }
    }
    if (const json* c = object(*v, "persistentVolumeClaim", p)) {
      const std::string cp = p + ".persistentVolumeClaim";
      known_fields(*c, cp, {"claimName", "readOnly"});
      require(*c, cp, "claimName");
      bounded_string(*c, "claimName", cp, 1, 253);
      boolean(*c, "readOnly", cp);
    }
    if (const json* n = object(*v, "nfs", p)) {
      const std::string np = p + ".nfs";
      known_fields(*n, np, {"server", "path", "readOnly"});
      require(*n, np, "server");
      require(*n, np, "path");
      bounded_string(*n, "server", np, 1, 253);
      bounded_string(*n, "path", np, 1, 1024, is_absolute_path_without_dotdot, kSafePathText);
      boolean(*n, "readOnly", np);
    }
    return v;
  }

  // metadata.labels and metadata.annotations, as the API server checks any object's.
  void decode_labels(const json& metadata) {
    map_of(metadata, "labels", "metadata", std::numeric_limits<std::size_t>::max(),
           [&](const std::string& path, const std::string& k, const json& v) {
             length_and_syntax(path, k, 1, 317, &is_label_key,
                               "a label key ([prefix/]name) for its key");
             if (!v.is_string()) return fail(path, decode::wrong_type("a string", v));
             length_and_syntax(path, v.get_ref<const std::string&>(), 0, 63, &is_label_value,
                               "a label value (letters, digits, '-', '_' and '.', starting and "
                               "ending with a letter or digit)");
           });
    std::size_t total = 0;
    const json* a = map_of(metadata, "annotations", "metadata", std::numeric_limits<std::size_t>::max(),
                           [&](const std::string& path, const std::string& k, const json& v) {
                             length_and_syntax(path, k, 1, 317, &is_label_key,
                                               "an annotation key ([prefix/]name) for its key");
                             if (!v.is_string()) return fail(path, decode::wrong_type("a string", v));
                             total += k.size() + v.get_ref<const std::string&>().size();
                           });
    constexpr std::size_t kMaxAnnotationBytes = 256 * 1024;
    if (a != nullptr && total > kMaxAnnotationBytes) {
      fail("metadata.annotations", "must have at most " + std::to_string(kMaxAnnotationBytes) +
                                       " bytes in all, got " + std::to_string(total));
    }
  }

  // A set of integers (x-kubernetes-list-type: set): a repeated value is refused.
  void get(const json& obj, const char* key, const std::string& parent, std::set<int>& out) {
    const std::string path = child(parent, key);
    const json* v = array(find(obj, key), path, "integers");
    if (v == nullptr) return;
    out.clear();
    std::map<int, std::size_t> first;  // value -> its index
    for (std::size_t i = 0; i < v->size(); ++i) {
      const auto item = integer<int>(&(*v)[i], decode::at(path, i));
      if (!item) continue;
      if (const auto [it, added] = first.emplace(*item, i); !added) {
        fail(decode::at(path, i), decode::duplicate(std::to_string(*item), decode::at(path, it->second)));
      }
      out.insert(*item);
    }
  }

  void get(const json& obj, const char* key, const std::string& parent,
           std::vector<std::string>& out) {
    const std::string path = child(parent, key);
    const json* v = array(find(obj, key), path, "strings");
    if (v == nullptr) return;
    out.clear();
    for (std::size_t i = 0; i < v->size(); ++i) {
      if (auto item = string(&(*v)[i], decode::at(path, i))) out.push_back(std::move(*item));
    }
  }
};

void decode_metadata(Decoder& d, const json& root, JobSpec& job) {
  const json* metadata = d.object(root, "metadata", "");
  if (metadata == nullptr) {
    if (d.find(root, "metadata") == nullptr) d.fail("metadata", decode::required());
    return;
  }
  // Other metadata (labels, annotations, uid, resourceVersion, ...) belongs to
  // the API server and is passed over.
  d.get(*metadata, "name", "metadata", job.name);
  d.get(*metadata, "namespace", "metadata", job.namespace_);
  d.decode_labels(*metadata);
}

void decode_spec(Decoder& d, const json& spec, JobSpec& job) {
  d.known_fields(spec, "spec",
                 {"model", "dataset", "training", "sharding", "protection", "checkpoint",
                  "template", "sidecar", "runPolicy"});

  if (const json* m = d.object(spec, "model", "spec")) {
    const std::string p = "spec.model";
    d.known_fields(*m, p,
                   {"architecture", "hidden", "depth", "channels", "heads", "patchSize", "vocab", "context", "package"});
    d.get(*m, "architecture", p, job.model.architecture);
    d.get(*m, "hidden", p, job.model.hidden);
    d.get(*m, "depth", p, job.model.depth);
    d.get(*m, "channels", p, job.model.channels);
    d.get(*m, "heads", p, job.model.heads);
    d.get(*m, "patchSize", p, job.model.patch_size);
    d.get(*m, "vocab", p, job.model.vocab);
    d.get(*m, "context", p, job.model.context);
    if (const json* pk = d.object(*m, "package", p)) {
      const std::string pp = p + ".package";
      PackageSpec package;
      d.known_fields(*pk, pp, {"path", "url", "volume", "keysSecret"});
      d.require(*pk, pp, "keysSecret");  // the operator needs it; shardctl run reads the keys locally
      d.get(*pk, "path", pp, package.path);
      d.get(*pk, "url", pp, package.url);
      d.get(*pk, "keysSecret", pp, package.keys_secret);
      if (const json* v = d.decode_volume(*pk, pp, false)) package.volume = without_nulls(*v);
      job.model.package = std::move(package);
    }
  }

  if (const json* m = d.object(spec, "dataset", "spec")) {
    const std::string p = "spec.dataset";
    d.known_fields(*m, p, {"name", "format", "path", "maxTrainSamples", "maxTestSamples"});
    d.get(*m, "name", p, job.dataset.name);
    d.get(*m, "format", p, job.dataset.format);
    d.get(*m, "path", p, job.dataset.path);
    d.get(*m, "maxTrainSamples", p, job.dataset.max_train_samples);
    d.get(*m, "maxTestSamples", p, job.dataset.max_test_samples);
  }

  if (const json* m = d.object(spec, "training", "spec")) {
    const std::string p = "spec.training";
    d.known_fields(*m, p,
                   {"epochs", "batchSize", "microBatches", "optimizer", "seed", "schedule",
                    "evalBatchSize"});
    d.get(*m, "epochs", p, job.training.epochs);
    d.get(*m, "batchSize", p, job.training.batch_size);
    d.get(*m, "microBatches", p, job.training.micro_batches);
    if (const json* o = d.object(*m, "optimizer", p)) {
      const std::string op = "spec.training.optimizer";
      d.known_fields(*o, op, {"name", "learningRate", "momentum", "weightDecay", "warmupSteps", "decay"});
      d.get(*o, "name", op, job.training.optimizer.name);
      d.get(*o, "learningRate", op, job.training.optimizer.learning_rate);
      d.get(*o, "momentum", op, job.training.optimizer.momentum);
      d.get(*o, "weightDecay", op, job.training.optimizer.weight_decay);
      d.get(*o, "warmupSteps", op, job.training.optimizer.warmup_steps);
      d.get(*o, "decay", op, job.training.optimizer.decay);
    }
    // An int64 in the CRD (and to every Kubernetes client), kept as uint64 here.
    int64_t seed = static_cast<int64_t>(job.training.seed);
    d.get(*m, "seed", p, seed);
    if (seed < 0) {
      d.at_least(p + ".seed", seed, 0);
    } else {
      job.training.seed = static_cast<uint64_t>(seed);
    }
    d.get(*m, "schedule", p, job.training.schedule);
    d.get(*m, "evalBatchSize", p, job.training.eval_batch_size);
  }

  if (const json* m = d.object(spec, "sharding", "spec")) {
    const std::string p = "spec.sharding";
    d.known_fields(*m, p, {"shards", "balance", "replicas"});
    d.get(*m, "shards", p, job.sharding.shards);
    d.get(*m, "replicas", p, job.sharding.replicas);
    d.get(*m, "balance", p, job.sharding.balance);
  }

  if (const json* m = d.object(spec, "protection", "spec")) {
    const std::string p = "spec.protection";
    d.known_fields(*m, p, {"maxExposure", "topologyKey", "trustDomain", "export", "trustedStages",
                           "trustedNodeSelector"});
    d.get(*m, "maxExposure", p, job.protection.max_exposure);
    d.get(*m, "topologyKey", p, job.protection.topology_key);
    d.get(*m, "trustDomain", p, job.protection.trust_domain);
    d.get(*m, "trustedStages", p, job.protection.trusted_stages);
    d.label_map(*m, "trustedNodeSelector", p, 16, job.protection.trusted_node_selector);
    if (const json* e = d.object(*m, "export", p)) {
      const std::string ep = "spec.protection.export";
      d.known_fields(*e, ep, {"allowed", "principals"});
      d.get(*e, "allowed", ep, job.protection.export_.allowed);
      d.get(*e, "principals", ep, job.protection.export_.principals);
    }
  }

  if (const json* m = d.object(spec, "checkpoint", "spec")) {
    const std::string p = "spec.checkpoint";
    d.known_fields(*m, p, {"everySteps", "volume"});
    d.get(*m, "everySteps", p, job.checkpoint.every_steps);
    if (const json* v = d.decode_volume(*m, p)) job.checkpoint.volume = without_nulls(*v);
  }

  if (const json* t = d.decode_template(spec)) job.template_ = without_nulls(*t);
  if (const json* sc = d.decode_sidecar(spec)) job.sidecar = without_nulls(*sc);

  if (const json* m = d.object(spec, "runPolicy", "spec")) {
    const std::string p = "spec.runPolicy";
    d.known_fields(*m, p,
                   {"backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "suspend"});
    d.get(*m, "backoffLimit", p, job.run_policy.backoff_limit);
    d.get(*m, "activeDeadlineSeconds", p, job.run_policy.active_deadline_seconds);
    d.get(*m, "ttlSecondsAfterFinished", p, job.run_policy.ttl_seconds_after_finished);
    d.get(*m, "suspend", p, job.run_policy.suspend);
  }
}

// ---- validation ------------------------------------------------------------


bool is_dns_name(const std::string& s) {
  if (s.empty() || s.size() > kMaxDnsNameLength) return false;
  std::size_t start = 0;
  while (true) {
    const std::size_t dot = s.find('.', start);
    const std::string label = s.substr(start, dot == std::string::npos ? std::string::npos
                                                                       : dot - start);
    if (!is_dns_label(label)) return false;
    if (dot == std::string::npos) return true;
    start = dot + 1;
  }
}

using Checker = decode::Reader;

}  // namespace

bool is_package_url(const std::string& url) { return valid_package_url(url); }

json yaml_to_json(const std::string& yaml_text) {
  check_yaml_depth(yaml_text);
  YAML::Node root;
  try {
    // One object per text: kubectl apply would act on every document of a file,
    // shardctl on one job.
    std::vector<YAML::Node> docs = YAML::LoadAll(yaml_text);
    std::size_t used = 0;
    for (const YAML::Node& doc : docs) {
      if (doc.IsNull()) continue;
      if (++used == 1) {
        root = doc;
      } else {
        yaml_fail(doc.Mark(), "a second YAML document; a job file holds one object (kubectl "
                              "apply would act on each document), so split it into files");
      }
    }
  } catch (const YAML::ParserException& e) {
    yaml_fail(e.mark, e.msg);
  } catch (const YAML::Exception& e) {
    yaml_fail(e.mark, e.msg);
  }
  try {
    return YamlConverter().convert(root, 0);
  } catch (const YAML::Exception& e) {
    yaml_fail(e.mark, e.msg);
  }
}

std::vector<FieldError> validate(const JobSpec& job) {
  Checker c(Checker::Rules{});

  if (job.name.size() > kMaxJobNameLength) {
    c.fail("metadata.name", decode::too_long(kMaxJobNameLength, job.name.size()) +
                                " (pod names \"<name>-shard-<index>\" must fit in 63)");
  } else {
    c.dns_label("metadata.name", job.name, kMaxJobNameLength);
    if (job.sharding.replicas > 1 && job.name.size() > kMaxReplicatedJobNameLength) {
      c.fail("metadata.name", decode::too_long(kMaxReplicatedJobNameLength, job.name.size()) +
                                  " when spec.sharding.replicas > 1 (pod names \"<name>-shard-<index>-r<replica>\" "
                                  "must fit in 63)");
    }
  }
  c.dns_label("metadata.namespace", job.namespace_, kMaxLabelLength);

  // model
  const ModelSpec& m = job.model;
  c.one_of("spec.model.architecture", m.architecture, "architecture", {"mlp", "cnn", "vit", "gpt", "torchscript"});
  if (m.from_package() && !m.package) {
    c.fail("spec.model.package", "required for architecture torchscript (the blocks come from the packages "
                                 "`shardctl split` made, docs/distribution.md)");
  }
  if (m.package && !m.from_package() && !m.architecture.empty()) {
    c.fail("spec.model.package", "only for architecture torchscript, got architecture " +
                                     decode::quote(m.architecture) + " (a zoo model is built, not loaded)");
  }
  if (m.package) {
    const PackageSpec& pk = *m.package;
    if (pk.path.empty() == pk.url.empty()) {
      c.fail("spec.model.package", pk.path.empty() ? "must have exactly one of path and url, got neither"
                                                   : "must have exactly one of path and url, got both");
    }
    if (!pk.path.empty() && c.max_length("spec.model.package.path", pk.path, 1024) &&
        !is_absolute_path_without_dotdot(pk.path)) {
      c.fail("spec.model.package.path", std::string("must be ") + kSafePathText + ", got " + decode::quote(pk.path));
    }
    if (!pk.url.empty() && c.max_length("spec.model.package.url", pk.url, 2048) && !is_package_url(pk.url)) {
      c.fail("spec.model.package.url", std::string("must be ") + kPackageUrlText + ", got " + decode::quote(pk.url));
    }
    if (!pk.volume.empty() && pk.path.empty()) {
      c.fail("spec.model.package.volume", "only with spec.model.package.path (a url is fetched, not mounted)");
    }
    if (!is_dns_name(pk.keys_secret)) {
      c.fail("spec.model.package.keysSecret",
             "must be a Secret name (a DNS-1123 subdomain of at most 253 characters), got " +
                 decode::quote(pk.keys_secret));
    }
  }
  c.between("spec.model.hidden", m.hidden, 1, 4096);
  c.between("spec.model.depth", m.depth, 1, 64);
  c.between("spec.model.channels", m.channels, 1, 512);
  // Token ids are stored as uint16, so a vocabulary holds at most 65536 of them.
  c.between("spec.model.vocab", m.vocab, 2, 65536);
  c.between("spec.model.context", m.context, 1, 4096);
  if (m.architecture == "vit" || m.architecture == "gpt") {
    c.at_least("spec.model.heads", m.heads, 1);
    if (m.heads >= 1 && m.hidden >= 1 && m.hidden % m.heads != 0) {
      c.fail("spec.model.heads",
             "hidden " + std::to_string(m.hidden) + " is not divisible by heads " +
                 std::to_string(m.heads) + " (each head gets hidden / heads dimensions)");
    }
  }
  if (m.architecture == "vit") {
    constexpr int kPatchSizes[] = {1, 2, 4, 7, 14, 28};
    if (std::find(std::begin(kPatchSizes), std::end(kPatchSizes), m.patch_size) ==
        std::end(kPatchSizes)) {
      c.fail("spec.model.patchSize",
             "must divide the 28-pixel image side (one of: 1, 2, 4, 7, 14, 28), got " +
                 std::to_string(m.patch_size));
    }
  }

  // dataset
  const DatasetSpec& ds = job.dataset;
  c.not_empty("spec.dataset.name", ds.name);
  c.max_length("spec.dataset.name", ds.name, 63);
  if (c.one_of("spec.dataset.format", ds.format, "dataset format", {"fashion-mnist", "tokens", "tensors"}) &&
      !m.architecture.empty()) {
    // A language model reads token windows; the classifiers read images and labels,
    // as Fashion-MNIST's IDX files or as .npy tensors. A torchscript model's own
    // shapes are checked against the data (from its manifest) when its stages start.
    if (m.from_package()) {
      // (nothing to check here)
    } else if (m.language_model() && ds.format != "tokens") {
      c.fail("spec.dataset.format", "architecture " + m.architecture + " needs format tokens, got " +
                                        decode::quote(ds.format) + " (the data does not fit the model)");
    } else if (!m.language_model() && ds.format == "tokens") {
      c.fail("spec.dataset.format", "architecture " + m.architecture +
                                        " needs format fashion-mnist or tensors, got \"tokens\" (the data does not "
                                        "fit the model)");
    }
  }
  c.not_empty("spec.dataset.path", ds.path);
  if (c.max_length("spec.dataset.path", ds.path, 1024) && !ds.path.empty() &&
      !is_absolute_path_without_dotdot(ds.path)) {
    c.fail("spec.dataset.path", std::string("must be ") + kSafePathText + ", got " + decode::quote(ds.path));
  }
  c.at_least("spec.dataset.maxTrainSamples", ds.max_train_samples, 0);
  c.at_least("spec.dataset.maxTestSamples", ds.max_test_samples, 0);

  // training
  const TrainingSpec& t = job.training;
  c.between("spec.training.epochs", t.epochs, 1, 1000);
  c.between("spec.training.batchSize", t.batch_size, 1, 65536);
  if (t.micro_batches < 1) {
    c.at_least("spec.training.microBatches", t.micro_batches, 1);
  } else if (t.batch_size >= 1 && t.micro_batches > t.batch_size) {
    c.fail("spec.training.microBatches", "must be at most batchSize (" +
                                             std::to_string(t.batch_size) + "), got " +
                                             std::to_string(t.micro_batches));
  } else if (t.batch_size >= 1 && t.batch_size % t.micro_batches != 0) {
    c.fail("spec.training.microBatches",
           "batchSize " + std::to_string(t.batch_size) + " is not divisible by microBatches " +
               std::to_string(t.micro_batches));
  }
  const OptimizerSpec& o = t.optimizer;
  c.one_of("spec.training.optimizer.name", o.name, "optimizer", {"sgd", "adam"});
  if (!(o.learning_rate > 0)) {
    c.fail("spec.training.optimizer.learningRate",
           "must be greater than 0, got " + format_double(o.learning_rate));
  } else if (o.learning_rate > 10) {
    c.fail("spec.training.optimizer.learningRate",
           "must be at most 10, got " + format_double(o.learning_rate));
  }
  if (!(o.momentum >= 0 && o.momentum < 1)) {
    c.fail("spec.training.optimizer.momentum",
           "must be in [0, 1), got " + format_double(o.momentum));
  }
  if (!(o.weight_decay >= 0) || std::isinf(o.weight_decay)) {
    c.fail("spec.training.optimizer.weightDecay",
           "must be a finite number of at least 0, got " + format_double(o.weight_decay));
  }
  c.between("spec.training.optimizer.warmupSteps", o.warmup_steps, 0, 1000000);
  c.one_of("spec.training.optimizer.decay", o.decay, "learning-rate decay", {"constant", "cosine"});
  c.one_of("spec.training.schedule", t.schedule, "schedule", {"1f1b", "gpipe"});
  c.at_least("spec.training.evalBatchSize", t.eval_batch_size, 1);

  // sharding
  c.between("spec.sharding.shards", job.sharding.shards, 1, 64);
  c.one_of("spec.sharding.balance", job.sharding.balance, "balance", {"parameters", "compute"});
  c.between("spec.sharding.replicas", job.sharding.replicas, 1, kMaxReplicas);

  // protection
  const ProtectionSpec& p = job.protection;
  if (!(p.max_exposure > 0 && p.max_exposure <= 1)) {
    c.fail("spec.protection.maxExposure",
           "must be in (0, 1], got " + format_double(p.max_exposure));
  }
  c.not_empty("spec.protection.topologyKey", p.topology_key);
  if (!p.topology_key.empty() && c.max_length("spec.protection.topologyKey", p.topology_key, 317) &&
      !is_label_key(p.topology_key)) {
    c.fail("spec.protection.topologyKey",
           "must be a label key ([prefix/]name, e.g. kubernetes.io/hostname), got " +
               quote(p.topology_key));
  }
  if (!is_dns_name(p.trust_domain)) {
    c.fail("spec.protection.trustDomain",
           "must be a lower-case DNS name (e.g. shardguard.local), got " + quote(p.trust_domain));
  }
  if (p.export_.allowed && p.export_.principals.empty()) {
    c.fail("spec.protection.export.principals",
           decode::none_listed("principal when export.allowed is true"));
  }
  constexpr std::size_t kMaxPrincipals = 16;
  if (p.export_.principals.size() > kMaxPrincipals) {
    c.fail("spec.protection.export.principals",
           decode::too_many(kMaxPrincipals, p.export_.principals.size()));
  }
  for (std::size_t i = 0; i < p.export_.principals.size(); ++i) {
    const std::string& principal = p.export_.principals[i];
    const std::string path = decode::at("spec.protection.export.principals", i);
    const auto first = std::find(p.export_.principals.begin(), p.export_.principals.begin() + i, principal);
    if (first != p.export_.principals.begin() + i) {
      c.fail(path, decode::duplicate(principal,
                                     decode::at("spec.protection.export.principals",
                                                static_cast<std::size_t>(first - p.export_.principals.begin()))));
      continue;
    }
    if (!c.max_length(path, principal, kMaxSpiffeIdBytes)) continue;
    // The one SPIFFE ID check (pki.h), the one the leaf certificates are issued under.
    c.spiffe_id(path, principal);
  }

  for (int stage : p.trusted_stages) {
    if (stage < 0 || stage >= job.sharding.shards) {
      c.fail("spec.protection.trustedStages",
             "stage " + std::to_string(stage) + " is not a stage of the job's " +
                 std::to_string(job.sharding.shards) + " (0 to " + std::to_string(job.sharding.shards - 1) + ")");
    }
  }
  if (!p.trusted_stages.empty() && p.trusted_node_selector.empty()) {
    c.fail("spec.protection.trustedNodeSelector",
           "must name at least one node label when trustedStages is set: the trusted stages run only on the nodes "
           "it selects");
  }
  if (p.trusted_stages.empty() && !p.trusted_node_selector.empty()) {
    c.fail("spec.protection.trustedStages", "must list at least one stage when trustedNodeSelector is set");
  }
  if (job.template_.is_object() && job.template_.contains("nodeSelector") && job.template_["nodeSelector"].is_object()) {
    const json& ns = job.template_["nodeSelector"];
    for (const auto& [key, value] : p.trusted_node_selector) {
      if (ns.contains(key) && ns[key].is_string() && ns[key].get<std::string>() != value) {
        c.fail("spec.protection.trustedNodeSelector." + key,
               "must not contradict spec.template.nodeSelector (" + quote(ns[key].get<std::string>()) + " there, " +
                   quote(value) + " here): no node could take the trusted stages");
      }
    }
  }

  // checkpoint
  c.at_least("spec.checkpoint.everySteps", job.checkpoint.every_steps, 1);

  // runPolicy
  const RunPolicySpec& r = job.run_policy;
  c.between("spec.runPolicy.backoffLimit", r.backoff_limit, 0, 100);
  if (r.active_deadline_seconds) {
    c.at_least("spec.runPolicy.activeDeadlineSeconds", *r.active_deadline_seconds, 1);
  }
  if (r.ttl_seconds_after_finished) {
    c.at_least("spec.runPolicy.ttlSecondsAfterFinished", *r.ttl_seconds_after_finished,
                        0);
  }

  return std::move(c.errors);
}

JobSpec job_from_json(const json& object) {
  Decoder d;
  JobSpec job;
  if (!object.is_object()) {
    throw JobSpecError({FieldError{"<root>", decode::wrong_type("a ShardedTrainingJob object", object)}});
  }

  const json* api_version = d.find(object, "apiVersion");
  if (api_version == nullptr) {
    d.fail("apiVersion", decode::required() + " (must be \"" + kApiVersion + "\")");
  } else if (!api_version->is_string() || api_version->get<std::string>() != kApiVersion) {
    d.fail("apiVersion", std::string("must be \"") + kApiVersion + "\", " + got(*api_version));
  }
  const json* kind = d.find(object, "kind");
  if (kind == nullptr) {
    d.fail("kind", decode::required() + " (must be \"" + kKind + "\")");
  } else if (!kind->is_string() || kind->get<std::string>() != kKind) {
    d.fail("kind", std::string("must be \"") + kKind + "\", " + got(*kind));
  }

  d.known_fields(object, "", {"apiVersion", "kind", "metadata", "spec", "status"});
  decode_metadata(d, object, job);

  // status is written by the operator and never read back as input.
  if (const json* spec = d.object(object, "spec", "")) {
    decode_spec(d, *spec, job);
  } else if (d.find(object, "spec") == nullptr) {
    d.fail("spec", decode::required());
  }

  job.model.token_data = job.dataset.format == "tokens";
  std::vector<FieldError> errors = d.errors;
  for (FieldError& e : validate(job)) {
    if (!d.covers(e.path)) errors.push_back(std::move(e));
  }
  if (!errors.empty()) throw JobSpecError(std::move(errors));
  return job;
}

JobSpec load_job_file(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) {
    throw JobSpecError({FieldError{path, "cannot read job file: no such file"}});
  }
  if (std::filesystem::is_directory(status)) {
    throw JobSpecError({FieldError{path, "cannot read job file: is a directory"}});
  }
  // Bounded: a job is tens of kilobytes (the API server stores at most about 1.5 MiB
  // per object); /dev/zero or a wrong path to a dataset must not grow until bad_alloc.
  std::string text;
  try {
    text = read_file(path, kMaxJobFileBytes);
  } catch (const FileError& e) {
    throw JobSpecError({FieldError{path, std::string("cannot read job file: ") + e.what()}});
  }

  json object;
  try {
    object = yaml_to_json(text);
  } catch (const JobSpecError& e) {
    // Name the file rather than "<yaml>"; the message keeps line and column.
    std::vector<FieldError> errors = e.errors();
    for (FieldError& fe : errors) fe.path = path;
    throw JobSpecError(std::move(errors));
  }
  return job_from_json(object);
}

double learning_rate_at(const OptimizerSpec& o, int64_t step, int64_t total_steps) {
  double lr = o.learning_rate;
  if (o.warmup_steps > 0 && step < o.warmup_steps) {
    lr *= static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  }
  if (o.decay == "cosine" && step >= o.warmup_steps) {
    const int64_t span = total_steps - o.warmup_steps;
    const double p = span > 1 ? std::min(1.0, static_cast<double>(step - o.warmup_steps) / static_cast<double>(span - 1)) : 0.0;
    constexpr double kFloor = 0.1;  // the last step's rate, as a fraction of the peak
    lr *= kFloor + (1.0 - kFloor) * 0.5 * (1.0 + std::cos(M_PI * p));
  }
  return lr;
}

}  // namespace shardguard
