// The test Kubernetes API server: see kube_apiserver.h. One mutex guards the whole
// store (objects, indexes, event history, watchers); HTTP worker threads and direct
// calls go through the same operations under it, so both produce the same events.
#include "kube_apiserver.h"

#include "shardguard/common/httplib.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <strings.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>
#include <unordered_map>

#include "shardguard/common/pki.h"
#include "shardguard/common/strings.h"
#include "shardguard/common/time.h"

namespace shardguard::testing {

using json = nlohmann::json;

namespace {

using ObjPtr = std::shared_ptr<const json>;
using ObjKey = std::tuple<std::string, std::string, std::string>;  // group/plural, ns, name

// ---- small helpers -----------------------------------------------------------------

std::string now_rfc3339() { return format_rfc3339(std::chrono::system_clock::now()); }

// Kubernetes' HumanDuration (k8s.io/apimachinery/pkg/util/duration), as kubectl shows ages.
std::string human_duration(long long seconds) {
  char buf[64];
  if (seconds < -1) return "<invalid>";
  if (seconds < 0) return "0s";
  if (seconds < 120) {
    std::snprintf(buf, sizeof buf, "%llds", seconds);
    return buf;
  }
  long long minutes = seconds / 60;
  if (minutes < 10) {
    long long s = seconds % 60;
    if (s == 0) std::snprintf(buf, sizeof buf, "%lldm", minutes);
    else std::snprintf(buf, sizeof buf, "%lldm%llds", minutes, s);
    return buf;
  }
  if (minutes < 180) {
    std::snprintf(buf, sizeof buf, "%lldm", minutes);
    return buf;
  }
  long long hours = seconds / 3600;
  if (hours < 8) {
    long long m = minutes % 60;
    if (m == 0) std::snprintf(buf, sizeof buf, "%lldh", hours);
    else std::snprintf(buf, sizeof buf, "%lldh%lldm", hours, m);
  } else if (hours < 48) {
    std::snprintf(buf, sizeof buf, "%lldh", hours);
  } else if (hours < 24 * 8) {
    long long h = hours % 24;
    if (h == 0) std::snprintf(buf, sizeof buf, "%lldd", hours / 24);
    else std::snprintf(buf, sizeof buf, "%lldd%lldh", hours / 24, h);
  } else if (hours < 24 * 365 * 2) {
    std::snprintf(buf, sizeof buf, "%lldd", hours / 24);
  } else if (hours < 24 * 365 * 8) {
    long long dy = (hours / 24) % 365;
    if (dy == 0) std::snprintf(buf, sizeof buf, "%lldy", hours / 24 / 365);
    else std::snprintf(buf, sizeof buf, "%lldy%lldd", hours / 24 / 365, dy);
  } else {
    std::snprintf(buf, sizeof buf, "%lldy", hours / 24 / 365);
  }
  return buf;
}

std::string base64(const std::string& in) {
  std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

std::string reason_for(int code) {
  switch (code) {
    case 400: return "BadRequest";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "NotFound";
    case 405: return "MethodNotAllowed";
    case 406: return "NotAcceptable";
    case 409: return "Conflict";
    case 410: return "Expired";
    case 415: return "UnsupportedMediaType";
    case 422: return "Invalid";
    case 429: return "TooManyRequests";
    case 500: return "InternalError";
    case 503: return "ServiceUnavailable";
    case 504: return "Timeout";
    default: return code >= 500 ? "InternalError" : "BadRequest";
  }
}

json status_object(int code, const std::string& reason, const std::string& message,
                   const std::string& name = "", const std::string& group = "",
                   const std::string& kind = "") {
  json st = {{"kind", "Status"},     {"apiVersion", "v1"}, {"metadata", json::object()},
             {"status", "Failure"}, {"message", message}, {"reason", reason},
             {"code", code}};
  if (!name.empty() || !kind.empty()) {
    json d = json::object();
    if (!name.empty()) d["name"] = name;
    if (!group.empty()) d["group"] = group;
    if (!kind.empty()) d["kind"] = kind;
    st["details"] = d;
  }
  return st;
}

[[noreturn]] void fail(int code, const std::string& message, const std::string& name = "",
                       const std::string& group = "", const std::string& kind = "",
                       std::string reason = "") {
  if (reason.empty()) reason = reason_for(code);
  throw ApiError(code, reason, message, status_object(code, reason, message, name, group, kind));
}

// YAML → JSON with the usual plain-scalar typing (null, booleans, integers, floats).
json yaml_to_json(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined: return nullptr;
    case YAML::NodeType::Sequence: {
      json a = json::array();
      for (const auto& e : n) a.push_back(yaml_to_json(e));
      return a;
    }
    case YAML::NodeType::Map: {
      json o = json::object();
      for (const auto& kv : n) o[kv.first.as<std::string>()] = yaml_to_json(kv.second);
      return o;
    }
    case YAML::NodeType::Scalar: {
      const std::string s = n.Scalar();
      if (n.Tag() == "!") return s;  // quoted
      if (s == "null" || s == "~" || s.empty()) return s.empty() ? json("") : json(nullptr);
      if (s == "true" || s == "True") return true;
      if (s == "false" || s == "False") return false;
      try {
        size_t pos = 0;
        long long v = std::stoll(s, &pos, 10);
        if (pos == s.size()) return v;
      } catch (...) {
      }
      try {
        size_t pos = 0;
        double d = std::stod(s, &pos);
        if (pos == s.size() && s.find_first_of("0123456789") != std::string::npos) return d;
      } catch (...) {
      }
      return s;
    }
  }
  return nullptr;
}

json parse_body(const std::string& body, const std::string& content_type) {
  if (content_type.find("protobuf") != std::string::npos || content_type.find("cbor") != std::string::npos)
    fail(415, "the body of the request was in an unknown format - accepted media types include: "
              "application/json, application/yaml");
  if (trim(body).empty()) fail(400, "the request body is empty");
  try {
    return json::parse(body);
  } catch (const std::exception&) {
  }
  if (content_type.find("yaml") != std::string::npos) {
    try {
      return yaml_to_json(YAML::Load(body));
    } catch (const std::exception& e) {
      fail(400, std::string("the request body is not valid YAML: ") + e.what());
    }
  }
  fail(400, "the request body is not valid JSON");
}

// A dotted path ("metadata.name", "spec.nodeName") or simple JSONPath (".status.phase",
// ".spec.items[0].name") evaluated against obj; nullptr when absent.
const json* lookup_path(const json& obj, std::string path) {
  if (!path.empty() && path[0] == '{') path = path.substr(1, path.size() >= 2 ? path.size() - 2 : 0);
  if (!path.empty() && path[0] == '.') path = path.substr(1);
  const json* cur = &obj;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = path.find_first_of(".[", i);
    std::string key = path.substr(i, j == std::string::npos ? std::string::npos : j - i);
    if (!key.empty()) {
      if (!cur->is_object() || !cur->contains(key)) return nullptr;
      cur = &(*cur)[key];
    }
    if (j == std::string::npos) break;
    if (path[j] == '[') {
      size_t close = path.find(']', j);
      if (close == std::string::npos) return nullptr;
      std::string idx = path.substr(j + 1, close - j - 1);
      if (idx.empty() || idx.find_first_not_of("0123456789") != std::string::npos) return nullptr;
      size_t n = std::stoul(idx);
      if (!cur->is_array() || n >= cur->size()) return nullptr;
      cur = &(*cur)[n];
      i = close + 1;
      if (i < path.size() && path[i] == '.') ++i;
    } else {
      i = j + 1;
    }
  }
  return cur;
}

std::string scalar_string(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "";
  return v.dump();
}

// ---- selectors ----------------------------------------------------------------------

struct Requirement {
  std::string key;
  enum Op { eq, ne, in, notin, exists, not_exists } op = eq;
  std::set<std::string> values;
};

struct LabelSelector {
  std::vector<Requirement> reqs;
  bool matches(const json& obj) const {
    if (reqs.empty()) return true;
    static const json empty = json::object();
    const json* labels = lookup_path(obj, "metadata.labels");
    if (!labels || !labels->is_object()) labels = &empty;
    for (const auto& r : reqs) {
      auto it = labels->find(r.key);
      bool has = it != labels->end();
      std::string val = has ? scalar_string(*it) : "";
      switch (r.op) {
        case Requirement::eq:
        case Requirement::in:
          if (!has || !r.values.count(val)) return false;
          break;
        case Requirement::ne:
        case Requirement::notin:
          if (has && r.values.count(val)) return false;
          break;
        case Requirement::exists:
          if (!has) return false;
          break;
        case Requirement::not_exists:
          if (has) return false;
          break;
      }
    }
    return true;
  }
};

// Splits at commas outside parentheses.
std::vector<std::string> split_terms(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  int depth = 0;
  for (char c : s) {
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if (c == ',' && depth == 0) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

LabelSelector parse_label_selector(const std::string& text) {
  LabelSelector sel;
  if (trim(text).empty()) return sel;
  for (const std::string& raw : split_terms(text)) {
    std::string t = trim(raw);
    if (t.empty()) fail(400, "unable to parse requirement: empty term in label selector \"" + text + "\"");
    Requirement r;
    auto set_values = [&](const std::string& rest) {
      std::string v = trim(rest);
      if (v.size() < 2 || v.front() != '(' || v.back() != ')')
        fail(400, "unable to parse requirement: found '" + v + "', expected: '('");
      for (const auto& x : split(v.substr(1, v.size() - 2), ',')) r.values.insert(trim(x));
    };
    size_t p;
    if (t[0] == '!') {
      r.op = Requirement::not_exists;
      r.key = trim(t.substr(1));
    } else if ((p = t.find("!=")) != std::string::npos) {
      r.op = Requirement::ne;
      r.key = trim(t.substr(0, p));
      r.values.insert(trim(t.substr(p + 2)));
    } else if ((p = t.find("==")) != std::string::npos) {
      r.op = Requirement::eq;
      r.key = trim(t.substr(0, p));
      r.values.insert(trim(t.substr(p + 2)));
    } else if ((p = t.find('=')) != std::string::npos) {
      r.op = Requirement::eq;
      r.key = trim(t.substr(0, p));
      r.values.insert(trim(t.substr(p + 1)));
    } else if ((p = t.find(" notin ")) != std::string::npos) {
      r.op = Requirement::notin;
      r.key = trim(t.substr(0, p));
      set_values(t.substr(p + 7));
    } else if ((p = t.find(" in ")) != std::string::npos) {
      r.op = Requirement::in;
      r.key = trim(t.substr(0, p));
      set_values(t.substr(p + 4));
    } else {
      r.op = Requirement::exists;
      r.key = t;
    }
    if (r.key.empty() || r.key.find_first_of(" ()!=") != std::string::npos)
      fail(400, "unable to parse requirement: invalid label key in \"" + t + "\"");
    sel.reqs.push_back(std::move(r));
  }
  return sel;
}

struct FieldSelector {
  std::vector<std::tuple<std::string, bool, std::string>> reqs;  // path, equal?, value
  bool matches(const json& obj) const {
    for (const auto& [path, eq, value] : reqs) {
      const json* v = lookup_path(obj, path);
      std::string s = v ? scalar_string(*v) : "";
      if ((s == value) != eq) return false;
    }
    return true;
  }
};

FieldSelector parse_field_selector(const std::string& text) {
  FieldSelector sel;
  if (trim(text).empty()) return sel;
  for (const std::string& raw : split(text, ',')) {
    std::string t = trim(raw);
    size_t p;
    if ((p = t.find("!=")) != std::string::npos) {
      sel.reqs.emplace_back(trim(t.substr(0, p)), false, trim(t.substr(p + 2)));
    } else if ((p = t.find("==")) != std::string::npos) {
      sel.reqs.emplace_back(trim(t.substr(0, p)), true, trim(t.substr(p + 2)));
    } else if ((p = t.find('=')) != std::string::npos) {
      sel.reqs.emplace_back(trim(t.substr(0, p)), true, trim(t.substr(p + 1)));
    } else {
      fail(400, "invalid field selector: '" + t + "'");
    }
  }
  return sel;
}

// ---- CRD structural defaults --------------------------------------------------------

void apply_defaults(json& v, const json& schema) {
  if (!schema.is_object()) return;
  if (v.is_object()) {
    auto props = schema.find("properties");
    if (props != schema.end() && props->is_object()) {
      for (auto it = props->begin(); it != props->end(); ++it) {
        if (!v.contains(it.key()) && it->is_object() && it->contains("default"))
          v[it.key()] = (*it)["default"];
        if (v.contains(it.key())) apply_defaults(v[it.key()], *it);
      }
    }
    auto addl = schema.find("additionalProperties");
    if (addl != schema.end() && addl->is_object())
      for (auto& [k, child] : v.items()) apply_defaults(child, *addl);
  } else if (v.is_array()) {
    auto items = schema.find("items");
    if (items != schema.end() && items->is_object())
      for (auto& child : v) apply_defaults(child, *items);
  }
}

// ---- decoding as the real server does: nulls dropped, unknown fields pruned ---------

// What one create/update/patch request asked for and was told (HTTP requests only;
// direct calls run without one: unknown fields are pruned silently).
struct RequestContext {
  bool strict = false;               // ?fieldValidation=Strict: unknown fields are a 400
  std::vector<std::string> unknown;  // paths of the unknown fields pruned (299 warnings)
};
thread_local RequestContext* t_request = nullptr;

// ObjectMeta's fields: anything else under metadata is unknown.
const std::set<std::string>& object_meta_fields() {
  static const std::set<std::string> f = {
      "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
      "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
      "annotations", "ownerReferences", "finalizers", "managedFields"};
  return f;
}

// A JSON null in a typed object means "not set": object fields that are null go (at
// every depth), and a null label or annotation value becomes "" (map[string]string).
void drop_nulls(json& v) {
  if (v.is_object()) {
    for (auto it = v.begin(); it != v.end();) {
      if (it->is_null()) {
        it = v.erase(it);
      } else {
        drop_nulls(*it);
        ++it;
      }
    }
  } else if (v.is_array()) {
    for (auto& e : v) drop_nulls(e);
  }
}

void metadata_nulls_to_empty(json& md) {
  for (const char* m : {"labels", "annotations"}) {
    if (!md.contains(m) || !md[m].is_object()) continue;
    for (auto& [k, val] : md[m].items())
      if (val.is_null()) val = "";
  }
}

// Structural pruning of a custom resource below `schema`: fields the schema does not
// declare (and no x-kubernetes-preserve-unknown-fields keeps) are removed and their
// paths collected; null fields are removed unless the schema says nullable.
void prune(json& v, const json& schema, const std::string& path, std::vector<std::string>& unknown) {
  if (!schema.is_object()) return;
  const bool preserve = schema.value("x-kubernetes-preserve-unknown-fields", false);
  if (v.is_object()) {
    const json* props = schema.contains("properties") && schema["properties"].is_object() ? &schema["properties"] : nullptr;
    const json* addl = schema.contains("additionalProperties") && schema["additionalProperties"].is_object()
                           ? &schema["additionalProperties"] : nullptr;
    for (auto it = v.begin(); it != v.end();) {
      const std::string child_path = path.empty() ? it.key() : path + "." + it.key();
      const json* child = nullptr;
      if (props && props->contains(it.key())) child = &(*props)[it.key()];
      else if (addl) child = addl;
      if (!child) {
        if (preserve) {
          ++it;
          continue;
        }
        unknown.push_back(child_path);
        it = v.erase(it);
        continue;
      }
      if (it->is_null() && !child->value("nullable", false)) {
        it = v.erase(it);
        continue;
      }
      prune(*it, *child, child_path, unknown);
      ++it;
    }
  } else if (v.is_array() && schema.contains("items") && schema["items"].is_object()) {
    for (size_t i = 0; i < v.size(); ++i) prune(v[i], schema["items"], path + "[" + std::to_string(i) + "]", unknown);
  }
}

// The root of a custom resource: apiVersion and kind, metadata as ObjectMeta, the
// rest by the schema.
void prune_custom_resource(json& obj, const json& schema, std::vector<std::string>& unknown) {
  for (auto it = obj.begin(); it != obj.end();) {
    const std::string& k = it.key();
    if (k == "apiVersion" || k == "kind") {
      ++it;
    } else if (k == "metadata") {
      if (it->is_object()) {
        for (auto m = it->begin(); m != it->end();) {
          if (object_meta_fields().count(m.key())) {
            ++m;
          } else {
            unknown.push_back("metadata." + m.key());
            m = it->erase(m);
          }
        }
      }
      ++it;
    } else {
      const json* child = schema.contains("properties") && schema["properties"].is_object() &&
                                  schema["properties"].contains(k)
                              ? &schema["properties"][k] : nullptr;
      if (!child) {
        unknown.push_back(k);
        it = obj.erase(it);
        continue;
      }
      if (it->is_null() && !child->value("nullable", false)) {
        it = obj.erase(it);
        continue;
      }
      prune(*it, *child, k, unknown);
      ++it;
    }
  }
}

// ---- resource types -----------------------------------------------------------------

struct ResType {
  std::string group, version, plural, singular, kind, list_kind;
  bool namespaced = true;
  bool has_status = false;
  std::vector<std::string> short_names, categories;
  json printer_columns = json::array();  // CRD additionalPrinterColumns
  json schema;                           // CRD openAPIV3Schema (null for built-ins)
  std::string crd;                       // name of the defining CRD ("" = built-in)
  std::string storage_version;           // version objects are stored in

  std::string gp() const { return group + "/" + plural; }
  std::string api_version() const { return group.empty() ? version : group + "/" + version; }
  std::string qualified() const { return group.empty() ? plural : plural + "." + group; }
};

struct Event {
  uint64_t rv;
  std::string type;
  std::string gp, ns;
  ObjPtr obj, prev;
};

struct Watcher {
  std::string gp, ns, api_version;
  LabelSelector labels;
  FieldSelector fields;
  std::deque<std::pair<std::string, ObjPtr>> queue;
  bool closed = false;
  bool matches(const json& o) const { return labels.matches(o) && fields.matches(o); }
};

struct Fault {
  int count, code;
  std::string method, path;
};

uint64_t rv_of(const json& obj) {
  const json* v = lookup_path(obj, "metadata.resourceVersion");
  if (!v || !v->is_string()) return 0;
  try {
    return std::stoull(v->get<std::string>());
  } catch (...) {
    return 0;
  }
}

template <typename T>
struct OsslDel;
template <>
struct OsslDel<X509> {
  void operator()(X509* p) const { X509_free(p); }
};
template <>
struct OsslDel<EVP_PKEY> {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
template <>
struct OsslDel<BIO> {
  void operator()(BIO* p) const { BIO_free_all(p); }
};
template <typename T>
using Ossl = std::unique_ptr<T, OsslDel<T>>;

void ossl_check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("test apiserver: OpenSSL failed: ") + what);
}

void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  ossl_check(ext != nullptr, "X509V3_EXT_conf_nid");
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}



// One routed watch: a pump thread reads the upstream stream into `buf`; the HTTP
// worker that serves the client writes it out. `closed` ends both.
struct ProxyStream {
  std::mutex mu;
  std::condition_variable cv;
  std::string buf;
  bool got_headers = false, done = false, closed = false;
  int status = 0;
  std::string content_type, error;
  httplib::Headers warnings;
  std::unique_ptr<httplib::SSLClient> cli;
  std::thread pump;
};


}  // namespace

