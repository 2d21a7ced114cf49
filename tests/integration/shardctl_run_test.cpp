// `shardctl run` end to end (issue 5): the job rendered by the operator's code, each
// shard pod as a shardd behind its own shard-sidecar on 127.0.0.1, every
// stage-to-stage byte through the sidecars; the report's exposure per principal and
// per node; a shardd SIGKILLed mid-run is restarted from its checkpoint and every
// step gets done; Ctrl-C stops everything and --resume continues from the checkpoints;
// --prometheus runs a real Prometheus that scrapes every process, whose PromQL gives
// each principal's exposure; a taken port or a missing binary stops nothing-started;
// each export principal exports the shards it was assigned and no more.
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "shardguard/common/httplib.h"
#include "shardguard/common/pki.h"
#include "support/export_client.h"
#include "support/wait.h"

#include "integration/pipeline_fixture.h"
#include "integration/prom_server.h"

namespace shardguard {
namespace {

using ShardctlRunTest = PipelineFixture;

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x + "\n";
  return s;
}

// The JSON lines of a log file with the given msg.
std::vector<nlohmann::json> log_lines(const std::string& file, const std::string& msg) {
  std::vector<nlohmann::json> out;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.value("msg", "") == msg) out.push_back(j);
  }
  return out;
}

std::unique_ptr<Process> start_run(const std::string& job, const std::string& work, const std::string& out,
                                   std::vector<std::string> extra = {}) {
  SpawnOptions o;
  o.argv = {kBin + "/shardctl", "run", job, "--workdir", work, "--device", "cpu", "--threads", "1"};
  o.argv.insert(o.argv.end(), extra.begin(), extra.end());
  o.log_file = out;
  return std::make_unique<Process>(o);
}

