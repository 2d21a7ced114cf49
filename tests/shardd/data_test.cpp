// The dataset loader refuses damaged IDX files with the file named (issue 16 item
// 12): image and label counts that disagree, a header count no file of that size can
// hold (no multi-terabyte allocation), labels out of range.
#include "shardguard/shardd/data.h"

#include <zlib.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "shardguard/common/files.h"
#include "shardguard/common/token_file.h"
#include "shardguard/shardd/trainer.h"
#include "shardd/test_job.h"
#include "support/temp_dir.h"

namespace shardguard::shardd {
namespace {

using shardguard::testing::bytes_of;
using shardguard::testing::write_npy;

void put32(std::string& out, uint32_t v) {
  for (int shift : {24, 16, 8, 0}) out.push_back(static_cast<char>((v >> shift) & 0xFF));
}

// An IDX file of unsigned bytes: magic, the dimensions, then the bytes.
void write_idx(const std::string& path, const std::vector<uint32_t>& dims, const std::string& data) {
  std::string out{'\0', '\0', '\x08', static_cast<char>(dims.size())};
  for (uint32_t d : dims) put32(out, d);
  out += data;
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(gzwrite(f, out.data(), static_cast<unsigned>(out.size())), static_cast<int>(out.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

// The DatasetError message f throws ("" when it throws none).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const DatasetError& e) {
    return e.what();
  }
  return "";
}

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override { spec_.path = dir_; }

  std::string images() const { return dir_ + "/train-images-idx3-ubyte.gz"; }
  std::string labels() const { return dir_ + "/train-labels-idx1-ubyte.gz"; }
  void write_split(uint32_t n_images, uint32_t n_labels, const std::string& label_bytes) {
    write_idx(images(), {n_images, 28, 28}, std::string(static_cast<size_t>(n_images) * 28 * 28, '\x20'));
    write_idx(labels(), {n_labels}, label_bytes);
  }

  const testsupport::TempDir tmp_{"shardguard-data"};
  const std::string dir_ = tmp_.str();
  DatasetSpec spec_;
};

TEST_F(DatasetTest, AGoodSplitLoads) {
  write_split(4, 4, std::string("\x00\x09\x03\x01", 4));
  EXPECT_EQ(count_samples(spec_, Split::kTrain), 4);
  EXPECT_EQ(load_images(spec_, Split::kTrain).sizes(), (std::vector<int64_t>{4, 1, 28, 28}));
  const auto l = load_labels(spec_, Split::kTrain);
  EXPECT_EQ(l[1].item<int64_t>(), 9);
}

TEST_F(DatasetTest, ImageAndLabelCountsThatDisagreeAreRefused) {
  write_split(5, 4, std::string(4, '\x01'));
  for (const auto& load : std::vector<std::function<void()>>{[&] { load_images(spec_, Split::kTrain); },
                                                             [&] { load_labels(spec_, Split::kTrain); },
                                                             [&] { count_samples(spec_, Split::kTrain); }}) {
    const std::string e = error_of(load);
    EXPECT_NE(e.find(images() + " holds 5 images but " + labels() + " holds 4 labels"), std::string::npos) << e;
  }
}

// A header count of 0xFFFFFFFF in a file of a few hundred bytes: refused from the
// file's size before anything is allocated (no std::bad_alloc, no terabytes).
TEST_F(DatasetTest, AHeaderCountTheFileCannotHoldIsRefused) {
  write_idx(images(), {0xFFFFFFFFu, 28, 28}, std::string(28 * 28, '\x20'));
  write_idx(labels(), {0xFFFFFFFFu}, std::string(1, '\x01'));
  const std::string e = error_of([&] { load_images(spec_, Split::kTrain); });
  EXPECT_NE(e.find(images() + " claims 4294967295 items in its header"), std::string::npos) << e;
  EXPECT_NE(e.find("the file is damaged"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { load_labels(spec_, Split::kTrain); }).find("claims 4294967295 items"), std::string::npos);
}

TEST_F(DatasetTest, ALabelOutOfRangeIsNamedWithItsPosition) {
  write_split(4, 4, std::string("\x01\x02\x03\x0c", 4));
  const std::string e = error_of([&] { load_labels(spec_, Split::kTrain); });
  EXPECT_NE(e.find(labels() + " holds label 12 at item 3, outside 0..9"), std::string::npos) << e;
}

TEST_F(DatasetTest, ATruncatedFileIsRefused) {
  write_idx(images(), {4, 28, 28}, std::string(28 * 28 * 2, '\x20'));  // half the pixels
  write_idx(labels(), {4}, std::string(4, '\x01'));
  const std::string e = error_of([&] { load_images(spec_, Split::kTrain); });
  EXPECT_NE(e.find(images() + " is truncated"), std::string::npos) << e;
}

// ---- token files (spec.dataset.format: tokens) ----------------------------------

class TokenDataTest : public ::testing::Test {
 protected:
  JobSpec job(int context = 4, int vocab = 256, int64_t max_train = 0) {
    auto j = shardguard::testing::small_gpt_job_json(1, dir_, 1);
    j["spec"]["model"]["context"] = context;
    j["spec"]["model"]["vocab"] = vocab;
    j["spec"]["dataset"]["maxTrainSamples"] = max_train;
    j["spec"]["dataset"]["maxTestSamples"] = 0;
    return job_from_json(j);
  }
  void write(bool train, const std::vector<uint16_t>& t) { write_token_file(token_file_path(dir_, train), t); }
  std::vector<uint16_t> iota(int n) {
    std::vector<uint16_t> t(n);
    for (int i = 0; i < n; ++i) t[i] = static_cast<uint16_t>(i);
    return t;
  }
  const testsupport::TempDir tmp_{"shardguard-tokens"};
  const std::string dir_ = tmp_.str();
};

// Validation windows lie back to back; a target is its feature shifted by one.
TEST_F(TokenDataTest, ValidationWindowsAreBackToBackAndTargetsAreTheNextTokens) {
  write(true, iota(41));
  write(false, iota(21));  // (21 - 1) / 4 = 5 windows of 5 tokens
  const JobSpec j = job();
  EXPECT_EQ(count_samples(j, Split::kTest), 5);
  const Samples v = Samples::load(j, Split::kTest, true, true);
  ASSERT_EQ(v.size(), 5);
  const auto x = v.features(Samples::range(0, 5));
  const auto y = v.targets(Samples::range(0, 5));
  EXPECT_EQ(x.sizes().vec(), (std::vector<int64_t>{5, 4}));
  EXPECT_EQ(x.scalar_type(), torch::kInt64);
  for (int w = 0; w < 5; ++w) {
    for (int t = 0; t < 4; ++t) {
      EXPECT_EQ(x[w][t].item<int64_t>(), 4 * w + t);
      EXPECT_EQ(y[w][t].item<int64_t>(), 4 * w + t + 1);
    }
  }
}

// Training windows: one fewer than fit back to back, shifted by an offset that
// depends only on (seed, epoch): the same on every stage, different across epochs,
// always inside the file.
TEST_F(TokenDataTest, TrainingWindowsMovePerEpochDeterministically) {
  write(true, iota(1001));  // 1000 / 4 - 1 = 249 windows
  write(false, iota(21));
  const JobSpec j = job(4, 1024);
  EXPECT_EQ(count_samples(j, Split::kTrain), 249);
  const Samples a = Samples::load(j, Split::kTrain, true, false);
  const Samples b = Samples::load(j, Split::kTrain, false, true);
  const auto all = Samples::range(0, 249);
  std::set<int64_t> offsets;
  for (int epoch = 0; epoch < 8; ++epoch) {
    const auto x = a.features(all, epoch);
    const auto y = b.targets(all, epoch);
    EXPECT_TRUE(torch::equal(x.slice(1, 1, 4), y.slice(1, 0, 3))) << epoch;
    EXPECT_TRUE(torch::equal(a.features(all, epoch), x)) << "not deterministic";
    EXPECT_LE(y.max().item<int64_t>(), 1000);
    const int64_t offset = x[0][0].item<int64_t>();
    EXPECT_LE(offset, 4);
    EXPECT_EQ(x[248][0].item<int64_t>(), offset + 248 * 4);
    offsets.insert(offset);
  }
  EXPECT_GT(offsets.size(), 1u) << "every epoch cuts the text the same way";
  // maxTrainSamples caps the windows of an epoch.
  EXPECT_EQ(count_samples(job(4, 1024, 10), Split::kTrain), 10);
}

TEST_F(TokenDataTest, DataThatDoesNotFitTheModelIsRefusedNamingTheFile) {
  const std::string train = token_file_path(dir_, true);
  // missing
  std::string e = error_of([&] { Samples::load(job(), Split::kTrain, true, false); });
  EXPECT_NE(e.find(train), std::string::npos) << e;
  EXPECT_NE(e.find("shardctl data tokens"), std::string::npos) << e;
  // a token outside the vocabulary
  auto t = iota(100);
  t[57] = 300;
  write(true, t);
  e = error_of([&] { Samples::load(job(), Split::kTrain, true, false); });
  EXPECT_NE(e.find(train), std::string::npos) << e;
  EXPECT_NE(e.find("token 300 at position 57"), std::string::npos) << e;
  EXPECT_NE(e.find("spec.model.vocab 256"), std::string::npos) << e;
  // shorter than one window of context + 1
  write(true, iota(8));
  e = error_of([&] { count_samples(job(8), Split::kTrain); });
  EXPECT_NE(e.find(train), std::string::npos) << e;
  EXPECT_NE(e.find("holds 8 tokens"), std::string::npos) << e;
  EXPECT_NE(e.find("context + 1 = 9"), std::string::npos) << e;
  e = error_of([&] { Samples::load(job(8), Split::kTrain, false, true); });
  EXPECT_NE(e.find("holds 8 tokens"), std::string::npos) << e;
  // an odd number of bytes
  write_file_atomic(train, std::string(11, 'a'));
  e = error_of([&] { Samples::load(job(), Split::kTrain, true, false); });
  EXPECT_NE(e.find("not a whole number"), std::string::npos) << e;
}

// ---- format tensors: NumPy .npy files ------------------------------------------------------

class TensorDataTest : public ::testing::Test {
 protected:
  JobSpec job(const std::string& arch = "mlp", int64_t max_train = 0) {
    auto j = shardguard::testing::small_job_json(arch, 1);
    j["spec"]["dataset"] = {{"name", "mine"}, {"format", "tensors"}, {"path", dir_},
                            {"maxTrainSamples", max_train}, {"maxTestSamples", 0}};
    return job_from_json(j);
  }
  std::string path(bool train, bool inputs) const {
    return dir_ + "/" + (train ? "train" : "test") + (inputs ? "-inputs.npy" : "-labels.npy");
  }
  // n images of 1x28x28 (pixel value i/1000 + sample/10) and labels sample % 10.
  void write_split(bool train, int n) {
    std::vector<float> x(static_cast<size_t>(n) * 784);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 784) / 1000.0f + static_cast<float>(i / 784) / 10.0f;
    std::vector<int64_t> y(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) y[static_cast<size_t>(i)] = i % 10;
    write_npy(path(train, true), "<f4", "(" + std::to_string(n) + ", 1, 28, 28)", bytes_of(x));
    write_npy(path(train, false), "<i8", "(" + std::to_string(n) + ",)", bytes_of(y));
  }
  const testsupport::TempDir tmp_{"shardguard-tensors"};
  const std::string dir_ = tmp_.str();
};

TEST_F(TensorDataTest, InputsAndLabelsLoadAsWritten) {
  write_split(true, 40);
  EXPECT_EQ(count_samples(job(), Split::kTrain), 40);
  EXPECT_EQ(count_samples(job("mlp", 32), Split::kTrain), 32);  // maxTrainSamples
  const Samples s = Samples::load(job(), Split::kTrain, true, true);
  ASSERT_EQ(s.size(), 40);
  const auto x = s.features(Samples::range(0, 40));
  const auto y = s.targets(Samples::range(0, 40));
  EXPECT_EQ(x.sizes().vec(), (std::vector<int64_t>{40, 1, 28, 28}));
  EXPECT_EQ(x.scalar_type(), torch::kFloat32);
  EXPECT_FLOAT_EQ(x[3][0][1][2].item<float>(), 30.0f / 1000.0f + 0.3f);
  EXPECT_EQ(y.scalar_type(), torch::kInt64);
  EXPECT_EQ(y[13].item<int64_t>(), 3);
}

TEST_F(TensorDataTest, AClassifierTrainsAndEvaluatesOnThem) {
  write_split(true, 64);
  write_split(false, 32);
  MonolithicOptions o;
  o.max_steps = 2;
  const MonolithicResult r = train_monolithic(job("cnn"), o);
  ASSERT_EQ(r.steps.size(), 2u);
  EXPECT_TRUE(std::isfinite(r.steps.back().loss));
  EXPECT_EQ(r.eval.total, 32);
}

TEST_F(TensorDataTest, DataThatDoesNotFitTheModelIsRefusedNamingTheFileAndTheMismatch) {
  const std::string inputs = path(true, true), labels = path(true, false);
  std::string e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find(inputs + " does not exist"), std::string::npos) << e;
  EXPECT_NE(e.find("train-labels.npy"), std::string::npos) << e;

