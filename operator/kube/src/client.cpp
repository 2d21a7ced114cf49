#include "shardguard/kube/client.h"

#include <cctype>
#include <chrono>
#include <optional>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

// Debian's libcpp-httplib is compiled with these; every user must see the same ones
// (the httplib::httplib target passes them; repeated here for safety).
#include "shardguard/common/httplib.h"
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include "shardguard/common/log.h"
#include "shardguard/common/strings.h"

namespace shardguard::kube {
namespace {

using json = nlohmann::json;

constexpr time_t kConnectTimeoutS = 5;
constexpr time_t kReadTimeoutS = 30;
constexpr size_t kMaxIdleClients = 8;
constexpr auto kTokenRefresh = std::chrono::seconds(60);
constexpr auto kWatchStopPoll = std::chrono::milliseconds(100);

struct Endpoint {
  bool tls = true;
  std::string host;  // without brackets
  int port = 443;
  std::string host_header;
};

Endpoint parse_server(const std::string& server) {
  Endpoint ep;
  std::string rest;
  if (server.rfind("https://", 0) == 0) {
    rest = server.substr(8);
  } else if (server.rfind("http://", 0) == 0) {
    ep.tls = false;
    ep.port = 80;
    rest = server.substr(7);
  } else {
    throw ConfigError("server \"" + server + "\": must start with https:// or http://");
  }
  const auto slash = rest.find('/');
  if (slash != std::string::npos) {
    if (rest.find_first_not_of('/', slash) != std::string::npos) {
      throw ConfigError("server \"" + server + "\": a path prefix is not supported");
    }
    rest = rest.substr(0, slash);
  }
  std::string port;
  if (!rest.empty() && rest[0] == '[') {
    const auto close = rest.find(']');
    if (close == std::string::npos) throw ConfigError("server \"" + server + "\": unbalanced [ in the host");
    ep.host = rest.substr(1, close - 1);
    if (close + 1 < rest.size()) {
      if (rest[close + 1] != ':') throw ConfigError("server \"" + server + "\": junk after the IPv6 host");
      port = rest.substr(close + 2);
    }
  } else {
    const auto colon = rest.find(':');
    ep.host = rest.substr(0, colon);
    if (colon != std::string::npos) port = rest.substr(colon + 1);
  }
  if (ep.host.empty()) throw ConfigError("server \"" + server + "\": no host");
  if (!port.empty()) {
    if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos) {
      throw ConfigError("server \"" + server + "\": bad port \"" + port + "\"");
    }
    ep.port = std::stoi(port);
    if (ep.port < 1 || ep.port > 65535) throw ConfigError("server \"" + server + "\": bad port \"" + port + "\"");
  }
  const bool v6 = ep.host.find(':') != std::string::npos;
  ep.host_header = v6 ? "[" + ep.host + "]" : ep.host;
  if ((ep.tls && ep.port != 443) || (!ep.tls && ep.port != 80)) ep.host_header += ":" + std::to_string(ep.port);
  return ep;
}

std::string reason_for(int code) {
  switch (code) {
    case 400: return "BadRequest";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "NotFound";
    case 405: return "MethodNotAllowed";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 415: return "UnsupportedMediaType";
    case 422: return "Invalid";
    case 429: return "TooManyRequests";
    case 500: return "InternalError";
    case 503: return "ServiceUnavailable";
    case 504: return "Timeout";
    default: return "";
  }
}

ApiError status_error(const std::string& verb, const std::string& path, int http_code, const std::string& body) {
  int code = http_code;
  std::string reason, message;
  const json st = json::parse(body, nullptr, false);
  if (st.is_object()) {
    if (st.contains("code") && st["code"].is_number_integer() && http_code == 0) code = st["code"].get<int>();
    if (st.contains("reason") && st["reason"].is_string()) reason = st["reason"].get<std::string>();
    if (st.contains("message") && st["message"].is_string()) message = st["message"].get<std::string>();
  } else {
    message = body.substr(0, 256);
  }
  if (reason.empty()) reason = reason_for(code);
  return ApiError(code, reason,
                  verb + " " + path + ": " + std::to_string(code) + (reason.empty() ? "" : " " + reason) +
                      (message.empty() ? "" : ": " + message));
}

// Verifies the server's chain against the configured CAs only (not the system store,
// which httplib adds to the context's store).
int verify_with_ca_stack(X509_STORE_CTX* ctx, void* arg) {
  X509_STORE_CTX_set0_trusted_stack(ctx, static_cast<STACK_OF(X509)*>(arg));
  return X509_verify_cert(ctx);
}

void free_x509_stack(STACK_OF(X509)* sk) { sk_X509_pop_free(sk, X509_free); }

}  // namespace

