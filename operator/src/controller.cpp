#include "shardguard/operator/controller.h"

#include "shardguard/common/httplib.h"

#include <algorithm>
#include <future>
#include <sstream>

#include "shardguard/common/crypto.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/log.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/time.h"

namespace shardguard::op {

using nlohmann::json;
using std::chrono::seconds;

namespace {

constexpr const char* kControllerName = "shardedtrainingjob";

const kube::Resource& resource_of(const std::string& kind) {
  if (kind == "Secret") return kube::kSecrets;
  if (kind == "ConfigMap") return kube::kConfigMaps;
  if (kind == "Service") return kube::kServices;
  if (kind == "Pod") return kube::kPods;
  if (kind == kJobKind) return kube::kShardedTrainingJobs;
  throw std::logic_error("no resource for kind " + kind);
}

int64_t unix_now() {
  return std::chrono::duration_cast<seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string data_field(const json& secret, const char* key) {
  if (!secret.contains("data") || !secret["data"].is_object() || !secret["data"].contains(key) ||
      !secret["data"][key].is_string()) {
    return "";
  }
  try {
    return base64_decode(secret["data"][key].get<std::string>());
  } catch (const RenderError&) {
    return "";
  }
}

// The job's key "ns/name".
std::string key_of(const std::string& ns, const std::string& name) { return ns + "/" + name; }

// One sample value of a metric from Prometheus text format, the first series of that
// name (shardd exports one per process).
std::optional<double> sample(const std::string& text, const std::string& metric) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#' || line.compare(0, metric.size(), metric) != 0) continue;
    if (line.size() == metric.size() || (line[metric.size()] != ' ' && line[metric.size()] != '{')) continue;
    const auto sp = line.rfind(' ');
    if (sp == std::string::npos) continue;
    try {
      return std::stod(line.substr(sp + 1));
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
  return std::nullopt;
}

// What the caches keep of a Pod: identity, node, and the status fields plan() reads.
void trim_pod(json& pod) {
  json meta = json::object();
  for (const char* k : {"name", "namespace", "uid", "resourceVersion", "labels", "annotations", "deletionTimestamp"}) {
    if (pod["metadata"].contains(k)) meta[k] = pod["metadata"][k];
  }
  json spec = json::object();
  if (pod.contains("spec") && pod["spec"].contains("nodeName")) spec["nodeName"] = pod["spec"]["nodeName"];
  json status = json::object();
  if (pod.contains("status") && pod["status"].is_object()) {
    const json& s = pod["status"];
    for (const char* k : {"phase", "podIP", "reason", "message"}) {
      if (s.contains(k)) status[k] = s[k];
    }
    for (const auto& c : s.value("conditions", json::array())) {
      const std::string type = c.value("type", "");
      if (type == "Ready") {
        status["conditions"].push_back({{"type", "Ready"}, {"status", c.value("status", "")}});
      } else if (type == "PodScheduled" && c.value("status", "") == "False") {
        // Why the scheduler found no node (a trusted stage that cannot be placed).
        std::string message = c.value("message", "");
        if (message.size() > 512) {
          size_t cut = 512;  // not inside a UTF-8 sequence
          while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xC0) == 0x80) --cut;
          message = message.substr(0, cut) + "…";
        }
        status["conditions"].push_back(
            {{"type", type}, {"status", "False"}, {"reason", c.value("reason", "")}, {"message", message}});
      }
    }
    for (const auto& cs : s.value("containerStatuses", json::array())) {
      json t = {{"name", cs.value("name", "")}};
      if (cs.contains("state") && cs["state"].contains("terminated")) {
        t["state"]["terminated"] = {{"exitCode", cs["state"]["terminated"].value("exitCode", 0)},
                                    {"reason", cs["state"]["terminated"].value("reason", "")}};
        // The end of its termination message (with FallbackToLogsOnError, the last log
        // lines): a refused package's reason is its last line (reconcile.cpp).
        std::string message = cs["state"]["terminated"].value("message", "");
        if (message.size() > 1024) {
          size_t from = message.size() - 1024;  // not inside a UTF-8 sequence
          while (from < message.size() && (static_cast<unsigned char>(message[from]) & 0xC0) == 0x80) ++from;
          message = message.substr(from);
        }
        if (!message.empty()) t["state"]["terminated"]["message"] = message;
      }
      status["containerStatuses"].push_back(t);
    }
  }
  pod = {{"apiVersion", pod.value("apiVersion", "v1")}, {"kind", "Pod"}, {"metadata", meta}, {"spec", spec},
         {"status", status}};
}

// A ConfigMap's data (the job and the policy, a few KiB per shard) becomes a digest.
void digest_config_map(json& cm) {
  if (cm.contains("data")) {
    cm[kCachedDataDigest] = data_digest(cm["data"]);
    cm.erase("data");
  }
  if (cm.contains("metadata")) cm["metadata"].erase("managedFields");
}

void drop_managed_fields(json& obj) {
  if (obj.contains("metadata")) obj["metadata"].erase("managedFields");
}

}  // namespace