// =====================================================================================

struct KubeApiServer::Impl {
  Options opt;
  std::string ca_pem;
  Ossl<X509> cert;
  Ossl<EVP_PKEY> key;
  std::unique_ptr<httplib::SSLServer> svr;
  std::thread listener;
  int port = 0;

  mutable std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;
  uint64_t rv = 1;
  std::map<std::string, ResType> types;     // "group/version/plural" → type
  std::map<std::string, std::string> gp_version;  // "group/plural" → storage "group/version/plural"
  std::map<std::string, std::map<std::pair<std::string, std::string>, ObjPtr>> store;  // gp → (ns,name)
  std::unordered_map<std::string, ObjKey> by_uid;
  std::unordered_map<std::string, std::set<ObjKey>> dependents;  // owner uid → objects naming it
  std::deque<Event> history;
  uint64_t history_floor = 0;  // every event with rv > history_floor is in history
  std::set<std::shared_ptr<Watcher>> watchers;
  std::mt19937_64 rng{std::random_device{}()};

  mutable std::mutex fmu;  // faults, latency, request log
  std::vector<Fault> faults;
  std::chrono::milliseconds latency{0};
  std::vector<RequestRecord> log;
  std::atomic<size_t> open_watch_count{0};

  std::mutex pmu;  // routed watches and idle upstream clients
  std::set<std::shared_ptr<ProxyStream>> proxied;
  std::map<size_t, std::vector<std::unique_ptr<httplib::SSLClient>>> idle_upstream;  // route index → clients
  const bool log_to_stderr = std::getenv("SHARDGUARD_APISERVER_LOG") != nullptr;  // debugging aid

  // ---- types ----------------------------------------------------------------------

  void add_type(ResType t) {
    if (t.singular.empty()) {
      t.singular = t.kind;
      std::transform(t.singular.begin(), t.singular.end(), t.singular.begin(), ::tolower);
    }
    if (t.list_kind.empty()) t.list_kind = t.kind + "List";
    if (t.storage_version.empty()) t.storage_version = t.version;
    std::string key = t.group + "/" + t.version + "/" + t.plural;
    if (t.version == t.storage_version) gp_version[t.gp()] = key;
    store[t.gp()];
    types[key] = std::move(t);
  }

  void add_builtins() {
    auto core = [&](const char* plural, const char* kind, bool namespaced, bool status,
                    std::vector<std::string> shorts, std::vector<std::string> cats = {}) {
      ResType t;
      t.version = "v1";
      t.plural = plural;
      t.kind = kind;
      t.namespaced = namespaced;
      t.has_status = status;
      t.short_names = std::move(shorts);
      t.categories = std::move(cats);
      add_type(std::move(t));
    };
    core("pods", "Pod", true, true, {"po"}, {"all"});
    core("secrets", "Secret", true, false, {});
    core("configmaps", "ConfigMap", true, false, {"cm"});
    core("services", "Service", true, true, {"svc"}, {"all"});
    core("events", "Event", true, false, {"ev"});
    core("nodes", "Node", false, true, {"no"});
    core("namespaces", "Namespace", false, true, {"ns"});
    ResType lease;
    lease.group = "coordination.k8s.io";
    lease.version = "v1";
    lease.plural = "leases";
    lease.kind = "Lease";
    add_type(lease);
    ResType crd;
    crd.group = "apiextensions.k8s.io";
    crd.version = "v1";
    crd.plural = "customresourcedefinitions";
    crd.kind = "CustomResourceDefinition";
    crd.namespaced = false;
    crd.has_status = true;
    crd.short_names = {"crd", "crds"};
    crd.categories = {"api-extensions"};
    add_type(crd);
  }

  const ResType* find_type(const std::string& group, const std::string& version,
                           const std::string& plural) const {
    auto it = types.find(group + "/" + version + "/" + plural);
    return it == types.end() ? nullptr : &it->second;
  }

  const ResType& require_type(const std::string& group, const std::string& version,
                              const std::string& plural) const {
    const ResType* t = find_type(group, version, plural);
    if (!t) fail(404, "the server could not find the requested resource");
    return *t;
  }

  const ResType* storage_type(const std::string& gp) const {
    auto it = gp_version.find(gp);
    if (it == gp_version.end()) return nullptr;
    return &types.at(it->second);
  }