struct Client::Impl {
  Config cfg;
  std::string user_agent;
  std::chrono::milliseconds timeout{kReadTimeoutS * 1000};  // non-watch calls
  Endpoint ep;
  STACK_OF(X509)* ca_stack = nullptr;
  X509* client_cert = nullptr;
  EVP_PKEY* client_key = nullptr;

  std::mutex pool_mu;
  std::vector<std::unique_ptr<httplib::ClientImpl>> pool;

  std::mutex token_mu;
  std::string token;
  std::chrono::steady_clock::time_point token_read{};

  std::atomic<uint64_t> gets{0}, lists{0}, watches{0}, creates{0}, updates{0}, patches{0}, deletes{0};

  ~Impl() {
    pool.clear();
    if (ca_stack) free_x509_stack(ca_stack);
    X509_free(client_cert);
    EVP_PKEY_free(client_key);
  }

  void load_pem() {
    if (!ep.tls) return;
    if (!cfg.ca_pem.empty() && !cfg.insecure_skip_verify) {
      ca_stack = sk_X509_new_null();
      BIO* bio = BIO_new_mem_buf(cfg.ca_pem.data(), static_cast<int>(cfg.ca_pem.size()));
      while (X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) sk_X509_push(ca_stack, x);
      BIO_free(bio);
      ERR_clear_error();
      if (sk_X509_num(ca_stack) == 0) throw ConfigError("ca_pem: no PEM certificate found");
    }
    if (!cfg.client_cert_pem.empty() || !cfg.client_key_pem.empty()) {
      BIO* bio = BIO_new_mem_buf(cfg.client_cert_pem.data(), static_cast<int>(cfg.client_cert_pem.size()));
      client_cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
      BIO_free(bio);
      bio = BIO_new_mem_buf(cfg.client_key_pem.data(), static_cast<int>(cfg.client_key_pem.size()));
      client_key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
      BIO_free(bio);
      ERR_clear_error();
      if (!client_cert) throw ConfigError("client_cert_pem: no PEM certificate found");
      if (!client_key) throw ConfigError("client_key_pem: no PEM private key found");
      if (X509_check_private_key(client_cert, client_key) != 1) {
        ERR_clear_error();
        throw ConfigError("client_key_pem: does not match client_cert_pem");
      }
    }
  }

  std::string bearer() {
    std::lock_guard<std::mutex> lock(token_mu);
    if (!cfg.token_file.empty()) {
      const auto now = std::chrono::steady_clock::now();
      if (token.empty() || now - token_read >= kTokenRefresh) {
        std::ifstream in(cfg.token_file, std::ios::binary);
        std::ostringstream ss;
        if (in) ss << in.rdbuf();
        std::string t = ss.str();
        while (!t.empty() && (t.back() == '\n' || t.back() == '\r' || t.back() == ' ')) t.pop_back();
        if (!t.empty()) {
          token = t;
          token_read = now;
        } else {
          log::warn("cannot read the token file; using the last token", {{"file", cfg.token_file}});
          if (token.empty()) token = cfg.token;
          token_read = now;
        }
      }
      return token;
    }
    return cfg.token;
  }