struct Controller::Owned {
  std::string ns;
  std::unique_ptr<kube::Informer> jobs, pods, secrets, config_maps, services;
};

Controller::Controller(kube::Client& client, ControllerOptions opt, std::shared_ptr<prometheus::Registry> registry)
    : client_(client), opt_(std::move(opt)), registry_(std::move(registry)) {
  queue_ = std::make_unique<kube::WorkQueue>(kControllerName, kube::default_controller_rate_limiter(), registry_.get());
  reconcile_total_ = &prometheus::BuildCounter()
                          .Name("controller_runtime_reconcile_total")
                          .Help("Reconciliations per controller and result (success, error, requeue_after)")
                          .Register(*registry_);
  for (const char* r : {"success", "error", "requeue", "requeue_after"}) {
    reconcile_total_->Add({{"controller", kControllerName}, {"result", r}});
  }
  reconcile_errors_ = &prometheus::BuildCounter()
                           .Name("controller_runtime_reconcile_errors_total")
                           .Help("Reconciliations that ended in an error")
                           .Register(*registry_)
                           .Add({{"controller", kControllerName}});
  reconcile_time_ = &prometheus::BuildHistogram()
                         .Name("controller_runtime_reconcile_time_seconds")
                         .Help("Time per reconciliation")
                         .Register(*registry_)
                         .Add({{"controller", kControllerName}},
                              prometheus::Histogram::BucketBoundaries{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                                      2.5, 5, 10, 30, 60});
  prometheus::BuildGauge()
      .Name("controller_runtime_max_concurrent_reconciles")
      .Help("Workers of the controller")
      .Register(*registry_)
      .Add({{"controller", kControllerName}})
      .Set(opt_.workers);
  jobs_by_phase_ = &prometheus::BuildGauge()
                        .Name("shardguard_jobs")
                        .Help("ShardedTrainingJobs the operator sees, by phase")
                        .Register(*registry_);
  node_exposure_ = &prometheus::BuildGauge()
                        .Name("shardguard_node_exposure_ratio")
                        .Help("Fraction of a job's parameters a node has held or sandwiched (DESIGN.md §5)")
                        .Register(*registry_);
  job_max_exposure_ = &prometheus::BuildGauge()
                           .Name("shardguard_job_max_exposure_ratio")
                           .Help("Largest node exposure of a job")
                           .Register(*registry_);
  job_exposure_limit_ = &prometheus::BuildGauge()
                             .Name("shardguard_job_max_exposure_limit_ratio")
                             .Help("spec.protection.maxExposure of a job")
                             .Register(*registry_);
  for (const char* ph : {"Pending", "Running", "Succeeded", "Failed", "Suspended"}) {
    jobs_by_phase_->Add({{"phase", ph}}).Set(0);
  }

  const std::vector<std::string> namespaces = opt_.namespaces.empty() ? std::vector<std::string>{""} : opt_.namespaces;
  const std::string owned_selector = std::string(kLabelManagedBy) + "=" + kManagedBy;
  for (const auto& ns : namespaces) {
    auto o = std::make_unique<Owned>();
    o->ns = ns;
    kube::InformerOptions job_opt;
    job_opt.availability = opt_.apis;
    job_opt.resync = opt_.resync;
    job_opt.transform = drop_managed_fields;
    o->jobs = std::make_unique<kube::Informer>(
        client_, kube::kShardedTrainingJobs, ns, "",
        kube::Informer::Handlers{[this](const json& j) { enqueue_job(j); },
                                 [this](const json&, const json& j) { enqueue_job(j); },
                                 [this](const json& j) { enqueue_job(j); }},
        job_opt);
    kube::Informer::Handlers owner{[this](const json& x) { enqueue_owner(x); },
                                   [this](const json&, const json& x) { enqueue_owner(x); },
                                   [this](const json& x) { enqueue_owner(x); }};
    kube::InformerOptions pod_opt, cm_opt, plain_opt;
    pod_opt.transform = trim_pod;
    cm_opt.transform = digest_config_map;
    plain_opt.transform = drop_managed_fields;
    pod_opt.availability = cm_opt.availability = plain_opt.availability = opt_.apis;
    o->pods = std::make_unique<kube::Informer>(client_, kube::kPods, ns, owned_selector, owner, pod_opt);
    o->secrets = std::make_unique<kube::Informer>(client_, kube::kSecrets, ns, owned_selector, owner, plain_opt);
    o->config_maps = std::make_unique<kube::Informer>(client_, kube::kConfigMaps, ns, owned_selector, owner, cm_opt);
    o->services = std::make_unique<kube::Informer>(client_, kube::kServices, ns, owned_selector, owner, plain_opt);
    owned_.push_back(std::move(o));
  }
  if (opt_.apis) {
    for (const auto* r : {&kube::kShardedTrainingJobs, &kube::kPods, &kube::kSecrets, &kube::kConfigMaps,
                          &kube::kServices}) {
      opt_.apis->need(*r);
    }
  }
}