TEST_F(ShardctlRunTest, TrainsThroughTheSidecarsWhichRelayEveryByteAndLeavesNothingRunning) {
  constexpr int n = 3;
  auto spec = job_json(n);
  spec["spec"]["protection"]["maxExposure"] = 0.9;
  const std::string job = write_job(spec);
  const std::string work = dir_ + "/work";
  auto run = start_run(job, work, dir_ + "/run.out");
  const auto st = run->wait_for(300s);
  ASSERT_TRUE(st.has_value()) << "shardctl run did not finish in 300 s";
  const std::string out = read_file(dir_ + "/run.out");
  ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << out;

  // It trained: every step, and the loss fell.
  const auto steps = log_lines(work + "/logs/shard-" + std::to_string(n - 1) + ".log", "step");
  ASSERT_EQ(steps.size(), 48u) << out;
  double first = 0, last = 0;
  for (int k = 0; k < 6; ++k) {
    first += steps[k].at("loss").get<double>() / 6;
    last += steps[steps.size() - 1 - k].at("loss").get<double>() / 6;
  }
  EXPECT_LT(last, 0.7 * first) << "loss " << first << " → " << last;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("test accuracy +([0-9.]+) \\((\\d+)/500\\)"))) << out;
  EXPECT_GT(std::stod(m[1]), 0.5) << out;

  // Each pod's files, from its rendered Secret and ConfigMap; private keys 0600.
  for (int i = 0; i < n; ++i) {
    const std::string pod = work + "/shard-" + std::to_string(i);
    for (const char* f : {"tls.crt", "tls.key", "ca.crt", "checkpoint.key", "ledger.key", "policy.json", "job.json"}) {
      EXPECT_TRUE(fs::exists(pod + "/" + f)) << pod << "/" << f;
    }
    for (const char* f : {"tls.key", "checkpoint.key", "ledger.key"}) {
      struct stat sb {};
      ASSERT_EQ(::stat((pod + "/" + f).c_str(), &sb), 0);
      EXPECT_EQ(sb.st_mode & 0777, 0600u) << pod << "/" << f;
    }
    EXPECT_EQ(read_file(pod + "/checkpoint.key"), read_file(work + "/keys/shard-" + std::to_string(i) + ".key"));
    EXPECT_EQ(read_file(pod + "/ledger.key"), read_file(work + "/keys/shard-" + std::to_string(i) + ".ledger.key"));
  }

  // Every byte each shardd sent or received crossed its own sidecar: the sidecar's
  // shardguard_proxy_bytes_total as the report reads it equals shardd's own count
  // (received exactly; sent up to a last message to a finished peer, below), which
  // the test reads independently from shardd's last log line.
  const std::regex traffic(
      "shard (\\d+) traffic sidecar sent (\\d+) received (\\d+); shardd sent (\\d+) received (\\d+)");
  int rows = 0;
  for (auto it = std::sregex_iterator(out.begin(), out.end(), traffic); it != std::sregex_iterator(); ++it) {
    const int i = std::stoi((*it)[1]);
    SCOPED_TRACE("shard " + std::to_string(i));
    ++rows;
    const double sidecar_sent = std::stod((*it)[2]), sidecar_received = std::stod((*it)[3]);
    const auto fin = log_lines(work + "/logs/shard-" + std::to_string(i) + ".log", "pipeline traffic");
    ASSERT_EQ(fin.size(), 1u);
    const double shardd_sent = fin[0].at("message_bytes_sent").get<double>();
    const double shardd_received = fin[0].at("message_bytes_received").get<double>();
    EXPECT_EQ(std::stod((*it)[4]), shardd_sent);
    EXPECT_EQ(std::stod((*it)[5]), shardd_received);
    EXPECT_GT(sidecar_sent, 100000);
    EXPECT_GT(sidecar_received, 100000);
    EXPECT_EQ(sidecar_received, shardd_received);
    // shardd counts a message as sent when it hands it to gRPC; the sidecar when it has
    // relayed it. At the very end a stage may send a last small message towards a
    // neighbour that has already finished: counted by shardd, never relayed (seen: 22 to
    // 66 bytes in 1 run of 4). Anything that bypassed the sidecar would be megabytes.
    EXPECT_LE(sidecar_sent, shardd_sent);
    EXPECT_LE(shardd_sent - sidecar_sent, 256.0) << "more than one small final message not relayed";
    std::cout << "[ figures  ] shard " << i << ": sidecar sent " << sidecar_sent << " received " << sidecar_received
              << "; shardd sent " << shardd_sent << " received " << shardd_received << "\n";
  }
  EXPECT_EQ(rows, n) << out;
  EXPECT_NE(out.find("policy denials  0"), std::string::npos) << out;

  // Exposure per principal and per node (each shard its own node): each equals its
  // stage's share of the parameters, read independently from the report's
  // parameter counts, and none is above maxExposure.
  std::vector<double> params(n, -1);
  double total = 0;
  const std::regex shard_params("shard (\\d+) +(\\d+) parameters \\(");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), shard_params); it != std::sregex_iterator(); ++it) {
    const int i = std::stoi((*it)[1]);
    ASSERT_TRUE(i >= 0 && i < n) << out;
    params[i] = std::stod((*it)[2]);
    total += params[i];
  }
  ASSERT_GT(total, 0) << out;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("maxExposure ([0-9.]+)\n"))) << out;
  const double max_exposure = std::stod(m[1]);
  EXPECT_DOUBLE_EQ(max_exposure, spec["spec"]["protection"]["maxExposure"].get<double>());
  const std::regex exposure("exposure shard (\\d+) principal (\\S+) ([0-9.]+) node (\\S+) ([0-9.]+)");
  int exposures = 0;
  for (auto it = std::sregex_iterator(out.begin(), out.end(), exposure); it != std::sregex_iterator(); ++it) {
    const int i = std::stoi((*it)[1]);
    SCOPED_TRACE("shard " + std::to_string(i));
    ++exposures;
    ASSERT_GE(params[i], 0) << out;
    EXPECT_EQ((*it)[2].str(), "spiffe://shardguard.local/ns/default/job/it-mlp/shard/" + std::to_string(i));
    EXPECT_EQ((*it)[4].str(), "local-shard-" + std::to_string(i));
    const double principal = std::stod((*it)[3]), node = std::stod((*it)[5]);
    EXPECT_NEAR(principal, params[i] / total, 1e-4);
    EXPECT_NEAR(node, params[i] / total, 1e-4);
    EXPECT_LE(principal, max_exposure);
    EXPECT_LE(node, max_exposure);
  }
  EXPECT_EQ(exposures, n) << out;
  EXPECT_NE(out.find("within maxExposure"), std::string::npos) << out;

  // Each sidecar was asked to stop (SIGTERM) and stopped cleanly; no child is left.
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(log_lines(work + "/logs/sidecar-" + std::to_string(i) + ".log", "stopping").size(), 1u)
        << "sidecar " << i;
  }
  const auto left = processes_mentioning(work + "/");
  EXPECT_TRUE(left.empty()) << joined(left);
}