  // A connection whose waits are all bounded by `limit` (the connect also by 5 s).
  std::unique_ptr<httplib::ClientImpl> make_client(std::chrono::milliseconds limit) {
    std::unique_ptr<httplib::ClientImpl> c;
    if (ep.tls) {
      auto ssl = std::make_unique<httplib::SSLClient>(ep.host, ep.port, client_cert, client_key);
      if (!ssl->is_valid()) throw ApiError(0, "", "cannot set up a TLS context for " + cfg.server);
      ssl->enable_server_certificate_verification(!cfg.insecure_skip_verify);
      if (ca_stack) SSL_CTX_set_cert_verify_callback(ssl->ssl_context(), verify_with_ca_stack, ca_stack);
      c = std::move(ssl);
    } else {
      c = std::make_unique<httplib::ClientImpl>(ep.host, ep.port);
    }
    c->set_connection_timeout(std::min<std::chrono::milliseconds>(limit, std::chrono::seconds(kConnectTimeoutS)));
    c->set_read_timeout(limit);
    c->set_write_timeout(limit);
    c->set_url_encode(false);
    c->set_tcp_nodelay(true);  // headers and body go in separate writes: no Nagle delay
    c->set_follow_location(false);
    return c;
  }

  httplib::Request request(const std::string& method, const std::string& path) {
    httplib::Request req;
    req.method = method;
    req.path = path;
    req.headers.emplace("Host", ep.host_header);
    req.headers.emplace("Accept", "application/json");
    req.headers.emplace("User-Agent", user_agent);
    const std::string t = bearer();
    if (!t.empty()) req.headers.emplace("Authorization", "Bearer " + t);
    return req;
  }

  // One non-watch call; returns the parsed body of a 2xx answer, else throws ApiError.
  json call(const std::string& verb, const std::string& method, const std::string& path,
            const std::string& body = "", const std::string& content_type = "") {
    httplib::Request req = request(method, path);
    if (!content_type.empty()) {
      req.headers.emplace("Content-Type", content_type);
      req.body = body;
    }
    // A reused keep-alive connection the server has closed fails at once; retry such a
    // failure once on a fresh connection (never another pooled one: after an idle spell
    // they are all closed), but only for requests that are safe to repeat.
    const bool repeatable = method == "GET" || method == "PUT" || method == "DELETE";
    for (int attempt = 0; attempt < 2; ++attempt) {
      std::unique_ptr<httplib::ClientImpl> cli;
      bool reused = false;
      if (attempt == 0) {
        std::lock_guard<std::mutex> lock(pool_mu);
        if (!pool.empty()) {
          cli = std::move(pool.back());
          pool.pop_back();
          reused = true;
        }
      }
      if (!cli) {
        cli = make_client(timeout);
        cli->set_keep_alive(true);
      }
      httplib::Result res = cli->send(req);
      if (!res) {
        const std::string err = httplib::to_string(res.error());
        if (reused && repeatable && attempt == 0) continue;
        std::string detail;
        if (res.error() == httplib::Error::SSLServerVerification) detail = " (server certificate not trusted)";
        throw ApiError(0, "", verb + " " + path + ": transport error: " + err + detail);
      }
      {
        std::lock_guard<std::mutex> lock(pool_mu);
        if (pool.size() < kMaxIdleClients) pool.push_back(std::move(cli));
      }
      if (res->status < 200 || res->status >= 300) throw status_error(verb, path, res->status, res->body);
      if (res->body.empty()) return json::object();
      json out = json::parse(res->body, nullptr, false);
      if (out.is_discarded()) throw ApiError(res->status, "", verb + " " + path + ": the answer is not JSON");
      return out;
    }
    throw ApiError(0, "", verb + " " + path + ": transport error");  // not reached
  }

  std::string ns_of(const Resource& res, const std::string& ns) const { return res.namespaced ? ns : ""; }
};

Client::Client(Config cfg, std::string user_agent, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()) {
  if (timeout <= std::chrono::milliseconds(0)) throw ConfigError("client timeout must be positive");
  impl_->timeout = timeout;
  impl_->ep = parse_server(cfg.server);
  impl_->cfg = std::move(cfg);
  impl_->user_agent = std::move(user_agent);
  impl_->load_pem();
}

Client::~Client() = default;

json Client::get(const Resource& res, const std::string& ns, const std::string& name) {
  impl_->gets++;
  return impl_->call("get", "GET", res.path(impl_->ns_of(res, ns), name));
}