Controller::~Controller() { stop(); }

bool Controller::start(std::chrono::milliseconds sync_timeout, const std::atomic<bool>* cancel) {
  for (auto& o : owned_) {
    for (auto* inf : {o->pods.get(), o->secrets.get(), o->config_maps.get(), o->services.get(), o->jobs.get()}) {
      inf->start();
    }
  }
  using Clock = std::chrono::steady_clock;
  auto deadline = Clock::now() + sync_timeout;
  for (auto& o : owned_) {
    for (auto* inf : {o->pods.get(), o->secrets.get(), o->config_maps.get(), o->services.get(), o->jobs.get()}) {
      while (!inf->wait_for_sync(std::chrono::milliseconds(100))) {
        if (cancel && cancel->load()) return false;
        // A resource the server does not serve is waited for (without end: it may be
        // installed later); the timeout counts only time without one.
        if (opt_.apis && !opt_.apis->missing_now().empty()) deadline = Clock::now() + sync_timeout;
        if (Clock::now() >= deadline) return false;
      }
    }
  }
  log::info("caches synced", {{"namespaces", opt_.namespaces}, {"workers", opt_.workers}});
  for (int i = 0; i < opt_.workers; ++i) workers_.emplace_back([this] { worker(); });
  return true;
}

void Controller::stop() {
  if (stopped_.exchange(true)) return;
  queue_->shut_down();
  for (auto& t : workers_) t.join();
  workers_.clear();
  for (auto& o : owned_) {
    for (auto* inf : {o->jobs.get(), o->pods.get(), o->secrets.get(), o->config_maps.get(), o->services.get()}) {
      inf->stop();
    }
  }
}

