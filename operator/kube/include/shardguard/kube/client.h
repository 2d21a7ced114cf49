// A small Kubernetes REST client: get, list, create, update, status, patch, delete
// and watch, over HTTPS (cpp-httplib + OpenSSL) with bearer-token or client
// certificate authentication. Thread-safe: any number of threads may call one Client.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/kube/config.h"
#include "shardguard/kube/resource.h"

namespace shardguard::kube {

// A failed call. code(): the HTTP status, 0 for a transport error (connection
// refused, TLS failure, timeout). reason(): Status.reason ("NotFound", "Conflict",
// "AlreadyExists", "Expired", "Gone", ...). what() names verb, path, code, reason, message.
class ApiError : public std::runtime_error {
 public:
  ApiError(int code, std::string reason, const std::string& what)
      : std::runtime_error(what), code_(code), reason_(std::move(reason)) {}
  int code() const { return code_; }
  const std::string& reason() const { return reason_; }

 private:
  int code_;
  std::string reason_;
};

struct ListResult {
  std::vector<nlohmann::json> items;  // apiVersion and kind filled in from the Resource
  std::string resource_version;       // the list's metadata.resourceVersion
};

struct WatchEvent {
  std::string type;  // ADDED MODIFIED DELETED BOOKMARK ERROR
  nlohmann::json object;
};

enum class PatchType { kMerge, kStrategicMerge, kJson };

struct ClientStats {
  uint64_t gets = 0, lists = 0, watches = 0, creates = 0, updates = 0, patches = 0, deletes = 0;
  uint64_t writes() const { return creates + updates + patches + deletes; }
};

class Client {
 public:
  // Throws ConfigError on an unusable config (server URL, PEM data). `timeout` bounds
  // each non-watch call's connect, send and wait for the answer (a call past it throws
  // ApiError code 0); watches have their own (timeoutSeconds + 30 s).
  explicit Client(Config cfg, std::string user_agent = "shardguard-operator",
                  std::chrono::milliseconds timeout = std::chrono::seconds(30));
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  nlohmann::json get(const Resource& res, const std::string& ns, const std::string& name);
  ListResult list(const Resource& res, const std::string& ns, const std::string& label_selector = "");
  nlohmann::json create(const Resource& res, const std::string& ns, const nlohmann::json& obj);
  // PUT; metadata.resourceVersion is the precondition → ApiError 409 when stale.
  nlohmann::json update(const Resource& res, const std::string& ns, const nlohmann::json& obj);
  // PUT .../status
  nlohmann::json update_status(const Resource& res, const std::string& ns, const nlohmann::json& obj);
  nlohmann::json patch(const Resource& res, const std::string& ns, const std::string& name,
                       const nlohmann::json& patch, PatchType type, const std::string& subresource = "");
  // DELETE with DeleteOptions{propagationPolicy}; missing → ApiError 404. With a
  // uid, DeleteOptions.preconditions.uid too: an object of that name with another uid
  // (deleted and created again since the caller read it) is left alone → ApiError 409.
  void remove(const Resource& res, const std::string& ns, const std::string& name,
              const std::string& propagation = "Background", const std::string& uid = "");

  // Streams ?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T
  // [&labelSelector=S] and calls on_event for each event, on the calling thread;
  // on_event returning false ends the watch. Returns normally when the server ends
  // the stream (or drops the connection after answering 200), when on_event returns
  // false, or within about 100 ms of `stop` becoming true. An HTTP error status
  // throws ApiError; an ERROR event carrying a Status throws ApiError with its code
  // (410 Expired → code 410); a failure to connect throws ApiError code 0.
  void watch(const Resource& res, const std::string& ns, const std::string& label_selector,
             const std::string& resource_version,
             const std::function<bool(const WatchEvent&)>& on_event, const std::atomic<bool>& stop,
             int timeout_seconds = 300);

  ClientStats stats() const;
  const Config& config() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardguard::kube
