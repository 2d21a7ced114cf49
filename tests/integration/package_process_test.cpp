// A TorchScript model through the binaries: `shardctl split` cuts it into packages,
// three `shardd` processes fine-tune it, each opening only its own package with its
// own key, and `shardctl recombine --package` gives back a model whose validation loss
// is the last distributed evaluation. A stage given another shard's key does not start.
#include <gtest/gtest.h>

#include <cstdlib>
#include <regex>

#include "integration/pipeline_fixture.h"
#include "shardguard/model/package.h"
#include "shardd/test_job.h"

namespace shardguard {
namespace {

using PackageProcessTest = PipelineFixture;

// A python3 that can `import torch` (as in tests/shardd/script_model_test.cpp).
std::string python_with_torch() {
  std::vector<std::string> candidates;
  if (const char* p = std::getenv("SHARDGUARD_PYTHON")) candidates.push_back(p);
  candidates.push_back("/usr/bin/python3");
  candidates.push_back("python3");
  for (const auto& c : candidates) {
    if (std::system(("'" + c + "' -c 'import torch' >/dev/null 2>&1").c_str()) == 0) return c;
  }
  return "";
}

std::pair<int, std::string> run_tool(const std::vector<std::string>& argv, const std::string& log) {
  SpawnOptions o;
  o.argv = argv;
  o.log_file = log;
  Process p(o);
  const auto st = p.wait_for(120s);
  if (!st) return {-1, "did not exit: " + argv[0]};
  return {st->exited ? st->code : -1, read_file(log)};
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
  const std::string script = std::string(SHARDGUARD_SOURCE_DIR) + "/examples/models/make_model.py";
  ASSERT_EQ(std::system(("'" + python + "' '" + script + "' --out '" + dir_ + "/lm.pt' --context 16 --hidden 32 " +
                         "--depth 2 --heads 2 > '" + dir_ + "/make.log' 2>&1")
                            .c_str()),
            0)
      << read_file(dir_ + "/make.log");
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

}  // namespace
}  // namespace shardguard
