// A TorchScript model through the binaries: `shardctl split` cuts it into packages,
// three `shardd` processes fine-tune it, each opening only its own package with its
// own key, and `shardctl recombine --package` gives back a model whose validation loss
// is the last distributed evaluation. A stage given another shard's key does not start.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <regex>
#include <thread>

#include "integration/pipeline_fixture.h"
#include "shardguard/common/pki.h"
#include "shardguard/model/package.h"
#include "shardd/test_job.h"
#include "support/cert_factory.h"
#include "support/python.h"

namespace shardguard {
namespace {

using PackageProcessTest = PipelineFixture;

using testsupport::python_with_torch;

std::pair<int, std::string> run_tool(const std::vector<std::string>& argv, const std::string& log) {
  SpawnOptions o;
  o.argv = argv;
  o.log_file = log;
  Process p(o);
  const auto st = p.wait_for(120s);
  if (!st) return {-1, "did not exit: " + argv[0]};
  return {st->exited ? st->code : -1, read_file(log)};
}

// Whether something accepts TCP connections on 127.0.0.1:port.
bool accepts(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

// A python3 server started by `argv_for(port)` on a free port of 127.0.0.1: a port
// taken between picking and binding makes it exit, and the next port is tried; ready
// once it accepts connections (polled, bounded).
std::unique_ptr<Process> start_server(const std::function<std::vector<std::string>(int)>& argv_for,
                                      const std::string& log, int* port) {
  for (int attempt = 0; attempt < 5; ++attempt) {
    *port = pick_free_port();
    SpawnOptions o;
    o.argv = argv_for(*port);
    o.log_file = log;  // stdout and stderr (the access log)
    auto p = std::make_unique<Process>(o);
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    while (std::chrono::steady_clock::now() < deadline && p->running()) {
      if (accepts(*port)) return p;
      std::this_thread::sleep_for(20ms);
    }
    p->terminate(2s);
  }
  return nullptr;
}

// Issue 18 item 4 with spec.model.package.url: each stage fetches only its own
// shard-<i>.sgpkg from a real HTTP server (python3 -m http.server), checks it against
// the manifest of the keys directory (never the server's), and trains; what the server
// gets wrong is refused (exit 3) or reported unavailable (exit 4), naming the URL.
TEST_F(PackageProcessTest, StagesFetchOnlyTheirOwnPackageFromAUrlAndRefuseWhatTheServerGetsWrong) {
  const std::string python = python_with_torch();
  if (python.empty()) {
    GTEST_SKIP() << "no python3 with torch (Debian python3-torch, installed by make deps; or set SHARDGUARD_PYTHON)";
  }
  constexpr int n = 3;
  testing::write_small_tokens(dir_ + "/data", 2000, 400);
  auto j = testing::small_gpt_job_json(n, dir_ + "/data");
  const std::string job = write_job(j);
  ASSERT_EQ(testsupport::make_small_lm(python, dir_ + "/lm.pt"), "");
  auto [split_rc, split_out] = run_tool({kBin + "/shardctl", "split", dir_ + "/lm.pt", "--job", job, "--out",
                                         dir_ + "/srv/good", "--keys", dir_ + "/keys"},
                                        dir_ + "/split.out");
  ASSERT_EQ(split_rc, 0) << split_out;
  // The keys directory holds the manifest too (what keysSecret holds); the copy on the
  // server is removed, so nothing could have read it from there.
  ASSERT_EQ(read_file(dir_ + "/keys/manifest.json"), read_file(dir_ + "/srv/good/manifest.json"));
  fs::remove(dir_ + "/srv/good/manifest.json");
  // Bad copies on the same server: shard 1 with one bit flipped, and with bytes appended.
  make_dirs(dir_ + "/srv/flipped");
  make_dirs(dir_ + "/srv/long");
  {
    std::string bytes = read_file(dir_ + "/srv/good/shard-1.sgpkg");
    write_file_atomic(dir_ + "/srv/long/shard-1.sgpkg", bytes + std::string(4096, 'x'), 0644);
    bytes[bytes.size() / 2] ^= 0x01;
    write_file_atomic(dir_ + "/srv/flipped/shard-1.sgpkg", bytes, 0644);
  }
  int port = 0;
  auto server = start_server(
      [&](int p) {
        return std::vector<std::string>{python, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                        dir_ + "/srv", std::to_string(p)};
      },
      dir_ + "/http.log", &port);
  ASSERT_TRUE(server) << read_file(dir_ + "/http.log");
  const std::string base = "http://127.0.0.1:" + std::to_string(port) + "/";
  ports_ = {pick_free_port(), pick_free_port(), pick_free_port()};
  auto with_url = [&](std::vector<std::string> argv, const std::string& prefix, int key) {
    argv.insert(argv.end(), {"--package", prefix, "--package-manifest", dir_ + "/keys/manifest.json",
                             "--package-key-file", dir_ + "/keys/shard-" + std::to_string(key) + ".key",
                             "--package-timeout", "1", "--package-retries", "1"});
    return argv;
  };

  // Fetched, checked and trained: each stage with its own package and key.
  for (int i = 0; i < n; ++i) {
    SpawnOptions o;
    o.argv = with_url(stage_argv(job, dir_ + "/run", i, n), base + "good/", i);
    o.argv.insert(o.argv.end(), {"--max-steps", "4"});
    o.env = {{"OMP_NUM_THREADS", "1"}, {"OPENBLAS_NUM_THREADS", "1"}};
    o.log_file = dir_ + "/run/stage-" + std::to_string(i) + ".log";
    o.capture_stderr = i == n - 1;  // the last stage's lines are read below
    stages_[i] = std::make_unique<Process>(o);
  }
  std::vector<nlohmann::json> lines;
  read_until(n - 1, [](const nlohmann::json&) { return false; }, &lines);
  int64_t last_step = 0;
  bool fetched_last = false;
  for (const auto& l : lines) {
    if (l.value("msg", "") == "step") last_step = l.at("step").get<int64_t>();
    if (l.value("msg", "") == "package fetched") fetched_last = l.value("shard", -1) == n - 1;
  }
  for (int i = 0; i < n; ++i) {
    const auto st = stages_[i]->wait_for(120s);
    ASSERT_TRUE(st.has_value()) << "stage " << i;
    const std::string log = read_file(dir_ + "/run/stage-" + std::to_string(i) + ".log");
    EXPECT_TRUE(st->exited && st->code == 0) << "stage " << i << ": " << st->str() << "\n" << log;
    if (i < n - 1) {
      EXPECT_NE(log.find("\"package fetched\""), std::string::npos) << log;
    }
  }
  EXPECT_TRUE(fetched_last);
  EXPECT_GT(last_step, 0);
  // The server saw each package requested once, and nothing else (no manifest, no
  // other shard's package by any stage: one request per stage).
  {
    const std::string http_log = read_file(dir_ + "/http.log");
    for (int i = 0; i < n; ++i) {
      const std::string req = "\"GET /good/shard-" + std::to_string(i) + ".sgpkg HTTP/1.1\" 200";
      const auto at = http_log.find(req);
      EXPECT_NE(at, std::string::npos) << http_log;
      EXPECT_EQ(http_log.find(req, at + 1), std::string::npos) << "fetched twice: " << http_log;
    }
    EXPECT_EQ(http_log.find("manifest"), std::string::npos) << http_log;
    size_t gets = 0;
    for (size_t at = http_log.find("\"GET "); at != std::string::npos; at = http_log.find("\"GET ", at + 1)) ++gets;
    EXPECT_EQ(gets, static_cast<size_t>(n)) << http_log;
  }

  // What the server gets wrong, for stage 1 alone (each exits before listening).
  auto stage1 = [&](const std::string& prefix, int key, const std::string& name) {
    return run_tool(with_url(stage_argv(job, dir_ + "/" + name, 1, n), prefix, key), dir_ + "/" + name + ".out");
  };
  {
    auto [rc, out] = stage1(base + "flipped/", 1, "flipped");
    EXPECT_EQ(rc, model::kExitPackageRefused) << out;
    EXPECT_NE(out.find("package " + base + "flipped/shard-1.sgpkg: SHA-256"), std::string::npos) << out;
    EXPECT_NE(out.find("for shard 1"), std::string::npos) << out;
  }
  {
    auto [rc, out] = stage1(base + "long/", 1, "long");
    EXPECT_EQ(rc, model::kExitPackageRefused) << out;
    EXPECT_NE(out.find(base + "long/shard-1.sgpkg: the server sends more than"), std::string::npos) << out;
  }
  {
    auto [rc, out] = stage1(base + "good/", 0, "wrongkey");
    EXPECT_EQ(rc, model::kExitPackageRefused) << out;
    EXPECT_NE(out.find("shard-1.sgpkg: refused: authentication failed"), std::string::npos) << out;
  }
  {
    auto [rc, out] = stage1(base + "missing/", 1, "missing");
    EXPECT_EQ(rc, model::kExitPackageUnavailable) << out;
    EXPECT_NE(out.find("package of shard 1 unavailable: GET " + base + "missing/shard-1.sgpkg: HTTP 404"),
              std::string::npos)
        << out;
  }
  // A server that accepts and never answers: each attempt times out after
  // --package-timeout 1, one retry, then unavailable (bounded, not a hang).
  int stall_port = 0;
  auto stall = start_server(
      [&](int p) {
        return std::vector<std::string>{
            python, "-u", "-c",
            "import socket,sys\ns=socket.socket()\ns.bind(('127.0.0.1'," + std::to_string(p) +
                "))\ns.listen(16)\nheld=[]\nwhile True:\n  held.append(s.accept())\n  print('accepted', flush=True)\n"};
      },
      dir_ + "/stall.log", &stall_port);
  ASSERT_TRUE(stall) << read_file(dir_ + "/stall.log");
  {
    const auto t0 = std::chrono::steady_clock::now();
    auto [rc, out] = stage1("http://127.0.0.1:" + std::to_string(stall_port) + "/pkg/", 1, "stalled");
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(rc, model::kExitPackageUnavailable) << out;
    EXPECT_NE(out.find("/pkg/shard-1.sgpkg: "), std::string::npos) << out;
    EXPECT_NE(out.find("--package-timeout"), std::string::npos) << out;
    EXPECT_NE(out.find("(2 attempts)"), std::string::npos) << out;
    EXPECT_LT(took, 60) << out;
  }
  // Stopped while fetching from it (SIGTERM, as a pod is stopped), with a timeout of
  // 600 s: once the server has accepted this stage's connection (curl is waiting for
  // the answer), the fetch is abandoned at once, not after the timeout.
  {
    const auto accepted = [&] {
      const std::string log = read_file(dir_ + "/stall.log");
      size_t n = 0;
      for (size_t at = log.find("accepted"); at != std::string::npos; at = log.find("accepted", at + 1)) ++n;
      return n;
    };
    const size_t before = accepted();
    auto argv = with_url(stage_argv(job, dir_ + "/sigterm", 1, n),
                         "http://127.0.0.1:" + std::to_string(stall_port) + "/pkg/", 1);
    *(std::find(argv.begin(), argv.end(), "--package-timeout") + 1) = "600";
    SpawnOptions o;
    o.argv = argv;
    o.log_file = dir_ + "/sigterm.out";
    o.capture_stderr = true;
    Process stage(o);
    std::string out;  // stderr, captured
    bool fetching = false;
    for (int i = 0; i < 200 && !fetching && !stage.eof(); ++i) {
      const auto line = stage.read_line(30s);
      out += line.value_or("") + "\n";
      fetching = line && line->find("\"fetching package\"") != std::string::npos;
    }
    ASSERT_TRUE(fetching) << out;
    const auto connected_by = std::chrono::steady_clock::now() + 30s;  // polled, bounded
    while (accepted() == before && std::chrono::steady_clock::now() < connected_by) std::this_thread::sleep_for(20ms);
    ASSERT_GT(accepted(), before) << read_file(dir_ + "/stall.log");
    const auto t0 = std::chrono::steady_clock::now();
    stage.signal(SIGTERM);
    const auto st = stage.wait_for(60s);
    for (int i = 0; i < 1000 && !stage.eof(); ++i) out += stage.read_line(5s).value_or("") + "\n";
    ASSERT_TRUE(st.has_value()) << "SIGTERM did not stop the fetch:\n" << out;
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_TRUE(st->exited && st->code == 1) << st->str() << "\n" << out;
    EXPECT_NE(out.find("package fetch of shard 1 stopped: GET http://127.0.0.1:" + std::to_string(stall_port) +
                       "/pkg/shard-1.sgpkg"),
              std::string::npos)
        << out;
    // Asked at least once a second during the transfer; the bound leaves room for a
    // loaded machine and is far below the 600 s a fetch that ignored the stop would take.
    EXPECT_LT(took, 20) << out;
  }
  // Nothing listening: connection refused, retried once, then unavailable.
  {
    const int closed = pick_free_port();
    auto [rc, out] = stage1("http://127.0.0.1:" + std::to_string(closed) + "/pkg/", 1, "refused");
    EXPECT_EQ(rc, model::kExitPackageUnavailable) << out;
    EXPECT_NE(out.find("(2 attempts)"), std::string::npos) << out;
  }
  stall->terminate(5s);
  server->terminate(5s);

  // Over https (openssl s_server -WWW, a certificate of a test CA for IP 127.0.0.1):
  // fetched when the CA is given, unavailable when the server's certificate does not
  // verify against the trust store in use (verification is never switched off).
  make_dirs(dir_ + "/tls");
  const CaBundle ca = create_ca("package test CA", std::chrono::hours(1));
  testsupport::LeafSpec spec;
  spec.san = "IP:127.0.0.1";
  spec.eku = "serverAuth";
  const Leaf leaf = testsupport::build_leaf_with_key(ca, spec);
  write_file_atomic(dir_ + "/tls/ca.crt", ca.cert_pem, 0644);
  write_file_atomic(dir_ + "/tls/server.crt", leaf.cert_pem, 0644);
  write_file_atomic(dir_ + "/tls/server.key", leaf.key_pem, 0600);
  const CaBundle other = create_ca("another CA", std::chrono::hours(1));
  write_file_atomic(dir_ + "/tls/other.crt", other.cert_pem, 0644);
  int tls_port = 0;
  auto tls = start_server(
      [&](int p) {
        // -WWW serves files relative to the working directory: run it from srv/.
        return std::vector<std::string>{"/bin/sh", "-c",
                                        "cd '" + dir_ + "/srv' && exec openssl s_server -quiet -WWW -accept 127.0.0.1:" +
                                            std::to_string(p) + " -cert '" + dir_ + "/tls/server.crt' -key '" + dir_ +
                                            "/tls/server.key'"};
      },
      dir_ + "/tls.log", &tls_port);
  ASSERT_TRUE(tls) << read_file(dir_ + "/tls.log");
  const std::string tls_base = "https://127.0.0.1:" + std::to_string(tls_port) + "/good/";
  {
    SpawnOptions o;
    o.argv = with_url(stage_argv(job, dir_ + "/tls-run", 1, n), tls_base, 1);
    o.argv.insert(o.argv.end(), {"--package-ca", dir_ + "/tls/ca.crt"});
    o.log_file = dir_ + "/tls-run.out";
    o.capture_stderr = true;
    stages_[1] = std::make_unique<Process>(o);
    // Fetched over https, opened, and ready (it then waits for its neighbours).
    std::vector<nlohmann::json> seen;
    EXPECT_TRUE(read_until(1, [](const nlohmann::json& l) { return l.value("msg", "") == "stage ready"; }, &seen))
        << read_file(dir_ + "/tls-run.out");
    EXPECT_TRUE(std::any_of(seen.begin(), seen.end(), [&](const nlohmann::json& l) {
      return l.value("msg", "") == "package fetched" && l.value("url", "") == tls_base + "shard-1.sgpkg";
    }));
    stages_[1]->terminate(10s);
  }
  {
    auto argv = with_url(stage_argv(job, dir_ + "/tls-bad", 1, n), tls_base, 1);
    argv.insert(argv.end(), {"--package-ca", dir_ + "/tls/other.crt"});
    auto [rc, out] = run_tool(argv, dir_ + "/tls-bad.out");
    EXPECT_EQ(rc, model::kExitPackageUnavailable) << out;
    EXPECT_NE(out.find("unavailable: GET " + tls_base + "shard-1.sgpkg: "), std::string::npos) << out;
    EXPECT_NE(out.find("certificate"), std::string::npos) << out;
    EXPECT_NE(out.find("(1 attempt)"), std::string::npos) << "a certificate that does not verify is not retried: "
                                                           << out;
  }
  tls->terminate(5s);
}

TEST_F(PackageProcessTest, PackagesFineTunedByShardProcessesRecombineToTheDistributedEvaluation) {
  const std::string python = python_with_torch();
  if (python.empty()) {
    GTEST_SKIP() << "no python3 with torch (Debian python3-torch, installed by make deps; or set SHARDGUARD_PYTHON)";
  }
  constexpr int n = 3;
  testing::write_small_tokens(dir_ + "/data", 2000, 400);
  auto j = testing::small_gpt_job_json(n, dir_ + "/data");
  j["spec"]["checkpoint"]["everySteps"] = 100;
  const std::string job = write_job(j);
  ASSERT_EQ(testsupport::make_small_lm(python, dir_ + "/lm.pt"), "");
  auto [split_rc, split_out] = run_tool({kBin + "/shardctl", "split", dir_ + "/lm.pt", "--job", job, "--out",
                                         dir_ + "/pkg", "--keys", dir_ + "/pkg-keys"},
                                        dir_ + "/split.out");
  ASSERT_EQ(split_rc, 0) << split_out;
  EXPECT_NE(split_out.find("into 3 shards"), std::string::npos) << split_out;

  // Stage 1 with shard 0's package key: refused at start, exit 3 (kExitPackageRefused),
  // the package named.
  ports_ = {pick_free_port(), pick_free_port(), pick_free_port()};
  auto argv = stage_argv(job, dir_ + "/bad", 1, n);
  argv.insert(argv.end(), {"--package", dir_ + "/pkg", "--package-key-file", dir_ + "/pkg-keys/shard-0.key"});
  auto [bad_rc, bad_out] = run_tool(argv, dir_ + "/bad.out");
  EXPECT_EQ(bad_rc, model::kExitPackageRefused) << bad_out;
  EXPECT_NE(bad_out.find("shard-1.sgpkg: refused: authentication failed"), std::string::npos) << bad_out;
  EXPECT_NE(bad_out.find("not shard 1's key"), std::string::npos) << bad_out;

  // Fine-tuning: each stage with its own package and key.
  for (int i = 0; i < n; ++i) {
    SpawnOptions o;
    o.argv = stage_argv(job, dir_ + "/run", i, n);
    o.argv.insert(o.argv.end(), {"--package", dir_ + "/pkg", "--package-key-file",
                                 dir_ + "/pkg-keys/shard-" + std::to_string(i) + ".key"});
    o.env = {{"OMP_NUM_THREADS", "1"}, {"OPENBLAS_NUM_THREADS", "1"}};
    o.log_file = dir_ + "/run/stage-" + std::to_string(i) + ".log";
    o.capture_stderr = true;
    stages_[i] = std::make_unique<Process>(o);
  }
  double eval_loss = -1;
  int64_t eval_step = -1;
  std::vector<nlohmann::json> lines;
  read_until(n - 1, [](const nlohmann::json&) { return false; }, &lines);
  for (const auto& l : lines) {
    if (l.value("msg", "") == "evaluation") {
      eval_loss = l.at("loss").get<double>();
      eval_step = l.at("step").get<int64_t>();
    }
  }
  for (int i = 0; i < n; ++i) {
    const auto st = stages_[i]->wait_for(120s);
    ASSERT_TRUE(st.has_value()) << "stage " << i;
    EXPECT_TRUE(st->exited && st->code == 0) << "stage " << i << ": " << st->str();
  }
  ASSERT_GT(eval_step, 0);

  // Every package, package key, checkpoint and checkpoint key: the fine-tuned model.
  // (stage_argv keeps the checkpoint keys beside the checkpoints' directory.)
  auto [rec_rc, rec_out] = run_tool({kBin + "/shardctl", "recombine", job, "--checkpoints", dir_ + "/run/checkpoints",
                                     "--keys", dir_ + "/run", "--package", dir_ + "/pkg", "--package-keys",
                                     dir_ + "/pkg-keys", "--out", dir_ + "/tuned.pt"},
                                    dir_ + "/recombine.out");
  ASSERT_EQ(rec_rc, 0) << rec_out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(rec_out, m, std::regex("at step (\\d+)"))) << rec_out;
  EXPECT_EQ(std::stoll(m[1]), eval_step) << rec_out;
  ASSERT_TRUE(std::regex_search(rec_out, m, std::regex("validation loss ([0-9.]+) nats/token"))) << rec_out;
  EXPECT_NEAR(std::stod(m[1]), eval_loss, 1e-4) << rec_out;
  EXPECT_TRUE(fs::exists(dir_ + "/tuned.pt"));
}

// Issue 18 item 3's last step and item 4 locally: a job with spec.model.package
// (architecture torchscript) is split into its package directory, `shardctl run`
// fine-tunes it through the sidecars with each shard given only its own package key
// (the stand-in for the operator copying key i of keysSecret into shard i's Secret),
// and `shardctl recombine` of the job gives the run's last evaluation back.
TEST_F(PackageProcessTest, ShardctlRunFineTunesAPackageJobThroughTheSidecarsAndRecombinesToItsEvaluation) {
  const std::string python = python_with_torch();
  if (python.empty()) {
    GTEST_SKIP() << "no python3 with torch (Debian python3-torch, installed by make deps; or set SHARDGUARD_PYTHON)";
  }
  constexpr int n = 3;
  testing::write_small_tokens(dir_ + "/data", 2000, 400);
  auto j = testing::small_gpt_job_json(n, dir_ + "/data", 256);
  j["metadata"]["name"] = "lm-tune";
  j["spec"]["model"] = {{"architecture", "torchscript"},
                        {"vocab", 256},
                        {"context", 16},
                        {"package", {{"path", dir_ + "/pkg"}, {"keysSecret", "lm-tune-package-keys"}}}};
  j["spec"]["checkpoint"]["everySteps"] = 100;
  const std::string job = write_job(j);
  ASSERT_EQ(testsupport::make_small_lm(python, dir_ + "/lm.pt"), "");

  // Before the split, nothing to run: the manifest is named.
  auto [early_rc, early_out] =
      run_tool({kBin + "/shardctl", "plan", job}, dir_ + "/plan-early.out");
  EXPECT_NE(early_rc, 0) << early_out;
  EXPECT_NE(early_out.find("spec.model.package.path"), std::string::npos) << early_out;

  // split writes where the job says (spec.model.package.path), keys beside it.
  auto [split_rc, split_out] =
      run_tool({kBin + "/shardctl", "split", dir_ + "/lm.pt", "--job", job}, dir_ + "/split.out");
  ASSERT_EQ(split_rc, 0) << split_out;
  ASSERT_TRUE(fs::exists(dir_ + "/pkg/manifest.json")) << split_out;
  ASSERT_TRUE(fs::exists(dir_ + "/pkg.keys/shard-2.key")) << split_out;

  // plan takes the manifest's cut.
  auto [plan_rc, plan_out] = run_tool({kBin + "/shardctl", "plan", job}, dir_ + "/plan.out");
  EXPECT_NE(plan_out.find("torchscript"), std::string::npos) << plan_out;
  const auto manifest = model::parse_manifest(read_file(dir_ + "/pkg/manifest.json"), "manifest");
  for (const auto& s : manifest.shards) {
    const std::string row = "shard " + std::to_string(s.index);
    const auto at = plan_out.find(row);
    ASSERT_NE(at, std::string::npos) << plan_out;
    EXPECT_NE(plan_out.find(std::to_string(s.parameters) + " params", at), std::string::npos) << plan_out;
  }

  const std::string work = dir_ + "/work";
  auto [run_rc, run_out] = run_tool({kBin + "/shardctl", "run", job, "--workdir", work, "--device", "cpu",
                                     "--threads", "1"},
                                    dir_ + "/run.out");
  ASSERT_EQ(run_rc, 0) << run_out;
  // Each shard's pod files hold its own package key and no other shard's.
  for (int i = 0; i < n; ++i) {
    const std::string own = work + "/shard-" + std::to_string(i);
    EXPECT_EQ(read_file(own + "/package.key"), read_file(dir_ + "/pkg.keys/shard-" + std::to_string(i) + ".key"));
    for (const auto& e : fs::directory_iterator(own)) {
      const std::string name = e.path().filename();
      if (!e.is_regular_file() || name == "package.key") continue;
      const std::string text = read_file(e.path().string());
      for (int k = 0; k < n; ++k) {
        EXPECT_EQ(text.find(read_file(dir_ + "/pkg.keys/shard-" + std::to_string(k) + ".key")), std::string::npos)
            << own << "/" << name << " holds package key " << k;
      }
    }
    EXPECT_EQ((fs::status(own + "/package.key").permissions() & fs::perms::group_all), fs::perms::none);
  }
  // Each shardd opened its own package with its own key.
  for (int i = 0; i < n; ++i) {
    const std::string log = read_file(work + "/logs/shard-" + std::to_string(i) + ".log");
    EXPECT_NE(log.find("\"stage ready\""), std::string::npos) << log;
  }
  std::smatch m;
  ASSERT_TRUE(std::regex_search(run_out, m, std::regex("validation loss ([0-9.]+) nats/token"))) << run_out;
  const double run_loss = std::stod(m[1]);
  ASSERT_TRUE(std::regex_search(run_out, m, std::regex("after (\\d+) steps"))) << run_out;
  const long long steps = std::stoll(m[1]);

  // The job names its packages and split's keys: recombine needs only the run's.
  auto [rec_rc, rec_out] = run_tool({kBin + "/shardctl", "recombine", job, "--checkpoints", work + "/checkpoints",
                                     "--keys", work + "/keys", "--out", dir_ + "/tuned.pt"},
                                    dir_ + "/recombine.out");
  ASSERT_EQ(rec_rc, 0) << rec_out;
  ASSERT_TRUE(std::regex_search(rec_out, m, std::regex("at step (\\d+)"))) << rec_out;
  EXPECT_EQ(std::stoll(m[1]), steps) << rec_out;
  ASSERT_TRUE(std::regex_search(rec_out, m, std::regex("validation loss ([0-9.]+) nats/token"))) << rec_out;
  EXPECT_NEAR(std::stod(m[1]), run_loss, 2e-4) << rec_out << run_out;
  EXPECT_TRUE(fs::exists(dir_ + "/tuned.pt"));

  // A tampered package: the shard's pod refuses it (exit 3, the package named), and
  // the run fails naming that shard.
  {
    std::string bytes = read_file(dir_ + "/pkg/shard-1.sgpkg");
    bytes[bytes.size() / 2] ^= 0x01;
    write_file_atomic(dir_ + "/pkg/shard-1.sgpkg", bytes, 0644);
  }
  auto [bad_rc, bad_out] = run_tool({kBin + "/shardctl", "run", job, "--workdir", dir_ + "/work2", "--device", "cpu",
                                     "--threads", "1"},
                                    dir_ + "/run2.out");
  EXPECT_NE(bad_rc, 0) << bad_out;
  EXPECT_NE(bad_out.find("shard 1"), std::string::npos) << bad_out;
  const std::string bad_log = read_file(dir_ + "/work2/logs/shard-1.log");
  EXPECT_NE(bad_log.find("shard-1.sgpkg"), std::string::npos) << bad_log;
  EXPECT_NE(bad_log.find("package refused"), std::string::npos) << bad_log;
}

// Issue 18 item 4 locally with a URL: `shardctl run` of a spec.model.package.url job
// renders each shard's shardd with the URL and its own Secret's files (package.key,
// manifest.json from the keys directory), and each shardd fetches its own package
// from a real HTTP server as in a pod.
TEST_F(PackageProcessTest, ShardctlRunFineTunesAUrlJobFetchingEachPackageOnce) {
  const std::string python = python_with_torch();
  if (python.empty()) {
    GTEST_SKIP() << "no python3 with torch (Debian python3-torch, installed by make deps; or set SHARDGUARD_PYTHON)";
  }
  constexpr int n = 3;
  testing::write_small_tokens(dir_ + "/data", 2000, 400);
  ASSERT_EQ(testsupport::make_small_lm(python, dir_ + "/lm.pt"), "");
  int port = 0;
  make_dirs(dir_ + "/srv");
  auto server = start_server(
      [&](int p) {
        return std::vector<std::string>{python, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                        dir_ + "/srv", std::to_string(p)};
      },
      dir_ + "/http.log", &port);
  ASSERT_TRUE(server) << read_file(dir_ + "/http.log");
  const std::string url = "http://127.0.0.1:" + std::to_string(port) + "/lm/v1/";
  auto j = testing::small_gpt_job_json(n, dir_ + "/data", 256);
  j["metadata"]["name"] = "lm-web";
  j["spec"]["model"] = {{"architecture", "torchscript"},
                        {"vocab", 256},
                        {"context", 16},
                        {"package", {{"url", url}, {"keysSecret", "lm-web-package-keys"}}}};
  const std::string job = write_job(j);
  // split needs --out for a url job (the files to upload); the keys directory gets
  // the manifest, and plan without it names the flag.
  auto [nout_rc, nout_out] = run_tool({kBin + "/shardctl", "split", dir_ + "/lm.pt", "--job", job}, dir_ + "/s0.out");
  EXPECT_EQ(nout_rc, 2) << nout_out;
  EXPECT_NE(nout_out.find("--out: required"), std::string::npos) << nout_out;
  auto [split_rc, split_out] = run_tool({kBin + "/shardctl", "split", dir_ + "/lm.pt", "--job", job, "--out",
                                         dir_ + "/srv/lm/v1", "--keys", dir_ + "/keys"},
                                        dir_ + "/split.out");
  ASSERT_EQ(split_rc, 0) << split_out;
  EXPECT_NE(split_out.find("upload the shard-<i>.sgpkg"), std::string::npos) << split_out;
  fs::remove(dir_ + "/srv/lm/v1/manifest.json");  // the server's copy is never read
  auto [plan0_rc, plan0_out] = run_tool({kBin + "/shardctl", "plan", job}, dir_ + "/plan0.out");
  EXPECT_EQ(plan0_rc, 2) << plan0_out;
  EXPECT_NE(plan0_out.find("--package-keys"), std::string::npos) << plan0_out;
  auto [plan_rc, plan_out] =
      run_tool({kBin + "/shardctl", "plan", job, "--package-keys", dir_ + "/keys"}, dir_ + "/plan.out");
  EXPECT_EQ(plan_rc, 0) << plan_out;

  const std::string work = dir_ + "/work";
  auto [run_rc, run_out] = run_tool({kBin + "/shardctl", "run", job, "--workdir", work, "--device", "cpu",
                                     "--threads", "1", "--package-keys", dir_ + "/keys"},
                                    dir_ + "/run.out");
  ASSERT_EQ(run_rc, 0) << run_out;
  EXPECT_NE(run_out.find("validation loss"), std::string::npos) << run_out;
  const std::string http_log = read_file(dir_ + "/http.log");
  for (int i = 0; i < n; ++i) {
    const std::string own = work + "/shard-" + std::to_string(i);
    EXPECT_EQ(read_file(own + "/package.key"), read_file(dir_ + "/keys/shard-" + std::to_string(i) + ".key"));
    EXPECT_EQ(read_file(own + "/manifest.json"), model::to_json(model::parse_manifest(
                                                                    read_file(dir_ + "/keys/manifest.json"), "m"))
                                                     .dump(2));
    const std::string log = read_file(work + "/logs/shard-" + std::to_string(i) + ".log");
    EXPECT_NE(log.find("\"package fetched\""), std::string::npos) << log;
    EXPECT_NE(log.find(url + "shard-" + std::to_string(i) + ".sgpkg"), std::string::npos) << log;
    const std::string req = "\"GET /lm/v1/shard-" + std::to_string(i) + ".sgpkg HTTP/1.1\" 200";
    EXPECT_NE(http_log.find(req), std::string::npos) << http_log;
  }
  EXPECT_EQ(http_log.find("manifest"), std::string::npos) << http_log;
  server->terminate(5s);
}

}  // namespace
}  // namespace shardguard
