// The real shardguard-operator process against one address that serves
// ShardedTrainingJobs (/apis/shardguard.io) from the real Kubernetes API server of the
// `realapi` fixture (Kubernetes' own apiextensions-apiserver + etcd: validation,
// defaulting, pruning, optimistic concurrency, finalizers, list+watch as in a cluster)
// and the core kinds (Pods, Secrets, ConfigMaps, Services, Events, Leases) from the
// test Kubernetes API server (tests/apiserver), which routes the former upstream. The
// test plays the user (creates, edits and deletes jobs on the real server), the
// scheduler and the kubelet (binds pods to nodes and sets their phases, honouring the
// pods' node affinity), the last shard's shardd (a /metrics endpoint the operator
// reads progress from) and its sidecar (the exposure ledger sequence). Each test has its own namespace and its operator watches only
// that one, so tests can share the fixture's server and run in parallel.
#include <gtest/gtest.h>
#include "shardguard/common/httplib.h"
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>

#include "apiserver/kube_apiserver.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/process.h"
#include "shardguard/model/package.h"
#include "shardguard/operator/render.h"
#include "support/operator_process.h"
#include "support/realapi.h"
#include "support/rest.h"
#include "support/wait.h"

namespace shardguard {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::KubeApiServer;
using testsupport::eventually;
using testsupport::OperatorProcess;
using namespace std::chrono_literals;

constexpr const char* kGroup = "shardguard.io";
constexpr const char* kVersion = "v1alpha1";
constexpr const char* kJobs = "shardedtrainingjobs";

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string pod_name(const std::string& job, int i) { return job + "-shard-" + std::to_string(i); }

// A stand-in for the last stage's shardd /metrics (what the operator scrapes), or for
// its sidecar's (set_body).
class FakeShardMetrics {
 public:
  FakeShardMetrics() {
    server_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      std::lock_guard<std::mutex> lock(mu_);
      res.set_content(body_, "text/plain; version=0.0.4");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    // Serving before the constructor returns: a stop() that came before the listen loop
    // started would be missed and the destructor's join would wait forever (a test that
    // fails in SetUp destroys this at once).
    testsupport::eventually([this] { return server_.is_running(); }, std::chrono::seconds(10));
  }
  ~FakeShardMetrics() {
    server_.stop();
    thread_.join();
  }
  int port() const { return port_; }
  void set(int step, int epoch, double loss, double accuracy) {
    std::lock_guard<std::mutex> lock(mu_);
    body_ = "# TYPE shardguard_train_step gauge\nshardguard_train_step{stage=\"3\"} " + std::to_string(step) +
            "\nshardguard_train_epoch{stage=\"3\"} " + std::to_string(epoch) +
            "\nshardguard_train_loss{stage=\"3\"} " + std::to_string(loss) +
            "\nshardguard_eval_accuracy{stage=\"3\"} " + std::to_string(accuracy) +
            "\nshardguard_eval_loss{stage=\"3\"} " + std::to_string(loss * 0.9) + "\n";
  }
  void set_body(std::string body) {
    std::lock_guard<std::mutex> lock(mu_);
    body_ = std::move(body);
  }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::string body_ = "# nothing yet\n";
};

class OperatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("shardguard-op-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    // The real server of the fixture, with the CRD (applied by every test: the first
    // creates it; parallel tests may race on that create, so a failure is retried).
    std::string why;
    auto real = testsupport::RealApi::find(&why);
    ASSERT_TRUE(real) << why;
    real_ = *real;
    std::string err = "not tried";
    for (int attempt = 0; attempt < 3 && !err.empty(); ++attempt) err = real_.install_crd();
    ASSERT_EQ(err, "") << err;
    jobs_ = std::make_unique<testsupport::RestClient>(real_);
    // A namespace of this test's own on both servers (the real one has no Namespace
    // objects: a custom resource may name any namespace).
    static int counter = 0;
    ns_ = "ml-" + std::to_string(getpid()) + "-" + std::to_string(++counter);
    KubeApiServer::Options opt;
    testing::KubeApiRoute route;
    route.prefix = "/apis/shardguard.io";
    route.port = real_.port;
    route.ca_file = real_.ca_file;
    route.cert_file = real_.cert_file;
    route.key_file = real_.key_file;
    opt.routes.push_back(route);
    api_ = std::make_unique<KubeApiServer>(opt);
    kubeconfig_ = api_->write_kubeconfig((dir_ / "kubeconfig").string(), ns_);
    api_->create("", "v1", "namespaces", "", {{"metadata", {{"name", ns_}}}});
  }
  void TearDown() override {
    ops_.clear();
    // The jobs this test left on the shared real server go (finalizers first).
    if (jobs_) {
      auto list = jobs_->get(jobs_path());
      if (list.code == 200) {
        for (const auto& j : list.body.value("items", json::array())) {
          const std::string name = j["metadata"].value("name", "");
          jobs_->patch(jobs_path(name), R"({"metadata":{"finalizers":null}})", "application/merge-patch+json");
          jobs_->del(jobs_path(name));
        }
      }
    }
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // A ViT in 4 stages (shares about 0.02 / 0.33 / 0.33 / 0.33): with maxExposure 0.5
  // a node that held stage 0 must never get stage 2 (it would sandwich stage 1).
  json job_object(const std::string& name, const std::string& extra_spec = "", double max_exposure = 0.5) const {
    return yaml_to_json("apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\n"
                        "metadata: {name: " + name + ", namespace: " + ns_ + "}\n"
                        "spec:\n"
                        "  model: {architecture: vit}\n"
                        "  sharding: {shards: 4}\n"
                        "  protection: {maxExposure: " + std::to_string(max_exposure) + "}\n"
                        "  template: {image: shardd:test}\n"
                        "  sidecar: {image: sidecar:test}\n" + extra_spec);
  }

  // /apis/shardguard.io/v1alpha1/namespaces/NS/shardedtrainingjobs[/NAME[/SUB]] on the real server.
  std::string jobs_path(const std::string& name = "", const std::string& sub = "") const {
    std::string p = std::string("/apis/") + kGroup + "/" + kVersion + "/namespaces/" + ns_ + "/" + kJobs;
    if (!name.empty()) p += "/" + name;
    if (!sub.empty()) p += "/" + sub;
    return p;
  }

  OperatorProcess& start_operator(std::vector<std::string> extra = {}) {
    extra.insert(extra.end(), {"--shard-metrics-port", std::to_string(shard_metrics_.port()), "--sidecar-metrics-port",
                               std::to_string(sidecar_metrics_.port()), "--namespace", ns_});
    const std::string log = (dir_ / ("operator-" + std::to_string(ops_.size()) + ".log")).string();
    ops_.push_back(std::make_unique<OperatorProcess>(SHARDGUARD_BIN_DIR, kubeconfig_, log, extra));
    return *ops_.back();
  }

  // The user's part, on the real server.
  json create_job(const json& job) {
    const auto r = jobs_->post(jobs_path(), job);
    if (r.code != 201) throw std::runtime_error("create job: " + std::to_string(r.code) + " " + r.raw + r.error);
    return r.body;
  }
  std::optional<json> job(const std::string& name) const {
    const auto r = jobs_->get(jobs_path(name));
    if (r.code == 404) return std::nullopt;
    if (r.code != 200) throw std::runtime_error("get job: " + std::to_string(r.code) + " " + r.raw + r.error);
    return r.body;
  }
  // Read, change, write back with the resourceVersion read; a 409 (the operator wrote
  // in between) reads again. Bounded.
  json edit_job(const std::string& name, const std::function<void(json&)>& change) {
    for (int attempt = 0; attempt < 20; ++attempt) {
      json j = job(name).value();
      change(j);
      const auto r = jobs_->put(jobs_path(name), j);
      if (r.code == 200) return r.body;
      if (r.code != 409) throw std::runtime_error("update job: " + std::to_string(r.code) + " " + r.raw + r.error);
    }
    throw std::runtime_error("update job " + name + ": 20 conflicts in a row");
  }
  void delete_job(const std::string& name) {
    const auto r = jobs_->del(jobs_path(name));
    if (r.code != 200 && r.code != 202)
      throw std::runtime_error("delete job: " + std::to_string(r.code) + " " + r.raw + r.error);
  }
  json status(const std::string& name) const {
    auto j = job(name);
    return j && j->contains("status") ? (*j)["status"] : json::object();
  }
  std::optional<json> pod(const std::string& job_name, int i) const {
    return api_->get("", "v1", "pods", ns_, pod_name(job_name, i));
  }
  bool condition(const std::string& job_name, const std::string& type, const std::string& value = "True") const {
    for (const auto& c : status(job_name).value("conditions", json::array())) {
      if (c.value("type", "") == type) return c.value("status", "") == value;
    }
    return false;
  }
  std::string condition_reason(const std::string& job_name, const std::string& type) const {
    for (const auto& c : status(job_name).value("conditions", json::array())) {
      if (c.value("type", "") == type) return c.value("reason", "");
    }
    return "";
  }
  std::set<std::string> event_reasons(const std::string& job_name) const {
    std::set<std::string> out;
    for (const auto& e : api_->list("", "v1", "events", ns_)) {
      if (e["involvedObject"].value("name", "") == job_name) out.insert(e.value("reason", ""));
    }
    return out;
  }
  // Events are recorded after the status they describe: wait for them.
  bool has_event(const std::string& job_name, const std::string& reason) const {
    return eventually([&] { return event_reasons(job_name).count(reason) > 0; }, 10s);
  }
  size_t owned_objects(const std::string& job_name) const {
    const std::string sel = "shardguard.io/job=" + job_name;
    return api_->list("", "v1", "pods", ns_, sel).size() + api_->list("", "v1", "secrets", ns_, sel).size() +
           api_->list("", "v1", "configmaps", ns_, sel).size() + api_->list("", "v1", "services", ns_, sel).size();
  }
  bool all_pods_exist(const std::string& job_name, int n = 4) const {
    for (int i = 0; i < n; ++i) {
      if (!pod(job_name, i)) return false;
    }
    return true;
  }

  // The kubelet's part: the pod is bound to `node` and gets `phase`. The last stage
  // gets 127.0.0.1 as its IP, where the FakeShardMetrics answer.
  void kubelet(const std::string& job_name, int i, const std::string& node, const std::string& phase) {
    const auto found = pod(job_name, i);
    if (!found) throw std::runtime_error("kubelet: no pod " + pod_name(job_name, i));
    json p = *found;
    if (p["spec"].value("nodeName", "") != node) {
      p["spec"]["nodeName"] = node;
      p["metadata"].erase("resourceVersion");
      p = api_->update("", "v1", "pods", ns_, p);
    }
    p["status"] = {{"phase", phase},
                   {"podIP", i == 3 ? "127.0.0.1" : "10.0.0." + std::to_string(i + 1)},
                   {"conditions", json::array({{{"type", "Ready"}, {"status", phase == "Running" ? "True" : "False"}}})}};
    if (phase == "Failed") {
      p["status"]["reason"] = "Error";
      p["status"]["containerStatuses"] = json::array(
          {{{"name", "shardd"},
            {"ready", false},
            {"restartCount", 0},
            {"image", "shardd:test"},
            {"imageID", "docker-pullable://shardd@sha256:0"},
            {"state", {{"terminated", {{"exitCode", 137}, {"reason", "OOMKilled"}}}}}}});
    }
    p["metadata"].erase("resourceVersion");
    api_->update("", "v1", "pods", ns_, p, /*status=*/true);
  }

  // The scheduler's part: the first of `nodes` that the pod's required node affinity
  // allows and that hosts no other pod of the job (its required anti-affinity).
  std::string schedule(const std::string& job_name, int i, const std::vector<std::string>& nodes) {
    const json p = *pod(job_name, i);
    std::set<std::string> banned;
    const json aff = p["spec"].value("affinity", json::object());
    if (aff.contains("nodeAffinity")) {
      for (const auto& term :
           aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]) {
        for (const auto& e : term.value("matchFields", json::array())) {
          if (e["key"] == "metadata.name" && e["operator"] == "NotIn") {
            for (const auto& v : e["values"]) banned.insert(v.get<std::string>());
          }
        }
      }
    }
    for (const auto& other : api_->list("", "v1", "pods", ns_, "shardguard.io/job=" + job_name)) {
      if (other["metadata"]["name"] != p["metadata"]["name"]) banned.insert(other["spec"].value("nodeName", ""));
    }
    for (const auto& n : nodes) {
      if (!banned.count(n)) return n;
    }
    return "";
  }

