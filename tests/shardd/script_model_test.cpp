// shardctl split's core (shardd/script_model.h) on TorchScript models made by
// examples/models/make_model.py with Debian's python3-torch: each package holds
// only its shard and loads alone; tampered packages and wrong keys are refused;
// the models split cannot cut are refused naming the attribute.
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/torch.h>

#include "shardd/test_job.h"
#include "shardguard/shardd/engine.h"
#include "shardguard/shardd/memory_transport.h"
#include "shardguard/shardd/metrics.h"
#include "shardguard/shardd/threads.h"
#include "shardguard/shardd/trainer.h"
#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/shardd/script_model.h"
#include "support/python.h"
#include "support/temp_dir.h"

namespace shardguard::shardd {
namespace {

namespace fs = std::filesystem;

using testsupport::python_with_torch;

// The models of every variant, made once for the whole suite (importing torch in
// Python takes a second or two).
class ScriptModelTest : public ::testing::Test {
 protected:
  // The models are made once per version of the script and kept in the build tree
  // (build/test-models/<sha256 of the script>/), so that each ctest process (one per
  // test case) does not start Python again; made in a temporary directory and renamed
  // into place, so concurrent test processes never see half of them.
  static void SetUpTestSuite() {
    const std::string script = std::string(SHARDGUARD_SOURCE_DIR) + "/examples/models/make_model.py";
    const std::string cache = std::string(SHARDGUARD_BIN_DIR) + "/../test-models";
    models_ = cache + "/" + sha256_hex(read_file(script)).substr(0, 16);
    if (fs::exists(models_ + "/list.pt")) {
      made_ = true;
      return;
    }
    python_ = python_with_torch();
    if (python_.empty()) {
      no_python_ = true;
      return;
    }
    make_dirs(cache);
    testsupport::TempDir tmp("shardguard-models");
    const std::string log = tmp.str() + "/make_model.log";
    // Shaped like small_gpt_job_json: context 16, hidden 32, 2 layers, 2 heads, vocab 256.
    const std::string common = " --context 16 --hidden 32 --depth 2 --heads 2 --vocab 256";
    const std::string cmd = "'" + python_ + "' '" + script + "' --variant all --out '" + tmp.str() + "/models'" +
                            common + " > '" + log + "' 2>&1 && '" + python_ + "' '" + script +
                            "' --container modulelist --out '" + tmp.str() + "/models/list.pt'" + common +
                            " >> '" + log + "' 2>&1 && '" + python_ + "' '" + script +
                            "' --arch classifier --inputs 12 --classes 3 --hidden 16 --depth 3 --out '" + tmp.str() +
                            "/models/classifier.pt' >> '" + log + "' 2>&1";
    made_ = std::system(cmd.c_str()) == 0;
    if (!made_) {
      made_log_ = tail_of_file(log, 20);
      return;
    }
    std::error_code ec;
    fs::rename(tmp.str() + "/models", models_, ec);  // another process may have been first: theirs are the same
    made_ = fs::exists(models_ + "/list.pt");
    if (!made_) made_log_ = "cannot move the models to " + models_ + ": " + ec.message();
  }
  void SetUp() override {
    if (no_python_) {
      GTEST_SKIP() << "no python3 with torch (Debian python3-torch, installed by make deps; or set "
                      "SHARDGUARD_PYTHON): cannot make the TorchScript models";
    }
    ASSERT_TRUE(made_) << "examples/models/make_model.py failed:\n" << made_log_;
    testing::write_small_tokens(work_.str() + "/data", 2000, 400);
    job_ = job_from_json(testing::small_gpt_job_json(3, work_.str() + "/data"));
  }
  std::string model(const std::string& variant) const { return models_ + "/" + variant + ".pt"; }
  std::string out() const { return work_.str() + "/packages"; }
  std::string keys() const { return work_.str() + "/keys"; }
  std::string key(int shard) const { return load_key_file(keys() + "/" + model::package_key_file_name(shard)); }
  std::string checkpoints() const { return work_.str() + "/checkpoints"; }
  std::string checkpoint_keys() const { return work_.str() + "/checkpoint-keys"; }