void Controller::enqueue_job(const json& job) {
  const json& m = job.value("metadata", json::object());
  queue_->add(key_of(m.value("namespace", ""), m.value("name", "")));
}

void Controller::enqueue_owner(const json& obj) {
  const json& m = obj.value("metadata", json::object());
  const json& labels = m.value("labels", json::object());
  if (!labels.contains(kLabelJob) || !labels[kLabelJob].is_string()) return;
  queue_->add(key_of(m.value("namespace", ""), labels[kLabelJob].get<std::string>()));
}

Controller::Owned& Controller::owned_for(const std::string& ns) {
  for (auto& o : owned_) {
    if (o->ns.empty() || o->ns == ns) return *o;
  }
  throw std::logic_error("namespace " + ns + " is not watched");
}

void Controller::worker() {
  while (auto key = queue_->get()) {
    const auto slash = key->find('/');
    const std::string ns = key->substr(0, slash), name = key->substr(slash + 1);
    const auto t0 = std::chrono::steady_clock::now();
    std::string result = "success";
    try {
      const seconds again = reconcile(ns, name);
      queue_->forget(*key);
      if (again.count() > 0) {
        queue_->add_after(*key, again);
        result = "requeue_after";
      }
    } catch (const std::exception& e) {
      result = "error";
      reconcile_errors_->Increment();
      const auto* api = dynamic_cast<const kube::ApiError*>(&e);
      log::write(api && api->code() == 409 ? log::Level::kInfo : log::Level::kWarn, "reconcile failed; retrying",
                 {{"job", *key}, {"error", e.what()}, {"retries", queue_->num_requeues(*key)}});
      queue_->add_rate_limited(*key);
    }
    reconcile_time_->Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    reconcile_total_->Add({{"controller", kControllerName}, {"result", result}}).Increment();
    queue_->done(*key);
  }
}

RenderInputs Controller::prepare_material(const json& job, const JobSpec& spec, Owned& o, int64_t now) {
  RenderInputs in;
  in.uid = job["metadata"].value("uid", "");
  in.job_object = job;
  in.cluster_domain = opt_.cluster_domain;
  in.export_budget_bytes = opt_.export_budget_bytes;
  if (!job["spec"].contains("template") || job["spec"]["template"].value("image", "").empty()) {
    in.shardd_image = opt_.shardd_image;
  }
  if (!job["spec"].contains("sidecar") || job["spec"]["sidecar"].value("image", "").empty()) {
    in.sidecar_image = opt_.sidecar_image;
  }
  // A Secret the cache does not have yet is read from the API: making new PKI for a
  // job that has some would give shards certificates of a CA nobody trusts.
  auto secret = [&](const std::string& name) -> std::optional<json> {
    if (auto s = o.secrets->get(spec.namespace_, name)) return s;
    try {
      return client_.get(kube::kSecrets, spec.namespace_, name);
    } catch (const kube::ApiError& e) {
      if (e.code() == 404) return std::nullopt;
      throw;
    }
  };
  const auto now_tp = std::chrono::system_clock::time_point(seconds(now));
  CaBundle ca;
  if (auto s = secret(ca_secret_name(spec))) {
    ca.cert_pem = data_field(*s, "ca.crt");
    ca.key_pem = data_field(*s, "ca.key");
  }
  if (ca.cert_pem.empty() || ca.key_pem.empty()) {
    ca = create_ca(job_ca_common_name(spec.protection.trust_domain, spec.namespace_, spec.name),
                   opt_.ca_lifetime);
  }
  in.ca_cert_pem = ca.cert_pem;
  in.ca_key_pem = ca.key_pem;
  // One leaf per pod (with replicas, per replica: its own identity), index = slot.
  const int n = spec.sharding.shards;
  for (int k = 0; k < n * replica_count(spec); ++k) {
    const int i = k % n, r = k / n;
    const std::string id = spiffe_id_of(spec, i, r);
    ShardMaterial m;
    if (auto s = secret(replica_name(spec, i, r))) {
      m.cert_pem = data_field(*s, "tls.crt");
      m.key_pem = data_field(*s, "tls.key");
      m.checkpoint_key = data_field(*s, "checkpoint.key");
      m.ledger_key = data_field(*s, "ledger.key");
      // Re-issue a leaf that is not ours, names another identity, or is past half-life.
      bool keep = !m.cert_pem.empty() && !m.key_pem.empty();
      if (keep) {
        const SvidCheck check = verify_svid(m.cert_pem, ca.cert_pem, now_tp);
        keep = check.ok && check.spiffe_id == id && not_after(m.cert_pem) - now_tp > opt_.leaf_lifetime / 2;
      }
      if (!keep) m.cert_pem.clear();
    }
    if (m.cert_pem.empty()) {
      const Leaf leaf = issue_leaf(ca, id, opt_.leaf_lifetime);
      m.cert_pem = leaf.cert_pem;
      m.key_pem = leaf.key_pem;
    }
    // The checkpoint key is never replaced: the shard's checkpoints are sealed with it.
    // Every replica of a stage has replica 0's: they resume from its checkpoints.
    if (k >= n) {
      m.checkpoint_key = in.shards[i].checkpoint_key;
    } else if (m.checkpoint_key.size() != 32) {
      m.checkpoint_key = random_bytes(32);
    }
    // Nor is the ledger key: the sidecar's exposure ledger is sealed with it.
    if (m.ledger_key.size() != 32) m.ledger_key = random_bytes(32);
    in.shards.push_back(std::move(m));
  }
  return in;
}