ListResult Client::list(const Resource& res, const std::string& ns, const std::string& label_selector) {
  impl_->lists++;
  std::string path = res.path(impl_->ns_of(res, ns));
  if (!label_selector.empty()) path += "?labelSelector=" + url_encode(label_selector);
  json body = impl_->call("list", "GET", path);
  ListResult out;
  if (body.contains("metadata") && body["metadata"].is_object()) {
    out.resource_version = body["metadata"].value("resourceVersion", "");
  }
  if (body.contains("items") && body["items"].is_array()) {
    out.items.reserve(body["items"].size());
    for (auto& item : body["items"]) {
      if (!item.is_object()) continue;
      if (!item.contains("apiVersion")) item["apiVersion"] = res.api_version();
      if (!item.contains("kind")) item["kind"] = res.kind;
      out.items.push_back(std::move(item));
    }
  }
  return out;
}

json Client::create(const Resource& res, const std::string& ns, const json& obj) {
  impl_->creates++;
  return impl_->call("create", "POST", res.path(impl_->ns_of(res, ns)), obj.dump(), "application/json");
}

namespace {
std::string name_of(const json& obj, const std::string& verb) {
  if (obj.is_object() && obj.contains("metadata") && obj["metadata"].is_object() &&
      obj["metadata"].contains("name") && obj["metadata"]["name"].is_string()) {
    return obj["metadata"]["name"].get<std::string>();
  }
  throw ApiError(400, "BadRequest", verb + ": the object has no metadata.name");
}
}  // namespace

json Client::update(const Resource& res, const std::string& ns, const json& obj) {
  impl_->updates++;
  return impl_->call("update", "PUT", res.path(impl_->ns_of(res, ns), name_of(obj, "update")), obj.dump(),
                     "application/json");
}

json Client::update_status(const Resource& res, const std::string& ns, const json& obj) {
  impl_->updates++;
  return impl_->call("update", "PUT", res.path(impl_->ns_of(res, ns), name_of(obj, "update"), "status"),
                     obj.dump(), "application/json");
}

json Client::patch(const Resource& res, const std::string& ns, const std::string& name, const json& patch,
                   PatchType type, const std::string& subresource) {
  impl_->patches++;
  const char* ct = type == PatchType::kMerge            ? "application/merge-patch+json"
                   : type == PatchType::kStrategicMerge ? "application/strategic-merge-patch+json"
                                                        : "application/json-patch+json";
  return impl_->call("patch", "PATCH", res.path(impl_->ns_of(res, ns), name, subresource), patch.dump(), ct);
}

void Client::remove(const Resource& res, const std::string& ns, const std::string& name,
                    const std::string& propagation, const std::string& uid) {
  impl_->deletes++;
  json opts = {{"kind", "DeleteOptions"}, {"apiVersion", "v1"}};
  if (!propagation.empty()) opts["propagationPolicy"] = propagation;
  if (!uid.empty()) opts["preconditions"] = {{"uid", uid}};
  impl_->call("delete", "DELETE", res.path(impl_->ns_of(res, ns), name), opts.dump(), "application/json");
}