  void run_all(const std::string& job_name) {
    for (int i = 0; i < 4; ++i) kubelet(job_name, i, "node-" + std::to_string(i), "Running");
  }

  // Writes by the operator (everything but reads, watches and Events).
  std::vector<KubeApiServer::RequestRecord> operator_writes(const std::string& identity = "") const {
    std::vector<KubeApiServer::RequestRecord> out;
    for (const auto& r : api_->requests()) {
      if (r.user_agent.find("shardguard-operator") == std::string::npos) continue;
      if (!identity.empty() && r.user_agent.find(identity) == std::string::npos) continue;
      if (r.verb == "create" || r.verb == "update" || r.verb == "patch" || r.verb == "delete") out.push_back(r);
    }
    return out;
  }

  testsupport::RealApi real_;
  std::unique_ptr<testsupport::RestClient> jobs_;
  std::string ns_;
  std::unique_ptr<KubeApiServer> api_;  // core kinds here; shardguard.io routed to real_
  FakeShardMetrics shard_metrics_;
  FakeShardMetrics sidecar_metrics_;  // the last stage's sidecar
  fs::path dir_;
  std::string kubeconfig_;
  std::vector<std::unique_ptr<OperatorProcess>> ops_;
};

TEST_F(OperatorTest, JobLifecycleFromCreateToSucceededThenCleanup) {
  auto& op = start_operator({"--resync", "1"});
  // Three export principals: one run each of stages 0-1, 2 and 3 (issue 16 item 1).
  json life = job_object("life");
  life["spec"]["protection"]["export"] = {{"allowed", true},
                                          {"principals",
                                           {"spiffe://shardguard.local/ns/" + ns_ + "/sa/a",
                                            "spiffe://shardguard.local/ns/" + ns_ + "/sa/b",
                                            "spiffe://shardguard.local/ns/" + ns_ + "/sa/c"}}};
  create_job(life);
  ASSERT_TRUE(eventually([&] { return owned_objects("life") == 14 && status("life").value("phase", "") == "Pending"; },
                         30s))
      << status("life").dump(2) << op.log();
  const json j = *job("life");
  EXPECT_EQ(j["metadata"]["finalizers"], json::array({"shardguard.io/cleanup"}));
  EXPECT_EQ(status("life")["observedGeneration"], j["metadata"]["generation"]);
  // The job lives on the real server: its field managers (which the test server does
  // not keep) name the operator's finalizer and status writes, and the operator's
  // informer watched it through the route.
  std::set<std::string> managed;
  for (const auto& m : j["metadata"].value("managedFields", json::array()))
    managed.insert(m.value("manager", "") + (m.contains("subresource") ? "/" + m.value("subresource", "") : ""));
  EXPECT_TRUE(managed.count("shardguard-operator")) << j["metadata"].dump();
  EXPECT_TRUE(managed.count("shardguard-operator/status")) << j["metadata"].dump();
  bool watched = false;
  for (const auto& r : api_->requests())
    watched = watched || (r.verb == "watch" && r.resource == kJobs && r.code == 200 &&
                          r.user_agent.find("shardguard-operator") != std::string::npos);
  EXPECT_TRUE(watched);

  // Each shard's Secret: its own SVID (verified against the job CA), its own key.
  const json ca_secret = *api_->get("", "v1", "secrets", ns_, "life-ca");
  const std::string ca_pem = op::base64_decode(ca_secret["data"]["ca.crt"]);
  std::set<std::string> keys;
  for (int i = 0; i < 4; ++i) {
    const json s = *api_->get("", "v1", "secrets", ns_, pod_name("life", i));
    std::set<std::string> fields;
    for (const auto& [k, v] : s["data"].items()) fields.insert(k);
    EXPECT_EQ(fields, (std::set<std::string>{"tls.crt", "tls.key", "ca.crt", "checkpoint.key", "ledger.key"}));
    const SvidCheck check = verify_svid(op::base64_decode(s["data"]["tls.crt"]), ca_pem, std::chrono::system_clock::now());
    EXPECT_TRUE(check.ok) << check.message;
    EXPECT_EQ(check.spiffe_id, spiffe_id_for_shard("shardguard.local", ns_, "life", i));
    keys.insert(s["data"]["checkpoint.key"]);
    keys.insert(s["data"]["ledger.key"]);
    EXPECT_EQ(s["metadata"]["ownerReferences"][0]["uid"], j["metadata"]["uid"]);
  }
  EXPECT_EQ(keys.size(), 8u);  // four different checkpoint keys and four different ledger keys

  // Scheduler + kubelet: every pod runs on its own node; the last stage reports progress.
  shard_metrics_.set(42, 1, 0.5, 0.81);
  run_all("life");
  ASSERT_TRUE(eventually([&] {
    const json st = status("life");
    return st.value("phase", "") == "Running" && st.contains("progress") && st["progress"].value("step", 0) == 42;
  }, 30s)) << status("life").dump(2);
  EXPECT_TRUE(condition("life", "Ready"));
  EXPECT_TRUE(condition("life", "Running"));
  EXPECT_TRUE(condition("life", "ShardIsolation"));
  const json st = status("life");
  EXPECT_EQ(st["exposure"]["nodes"].size(), 4u);
  EXPECT_LE(st["exposure"]["maxNode"].get<double>(), 0.5);
  // The assignment as the real server stored it (its schema prunes unknown status fields).
  ASSERT_EQ(st["exposure"]["exportPrincipals"].size(), 3u) << st["exposure"].dump();
  EXPECT_EQ(st["exposure"]["exportPrincipals"][0]["shards"], json::array({0, 1}));
  EXPECT_EQ(st["exposure"]["exportPrincipals"][2]["principal"], "spiffe://shardguard.local/ns/" + ns_ + "/sa/c");
  EXPECT_LE(st["exposure"]["maxPrincipal"].get<double>(), 0.5);
  EXPECT_GT(st["exposure"]["maxPrincipal"].get<double>(), 0.34);  // shards 0-1 together
  EXPECT_EQ(st["progress"]["accuracy"], 0.81);
  // The eval loss as the real server stored it (its schema prunes unknown fields).
  ASSERT_TRUE(st["progress"].contains("evalLoss")) << st["progress"].dump();
  EXPECT_GT(st["progress"]["evalLoss"].get<double>(), 0.0);
  EXPECT_EQ(st["shards"][1]["node"], "node-1");
  EXPECT_EQ(st["shards"][1]["phase"], "Running");

  // The operator's metrics tell the same story.
  ASSERT_TRUE(eventually([&] { return op.sample("shardguard_jobs", "phase=\"Running\"") == 1.0; }, 10s))
      << op.metrics();
  const auto node2 = op.sample("shardguard_node_exposure_ratio", "node=\"node-2\"");
  ASSERT_TRUE(node2);
  EXPECT_NEAR(*node2, st["exposure"]["nodes"][2]["ratio"].get<double>(), 1e-4);
  EXPECT_NEAR(*op.sample("shardguard_job_max_exposure_ratio", "job=\"life\""), st["exposure"]["maxNode"].get<double>(),
              1e-4);
  EXPECT_GT(op.sample("controller_runtime_reconcile_total", "result=\"success\"").value_or(0) +
                op.sample("controller_runtime_reconcile_total", "result=\"requeue_after\"").value_or(0),
            0);
  EXPECT_TRUE(op.sample("workqueue_adds_total"));
  EXPECT_TRUE(op.sample("controller_runtime_reconcile_time_seconds_count"));

  // Finished.
  for (int i = 0; i < 4; ++i) kubelet("life", i, "node-" + std::to_string(i), "Succeeded");
  ASSERT_TRUE(eventually([&] { return status("life").value("phase", "") == "Succeeded"; }, 30s))
      << status("life").dump(2);
  EXPECT_TRUE(condition("life", "Succeeded"));
  EXPECT_TRUE(status("life").contains("completionTime"));
  // Events are recorded after the status they describe.
  ASSERT_TRUE(eventually([&] { return event_reasons("life").count("Succeeded") > 0; }, 10s));
  for (const char* r : {"Created", "Running"}) EXPECT_TRUE(event_reasons("life").count(r)) << r;

  // Settled: resyncs (every second) reconcile it again and write nothing. A status PUT
  // planned from a cache that has not yet seen the operator's own last status write is
  // refused (409, nothing written) and retried; under load that happens, so refused
  // attempts do not count.
  api_->clear_requests();
  const double before = op.sample("controller_runtime_reconcile_total", "result=\"success\"").value_or(0);
  ASSERT_TRUE(eventually([&] {
    return op.sample("controller_runtime_reconcile_total", "result=\"success\"").value_or(0) >= before + 3;
  }, 20s));
  std::vector<KubeApiServer::RequestRecord> written;
  for (const auto& w : operator_writes()) {
    if (w.code < 300) written.push_back(w);
  }
  EXPECT_TRUE(written.empty()) << written.front().method << " " << written.front().path << " -> " << written.front().code;

  // Deleted: every owned object goes, then the finalizer, then the job.
  delete_job("life");
  ASSERT_TRUE(eventually([&] { return !job("life"); }, 30s)) << (job("life") ? job("life")->dump(2) : "");
  EXPECT_EQ(owned_objects("life"), 0u);
  ASSERT_TRUE(eventually([&] { return !op.sample("shardguard_job_max_exposure_ratio", "job=\"life\""); }, 10s));
  const ExitStatus exit = op.stop();
  EXPECT_TRUE(exit.exited && exit.code == 0) << exit.str() << op.log();
}