// spec.model.package.keysSecret, read from the API (a Secret the job does not own):
// the manifest (for the cut and the exposure) and every shard's package key, which
// render() puts into that shard's own Secret only. What is missing or unreadable is
// named in ob.package_error; the job then waits for it.
void Controller::read_package_keys(const JobSpec& spec, Observed& ob) {
  const std::string name = spec.model.package->keys_secret;
  const std::string what = "spec.model.package.keysSecret " + spec.namespace_ + "/" + name;
  std::optional<json> secret;
  try {
    secret = client_.get(kube::kSecrets, spec.namespace_, name);
  } catch (const kube::ApiError& e) {
    ob.package_error = what + ": " + (e.code() == 404 ? std::string("not found") : e.what()) +
                       " (create it from the keys and the manifest of shardctl split, docs/distribution.md)";
    return;
  }
  const std::string text = data_field(*secret, model::kManifestFile);
  if (text.empty()) {
    ob.package_error = what + ": has no " + model::kManifestFile;
    return;
  }
  try {
    ob.render_inputs.package_manifest = model::parse_manifest(text, what + " " + model::kManifestFile);
  } catch (const model::PackageError& e) {
    ob.package_error = e.what();
    return;
  }
  ob.render_inputs.package_keys.clear();
  for (int i = 0; i < spec.sharding.shards; ++i) {
    ob.render_inputs.package_keys.push_back(data_field(*secret, model::package_key_file_name(i).c_str()));
  }
}

namespace {

// The IP of a Running pod, "" otherwise.
std::string running_pod_ip(const std::optional<json>& pod) {
  if (!pod || !(*pod).contains("status")) return "";
  const json& s = (*pod)["status"];
  if (s.value("phase", "") != "Running") return "";
  return s.value("podIP", "");
}

// GET http://ip:port/metrics; nullopt unless 200.
std::optional<std::string> scrape(const std::string& ip, int port) {
  httplib::Client cli(ip, port);
  // Short: a worker waits for this (a pod that does not answer costs at most ~1 s).
  cli.set_connection_timeout(0, 300000);
  cli.set_read_timeout(0, 700000);
  auto res = cli.Get("/metrics");
  if (!res || res->status != 200) return std::nullopt;
  return res->body;
}

}  // namespace

