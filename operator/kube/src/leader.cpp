#include "shardguard/kube/leader.h"

#include <algorithm>
#include <ctime>
#include <thread>

#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "shardguard/common/log.h"
#include "shardguard/common/time.h"

namespace shardguard::kube {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// A Lease's MicroTime: RFC 3339 with microseconds in UTC ("2026-11-26T03:40:00.123456Z").
static std::string micro_time_now() { return format_rfc3339(std::chrono::system_clock::now(), 6); }

LeaderElector::LeaderElector(Client& client, LeaderElectionConfig cfg, std::function<void()> on_started_leading,
                             std::function<void()> on_stopped_leading, prometheus::Registry* registry,
                             ApiAvailability* apis)
    : client_(client), cfg_(std::move(cfg)), on_started_(std::move(on_started_leading)),
      on_stopped_(std::move(on_stopped_leading)), apis_(apis) {
  if (apis_) apis_->need(kLeases);
  if (registry) {
    gauge_ = &prometheus::BuildGauge()
                  .Name("leader_election_master_status")
                  .Help("Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master.")
                  .Register(*registry)
                  .Add({{"name", cfg_.name}});
    gauge_->Set(0);
  }
}

bool LeaderElector::is_leader() const { return leader_.load(); }

void LeaderElector::set_leader(bool leading) {
  leader_.store(leading);
  if (gauge_) gauge_->Set(leading ? 1 : 0);
}

bool LeaderElector::try_acquire_or_renew() {
  const auto now = Clock::now();
  const std::string now_text = micro_time_now();
  const int64_t duration_s =
      std::max<int64_t>(1, (cfg_.lease_duration.count() + 999) / 1000);
  const json where = {{"lease", cfg_.ns + "/" + cfg_.name}, {"identity", cfg_.identity}};

  json lease;
  lease_missing_ = false;
  try {
    lease = client_.get(kLeases, cfg_.ns, cfg_.name);
    if (apis_) apis_->served(kLeases, cfg_.ns);
  } catch (const ApiError& e) {
    if (e.code() != 404) {
      json f = where;
      f["error"] = e.what();
      log::warn("cannot read the lease", f);
      return false;
    }
    json spec = {{"holderIdentity", cfg_.identity}, {"leaseDurationSeconds", duration_s},
                 {"acquireTime", now_text}, {"renewTime", now_text}, {"leaseTransitions", 0}};
    json obj = {{"apiVersion", kLeases.api_version()}, {"kind", kLeases.kind},
                {"metadata", {{"name", cfg_.name}, {"namespace", cfg_.ns}}}, {"spec", spec}};
    try {
      const json created = client_.create(kLeases, cfg_.ns, obj);
      if (apis_) apis_->served(kLeases, cfg_.ns);
      observed_spec_ = created.value("spec", spec);
      observed_time_ = now;
      return true;
    } catch (const ApiError& ce) {
      if (ce.code() == 404) {
        // Not a lost race (that is 409): the server has no Leases, or no such namespace.
        lease_missing_ = true;
        if (apis_) apis_->missing(kLeases, cfg_.ns, ce.what());
        return false;
      }
      json f = where;
      f["error"] = ce.what();
      log::info("cannot create the lease", f);
      return false;
    }
  }

  json spec = lease.contains("spec") && lease["spec"].is_object() ? lease["spec"] : json::object();
  if (spec != observed_spec_) {
    observed_spec_ = spec;
    observed_time_ = now;
  }
  const std::string holder = spec.value("holderIdentity", "");
  if (!holder.empty() && holder != cfg_.identity && now < observed_time_ + cfg_.lease_duration) {
    return false;  // held by another, and it changed within lease_duration by our clock
  }
  json next = spec;
  if (holder != cfg_.identity) {
    next["acquireTime"] = now_text;
    const int64_t transitions = spec.contains("leaseTransitions") && spec["leaseTransitions"].is_number_integer()
                                    ? spec["leaseTransitions"].get<int64_t>()
                                    : 0;
    next["leaseTransitions"] = transitions + 1;
  }
  next["holderIdentity"] = cfg_.identity;
  next["leaseDurationSeconds"] = duration_s;
  next["renewTime"] = now_text;
  lease["spec"] = next;
  try {
    const json updated = client_.update(kLeases, cfg_.ns, lease);
    observed_spec_ = updated.value("spec", next);
    observed_time_ = now;
    if (holder != cfg_.identity) {
      json f = where;
      f["previous_holder"] = holder;
      log::info("acquired the lease", f);
    }
    return true;
  } catch (const ApiError& e) {
    json f = where;
    f["error"] = e.what();
    log::info("cannot update the lease", f);
    return false;
  }
}

void LeaderElector::release() {
  try {
    json lease = client_.get(kLeases, cfg_.ns, cfg_.name);
    if (!lease.contains("spec") || !lease["spec"].is_object() ||
        lease["spec"].value("holderIdentity", "") != cfg_.identity) {
      return;
    }
    lease["spec"]["holderIdentity"] = "";
    lease["spec"]["leaseDurationSeconds"] = 1;
    lease["spec"]["renewTime"] = micro_time_now();
    client_.update(kLeases, cfg_.ns, lease);
    log::info("released the lease", {{"lease", cfg_.ns + "/" + cfg_.name},
                                     {"identity", cfg_.identity}});
  } catch (const ApiError& e) {
    log::warn("cannot release the lease", {{"lease", cfg_.ns + "/" + cfg_.name},
                                           {"identity", cfg_.identity}, {"error", e.what()}});
  }
}

void LeaderElector::run(const std::atomic<bool>& stop) {
  // Sleeps d in short slices so that stop is seen quickly; false once stopped.
  auto pause = [&stop](std::chrono::milliseconds d) {
    const auto until = Clock::now() + d;
    for (auto now = Clock::now(); now < until && !stop.load(); now = Clock::now()) {
      std::this_thread::sleep_for(std::min<Clock::duration>(until - now, std::chrono::milliseconds(20)));
    }
    return !stop.load();
  };
  const json where = {{"lease", cfg_.ns + "/" + cfg_.name}, {"identity", cfg_.identity}};

  while (!stop.load()) {
    bool acquired = false;
    // Spacing of tries while the Lease cannot be created (404): a server without the
    // Lease API is not asked every retry_period forever.
    auto backoff = cfg_.retry_period;
    while (!stop.load()) {
      if (try_acquire_or_renew()) {
        acquired = true;
        break;
      }
      if (!lease_missing_) {
        backoff = cfg_.retry_period;
        if (!pause(cfg_.retry_period)) break;
        continue;
      }
      json f = where;
      f["resource"] = resource_name(kLeases);
      f["retry_in_ms"] = backoff.count();
      log::warn("cannot create the lease: the server answers 404 (no Lease API, or no such namespace)", f);
      if (!pause(backoff)) break;
      backoff = std::min(std::max(cfg_.max_backoff, cfg_.retry_period), backoff * 2);
    }
    if (!acquired) break;

    set_leader(true);
    log::info("started leading", where);
    if (on_started_) on_started_();
    auto last_renew = Clock::now();
    bool lost = false;
    while (pause(cfg_.retry_period)) {
      if (try_acquire_or_renew()) {
        last_renew = Clock::now();
      } else if (Clock::now() - last_renew >= cfg_.renew_deadline) {
        lost = true;
        break;
      }
    }
    if (!lost) release();  // stopped while leading
    set_leader(false);
    log::info(lost ? "lost the lease" : "stopped leading", where);
    if (on_stopped_) on_stopped_();
  }
}

}  // namespace shardguard::kube