// Issue 18 item 4: a package job. The operator reads the user's keys Secret (the
// manifest and one key per shard), copies key i into shard i's own Secret only, gives
// shard i's shardd only its package reference, and fails the job naming the shard
// whose shardd refused its package (exit 3), without recreating it.
// A manifest of 4 blocks, one per shard (72 parameters each).
model::PackageManifest four_shard_manifest() {
  model::PackageManifest m;
  m.split_id = "00112233445566778899aabbccddeeff";
  m.source_sha256 = std::string(64, 'a');
  m.job = "tuned";
  m.attribute = "blocks";
  for (int i = 0; i < 4; ++i) {
    model::PackageBlock b;
    b.index = i;
    b.source = "blocks." + std::to_string(i);
    b.type = "__torch__.Layer";
    b.in_shape = b.out_shape = {16, 8};
    b.in_dtype = b.out_dtype = "float32";
    b.parameters = 72;
    m.blocks.push_back(b);
    model::PackageShard s;
    s.index = i;
    s.first_block = i;
    s.end_block = i + 1;
    s.parameters = 72;
    s.share = 0.25;
    s.params = {{"block" + std::to_string(i) + ".weight", {8, 8}, 64}, {"block" + std::to_string(i) + ".bias", {8}, 8}};
    s.file = model::package_file_name(i);
    s.sha256 = std::string(64, 'b');
    s.bytes = 1000;
    m.shards.push_back(s);
  }
  return m;
}

TEST_F(OperatorTest, PackageJobGetsEachKeyOnlyInItsShardAndARefusedPackageFailsNamingTheShard) {
  const model::PackageManifest m = four_shard_manifest();
  const std::string manifest_text = model::to_json(m).dump();
  ASSERT_NO_THROW(model::parse_manifest(manifest_text, "test manifest"));
  auto key_of = [](int i) { return std::string(32, static_cast<char>('K' + i)); };
  json data = {{"manifest.json", op::base64_encode(manifest_text)}};
  for (int i = 0; i < 4; ++i) data[model::package_key_file_name(i)] = op::base64_encode(key_of(i));

  auto& op = start_operator();
  create_job(yaml_to_json("apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\n"
                          "metadata: {name: tuned, namespace: " + ns_ + "}\n"
                          "spec:\n"
                          "  model: {architecture: torchscript, context: 16,\n"
                          "          package: {path: /packages/tuned, keysSecret: tuned-keys}}\n"
                          "  dataset: {format: tokens, path: /data/text}\n"
                          "  sharding: {shards: 4}\n"
                          "  protection: {maxExposure: 0.5}\n"
                          "  template: {image: shardd:test}\n"
                          "  sidecar: {image: sidecar:test}\n"));
  // No keys Secret yet: the job waits, saying which Secret it needs.
  ASSERT_TRUE(eventually([&] { return condition_reason("tuned", "Ready") == "PackageUnavailable"; }, 30s))
      << status("tuned").dump(2) << op.log();
  EXPECT_FALSE(pod("tuned", 0).has_value());
  api_->create("", "v1", "secrets", ns_,
               {{"apiVersion", "v1"}, {"kind", "Secret"}, {"metadata", {{"name", "tuned-keys"}}}, {"data", data}});
  ASSERT_TRUE(eventually([&] { return all_pods_exist("tuned"); }, 30s)) << status("tuned").dump(2) << op.log();
  for (int i = 0; i < 4; ++i) {
    const auto secret = api_->get("", "v1", "secrets", ns_, pod_name("tuned", i));
    ASSERT_TRUE(secret.has_value());
    EXPECT_EQ((*secret)["data"]["package.key"], op::base64_encode(key_of(i)));
    const json p = *pod("tuned", i);
    for (int k = 0; k < 4; ++k) {
      if (k == i) continue;
      EXPECT_EQ(secret->dump().find(op::base64_encode(key_of(k))), std::string::npos) << i << " has key " << k;
      EXPECT_EQ(p.dump().find(op::base64_encode(key_of(k))), std::string::npos) << i << " has key " << k;
    }
    std::string shardd_args;
    for (const auto& c : p["spec"]["containers"]) {
      if (c["name"] == "shardd") shardd_args = c["args"].dump();
    }
    EXPECT_NE(shardd_args.find(R"("--package","/packages/tuned","--package-manifest","/etc/shardguard/package-key/)"
                               R"(manifest.json","--package-key-file")"),
              std::string::npos)
        << shardd_args;
    // The manifest shardd checks against comes from its own Secret (the operator's copy).
    EXPECT_EQ(model::parse_manifest(op::base64_decode((*secret)["data"]["manifest.json"].get<std::string>()), "s")
                  .split_id,
              m.split_id);
    EXPECT_EQ(p.dump().find("tuned-keys"), std::string::npos) << "pod " << i << " names the keys Secret";
  }
  EXPECT_TRUE(eventually([&] {
    const json st = status("tuned");
    return st.contains("shards") && st["shards"].size() == 4 && st["shards"][1].value("parameters", 0) == 72;
  }, 10s))
      << status("tuned").dump(2);  // the manifest's count

  run_all("tuned");
  ASSERT_TRUE(eventually([&] { return status("tuned").value("phase", "") == "Running"; }, 30s));
  {
    json p = *pod("tuned", 2);
    p["status"]["phase"] = "Failed";
    p["status"]["containerStatuses"] = json::array(
        {{{"name", "shardd"},
          {"ready", false},
          {"restartCount", 0},
          {"image", "shardd:test"},
          {"imageID", "docker-pullable://shardd@sha256:0"},
          {"state",
           {{"terminated",
             {{"exitCode", 3},
              {"reason", "Error"},
              {"message", "shardd: package refused: /packages/tuned/shard-2.sgpkg: refused: authentication "
                          "failed (this is not shard 2's key, or the file was modified)\n"}}}}}}});
    p["metadata"].erase("resourceVersion");
    api_->update("", "v1", "pods", ns_, p, /*status=*/true);
  }
  ASSERT_TRUE(eventually([&] { return status("tuned").value("phase", "") == "Failed"; }, 30s))
      << status("tuned").dump(2);
  EXPECT_EQ(condition_reason("tuned", "Failed"), "PackageRefused");
  std::string message;
  const json final_status = status("tuned");
  for (const auto& c : final_status["conditions"]) {
    if (c["type"] == "Failed") message = c.value("message", "");
  }
  EXPECT_NE(message.find("shard 2 (pod tuned-shard-2 on node-2) refused its package: /packages/tuned/shard-2.sgpkg"),
            std::string::npos)
      << message << "\n" << status("tuned").dump(2);
  EXPECT_TRUE(has_event("tuned", "PackageRefused"));
  ASSERT_TRUE(eventually([&] { return api_->list("", "v1", "pods", ns_, "shardguard.io/job=tuned").empty(); }, 30s));
}