TEST_F(ShardctlRunTest, SigintStopsEveryProcessAndResumeFinishesTheRun) {
  constexpr int n = 2;
  auto spec = job_json(n);
  spec["spec"]["training"]["epochs"] = 3;  // 144 steps: long enough to be interrupted
  const std::string job = write_job(spec);
  const std::string work = dir_ + "/work";
  const std::string last_log = work + "/logs/shard-" + std::to_string(n - 1) + ".log";
  auto run = start_run(job, work, dir_ + "/run.out");

  // Wait (bounded) for a checkpoint to exist and training to go on past it.
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  bool trained = false;
  while (!trained && std::chrono::steady_clock::now() < deadline) {
    ASSERT_FALSE(run->wait_for(200ms).has_value()) << read_file(dir_ + "/run.out");
    const auto steps = log_lines(last_log, "step");
    trained = !steps.empty() && steps.back().value("step", 0) >= 12;
  }
  ASSERT_TRUE(trained) << read_file(dir_ + "/run.out");
  // Per shard pod, one shardd and one shard-sidecar.
  const auto running = processes_mentioning(work + "/");
  EXPECT_EQ(running.size(), 2u * n) << joined(running);
  int sidecars = 0;
  for (const auto& p : running) sidecars += p.find("shard-sidecar ") != std::string::npos;
  EXPECT_EQ(sidecars, n) << joined(running);

  run->signal(SIGINT);
  const auto st = run->wait_for(60s);
  ASSERT_TRUE(st.has_value());
  const std::string out = read_file(dir_ + "/run.out");
  EXPECT_TRUE(st->exited && st->code == 130) << st->str() << "\n" << out;
  EXPECT_NE(out.find("--resume"), std::string::npos) << out;
  const auto left = processes_mentioning(work + "/");
  EXPECT_TRUE(left.empty()) << joined(left);

  // The same PKI and keys, and the run continues from its checkpoints to the end.
  const std::string ca = read_file(work + "/pki/ca.crt");
  const std::string key0 = read_file(work + "/keys/shard-0.key");
  const std::string ledger_key0 = read_file(work + "/keys/shard-0.ledger.key");
  auto resumed = start_run(job, work, dir_ + "/resume.out", {"--resume"});
  const auto rs = resumed->wait_for(300s);
  ASSERT_TRUE(rs.has_value());
  const std::string rout = read_file(dir_ + "/resume.out");
  ASSERT_TRUE(rs->exited && rs->code == 0) << rs->str() << "\n" << rout;
  EXPECT_NE(rout.find("final loss"), std::string::npos) << rout;
  EXPECT_NE(rout.find("after 144 steps"), std::string::npos) << rout;
  EXPECT_EQ(read_file(work + "/pki/ca.crt"), ca);
  EXPECT_EQ(read_file(work + "/keys/shard-0.key"), key0);
  EXPECT_EQ(read_file(work + "/shard-0/checkpoint.key"), key0);
  EXPECT_EQ(read_file(work + "/keys/shard-0.ledger.key"), ledger_key0);
  const auto resumes = log_lines(last_log, "pipeline resumed");
  ASSERT_FALSE(resumes.empty());
  EXPECT_GE(resumes.back().value("step", 0), 8);
  const auto left_after = processes_mentioning(work + "/");
  EXPECT_TRUE(left_after.empty()) << joined(left_after);
}