void Client::watch(const Resource& res, const std::string& ns, const std::string& label_selector,
                   const std::string& resource_version, const std::function<bool(const WatchEvent&)>& on_event,
                   const std::atomic<bool>& stop, int timeout_seconds) {
  impl_->watches++;
  if (stop.load()) return;
  if (timeout_seconds < 1) timeout_seconds = 1;
  std::string path = res.path(impl_->ns_of(res, ns)) + "?watch=1&allowWatchBookmarks=true&timeoutSeconds=" +
                     std::to_string(timeout_seconds);
  if (!resource_version.empty()) path += "&resourceVersion=" + url_encode(resource_version);
  if (!label_selector.empty()) path += "&labelSelector=" + url_encode(label_selector);

  // A client of its own: the read timeout outlives the server's timeoutSeconds, and
  // stop() on it (from the stopper thread below) shuts the socket down at once.
  std::unique_ptr<httplib::ClientImpl> cli = impl_->make_client(std::chrono::seconds(timeout_seconds + 30));
  cli->set_keep_alive(false);

  int status = 0;
  std::string error_body;
  std::string buffer;
  bool ended_by_handler = false;
  std::optional<ApiError> event_error;

  auto dispatch = [&](const std::string& line) -> bool {
    if (line.find_first_not_of(" \t\r") == std::string::npos) return true;
    json ev = json::parse(line, nullptr, false);
    if (!ev.is_object() || !ev.contains("type") || !ev["type"].is_string()) {
      event_error = ApiError(0, "", "watch " + path + ": a malformed event: " + line.substr(0, 200));
      return false;
    }
    WatchEvent we{ev["type"].get<std::string>(), ev.contains("object") ? std::move(ev["object"]) : json::object()};
    if (we.type == "ERROR") {
      const json& st = we.object;
      const int code = st.is_object() && st.contains("code") && st["code"].is_number_integer() ? st["code"].get<int>() : 500;
      std::string reason = st.is_object() ? st.value("reason", "") : "";
      if (reason.empty()) reason = reason_for(code);
      const std::string message = st.is_object() ? st.value("message", "") : "";
      event_error = ApiError(code, reason, "watch " + path + ": " + std::to_string(code) + " " + reason +
                                               (message.empty() ? "" : ": " + message));
      return false;
    }
    if (!on_event(we)) {
      ended_by_handler = true;
      return false;
    }
    return !stop.load();
  };

  httplib::Request req = impl_->request("GET", path);
  req.response_handler = [&](const httplib::Response& r) {
    status = r.status;
    return true;
  };
  // An exception from on_event must not unwind through httplib (and past the stopper
  // thread below): it ends the stream and is rethrown once the thread is joined.
  std::exception_ptr handler_error;
  req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) -> bool {
    if (status < 200 || status >= 300) {
      if (error_body.size() < 65536) error_body.append(data, len);
      return true;
    }
    try {
      buffer.append(data, len);
      size_t start = 0;
      for (size_t nl = buffer.find('\n', start); nl != std::string::npos; nl = buffer.find('\n', start)) {
        const std::string line = buffer.substr(start, nl - start);
        start = nl + 1;
        if (!dispatch(line)) {
          buffer.clear();
          return false;
        }
      }
      buffer.erase(0, start);
      return true;
    } catch (...) {
      handler_error = std::current_exception();
      return false;
    }
  };

  // The stopper: while the request runs, watch `stop` and shut the socket down once it
  // is set (repeatedly, in case the first call came before the socket was opened).
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  std::thread stopper([&] {
    std::unique_lock<std::mutex> lock(mu);
    while (!finished) {
      cv.wait_for(lock, kWatchStopPoll);
      if (!finished && stop.load()) cli->stop();
    }
  });
  httplib::Result result = cli->send(req);
  {
    std::lock_guard<std::mutex> lock(mu);
    finished = true;
  }
  cv.notify_all();
  stopper.join();

  if (handler_error) std::rethrow_exception(handler_error);
  if (event_error) throw *event_error;
  if (ended_by_handler || stop.load()) return;
  if (status != 0 && (status < 200 || status >= 300)) {
    throw status_error("watch", path, status, error_body);
  }
  if (!result) {
    if (status >= 200 && status < 300) {
      // The server answered and then closed the stream (or it went quiet past the read
      // timeout): a normal end of a watch, as client-go treats an unexpected EOF.
      if (!buffer.empty()) dispatch(buffer);
      if (event_error) throw *event_error;
      return;
    }
    std::string detail;
    if (result.error() == httplib::Error::SSLServerVerification) detail = " (server certificate not trusted)";
    throw ApiError(0, "", "watch " + path + ": transport error: " + httplib::to_string(result.error()) + detail);
  }
  if (!buffer.empty()) dispatch(buffer);
  if (event_error) throw *event_error;
}

ClientStats Client::stats() const {
  ClientStats s;
  s.gets = impl_->gets.load();
  s.lists = impl_->lists.load();
  s.watches = impl_->watches.load();
  s.creates = impl_->creates.load();
  s.updates = impl_->updates.load();
  s.patches = impl_->patches.load();
  s.deletes = impl_->deletes.load();
  return s;
}

const Config& Client::config() const { return impl_->cfg; }

}  // namespace shardguard::kube