// spec.model.package.url: each shard's shardd gets the URL prefix (it fetches only
// shard-<i>.sgpkg), and its own Secret's key and manifest; no package volume. A shardd
// that could not fetch its package (exit 4, kExitPackageUnavailable) is not a refusal:
// the pod is recreated like any failed pod.
TEST_F(OperatorTest, UrlPackageJobFetchesOnlyItsOwnShardWithItsOwnSecret) {
  const model::PackageManifest m = four_shard_manifest();
  auto key_of = [](int i) { return std::string(32, static_cast<char>('a' + i)); };
  json data = {{"manifest.json", op::base64_encode(model::to_json(m).dump())}};
  for (int i = 0; i < 4; ++i) data[model::package_key_file_name(i)] = op::base64_encode(key_of(i));
  api_->create("", "v1", "secrets", ns_,
               {{"apiVersion", "v1"}, {"kind", "Secret"}, {"metadata", {{"name", "web-keys"}}}, {"data", data}});
  auto& op = start_operator();
  create_job(yaml_to_json("apiVersion: shardguard.io/v1alpha1\nkind: ShardedTrainingJob\n"
                          "metadata: {name: web, namespace: " + ns_ + "}\n"
                          "spec:\n"
                          "  model: {architecture: torchscript, context: 16,\n"
                          "          package: {url: \"https://models.example.com/tuned/\", keysSecret: web-keys}}\n"
                          "  dataset: {format: tokens, path: /data/text}\n"
                          "  sharding: {shards: 4}\n"
                          "  protection: {maxExposure: 0.5}\n"
                          "  runPolicy: {backoffLimit: 2}\n"
                          "  template: {image: shardd:test}\n"
                          "  sidecar: {image: sidecar:test}\n"));
  ASSERT_TRUE(eventually([&] { return all_pods_exist("web"); }, 30s)) << status("web").dump(2) << op.log();
  for (int i = 0; i < 4; ++i) {
    const auto secret = api_->get("", "v1", "secrets", ns_, pod_name("web", i));
    ASSERT_TRUE(secret.has_value());
    EXPECT_EQ((*secret)["data"]["package.key"], op::base64_encode(key_of(i)));
    EXPECT_TRUE((*secret)["data"].contains("manifest.json"));
    const json p = *pod("web", i);
    for (int k = 0; k < 4; ++k) {
      if (k == i) continue;
      EXPECT_EQ(secret->dump().find(op::base64_encode(key_of(k))), std::string::npos) << i << " has key " << k;
      EXPECT_EQ(p.dump().find(op::base64_encode(key_of(k))), std::string::npos) << i << " has key " << k;
    }
    json shardd;
    for (const auto& c : p["spec"]["containers"]) {
      if (c["name"] == "shardd") shardd = c;
    }
    const std::string args = shardd["args"].dump();
    EXPECT_NE(args.find(R"("--package","https://models.example.com/tuned/","--package-manifest",)"
                        R"("/etc/shardguard/package-key/manifest.json","--package-key-file",)"
                        R"("/etc/shardguard/package-key/package.key")"),
              std::string::npos)
        << args;
    EXPECT_EQ(args.find("shard-"), std::string::npos) << "shardd derives its own file name: " << args;
    // Its own Secret, the two items; no package volume, no host path.
    for (const auto& v : p["spec"]["volumes"]) {
      EXPECT_NE(v["name"], "package") << v.dump();
      EXPECT_FALSE(v.contains("hostPath")) << v.dump();
      if (v.contains("secret")) {
        EXPECT_EQ(v["secret"]["secretName"].get<std::string>().rfind("web-shard-" + std::to_string(i), 0), 0u)
            << v.dump();
      }
    }
    EXPECT_EQ(p.dump().find("web-keys"), std::string::npos) << "pod " << i << " names the keys Secret";
  }
  run_all("web");
  ASSERT_TRUE(eventually([&] { return status("web").value("phase", "") == "Running"; }, 30s));
  const std::string old_uid = (*pod("web", 1))["metadata"]["uid"];
  {
    json p = *pod("web", 1);
    p["status"]["phase"] = "Failed";
    p["status"]["containerStatuses"] = json::array(
        {{{"name", "shardd"},
          {"ready", false},
          {"restartCount", 0},
          {"image", "shardd:test"},
          {"imageID", "docker-pullable://shardd@sha256:0"},
          {"state",
           {{"terminated",
             {{"exitCode", model::kExitPackageUnavailable},
              {"reason", "Error"},
              {"message", "shardd: package of shard 1 unavailable: GET https://models.example.com/tuned/shard-1.sgpkg: "
                          "HTTP 404 (not found) (1 attempt)\n"}}}}}}});
    p["metadata"].erase("resourceVersion");
    api_->update("", "v1", "pods", ns_, p, /*status=*/true);
  }
  ASSERT_TRUE(eventually([&] {
    auto p = pod("web", 1);
    return p && (*p)["metadata"]["uid"] != old_uid;
  }, 30s)) << status("web").dump(2);
  EXPECT_NE(status("web").value("phase", ""), "Failed");
  EXPECT_NE(condition_reason("web", "Failed"), "PackageRefused");
  // The failure's event names the shard and why its package was unavailable.
  EXPECT_TRUE(eventually([&] {
    for (const auto& e : api_->list("", "v1", "events", ns_)) {
      if (e["involvedObject"].value("name", "") == "web" && e.value("reason", "") == "ShardPodFailed" &&
          e.value("message", "").find("shard 1 (pod web-shard-1") != std::string::npos &&
          e.value("message", "").find("exited 4 (Error): package of shard 1 unavailable: GET "
                                      "https://models.example.com/tuned/shard-1.sgpkg: HTTP 404") != std::string::npos) {
        return true;
      }
    }
    return false;
  }, 10s));
  delete_job("web");
  ASSERT_TRUE(eventually([&] { return !job("web"); }, 30s));
}