  // Registers (or re-registers) the resource a CRD defines; returns false when the CRD
  // does not describe one.
  void register_crd(const json& crd) {
    unregister_crd(crd["metadata"].value("name", ""), false);
    const json& spec = crd.value("spec", json::object());
    const json names = spec.value("names", json::object());
    std::string storage;
    for (const auto& v : spec.value("versions", json::array()))
      if (v.value("storage", false)) storage = v.value("name", "");
    for (const auto& v : spec.value("versions", json::array())) {
      if (!v.value("served", true)) continue;
      ResType t;
      t.group = spec.value("group", "");
      t.version = v.value("name", "");
      t.plural = names.value("plural", "");
      t.singular = names.value("singular", "");
      t.kind = names.value("kind", "");
      t.list_kind = names.value("listKind", "");
      t.namespaced = spec.value("scope", "Namespaced") == "Namespaced";
      t.has_status = v.contains("subresources") && v["subresources"].is_object() &&
                     v["subresources"].contains("status");
      t.short_names = names.value("shortNames", std::vector<std::string>{});
      t.categories = names.value("categories", std::vector<std::string>{});
      t.printer_columns = v.value("additionalPrinterColumns", json::array());
      t.schema = v.contains("schema") ? v["schema"].value("openAPIV3Schema", json()) : json();
      t.crd = crd["metadata"].value("name", "");
      t.storage_version = storage.empty() ? t.version : storage;
      add_type(std::move(t));
    }
  }

  // Forgets the types a CRD defined; with drop_objects also deletes their objects.
  void unregister_crd(const std::string& crd_name, bool drop_objects) {
    std::set<std::string> gps;
    for (auto it = types.begin(); it != types.end();) {
      if (!it->second.crd.empty() && it->second.crd == crd_name) {
        gps.insert(it->second.gp());
        it = types.erase(it);
      } else {
        ++it;
      }
    }
    for (const auto& gp : gps) {
      auto sv = gp_version.find(gp);
      if (!drop_objects) continue;
      auto& objs = store[gp];
      while (!objs.empty()) {
        auto it = objs.begin();
        ObjPtr old = it->second;
        remove_now(ObjKey{gp, it->first.first, it->first.second}, old);
      }
      if (sv != gp_version.end()) gp_version.erase(sv);
    }
  }

  // ---- store primitives (mu held) ----------------------------------------------------

  ObjPtr find(const std::string& gp, const std::string& ns, const std::string& name) const {
    auto s = store.find(gp);
    if (s == store.end()) return nullptr;
    auto it = s->second.find({ns, name});
    return it == s->second.end() ? nullptr : it->second;
  }

  static std::vector<std::string> owner_uids(const json& obj) {
    std::vector<std::string> out;
    const json* refs = lookup_path(obj, "metadata.ownerReferences");
    if (refs && refs->is_array())
      for (const auto& r : *refs)
        if (r.is_object() && r.contains("uid") && r["uid"].is_string()) out.push_back(r["uid"]);
    return out;
  }

  void index_remove(const ObjKey& k, const json& obj) {
    by_uid.erase(obj["metadata"].value("uid", ""));
    for (const auto& u : owner_uids(obj)) {
      auto it = dependents.find(u);
      if (it == dependents.end()) continue;
      it->second.erase(k);
      if (it->second.empty()) dependents.erase(it);
    }
  }

  void put(const ObjKey& k, ObjPtr obj, const ObjPtr& old) {
    if (old) index_remove(k, *old);
    by_uid[(*obj)["metadata"].value("uid", "")] = k;
    for (const auto& u : owner_uids(*obj)) dependents[u].insert(k);
    store[std::get<0>(k)][{std::get<1>(k), std::get<2>(k)}] = std::move(obj);
  }

  void deliver(Watcher& w, const Event& e) {
    if (w.gp != e.gp || (!w.ns.empty() && w.ns != e.ns)) return;
    bool now = w.matches(*e.obj);
    bool before = e.prev && w.matches(*e.prev);
    std::string type = e.type;
    if (e.type == "MODIFIED") {
      if (before && now) type = "MODIFIED";
      else if (now) type = "ADDED";
      else if (before) type = "DELETED";
      else return;
    } else if (e.type == "DELETED") {
      if (!now && !before) return;
    } else if (!now) {
      return;
    }
    w.queue.emplace_back(type, e.obj);
  }

  void publish(const std::string& type, const std::string& gp, const std::string& ns, ObjPtr obj,
               ObjPtr prev) {
    Event e{rv_of(*obj), type, gp, ns, std::move(obj), std::move(prev)};
    for (const auto& w : watchers) deliver(*w, e);
    history.push_back(std::move(e));
    while (history.size() > opt.history_limit) {
      history_floor = history.front().rv;
      history.pop_front();
    }
    if (opt.history_limit == 0) history_floor = rv;
    cv.notify_all();
  }

  std::string new_uid() {
    std::uniform_int_distribution<int> d(0, 15);
    const char* hex = "0123456789abcdef";
    std::string u;
    for (int i = 0; i < 32; ++i) {
      if (i == 8 || i == 12 || i == 16 || i == 20) u += '-';
      int v = d(rng);
      if (i == 12) v = 4;
      if (i == 16) v = 8 | (v & 3);
      u += hex[v];
    }
    return u;
  }

  std::string random_suffix() {
    static const char alphabet[] = "bcdfghjklmnpqrstvwxz2456789";
    std::uniform_int_distribution<size_t> d(0, sizeof(alphabet) - 2);
    std::string s;
    for (int i = 0; i < 5; ++i) s += alphabet[d(rng)];
    return s;
  }

  // ---- type-specific preparation ----------------------------------------------------

  static void merge_string_data(json& obj) {
    if (!obj.contains("stringData")) return;
    if (obj["stringData"].is_object()) {
      if (!obj.contains("data") || !obj["data"].is_object()) obj["data"] = json::object();
      for (auto& [k, v] : obj["stringData"].items()) obj["data"][k] = base64(scalar_string(v));
    }
    obj.erase("stringData");
  }

  // Decoding as the real server does: nulls dropped, a custom resource's unknown
  // fields pruned (reported as 299 warnings, or a 400 under fieldValidation=Strict).
  void decode(const ResType& t, json& obj) const {
    if (obj.contains("metadata") && obj["metadata"].is_object()) metadata_nulls_to_empty(obj["metadata"]);
    if (!t.schema.is_object()) {
      drop_nulls(obj);
      return;
    }
    std::vector<std::string> unknown;
    prune_custom_resource(obj, t.schema, unknown);
    if (obj.contains("metadata") && obj["metadata"].is_object()) drop_nulls(obj["metadata"]);
    if (unknown.empty() || !t_request) return;
    std::sort(unknown.begin(), unknown.end());
    if (t_request->strict) {
      std::string msg;
      for (const auto& u : unknown) msg += (msg.empty() ? "" : ", ") + std::string("unknown field \"") + u + "\"";
      fail(400, t.kind + " in version \"" + t.version + "\" cannot be handled as a " + t.kind +
                    ": strict decoding error: " + msg);
    }
    t_request->unknown.insert(t_request->unknown.end(), unknown.begin(), unknown.end());
  }

  void prepare(const ResType& t, json& obj) {
    if (t.group.empty() && t.plural == "secrets") {
      merge_string_data(obj);
      if (!obj.contains("type")) obj["type"] = "Opaque";
    }
    if (t.schema.is_object()) {
      json meta = obj["metadata"];
      apply_defaults(obj, t.schema);
      obj["metadata"] = meta;
    }
  }

  static bool allows_unconditional_update(const ResType& t) {
    return t.crd.empty() && !(t.group == "apiextensions.k8s.io" && t.plural == "customresourcedefinitions");
  }

  static json strip_for_generation(const json& obj, bool has_status) {
    json c = obj;
    c.erase("metadata");
    if (has_status) c.erase("status");
    return c;
  }

  void check_crd(const json& obj) {
    const json& spec = obj.value("spec", json::object());
    std::string plural = spec.value("names", json::object()).value("plural", "");
    std::string group = spec.value("group", "");
    std::string name = obj["metadata"].value("name", "");
    if (plural.empty() || group.empty() || spec.value("names", json::object()).value("kind", "").empty())
      fail(422, "CustomResourceDefinition.apiextensions.k8s.io \"" + name +
                    "\" is invalid: spec.names.plural, spec.names.kind and spec.group are required",
           name, "apiextensions.k8s.io", "CustomResourceDefinition");
    if (name != plural + "." + group)
      fail(422, "CustomResourceDefinition.apiextensions.k8s.io \"" + name +
                    "\" is invalid: metadata.name: Invalid value: \"" + name +
                    "\": must be spec.names.plural+\".\"+spec.group",
           name, "apiextensions.k8s.io", "CustomResourceDefinition");
  }

  static json crd_status(const json& obj) {
    std::string now = now_rfc3339();
    json names = obj["spec"].value("names", json::object());
    if (!names.contains("listKind")) names["listKind"] = names.value("kind", "") + "List";
    if (!names.contains("singular")) {
      std::string s = names.value("kind", "");
      std::transform(s.begin(), s.end(), s.begin(), ::tolower);
      names["singular"] = s;
    }
    json stored = json::array();
    for (const auto& v : obj["spec"].value("versions", json::array()))
      if (v.value("storage", false)) stored.push_back(v.value("name", ""));
    return {{"acceptedNames", names},
            {"conditions",
             json::array({{{"type", "NamesAccepted"}, {"status", "True"}, {"reason", "NoConflicts"},
                           {"message", "no conflicts found"}, {"lastTransitionTime", now}},
                          {{"type", "Established"}, {"status", "True"}, {"reason", "InitialNamesAccepted"},
                           {"message", "the initial names have been accepted"},
                           {"lastTransitionTime", now}}})},
            {"storedVersions", stored}};
  }

  // ---- operations (mu held) ----------------------------------------------------------

  json out(const ResType& t, const json& stored) const {
    json o = stored;
    o["apiVersion"] = t.api_version();
    o["kind"] = t.kind;
    return o;
  }

  void check_ns(const ResType& t, const std::string& ns) const {
    if (t.namespaced && ns.empty()) fail(400, "a namespace is required for " + t.qualified());
    if (!t.namespaced && !ns.empty())
      fail(404, "the server could not find the requested resource (" + t.qualified() +
                    " is cluster-scoped)");
  }

  json do_create(const ResType& t, const std::string& ns, json obj) {
    check_ns(t, ns);
    if (!obj.is_object()) fail(400, "the request body must be a JSON object");
    if (!obj.contains("metadata") || !obj["metadata"].is_object()) obj["metadata"] = json::object();
    decode(t, obj);
    json& md = obj["metadata"];
    if (md.contains("namespace") && md["namespace"].is_string() && !md["namespace"].get<std::string>().empty() &&
        md["namespace"] != ns) {
      if (!t.namespaced) {
        md.erase("namespace");
      } else {
        fail(400, "the namespace of the provided object does not match the namespace sent on the request");
      }
    }
    if (obj.contains("kind") && obj["kind"].is_string() && obj["kind"] != t.kind)
      fail(400, "the kind of the provided object (" + obj["kind"].get<std::string>() +
                    ") does not match the resource (" + t.kind + ")");
    std::string name = md.value("name", "");
    if (name.empty()) {
      std::string gen = md.value("generateName", "");
      if (gen.empty())
        fail(422, t.kind + " \"\" is invalid: metadata.name: Required value: name or generateName is required",
             "", t.group, t.kind);
      for (int i = 0; i < 100; ++i) {
        name = gen + random_suffix();
        if (!find(t.gp(), ns, name)) break;
      }
      md["name"] = name;
    }
    if (t.namespaced) {
      md["namespace"] = ns;
      ObjPtr nso = find("/namespaces", "", ns);
      if (!nso) fail(404, "namespaces \"" + ns + "\" not found", ns, "", "namespaces");
    } else {
      md.erase("namespace");
    }
    if (find(t.gp(), ns, name))
      fail(409, t.qualified() + " \"" + name + "\" already exists", name, t.group, t.plural, "AlreadyExists");
    const ResType* st = storage_type(t.gp());
    if (t.group == "apiextensions.k8s.io" && t.plural == "customresourcedefinitions") {
      check_crd(obj);
      obj["status"] = crd_status(obj);
    } else if (t.group.empty() && t.plural == "pods") {
      obj["status"] = {{"phase", "Pending"}};
    } else if (t.group.empty() && t.plural == "namespaces") {
      obj["status"] = {{"phase", "Active"}};
    } else if (t.has_status && !(t.group.empty() && t.plural == "nodes")) {
      obj.erase("status");
    }
    md.erase("deletionTimestamp");
    md.erase("deletionGracePeriodSeconds");
    md.erase("managedFields");
    md.erase("selfLink");
    md["uid"] = new_uid();
    md["creationTimestamp"] = now_rfc3339();
    md["generation"] = 1;
    prepare(t, obj);
    obj["apiVersion"] = st ? st->api_version() : t.api_version();
    obj["kind"] = t.kind;
    obj["metadata"]["resourceVersion"] = std::to_string(++rv);
    auto stored = std::make_shared<const json>(std::move(obj));
    put(ObjKey{t.gp(), ns, name}, stored, nullptr);
    if (t.group == "apiextensions.k8s.io" && t.plural == "customresourcedefinitions") register_crd(*stored);
    publish("ADDED", t.gp(), ns, stored, nullptr);
    return out(t, *stored);
  }

