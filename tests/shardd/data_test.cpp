// The dataset loader refuses damaged IDX files with the file named (issue 16 item
// 12): image and label counts that disagree, a header count no file of that size can
// hold (no multi-terabyte allocation), labels out of range.
#include "shardguard/shardd/data.h"

#include <zlib.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "support/temp_dir.h"

namespace shardguard::shardd {
namespace {

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

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override { spec_.path = dir_; }

  std::string images() const { return dir_ + "/train-images-idx3-ubyte.gz"; }
  std::string labels() const { return dir_ + "/train-labels-idx1-ubyte.gz"; }
  void write_split(uint32_t n_images, uint32_t n_labels, const std::string& label_bytes) {
    write_idx(images(), {n_images, 28, 28}, std::string(static_cast<size_t>(n_images) * 28 * 28, '\x20'));
    write_idx(labels(), {n_labels}, label_bytes);
  }
  std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const DatasetError& e) {
      return e.what();
    }
    return "";
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

}  // namespace
}  // namespace shardguard::shardd
