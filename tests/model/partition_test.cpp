#include <gtest/gtest.h>

#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardd/test_job.h"

namespace shardguard::model {
namespace {

ModelSpec spec(const std::string& arch) {
  ModelSpec s;
  s.architecture = arch;
  s.hidden = 64;
  s.depth = 3;
  s.channels = 32;
  s.heads = 4;
  s.patch_size = 7;
  return s;
}

TEST(ModelDescTest, BlockShapesChain) {
  for (const char* arch : {"mlp", "cnn", "vit"}) {
    const auto m = describe_model(spec(arch));
    ASSERT_GE(m.blocks.size(), 4u) << arch;
    for (size_t i = 1; i < m.blocks.size(); ++i) {
      EXPECT_EQ(m.blocks[i - 1].out_shape, m.blocks[i].in_shape) << arch << " block " << i;
    }
    EXPECT_EQ(m.blocks.back().out_shape, std::vector<int64_t>{kNumClasses});
  }
}

TEST(ModelDescTest, CnnParameterCountsByHand) {
  const auto m = describe_model(spec("cnn"));
  ASSERT_EQ(m.blocks.size(), 5u);
  EXPECT_EQ(m.blocks[0].parameters, 1 * 32 * 9 + 32);
  EXPECT_EQ(m.blocks[1].parameters, 32 * 64 * 9 + 64);
  EXPECT_EQ(m.blocks[2].parameters, 64 * 128 * 9 + 128);
  EXPECT_EQ(m.blocks[3].parameters, 128 * 3 * 3 * 64 + 64);
  EXPECT_EQ(m.blocks[4].parameters, 64 * 10 + 10);
}

// gpt: embed, `depth` layers, head; tokens [context] in, logits [context, vocab] out,
// [context, hidden] between blocks. Counts by hand for hidden 64, 3 layers, context 32.
TEST(ModelDescTest, GptBlocksShapesParametersAndFlopsByHand) {
  ModelSpec s = spec("gpt");
  s.context = 32;
  s.vocab = 256;
  const auto m = describe_model(s);
  ASSERT_EQ(m.blocks.size(), 5u);
  EXPECT_EQ(m.blocks[0].name, "embed");
  EXPECT_EQ(m.blocks[1].name, "layer1");
  EXPECT_EQ(m.blocks[3].name, "layer3");
  EXPECT_EQ(m.blocks[4].name, "head");
  EXPECT_EQ(m.blocks[0].in_shape, std::vector<int64_t>{32});
  for (size_t i = 0; i + 1 < m.blocks.size(); ++i) {
    EXPECT_EQ(m.blocks[i].out_shape, (std::vector<int64_t>{32, 64})) << i;
    EXPECT_EQ(m.blocks[i].out_shape, m.blocks[i + 1].in_shape) << i;
  }
  EXPECT_EQ(m.blocks[4].out_shape, (std::vector<int64_t>{32, 256}));
  EXPECT_EQ(m.blocks[0].parameters, 256 * 64 + 32 * 64);  // token table + positions
  // two layer norms, qkv, proj, fc1 (4× wide), fc2
  const int64_t layer = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64);
  EXPECT_EQ(layer, 12 * 64 * 64 + 13 * 64);
  for (int i = 1; i <= 3; ++i) EXPECT_EQ(m.blocks[i].parameters, layer);
  EXPECT_EQ(m.blocks[4].parameters, 2 * 64 + 64 * 256 + 256);
  EXPECT_EQ(m.parameters(), 256 * 64 + 32 * 64 + 3 * layer + 2 * 64 + 64 * 256 + 256);
  // FLOPs per sequence: 24·t·h² for the layer's linears, 4·t²·h for scores and mixing.
  EXPECT_EQ(m.blocks[1].flops, 24LL * 32 * 64 * 64 + 4LL * 32 * 32 * 64);
  EXPECT_EQ(m.blocks[4].flops, 2LL * 32 * 64 * 256);
  // Four shards by parameters: the embedding and the head can be stages of their own.
  const auto stages = partition(m, 4, "parameters");
  ASSERT_EQ(stages.size(), 4u);
  EXPECT_EQ(stages.front().first_block, 0);
  EXPECT_EQ(stages.back().end_block, 5);
}

TEST(ModelDescTest, UnknownArchitectureNamesField) {
  try {
    describe_model(spec("resnet"));
    FAIL();
  } catch (const JobSpecError& e) {
    EXPECT_NE(std::string(e.what()).find("spec.model.architecture"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("resnet"), std::string::npos);
  }
}

TEST(PartitionTest, StagesAreContiguousAndCoverTheModel) {
  for (const char* arch : {"mlp", "cnn", "vit", "gpt"}) {
    const auto m = describe_model(spec(arch));
    for (int n = 1; n <= static_cast<int>(m.blocks.size()); ++n) {
      for (const char* balance : {"parameters", "compute"}) {
        const auto stages = partition(m, n, balance);
        ASSERT_EQ(static_cast<int>(stages.size()), n);
        int64_t params = 0, flops = 0;
        int next = 0;
        for (const auto& s : stages) {
          EXPECT_EQ(s.first_block, next);
          EXPECT_GT(s.end_block, s.first_block);
          next = s.end_block;
          params += s.parameters;
          flops += s.flops;
        }
        EXPECT_EQ(next, static_cast<int>(m.blocks.size()));
        EXPECT_EQ(params, m.parameters());
        EXPECT_EQ(flops, m.flops());
      }
    }
  }
}

TEST(PartitionTest, MinimisesTheLargestStage) {
  ModelDesc m;
  m.architecture = "toy";
  for (int64_t p : {5, 1, 1, 1, 5, 1}) {
    model::BlockDesc b;
    b.index = static_cast<int>(m.blocks.size());
    b.parameters = p;
    b.flops = 10 - p;
    m.blocks.push_back(b);
  }
  const auto by_params = partition(m, 3, "parameters");
  EXPECT_EQ(by_params[0].end_block, 1);  // [5] [1 1 1] [5 1]
  EXPECT_EQ(by_params[1].end_block, 4);
  int64_t worst = 0;
  for (const auto& s : by_params) worst = std::max(worst, s.parameters);
  EXPECT_EQ(worst, 6);
  const auto by_compute = partition(m, 3, "compute");
  int64_t worst_flops = 0;
  for (const auto& s : by_compute) worst_flops = std::max(worst_flops, s.flops);
  EXPECT_EQ(worst_flops, 18);  // flops 5 9 9 9 5 9 → [5 9] [9] ... best max is 18 (e.g. [5 9][9 9][5 9])
}

TEST(PartitionTest, Deterministic) {
  const auto m = describe_model(spec("vit"));
  const auto a = partition(m, 3, "compute");
  const auto b = partition(m, 3, "compute");
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first_block, b[i].first_block);
    EXPECT_EQ(a[i].end_block, b[i].end_block);
  }
}