  json do_update(const ResType& t, const std::string& ns, const std::string& url_name, json obj,
                 bool status_sub) {
    check_ns(t, ns);
    if (!obj.is_object()) fail(400, "the request body must be a JSON object");
    if (!obj.contains("metadata") || !obj["metadata"].is_object()) obj["metadata"] = json::object();
    decode(t, obj);
    std::string name = obj["metadata"].value("name", "");
    if (name.empty()) name = url_name;
    if (!url_name.empty() && name != url_name)
      fail(400, "the name of the object (" + name + ") does not match the name on the URL (" + url_name + ")");
    if (t.namespaced) {
      std::string bns = obj["metadata"].value("namespace", "");
      if (!bns.empty() && bns != ns)
        fail(400, "the namespace of the provided object does not match the namespace sent on the request");
    }
    ObjPtr old = find(t.gp(), ns, name);
    if (!old) fail(404, t.qualified() + " \"" + name + "\" not found", name, t.group, t.plural);
    std::string want_rv = obj["metadata"].value("resourceVersion", "");
    const std::string cur_rv = (*old)["metadata"].value("resourceVersion", "");
    // Custom resources and CRDs (AllowUnconditionalUpdate false in their strategies)
    // need the resourceVersion; the core kinds served here allow an unconditional update.
    if (want_rv.empty() && !allows_unconditional_update(t))
      fail(422, t.qualified() + " \"" + name + "\" is invalid: metadata.resourceVersion: Invalid value: 0: "
                "must be specified for an update",
           name, t.group, t.plural);
    if (!want_rv.empty() && want_rv != cur_rv)
      fail(409, "Operation cannot be fulfilled on " + t.qualified() + " \"" + name +
                    "\": the object has been modified; please apply your changes to the latest "
                    "version and try again",
           name, t.group, t.plural, "Conflict");
    if (status_sub && !t.has_status) fail(404, "the server could not find the requested resource");
    const json& om = (*old)["metadata"];
    json next;
    if (status_sub) {
      next = *old;
      if (obj.contains("status")) next["status"] = obj["status"];
      else next.erase("status");
    } else {
      next = std::move(obj);
      json& md = next["metadata"];
      for (const char* k : {"uid", "creationTimestamp", "generation", "deletionTimestamp",
                            "deletionGracePeriodSeconds", "name"}) {
        if (om.contains(k)) md[k] = om[k];
        else md.erase(k);
      }
      if (t.namespaced) md["namespace"] = ns;
      md.erase("managedFields");
      if (t.has_status) {
        if (old->contains("status")) next["status"] = (*old)["status"];
        else next.erase("status");
      }
      if (om.contains("deletionTimestamp")) {
        std::set<std::string> had;
        if (om.contains("finalizers"))
          for (const auto& f : om["finalizers"]) had.insert(scalar_string(f));
        if (md.contains("finalizers") && md["finalizers"].is_array())
          for (const auto& f : md["finalizers"])
            if (!had.count(scalar_string(f)))
              fail(422, t.kind + " \"" + name +
                            "\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added "
                            "if the object is being deleted",
                   name, t.group, t.kind);
      }
    }
    prepare(t, next);
    const ResType* st = storage_type(t.gp());
    next["apiVersion"] = st ? st->api_version() : t.api_version();
    next["kind"] = t.kind;
    next["metadata"]["resourceVersion"] = cur_rv;
    if (next == *old) return out(t, *old);  // no-op: no new resourceVersion, no event
    if (!status_sub && strip_for_generation(next, t.has_status) != strip_for_generation(*old, t.has_status))
      next["metadata"]["generation"] = om.value("generation", 1) + 1;
    next["metadata"]["resourceVersion"] = std::to_string(++rv);
    if (t.group == "apiextensions.k8s.io" && t.plural == "customresourcedefinitions" && !status_sub) {
      check_crd(next);
      next["status"] = crd_status(next);
    }
    auto stored = std::make_shared<const json>(std::move(next));
    ObjKey k{t.gp(), ns, name};
    put(k, stored, old);
    if (t.group == "apiextensions.k8s.io" && t.plural == "customresourcedefinitions") register_crd(*stored);
    publish("MODIFIED", t.gp(), ns, stored, old);
    const json& smd = (*stored)["metadata"];
    bool no_finalizers = !smd.contains("finalizers") || !smd["finalizers"].is_array() || smd["finalizers"].empty();
    if (smd.contains("deletionTimestamp") && no_finalizers) {
      remove_now(k, stored);
      json gone = out(t, *stored);
      return gone;
    }
    return out(t, *stored);
  }

  // Stores a modified copy of an object (server-side change: deletion mark, GC ref removal).
  ObjPtr server_modify(const ObjKey& k, const ObjPtr& old, json next) {
    next["metadata"]["resourceVersion"] = std::to_string(++rv);
    auto stored = std::make_shared<const json>(std::move(next));
    put(k, stored, old);
    publish("MODIFIED", std::get<0>(k), std::get<1>(k), stored, old);
    return stored;
  }

  // Removes the object for good: DELETED event, then garbage collection of dependents.
  void remove_now(const ObjKey& k, const ObjPtr& old) {
    const auto& [gp, ns, name] = k;
    index_remove(k, *old);
    store[gp].erase({ns, name});
    json last = *old;
    last["metadata"]["resourceVersion"] = std::to_string(++rv);
    auto final_obj = std::make_shared<const json>(std::move(last));
    publish("DELETED", gp, ns, final_obj, old);
    const std::string uid = (*old)["metadata"].value("uid", "");
    if (gp == "apiextensions.k8s.io/customresourcedefinitions") unregister_crd(name, true);
    if (gp == "/namespaces") {
      for (auto& [sgp, objs] : store) {
        std::vector<std::string> names;
        for (const auto& [key, o] : objs)
          if (key.first == name) names.push_back(key.second);
        for (const auto& n : names) delete_key(ObjKey{sgp, name, n}, "Background");
      }
    }
    collect_dependents(uid, "Background");
  }

  // Background garbage collection: a dependent none of whose owners exists any more is
  // deleted; one that still has a live owner loses the dangling reference.
  void collect_dependents(const std::string& uid, const std::string& policy) {
    auto it = dependents.find(uid);
    if (it == dependents.end()) return;
    std::vector<ObjKey> deps(it->second.begin(), it->second.end());
    for (const auto& dk : deps) {
      ObjPtr dep = find(std::get<0>(dk), std::get<1>(dk), std::get<2>(dk));
      if (!dep) continue;
      bool live_owner = false;
      for (const auto& u : owner_uids(*dep))
        if (u != uid && by_uid.count(u)) live_owner = true;
      if (live_owner || policy == "Orphan") {
        json next = *dep;
        json refs = json::array();
        for (const auto& r : next["metadata"]["ownerReferences"])
          if (!(r.is_object() && r.value("uid", "") == uid)) refs.push_back(r);
        if (refs.empty()) next["metadata"].erase("ownerReferences");
        else next["metadata"]["ownerReferences"] = refs;
        server_modify(dk, dep, std::move(next));
      } else {
        delete_key(dk, "Background");
      }
    }
  }

  // DELETE semantics on a stored object: finalizers → mark; otherwise remove + GC.
  ObjPtr delete_key(const ObjKey& k, const std::string& policy) {
    ObjPtr old = find(std::get<0>(k), std::get<1>(k), std::get<2>(k));
    if (!old) return nullptr;
    const std::string uid = (*old)["metadata"].value("uid", "");
    if (policy == "Orphan") {
      // Dependents lose their reference to this object and stay.
      auto it = dependents.find(uid);
      if (it != dependents.end()) {
        std::vector<ObjKey> deps(it->second.begin(), it->second.end());
        for (const auto& dk : deps) {
          ObjPtr dep = find(std::get<0>(dk), std::get<1>(dk), std::get<2>(dk));
          if (!dep) continue;
          json next = *dep;
          json refs = json::array();
          for (const auto& r : next["metadata"]["ownerReferences"])
            if (!(r.is_object() && r.value("uid", "") == uid)) refs.push_back(r);
          if (refs.empty()) next["metadata"].erase("ownerReferences");
          else next["metadata"]["ownerReferences"] = refs;
          server_modify(dk, dep, std::move(next));
        }
      }
    } else if (policy == "Foreground") {
      // Dependents go first (their own finalizers are honoured; those stay marked).
      auto it = dependents.find(uid);
      if (it != dependents.end()) {
        std::vector<ObjKey> deps(it->second.begin(), it->second.end());
        for (const auto& dk : deps) delete_key(dk, "Foreground");
      }
      old = find(std::get<0>(k), std::get<1>(k), std::get<2>(k));
      if (!old) return nullptr;
    }
    const json& md = (*old)["metadata"];
    bool has_finalizers = md.contains("finalizers") && md["finalizers"].is_array() && !md["finalizers"].empty();
    if (has_finalizers) {
      if (md.contains("deletionTimestamp")) return old;  // already being deleted
      json next = *old;
      next["metadata"]["deletionTimestamp"] = now_rfc3339();
      next["metadata"]["deletionGracePeriodSeconds"] = 0;
      // As the real server's BeforeDelete: the deletion is a change of the object.
      const long long gen = next["metadata"].value("generation", 0LL);
      if (gen > 0) next["metadata"]["generation"] = gen + 1;
      return server_modify(k, old, std::move(next));
    }
    remove_now(k, old);
    return old;
  }

  json do_delete(const ResType& t, const std::string& ns, const std::string& name,
                 const std::string& policy, const json& preconditions) {
    check_ns(t, ns);
    ObjPtr old = find(t.gp(), ns, name);
    if (!old) fail(404, t.qualified() + " \"" + name + "\" not found", name, t.group, t.plural);
    if (preconditions.is_object()) {
      std::string uid = preconditions.value("uid", "");
      std::string prv = preconditions.value("resourceVersion", "");
      if (!uid.empty() && uid != (*old)["metadata"].value("uid", ""))
        fail(409, "Operation cannot be fulfilled on " + t.qualified() + " \"" + name +
                      "\": Precondition failed: UID in precondition: " + uid + ", UID in object meta: " +
                      (*old)["metadata"].value("uid", ""),
             name, t.group, t.plural, "Conflict");
      if (!prv.empty() && prv != (*old)["metadata"].value("resourceVersion", ""))
        fail(409, "Operation cannot be fulfilled on " + t.qualified() + " \"" + name +
                      "\": the object has been modified; please apply your changes to the latest "
                      "version and try again",
             name, t.group, t.plural, "Conflict");
    }
    ObjPtr res = delete_key(ObjKey{t.gp(), ns, name}, policy);
    ObjPtr now = find(t.gp(), ns, name);
    return out(t, now ? *now : *res);
  }

  std::vector<ObjPtr> do_list(const ResType& t, const std::string& ns, const LabelSelector& ls,
                              const FieldSelector& fs) const {
    std::vector<ObjPtr> items;
    auto s = store.find(t.gp());
    if (s == store.end()) return items;
    for (const auto& [key, o] : s->second) {
      if (!ns.empty() && key.first != ns) continue;
      if (ls.matches(*o) && fs.matches(*o)) items.push_back(o);
    }
    return items;
  }