TEST_F(ShardctlRunTest, KilledShardIsRestartedFromItsCheckpointAndEveryStepIsDone) {
  constexpr int n = 3;
  constexpr int64_t total = 96;  // 2 epochs of 48 steps; checkpoints every 8
  auto spec = job_json(n);
  spec["spec"]["training"]["epochs"] = 2;
  const std::string job = write_job(spec);
  const std::string work = dir_ + "/work";
  const std::string last_log = work + "/logs/shard-" + std::to_string(n - 1) + ".log";
  auto run = start_run(job, work, dir_ + "/run.out");

  // Wait (bounded) until training is past two checkpoints, then SIGKILL the middle
  // shard's shardd (found by its command line: the shardd binary, --stage 1, this
  // run's workdir). Its sidecar stays.
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  bool trained = false;
  while (!trained && std::chrono::steady_clock::now() < deadline) {
    ASSERT_FALSE(run->wait_for(100ms).has_value()) << read_file(dir_ + "/run.out");
    const auto steps = log_lines(last_log, "step");
    trained = !steps.empty() && steps.back().value("step", 0) >= 20;
  }
  ASSERT_TRUE(trained) << read_file(dir_ + "/run.out");
  pid_t victim = 0;
  for (const auto& p : processes_mentioning(work + "/")) {
    const std::string cmd = p.substr(p.find(": ") + 2);
    if (cmd.rfind(kBin + "/shardd ", 0) == 0 && cmd.find(" --stage 1 ") != std::string::npos) {
      ASSERT_EQ(victim, 0) << "two shardd processes of stage 1:\n" << joined(processes_mentioning(work + "/"));
      victim = static_cast<pid_t>(std::stol(p.substr(0, p.find(':'))));
    }
  }
  ASSERT_GT(victim, 0) << joined(processes_mentioning(work + "/"));
  ASSERT_EQ(::kill(victim, SIGKILL), 0);

  const auto st = run->wait_for(300s);
  ASSERT_TRUE(st.has_value()) << "shardctl run did not finish in 300 s";
  const std::string out = read_file(dir_ + "/run.out");
  ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << out;

  // shardctl restarted it once, within runPolicy.backoffLimit, and said so.
  EXPECT_NE(out.find("shard 1 stopped (killed by signal"), std::string::npos) << out;
  EXPECT_NE(out.find("restarting it from its checkpoint in 1s (1/"), std::string::npos) << out;
  EXPECT_TRUE(std::regex_search(out, std::regex("shard 1 +\\d+ parameters \\([0-9.]+% of the model\\), restarts 1")))
      << out;
  EXPECT_NE(out.find("after " + std::to_string(total) + " steps"), std::string::npos) << out;

  // The last stage went back to a checkpoint every stage holds (a multiple of 8, at
  // most one interval behind the last step it had logged) and from there trained
  // every step to the end: no step lost beyond the checkpoint.
  std::ifstream in(last_log);
  std::string line;
  int64_t max_before = 0;
  std::vector<std::pair<int64_t, int64_t>> restarts;  // (resumed at, last step logged before)
  std::set<int64_t> after_resume;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object()) continue;
    const std::string msg = j.value("msg", "");
    if (msg == "pipeline resumed" && j.value("step", int64_t{0}) > 0) {
      restarts.emplace_back(j.value("step", int64_t{0}), max_before);
      after_resume.clear();
    } else if (msg == "step") {
      const int64_t step = j.value("step", int64_t{0});
      max_before = std::max(max_before, step);
      after_resume.insert(step);
    }
  }
  ASSERT_FALSE(restarts.empty()) << "the last stage never resynchronised after the kill\n" << out;
  const auto [resumed, killed_at] = restarts.back();
  EXPECT_EQ(resumed % 8, 0);
  EXPECT_GE(resumed, 16);
  EXPECT_GE(resumed, killed_at - 8 - 1);
  EXPECT_LE(resumed, killed_at + 1);
  for (int64_t step = resumed + 1; step <= total; ++step) {
    EXPECT_TRUE(after_resume.count(step)) << "step " << step << " was not trained after the resume at " << resumed;
  }
  EXPECT_EQ(*after_resume.rbegin(), total);
  std::cout << "[ figures  ] killed shard 1 with the last stage at step " << killed_at << "; resumed at checkpoint "
            << resumed << ", finished " << total << " steps\n";

  // Nothing of the run is left behind.
  const auto left = processes_mentioning(work + "/");
  EXPECT_TRUE(left.empty()) << joined(left);
}

