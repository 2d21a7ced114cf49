#include "shardguard/operator/reconcile.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "shardguard/common/crypto.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/strings.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/common/time.h"

namespace shardguard::op {

using nlohmann::json;

std::vector<int64_t> stage_parameters(const JobSpec& job, const model::PackageManifest* manifest) {
  std::vector<int64_t> out;
  for (const auto& s : model::job_cut(job, manifest).stages) out.push_back(s.parameters);
  return out;
}

std::string data_digest(const json& data) { return sha256_hex(data.dump()); }

namespace {

bool being_deleted(const json& obj) {
  return obj.contains("metadata") && obj["metadata"].contains("deletionTimestamp") &&
         !obj["metadata"]["deletionTimestamp"].is_null();
}

std::string pod_phase(const json& pod) {
  if (pod.contains("status") && pod["status"].is_object()) {
    const std::string p = pod["status"].value("phase", "");
    if (!p.empty()) return p;
  }
  return "Pending";
}

std::string pod_node(const json& pod) {
  if (pod.contains("spec") && pod["spec"].is_object()) return pod["spec"].value("nodeName", "");
  return "";
}

// The scheduler's message when it found no node for a pod that has none (PodScheduled
// False, reason Unschedulable); nullopt otherwise.
std::optional<std::string> unschedulable(const json& pod) {
  if (!pod_node(pod).empty() || !pod.contains("status") || !pod["status"].is_object()) return std::nullopt;
  for (const auto& c : pod["status"].value("conditions", json::array())) {
    if (c.value("type", "") == "PodScheduled" && c.value("status", "") == "False" &&
        c.value("reason", "") == "Unschedulable") {
      return c.value("message", "");
    }
  }
  return std::nullopt;
}

bool pod_ready(const json& pod) {
  if (!pod.contains("status") || !pod["status"].is_object()) return false;
  for (const auto& c : pod["status"].value("conditions", json::array())) {
    if (c.value("type", "") == "Ready") return c.value("status", "") == "True";
  }
  return false;
}

// Why a pod failed, from its status (reason, or the first terminated container's).
std::string pod_failure(const json& pod) {
  std::string out;
  if (pod.contains("status") && pod["status"].is_object()) {
    const json& s = pod["status"];
    out = s.value("reason", "");
    if (s.contains("message") && s["message"].is_string()) {
      out += (out.empty() ? "" : ": ") + s["message"].get<std::string>();
    }
    for (const auto& cs : s.value("containerStatuses", json::array())) {
      if (!cs.contains("state") || !cs["state"].contains("terminated")) continue;
      const json& t = cs["state"]["terminated"];
      if (t.value("exitCode", 0) == 0) continue;
      out += (out.empty() ? "" : "; ") + std::string("container ") + cs.value("name", "?") + " exited " +
             std::to_string(t.value("exitCode", 0)) + (t.contains("reason") ? " (" + t.value("reason", "") + ")" : "");
      // A package that could not be fetched: shardd's line says from where and why.
      const std::string message = t.value("message", "");
      if (t.value("exitCode", 0) == model::kExitPackageUnavailable) {
        if (const auto at = message.rfind("shardd: package of shard "); at != std::string::npos) {
          std::string line = message.substr(at + 8);
          if (const auto end = line.find('\n'); end != std::string::npos) line.resize(end);
          out += ": " + line;
        }
      }
      break;
    }
  }
  return out.empty() ? "no reason given" : out;
}

// A package job's shardd that refused its package (exit kExitPackageRefused): the
// reason from its termination message (the last lines of its log), nullopt otherwise.
std::optional<std::string> package_refusal(const json& pod) {
  if (!pod.contains("status") || !pod["status"].is_object()) return std::nullopt;
  for (const auto& cs : pod["status"].value("containerStatuses", json::array())) {
    if (cs.value("name", "") != "shardd" || !cs.contains("state") || !cs["state"].contains("terminated")) continue;
    const json& t = cs["state"]["terminated"];
    if (t.value("exitCode", 0) != model::kExitPackageRefused) return std::nullopt;
    std::string message = t.value("message", "");
    // The line shardd writes for it ("shardd: package refused: …"), else the whole message.
    if (const auto at = message.rfind("package refused: "); at != std::string::npos) {
      message = message.substr(at + 17);
      if (const auto end = message.find('\n'); end != std::string::npos) message.resize(end);
    }
    while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
    return message.empty() ? "shardd exited " + std::to_string(model::kExitPackageRefused) + " (package refused)"
                           : message;
  }
  return std::nullopt;
}

bool has_finalizer(const json& job) {
  const json& m = job["metadata"];
  if (!m.contains("finalizers") || !m["finalizers"].is_array()) return false;
  return std::find(m["finalizers"].begin(), m["finalizers"].end(), json(kFinalizer)) != m["finalizers"].end();
}

std::string obj_name(const json& obj) { return obj["metadata"].value("name", ""); }

Action make_action(Action::Verb verb, const json& obj, const std::string& reason) {
  return {verb, obj.value("kind", ""), obj_name(obj), obj, reason};
}

// Does the existing object differ from the desired one in what the operator owns
// (data, type, labels, Service selector and ports)? Fields the API server adds
// (uid, resourceVersion, defaults) are not compared.
bool differs(const json& existing, const json& desired) {
  const json& el = existing["metadata"].value("labels", json::object());
  for (const auto& [k, v] : desired["metadata"]["labels"].items()) {
    if (!el.contains(k) || el[k] != v) return true;
  }
  const std::string kind = desired.value("kind", "");
  if (kind == "Secret" || kind == "ConfigMap") {
    if (!existing.contains("data") && existing.contains(kCachedDataDigest)) {
      if (existing[kCachedDataDigest] != data_digest(desired.value("data", json::object()))) return true;
    } else if (existing.value("data", json::object()) != desired.value("data", json::object())) {
      return true;
    }
    if (kind == "Secret" && existing.value("type", "Opaque") != desired.value("type", "Opaque")) return true;
    return false;
  }
  if (kind == "Service") {
    const json& es = existing.value("spec", json::object());
    const json& ds = desired["spec"];
    if (es.value("selector", json::object()) != ds["selector"]) return true;
    const json eports = es.value("ports", json::array());
    if (eports.size() != ds["ports"].size()) return true;
    for (size_t i = 0; i < eports.size(); ++i) {
      if (eports[i].value("port", 0) != ds["ports"][i].value("port", 0)) return true;
    }
  }
  return false;
}

// The desired object carried onto the existing one (so the update keeps the server's
// fields and the resourceVersion precondition).
json merged_for_update(const json& existing, const json& desired) {
  json out = existing;
  out.erase(kCachedDataDigest);
  for (const auto& [k, v] : desired["metadata"]["labels"].items()) out["metadata"]["labels"][k] = v;
  for (const char* field : {"data", "type"}) {
    if (desired.contains(field)) out[field] = desired[field];
  }
  if (desired.value("kind", "") == "Service") {
    out["spec"]["selector"] = desired["spec"]["selector"];
    out["spec"]["ports"] = desired["spec"]["ports"];
  }
  return out;
}

void ensure(Plan& p, const std::optional<json>& existing, const json& desired, bool immutable) {
  if (!existing) {
    p.before_status.push_back(make_action(Action::Verb::kCreate, desired, "missing"));
  } else if (!immutable && !being_deleted(*existing) && differs(*existing, desired)) {
    p.before_status.push_back(make_action(Action::Verb::kUpdate, merged_for_update(*existing, desired), "drifted"));
  }
}

// Drops the pod creations planned so far, and their ShardPodRecreated Events; the
// number of creations dropped.
int drop_planned_pod_creations(Plan& p) {
  const auto creates = std::count_if(p.before_status.begin(), p.before_status.end(), [](const Action& a) {
    return a.kind == "Pod" && a.verb == Action::Verb::kCreate;
  });
  p.before_status.erase(std::remove_if(p.before_status.begin(), p.before_status.end(),
                                       [](const Action& a) { return a.kind == "Pod"; }),
                        p.before_status.end());
  p.events.erase(std::remove_if(p.events.begin(), p.events.end(),
                                [](const EventNote& e) { return e.reason == "ShardPodRecreated"; }),
                 p.events.end());
  return static_cast<int>(creates);
}

// Deletes every shard pod that exists and is not already going.
int delete_pods(Plan& p, const Observed& ob, const std::string& reason) {
  int n = 0;
  for (const auto& pod : ob.pods) {
    if (pod && !being_deleted(*pod)) {
      p.after_status.push_back(make_action(Action::Verb::kDelete, *pod, reason));
      ++n;
    }
  }
  return n;
}

// Does the pod's keep-off list (kAnnotationAvoidNodes) cover every node in `avoid`
// that is not `occupied`? (A node that runs another shard of the job is already ruled
// out by the pod anti-affinity; it matters only once that shard's pod is gone.)
bool avoid_list_current(const json& pod, const std::vector<std::string>& avoid,
                        const std::set<std::string>& occupied) {
  if (avoid.empty()) return true;
  std::string listed;
  const json& m = pod["metadata"];
  if (m.contains("annotations") && m["annotations"].is_object()) {
    listed = m["annotations"].value(kAnnotationAvoidNodes, "");
  }
  std::set<std::string> have;
  size_t start = 0;
  while (start <= listed.size()) {
    const size_t comma = listed.find(',', start);
    const std::string item = listed.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (!item.empty()) have.insert(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  for (const auto& n : avoid) {
    if (!have.count(n) && !occupied.count(n)) return false;
  }
  return true;
}

// "; test accuracy A; eval loss L" from status.progress, for the Succeeded Event: what
// is known of the last evaluation.
std::string evaluation_summary(const json& st) {
  if (!st.contains("progress")) return "";
  const json& prog = st["progress"];
  std::string text;
  if (prog.contains("accuracy")) text += "; test accuracy " + format_ratio(prog["accuracy"].get<double>());
  if (prog.contains("evalLoss")) text += "; eval loss " + format_ratio(prog["evalLoss"].get<double>());
  return text;
}

// Fields of a pod's status entry (status.shards[i], or status.shards[i].replicas[r]
// with replicas) that carry over from one reconcile to the next.
constexpr const char* kKeptPodFields[] = {"restarts", "lastFailedPodUID", "phase", "node",
                                          "pod", "ledgerSequence", "groupRestartPodUID"};

// Replicas: status.shards has one entry per stage, its replicas[] one per replica;
// plan() works on one entry per slot (r·n + i). The stage entry sums the restarts and
// says Succeeded when every replica did, Failed when any did, Running when every
// replica runs or finished, Pending otherwise.
json fold_replicas(const json& slots, int n, int replicas) {
  if (replicas <= 1) return slots;
  json out = json::array();
  for (int i = 0; i < n; ++i) {
    json stage = {{"index", i}, {"parameters", slots[i].value("parameters", int64_t{0})}};
    json list = json::array();
    int64_t restarts = 0;
    int succeeded = 0, running = 0;
    bool failed = false;
    for (int r = 0; r < replicas; ++r) {
      json e = slots[r * n + i];
      e.erase("index");
      e.erase("parameters");
      restarts += e.value("restarts", int64_t{0});
      const std::string ph = e.value("phase", "Pending");
      succeeded += ph == "Succeeded";
      running += ph == "Running";
      failed = failed || ph == "Failed";
      list.push_back(e);
    }
    stage["restarts"] = restarts;
    stage["phase"] = succeeded == replicas                       ? "Succeeded"
                     : failed                                    ? "Failed"
                     : running > 0 && running + succeeded == replicas ? "Running"
                                                                  : "Pending";
    stage["replicas"] = list;
    out.push_back(stage);
  }
  return out;
}

// The old entry of replica r of stage i (the stage's own entry without replicas).
std::optional<json> old_pod_entry(const json& old_shards, int i, int r, int replicas) {
  for (const auto& o : old_shards) {
    if (o.value("index", -1) != i) continue;
    if (replicas <= 1) return o;
    for (const auto& e : o.value("replicas", json::array())) {
      if (e.value("replica", -1) == r) return e;
    }
  }
  return std::nullopt;
}

struct Conditions {
  json& c;
  int64_t gen;
  const std::string& now;
  void set(const std::string& type, bool status, const std::string& reason, const std::string& message) {
    set_condition(c, type, status, reason, message, gen, now);
  }
};

}  // namespace

Plan plan(const Observed& ob, const PlanOptions& opt) {
  Plan p;
  const json& job = ob.job;
  const json& meta = job["metadata"];
  const std::string job_name = meta.value("name", "");
  const int64_t generation = meta.value("generation", int64_t{1});
  const std::string now = format_rfc3339(ob.now);
  const json old_status = job.contains("status") && job["status"].is_object() ? job["status"] : json::object();
  const std::string old_phase = old_status.value("phase", "");

  json st = old_status;
  st["observedGeneration"] = generation;
  json conditions = old_status.value("conditions", json::array());
  Conditions cond{conditions, generation, now};

  auto finish = [&](const std::string& phase) {
    st["phase"] = phase;
    st["conditions"] = conditions;
    if (st != old_status) p.status = st;
    p.phase = phase;
    if (phase != old_phase && (phase == "Running" || phase == "Succeeded")) {
      p.events.push_back({"Normal", phase,
                          phase == "Running" ? "every shard pod is running"
                                             : "every shard finished training" +
                                                   evaluation_summary(st)});
    }
  };

  // --- deletion: owned objects go (pods first), then the finalizer ------------------
  if (being_deleted(job)) {
    int remaining = delete_pods(p, ob, "job deleted");
    for (const auto& pod : ob.pods) remaining += pod && being_deleted(*pod) ? 1 : 0;
    auto drop = [&](const std::optional<json>& o) {
      if (!o) return;
      ++remaining;
      if (!being_deleted(*o)) p.after_status.push_back(make_action(Action::Verb::kDelete, *o, "job deleted"));
    };
    drop(ob.ca_secret);
    drop(ob.service);
    for (const auto& o : ob.shard_secrets) drop(o);
    for (const auto& o : ob.config_maps) drop(o);
    if (remaining == 0 && has_finalizer(job)) {
      json updated = job;
      auto& f = updated["metadata"]["finalizers"];
      f.erase(std::remove(f.begin(), f.end(), json(kFinalizer)), f.end());
      updated.erase("status");
      p.before_status.push_back(make_action(Action::Verb::kUpdate, updated, "cleanup done"));
      p.events.push_back({"Normal", "CleanedUp", "every owned object deleted; finalizer removed"});
    }
    p.phase = old_phase;
    return p;
  }

  if (!has_finalizer(job)) {
    json updated = job;
    if (!updated["metadata"].contains("finalizers") || !updated["metadata"]["finalizers"].is_array()) {
      updated["metadata"]["finalizers"] = json::array();
    }
    updated["metadata"]["finalizers"].push_back(kFinalizer);
    updated.erase("status");
    p.before_status.push_back(make_action(Action::Verb::kUpdate, updated, "add finalizer"));
  }

  // --- the spec -------------------------------------------------------------------------
  JobSpec spec;
  std::vector<int64_t> params;
  const model::PackageManifest* manifest =
      ob.render_inputs.package_manifest ? &*ob.render_inputs.package_manifest : nullptr;
  bool package_missing = false;
  try {
    spec = job_from_json(job);
    package_missing = spec.model.from_package() && manifest == nullptr;
    if (!package_missing) params = stage_parameters(spec, manifest);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (!msg.empty() && msg.back() == '\n') msg.pop_back();
    if (old_phase != "Failed") p.events.push_back({"Warning", "InvalidSpec", msg});
    cond.set("Failed", true, "InvalidSpec", msg);
    cond.set("Running", false, "InvalidSpec", "the spec is invalid");
    cond.set("Ready", false, "InvalidSpec", "the spec is invalid");
    delete_pods(p, ob, "invalid spec");
    finish("Failed");
    return p;
  }
  if (package_missing) {
    // The keys Secret may yet be created: the job waits for it (a finished job keeps
    // its status).
    const std::string msg = ob.package_error.empty()
                                ? "spec.model.package.keysSecret " + spec.model.package->keys_secret + ": not read yet"
                                : ob.package_error;
    if (old_phase == "Succeeded" || old_phase == "Failed") {
      finish(old_phase);
      return p;
    }
    const json old_conditions = old_status.value("conditions", json::array());
    bool same = false;
    for (const auto& c : old_conditions) {
      same = same || (c.value("type", "") == "Ready" && c.value("reason", "") == "PackageUnavailable" &&
                      c.value("message", "") == msg);
    }
    if (!same) p.events.push_back({"Warning", "PackageUnavailable", msg});
    cond.set("Ready", false, "PackageUnavailable", msg);
    cond.set("Running", false, "PackageUnavailable", "waiting for the package manifest and keys");
    p.requeue_after = opt.progress_interval;
    finish(old_phase.empty() ? "Pending" : old_phase);
    return p;
  }
  const int n = spec.sharding.shards;
  // Replicas: R pipelines; the pod of replica r of stage i is slot r·n + i (render.h).
  const int replicas = replica_count(spec);
  const int slots = n * replicas;
  auto who = [&](int k) { return slot_label(spec, k); };
  const double max_exposure = spec.protection.max_exposure;

  // --- placement history and exposure ---------------------------------------------------
  // A node holds stages, whichever replica brought them: exposure is per stage.
  PlacementHistory history = history_from_status(old_status);
  for (int k = 0; k < slots && k < static_cast<int>(ob.pods.size()); ++k) {
    if (ob.pods[k]) {
      const std::string node = pod_node(*ob.pods[k]);
      if (!node.empty()) history[node].insert(k % n);
    }
  }
  std::vector<ExportAssignment> exporters;
  try {
    exporters = assign_export_principals(spec, params);
  } catch (const ExposureRefusal&) {
    // Too few export principals: render() below refuses the job with this message.
  }
  p.exposure = compute_exposure(params, history, exporters, spec.protection.trusted_stages);
  st["exposure"] = exposure_to_json(p.exposure);
  // --- per-shard status entries ---------------------------------------------------------
  json shards = json::array();
  const json old_shards = old_status.value("shards", json::array());
  int64_t failed_pods = old_status.value("failedPods", int64_t{0});
  for (int k = 0; k < slots; ++k) {
    const int i = k % n;
    json e = {{"index", i}, {"parameters", params[i]}, {"restarts", 0}, {"phase", "Pending"}};
    if (replicas > 1) e["replica"] = k / n;
    if (const auto o = old_pod_entry(old_shards, i, k / n, replicas)) {
      for (const char* f : kKeptPodFields) {
        if (o->contains(f)) e[f] = (*o)[f];
      }
    }
    // Only ever raised: a lower value (a sidecar that loaded an older copy of its
    // ledger, or none) must not lower the minimum that later pods are given.
    if (k < static_cast<int>(ob.ledger_sequences.size()) && ob.ledger_sequences[k] &&
        *ob.ledger_sequences[k] > e.value("ledgerSequence", int64_t{0})) {
      e["ledgerSequence"] = *ob.ledger_sequences[k];
    }
    shards.push_back(e);
  }

  const bool terminal = old_phase == "Succeeded" || old_phase == "Failed";
  auto observe_pods = [&]() {
    for (int k = 0; k < slots; ++k) {
      const auto& pod = k < static_cast<int>(ob.pods.size()) ? ob.pods[k] : std::nullopt;
      json& e = shards[k];
      if (!pod) {
        if (e.value("phase", "") != "Succeeded") e["phase"] = "Pending";
        continue;
      }
      e["pod"] = obj_name(*pod);
      const std::string node = pod_node(*pod);
      if (!node.empty()) e["node"] = node;
      e["phase"] = pod_phase(*pod);
    }
  };
  // Ends a job that has pods as Failed: an Event, the three conditions, its pods deleted,
  // the shards as last seen and the completion time.
  auto fail_running_job = [&](const std::string& reason, const std::string& message,
                              const std::string& not_running, const char* deleting) {
    p.events.push_back({"Warning", reason, message});
    cond.set("Failed", true, reason, message);
    cond.set("Running", false, reason, not_running);
    cond.set("Ready", false, reason, not_running);
    delete_pods(p, ob, deleting);
    observe_pods();
    st["shards"] = fold_replicas(shards, n, replicas);
    st["completionTime"] = now;
    finish("Failed");
    return p;
  };

  // --- finished jobs: keep what is left, honour ttlSecondsAfterFinished --------------------
  if (terminal) {
    observe_pods();
    st["shards"] = fold_replicas(shards, n, replicas);
    if (old_phase == "Failed") delete_pods(p, ob, "job failed");
    if (spec.run_policy.ttl_seconds_after_finished) {
      const int64_t done_at = parse_rfc3339_seconds(old_status.value("completionTime", now)).value_or(-1);
      const int64_t left = done_at + *spec.run_policy.ttl_seconds_after_finished - ob.now;
      if (left <= 0) {
        p.after_status.push_back(make_action(Action::Verb::kDelete, job, "ttlSecondsAfterFinished"));
        p.events.push_back({"Normal", "TTLExpired", "deleting the job " + std::to_string(
                                                        *spec.run_policy.ttl_seconds_after_finished) +
                                                        " s after it finished"});
      } else {
        p.requeue_after = std::chrono::seconds(left);
      }
    }
    finish(old_phase);
    return p;
  }

  // (A finished job keeps the condition it ended with.)
  const bool isolated = p.exposure.max_node <= max_exposure + 1e-12;
  cond.set("ShardIsolation", isolated, isolated ? "ExposureWithinLimit" : "ExposureAboveLimit",
           "largest node exposure " + format_ratio(p.exposure.max_node) + (isolated ? " <= " : " > ") + "maxExposure " +
               format_ratio(max_exposure) + " over " + std::to_string(history.size()) + " node(s)");
  if (!isolated && condition_true(old_status.value("conditions", json::array()), "ShardIsolation")) {
    p.events.push_back({"Warning", "ExposureAboveLimit",
                        "a node has held " + format_ratio(p.exposure.max_node) + " of the model, above maxExposure " +
                            format_ratio(max_exposure)});
  }

  // --- render (refuses a spec whose largest stage exceeds maxExposure) ---------------------
  RenderInputs in = ob.render_inputs;
  in.avoid_nodes.assign(n, {});
  in.ledger_min_sequence.assign(slots, 0);
  for (int i = 0; i < n; ++i) {
    // A trusted stage runs only on the data owner's nodes (trustedNodeSelector).
    if (!spec.protection.trusted_stages.count(i)) {
      in.avoid_nodes[i] = nodes_to_avoid(params, history, i, max_exposure, spec.protection.trusted_stages);
    }
  }
  for (int k = 0; k < slots; ++k) {
    in.ledger_min_sequence[k] = std::max<int64_t>(0, shards[k].value("ledgerSequence", int64_t{0}));
  }
  DesiredObjects desired;
  try {
    desired = render(spec, in);
  } catch (const RenderError& e) {
    const std::string msg = e.what();
    const bool exposure = dynamic_cast<const ExposureRefusal*>(&e) != nullptr;
    const std::string reason = exposure ? "ExposureRefused" : "RenderFailed";
    if (old_phase != "Failed") p.events.push_back({"Warning", reason, msg});
    if (exposure) cond.set("ShardIsolation", false, reason, msg);
    cond.set("Failed", true, reason, msg);
    cond.set("Running", false, reason, "the job was refused");
    cond.set("Ready", false, reason, "the job was refused");
    delete_pods(p, ob, "refused");
    st["shards"] = fold_replicas(shards, n, replicas);
    st["completionTime"] = now;
    finish("Failed");
    return p;
  }

  // PKI, policies and the Service exist whatever the phase (suspend keeps them).
  if (!ob.ca_secret) {
    p.events.push_back({"Normal", "Created", "created the job CA, " + std::to_string(slots) +
                                                 (replicas > 1 ? " replica" : " shard") +
                                                 " identities, policies and the headless Service"});
  }
  ensure(p, ob.ca_secret, desired.ca_secret, /*immutable=*/true);
  for (int k = 0; k < slots; ++k) {
    ensure(p, k < static_cast<int>(ob.shard_secrets.size()) ? ob.shard_secrets[k] : std::nullopt,
           desired.shard_secrets[k], false);
    ensure(p, k < static_cast<int>(ob.config_maps.size()) ? ob.config_maps[k] : std::nullopt,
           desired.config_maps[k], false);
  }
  ensure(p, ob.service, desired.service, false);

  // --- suspend ---------------------------------------------------------------------------
  if (spec.run_policy.suspend) {
    const int deleted = delete_pods(p, ob, "suspended");
    if (old_phase != "Suspended") {
      p.events.push_back({"Normal", "Suspended", "deleted " + std::to_string(deleted) +
                                                     " shard pod(s); PKI and checkpoints are kept"});
    }
    observe_pods();
    st["shards"] = fold_replicas(shards, n, replicas);
    st.erase("startTime");  // activeDeadlineSeconds counts from the resume, as for a Job
    cond.set("Suspended", true, "Suspended", "spec.runPolicy.suspend is true");
    cond.set("Running", false, "Suspended", "suspended");
    cond.set("Ready", false, "Suspended", "suspended");
    finish("Suspended");
    return p;
  }
  if (old_phase == "Suspended") {
    p.events.push_back({"Normal", "Resumed", "recreating the shard pods; they continue from their checkpoints"});
  }
  cond.set("Suspended", false, "NotSuspended", "spec.runPolicy.suspend is false");
  if (!st.contains("startTime")) st["startTime"] = now;

  // --- activeDeadlineSeconds -------------------------------------------------------------
  if (spec.run_policy.active_deadline_seconds) {
    const int64_t started = parse_rfc3339_seconds(st["startTime"].get<std::string>()).value_or(-1);
    const int64_t left = started + *spec.run_policy.active_deadline_seconds - ob.now;
    if (left <= 0) {
      const std::string msg = "the job ran longer than spec.runPolicy.activeDeadlineSeconds " +
                              std::to_string(*spec.run_policy.active_deadline_seconds);
      return fail_running_job("DeadlineExceeded", msg, msg, "deadline exceeded");
    }
    p.requeue_after = std::chrono::seconds(left);
  }

  // --- a trusted stage no node can take: refused ----------------------------------------
  for (int k = 0; k < slots; ++k) {
    const int i = k % n;
    if (!spec.protection.trusted_stages.count(i)) continue;
    const auto& pod = k < static_cast<int>(ob.pods.size()) ? ob.pods[k] : std::nullopt;
    const auto why = pod && !being_deleted(*pod) ? unschedulable(*pod) : std::nullopt;
    if (!why) continue;
    std::vector<std::string> selector;
    for (const auto& [key, value] : spec.protection.trusted_node_selector) selector.push_back(key + "=" + value);
    const std::string msg = "stage " + std::to_string(i) +
                            " is trusted and no node can take it: spec.protection.trustedNodeSelector selects " +
                            join(selector, ", ") + "; the scheduler: " + *why;
    return fail_running_job("TrustedStageUnschedulable", msg, "the job was refused", "trusted stage unschedulable");
  }

  // --- shard pods --------------------------------------------------------------------------
  std::set<std::string> occupied;  // nodes running a pod of this job now
  for (const auto& pod : ob.pods) {
    if (pod && !being_deleted(*pod) && !pod_node(*pod).empty()) {
      const std::string ph = pod_phase(*pod);
      if (ph == "Running" || ph == "Pending") occupied.insert(pod_node(*pod));
    }
  }
  int running = 0, ready = 0, succeeded = 0, created = 0;
  std::vector<std::string> failures;
  std::string package_refused;  // the first shard whose shardd refused its package
  // Replicas move together (docs/operator.md, "Replicas"): a replica that fails or is
  // gone restarts every replica of the job; the new pods are created only when every
  // old one is gone, so that each stage's group forms anew and resumes from the
  // stage's newest common checkpoint.
  bool restart_all = false;
  bool terminating = false;
  // The replicas of a failed replica fail in their next all-reduce, often before this
  // reconcile sees any of them: one incident, so with replicas only the first failure
  // a reconcile finds is counted (restarts, failedPods, an Event); the others are noted
  // as seen (lastFailedPodUID) and restart with the group.
  bool group_failure_counted = false;
  auto count_failure = [&](json& e, const std::string& what) {
    if (replicas > 1 && group_failure_counted) return;
    group_failure_counted = true;
    e["restarts"] = e.value("restarts", 0) + 1;
    ++failed_pods;
    failures.push_back(what);
    p.events.push_back({"Warning", "ShardPodFailed", what});
  };
  for (int k = 0; k < slots && replicas > 1; ++k) {
    const auto& pod = k < static_cast<int>(ob.pods.size()) ? ob.pods[k] : std::nullopt;
    terminating = terminating || (pod && being_deleted(*pod));
  }
  for (int k = 0; k < slots; ++k) {
    const int i = k % n;
    const auto& pod = k < static_cast<int>(ob.pods.size()) ? ob.pods[k] : std::nullopt;
    json& e = shards[k];
    if (!pod) {
      if (e.value("phase", "") == "Succeeded") {
        ++succeeded;  // finished, and its pod is gone: never rerun a finished shard
        continue;
      }
      // Running when last seen, and gone though the operator did not delete it (it
      // deletes failed pods only after status says Failed, and all pods on suspend):
      // evicted, preempted, lost with its node or deleted by hand — a failure.
      if (e.value("phase", "") == "Running" && old_phase != "Suspended") {
        count_failure(e, who(k) + " (pod " + e.value("pod", std::string("?")) +
                             (e.contains("node") ? " on " + e["node"].get<std::string>() : std::string()) +
                             "): gone while running (evicted, preempted, node lost or deleted)");
        restart_all = true;
      }
      if (replicas > 1 && terminating) {
        e["phase"] = "Pending";  // created once every old pod of the job is gone
        continue;
      }
      p.before_status.push_back(make_action(Action::Verb::kCreate, desired.pods[k],
                                            e.value("restarts", 0) > 0 ? "recreate" : "create"));
      if (e.value("restarts", 0) > 0) {
        p.events.push_back({"Normal", "ShardPodRecreated",
                            "recreated the pod of " + who(k) +
                                (in.avoid_nodes[i].empty()
                                     ? std::string()
                                     : " away from node(s) " + json(in.avoid_nodes[i]).dump() +
                                           " that would exceed maxExposure")});
      }
      ++created;
      e["phase"] = "Pending";
      e["pod"] = desired.pods[k]["metadata"]["name"];
      continue;
    }
    e["pod"] = obj_name(*pod);
    const std::string node = pod_node(*pod);
    if (!node.empty()) e["node"] = node;
    const std::string phase = pod_phase(*pod);
    e["phase"] = phase;
    const std::string pod_uid = (*pod)["metadata"].value("uid", "");
    if (replicas > 1 && !pod_uid.empty() && e.value("groupRestartPodUID", "") == pod_uid) {
      // Deleted for a restart of every replica: its end is no failure.
      e["phase"] = "Pending";
      if (!being_deleted(*pod)) {
        p.after_status.push_back(make_action(Action::Verb::kDelete, *pod, "replicas restart together"));
      }
      continue;
    }
    if (being_deleted(*pod)) continue;
    if (node.empty() && phase == "Pending" && !avoid_list_current(*pod, in.avoid_nodes[i], occupied)) {
      // Still waiting for a node, with a keep-off list from before the history grew:
      // replaced, so that it cannot land where it would now exceed maxExposure.
      p.after_status.push_back(make_action(Action::Verb::kDelete, *pod, "placement limits changed"));
      p.events.push_back({"Normal", "ShardPodReplaced",
                          "replaced the unscheduled pod of " + who(k) +
                              ": it must now also avoid node(s) " + json(in.avoid_nodes[i]).dump()});
      continue;
    }
    if (phase == "Failed") {
      const std::string uid = (*pod)["metadata"].value("uid", "");
      if (e.value("lastFailedPodUID", "") != uid) {
        e["lastFailedPodUID"] = uid;
        count_failure(e, who(k) + " (pod " + obj_name(*pod) + (node.empty() ? "" : " on " + node) +
                             "): " + pod_failure(*pod));
      }
      restart_all = true;
      if (const auto why = package_refusal(*pod); why && package_refused.empty()) {
        package_refused = "shard " + std::to_string(i) + " (pod " + obj_name(*pod) + (node.empty() ? "" : " on " + node) +
                          ") refused its package: " + *why;
      }
      p.after_status.push_back(make_action(Action::Verb::kDelete, *pod, "failed; recreated from its checkpoint"));
    } else if (phase == "Succeeded") {
      ++succeeded;
    } else if (phase == "Running") {
      ++running;
      if (pod_ready(*pod)) ++ready;
    }
  }
  if (replicas > 1 && (restart_all || terminating)) {
    // No pod starts while others of the job still stop (or are stopped below).
    created -= drop_planned_pod_creations(p);
  }
  if (replicas > 1 && restart_all) {
    int stopped = 0;
    for (int k = 0; k < slots; ++k) {
      const auto& pod = k < static_cast<int>(ob.pods.size()) ? ob.pods[k] : std::nullopt;
      json& e = shards[k];
      // Every replica restarts, a finished one too: a replica that finished while another
      // failed would otherwise never meet the restarted group again (its replicas would
      // wait for it in their first all-reduce until they fail, up to the backoff limit).
      // From the newest common checkpoint it finishes again at once if that was the last.
      if (!pod) {
        if (e.value("phase", "") == "Succeeded") --succeeded;
        e["phase"] = "Pending";
        continue;
      }
      const std::string ph = pod_phase(*pod);
      if (being_deleted(*pod) || ph == "Failed") continue;  // Failed: deleted in the loop above
      const std::string uid = (*pod)["metadata"].value("uid", "");
      if (e.value("groupRestartPodUID", "") == uid) continue;  // deleted in the loop above
      e["groupRestartPodUID"] = uid;
      e["phase"] = "Pending";
      if (ph == "Running") {
        --running;
        if (pod_ready(*pod)) --ready;
      } else if (ph == "Succeeded") {
        --succeeded;
      }
      p.after_status.push_back(make_action(Action::Verb::kDelete, *pod, "replicas restart together"));
      ++stopped;
    }
    if (stopped > 0) {
      p.events.push_back({"Normal", "ReplicasRestarted",
                          "stopped " + std::to_string(stopped) + " pod(s) of the job's " + std::to_string(replicas) +
                              " replicas: replicas move together; every replica restarts from its stage's newest "
                              "common checkpoint"});
    }
  }
  st["shards"] = fold_replicas(shards, n, replicas);
  st["failedPods"] = failed_pods;

  if (!package_refused.empty()) {
    // The same package and key would be refused again: no retry.
    p.before_status.erase(std::remove_if(p.before_status.begin(), p.before_status.end(),
                                         [](const Action& a) { return a.kind == "Pod"; }),
                          p.before_status.end());
    p.after_status.clear();
    for (auto& e : shards) {
      if (e.value("phase", "") != "Succeeded") e["phase"] = "Failed";
    }
    return fail_running_job("PackageRefused", package_refused, "the job was refused", "package refused");
  }

  if (failed_pods > spec.run_policy.backoff_limit) {
    const std::string msg = std::to_string(failed_pods) + " shard pod failure(s), more than spec.runPolicy.backoffLimit " +
                            std::to_string(spec.run_policy.backoff_limit) +
                            (failures.empty() ? std::string() : "; last: " + failures.back());
    p.events.push_back({"Warning", "BackoffLimitExceeded", msg});
    // Nothing is recreated: drop the creations planned above, delete what runs.
    drop_planned_pod_creations(p);
    p.after_status.clear();
    delete_pods(p, ob, "backoff limit exceeded");
    for (auto& e : shards) {
      if (e.value("phase", "") != "Succeeded") e["phase"] = "Failed";
    }
    st["shards"] = fold_replicas(shards, n, replicas);
    cond.set("Failed", true, "BackoffLimitExceeded", msg);
    cond.set("Running", false, "BackoffLimitExceeded", msg);
    cond.set("Ready", false, "BackoffLimitExceeded", msg);
    st["completionTime"] = now;
    finish("Failed");
    return p;
  }

  if (ob.progress) {
    json prog = {{"step", ob.progress->step}, {"epoch", ob.progress->epoch}, {"loss", round4(ob.progress->loss)}};
    if (ob.progress->accuracy) prog["accuracy"] = round4(*ob.progress->accuracy);
    if (ob.progress->eval_loss) prog["evalLoss"] = round4(*ob.progress->eval_loss);
    st["progress"] = prog;
  }

  std::string phase = "Pending";
  if (succeeded == slots) {
    phase = "Succeeded";
    st["completionTime"] = now;
  } else if (running + succeeded == slots && running > 0) {
    phase = "Running";
  }
  // Counted over every pod: n, or n × replicas.
  cond.set("Ready", ready == slots, ready == slots ? "AllShardsReady" : "ShardsNotReady",
           std::to_string(ready) + " of " + std::to_string(slots) + " shard pods ready");
  cond.set("Running", phase == "Running", phase == "Running" ? "AllShardsRunning" : phase,
           std::to_string(running) + " of " + std::to_string(slots) + " shard pods running");
  cond.set("Succeeded", phase == "Succeeded", phase == "Succeeded" ? "AllShardsSucceeded" : "NotFinished",
           std::to_string(succeeded) + " of " + std::to_string(slots) + (replicas > 1 ? " shard pods" : " shards") +
               " finished");
  cond.set("Failed", false, "NoFailure",
           std::to_string(failed_pods) + " shard pod failure(s) of backoffLimit " +
               std::to_string(spec.run_policy.backoff_limit));
  if (phase == "Running" && opt.progress_interval.count() > 0) {
    p.requeue_after = p.requeue_after ? std::min(*p.requeue_after, opt.progress_interval) : opt.progress_interval;
  }
  if (phase == "Succeeded") p.requeue_after.reset();
  if (phase == "Succeeded" && spec.run_policy.ttl_seconds_after_finished) {
    p.requeue_after = std::chrono::seconds(std::max<int64_t>(1, *spec.run_policy.ttl_seconds_after_finished));
  }
  finish(phase);
  return p;
}

}  // namespace shardguard::op