  json do_patch(const ResType& t, const std::string& ns, const std::string& name,
                const std::string& content_type, const std::string& body, bool status_sub,
                bool* created) {
    check_ns(t, ns);
    ObjPtr old = find(t.gp(), ns, name);
    bool apply = content_type.find("apply-patch") != std::string::npos;
    if (!old && apply) {
      json obj = parse_body(body, "application/yaml");
      if (!obj.is_object()) fail(400, "the applied configuration must be an object");
      obj["metadata"]["name"] = name;
      if (created) *created = true;
      return do_create(t, ns, std::move(obj));
    }
    if (!old) fail(404, t.qualified() + " \"" + name + "\" not found", name, t.group, t.plural);
    json cur = out(t, *old);
    json patched;
    if (content_type.find("json-patch+json") != std::string::npos) {
      json ops = parse_body(body, content_type);
      if (!ops.is_array()) fail(400, "a JSON patch must be an array of operations");
      try {
        patched = cur.patch(ops);
      } catch (const std::exception& e) {
        fail(422, std::string("the JSON patch could not be applied: ") + e.what(), name, t.group, t.kind);
      }
    } else if (content_type.find("merge-patch+json") != std::string::npos || apply) {
      json p = parse_body(body, apply ? "application/yaml" : content_type);
      if (!p.is_object()) fail(400, "a merge patch must be a JSON object");
      patched = cur;
      patched.merge_patch(p);
    } else {
      fail(415, "the body of the request was in an unknown format - accepted media types include: "
                "application/json-patch+json, application/merge-patch+json, "
                "application/apply-patch+yaml, application/strategic-merge-patch+json");
    }
    if (!patched.is_object() || !patched.contains("metadata") || !patched["metadata"].is_object())
      fail(422, "the patch removed metadata", name, t.group, t.kind);
    // A patch that names a resourceVersion is a precondition; otherwise it applies to the current one.
    if (!patched["metadata"].contains("resourceVersion"))
      patched["metadata"]["resourceVersion"] = (*old)["metadata"].value("resourceVersion", "");
    if (patched["metadata"].value("name", "") != name)
      fail(400, "the name of the object cannot be changed by a patch");
    return do_update(t, ns, name, std::move(patched), status_sub);
  }

  // ---- watch ---------------------------------------------------------------------------

  // Registers a watcher and fills its queue with the initial events. Throws 410 (as an
  // ApiError) when the requested resourceVersion is older than the kept history.
  std::shared_ptr<Watcher> start_watch(const ResType& t, const std::string& ns,
                                       const std::string& from_rv, bool send_initial,
                                       LabelSelector ls, FieldSelector fs) {
    auto w = std::make_shared<Watcher>();
    w->gp = t.gp();
    w->ns = ns;
    w->api_version = t.api_version();
    w->labels = std::move(ls);
    w->fields = std::move(fs);
    if (from_rv.empty() || from_rv == "0" || send_initial) {
      for (const auto& o : do_list(t, ns, w->labels, w->fields)) w->queue.emplace_back("ADDED", o);
    } else {
      uint64_t n = 0;
      try {
        n = std::stoull(from_rv);
      } catch (...) {
        fail(400, "invalid resourceVersion \"" + from_rv + "\"");
      }
      if (n < history_floor)
        fail(410, "too old resource version: " + from_rv + " (" + std::to_string(history_floor) + ")",
             "", "", "", "Expired");
      auto it = std::upper_bound(history.begin(), history.end(), n,
                                 [](uint64_t v, const Event& e) { return v < e.rv; });
      for (; it != history.end(); ++it) deliver(*w, *it);
    }
    watchers.insert(w);
    return w;
  }

  // ---- HTTP ----------------------------------------------------------------------------

  struct Target {
    bool resource = false;
    std::string group, version, plural, sub, ns, name, verb;
  };

  static Target parse_path(const std::string& method, const std::string& path, bool watch_param) {
    Target t;
    std::vector<std::string> parts;
    for (const auto& p : split(path, '/'))
      if (!p.empty()) parts.push_back(p);
    size_t i;
    if (parts.size() >= 2 && parts[0] == "api") {
      t.version = parts[1];
      i = 2;
    } else if (parts.size() >= 3 && parts[0] == "apis") {
      t.group = parts[1];
      t.version = parts[2];
      i = 3;
    } else {
      return t;
    }
    std::vector<std::string> rest(parts.begin() + static_cast<long>(i), parts.end());
    if (rest.empty()) return t;
    if (!rest.empty() && rest[0] == "watch") {  // deprecated /watch/ prefix
      watch_param = true;
      rest.erase(rest.begin());
    }
    if (rest.size() >= 3 && rest[0] == "namespaces" && rest[2] != "status" && rest[2] != "finalize") {
      t.ns = rest[1];
      rest.erase(rest.begin(), rest.begin() + 2);
    }
    if (rest.empty()) return t;
    t.resource = true;
    t.plural = rest[0];
    if (rest.size() > 1) t.name = rest[1];
    if (rest.size() > 2) t.sub = rest[2];
    if (method == "GET") t.verb = watch_param ? "watch" : (t.name.empty() ? "list" : "get");
    else if (method == "POST") t.verb = "create";
    else if (method == "PUT") t.verb = "update";
    else if (method == "PATCH") t.verb = "patch";
    else if (method == "DELETE") t.verb = t.name.empty() ? "deletecollection" : "delete";
    return t;
  }

  void send_json(httplib::Response& res, int code, const json& body) {
    res.status = code;
    res.set_content(body.dump(), "application/json");
  }

  void send_error(httplib::Response& res, const ApiError& e) { send_json(res, e.code(), e.status()); }

  json table_for(const ResType& t, const std::vector<ObjPtr>& items) const {
    json cols = json::array();
    cols.push_back({{"name", "Name"}, {"type", "string"}, {"format", "name"},
                    {"description", "Name must be unique within a namespace."}, {"priority", 0}});
    bool custom = t.printer_columns.is_array() && !t.printer_columns.empty();
    if (custom) {
      for (const auto& c : t.printer_columns)
        cols.push_back({{"name", c.value("name", "")}, {"type", c.value("type", "string")},
                        {"format", c.value("format", "")}, {"description", c.value("description", "")},
                        {"priority", c.value("priority", 0)}});
    } else {
      cols.push_back({{"name", "Age"}, {"type", "date"}, {"format", ""},
                      {"description", "CreationTimestamp is a timestamp representing the server time when this object was created."},
                      {"priority", 0}});
    }
    long long now = static_cast<long long>(std::time(nullptr));
    auto age = [&](const json& v) -> json {
      if (!v.is_string()) return nullptr;
      const std::optional<int64_t> ts = parse_rfc3339_seconds(v.get<std::string>());
      if (!ts) return "<invalid>";
      return human_duration(now - *ts);
    };
    json rows = json::array();
    for (const auto& o : items) {
      json cells = json::array();
      cells.push_back((*o)["metadata"].value("name", ""));
      if (custom) {
        for (const auto& c : t.printer_columns) {
          const json* v = lookup_path(*o, c.value("jsonPath", ""));
          std::string type = c.value("type", "string");
          if (!v || v->is_null()) cells.push_back(nullptr);
          else if (type == "date") cells.push_back(age(*v));
          else if (type == "string") cells.push_back(scalar_string(*v));
          else if (type == "integer" && v->is_number()) cells.push_back(v->get<long long>());
          else if (type == "number" && v->is_number()) cells.push_back(v->get<double>());
          else if (type == "boolean" && v->is_boolean()) cells.push_back(v->get<bool>());
          else if (v->is_primitive()) cells.push_back(*v);
          else cells.push_back(v->dump());
        }
      } else {
        const json* ts = lookup_path(*o, "metadata.creationTimestamp");
        cells.push_back(ts ? age(*ts) : json(nullptr));
      }
      rows.push_back({{"cells", cells}, {"object", out(t, *o)}});
    }
    return {{"kind", "Table"}, {"apiVersion", "meta.k8s.io/v1"},
            {"metadata", {{"resourceVersion", std::to_string(rv)}}},
            {"columnDefinitions", cols}, {"rows", rows}};
  }

  // Discovery documents (mu held).
  json api_resource_list(const std::string& group, const std::string& version) const {
    json resources = json::array();
    for (const auto& [key, t] : types) {
      if (t.group != group || t.version != version) continue;
      json verbs = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"};
      json r = {{"name", t.plural}, {"singularName", t.singular}, {"namespaced", t.namespaced},
                {"kind", t.kind}, {"verbs", verbs}};
      if (!t.short_names.empty()) r["shortNames"] = t.short_names;
      if (!t.categories.empty()) r["categories"] = t.categories;
      resources.push_back(r);
      if (t.has_status)
        resources.push_back({{"name", t.plural + "/status"}, {"singularName", ""},
                             {"namespaced", t.namespaced}, {"kind", t.kind},
                             {"verbs", {"get", "patch", "update"}}});
    }
    return {{"kind", "APIResourceList"}, {"apiVersion", "v1"},
            {"groupVersion", group.empty() ? version : group + "/" + version}, {"resources", resources}};
  }

  json api_group(const std::string& group) const {
    json versions = json::array();
    std::string preferred;
    std::set<std::string> seen;
    for (const auto& [key, t] : types) {
      if (t.group != group || !seen.insert(t.version).second) continue;
      versions.push_back({{"groupVersion", group + "/" + t.version}, {"version", t.version}});
      if (preferred.empty() || t.version == t.storage_version) preferred = t.version;
    }
    if (versions.empty()) return nullptr;
    return {{"name", group},
            {"versions", versions},
            {"preferredVersion", {{"groupVersion", group + "/" + preferred}, {"version", preferred}}}};
  }

  json api_group_list() const {
    std::set<std::string> groups;
    for (const auto& [key, t] : types)
      if (!t.group.empty()) groups.insert(t.group);
    json list = json::array();
    for (const auto& g : groups) list.push_back(api_group(g));
    return {{"kind", "APIGroupList"}, {"apiVersion", "v1"}, {"groups", list}};
  }

  // Minimal OpenAPI v3: enough for kubectl to see that the server supports the
  // fieldValidation query parameter (it then validates nothing on the client).
  json openapi_v3_root() const {
    json paths = json::object();
    std::set<std::string> gvs;
    for (const auto& [key, t] : types)
      gvs.insert(t.group.empty() ? "api/" + t.version : "apis/" + t.group + "/" + t.version);
    for (const auto& gv : gvs)
      paths[gv] = {{"serverRelativeURL", "/openapi/v3/" + gv + "?hash=" + std::to_string(rv)}};
    return {{"paths", paths}};
  }

  json openapi_v3_gv(const std::string& group, const std::string& version) const {
    json paths = json::object();
    json schemas = json::object();
    bool any = false;
    for (const auto& [key, t] : types) {
      if (t.group != group || t.version != version) continue;
      any = true;
      json gvk = json::array({{{"group", t.group}, {"version", t.version}, {"kind", t.kind}}});
      json params = json::array({{{"name", "fieldValidation"}, {"in", "query"}, {"schema", {{"type", "string"}}}},
                                 {{"name", "fieldManager"}, {"in", "query"}, {"schema", {{"type", "string"}}}},
                                 {{"name", "dryRun"}, {"in", "query"}, {"schema", {{"type", "string"}}}}});
      std::string base = (group.empty() ? "/api/" + version : "/apis/" + group + "/" + version) +
                         (t.namespaced ? "/namespaces/{namespace}/" : "/") + t.plural;
      json op = {{"parameters", params}, {"x-kubernetes-group-version-kind", gvk[0]},
                 {"responses", {{"200", {{"description", "OK"}}}}}};
      paths[base] = {{"post", op}, {"get", op}};
      paths[base + "/{name}"] = {{"put", op}, {"patch", op}, {"get", op}, {"delete", op}};
      std::string sname = (group.empty() ? "io.k8s.api.core." : group + ".") + version + "." + t.kind;
      json schema = t.schema.is_object() ? t.schema : json{{"type", "object"}, {"x-kubernetes-preserve-unknown-fields", true}};
      schema["x-kubernetes-group-version-kind"] = gvk;
      schemas[sname] = schema;
    }
    if (!any) return nullptr;
    return {{"openapi", "3.0.0"},
            {"info", {{"title", "Kubernetes"}, {"version", "v1.32.0"}}},
            {"paths", paths},
            {"components", {{"schemas", schemas}}}};
  }