std::optional<Progress> Controller::read_progress(const std::optional<json>& pod) {
  const std::string ip = running_pod_ip(pod);
  if (ip.empty()) return std::nullopt;
  const auto body = scrape(ip, opt_.shard_metrics_port);
  if (!body) return std::nullopt;
  const auto step = sample(*body, "shardguard_train_step");
  if (!step) return std::nullopt;
  Progress p;
  p.step = static_cast<int64_t>(*step);
  p.epoch = static_cast<int64_t>(sample(*body, "shardguard_train_epoch").value_or(0));
  p.loss = sample(*body, "shardguard_train_loss").value_or(0);
  p.accuracy = sample(*body, "shardguard_eval_accuracy");
  // The gauge reads 0 until the first evaluation; a cross-entropy is never exactly 0.
  if (const auto loss = sample(*body, "shardguard_eval_loss"); loss && *loss > 0) p.eval_loss = loss;
  return p;
}

std::optional<int64_t> Controller::read_ledger_sequence(const std::optional<json>& pod) {
  const std::string ip = running_pod_ip(pod);
  if (ip.empty()) return std::nullopt;
  const auto body = scrape(ip, opt_.sidecar_metrics_port);
  if (!body) return std::nullopt;
  const auto seq = sample(*body, "shardguard_ledger_sequence");
  // A gauge is a double: anything but a whole number in range is not a sequence.
  if (!seq || !(*seq >= 0) || *seq > 9.0e15 || *seq != static_cast<double>(static_cast<int64_t>(*seq))) {
    return std::nullopt;
  }
  return static_cast<int64_t>(*seq);
}

seconds Controller::reconcile(const std::string& ns, const std::string& name) {
  Owned& o = owned_for(ns);
  const auto job = o.jobs->get(ns, name);
  if (!job) {
    forget_job_metrics(ns, name);
    update_phase_counts();
    return seconds(0);
  }
  Observed ob;
  ob.job = *job;
  ob.now = unix_now();
  double max_exposure = 1.0;
  try {
    const JobSpec spec = job_from_json(*job);
    max_exposure = spec.protection.max_exposure;
    ob.ca_secret = o.secrets->get(ns, ca_secret_name(spec));
    ob.service = o.services->get(ns, service_name(spec));
    // Index = slot: replica r of stage i at r·n + i (render.h).
    for (int k = 0; k < spec.sharding.shards * replica_count(spec); ++k) {
      const std::string pod_name = replica_name(spec, k % spec.sharding.shards, k / spec.sharding.shards);
      ob.shard_secrets.push_back(o.secrets->get(ns, pod_name));
      ob.config_maps.push_back(o.config_maps->get(ns, pod_name));
      ob.pods.push_back(o.pods->get(ns, pod_name));
    }
    const bool deleting = (*job)["metadata"].contains("deletionTimestamp");
    const std::string phase = job->value("status", json::object()).value("phase", "");
    if (!deleting && phase != "Succeeded" && phase != "Failed") {
      ob.render_inputs = prepare_material(*job, spec, o, ob.now);
      // The running pods' sidecars, up to kParallelReads at once (a job may have 64
      // shards × 16 replicas), the first ones beside the last stage's progress: pods
      // that do not answer cost about 1 s per batch, not 1 s each.
      constexpr size_t kParallelReads = 32;
      for (size_t begin = 0; begin < ob.pods.size(); begin += kParallelReads) {
        std::vector<std::future<std::optional<int64_t>>> sequences;
        for (size_t k = begin; k < std::min(ob.pods.size(), begin + kParallelReads); ++k) {
          // A pod that is not running is answered at get() without a thread (nullopt).
          const auto& pod = ob.pods[k];
          const auto policy = running_pod_ip(pod).empty() ? std::launch::deferred : std::launch::async;
          sequences.push_back(std::async(policy, [this, pod] { return read_ledger_sequence(pod); }));
        }
        // The last stage of replica 0 (the one that evaluates).
        if (begin == 0) ob.progress = read_progress(ob.pods[spec.sharding.shards - 1]);
        for (auto& f : sequences) ob.ledger_sequences.push_back(f.get());
      }
    }
    if (spec.model.from_package() && !deleting) read_package_keys(spec, ob);
  } catch (const JobSpecError&) {
    // plan() turns it into status and an Event, and deletes the job's pods: found by
    // label here, as the names come from a spec that no longer decodes.
    for (const auto& pod : o.pods->list(ns)) {
      const json& labels = pod["metadata"].value("labels", json::object());
      if (labels.value(kLabelJob, "") == name) ob.pods.push_back(pod);
    }
  }
  PlanOptions popt;
  popt.progress_interval = opt_.progress_interval;
  const Plan p = plan(ob, popt);
  execute(ns, *job, p);
  update_metrics(ns, name, p, max_exposure);
  return p.requeue_after.value_or(seconds(0));
}