  write_split(true, 8);
  const std::vector<float> flat(8 * 784, 0.5f);
  write_npy(inputs, "<f4", "(8, 784)", bytes_of(flat));
  e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find(inputs + " holds inputs of shape [784] per sample; architecture mlp takes [1, 28, 28]"),
            std::string::npos) << e;

  write_npy(inputs, "<i8", "(8, 1, 28, 28)", std::string(8 * 784 * 8, '\0'));
  e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find("holds int64 inputs; architecture mlp takes float32"), std::string::npos) << e;

  write_npy(inputs, "<f8", "(8, 1, 28, 28)", std::string(8 * 784 * 8, '\0'));
  e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find("holds dtype '<f8', expected float32"), std::string::npos) << e;

  write_split(true, 8);
  write_npy(labels, "<i8", "(7,)", std::string(7 * 8, '\0'));
  e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find("holds 8 samples but " + labels + " holds 7 labels"), std::string::npos) << e;

  write_npy(labels, "<i8", "(8,)", bytes_of(std::vector<int64_t>{0, 1, 2, 10, 4, 5, 6, 7}));
  e = error_of([&] { Samples::load(job(), Split::kTrain, false, true); });
  EXPECT_NE(e.find(labels + " holds label 10 at item 3, outside 0..9"), std::string::npos) << e;

  write_npy(labels, "<i8", "(8,)", std::string(5 * 8, '\0'));  // cut short
  e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find("holds 40 bytes of data, but its shape (8,) needs 64; the file is damaged"), std::string::npos)
      << e;

  write_npy(labels, "<i8", "(8,)", std::string(8 * 8, '\0'), "True");
  e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find("is in Fortran order"), std::string::npos) << e;

  write_file_atomic(labels, "not numpy at all");
  e = error_of([&] { count_samples(job(), Split::kTrain); });
  EXPECT_NE(e.find(labels + " is not a NumPy .npy file"), std::string::npos) << e;
}

}  // namespace
}  // namespace shardguard::shardd