  bool authorized(const httplib::Request& req) const {
    return req.get_header_value("Authorization") == "Bearer " + opt.token;
  }

  void record(const httplib::Request& req, const Target& t, int code) {
    RequestRecord r;
    r.verb = t.resource ? t.verb : "";
    r.method = req.method;
    r.path = req.path;
    r.group = t.group;
    r.version = t.version;
    r.resource = t.plural;
    r.subresource = t.sub;
    r.ns = t.ns;
    r.name = t.name;
    r.user_agent = req.get_header_value("User-Agent");
    r.code = code;
    if (log_to_stderr)
      std::fprintf(stderr, "test-apiserver: %s %s %s [%s] -> %d\n", req.method.c_str(), req.path.c_str(),
                   req.params.empty() ? "" : "?", req.get_header_value("Content-Type").c_str(), code);
    std::lock_guard<std::mutex> lk(fmu);
    log.push_back(std::move(r));
  }

  std::optional<int> take_fault(const httplib::Request& req) {
    std::lock_guard<std::mutex> lk(fmu);
    for (auto it = faults.begin(); it != faults.end(); ++it) {
      if (!it->method.empty() && it->method != req.method) continue;
      if (!it->path.empty() && req.path.find(it->path) == std::string::npos) continue;
      int code = it->code;
      if (--it->count <= 0) faults.erase(it);
      return code;
    }
    return std::nullopt;
  }

  void handle(const httplib::Request& req, httplib::Response& res) {
    std::chrono::milliseconds delay;
    {
      std::lock_guard<std::mutex> lk(fmu);
      delay = latency;
    }
    if (delay.count() > 0) {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait_for(lk, delay, [&] { return stopping; });
    }
    std::string wparam = req.has_param("watch") ? req.get_param_value("watch") : "";
    bool watch = wparam == "1" || wparam == "true";
    Target t = parse_path(req.method, req.path, watch);
    const std::string& p = req.path;
    if (p == "/healthz" || p == "/livez" || p == "/readyz") {
      res.set_content("ok", "text/plain");
      record(req, t, 200);
      return;
    }
    if (!authorized(req)) {
      send_json(res, 401, status_object(401, "Unauthorized", "Unauthorized"));
      record(req, t, 401);
      return;
    }
    if (auto code = take_fault(req)) {
      send_json(res, *code, status_object(*code, reason_for(*code), "injected fault: " + reason_for(*code)));
      record(req, t, *code);
      return;
    }
    try {
      if (auto r = route_for(p)) {
        proxy(req, res, *r, t.verb == "watch");
      } else if (!t.resource) {
        handle_discovery(req, res, t);
      } else if (t.verb == "watch") {
        handle_watch(req, res, t);
      } else {
        handle_resource(req, res, t);
      }
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const std::exception& e) {
      send_json(res, 500, status_object(500, "InternalError", std::string("internal error: ") + e.what()));
    }
    record(req, t, res.status);
  }

  // ---- routes: prefixes another API server serves --------------------------------------

  static std::string route_prefix(const KubeApiRoute& r) {
    std::string p = r.prefix;
    while (p.size() > 1 && p.back() == '/') p.pop_back();
    return p;
  }

  // The index of the route serving `path`, if any.
  std::optional<size_t> route_for(const std::string& path) const {
    for (size_t i = 0; i < opt.routes.size(); ++i) {
      const std::string p = route_prefix(opt.routes[i]);
      if (!p.empty() && (path == p || path.rfind(p + "/", 0) == 0)) return i;
    }
    return std::nullopt;
  }

  std::unique_ptr<httplib::SSLClient> upstream_client(size_t route) {
    {
      std::lock_guard<std::mutex> lk(pmu);
      auto& v = idle_upstream[route];
      if (!v.empty()) {
        auto c = std::move(v.back());
        v.pop_back();
        return c;
      }
    }
    const KubeApiRoute& r = opt.routes[route];
    auto c = std::make_unique<httplib::SSLClient>(r.host, r.port, r.cert_file, r.key_file);
    if (!c->is_valid())
      fail(503, "route " + r.prefix + ": cannot load the client certificate " + r.cert_file + " / " + r.key_file);
    c->set_ca_cert_path(r.ca_file.c_str());
    c->enable_server_certificate_verification(true);
    c->set_connection_timeout(5, 0);
    c->set_read_timeout(60, 0);
    c->set_write_timeout(30, 0);
    c->set_keep_alive(true);
    return c;
  }

  void return_upstream(size_t route, std::unique_ptr<httplib::SSLClient> c) {
    std::lock_guard<std::mutex> lk(pmu);
    auto& v = idle_upstream[route];
    if (v.size() < 16 && !stopping_proxies) v.push_back(std::move(c));
  }
  bool stopping_proxies = false;  // under pmu

  // The request's path and query as sent upstream.
  static std::string upstream_target(const httplib::Request& req) {
    std::string target;
    for (const auto& seg : split(req.path, '/')) {
      if (seg.empty()) continue;
      target += '/';
      target += url_encode(seg);
    }
    if (target.empty()) target = "/";
    char sep = '?';
    for (const auto& [k, v] : req.params) {
      target += sep;
      target += url_encode(k) + "=" + url_encode(v);
      sep = '&';
    }
    return target;
  }

  static httplib::Headers upstream_headers(const httplib::Request& req) {
    httplib::Headers h;
    for (const char* name : {"Accept", "User-Agent"})
      if (req.has_header(name)) h.emplace(name, req.get_header_value(name));
    return h;
  }

  static void copy_warnings(const httplib::Headers& from, httplib::Response& res) {
    for (const auto& [k, v] : from)
      if (strcasecmp(k.c_str(), "Warning") == 0) res.headers.emplace("Warning", v);
  }

  void proxy(const httplib::Request& req, httplib::Response& res, size_t route, bool watch) {
    if (watch) {
      proxy_watch(req, res, route);
      return;
    }
    auto cli = upstream_client(route);
    const std::string target = upstream_target(req);
    const httplib::Headers headers = upstream_headers(req);
    const std::string ctype = req.has_header("Content-Type") ? req.get_header_value("Content-Type")
                                                              : std::string("application/json");
    auto send = [&]() -> httplib::Result {
      if (req.method == "GET") return cli->Get(target.c_str(), headers);
      if (req.method == "POST") return cli->Post(target.c_str(), headers, req.body, ctype.c_str());
      if (req.method == "PUT") return cli->Put(target.c_str(), headers, req.body, ctype.c_str());
      if (req.method == "PATCH") return cli->Patch(target.c_str(), headers, req.body, ctype.c_str());
      if (req.method == "DELETE") return cli->Delete(target.c_str(), headers, req.body, ctype.c_str());
      fail(405, "the server does not allow this method on the requested resource");
    };
    httplib::Result r = send();
    if (!r)
      fail(503, "route " + opt.routes[route].prefix + ": upstream 127.0.0.1:" +
                    std::to_string(opt.routes[route].port) + " did not answer: " + httplib::to_string(r.error()));
    res.status = r->status;
    res.set_content(r->body, r->has_header("Content-Type") ? r->get_header_value("Content-Type").c_str()
                                                           : "application/json");
    copy_warnings(r->headers, res);
    return_upstream(route, std::move(cli));
  }

  // Ends a routed watch: the client stream and the pump (whose blocking read is cut by
  // stopping its client, retried until the pump notices; bounded).
  static void close_stream(ProxyStream& ps) {
    std::unique_lock<std::mutex> lk(ps.mu);
    ps.closed = true;
    ps.cv.notify_all();
    for (int i = 0; i < 200 && !ps.done; ++i) {
      lk.unlock();
      ps.cli->stop();
      lk.lock();
      ps.cv.wait_for(lk, std::chrono::milliseconds(25), [&] { return ps.done; });
    }
  }

  void proxy_watch(const httplib::Request& req, httplib::Response& res, size_t route) {
    auto ps = std::make_shared<ProxyStream>();
    {
      const KubeApiRoute& r = opt.routes[route];
      ps->cli = std::make_unique<httplib::SSLClient>(r.host, r.port, r.cert_file, r.key_file);
      if (!ps->cli->is_valid())
        fail(503, "route " + r.prefix + ": cannot load the client certificate " + r.cert_file);
      ps->cli->set_ca_cert_path(r.ca_file.c_str());
      ps->cli->enable_server_certificate_verification(true);
      ps->cli->set_connection_timeout(5, 0);
      ps->cli->set_read_timeout(24 * 3600, 0);  // a watch is quiet for as long as nothing changes
    }
    {
      std::lock_guard<std::mutex> lk(pmu);
      if (stopping_proxies) fail(503, "the server is shutting down");
      proxied.insert(ps);
    }
    ++open_watch_count;
    ProxyStream* raw = ps.get();  // the pump never owns the stream: its owners join it
    const std::string target = upstream_target(req);
    const httplib::Headers headers = upstream_headers(req);
    ps->pump = std::thread([raw, target, headers] {
      httplib::Request ureq;
      ureq.method = "GET";
      ureq.path = target;
      ureq.headers = headers;
      ureq.response_handler = [raw](const httplib::Response& r) {
        std::lock_guard<std::mutex> lk(raw->mu);
        raw->status = r.status;
        raw->content_type = r.get_header_value("Content-Type");
        for (const auto& [k, v] : r.headers)
          if (strcasecmp(k.c_str(), "Warning") == 0) raw->warnings.emplace("Warning", v);
        raw->got_headers = true;
        raw->cv.notify_all();
        return true;
      };
      ureq.content_receiver = [raw](const char* data, size_t n, uint64_t, uint64_t) {
        std::lock_guard<std::mutex> lk(raw->mu);
        if (raw->closed) return false;
        raw->buf.append(data, n);
        raw->cv.notify_all();
        return true;
      };
      httplib::Response ures;
      httplib::Error err = httplib::Error::Success;
      const bool ok = raw->cli->send(ureq, ures, err);
      std::lock_guard<std::mutex> lk(raw->mu);
      if (!ok && !raw->got_headers) raw->error = httplib::to_string(err);
      raw->done = true;
      raw->cv.notify_all();
    });
    auto finish = [this, ps] {
      close_stream(*ps);
      if (ps->pump.joinable()) ps->pump.join();
      std::lock_guard<std::mutex> lk(pmu);
      if (proxied.erase(ps)) --open_watch_count;
      cv.notify_all();
    };
    // The upstream's status decides: anything but 200 is passed on whole.
    std::unique_lock<std::mutex> lk(ps->mu);
    ps->cv.wait_for(lk, std::chrono::seconds(30), [&] { return ps->got_headers || ps->done || ps->closed; });
    if (!ps->got_headers || ps->status != 200) {
      ps->cv.wait_for(lk, std::chrono::seconds(30), [&] { return ps->done || ps->closed; });
      const int status = ps->status;
      const std::string body = ps->buf, error = ps->error, ctype = ps->content_type;
      const httplib::Headers warnings = ps->warnings;
      lk.unlock();
      finish();
      if (status == 0)
        fail(503, "route " + opt.routes[route].prefix + ": the upstream watch did not answer" +
                      (error.empty() ? "" : ": " + error));
      res.status = status;
      res.set_content(body, ctype.empty() ? "application/json" : ctype.c_str());
      copy_warnings(warnings, res);
      return;
    }
    const std::string ctype = ps->content_type.empty() ? "application/json;stream=watch" : ps->content_type;
    copy_warnings(ps->warnings, res);
    lk.unlock();
    res.status = 200;
    res.set_chunked_content_provider(
        ctype,
        [ps](size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> lk(ps->mu);
          ps->cv.wait_for(lk, std::chrono::milliseconds(500),
                          [&] { return !ps->buf.empty() || ps->done || ps->closed; });
          if (!ps->buf.empty() && !ps->closed) {
            std::string chunk;
            chunk.swap(ps->buf);
            lk.unlock();
            if (!sink.write(chunk.data(), chunk.size())) return false;
            return true;
          }
          if (ps->done || ps->closed) {
            lk.unlock();
            sink.done();
          }
          return true;
        },
        [finish](bool) { finish(); });
  }

