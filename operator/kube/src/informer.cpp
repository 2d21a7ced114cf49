#include "shardguard/kube/informer.h"

#include <algorithm>

#include "shardguard/common/log.h"

namespace shardguard::kube {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {
std::string rv_of(const json& obj) {
  if (obj.is_object() && obj.contains("metadata") && obj["metadata"].is_object()) {
    const json& m = obj["metadata"];
    if (m.contains("resourceVersion") && m["resourceVersion"].is_string()) return m["resourceVersion"].get<std::string>();
  }
  return "";
}
}  // namespace

Informer::Informer(Client& client, Resource res, std::string ns, std::string label_selector, Handlers h,
                   InformerOptions opt)
    : client_(client), res_(std::move(res)), ns_(std::move(ns)), selector_(std::move(label_selector)),
      handlers_(std::move(h)), opt_(opt) {}

Informer::~Informer() { stop(); }

void Informer::start() {
  std::lock_guard<std::mutex> lock(start_mu_);
  if (thread_.joinable() || stop_.load()) return;
  thread_ = std::thread([this] { run(); });
}

void Informer::stop() {
  std::lock_guard<std::mutex> lock(start_mu_);
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool Informer::has_synced() const {
  std::lock_guard<std::mutex> lock(mu_);
  return synced_;
}

bool Informer::wait_for_sync(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return synced_; });
}

void Informer::transform(json& obj) const {
  if (!opt_.transform) return;
  json original = obj;
  try {
    opt_.transform(obj);
  } catch (const std::exception& e) {
    // An object the transform did not expect is cached whole rather than lost.
    log::warn("informer transform failed; caching the object as is",
              {{"resource", res_.plural}, {"error", e.what()}});
    obj = std::move(original);
  }
}

Informer::Entry Informer::encode(const json& obj) { return {rv_of(obj), json::to_cbor(obj)}; }
json Informer::decode(const Entry& e) { return json::from_cbor(e.cbor); }

std::optional<json> Informer::get(const std::string& ns, const std::string& name) const {
  std::vector<uint8_t> bytes;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = cache_.find(ns.empty() ? name : ns + "/" + name);
    if (it == cache_.end()) return std::nullopt;
    bytes = it->second.cbor;
  }
  return json::from_cbor(bytes);  // decoded outside the lock
}

std::vector<json> Informer::list(const std::string& ns) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<json> out;
  const std::string prefix = ns + "/";
  for (const auto& [key, e] : cache_) {
    if (ns.empty() || key.compare(0, prefix.size(), prefix) == 0) out.push_back(decode(e));
  }
  return out;
}

uint64_t Informer::relists() const { return relists_.load(); }
uint64_t Informer::reconnects() const { return reconnects_.load(); }

std::string Informer::key_of(const json& obj) {
  std::string ns, name;
  if (obj.is_object() && obj.contains("metadata") && obj["metadata"].is_object()) {
    const json& m = obj["metadata"];
    if (m.contains("namespace") && m["namespace"].is_string()) ns = m["namespace"].get<std::string>();
    if (m.contains("name") && m["name"].is_string()) name = m["name"].get<std::string>();
  }
  return ns.empty() ? name : ns + "/" + name;
}

bool Informer::sleep_for(std::chrono::milliseconds d) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, d, [this] { return stop_.load(); });
  return !stop_.load();
}

bool Informer::relist() {
  ListResult lr;
  try {
    lr = client_.list(res_, ns_, selector_);
  } catch (const ApiError& e) {
    // A list answers 404 only when the resource is not served (a namespace that does
    // not exist lists as empty).
    if (e.code() == 404 && opt_.availability) opt_.availability->missing(res_, ns_, e.what());
    log::warn("informer list failed", {{"resource", res_.plural}, {"namespace", ns_}, {"error", e.what()}});
    return false;
  } catch (const std::exception& e) {
    log::warn("informer list failed", {{"resource", res_.plural}, {"namespace", ns_},
                                       {"error", e.what()}});
    return false;
  }
  // Replace the cache and work out what changed, then tell the handlers outside the lock.
  std::vector<json> added, deleted;
  std::vector<std::pair<json, json>> updated;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::map<std::string, Entry> fresh;
    for (auto& item : lr.items) {
      transform(item);
      const std::string key = key_of(item);
      if (key.empty()) continue;
      Entry e = encode(item);
      const auto old = cache_.find(key);
      if (old == cache_.end()) {
        added.push_back(std::move(item));
      } else if (old->second.rv != e.rv || e.rv.empty()) {
        updated.emplace_back(decode(old->second), std::move(item));
      }
      fresh.emplace(key, std::move(e));
    }
    for (auto& [key, e] : cache_) {
      if (!fresh.count(key)) deleted.push_back(decode(e));
    }
    cache_ = std::move(fresh);
  }
  resource_version_ = lr.resource_version;
  if (opt_.availability) opt_.availability->served(res_, ns_);
  for (const auto& o : deleted) {
    if (handlers_.on_delete) handlers_.on_delete(o);
  }
  for (const auto& o : added) {
    if (handlers_.on_add) handlers_.on_add(o);
  }
  for (const auto& [o, n] : updated) {
    if (handlers_.on_update) handlers_.on_update(o, n);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    synced_ = true;
  }
  cv_.notify_all();
  return true;
}