TEST_F(OperatorTest, FailedShardIsRecreatedAwayFromUnsafeNodesUntilTheBackoffLimit) {
  auto& op = start_operator();
  create_job(job_object("flaky", "  runPolicy: {backoffLimit: 1}\n"));
  ASSERT_TRUE(eventually([&] { return all_pods_exist("flaky"); }, 30s)) << op.log();
  run_all("flaky");
  ASSERT_TRUE(eventually([&] { return status("flaky").value("phase", "") == "Running"; }, 30s));

  const std::string old_uid = (*pod("flaky", 2))["metadata"]["uid"];
  kubelet("flaky", 2, "node-2", "Failed");
  ASSERT_TRUE(eventually([&] {
    auto p = pod("flaky", 2);
    return p && (*p)["metadata"]["uid"] != old_uid;
  }, 30s)) << status("flaky").dump(2);
  ASSERT_TRUE(eventually([&] { return status("flaky")["shards"][2].value("restarts", 0) == 1; }, 10s));
  EXPECT_EQ(status("flaky")["failedPods"], 1);
  // node-0 held stage 0: stage 2 there would sandwich stage 1 (0.02 + 0.33 + 0.33 > 0.5).
  const std::string node = schedule("flaky", 2, {"node-0", "node-1", "node-2", "node-3", "node-4"});
  EXPECT_NE(node, "node-0");
  EXPECT_NE(node, "");
  kubelet("flaky", 2, node, "Running");
  ASSERT_TRUE(eventually([&] { return status("flaky").value("phase", "") == "Running"; }, 30s));
  EXPECT_TRUE(condition("flaky", "ShardIsolation"));
  EXPECT_LE(status("flaky")["exposure"]["maxNode"].get<double>(), 0.5);
  EXPECT_TRUE(has_event("flaky", "ShardPodFailed"));
  EXPECT_TRUE(has_event("flaky", "ShardPodRecreated"));

  // A second failure exceeds backoffLimit 1: the job fails and nothing is recreated.
  kubelet("flaky", 1, "node-1", "Failed");
  ASSERT_TRUE(eventually([&] { return status("flaky").value("phase", "") == "Failed"; }, 30s))
      << status("flaky").dump(2);
  EXPECT_EQ(condition_reason("flaky", "Failed"), "BackoffLimitExceeded");
  ASSERT_TRUE(eventually([&] { return api_->list("", "v1", "pods", ns_, "shardguard.io/job=flaky").empty(); }, 30s));
  EXPECT_TRUE(has_event("flaky", "BackoffLimitExceeded"));
  EXPECT_EQ(status("flaky")["failedPods"], 2);
}

// Issue 20 item 3: 4 shards × 2 replicas. The test's scheduler honours each pod's
// required pod anti-affinity (its labelSelector against the pods already on a node) and
// node affinity, as the kube-scheduler does with topologyKey kubernetes.io/hostname.
// The replicas of a stage share a node; a node that hosts one stage is refused to every
// other; a failed replica restarts every replica together, counted once, and the new
// pods keep off the nodes where they would sandwich a stage.
class ReplicaPlacement {
 public:
  ReplicaPlacement(KubeApiServer& api, std::string ns) : api_(api), ns_(std::move(ns)) {}

  static bool selected(const json& selector, const json& labels) {
    const json match_labels = selector.value("matchLabels", json::object());
    for (const auto& [k, v] : match_labels.items()) {
      if (!labels.contains(k) || labels[k] != v) return false;
    }
    for (const auto& e : selector.value("matchExpressions", json::array())) {
      const std::string key = e["key"];
      const bool has = labels.contains(key);
      const auto& values = e.value("values", json::array());
      const bool in = has && std::find(values.begin(), values.end(), labels[key]) != values.end();
      const std::string op = e["operator"];
      if (op == "In" && !in) return false;
      if (op == "NotIn" && in) return false;
      if (op == "Exists" && !has) return false;
      if (op == "DoesNotExist" && has) return false;
    }
    return true;
  }

  // The first of `nodes` the pod may go to ("" when none), by its required affinities.
  std::string schedule(const std::string& pod_name, const std::vector<std::string>& nodes) const {
    const json p = *api_.get("", "v1", "pods", ns_, pod_name);
    const json aff = p["spec"].value("affinity", json::object());
    std::set<std::string> banned;
    if (aff.contains("nodeAffinity")) {
      for (const auto& term :
           aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]) {
        for (const auto& e : term.value("matchFields", json::array())) {
          if (e["key"] == "metadata.name" && e["operator"] == "NotIn") {
            for (const auto& v : e["values"]) banned.insert(v.get<std::string>());
          }
        }
      }
    }
    const json terms = aff.contains("podAntiAffinity")
                           ? aff["podAntiAffinity"].value("requiredDuringSchedulingIgnoredDuringExecution", json::array())
                           : json::array();
    for (const auto& other : api_.list("", "v1", "pods", ns_)) {
      const std::string node = other["spec"].value("nodeName", "");
      if (node.empty() || other["metadata"]["name"] == pod_name) continue;
      for (const auto& t : terms) {
        if (selected(t["labelSelector"], other["metadata"].value("labels", json::object()))) banned.insert(node);
      }
    }
    for (const auto& n : nodes) {
      if (!banned.count(n)) return n;
    }
    return "";
  }

  // The kubelet: bound to `node`, in `phase`; every pod's IP is 127.0.0.1 (the fake
  // /metrics answer there).
  void kubelet(const std::string& pod_name, const std::string& node, const std::string& phase) const {
    json p = *api_.get("", "v1", "pods", ns_, pod_name);
    if (p["spec"].value("nodeName", "") != node) {
      p["spec"]["nodeName"] = node;
      p["metadata"].erase("resourceVersion");
      p = api_.update("", "v1", "pods", ns_, p);
    }
    p["status"] = {{"phase", phase},
                   {"podIP", "127.0.0.1"},
                   {"conditions", json::array({{{"type", "Ready"}, {"status", phase == "Running" ? "True" : "False"}}})}};
    if (phase == "Failed") {
      p["status"]["reason"] = "Error";
      p["status"]["containerStatuses"] = json::array(
          {{{"name", "shardd"},
            {"ready", false},
            {"restartCount", 0},
            {"image", "shardd:test"},
            {"imageID", "docker-pullable://shardd@sha256:0"},
            {"state", {{"terminated", {{"exitCode", 1}, {"reason", "Error"}}}}}}});
    }
    p["metadata"].erase("resourceVersion");
    api_.update("", "v1", "pods", ns_, p, /*status=*/true);
  }

 private:
  KubeApiServer& api_;
  std::string ns_;
};

std::string replica_pod(const std::string& job, int i, int r) {
  return job + "-shard-" + std::to_string(i) + "-r" + std::to_string(r);
}

TEST_F(OperatorTest, ReplicasOfAStageShareANodeTwoStagesNeverDoAndRestartTogether) {
  auto& op = start_operator();
  json j = job_object("rep");
  j["spec"]["sharding"]["replicas"] = 2;
  create_job(j);
  auto all_replica_pods = [&] {
    for (int i = 0; i < 4; ++i) {
      for (int r = 0; r < 2; ++r) {
        if (!api_->get("", "v1", "pods", ns_, replica_pod("rep", i, r))) return false;
      }
    }
    return true;
  };
  ASSERT_TRUE(eventually(all_replica_pods, 30s)) << op.log() << status("rep").dump(2);
  EXPECT_EQ(api_->list("", "v1", "pods", ns_, "shardguard.io/job=rep").size(), 8u);
  // Each replica its own identity: the leaf in its own Secret names it.
  for (int r = 0; r < 2; ++r) {
    const auto secret = api_->get("", "v1", "secrets", ns_, replica_pod("rep", 1, r));
    ASSERT_TRUE(secret);
    const std::string cert = op::base64_decode((*secret)["data"]["tls.crt"].get<std::string>());
    const std::string ca = op::base64_decode((*api_->get("", "v1", "secrets", ns_, "rep-ca"))["data"]["ca.crt"].get<std::string>());
    const SvidCheck check = verify_svid(cert, ca, std::chrono::system_clock::now());
    ASSERT_TRUE(check.ok) << check.message;
    EXPECT_EQ(check.spiffe_id,
              "spiffe://shardguard.local/ns/" + ns_ + "/job/rep/shard/1/replica/" + std::to_string(r));
  }

  ReplicaPlacement place(*api_, ns_);
  const std::vector<std::string> nodes = {"node-0", "node-1", "node-2", "node-3", "node-4", "node-5"};
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) {
      const std::string node = place.schedule(replica_pod("rep", i, r), nodes);
      // The first free node for stage i is node-i; its second replica joins the first.
      EXPECT_EQ(node, "node-" + std::to_string(i)) << replica_pod("rep", i, r);
      place.kubelet(replica_pod("rep", i, r), node, "Running");
    }
  }
  // A placement that would put two stages on one node is refused: stage 1 where stage
  // 0 runs, stage 3 where stage 2 runs.
  EXPECT_EQ(place.schedule(replica_pod("rep", 1, 1), {"node-0"}), "");
  EXPECT_EQ(place.schedule(replica_pod("rep", 3, 0), {"node-2"}), "");

  ASSERT_TRUE(eventually([&] { return status("rep").value("phase", "") == "Running"; }, 30s)) << status("rep").dump(2);
  json st = status("rep");
  ASSERT_EQ(st["shards"].size(), 4u) << st.dump(2);
  for (int i = 0; i < 4; ++i) {
    ASSERT_EQ(st["shards"][i]["replicas"].size(), 2u) << st.dump(2);
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(st["shards"][i]["replicas"][r]["pod"], replica_pod("rep", i, r));
      EXPECT_EQ(st["shards"][i]["replicas"][r]["node"], "node-" + std::to_string(i));
      EXPECT_EQ(st["shards"][i]["replicas"][r]["phase"], "Running");
    }
  }
  EXPECT_EQ(st["exposure"]["nodes"].size(), 4u);
  EXPECT_LE(st["exposure"]["maxNode"].get<double>(), 0.5);
  EXPECT_TRUE(condition("rep", "ShardIsolation"));

  // Replica 1 of stage 2 fails: every replica restarts (new pods, new uids), the failure
  // counts once, for it.
  std::map<std::string, std::string> old_uids;
  for (const auto& p : api_->list("", "v1", "pods", ns_, "shardguard.io/job=rep")) {
    old_uids[p["metadata"]["name"]] = p["metadata"]["uid"];
  }
  place.kubelet(replica_pod("rep", 2, 1), "node-2", "Failed");
  ASSERT_TRUE(eventually([&] {
    const auto pods = api_->list("", "v1", "pods", ns_, "shardguard.io/job=rep");
    if (pods.size() != 8) return false;
    for (const auto& p : pods) {
      if (old_uids[p["metadata"]["name"]] == p["metadata"]["uid"]) return false;
    }
    return true;
  }, 30s)) << status("rep").dump(2) << op.log();
  ASSERT_TRUE(eventually([&] { return status("rep").value("failedPods", 0) == 1; }, 10s)) << status("rep").dump(2);
  st = status("rep");
  EXPECT_EQ(st["shards"][2]["replicas"][1]["restarts"], 1) << st.dump(2);
  EXPECT_EQ(st["shards"][2]["replicas"][0]["restarts"], 0);
  EXPECT_EQ(st["shards"][0]["replicas"][0]["restarts"], 0);
  EXPECT_TRUE(has_event("rep", "ShardPodFailed"));
  EXPECT_TRUE(has_event("rep", "ReplicasRestarted"));
  // The new pods of stage 2 keep off node-0, which held stage 0 (stage 2 there would
  // sandwich stage 1: 0.02 + 0.33 + 0.33 > 0.5), even while no pod runs there.
  for (int r = 0; r < 2; ++r) {
    const json p = *api_->get("", "v1", "pods", ns_, replica_pod("rep", 2, r));
    const json avoid = p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                        ["nodeSelectorTerms"][0]["matchFields"][0]["values"];
    EXPECT_NE(std::find(avoid.begin(), avoid.end(), "node-0"), avoid.end()) << avoid.dump();
    EXPECT_EQ(place.schedule(replica_pod("rep", 2, r), {"node-0", "node-2"}), "node-2");
  }
  // Stage 0 goes back to node-0; then stage 1 cannot join it there.
  for (int r = 0; r < 2; ++r) place.kubelet(replica_pod("rep", 0, r), "node-0", "Running");
  EXPECT_EQ(place.schedule(replica_pod("rep", 1, 0), {"node-0"}), "");
  EXPECT_EQ(place.schedule(replica_pod("rep", 0, 1), {"node-0"}), "node-0");
}