  // Ends every routed watch and forgets idle upstream clients (drop_watches, shutdown).
  void close_proxied(bool shutting_down) {
    std::vector<std::shared_ptr<ProxyStream>> open;
    {
      std::lock_guard<std::mutex> lk(pmu);
      if (shutting_down) {
        stopping_proxies = true;
        idle_upstream.clear();
      }
      open.assign(proxied.begin(), proxied.end());
    }
    for (const auto& ps : open) {
      std::lock_guard<std::mutex> lk(ps->mu);
      ps->closed = true;
      ps->cv.notify_all();
    }
    for (const auto& ps : open) close_stream(*ps);
  }

  // The APIGroup a route serves ("/apis/<group>" prefixes only), asked of its upstream.
  json routed_group(size_t route) {
    const std::string prefix = route_prefix(opt.routes[route]);
    if (prefix.rfind("/apis/", 0) != 0 || prefix.find('/', 6) != std::string::npos) return nullptr;
    auto cli = upstream_client(route);
    auto r = cli->Get(prefix.c_str(), {{"Accept", "application/json"}});
    if (!r || r->status != 200) return nullptr;
    return_upstream(route, std::move(cli));
    json g = json::parse(r->body, nullptr, false);
    if (!g.is_object()) return nullptr;
    g.erase("kind");
    g.erase("apiVersion");
    return g;
  }

  void handle_discovery(const httplib::Request& req, httplib::Response& res, const Target& t) {
    if (req.method != "GET") fail(405, "the server does not allow this method on the requested resource");
    const std::string& p = req.path;
    if (p == "/apis" || p == "/apis/") {
      // Our groups and those the routes serve, so that kubectl finds both at one address.
      json list;
      {
        std::lock_guard<std::mutex> lk(mu);
        list = api_group_list();
      }
      for (size_t i = 0; i < opt.routes.size(); ++i)
        if (json g = routed_group(i); g.is_object()) list["groups"].push_back(g);
      send_json(res, 200, list);
      return;
    }
    std::lock_guard<std::mutex> lk(mu);
    if (p == "/version" || p == "/version/") {
      send_json(res, 200, {{"major", "1"}, {"minor", "32"}, {"gitVersion", "v1.32.0"},
                           {"gitCommit", "shardguard-test-apiserver"}, {"gitTreeState", "clean"},
                           {"buildDate", "2024-12-11T00:00:00Z"}, {"goVersion", "go1.23.0"},
                           {"compiler", "gc"}, {"platform", "linux/amd64"}});
    } else if (p == "/api" || p == "/api/") {
      send_json(res, 200, {{"kind", "APIVersions"}, {"versions", {"v1"}},
                           {"serverAddressByClientCIDRs",
                            {{{"clientCIDR", "0.0.0.0/0"}, {"serverAddress", "127.0.0.1:" + std::to_string(port)}}}}});
    } else if (p == "/apis" || p == "/apis/") {
      send_json(res, 200, api_group_list());
    } else if (p == "/api/v1") {
      send_json(res, 200, api_resource_list("", "v1"));
    } else if (p.rfind("/apis/", 0) == 0 && !t.group.empty() && !t.version.empty()) {
      json l = api_resource_list(t.group, t.version);
      if (l["resources"].empty()) fail(404, "the server could not find the requested resource");
      send_json(res, 200, l);
    } else if (p.rfind("/apis/", 0) == 0) {
      std::string g = p.substr(6);
      if (!g.empty() && g.back() == '/') g.pop_back();
      json grp = api_group(g);
      if (grp.is_null()) fail(404, "the server could not find the requested resource");
      grp["kind"] = "APIGroup";
      grp["apiVersion"] = "v1";
      send_json(res, 200, grp);
    } else if (p == "/openapi/v3" || p == "/openapi/v3/") {
      send_json(res, 200, openapi_v3_root());
    } else if (p.rfind("/openapi/v3/", 0) == 0) {
      std::vector<std::string> parts;
      for (const auto& s : split(p.substr(12), '/'))
        if (!s.empty()) parts.push_back(s);
      json doc;
      if (parts.size() == 2 && parts[0] == "api") doc = openapi_v3_gv("", parts[1]);
      if (parts.size() == 3 && parts[0] == "apis") doc = openapi_v3_gv(parts[1], parts[2]);
      if (doc.is_null()) fail(404, "the server could not find the requested resource");
      send_json(res, 200, doc);
    } else {
      fail(404, "the server could not find the requested resource");
    }
  }

  static std::string param(const httplib::Request& req, const char* name) {
    return req.has_param(name) ? req.get_param_value(name) : "";
  }

  // The RequestContext of one write: strict or not; on success its warnings become
  // `Warning: 299 - "unknown field \"spec.x\""` headers, as the real server sends them.
  struct RequestScope {
    RequestContext ctx;
    httplib::Response& res;
    RequestScope(const httplib::Request& req, httplib::Response& r) : res(r) {
      ctx.strict = param(req, "fieldValidation") == "Strict";
      t_request = &ctx;
    }
    ~RequestScope() {
      t_request = nullptr;
      if (res.status >= 200 && res.status < 300)
        for (const auto& u : ctx.unknown) res.headers.emplace("Warning", "299 - \"unknown field \\\"" + u + "\\\"\"");
    }
  };

  void handle_resource(const httplib::Request& req, httplib::Response& res, const Target& tg) {
    const std::string ctype = req.get_header_value("Content-Type");
    bool as_table = req.get_header_value("Accept").find("as=Table") != std::string::npos;
    std::unique_lock<std::mutex> lk(mu);
    const ResType& t = require_type(tg.group, tg.version, tg.plural);
    bool status_sub = false;
    if (!tg.sub.empty()) {
      if (tg.sub != "status" || !t.has_status) fail(404, "the server could not find the requested resource");
      status_sub = true;
    }
    if (t.namespaced && tg.ns.empty() && !tg.name.empty())
      fail(404, "the server could not find the requested resource");
    if (t.namespaced && tg.ns.empty() && tg.verb != "list")
      fail(404, "the server could not find the requested resource");
    if (!t.namespaced && !tg.ns.empty()) fail(404, "the server could not find the requested resource");
    if (tg.verb == "get") {
      ObjPtr o = find(t.gp(), tg.ns, tg.name);
      if (!o) fail(404, t.qualified() + " \"" + tg.name + "\" not found", tg.name, t.group, t.plural);
      send_json(res, 200, as_table ? table_for(t, {o}) : out(t, *o));
    } else if (tg.verb == "list") {
      auto items = do_list(t, tg.ns, parse_label_selector(param(req, "labelSelector")),
                           parse_field_selector(param(req, "fieldSelector")));
      if (as_table) {
        send_json(res, 200, table_for(t, items));
        return;
      }
      std::string body;
      body.reserve(256 + items.size() * 1024);
      body += "{\"kind\":" + json(t.list_kind).dump() + ",\"apiVersion\":" + json(t.api_version()).dump() +
              ",\"metadata\":{\"resourceVersion\":\"" + std::to_string(rv) + "\"},\"items\":[";
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) body += ',';
        body += out(t, *items[i]).dump();
      }
      body += "]}";
      lk.unlock();
      res.status = 200;
      res.set_content(body, "application/json");
    } else if (tg.verb == "create") {
      if (!tg.name.empty()) fail(405, "the server does not allow this method on the requested resource");
      RequestScope scope(req, res);
      json obj = parse_body(req.body, ctype);
      send_json(res, 201, do_create(t, tg.ns, std::move(obj)));
    } else if (tg.verb == "update") {
      RequestScope scope(req, res);
      json obj = parse_body(req.body, ctype);
      send_json(res, 200, do_update(t, tg.ns, tg.name, std::move(obj), status_sub));
    } else if (tg.verb == "patch") {
      if (ctype.find("apply-patch") != std::string::npos && param(req, "fieldManager").empty())
        fail(422, "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
             "", "meta.k8s.io", "PatchOptions");
      RequestScope scope(req, res);
      bool created = false;
      json r = do_patch(t, tg.ns, tg.name, ctype, req.body, status_sub, &created);
      send_json(res, created ? 201 : 200, r);
    } else if (tg.verb == "delete") {
      std::string policy = param(req, "propagationPolicy");
      json pre;
      if (!trim(req.body).empty()) {
        json opts = parse_body(req.body, ctype);
        if (opts.is_object()) {
          if (policy.empty()) policy = opts.value("propagationPolicy", "");
          if (policy.empty() && opts.contains("orphanDependents") && opts["orphanDependents"] == true)
            policy = "Orphan";
          pre = opts.value("preconditions", json());
        }
      }
      if (policy.empty()) policy = "Background";
      send_json(res, 200, do_delete(t, tg.ns, tg.name, policy, pre));
    } else if (tg.verb == "deletecollection") {
      auto items = do_list(t, tg.ns, parse_label_selector(param(req, "labelSelector")),
                           parse_field_selector(param(req, "fieldSelector")));
      json removed = json::array();
      for (const auto& o : items) {
        const json& md = (*o)["metadata"];
        ObjPtr r = delete_key(ObjKey{t.gp(), md.value("namespace", ""), md.value("name", "")}, "Background");
        if (r) removed.push_back(out(t, *r));
      }
      send_json(res, 200, {{"kind", t.list_kind}, {"apiVersion", t.api_version()},
                           {"metadata", {{"resourceVersion", std::to_string(rv)}}}, {"items", removed}});
    } else {
      fail(405, "the server does not allow this method on the requested resource");
    }
  }

  void handle_watch(const httplib::Request& req, httplib::Response& res, const Target& tg) {
    std::string fsel = param(req, "fieldSelector");
    if (!tg.name.empty()) fsel = "metadata.name=" + tg.name + (fsel.empty() ? "" : "," + fsel);
    LabelSelector ls = parse_label_selector(param(req, "labelSelector"));
    FieldSelector fs = parse_field_selector(fsel);
    bool bookmarks = param(req, "allowWatchBookmarks") == "true" || param(req, "allowWatchBookmarks") == "1";
    bool send_initial = param(req, "sendInitialEvents") == "true";
    std::string from = param(req, "resourceVersion");
    long timeout_s = 0;
    try {
      if (req.has_param("timeoutSeconds")) timeout_s = std::stol(param(req, "timeoutSeconds"));
    } catch (...) {
      fail(400, "invalid timeoutSeconds");
    }
    std::shared_ptr<Watcher> w;
    std::string api_version;
    // kubectl get -w asks for Table events: each object becomes a one-row Table, the
    // column definitions only in the first one (as the real server does).
    std::shared_ptr<const ResType> table_type;
    {
      std::lock_guard<std::mutex> lk(mu);
      const ResType& t = require_type(tg.group, tg.version, tg.plural);
      if (req.get_header_value("Accept").find("as=Table") != std::string::npos)
        table_type = std::make_shared<const ResType>(t);
      if (!t.namespaced && !tg.ns.empty()) fail(404, "the server could not find the requested resource");
      api_version = t.api_version();
      if (stopping) fail(503, "the server is shutting down");
      try {
        w = start_watch(t, tg.ns, from, send_initial, std::move(ls), std::move(fs));
      } catch (const ApiError& e) {
        if (e.code() != 410) throw;
        // The real server answers 200 and an ERROR event carrying the 410 Status.
        json ev = {{"type", "ERROR"}, {"object", e.status()}};
        res.status = 200;
        res.set_content(ev.dump() + "\n", "application/json");
        return;
      }
      if (send_initial) {
        // The end of the initial events is marked by a bookmark with this annotation.
        json bm = {{"kind", t.kind}, {"apiVersion", t.api_version()},
                   {"metadata", {{"resourceVersion", std::to_string(rv)},
                                 {"annotations", {{"k8s.io/initial-events-end", "true"}}}}}};
        w->queue.emplace_back("BOOKMARK", std::make_shared<const json>(std::move(bm)));
      }
    }
    ++open_watch_count;
    using clock = std::chrono::steady_clock;
    auto deadline = timeout_s > 0 ? clock::now() + std::chrono::seconds(timeout_s) : clock::time_point::max();
    auto next_bookmark = clock::now() + opt.bookmark_interval;
    std::string kind;
    {
      std::lock_guard<std::mutex> lk(mu);
      const ResType* t = find_type(tg.group, tg.version, tg.plural);
      kind = t ? t->kind : "";
    }
    res.status = 200;
    // ";stream=watch" as the real server says; it also keeps httplib from gzipping the
    // stream (a compressor would hold events back until its buffer fills).
    res.set_chunked_content_provider(
        "application/json;stream=watch",
        [this, w, deadline, next_bookmark, bookmarks, api_version, kind, table_type,
         first_table = true](size_t, httplib::DataSink& sink) mutable {
          std::unique_lock<std::mutex> lk(mu);
          for (;;) {
            if (stopping || w->closed) {
              lk.unlock();
              sink.done();
              return true;
            }
            if (!w->queue.empty()) {
              std::string chunk;
              while (!w->queue.empty()) {
                auto [type, obj] = std::move(w->queue.front());
                w->queue.pop_front();
                json o = *obj;
                if (type != "BOOKMARK" && o.value("apiVersion", "") != api_version) o["apiVersion"] = api_version;
                if (type != "BOOKMARK" && type != "ERROR" && table_type) {
                  o = table_for(*table_type, {obj});
                  if (!first_table) o["columnDefinitions"] = json::array();
                  first_table = false;
                }
                chunk += json{{"type", type}, {"object", std::move(o)}}.dump();
                chunk += '\n';
              }
              lk.unlock();
              return sink.write(chunk.data(), chunk.size());
            }
            auto now = clock::now();
            if (now >= deadline) {
              lk.unlock();
              sink.done();
              return true;
            }
            if (bookmarks && now >= next_bookmark) {
              next_bookmark = now + opt.bookmark_interval;
              // Queue empty: every event up to rv has been sent, so rv is a safe bookmark.
              json bm = {{"type", "BOOKMARK"},
                         {"object", {{"kind", kind}, {"apiVersion", api_version},
                                     {"metadata", {{"resourceVersion", std::to_string(rv)}}}}}};
              lk.unlock();
              std::string chunk = bm.dump() + "\n";
              return sink.write(chunk.data(), chunk.size());
            }
            auto until = deadline;
            if (bookmarks) until = std::min(until, next_bookmark);
            // Wake now and then to notice a client that went away (a failed write ends it).
            until = std::min(until, now + std::chrono::milliseconds(500));
            cv.wait_until(lk, until);
          }
        },
        [this, w](bool) {
          std::lock_guard<std::mutex> lk(mu);
          watchers.erase(w);
          --open_watch_count;
          cv.notify_all();
        });
  }
};

