// `shardctl generate` end to end (issue 18, item 5): a small gpt trained by `shardctl
// run`, then text generated through the pipeline — one shardd per stage behind its
// sidecar, each restoring only its own checkpoint — equals what the whole model
// recombined in one process (`shardctl recombine --prompt`) generates from the same
// checkpoints, greedily and sampled with the same seed; the same seed gives the same
// text, another seed other text; the same for a TorchScript model split into packages;
// jobs and flags it cannot serve are refused, naming them.
#include <gtest/gtest.h>

#include <algorithm>
#include <regex>
#include <set>
#include <sstream>

#include "integration/pipeline_fixture.h"
#include "shardd/test_job.h"
#include "support/python.h"

namespace shardguard {
namespace {

using ShardctlGenerateTest = PipelineFixture;

struct Ran {
  int code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// argv through /bin/sh so that stdout and stderr land in separate files.
Ran run_shardctl(const std::string& dir, const std::string& name, const std::vector<std::string>& args) {
  std::string cmd = "exec '" + kBin + "/shardctl'";
  for (const auto& a : args) cmd += " '" + a + "'";
  cmd += " > '" + dir + "/" + name + ".stdout' 2> '" + dir + "/" + name + ".stderr'";
  SpawnOptions o;
  o.argv = {"/bin/sh", "-c", cmd};
  o.env = {{"OMP_NUM_THREADS", "1"}, {"OPENBLAS_NUM_THREADS", "1"}};
  Process p(o);
  const auto st = p.wait_for(120s);
  Ran r;
  if (!st) return r;
  r.code = st->exited ? st->code : -1;
  r.out = read_file(dir + "/" + name + ".stdout");
  r.err = read_file(dir + "/" + name + ".stderr");
  return r;
}

std::vector<uint16_t> tokens_of(const std::string& path) { return read_token_file(path); }

TEST_F(ShardctlGenerateTest, PipelineGenerationEqualsTheRecombinedModelAndTheSeedDecides) {
  constexpr int n = 3;
  testing::write_small_tokens(dir_ + "/data");
  auto spec = testing::small_gpt_job_json(n, dir_ + "/data");
  spec["spec"]["training"]["optimizer"]["learningRate"] = 0.01;
  const std::string job = write_job(spec);
  const std::string work = dir_ + "/work";
  const std::vector<std::string> where{job, "--workdir", work, "--device", "cpu", "--threads", "1"};
  auto generate = [&](const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> args{"generate"};
    args.insert(args.end(), where.begin(), where.end());
    args.insert(args.end(), {"--prompt", "the ", "--out", dir_ + "/" + name + ".tokens"});
    args.insert(args.end(), extra.begin(), extra.end());
    return run_shardctl(dir_, name, args);
  };

  // Nothing to generate from before training.
  const Ran none = generate("untrained", {"--tokens", "8"});
  EXPECT_EQ(none.code, 2) << none.err;
  EXPECT_NE(none.err.find(work + "/checkpoints holds no checkpoints: train the job first"), std::string::npos)
      << none.err;

  std::vector<std::string> train{"run"};
  train.insert(train.end(), where.begin(), where.end());
  const Ran trained = run_shardctl(dir_, "run", train);
  ASSERT_EQ(trained.code, 0) << trained.out << trained.err;

  // Sampled through the pipeline: 40 tokens, the prompt and then their text on stdout.
  const Ran a = generate("a", {"--tokens", "40", "--seed", "1"});
  ASSERT_EQ(a.code, 0) << a.err;
  const auto ta = tokens_of(dir_ + "/a.tokens");
  ASSERT_EQ(ta.size(), 40u);
  std::string text;
  for (auto t : ta) {
    ASSERT_LT(t, 256);
    text += static_cast<char>(t);
  }
  if (text.find_first_of(std::string("\\\x7f") + std::string(1, '\0')) == std::string::npos &&
      std::all_of(text.begin(), text.end(), [](char c) { return c >= 0x20 || c == '\n' || c == '\t'; })) {
    EXPECT_EQ(a.out, "the " + text + "\n");
  }
  EXPECT_NE(a.err.find("40 tokens through 3 stages"), std::string::npos) << a.err;
  // Through the sidecars, whose policy refused nothing: each shardd's traffic went
  // through its sidecar only (its --prev/--next are the sidecar's outbound listener).
  EXPECT_NE(a.err.find("policy denials  0\n"), std::string::npos) << a.err;
  // Received bytes equal exactly; a last small message to a neighbour that had already
  // ended may be counted by shardd and never relayed (as in ShardctlRunTest).
  const std::regex traffic("shard (\\d) traffic sidecar sent (\\d+) received (\\d+); shardd sent (\\d+) received (\\d+)");
  int rows = 0;
  for (std::sregex_iterator it(a.err.begin(), a.err.end(), traffic), end; it != end; ++it) {
    ++rows;
    const double sidecar_sent = std::stod((*it)[2]), shardd_sent = std::stod((*it)[4]);
    EXPECT_GT(sidecar_sent, 1000);  // every stage sent frames, through its sidecar
    EXPECT_EQ((*it)[3].str(), (*it)[5].str());
    EXPECT_LE(sidecar_sent, shardd_sent);
    EXPECT_LE(shardd_sent - sidecar_sent, 256.0);
  }
  EXPECT_EQ(rows, n) << a.err;
  // Stage 0 generated them, from the newest checkpoint every stage held (step 16).
  const auto finished = [&] {
    std::vector<nlohmann::json> out;
    std::istringstream lines(read_file(work + "/logs/shard-0.log"));
    for (std::string line; std::getline(lines, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_object() && j.value("msg", "") == "generation finished") out.push_back(j);
    }
    return out;
  }();
  ASSERT_EQ(finished.size(), 1u);
  EXPECT_EQ(finished[0].value("tokens", 0), 40);
  EXPECT_EQ(finished[0].value("step", 0), 16);

  // The same seed: the same tokens; another seed: other tokens.
  const Ran again = generate("again", {"--tokens", "40", "--seed", "1"});
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_EQ(tokens_of(dir_ + "/again.tokens"), ta);
  const Ran other = generate("other", {"--tokens", "40", "--seed", "2"});
  ASSERT_EQ(other.code, 0) << other.err;
  EXPECT_NE(tokens_of(dir_ + "/other.tokens"), ta);

  // The whole model in one process, recombined from the same checkpoints and keys:
  // greedy and seeded sampling give exactly the pipeline's tokens.
  const Ran greedy = generate("greedy", {"--tokens", "40", "--temperature", "0"});
  ASSERT_EQ(greedy.code, 0) << greedy.err;
  const auto recombined = [&](const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> args{"recombine", job, "--checkpoints", work + "/checkpoints", "--keys", work + "/keys",
                                  "--device", "cpu", "--prompt", "the ", "--tokens", "40", "--tokens-out",
                                  dir_ + "/" + name + ".tokens"};
    args.insert(args.end(), extra.begin(), extra.end());
    const Ran r = run_shardctl(dir_, name, args);
    EXPECT_EQ(r.code, 0) << r.out << r.err;
    return tokens_of(dir_ + "/" + name + ".tokens");
  };
  const auto mono_greedy = recombined("mono-greedy", {"--temperature", "0"});
  EXPECT_EQ(tokens_of(dir_ + "/greedy.tokens"), mono_greedy);
  EXPECT_EQ(recombined("mono-sampled", {"--seed", "1"}), ta);
  // Not one token over and over: the comparison covers a window that slides past the
  // context (4 + 40 tokens, context 16) with varied tokens.
  EXPECT_GE(std::set<uint16_t>(mono_greedy.begin(), mono_greedy.end()).size(), 3u);

  // Flags out of range are refused before anything starts, naming the flag.
  const Ran zero = generate("zero", {"--tokens", "0"});
  EXPECT_EQ(zero.code, 2);
  EXPECT_NE(zero.err.find("--tokens 0 is out of range (1..100000)"), std::string::npos) << zero.err;
  const Ran topk = generate("topk", {"--tokens", "4", "--top-k", "300"});
  EXPECT_EQ(topk.code, 2);
  EXPECT_NE(topk.err.find("--top-k 300 is out of range"), std::string::npos) << topk.err;

  EXPECT_TRUE(processes_mentioning(work + "/").empty());
}

TEST_F(ShardctlGenerateTest, RefusesJobsThatAreNotLanguageModelsAndPromptsOutsideTheVocabulary) {
  const std::string mlp = write_job(job_json(2), "mlp.yaml");
  const Ran r = run_shardctl(dir_, "mlp", {"generate", mlp, "--workdir", dir_ + "/w", "--prompt", "x", "--tokens", "4"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("job it-mlp is not a language model (spec.model.architecture mlp)"), std::string::npos)
      << r.err;

  testing::write_small_tokens(dir_ + "/data", 2000, 400);
  auto spec = testing::small_gpt_job_json(2, dir_ + "/data");
  spec["spec"]["model"]["vocab"] = 128;
  const std::string job = write_job(spec, "gpt.yaml");
  const Ran v = run_shardctl(dir_, "vocab",
                             {"generate", job, "--workdir", dir_ + "/w", "--prompt", "caf\xc3\xa9", "--tokens", "4"});
  EXPECT_EQ(v.code, 2);
  EXPECT_NE(v.err.find("--prompt: byte 3 (0xc3) is outside the model's vocabulary of 128 tokens (spec.model.vocab)"),
            std::string::npos)
      << v.err;
}

// A TorchScript language model split into packages (`torchscript` on `format: tokens`):
// fine-tuned by `shardctl run`, each stage generating from its own package and
// checkpoint gives what the recombined TorchScript model gives in one process.
TEST_F(ShardctlGenerateTest, SplitTorchScriptModelGeneratesLikeItsRecombination) {
  const std::string python = testsupport::python_with_torch();
  if (python.empty()) {
    GTEST_SKIP() << "no python3 with torch (Debian python3-torch, installed by make deps; or set SHARDGUARD_PYTHON)";
  }
  constexpr int n = 3;
  testing::write_small_tokens(dir_ + "/data", 4000, 600);
  auto spec = testing::small_gpt_job_json(n, dir_ + "/data", 256);
  spec["spec"]["model"] = {{"architecture", "torchscript"}, {"vocab", 256}, {"context", 16},
                           {"package", {{"path", dir_ + "/pkg"}, {"keysSecret", "lm-keys"}}}};
  const std::string job = write_job(spec);
  ASSERT_EQ(testsupport::make_small_lm(python, dir_ + "/lm.pt"), "");
  const Ran split = run_shardctl(dir_, "split", {"split", dir_ + "/lm.pt", "--job", job});
  ASSERT_EQ(split.code, 0) << split.out << split.err;
  const std::string work = dir_ + "/work";
  const Ran trained = run_shardctl(dir_, "run", {"run", job, "--workdir", work, "--device", "cpu", "--threads", "1"});
  ASSERT_EQ(trained.code, 0) << trained.out << trained.err;
  const Ran gen = run_shardctl(dir_, "gen", {"generate", job, "--workdir", work, "--device", "cpu", "--threads", "1",
                                             "--prompt", "the ", "--tokens", "24", "--seed", "5", "--out",
                                             dir_ + "/gen.tokens"});
  ASSERT_EQ(gen.code, 0) << gen.err;
  const auto tokens = tokens_of(dir_ + "/gen.tokens");
  EXPECT_EQ(tokens.size(), 24u);
  const Ran mono = run_shardctl(dir_, "mono", {"recombine", job, "--checkpoints", work + "/checkpoints", "--keys",
                                               work + "/keys", "--prompt", "the ", "--tokens", "24", "--seed", "5",
                                               "--tokens-out", dir_ + "/mono.tokens"});
  ASSERT_EQ(mono.code, 0) << mono.out << mono.err;
  EXPECT_EQ(tokens_of(dir_ + "/mono.tokens"), tokens);
  EXPECT_TRUE(processes_mentioning(work + "/").empty());
}

}  // namespace
}  // namespace shardguard