  // Starts stage `stage` of `job` from its package in out(): "started", or why the
  // stage refused the package.
  std::string start_stage(const JobSpec& job, int stage) {
    prometheus::Registry registry;
    StageMetrics metrics(registry, job.name, stage);
    MemoryNetwork network(job.sharding.shards);
    MemoryTransport transport(network, stage, metrics, 1);
    StageOptions o;
    o.job = job;
    o.stage = stage;
    o.checkpoint_dir = checkpoints();
    o.key = random_bytes(kAesKeyBytes);
    o.device = "cpu";
    o.package_dir = out();
    o.package_key = key(stage);
    Engine engine(o, metrics, transport);
    try {
      engine.start();
    } catch (const model::PackageError& e) {
      return e.what();
    }
    return "started";
  }

  // Fine-tunes `job` from the packages split into out(): every stage an engine on the
  // in-memory transport that builds its blocks from its own package and key only,
  // checkpointing under a key of its own (checkpoint_keys()). The last stage's result;
  // a stage that failed, its error.
  StageResult fine_tune(const JobSpec& job, const model::PackageManifest& m) {
    set_compute_threads(1);
    const int n = static_cast<int>(m.shards.size());
    struct Node {
      std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
      std::unique_ptr<StageMetrics> metrics;
      std::unique_ptr<MemoryTransport> transport;
      std::unique_ptr<Engine> engine;
      StageResult result;
    };
    MemoryNetwork network(n);
    std::vector<std::unique_ptr<Node>> nodes;
    make_dirs(checkpoint_keys());
    for (int i = 0; i < n; ++i) {
      const std::string ck = checkpoint_keys() + "/shard-" + std::to_string(i) + ".key";
      generate_key_file(ck);
      StageOptions o;
      o.job = job;
      o.stage = i;
      o.checkpoint_dir = checkpoints();
      o.key = load_key_file(ck);
      o.device = "cpu";
      o.peer_timeout_s = 60;
      o.package_dir = out();
      o.package_key = key(i);
      auto node = std::make_unique<Node>();
      node->metrics = std::make_unique<StageMetrics>(*node->registry, job.name, i);
      node->transport = std::make_unique<MemoryTransport>(network, i, *node->metrics, 30);
      node->engine = std::make_unique<Engine>(o, *node->metrics, *node->transport);
      node->engine->start();
      EXPECT_EQ(node->engine->parameters(), m.shards[i].parameters);
      nodes.push_back(std::move(node));
    }
    std::vector<std::thread> threads;
    for (auto& node : nodes) threads.emplace_back([&node] { node->result = node->engine->run(); });
    for (auto& t : threads) t.join();
    for (const auto& node : nodes) {
      if (!node->result.ok) return node->result;
    }
    return nodes.back()->result;
  }

  // What split says about a model it refuses; nothing may be left behind.
  std::string refusal(const std::string& variant) {
    try {
      auto sm = load_script_model(model(variant), job_);
      split_model(sm, job_, out(), keys());
    } catch (const model::PackageError& e) {
      EXPECT_FALSE(fs::exists(out())) << variant;
      EXPECT_FALSE(fs::exists(keys())) << variant;
      return e.what();
    }
    ADD_FAILURE() << variant << " was split";
    return "";
  }