// Issue 16 item 2: the exposure ledger sequence a shard's sidecar publishes is kept
// in status (only ever raised; the real API server refuses a lower one too) and
// becomes --ledger-min-sequence of the sidecar of that shard's next pod.
TEST_F(OperatorTest, LedgerSequenceIsRecordedNeverLoweredAndGivenToTheRecreatedPod) {
  auto& op = start_operator({"--resync", "1"});
  create_job(job_object("led"));
  ASSERT_TRUE(eventually([&] { return all_pods_exist("led"); }, 30s)) << op.log();
  auto sidecar_flag = [&](const json& pod) {
    for (const auto& c : pod["spec"]["containers"]) {
      if (c["name"] != "sidecar") continue;
      const auto args = c["args"].get<std::vector<std::string>>();
      const auto it = std::find(args.begin(), args.end(), "--ledger-min-sequence");
      return it == args.end() || it + 1 == args.end() ? std::string() : *(it + 1);
    }
    return std::string("no sidecar");
  };
  // -1 while status has no entry for the shard, 0 while it records no sequence.
  auto recorded = [&](size_t i) -> int64_t {
    const json st = status("led");
    const json shards = st.value("shards", json::array());
    return i < shards.size() ? shards[i].value("ledgerSequence", int64_t{0}) : -1;
  };
  EXPECT_EQ(sidecar_flag(*pod("led", 3)), "");
  sidecar_metrics_.set_body("# TYPE shardguard_ledger_sequence gauge\nshardguard_ledger_sequence 7\n");
  run_all("led");
  ASSERT_TRUE(eventually([&] { return recorded(3) == 7; }, 30s))
      << status("led").dump(2) << op.log();
  EXPECT_EQ(recorded(0), 0);  // its sidecar did not answer

  // A sidecar that loaded an older copy publishes less: the record stays.
  sidecar_metrics_.set_body("shardguard_ledger_sequence 2\n");
  const double before = op.sample("controller_runtime_reconcile_total", "result=\"success\"").value_or(0) +
                        op.sample("controller_runtime_reconcile_total", "result=\"requeue_after\"").value_or(0);
  ASSERT_TRUE(eventually([&] {
    return op.sample("controller_runtime_reconcile_total", "result=\"success\"").value_or(0) +
               op.sample("controller_runtime_reconcile_total", "result=\"requeue_after\"").value_or(0) >=
           before + 3;
  }, 20s));
  EXPECT_EQ(recorded(3), 7);
  // So does the API server (a CEL transition rule in the CRD), for any writer.
  json j = *job("led");
  j["status"]["shards"][3]["ledgerSequence"] = 2;
  const auto lowered = jobs_->put(jobs_path("led", "status"), j);
  EXPECT_EQ(lowered.code, 422) << lowered.raw;
  EXPECT_NE(lowered.raw.find("ledgerSequence never decreases"), std::string::npos) << lowered.raw;

  // Shard 3's pod fails; its replacement's sidecar refuses a ledger older than 7.
  const std::string old_uid = (*pod("led", 3))["metadata"]["uid"];
  kubelet("led", 3, "node-3", "Failed");
  ASSERT_TRUE(eventually([&] {
    auto p = pod("led", 3);
    return p && (*p)["metadata"]["uid"] != old_uid;
  }, 30s)) << status("led").dump(2);
  EXPECT_EQ(sidecar_flag(*pod("led", 3)), "7");
  EXPECT_EQ(sidecar_flag(*pod("led", 2)), "");  // the others keep what they were created with
}

// A shard Secret written by an operator from before the exposure ledger has no
// ledger.key: the operator adds one and keeps everything else (checkpoint key, leaf).
TEST_F(OperatorTest, SecretWithoutALedgerKeyGetsOneAndKeepsItsCheckpointKey) {
  auto& op = start_operator();
  create_job(job_object("old"));
  ASSERT_TRUE(eventually([&] { return all_pods_exist("old"); }, 30s)) << op.log();
  json s = *api_->get("", "v1", "secrets", ns_, "old-shard-1");
  const json before = s["data"];
  s["data"].erase("ledger.key");
  api_->update("", "v1", "secrets", ns_, s);
  json after;
  ASSERT_TRUE(eventually([&] {
    after = (*api_->get("", "v1", "secrets", ns_, "old-shard-1"))["data"];
    return after.contains("ledger.key");
  }, 30s)) << op.log();
  EXPECT_EQ(op::base64_decode(after["ledger.key"]).size(), 32u);
  EXPECT_NE(after["ledger.key"], before["ledger.key"]) << "a new key, not a remembered one";
  for (const char* kept : {"checkpoint.key", "tls.crt", "tls.key", "ca.crt"}) EXPECT_EQ(after[kept], before[kept]) << kept;
}

TEST_F(OperatorTest, SuspendDeletesPodsKeepsKeysAndResumeRecreatesThem) {
  auto& op = start_operator();
  create_job(job_object("nap"));
  ASSERT_TRUE(eventually([&] { return all_pods_exist("nap"); }, 30s)) << op.log();
  run_all("nap");
  ASSERT_TRUE(eventually([&] { return status("nap").value("phase", "") == "Running"; }, 30s));
  const json key_before = (*api_->get("", "v1", "secrets", ns_, "nap-shard-1"))["data"]["checkpoint.key"];
  const json ledger_key_before = (*api_->get("", "v1", "secrets", ns_, "nap-shard-1"))["data"]["ledger.key"];

  edit_job("nap", [](json& j) { j["spec"]["runPolicy"]["suspend"] = true; });
  ASSERT_TRUE(eventually([&] {
    return status("nap").value("phase", "") == "Suspended" &&
           api_->list("", "v1", "pods", ns_, "shardguard.io/job=nap").empty();
  }, 30s)) << status("nap").dump(2);
  EXPECT_TRUE(condition("nap", "Suspended"));
  EXPECT_EQ(owned_objects("nap"), 10u);  // PKI, policies and the Service stay

  edit_job("nap", [](json& j) { j["spec"]["runPolicy"]["suspend"] = false; });
  ASSERT_TRUE(eventually([&] { return all_pods_exist("nap"); }, 30s));
  EXPECT_EQ((*api_->get("", "v1", "secrets", ns_, "nap-shard-1"))["data"]["checkpoint.key"], key_before);
  EXPECT_EQ((*api_->get("", "v1", "secrets", ns_, "nap-shard-1"))["data"]["ledger.key"], ledger_key_before);
  ASSERT_TRUE(eventually([&] { return condition("nap", "Suspended", "False"); }, 10s));
  EXPECT_TRUE(has_event("nap", "Suspended"));
  EXPECT_TRUE(has_event("nap", "Resumed"));
}