TEST_F(ShardctlRunTest, PrometheusScrapesEveryProcessAndReadsEachPrincipalsExposureBack) {
  constexpr int n = 3;
  auto spec = job_json(n);
  spec["spec"]["protection"]["maxExposure"] = 0.9;
  spec["spec"]["training"]["epochs"] = 2;  // long enough for a few scrapes of every shardd
  const std::string job = write_job(spec);
  const std::string work = dir_ + "/work";
  auto run = start_run(job, work, dir_ + "/run.out", {"--prometheus"});
  const auto st = run->wait_for(300s);
  ASSERT_TRUE(st.has_value()) << "shardctl run did not finish in 300 s";
  const std::string out = read_file(dir_ + "/run.out");
  ASSERT_TRUE(st->exited && st->code == 0) << st->str() << "\n" << out;
  EXPECT_TRUE(std::regex_search(out, std::regex("prometheus http://127\\.0\\.0\\.1:\\d+ +\\(scraping 6 targets")))
      << out;
  EXPECT_NE(out.find("scraped 6 of 6 targets"), std::string::npos) << out;

  // The PromQL exposure of each shard principal equals its stage's share of the
  // parameters (from the report's parameter counts), and nothing else holds any.
  std::map<int, double> params;
  double total = 0;
  const std::regex shard_params("shard (\\d+) +(\\d+) parameters \\(");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), shard_params); it != std::sregex_iterator(); ++it) {
    params[std::stoi((*it)[1])] = std::stod((*it)[2]);
    total += std::stod((*it)[2]);
  }
  ASSERT_EQ(params.size(), static_cast<size_t>(n)) << out;
  const std::string prefix = "spiffe://shardguard.local/ns/default/job/it-mlp/shard/";
  const std::regex promql("exposure \\(PromQL\\) principal (\\S+) ([0-9.]+)");
  std::set<int> seen;
  for (auto it = std::sregex_iterator(out.begin(), out.end(), promql); it != std::sregex_iterator(); ++it) {
    const std::string peer = (*it)[1];
    ASSERT_EQ(peer.rfind(prefix, 0), 0u) << peer;
    const int i = std::stoi(peer.substr(prefix.size()));
    seen.insert(i);
    EXPECT_NEAR(std::stod((*it)[2]), params[i] / total, 1e-4) << peer;
    EXPECT_LE(std::stod((*it)[2]), 0.9) << peer;
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(n)) << out;
  EXPECT_TRUE(std::regex_search(out, std::regex("exposure \\(PromQL\\) max [0-9.]+ over 3 principal\\(s\\)  \\(within "
                                                "maxExposure 0\\.9000\\)")))
      << out;
  const auto left = processes_mentioning(work + "/");
  EXPECT_TRUE(left.empty()) << joined(left);

  // Independently of shardctl: a second Prometheus over the TSDB the run left behind
  // (no scrape targets of its own) holds samples of every process and the sidecars'
  // exposure series of every shard principal.
  testsupport::PromServer prometheus(dir_, "prometheus2", work + "/prometheus/data", "");
  ASSERT_TRUE(prometheus.ready()) << prometheus.log();
  std::string error;
  const auto up = prometheus.instant("max by (pod, container) (max_over_time(up{job=\"it-mlp\"}[30m]))", &error);
  ASSERT_EQ(up.size(), 2u * n) << error << "\n" << prometheus.log();
  for (const auto& r : up) EXPECT_EQ(r["value"][1], "1") << r.dump();
  const auto own = prometheus.instant("last_over_time(shardguard_exposure_ratio{job=\"it-mlp\"}[30m]) == 1", &error);
  EXPECT_EQ(own.size(), static_cast<size_t>(n)) << error << own.dump();
}

TEST_F(ShardctlRunTest, TakenPrometheusPortOrMissingBinaryStartsNothing) {
  const std::string job = write_job(job_json(2));
  // A port someone else listens on.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string port = std::to_string(ntohs(addr.sin_port));

  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--prometheus", "--prometheus-port", port}, "--prometheus-port " + port + ": 127.0.0.1:" + port +
                                                        " is already in use"},
      {{"--prometheus", "--prometheus-bin", dir_ + "/no-such-prometheus"},
       "--prometheus: cannot find " + dir_ + "/no-such-prometheus"},
      {{"--shardd", dir_ + "/no-such-shardd"}, "cannot run " + dir_ + "/no-such-shardd"},
  };
  for (size_t k = 0; k < cases.size(); ++k) {
    SCOPED_TRACE(cases[k].message);
    const std::string work = dir_ + "/work" + std::to_string(k);
    auto run = start_run(job, work, dir_ + "/run" + std::to_string(k) + ".out", cases[k].args);
    const auto st = run->wait_for(60s);
    ASSERT_TRUE(st.has_value());
    const std::string out = read_file(dir_ + "/run" + std::to_string(k) + ".out");
    EXPECT_TRUE(st->exited && st->code == 2) << st->str() << "\n" << out;
    EXPECT_NE(out.find(cases[k].message), std::string::npos) << out;
    EXPECT_FALSE(fs::exists(work)) << "nothing is written before the inputs are checked";
    const auto left = processes_mentioning(work + "/");
    EXPECT_TRUE(left.empty()) << joined(left);
  }
  ::close(fd);
}