  static inline std::string python_;
  static inline bool no_python_ = false;
  static inline std::string models_;
  static inline bool made_ = false;
  static inline std::string made_log_;
  testsupport::TempDir work_{"shardguard-split"};
  JobSpec job_;
};

TEST_F(ScriptModelTest, EachPackageHoldsOnlyItsShardAndTheyChainToTheWholeModel) {
  auto sm = load_script_model(model("sequence"), job_);
  const auto m = split_model(sm, job_, out(), keys());
  ASSERT_EQ(m.attribute, "blocks");
  ASSERT_EQ(m.blocks.size(), 4u);
  EXPECT_EQ(m.blocks[0].in_dtype, "int64");
  EXPECT_EQ(m.blocks[0].in_shape, (std::vector<int64_t>{16}));
  EXPECT_EQ(m.blocks[1].in_shape, (std::vector<int64_t>{16, 32}));
  EXPECT_EQ(m.blocks[3].out_shape, (std::vector<int64_t>{16, 256}));
  ASSERT_EQ(m.shards.size(), 3u);

  // The manifest on disk is the one returned, and holds no weights: it is small.
  const auto on_disk = load_manifest(out());
  EXPECT_EQ(model::to_json(on_disk), model::to_json(m));
  EXPECT_LT(fs::file_size(out() + "/manifest.json"), 16u * 1024);

  auto whole = torch::jit::load(model("sequence"));
  whole.eval();
  torch::NoGradGuard no_grad;
  const auto input = example_input(job_, 3);
  auto x = input;
  int64_t total = 0;
  for (const auto& s : m.shards) {
    auto pkg = load_package(out(), on_disk, s.index, key(s.index));
    // Only this shard's blocks: every parameter is block<i>.… with i in the shard.
    int64_t count = 0;
    std::vector<std::string> names;
    for (const auto& p : pkg.named_parameters(true)) {
      count += p.value.numel();
      names.push_back(p.name);
      const int b = std::stoi(p.name.substr(5, p.name.find('.') - 5));
      EXPECT_GE(b, s.first_block) << p.name;
      EXPECT_LT(b, s.end_block) << p.name;
    }
    ASSERT_EQ(names.size(), s.params.size());
    for (size_t k = 0; k < names.size(); ++k) EXPECT_EQ(names[k], s.params[k].name);
    EXPECT_EQ(count, s.parameters) << "shard " << s.index;
    int64_t listed = 0;
    for (const auto& p : s.params) listed += p.numel;
    EXPECT_EQ(listed, s.parameters);
    total += count;
    pkg.eval();
    x = pkg.forward({x}).toTensor();
  }
  EXPECT_EQ(total, m.parameters());
  // Nor the code of other blocks or of the model itself: TorchScript archives store
  // their code uncompressed, so the class names of what is left out do not appear.
  auto archive = [&](int shard) {
    return model::open_package(read_file(out() + "/" + model::package_file_name(shard)), key(shard), m, shard, "p");
  };
  const std::string a0 = archive(0), a1 = archive(1), a2 = archive(2);
  EXPECT_NE(a0.find("TokenEmbed"), std::string::npos);
  EXPECT_EQ(a0.find("CausalLayer"), std::string::npos);
  EXPECT_EQ(a0.find("LmHead"), std::string::npos);
  EXPECT_NE(a1.find("CausalLayer"), std::string::npos);
  EXPECT_EQ(a1.find("TokenEmbed"), std::string::npos);
  EXPECT_EQ(a1.find("LmHead"), std::string::npos);
  EXPECT_NE(a2.find("LmHead"), std::string::npos);
  for (const auto* a : {&a0, &a1, &a2}) EXPECT_EQ(a->find("SequenceModel"), std::string::npos);
  int64_t whole_params = 0;
  for (const auto& p : whole.parameters()) whole_params += p.numel();
  EXPECT_EQ(total, whole_params);
  const auto expected = whole.forward({input}).toTensor();
  EXPECT_TRUE(torch::allclose(x, expected, 1e-5, 1e-6)) << "the packages chained differ from the model";

  // Keys: 32 bytes each, 0600, in a 0700 directory apart from the packages.
  struct stat st {};
  ASSERT_EQ(::stat(keys().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  for (const auto& s : m.shards) {
    const std::string k = keys() + "/" + model::package_key_file_name(s.index);
    ASSERT_EQ(::stat(k.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_FALSE(fs::exists(out() + "/" + model::package_key_file_name(s.index)));
  }
  EXPECT_NE(key(0), key(1));
  // The keys directory is what keysSecret holds: the keys and the same manifest.
  EXPECT_EQ(read_file(keys() + "/manifest.json"), read_file(out() + "/manifest.json"));
  // Nothing but the manifest and the packages in the package directory, no temp dirs beside.
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(out())) {
    ++files;
    EXPECT_TRUE(e.path().filename() == "manifest.json" || e.path().extension() == ".sgpkg") << e.path();
  }
  EXPECT_EQ(files, 4u);
  for (const auto& e : fs::directory_iterator(work_.str())) {
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();
  }
}

TEST_F(ScriptModelTest, AModuleListIsASequenceToo) {
  auto sm = load_script_model(model("list"), job_);
  // Directories given with a trailing separator are the same directories.
  const auto m = split_model(sm, job_, out() + "/", keys() + "/");
  EXPECT_TRUE(fs::exists(out() + "/manifest.json"));
  EXPECT_EQ(m.blocks.size(), 4u);
  auto pkg = load_package(out(), m, 2, key(2));
  EXPECT_EQ(package_params(pkg), m.shards[2].params);
}

TEST_F(ScriptModelTest, TamperedPackageWrongKeyAndAnotherShardsPackageAreRefused) {
  auto sm = load_script_model(model("sequence"), job_);
  auto m = split_model(sm, job_, out(), keys());
  const std::string p0 = out() + "/" + model::package_file_name(0);
  const std::string original = read_file(p0);

  // A wrong key: shard 1's key for shard 0's package.
  try {
    load_package(out(), m, 0, key(1));
    FAIL() << "loaded with another shard's key";
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("authentication failed"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not shard 0's key"), std::string::npos) << e.what();
  }

  // One byte changed: the digest in the manifest no longer matches.
  std::string tampered = original;
  tampered[tampered.size() / 2] ^= 0x01;
  write_file_atomic(p0, tampered);
  try {
    load_package(out(), m, 0, key(0));
    FAIL() << "a tampered package was loaded";
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("SHA-256"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(p0), std::string::npos) << e.what();
  }
  // Even with a manifest that agrees with the tampered file, AES-GCM refuses it.
  auto forged = m;
  forged.shards[0].sha256 = sha256_hex(tampered);
  try {
    load_package(out(), forged, 0, key(0));
    FAIL() << "a tampered package was loaded under a forged manifest";
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("authentication failed"), std::string::npos) << e.what();
  }
  // Shard 1's package in shard 0's place (and a manifest that agrees): its header says so.
  const std::string p1 = read_file(out() + "/" + model::package_file_name(1));
  write_file_atomic(p0, p1);
  forged.shards[0].sha256 = sha256_hex(p1);
  try {
    load_package(out(), forged, 0, key(1));
    FAIL() << "shard 1's package was loaded as shard 0";
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("is shard 1 of 3"), std::string::npos) << e.what();
  }
  // A missing package names the file.
  fs::remove(p0);
  try {
    load_package(out(), m, 0, key(0));
    FAIL() << "a missing package was loaded";
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("shard-0.sgpkg"), std::string::npos) << e.what();
  }
  // The untouched packages still load.
  EXPECT_NO_THROW(load_package(out(), m, 2, key(2)));
}

TEST_F(ScriptModelTest, ModelsSplitCannotCutAreRefusedNamingTheAttribute) {
  const std::string dict = refusal("dict");
  EXPECT_NE(dict.find("blocks (__torch__.torch.nn.modules.container.ModuleDict)"), std::string::npos) << dict;
  EXPECT_NE(dict.find("no submodule is an nn.Sequential or nn.ModuleList"), std::string::npos) << dict;

  const std::string nochain = refusal("nochain");
  EXPECT_NE(nochain.find("the shapes of the blocks attribute \"blocks\" do not chain: blocks.2"), std::string::npos)
      << nochain;
  EXPECT_NE(nochain.find("the output of blocks.1"), std::string::npos) << nochain;
  EXPECT_NE(nochain.find("[16, 32]"), std::string::npos) << nochain;

  const std::string outside = refusal("outside");
  EXPECT_NE(outside.find("parameter \"temperature\" [1]"), std::string::npos) << outside;
  EXPECT_NE(outside.find("outside the blocks attribute \"blocks\""), std::string::npos) << outside;

  const std::string tied = refusal("tied");
  EXPECT_NE(tied.find("tied weights"), std::string::npos) << tied;
  EXPECT_NE(tied.find("blocks.3.table"), std::string::npos) << tied;
  EXPECT_NE(tied.find("blocks.0.tokens"), std::string::npos) << tied;
}

TEST_F(ScriptModelTest, ADatasetTheModelDoesNotFitAndBadDirectoriesAreRefused) {
  // The model reads 16 tokens; a job with context 8 wants [8, 256] logits.
  auto j = testing::small_gpt_job_json(3, work_.str() + "/data");
  j["spec"]["model"]["context"] = 32;
  const JobSpec wider = job_from_json(j);
  try {
    load_script_model(model("sequence"), wider);
    FAIL() << "a model of context 16 was accepted for context 32";
  } catch (const model::PackageError& e) {
    // The 16 learned positions cannot cover 32 tokens: the first block refuses the input.
    EXPECT_NE(std::string(e.what()).find("blocks.0"), std::string::npos) << e.what();
  }
  auto sm = load_script_model(model("sequence"), job_);
  // More shards than blocks: the partitioner's error, naming the attribute.
  auto many = job_;
  many.sharding.shards = 5;
  try {
    split_model(sm, many, out(), keys());
    FAIL();
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("spec.sharding.shards: 5 shards"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("\"blocks\""), std::string::npos) << e.what();
  }
  // Keys inside the package directory: refused before anything is written.
  try {
    split_model(sm, job_, out(), out() + "/keys");
    FAIL();
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("must be separate directories"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out()));
  // An output directory that is not empty.
  make_dirs(out());
  write_file_atomic(out() + "/other", "x");
  try {
    split_model(sm, job_, out(), keys());
    FAIL();
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("--out: " + out() + " is not empty"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(keys()));
  // An empty one is fine (it is replaced).
  fs::remove(out() + "/other");
  EXPECT_NO_THROW(split_model(sm, job_, out(), keys()));
  EXPECT_TRUE(fs::exists(out() + "/manifest.json"));
}

// Fine-tuning from the packages: every stage an engine on the in-memory transport
// that builds its blocks from its own package and key only; then recombination from
// every package, checkpoint and key gives a TorchScript model whose validation loss
// is the pipeline's last evaluation.
TEST_F(ScriptModelTest, FineTunedFromPackagesAndRecombinedToTheDistributedEvaluation) {
  auto sm = load_script_model(model("sequence"), job_);
  const auto m = split_model(sm, job_, out(), keys());
  const StageResult last = fine_tune(job_, m);
  ASSERT_TRUE(last.ok) << last.error;
  ASSERT_EQ(last.steps, 3);  // the one epoch: 3 steps of 32 windows
  ASSERT_TRUE(last.last_eval.has_value());
  ASSERT_GT(last.last_eval->total, 0);

  auto r = recombine_packages(job_, out(), keys(), checkpoints(), checkpoint_keys());
  EXPECT_EQ(r.step, 3);
  const auto ev = evaluate(r.view, job_, Split::kTest, torch::kCPU);
  EXPECT_EQ(ev.total, last.last_eval->total);
  EXPECT_EQ(ev.correct, last.last_eval->correct);
  EXPECT_NEAR(ev.loss(), last.last_eval->loss(), 1e-5 * std::max(1.0, ev.loss()));

  // The recombined model was fine-tuned: its weights are no longer the split model's,
  // and its validation loss differs from the model's before fine-tuning.
  auto original = torch::jit::load(model("sequence"));
  auto before = package_stage(stage_module([&] {
    std::vector<torch::jit::Module> b;
    for (const auto& c : original.attr("blocks").toModule().named_children()) b.push_back(c.value);
    return b;
  }(), 0, 4), 0, 4);
  const auto ev0 = evaluate(before, job_, Split::kTest, torch::kCPU);
  EXPECT_NE(ev0.loss_sum, ev.loss_sum);
  // It saves and loads as an ordinary TorchScript model with the same output.
  std::ostringstream saved;
  r.module.save(saved);
  std::istringstream in(saved.str());
  auto reloaded = torch::jit::load(in);
  reloaded.eval();
  r.view->eval();
  torch::NoGradGuard no_grad;
  const auto x = example_input(job_, 2);
  EXPECT_TRUE(torch::allclose(reloaded.forward({x}).toTensor(), r.view->forward(x), 1e-5, 1e-6));
}

// A stage refuses, at start, a package that is not this job's: another cut, or a
// model whose input and output do not fit the job's data.
TEST_F(ScriptModelTest, AStageRefusesAPackageThatDoesNotFitItsJob) {
  auto sm = load_script_model(model("sequence"), job_);
  split_model(sm, job_, out(), keys());
  auto start = [&](const JobSpec& job) { return start_stage(job, 1); };
  auto two = job_;
  two.sharding.shards = 2;
  EXPECT_NE(start(two).find("holds a model cut into 3 shards, but spec.sharding.shards is 2"), std::string::npos);
  auto j = testing::small_gpt_job_json(3, work_.str() + "/data");
  j["spec"]["model"]["context"] = 32;
  // Stage 0 checks what the data feeds the first block, the last stage what the loss
  // needs; a stage between them reads no data and checks neither.
  const JobSpec wide = job_from_json(j);
  const std::string input = start_stage(wide, 0);
  EXPECT_NE(input.find("maps [16] to [16, 256] per sample, but spec.dataset.format tokens with this job's "
                       "spec.model gives [32]"),
            std::string::npos)
      << input;
  const std::string output = start_stage(wide, 2);
  EXPECT_NE(output.find("spec.model needs [spec.model.context, spec.model.vocab] = [32, 256]"), std::string::npos)
      << output;
  EXPECT_EQ(start_stage(wide, 1), "started");
  EXPECT_EQ(start(job_), "started");
}

// A classifier of any input shape on .npy files (spec.dataset.format tensors): split
// runs train-inputs.npy's per-sample shape through the blocks, each stage checks its
// package against the data when it starts, and the fine-tuned model recombines to the
// pipeline's evaluation. Data of a shape the model does not take is refused by both.
TEST_F(ScriptModelTest, AClassifierOnTensorFilesIsSplitFineTunedAndRecombined) {
  const std::string data = work_.str() + "/tabular";
  make_dirs(data);
  // The class of a sample is which of three interleaved feature sums is largest.
  auto write = [&](const std::string& split, int64_t n, int64_t features) {
    std::vector<float> x(static_cast<size_t>(n * features));
    std::vector<int64_t> y(static_cast<size_t>(n));
    uint64_t state = 12345 + static_cast<uint64_t>(n);
    for (auto& v : x) {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      v = static_cast<float>((state >> 40) % 1000) / 1000.0f - 0.5f;
    }
    for (int64_t i = 0; i < n; ++i) {
      float sums[3] = {0, 0, 0};
      for (int64_t f = 0; f < features; ++f) sums[f % 3] += x[static_cast<size_t>(i * features + f)];
      y[static_cast<size_t>(i)] = std::max_element(sums, sums + 3) - sums;
    }
    const std::string rows = "(" + std::to_string(n);
    testing::write_npy(data + "/" + split + "-inputs.npy", "<f4", rows + ", " + std::to_string(features) + ")",
                       testing::bytes_of(x));
    testing::write_npy(data + "/" + split + "-labels.npy", "<i8", rows + ",)", testing::bytes_of(y));
  };
  write("train", 128, 12);
  write("test", 40, 12);
  auto j = testing::small_job_json("mlp", 2);
  j["spec"]["dataset"] = {{"name", "tabular"}, {"format", "tensors"}, {"path", data}};
  const JobSpec job = job_from_json(j);

  auto sm = load_script_model(model("classifier"), job);
  ASSERT_EQ(sm.manifest.blocks.size(), 4u);
  EXPECT_EQ(sm.manifest.blocks.front().in_shape, std::vector<int64_t>{12});
  EXPECT_EQ(sm.manifest.blocks.back().out_shape, std::vector<int64_t>{3});
  const auto m = split_model(sm, job, out(), keys());
  const StageResult last = fine_tune(job, m);
  ASSERT_TRUE(last.ok) << last.error;
  EXPECT_EQ(last.steps, 4);  // 128 samples, batches of 32
  ASSERT_TRUE(last.last_eval.has_value());
  EXPECT_EQ(last.last_eval->total, 40);
  auto r = recombine_packages(job, out(), keys(), checkpoints(), checkpoint_keys());
  EXPECT_EQ(r.step, 4);
  const model::ModelDesc desc = r.manifest.desc();
  const auto ev = evaluate(r.view, job, Split::kTest, torch::kCPU, &desc);
  EXPECT_EQ(ev.total, 40);
  EXPECT_EQ(ev.correct, last.last_eval->correct);
  EXPECT_NEAR(ev.loss(), last.last_eval->loss(), 1e-5 * std::max(1.0, ev.loss()));

  // 13 features a sample: split cannot run them through the blocks, and a stage of
  // the packages made for 12 refuses to start on them.
  write("train", 128, 13);
  try {
    load_script_model(model("classifier"), job);
    FAIL() << "a model of 12 inputs was split for data of 13";
  } catch (const model::PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("blocks.0"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[13] per sample"), std::string::npos) << e.what();
  }
  const std::string refused = start_stage(job, 0);
  EXPECT_NE(refused.find("maps [12] to [3] per sample, but spec.dataset.format tensors with this job's spec.model "
                         "gives [13]"),
            std::string::npos)
      << refused;
  write("train", 128, 12);
  EXPECT_EQ(start_stage(job, 0), "started");
}

}  // namespace
}  // namespace shardguard::shardd