void Controller::execute(const std::string& ns, const json& job, const Plan& p) {
  json current = job;
  const std::string name = job["metadata"].value("name", "");
  // Where new shard pods may go comes from the placement history in the job's
  // status; the pod creations below are not guarded by the job's resourceVersion
  // (only the status write is), so check first that the cached job is current.
  const bool creates_pods = std::any_of(p.before_status.begin(), p.before_status.end(), [](const Action& a) {
    return a.kind == "Pod" && a.verb == Action::Verb::kCreate;
  });
  if (creates_pods) {
    const json live = client_.get(kube::kShardedTrainingJobs, ns, name);
    if (live["metadata"].value("resourceVersion", "") != job["metadata"].value("resourceVersion", "")) {
      throw kube::ApiError(409, "Conflict", "job " + ns + "/" + name +
                                                " changed since the cache saw it; reconciling it again before creating pods");
    }
  }
  for (const auto& a : p.before_status) {
    const kube::Resource& res = resource_of(a.kind);
    if (a.verb == Action::Verb::kCreate) {
      try {
        client_.create(res, ns, a.object);
      } catch (const kube::ApiError& e) {
        // The cache is behind a create of ours. Harmless for objects rendered the same
        // every time; not for Secrets, whose PKI was just made from a cache miss.
        if (e.code() != 409 || a.kind == "Secret") throw;
      }
    } else if (a.verb == Action::Verb::kUpdate) {
      const json out = client_.update(res, ns, a.object);
      if (a.kind == kJobKind) current["metadata"]["resourceVersion"] = out["metadata"]["resourceVersion"];
    }
    log::debug("applied", {{"job", ns + "/" + name}, {"kind", a.kind}, {"name", a.name}, {"why", a.reason}});
  }
  if (p.status) {
    json obj = current;
    obj["status"] = *p.status;
    client_.update_status(kube::kShardedTrainingJobs, ns, obj);
  }
  // Events describe the status just written: record them before the deletions, which
  // may fail and be retried.
  for (const auto& e : p.events) emit_event(job, e);
  // Each delete names the uid it was planned for: an object created again under the
  // same name since the cache saw it (409) is not the one planned, and is left to the
  // next reconcile, like one already gone (404).
  for (const auto& a : p.after_status) {
    const std::string uid = a.object.contains("metadata") ? a.object["metadata"].value("uid", "") : "";
    try {
      client_.remove(resource_of(a.kind), ns, a.name, "Background", uid);
    } catch (const kube::ApiError& e) {
      if (e.code() == 409) {
        log::info("not deleted: replaced since it was read",
                  {{"job", ns + "/" + name}, {"kind", a.kind}, {"name", a.name}, {"uid", uid}, {"why", a.reason}});
        continue;
      }
      if (e.code() != 404) throw;
    }
  }
}

