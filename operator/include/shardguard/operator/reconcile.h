// plan(observed) → what the operator does next for one ShardedTrainingJob (issue 4
// items 3–5). Pure: the reconciler gathers the job, the objects it owns (from the
// informer caches) and the PKI material, calls plan(), then carries the plan out
// with the API client. Everything that decides — phases, conditions, exposure,
// runPolicy, which pods to create or delete and where they may go, which Events to
// emit — lives here and is unit-tested without a server.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/operator/render.h"
#include "shardguard/operator/status.h"

namespace shardguard::op {

inline constexpr const char* kFinalizer = "shardguard.io/cleanup";

// Training progress read from the shards (the last stage's /metrics).
struct Progress {
  int64_t step = 0;
  int64_t epoch = 0;
  double loss = 0;
  std::optional<double> accuracy;  // latest evaluation, when there was one
  std::optional<double> eval_loss; // its mean cross-entropy (nats), when there was one
};

struct Observed {
  nlohmann::json job;  // the ShardedTrainingJob as read (metadata, spec, status)
  // The objects the job owns, as read; index = shard for the per-shard ones.
  std::optional<nlohmann::json> ca_secret;
  std::vector<std::optional<nlohmann::json>> shard_secrets;
  std::vector<std::optional<nlohmann::json>> config_maps;
  std::optional<nlohmann::json> service;
  std::vector<std::optional<nlohmann::json>> pods;
  // PKI for render(); filled by the caller from the existing Secrets, or fresh.
  // Empty uid in `render_inputs` when the caller could not prepare them (then
  // plan() only updates status).
  // A package job also needs render_inputs.package_manifest and package_keys (filled
  // whatever the phase); when the keys Secret could not be read, why (the job waits).
  RenderInputs render_inputs;
  std::string package_error;
  std::optional<Progress> progress;
  // Per shard index (may be shorter): the exposure ledger sequence its running pod's
  // sidecar publishes (shardguard_ledger_sequence), when it could be read. plan()
  // keeps the highest ever seen in status.shards[i].ledgerSequence and renders it as
  // the sidecar's --ledger-min-sequence of every pod it creates for that shard.
  std::vector<std::optional<int64_t>> ledger_sequences;
  int64_t now = 0;  // seconds since the epoch
};

struct Action {
  enum class Verb { kCreate, kUpdate, kDelete };
  Verb verb;
  std::string kind;  // Secret, ConfigMap, Service, Pod, ShardedTrainingJob
  std::string name;
  nlohmann::json object;  // create/update: the whole object (update: with resourceVersion)
  std::string reason;     // for logs
};

struct EventNote {
  std::string type;  // Normal | Warning
  std::string reason;
  std::string message;
};

struct Plan {
  std::vector<Action> before_status;  // finalizer, PKI, config, Service, pod creations
  std::optional<nlohmann::json> status;  // the new status, only when it changed
  std::vector<Action> after_status;   // deletions that status must record first
  std::vector<EventNote> events;
  std::optional<std::chrono::seconds> requeue_after;
  std::string phase;                  // the phase after this plan
  ExposureReport exposure;            // for the metrics
};

struct PlanOptions {
  std::chrono::seconds progress_interval{15};  // requeue running jobs to refresh progress
};

// Decodes job.spec (JobSpecError → Failed with InvalidSpec), and plans. Never throws
// for a bad job: every refusal becomes status and an Event.
Plan plan(const Observed& observed, const PlanOptions& options = {});

// The informer caches keep a ConfigMap's `data` only as this digest (under
// kCachedDataDigest) to stay small; plan() compares digests when `data` is absent.
inline constexpr const char* kCachedDataDigest = "shardguardCachedDataDigest";
std::string data_digest(const nlohmann::json& data);

// Parameters per stage of the job's model (the partitioner, as shardd builds it; a
// package job's from its manifest, model::job_cut).
std::vector<int64_t> stage_parameters(const JobSpec& job, const model::PackageManifest* manifest = nullptr);

}  // namespace shardguard::op
