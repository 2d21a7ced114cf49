// A test Kubernetes API server (issue 4): the one stand-in for Kubernetes that the
// operator's integration tests, the kubectl check and the benchmark run against.
//
// It speaks the real REST and watch protocol over HTTPS with bearer-token auth and
// implements the real semantics in memory (issue 14 compares several of them with the
// real Kubernetes API server: tests/apiserver/realapi_compare.cpp): one global resourceVersion counter,
// optimistic concurrency (409 Conflict), generation, the status subresource,
// finalizers and deletionTimestamp, ownerReference garbage collection (background,
// synchronous and recursive), label and field selectors, list + watch from a
// resourceVersion with a bounded event history (410 Expired), bookmarks, CRDs that
// register new resources (with structural defaults and printer columns for tables),
// and discovery good enough for kubectl. Fault injection and a request log let tests
// provoke errors and count writes.
//
// Resources are named by (group, version, plural): group "" is the core group
// ("/api/v1"); ns "" is for cluster-scoped resources (and "all namespaces" in list).
// Direct calls throw ApiError (carrying the Status object) on the same failures the
// HTTP API reports (404, 409, 400, 422), and produce the same watch events.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace shardguard::testing {

// A failure of a direct call: `status` is the Kubernetes Status object the HTTP API
// would have answered with (kind Status, code, reason, message, details).
class ApiError : public std::runtime_error {
 public:
  ApiError(int code, std::string reason, const std::string& message, nlohmann::json status)
      : std::runtime_error(message), code_(code), reason_(std::move(reason)),
        status_(std::move(status)) {}
  int code() const { return code_; }
  const std::string& reason() const { return reason_; }  // NotFound, AlreadyExists, Conflict, ...
  const nlohmann::json& status() const { return status_; }

 private:
  int code_;
  std::string reason_;
  nlohmann::json status_;
};

// A path prefix that the test server forwards to another API server instead of serving
// it itself (KubeApiServerOptions::routes): typically "/apis/shardguard.io" to the real
// Kubernetes API server of tests/realapi, so that one address serves the custom API
// group from the real thing and the core kinds from the test server. Every request whose
// path is `prefix` or lies under `prefix/` goes upstream over HTTPS with the client
// certificate below (the caller's bearer token is checked here and not passed on):
// method, path, query, body, Content-Type, Accept and User-Agent. The answer comes back
// as the upstream sent it (status, body, Content-Type, Warning headers); a watch is
// streamed event by event. Fault injection, latency and the request log apply to
// routed requests too; drop_watches() also ends routed watches. Direct calls (create,
// get, ...) never route: a routed group is not served by this process at all.
struct KubeApiRoute {
  std::string prefix;              // e.g. "/apis/shardguard.io" (a trailing '/' is ignored)
  std::string host = "127.0.0.1";  // the upstream API server
  int port = 0;
  std::string ca_file;             // PEM CA that signed the upstream's serving certificate
  std::string cert_file, key_file; // PEM client certificate and key presented upstream
};

// KubeApiServer::Options (outside the class so that `Options opt = {}` works as a
// default argument).
struct KubeApiServerOptions {
  std::string token = "test-token";  // the one accepted bearer token (user "test-user")
  int port = 0;                      // 0 = pick a free port on 127.0.0.1
  size_t history_limit = 10000;      // watch events kept; older resourceVersions get 410
  std::chrono::milliseconds bookmark_interval{1000};
  size_t threads = 128;              // HTTP worker threads (each open watch holds one)
  std::vector<KubeApiRoute> routes;  // path prefixes served by another API server
};

class KubeApiServer {
 public:
  using Options = KubeApiServerOptions;

  explicit KubeApiServer(Options opt = {});  // serving HTTPS on 127.0.0.1 when it returns
  ~KubeApiServer();                          // ends every watch, stops and joins everything
  KubeApiServer(const KubeApiServer&) = delete;
  KubeApiServer& operator=(const KubeApiServer&) = delete;

  int port() const;
  std::string url() const;            // https://127.0.0.1:PORT
  const std::string& ca_pem() const;  // the CA that signed the serving certificate
  const std::string& token() const;
  // Writes a kubeconfig (token auth, certificate-authority-data, context namespace
  // `ns`) to `path` and returns `path`.
  std::string write_kubeconfig(const std::string& path, const std::string& ns = "default") const;

  // ---- direct access (the test plays kubelet / scheduler / user) ----------------
  // Same semantics and the same watch events as the HTTP API. Objects need not carry
  // apiVersion/kind; the returned ones always do. Throws ApiError.
  nlohmann::json create(const std::string& group, const std::string& version,
                        const std::string& plural, const std::string& ns, nlohmann::json obj);
  std::optional<nlohmann::json> get(const std::string& group, const std::string& version,
                                    const std::string& plural, const std::string& ns,
                                    const std::string& name) const;
  // ns "" = every namespace. label_selector uses the Kubernetes syntax.
  std::vector<nlohmann::json> list(const std::string& group, const std::string& version,
                                   const std::string& plural, const std::string& ns = "",
                                   const std::string& label_selector = "") const;
  // Like PUT (status=false) or PUT …/status (status=true): a metadata.resourceVersion
  // that is not the current one → ApiError 409 Conflict; none = unconditional for the
  // built-in kinds, ApiError 422 for custom resources and CRDs (as Kubernetes does).
  nlohmann::json update(const std::string& group, const std::string& version,
                        const std::string& plural, const std::string& ns, nlohmann::json obj,
                        bool status = false);
  // Like DELETE (background propagation). Missing → ApiError 404.
  void remove(const std::string& group, const std::string& version, const std::string& plural,
              const std::string& ns, const std::string& name);

  // ---- fault injection ----------------------------------------------------------
  // The next `count` HTTP requests whose method equals `method` ("" = any) and whose
  // path contains `path_substring` ("" = any) get a Status error with `http_code`
  // (reason derived from the code: 500 InternalError, 503 ServiceUnavailable,
  // 429 TooManyRequests, 409 Conflict, 404 NotFound, ...). Direct calls are not affected.
  void fail_next(int count, int http_code, std::string method = "", std::string path_substring = "");
  void set_latency(std::chrono::milliseconds per_request);  // added to every HTTP request
  void drop_watches();  // closes every open watch stream now
  void compact();       // forgets the event history: a watch from any older RV gets 410

  // ---- observations -------------------------------------------------------------
  struct RequestRecord {
    std::string verb;  // get list watch create update patch delete (Kubernetes names); "" for
                       // non-resource requests (discovery, /version, ...)
    std::string method, path, group, version, resource, subresource, ns, name, user_agent;
    int code = 0;
  };
  std::vector<RequestRecord> requests() const;
  void clear_requests();
  size_t open_watches() const;
  std::string resource_version() const;  // the current global resourceVersion
  // Every stored object: {"items": [obj, ...]} with apiVersion/kind set, sorted by
  // apiVersion, kind, namespace, name.
  nlohmann::json dump() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardguard::testing