TEST(PartitionTest, TooManyShardsIsAClearError) {
  const auto m = describe_model(spec("cnn"));
  try {
    partition(m, 6, "parameters");
    FAIL();
  } catch (const PartitionError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("spec.sharding.shards"), std::string::npos) << msg;
    EXPECT_NE(msg.find("6 shards"), std::string::npos) << msg;
    EXPECT_NE(msg.find("5 blocks"), std::string::npos) << msg;
  }
  EXPECT_THROW(partition(m, 0, "parameters"), PartitionError);
  EXPECT_THROW(partition(m, 2, "memory"), PartitionError);
}

}  // namespace
}  // namespace shardguard::model

namespace shardguard::model {
namespace {

// Every example must be admissible: its largest shard within its own maxExposure
// (the operator refuses a job whose largest stage alone exceeds it).
TEST(PartitionTest, EveryExampleFitsItsMaxExposure) {
  for (const char* name : {"fashion-mnist-mlp.yaml", "fashion-mnist-cnn.yaml", "fashion-mnist-vit.yaml"}) {
    const JobSpec job = load_job_file(std::string(SHARDGUARD_SOURCE_DIR) + "/examples/" + name);
    const auto desc = describe_model(job.model);
    for (const auto& s : partition(desc, job.sharding.shards, job.sharding.balance)) {
      EXPECT_LE(parameter_share(desc, s), job.protection.max_exposure) << name << " shard " << s.index;
    }
  }
}

}  // namespace
}  // namespace shardguard::model