TEST_F(OperatorTest, StageAboveMaxExposureIsRefused) {
  auto& op = start_operator();
  create_job(job_object("greedy", "", 0.1));
  ASSERT_TRUE(eventually([&] { return status("greedy").value("phase", "") == "Failed"; }, 30s)) << op.log();
  EXPECT_TRUE(condition("greedy", "ShardIsolation", "False"));
  EXPECT_EQ(condition_reason("greedy", "ShardIsolation"), "ExposureRefused");
  EXPECT_TRUE(has_event("greedy", "ExposureRefused"));
  EXPECT_TRUE(api_->list("", "v1", "pods", ns_, "shardguard.io/job=greedy").empty());
}

// Issue 19 item 3: the trusted stage 0 is pinned to the owner's nodes; while it runs
// there the real server stores the node as trusted; a recreated stage-0 pod that no
// node can take refuses the job with a condition that says why.
TEST_F(OperatorTest, TrustedStageRunsOnlyOnTheOwnersNodesAndIsRefusedWhenNoneCanTakeIt) {
  auto& op = start_operator({"--resync", "1"});
  json trusted = job_object("trusting");
  trusted["spec"]["protection"]["trustedStages"] = {0};
  trusted["spec"]["protection"]["trustedNodeSelector"] = {{"example.com/owner", "data-team"}};
  create_job(trusted);
  ASSERT_TRUE(eventually([&] { return all_pods_exist("trusting"); }, 30s)) << op.log();
  EXPECT_EQ((*pod("trusting", 0))["spec"]["nodeSelector"]["example.com/owner"], "data-team");
  EXPECT_EQ((*pod("trusting", 0))["metadata"]["labels"]["shardguard.io/trusted"], "true");
  for (int i = 1; i < 4; ++i) {
    EXPECT_FALSE((*pod("trusting", i))["spec"].value("nodeSelector", json::object()).contains("example.com/owner"));
  }
  run_all("trusting");
  ASSERT_TRUE(eventually(
      [&] {
        const json st = status("trusting");
        return st.value("phase", "") == "Running" && st["exposure"]["nodes"].size() == 4u;
      },
      30s))
      << status("trusting").dump(2);
  const json nodes = status("trusting")["exposure"]["nodes"];
  EXPECT_EQ(nodes[0]["node"], "node-0");
  EXPECT_EQ(nodes[0].value("trusted", false), true) << nodes.dump();
  EXPECT_FALSE(nodes[1].contains("trusted")) << nodes.dump();

  // Stage 0's pod fails; its replacement finds no node of the owner's.
  const std::string old_uid = (*pod("trusting", 0))["metadata"]["uid"];
  kubelet("trusting", 0, "node-0", "Failed");
  ASSERT_TRUE(eventually([&] {
    auto p = pod("trusting", 0);
    return p && (*p)["metadata"]["uid"] != old_uid;
  }, 30s)) << status("trusting").dump(2);
  json p0 = *pod("trusting", 0);
  p0["status"] = {{"phase", "Pending"},
                  {"conditions", json::array({{{"type", "PodScheduled"}, {"status", "False"},
                                               {"reason", "Unschedulable"},
                                               {"message", "0/5 nodes are available: 5 node(s) didn't match "
                                                           "Pod's node affinity/selector."}}})}};
  p0["metadata"].erase("resourceVersion");
  api_->update("", "v1", "pods", ns_, p0, /*status=*/true);
  ASSERT_TRUE(eventually([&] { return status("trusting").value("phase", "") == "Failed"; }, 30s))
      << status("trusting").dump(2) << op.log();
  EXPECT_EQ(condition_reason("trusting", "Failed"), "TrustedStageUnschedulable");
  EXPECT_TRUE(has_event("trusting", "TrustedStageUnschedulable"));
  ASSERT_TRUE(eventually([&] { return api_->list("", "v1", "pods", ns_, "shardguard.io/job=trusting").empty(); },
                         30s));
}

// A spec the API server accepts (every field within the CRD's rules) that the
// operator still cannot run: 64 shards cannot be cut from a one-layer MLP.
TEST_F(OperatorTest, SpecThatCannotBeShardedFailsAsInvalidSpec) {
  auto& op = start_operator();
  json j = job_object("tiny");
  j["spec"]["model"] = {{"architecture", "mlp"}, {"depth", 1}};
  j["spec"]["sharding"]["shards"] = 64;
  create_job(j);  // accepted by the real server
  ASSERT_TRUE(eventually([&] { return status("tiny").value("phase", "") == "Failed"; }, 30s))
      << status("tiny").dump(2) << op.log();
  EXPECT_TRUE(condition("tiny", "Failed"));
  EXPECT_EQ(condition_reason("tiny", "Failed"), "InvalidSpec");
  std::string message;
  for (const auto& c : status("tiny").value("conditions", json::array()))
    if (c.value("type", "") == "Failed") message = c.value("message", "");
  EXPECT_NE(message.find("spec.sharding.shards"), std::string::npos) << message;
  EXPECT_TRUE(has_event("tiny", "InvalidSpec"));
  EXPECT_EQ(owned_objects("tiny"), 0u) << "nothing is created for a job that cannot run";
  EXPECT_EQ(status("tiny")["observedGeneration"], (*job("tiny"))["metadata"]["generation"]);
}

TEST_F(OperatorTest, ServerErrorsAndDroppedWatchesLoseNothing) {
  auto& op = start_operator();
  // Every third write fails for a while, and the first creates all fail.
  api_->fail_next(6, 500, "POST");
  create_job(job_object("bumpy"));
  ASSERT_TRUE(eventually([&] { return owned_objects("bumpy") == 14; }, 60s)) << op.log();
  // Watches dropped, history compacted (the next watch from an old resourceVersion
  // gets 410 and the informers relist), and the kubelet's updates land meanwhile.
  for (int i = 0; i < 4; ++i) {
    api_->drop_watches();
    api_->compact();
    kubelet("bumpy", i, "node-" + std::to_string(i), "Running");
  }
  ASSERT_TRUE(eventually([&] { return status("bumpy").value("phase", "") == "Running"; }, 60s))
      << status("bumpy").dump(2) << op.log();
  api_->set_latency(50ms);
  for (int i = 0; i < 4; ++i) kubelet("bumpy", i, "node-" + std::to_string(i), "Succeeded");
  api_->drop_watches();
  ASSERT_TRUE(eventually([&] { return status("bumpy").value("phase", "") == "Succeeded"; }, 60s))
      << status("bumpy").dump(2);
  EXPECT_GT(op.sample("controller_runtime_reconcile_errors_total").value_or(0), 0);
}

TEST_F(OperatorTest, LeaderElectionOneReconcilesTheOtherTakesOverWhenItDies) {
  const std::vector<std::string> le = {"--leader-elect", "--leader-election-namespace", ns_, "--lease-duration", "3",
                                       "--renew-deadline", "2", "--retry-period", "0.5"};
  auto& a = start_operator(le);
  auto& b = start_operator(le);
  std::string holder;
  ASSERT_TRUE(eventually([&] {
    auto lease = api_->get("coordination.k8s.io", "v1", "leases", ns_, "shardguard-operator");
    if (!lease) return false;
    holder = (*lease)["spec"].value("holderIdentity", "");
    return holder == a.identity() || holder == b.identity();
  }, 30s)) << a.log() << b.log();
  OperatorProcess& leader = holder == a.identity() ? a : b;
  OperatorProcess& standby = holder == a.identity() ? b : a;

  create_job(job_object("one"));
  ASSERT_TRUE(eventually([&] { return owned_objects("one") == 14; }, 30s));
  EXPECT_FALSE(operator_writes(leader.identity()).empty());
  for (const auto& w : operator_writes(standby.identity())) {
    EXPECT_EQ(w.resource, "leases") << "the standby wrote " << w.method << " " << w.path;
  }
  EXPECT_EQ(leader.sample("leader_election_master_status"), 1.0);
  EXPECT_EQ(standby.sample("leader_election_master_status"), 0.0);

  // The leader dies without releasing the lease: the standby takes over once the
  // lease has not been renewed for its duration (3 s), and reconciles new work.
  leader.kill9();
  const auto killed = std::chrono::steady_clock::now();
  auto seconds_since_kill = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  };
  create_job(job_object("two"));
  ASSERT_TRUE(eventually([&] {
    auto lease = api_->get("coordination.k8s.io", "v1", "leases", ns_, "shardguard-operator");
    return lease && (*lease)["spec"].value("holderIdentity", "") == standby.identity();
  }, 30s)) << standby.log();
  const double takeover = seconds_since_kill();
  // The lease was renewed at most one retry period before the kill and is taken over
  // once it has stood still for its duration, checked every retry period.
  EXPECT_LT(takeover, 3.0 + 2 * 0.5 + 0.5) << "lease 3 s, retry 0.5 s";
  ASSERT_TRUE(eventually([&] { return owned_objects("two") == 14; }, 30s)) << standby.log();
  const double reconciled = seconds_since_kill();
  std::printf("after the leader's SIGKILL: lease taken over in %.2f s (lease 3 s), new job reconciled in %.2f s\n",
              takeover, reconciled);
}

