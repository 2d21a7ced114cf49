// An informer: list + watch one resource into a local cache and tell handlers about
// every change, surviving dropped watches, expired resourceVersions (410 → relist)
// and API errors (reconnect with exponential backoff).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/kube/api_availability.h"
#include "shardguard/kube/client.h"
#include "shardguard/kube/resource.h"

namespace shardguard::kube {

struct InformerOptions {
  std::chrono::milliseconds initial_backoff{200}, max_backoff{30000};
  int watch_timeout_seconds = 300;
  // 0 = none; else about every `resync` call on_update(obj, obj) for every cached object.
  std::chrono::seconds resync{0};
  // Applied to every object before it is cached or handed to a handler (client-go's
  // SetTransform): drop what the controller never reads to keep the cache small.
  // Must keep metadata.name, namespace and resourceVersion.
  std::function<void(nlohmann::json&)> transform;
  // Optional: told when the server answers 404 to the list or watch (the resource is
  // not served: the informer keeps retrying with backoff) and when a list succeeds.
  ApiAvailability* availability = nullptr;
};

// Thread-safety: get/list/has_synced/wait_for_sync/relists/reconnects may be called
// from any thread. Handlers run on the informer's own thread, one at a time, never
// under the cache lock (they may call get/list). Not copyable or movable.
class Informer {
 public:
  struct Handlers {
    std::function<void(const nlohmann::json&)> on_add;
    std::function<void(const nlohmann::json& old_obj, const nlohmann::json& new_obj)> on_update;
    std::function<void(const nlohmann::json&)> on_delete;
  };

  Informer(Client& client, Resource res, std::string ns /* "" = all */, std::string label_selector,
           Handlers h, InformerOptions opt = {});
  ~Informer();  // stops
  Informer(const Informer&) = delete;
  Informer& operator=(const Informer&) = delete;

  // Starts the background thread: list, replace the cache (emitting add/update/delete
  // against the old cache), then watch from the list's resourceVersion with bookmarks;
  // on a normal stream end re-watch from the newest resourceVersion seen; on 410
  // relist; on any other error retry with exponential backoff (a 404, the resource not
  // served, is also reported to opt.availability and followed by a relist). Idempotent.
  void start();
  void stop();  // joins the thread (returns within about a second)

  bool has_synced() const;  // first list done
  bool wait_for_sync(std::chrono::milliseconds timeout) const;
  std::optional<nlohmann::json> get(const std::string& ns, const std::string& name) const;
  std::vector<nlohmann::json> list(const std::string& ns = "") const;  // "" = every cached object
  uint64_t relists() const;     // lists after the first one
  uint64_t reconnects() const;  // retries after an error

 private:
  void run();
  bool relist();  // false on error (logged)
  void handle(const WatchEvent& ev);
  void resync_all();
  bool sleep_for(std::chrono::milliseconds d);  // false when stopped
  static std::string key_of(const nlohmann::json& obj);

  Client& client_;
  const Resource res_;
  const std::string ns_, selector_;
  const Handlers handlers_;
  const InformerOptions opt_;

  mutable std::mutex mu_;  // guards cache_, synced_ (with sync_cv_), and stop waits
  mutable std::condition_variable cv_;
  // Objects are cached as CBOR, not as nlohmann::json trees: a tree takes several
  // times the bytes of the object (a 1,000-job operator's caches went from about
  // 100 MB to a fraction of it); get() and list() decode (they returned copies anyway).
  struct Entry {
    std::string rv;
    std::vector<uint8_t> cbor;
  };
  void transform(nlohmann::json& obj) const;  // opt_.transform, never throwing
  static Entry encode(const nlohmann::json& obj);
  static nlohmann::json decode(const Entry& e);
  std::map<std::string, Entry> cache_;  // "ns/name" (or "name") → object
  bool synced_ = false;

  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> relists_{0}, reconnects_{0};
  std::string resource_version_;  // informer thread only
  std::thread thread_;
  std::mutex start_mu_;
};

}  // namespace shardguard::kube