void Controller::emit_event(const json& job, const EventNote& e) {
  const json& m = job["metadata"];
  const auto now = std::chrono::system_clock::now();
  const std::string ts = format_rfc3339(now);
  char suffix[40];
  std::snprintf(suffix, sizeof suffix, ".%llx%04llx",
                static_cast<unsigned long long>(
                    std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count()),
                static_cast<unsigned long long>(event_seq_.fetch_add(1) & 0xffff));
  const json ev = {
      {"apiVersion", "v1"},
      {"kind", "Event"},
      {"metadata", {{"name", m.value("name", "") + suffix}, {"namespace", m.value("namespace", "")}}},
      {"involvedObject",
       {{"apiVersion", kJobApiVersion},
        {"kind", kJobKind},
        {"name", m.value("name", "")},
        {"namespace", m.value("namespace", "")},
        {"uid", m.value("uid", "")}}},
      {"reason", e.reason},
      {"message", e.message},
      {"type", e.type},
      {"firstTimestamp", ts},
      {"lastTimestamp", ts},
      {"count", 1},
      {"source", {{"component", "shardguard-operator"}}},
      {"reportingComponent", "shardguard-operator"},
      {"reportingInstance", opt_.identity},
  };
  try {
    client_.create(kube::kEvents, m.value("namespace", ""), ev);
  } catch (const std::exception& ex) {
    log::warn("cannot record event", {{"reason", e.reason}, {"error", ex.what()}});
  }
  log::write(e.type == "Warning" ? log::Level::kWarn : log::Level::kInfo, e.message,
             {{"job", m.value("namespace", "") + "/" + m.value("name", "")}, {"reason", e.reason}});
}

void Controller::update_metrics(const std::string& ns, const std::string& name, const Plan& p, double max_exposure) {
  {
    std::lock_guard<std::mutex> lock(metrics_mu_);
    auto& gauges = job_node_gauges_[key_of(ns, name)];  // created even when empty: marks the job's series
    for (const auto& n : p.exposure.nodes) {
      auto& g = gauges[n.node];
      if (!g) g = &node_exposure_->Add({{"namespace", ns}, {"job", name}, {"node", n.node}});
      g->Set(n.ratio);
    }
    job_max_exposure_->Add({{"namespace", ns}, {"job", name}}).Set(p.exposure.max_node);
    job_exposure_limit_->Add({{"namespace", ns}, {"job", name}}).Set(max_exposure);
    job_phase_[key_of(ns, name)] = p.phase.empty() ? "Pending" : p.phase;
  }
  update_phase_counts();
}

void Controller::forget_job_metrics(const std::string& ns, const std::string& name) {
  std::lock_guard<std::mutex> lock(metrics_mu_);
  job_phase_.erase(key_of(ns, name));
  auto it = job_node_gauges_.find(key_of(ns, name));
  if (it == job_node_gauges_.end()) return;  // never reconciled: no series
  for (auto& [node, g] : it->second) node_exposure_->Remove(g);
  job_node_gauges_.erase(it);
  job_max_exposure_->Remove(&job_max_exposure_->Add({{"namespace", ns}, {"job", name}}));
  job_exposure_limit_->Remove(&job_exposure_limit_->Add({{"namespace", ns}, {"job", name}}));
}

void Controller::update_phase_counts() {
  std::map<std::string, int> counts = {{"Pending", 0}, {"Running", 0}, {"Succeeded", 0}, {"Failed", 0}, {"Suspended", 0}};
  std::lock_guard<std::mutex> lock(metrics_mu_);
  for (const auto& [key, phase] : job_phase_) {
    ++counts[counts.count(phase) ? phase : std::string("Pending")];
  }
  for (const auto& [phase, n] : counts) jobs_by_phase_->Add({{"phase", phase}}).Set(n);
}

}  // namespace shardguard::op