// Everything the operator wrote in a full lifecycle validates against the published
// Kubernetes schemas (kubernetes-models) and the CRD.
TEST_F(OperatorTest, EveryObjectWrittenValidatesAgainstTheKubernetesSchemas) {
  const std::string node_modules = std::string(SHARDGUARD_SOURCE_DIR) + "/tools/node_modules";
  if (!fs::exists(node_modules)) {
    FAIL() << node_modules << " is missing: run `make deps` (installs kubernetes-models with npm)";
  }
  auto& op = start_operator();
  create_job(job_object("valid", "  runPolicy: {backoffLimit: 2, activeDeadlineSeconds: 3600}\n"));
  ASSERT_TRUE(eventually([&] { return all_pods_exist("valid"); }, 30s)) << op.log();
  shard_metrics_.set(7, 0, 1.25, 0.5);
  run_all("valid");
  kubelet("valid", 0, "node-0", "Failed");
  ASSERT_TRUE(eventually([&] {
    return status("valid").value("phase", "") == "Pending" && status("valid").value("failedPods", 0) == 1 &&
           all_pods_exist("valid");
  }, 30s)) << status("valid").dump(2);
  // A job with replicas: per-replica pods (the POD_IP env, the store port, the per-stage
  // anti-affinity) and a status with replicas[].
  json replicated = job_object("valid-rep");
  replicated["spec"]["sharding"]["replicas"] = 2;
  create_job(replicated);
  ASSERT_TRUE(eventually([&] { return api_->list("", "v1", "pods", ns_, "shardguard.io/job=valid-rep").size() == 8; },
                         30s)) << op.log();
  ReplicaPlacement place(*api_, ns_);
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 2; ++r) place.kubelet(replica_pod("valid-rep", i, r), "node-" + std::to_string(10 + i), "Running");
  }
  ASSERT_TRUE(eventually([&] { return status("valid-rep").value("phase", "") == "Running"; }, 30s))
      << status("valid-rep").dump(2);
  json dump = api_->dump();
  json items = json::array();
  for (const auto& o : dump["items"]) {
    if (o.value("kind", "") != "Namespace") items.push_back(o);  // ours, not the operator's
  }
  // The jobs (with the status the operator wrote) live on the real server.
  const auto jobs = jobs_->get(jobs_path());
  ASSERT_EQ(jobs.code, 200) << jobs.raw;
  for (auto o : jobs.body["items"]) {
    o["apiVersion"] = std::string(kGroup) + "/" + kVersion;
    o["kind"] = "ShardedTrainingJob";
    items.push_back(o);
  }
  const std::string file = (dir_ / "objects.json").string();
  std::ofstream(file) << json{{"apiVersion", "v1"}, {"kind", "List"}, {"items", items}}.dump(1);
  const std::string cmd = "cd " + std::string(SHARDGUARD_SOURCE_DIR) +
                          " && node tests/schema/validate.mjs --crd crds/shardedtrainingjobs.shardguard.io.yaml " + file +
                          " > " + (dir_ / "validate.log").string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << read_file((dir_ / "validate.log").string());
  std::printf("%s", read_file((dir_ / "validate.log").string()).c_str());
}

}  // namespace
}  // namespace shardguard

namespace shardguard {
namespace {

// (apiGroup, resource[/subresource], verb) triples.
using Grant = std::tuple<std::string, std::string, std::string>;

std::set<Grant> granted_by(const std::string& manifest_file) {
  std::set<Grant> out;
  const std::string text = read_file(manifest_file);
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find("\n---", start);
    if (end == std::string::npos) end = text.size();
    const json doc = yaml_to_json(text.substr(start, end - start));
    start = end + 4;
    if (!doc.is_object() || (doc.value("kind", "") != "ClusterRole" && doc.value("kind", "") != "Role")) continue;
    // Only the operator's own roles (not shardguard-edit/-view, which are for people).
    if (doc["metadata"].value("name", "").rfind("shardguard-operator", 0) != 0) continue;
    for (const auto& rule : doc.value("rules", json::array())) {
      for (const auto& g : rule["apiGroups"]) {
        for (const auto& r : rule["resources"]) {
          for (const auto& v : rule["verbs"]) out.insert({g.get<std::string>(), r.get<std::string>(), v.get<std::string>()});
        }
      }
    }
  }
  return out;
}

// The RBAC of deploy/operator.yaml (and so of the Helm chart, which a chart test
// keeps equal to it) against every API call the operator made through a whole job
// life: each call is allowed, and every grant but one documented exception was used.
TEST_F(OperatorTest, RbacGrantsExactlyTheCallsTheOperatorMakes) {
  auto& op = start_operator({"--leader-elect", "--leader-election-namespace", ns_, "--lease-duration", "3",
                             "--renew-deadline", "2", "--retry-period", "0.5", "--resync", "1"});
  create_job(job_object("rbac", "  runPolicy: {ttlSecondsAfterFinished: 1}\n"));
  ASSERT_TRUE(eventually([&] { return owned_objects("rbac") == 14; }, 30s)) << op.log();
  run_all("rbac");
  ASSERT_TRUE(eventually([&] { return status("rbac").value("phase", "") == "Running"; }, 30s));
  // Drift: a ConfigMap's data, the Service's selector and a Secret's labels are put back.
  json cm = *api_->get("", "v1", "configmaps", ns_, "rbac-shard-1");
  cm["data"]["policy.json"] = "{}";
  api_->update("", "v1", "configmaps", ns_, cm);
  json svc = *api_->get("", "v1", "services", ns_, "rbac");
  svc["spec"]["selector"] = {{"app", "other"}};
  api_->update("", "v1", "services", ns_, svc);
  json sec = *api_->get("", "v1", "secrets", ns_, "rbac-shard-2");
  sec["metadata"]["labels"].erase("shardguard.io/shard");
  api_->update("", "v1", "secrets", ns_, sec);
  ASSERT_TRUE(eventually([&] {
    return (*api_->get("", "v1", "configmaps", ns_, "rbac-shard-1"))["data"]["policy.json"] != "{}" &&
           (*api_->get("", "v1", "services", ns_, "rbac"))["spec"]["selector"].contains("shardguard.io/job") &&
           (*api_->get("", "v1", "secrets", ns_, "rbac-shard-2"))["metadata"]["labels"].contains("shardguard.io/shard");
  }, 30s));
  // A failed pod (delete + create), then success, then the TTL deletes the job, and the
  // finalizer's cleanup deletes what it owns.
  const std::string failed_uid = (*pod("rbac", 3))["metadata"]["uid"];
  kubelet("rbac", 3, "node-3", "Failed");
  ASSERT_TRUE(eventually([&] {
    auto p = pod("rbac", 3);
    return status("rbac").value("failedPods", 0) == 1 && p && (*p)["metadata"]["uid"] != failed_uid;
  }, 30s));
  run_all("rbac");
  for (int i = 0; i < 4; ++i) kubelet("rbac", i, "node-" + std::to_string(i), "Succeeded");
  ASSERT_TRUE(eventually([&] { return !job("rbac"); }, 30s)) << status("rbac").dump(2);
  ASSERT_TRUE(eventually([&] { return owned_objects("rbac") == 0; }, 30s));

  std::set<Grant> used;
  for (const auto& r : api_->requests()) {
    if (r.user_agent.find("shardguard-operator") == std::string::npos || r.verb.empty()) continue;
    used.insert({r.group, r.resource + (r.subresource.empty() ? "" : "/" + r.subresource), r.verb});
  }
  const std::set<Grant> granted = granted_by(std::string(SHARDGUARD_SOURCE_DIR) + "/deploy/operator.yaml");
  // Needed only where the OwnerReferencesPermissionEnforcement admission plugin checks
  // blockOwnerDeletion; no call of the operator's uses it directly.
  const std::set<Grant> documented = {{"shardguard.io", "shardedtrainingjobs/finalizers", "update"}};
  for (const auto& g : used) {
    EXPECT_TRUE(granted.count(g)) << "called but not granted: " << std::get<0>(g) << " " << std::get<1>(g) << " "
                                  << std::get<2>(g);
  }
  for (const auto& g : granted) {
    EXPECT_TRUE(used.count(g) || documented.count(g))
        << "granted but never called: " << std::get<0>(g) << " " << std::get<1>(g) << " " << std::get<2>(g);
  }
  std::printf("operator API calls: %zu distinct (group, resource, verb); RBAC grants: %zu\n", used.size(),
              granted.size());
}

}  // namespace
}  // namespace shardguard
