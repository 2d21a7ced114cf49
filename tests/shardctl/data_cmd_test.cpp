// `shardctl data tokens`: bytes as tokens, a per-file 90/10 split cut after a
// newline, directories expanded with links and binary files skipped, clear refusals.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "shardguard/common/files.h"
#include "shardguard/common/token_file.h"
#include "shardguard/shardctl/commands.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

namespace fs = std::filesystem;

std::string text_of(const std::vector<uint16_t>& tokens) {
  std::string s;
  for (uint16_t t : tokens) s.push_back(static_cast<char>(t));
  return s;
}

class DataTokensTest : public ::testing::Test {
 protected:
  int run(std::vector<std::string> inputs) {
    DataTokensOptions o;
    o.inputs = std::move(inputs);
    o.out = out_;
    return RunDataTokens(o);
  }
  const testsupport::TempDir tmp_{"shardguard-data-cmd"};
  const std::string dir_ = tmp_.str();
  const std::string out_ = dir_ + "/out";
};

TEST_F(DataTokensTest, EachFileSplitsNinetyTenAfterANewline) {
  // 20 lines of 10 bytes: 90 % is 180 bytes, right after the 18th newline.
  std::string a;
  for (int i = 0; i < 20; ++i) a += "line " + std::to_string(10 + i) + "..\n";
  ASSERT_EQ(a.size(), 200u);
  // No newline near the 90 % mark: cut exactly there (45 of 50 bytes).
  const std::string b(50, 'x');
  fs::create_directories(dir_ + "/texts");
  write_file_atomic(dir_ + "/texts/a.txt", a);
  write_file_atomic(dir_ + "/texts/b.txt", b);
  write_file_atomic(dir_ + "/texts/b.dat", std::string("bin\0ary", 7));  // skipped: a NUL byte
  fs::create_symlink(dir_ + "/texts/a.txt", dir_ + "/texts/a.link");     // skipped: a link in a directory
  ASSERT_EQ(run({dir_ + "/texts"}), 0);
  const auto train = read_token_file(token_file_path(out_, true));
  const auto validation = read_token_file(token_file_path(out_, false));
  EXPECT_EQ(text_of(train), a.substr(0, 180) + b.substr(0, 45));
  EXPECT_EQ(text_of(validation), a.substr(180) + b.substr(45));
  // Bytes as tokens: every id below 256, and the model check accepts them.
  EXPECT_NO_THROW(check_tokens(train, "train", 256, 16));
}

TEST_F(DataTokensTest, BytesAboveAsciiStayOneTokenEach) {
  write_file_atomic(dir_ + "/u.txt", std::string("caf\xc3\xa9 \xff\n", 8) + std::string(92, 'y'));
  ASSERT_EQ(run({dir_ + "/u.txt"}), 0);
  const auto train = read_token_file(token_file_path(out_, true));
  ASSERT_GE(train.size(), 7u);
  EXPECT_EQ(train[3], 0xC3);
  EXPECT_EQ(train[4], 0xA9);
  EXPECT_EQ(train[6], 0xFF);
}

TEST_F(DataTokensTest, BadInputIsRefused) {
  EXPECT_EQ(run({dir_ + "/missing.txt"}), 2);
  EXPECT_EQ(run({}), 2);
  fs::create_directories(dir_ + "/empty");
  EXPECT_EQ(run({dir_ + "/empty"}), 2);  // no files
  write_file_atomic(dir_ + "/empty/zero.bin", std::string(10, '\0'));
  EXPECT_EQ(run({dir_ + "/empty"}), 2);  // only a binary file: no text
  write_file_atomic(dir_ + "/one.txt", "x");
  EXPECT_EQ(run({dir_ + "/one.txt"}), 2);  // one byte cannot feed both splits
  DataTokensOptions o;
  o.inputs = {dir_ + "/one.txt"};
  o.out = out_;
  o.validation = 1.5;
  EXPECT_EQ(RunDataTokens(o), 2);
  EXPECT_FALSE(fs::exists(token_file_path(out_, true)));
}

}  // namespace
}  // namespace shardguard::shardctl