// Issue 16 item 1. An MLP in 3 stages (84.9 %, 7.0 %, 8.1 % of the parameters) at
// maxExposure 0.9 with two export principals: a may export stage 0, b stages 1-2.
// Each exports everything it was assigned, through the sidecars, from the real
// shardd; the next shard is refused and audited.
TEST_F(ShardctlRunTest, EachExportPrincipalExportsItsShardsUpToTheLimitAndNoMore) {
  constexpr int n = 3;
  auto spec = job_json(n);
  spec["spec"]["training"]["epochs"] = 40;  // long enough to export from; stopped below
  const std::string a = "spiffe://shardguard.local/ns/default/sa/a";
  const std::string b = "spiffe://shardguard.local/ns/default/sa/b";
  spec["spec"]["protection"] = {{"maxExposure", 0.9}, {"export", {{"allowed", true}, {"principals", {a, b}}}}};
  const std::string job = write_job(spec);
  const std::string work = dir_ + "/work";
  auto run = start_run(job, work, dir_ + "/run.out", {"--export-budget", std::to_string(16 << 20)});
  // The sidecars' mTLS ports from the header.
  std::map<int, int> inbound;
  ASSERT_TRUE(testsupport::eventually(
      [&] {
        const std::string out = read_file(dir_ + "/run.out");
        const std::regex port_re("shard (\\d+): .* sidecar mTLS :(\\d+)");
        for (std::sregex_iterator it(out.begin(), out.end(), port_re), end; it != end; ++it) {
          inbound[std::stoi((*it)[1])] = std::stoi((*it)[2]);
        }
        return static_cast<int>(inbound.size()) == n;
      },
      60s))
      << read_file(dir_ + "/run.out");
  EXPECT_NE(read_file(dir_ + "/run.out").find("export principal " + a + " may export shards 0 "), std::string::npos)
      << read_file(dir_ + "/run.out");

  const CaBundle ca{read_file(work + "/pki/ca.crt"), read_file(work + "/pki/ca.key")};
  const std::map<std::string, Leaf> leaves = {{a, issue_leaf(ca, a, std::chrono::hours(1))},
                                              {b, issue_leaf(ca, b, std::chrono::hours(1))}};
  auto pull = [&](const std::string& who, int shard, uint64_t offset, uint64_t length, uint64_t* total) {
    std::string bytes;
    const grpc::Status st =
        testsupport::export_pull("127.0.0.1:" + std::to_string(inbound.at(shard)), leaves.at(who).cert_pem,
                                 leaves.at(who).key_pem, offset, length, &bytes,
                                 [&](const v1::ExportChunk& c) { *total = c.total_bytes(); });
    EXPECT_TRUE(!st.ok() || bytes.size() == length) << bytes.size() << " of " << length;
    return st;
  };
  // Everything of a shard: one byte (which tells the size), then the rest.
  auto export_all = [&](const std::string& who, int shard) {
    uint64_t total = 0;
    grpc::Status first;
    const bool served = testsupport::eventually(
        [&] {
          first = pull(who, shard, 0, 1, &total);
          return first.error_code() != grpc::StatusCode::UNAVAILABLE;  // before its first checkpoint
        },
        120s);
    EXPECT_TRUE(served && first.ok()) << who << " shard " << shard << ": " << first.error_message();
    EXPECT_GT(total, 1u);
    const grpc::Status rest = pull(who, shard, 1, total - 1, &total);
    EXPECT_TRUE(rest.ok()) << who << " shard " << shard << ": " << rest.error_message();
  };
  auto refused = [&](const std::string& who, int shard) {
    uint64_t total = 0;
    const grpc::Status st = pull(who, shard, 0, 1, &total);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED) << who << " shard " << shard;
    EXPECT_NE(st.error_message().find("is not an export principal of shard " + std::to_string(shard)),
              std::string::npos)
        << st.error_message();
  };
  export_all(a, 0);
  refused(a, 1);
  export_all(b, 1);
  export_all(b, 2);
  refused(b, 0);
  // Each refusal is in that shard's audit log.
  for (const auto& [shard, peer] : std::map<int, std::string>{{0, b}, {1, a}}) {
    const std::string file = work + "/logs/sidecar-state-" + std::to_string(shard) + "/audit.jsonl";
    int denied = 0;
    std::istringstream lines(read_file(file));
    for (std::string line; std::getline(lines, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      denied += j.is_object() && j.value("peer", "") == peer && j.value("rule", "") == "export-denied";
    }
    EXPECT_EQ(denied, 1) << file << ":\n" << read_file(file);
  }

  run->signal(SIGINT);
  const auto st = run->wait_for(60s);
  ASSERT_TRUE(st.has_value());
  const std::string out = read_file(dir_ + "/run.out");
  EXPECT_TRUE(st->exited && st->code == 130) << st->str() << "\n" << out;
  EXPECT_TRUE(processes_mentioning(work + "/").empty());
}

}  // namespace
}  // namespace shardguard