// =====================================================================================

KubeApiServer::KubeApiServer(Options opt) : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  im.opt = std::move(opt);
  im.add_builtins();
  for (const char* ns : {"default", "kube-system", "kube-public", "kube-node-lease"}) {
    const ResType& t = im.types.at("/v1/namespaces");
    im.do_create(t, "", json{{"metadata", {{"name", ns}}}});
  }

  // Serving certificate: a CA from common/pki, a leaf for localhost / 127.0.0.1 signed here.
  CaBundle ca = create_ca("shardguard-test-apiserver-ca", std::chrono::hours(24 * 30));
  im.ca_pem = ca.cert_pem;
  Ossl<BIO> cbio(BIO_new_mem_buf(ca.cert_pem.data(), static_cast<int>(ca.cert_pem.size())));
  Ossl<X509> ca_cert(PEM_read_bio_X509(cbio.get(), nullptr, nullptr, nullptr));
  Ossl<BIO> kbio(BIO_new_mem_buf(ca.key_pem.data(), static_cast<int>(ca.key_pem.size())));
  Ossl<EVP_PKEY> ca_key(PEM_read_bio_PrivateKey(kbio.get(), nullptr, nullptr, nullptr));
  ossl_check(ca_cert && ca_key, "reading the CA");
  im.key.reset(EVP_EC_gen("P-256"));
  ossl_check(im.key != nullptr, "EVP_EC_gen");
  im.cert.reset(X509_new());
  X509* c = im.cert.get();
  X509_set_version(c, 2);
  unsigned char serial[16];
  RAND_bytes(serial, sizeof serial);
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(c));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(c), -60);
  X509_gmtime_adj(X509_getm_notAfter(c), 60L * 60 * 24 * 30);
  X509_set_pubkey(c, im.key.get());
  X509_NAME* subject = X509_get_subject_name(c);
  X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("kube-apiserver"), -1, -1, 0);
  X509_set_issuer_name(c, X509_get_subject_name(ca_cert.get()));
  add_ext(c, ca_cert.get(), NID_basic_constraints, "critical,CA:FALSE");
  add_ext(c, ca_cert.get(), NID_key_usage, "critical,digitalSignature,keyEncipherment");
  add_ext(c, ca_cert.get(), NID_ext_key_usage, "serverAuth");
  add_ext(c, ca_cert.get(), NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1");
  add_ext(c, ca_cert.get(), NID_authority_key_identifier, "keyid:always");
  ossl_check(X509_sign(c, ca_key.get(), EVP_sha256()) > 0, "X509_sign");

  im.svr = std::make_unique<httplib::SSLServer>(im.cert.get(), im.key.get());
  if (!im.svr->is_valid()) throw std::runtime_error("test apiserver: the TLS server is not valid");
  size_t threads = std::max<size_t>(im.opt.threads, 4);
  im.svr->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  im.svr->set_tcp_nodelay(true);  // else Nagle holds each small answer back ~40 ms
  im.svr->set_keep_alive_max_count(100000);
  im.svr->set_keep_alive_timeout(2);
  im.svr->set_read_timeout(30, 0);
  im.svr->set_write_timeout(30, 0);
  im.svr->set_payload_max_length(64 * 1024 * 1024);
  auto h = [this](const httplib::Request& req, httplib::Response& res) { impl_->handle(req, res); };
  im.svr->Get(".*", h);
  im.svr->Post(".*", h);
  im.svr->Put(".*", h);
  im.svr->Patch(".*", h);
  im.svr->Delete(".*", h);
  if (im.opt.port == 0) {
    im.port = im.svr->bind_to_any_port("127.0.0.1");
  } else {
    im.port = im.svr->bind_to_port("127.0.0.1", im.opt.port) ? im.opt.port : -1;
  }
  if (im.port <= 0) throw std::runtime_error("test apiserver: cannot bind 127.0.0.1:" + std::to_string(im.opt.port));
  im.listener = std::thread([this] { impl_->svr->listen_after_bind(); });
  for (int i = 0; i < 500 && !im.svr->is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
}

KubeApiServer::~KubeApiServer() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stopping = true;
    impl_->cv.notify_all();
  }
  impl_->close_proxied(true);
  impl_->svr->stop();
  if (impl_->listener.joinable()) impl_->listener.join();
}

int KubeApiServer::port() const { return impl_->port; }
std::string KubeApiServer::url() const { return "https://127.0.0.1:" + std::to_string(impl_->port); }
const std::string& KubeApiServer::ca_pem() const { return impl_->ca_pem; }
const std::string& KubeApiServer::token() const { return impl_->opt.token; }

std::string KubeApiServer::write_kubeconfig(const std::string& path, const std::string& ns) const {
  std::ostringstream y;
  y << "apiVersion: v1\n"
    << "kind: Config\n"
    << "clusters:\n"
    << "- name: shardguard-test\n"
    << "  cluster:\n"
    << "    server: " << url() << "\n"
    << "    certificate-authority-data: " << base64(impl_->ca_pem) << "\n"
    << "users:\n"
    << "- name: test-user\n"
    << "  user:\n"
    << "    token: " << impl_->opt.token << "\n"
    << "contexts:\n"
    << "- name: shardguard-test\n"
    << "  context:\n"
    << "    cluster: shardguard-test\n"
    << "    user: test-user\n"
    << "    namespace: " << ns << "\n"
    << "current-context: shardguard-test\n";
  std::ofstream f(path, std::ios::trunc);
  f << y.str();
  f.close();
  if (!f) throw std::runtime_error("test apiserver: cannot write " + path);
  return path;
}

json KubeApiServer::create(const std::string& group, const std::string& version, const std::string& plural,
                           const std::string& ns, json obj) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->do_create(impl_->require_type(group, version, plural), ns, std::move(obj));
}

std::optional<json> KubeApiServer::get(const std::string& group, const std::string& version,
                                       const std::string& plural, const std::string& ns,
                                       const std::string& name) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const ResType& t = impl_->require_type(group, version, plural);
  ObjPtr o = impl_->find(t.gp(), t.namespaced ? ns : "", name);
  if (!o) return std::nullopt;
  return impl_->out(t, *o);
}

std::vector<json> KubeApiServer::list(const std::string& group, const std::string& version,
                                      const std::string& plural, const std::string& ns,
                                      const std::string& label_selector) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const ResType& t = impl_->require_type(group, version, plural);
  std::vector<json> res;
  for (const auto& o : impl_->do_list(t, t.namespaced ? ns : "", parse_label_selector(label_selector), {}))
    res.push_back(impl_->out(t, *o));
  return res;
}

json KubeApiServer::update(const std::string& group, const std::string& version, const std::string& plural,
                           const std::string& ns, json obj, bool status) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const ResType& t = impl_->require_type(group, version, plural);
  std::string name = obj.is_object() && obj.contains("metadata") ? obj["metadata"].value("name", "") : "";
  return impl_->do_update(t, ns, name, std::move(obj), status);
}

void KubeApiServer::remove(const std::string& group, const std::string& version, const std::string& plural,
                           const std::string& ns, const std::string& name) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->do_delete(impl_->require_type(group, version, plural), ns, name, "Background", json());
}

void KubeApiServer::fail_next(int count, int http_code, std::string method, std::string path_substring) {
  if (count <= 0) return;
  std::lock_guard<std::mutex> lk(impl_->fmu);
  impl_->faults.push_back(Fault{count, http_code, std::move(method), std::move(path_substring)});
}

void KubeApiServer::set_latency(std::chrono::milliseconds per_request) {
  std::lock_guard<std::mutex> lk(impl_->fmu);
  impl_->latency = per_request;
}

void KubeApiServer::drop_watches() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    for (const auto& w : impl_->watchers) w->closed = true;
    impl_->cv.notify_all();
  }
  impl_->close_proxied(false);
}

void KubeApiServer::compact() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->history.clear();
  impl_->history_floor = impl_->rv;
}

std::vector<KubeApiServer::RequestRecord> KubeApiServer::requests() const {
  std::lock_guard<std::mutex> lk(impl_->fmu);
  return impl_->log;
}

void KubeApiServer::clear_requests() {
  std::lock_guard<std::mutex> lk(impl_->fmu);
  impl_->log.clear();
}

size_t KubeApiServer::open_watches() const { return impl_->open_watch_count.load(); }

std::string KubeApiServer::resource_version() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return std::to_string(impl_->rv);
}

json KubeApiServer::dump() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  std::vector<json> items;
  for (const auto& [gp, objs] : impl_->store) {
    const ResType* t = impl_->storage_type(gp);
    if (!t) continue;
    for (const auto& [key, o] : objs) items.push_back(impl_->out(*t, *o));
  }
  std::sort(items.begin(), items.end(), [](const json& a, const json& b) {
    auto k = [](const json& o) {
      return std::make_tuple(o.value("apiVersion", ""), o.value("kind", ""),
                             o["metadata"].value("namespace", ""), o["metadata"].value("name", ""));
    };
    return k(a) < k(b);
  });
  return {{"items", items}};
}

}  // namespace shardguard::testing