void Informer::handle(const WatchEvent& event) {
  const std::string rv = rv_of(event.object);
  if (!rv.empty()) resource_version_ = rv;
  if (event.type == "BOOKMARK") return;
  const std::string key = key_of(event.object);
  if (key.empty()) return;
  WatchEvent transformed;
  if (opt_.transform) {
    transformed = event;
    transform(transformed.object);
  }
  const WatchEvent& ev = opt_.transform ? transformed : event;
  if (ev.type == "ADDED" || ev.type == "MODIFIED") {
    std::optional<json> old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = cache_.find(key);
      if (it != cache_.end()) {
        old = decode(it->second);
        it->second = encode(ev.object);
      } else {
        cache_.emplace(key, encode(ev.object));
      }
    }
    if (old) {
      if (handlers_.on_update) handlers_.on_update(*old, ev.object);
    } else if (handlers_.on_add) {
      handlers_.on_add(ev.object);
    }
  } else if (ev.type == "DELETED") {
    bool had = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      had = cache_.erase(key) > 0;
    }
    if (had && handlers_.on_delete) handlers_.on_delete(ev.object);
  }
}

void Informer::resync_all() {
  if (!handlers_.on_update) return;
  for (const auto& obj : list()) handlers_.on_update(obj, obj);
}

void Informer::run() {
  const json where = {{"resource", res_.plural}, {"namespace", ns_}};
  auto backoff = opt_.initial_backoff;
  auto fail = [&](const std::string& what, const std::exception& e) {
    reconnects_++;
    json f = where;
    f["error"] = e.what();
    f["backoff_ms"] = backoff.count();
    log::warn(what, f);
    const bool go_on = sleep_for(backoff);
    backoff = std::min(opt_.max_backoff, backoff * 2);
    return go_on;
  };

  bool need_list = true;
  bool first_list = true;
  auto next_resync = Clock::now() + opt_.resync;
  while (!stop_.load()) {
    if (need_list) {
      if (!first_list) relists_++;
      if (!relist()) {
        reconnects_++;
        if (!sleep_for(backoff)) break;
        backoff = std::min(opt_.max_backoff, backoff * 2);
        continue;
      }
      first_list = false;
      need_list = false;
      backoff = opt_.initial_backoff;
      json f = where;
      f["resource_version"] = resource_version_;
      log::debug("informer listed", f);
    }
    if (opt_.resync.count() > 0 && Clock::now() >= next_resync) {
      resync_all();
      next_resync = Clock::now() + opt_.resync;
    }
    int timeout = opt_.watch_timeout_seconds;
    if (opt_.resync.count() > 0) {
      // End the watch by the next resync so that handlers run on this thread only.
      const auto left = std::chrono::duration_cast<std::chrono::seconds>(next_resync - Clock::now()).count() + 1;
      timeout = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(timeout, left)));
    }
    try {
      bool got_event = false;
      const auto started = Clock::now();
      client_.watch(res_, ns_, selector_, resource_version_,
                    [&](const WatchEvent& ev) {
                      got_event = true;
                      handle(ev);
                      return !stop_.load();
                    },
                    stop_, timeout);
      if (!got_event && Clock::now() - started < std::chrono::seconds(1) && !stop_.load()) {
        // A watch that ends at once with nothing in it: do not spin on such a server.
        throw std::runtime_error("the watch ended at once without events");
      }
      backoff = opt_.initial_backoff;
    } catch (const ApiError& e) {
      if (e.code() == 410) {
        json f = where;
        f["resource_version"] = resource_version_;
        log::info("informer watch expired; relisting", f);
        need_list = true;
        continue;
      }
      if (e.code() == 404) {
        // The resource is no longer served (its CRD was deleted, say): report it and
        // list again once the backoff has passed (it may come back as a new one).
        if (opt_.availability) opt_.availability->missing(res_, ns_, e.what());
        need_list = true;
      }
      if (!fail("informer watch failed", e)) break;
    } catch (const std::exception& e) {
      if (!fail("informer watch failed", e)) break;
    }
  }
}

}  // namespace shardguard::kube
