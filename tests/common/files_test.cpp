#include "shardguard/common/files.h"

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "support/temp_dir.h"
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

namespace shardguard {
namespace {

namespace fs = std::filesystem;

using testsupport::TempDir;

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  return out;
}

unsigned mode_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return 0xffffffffu;
  return st.st_mode & 07777;
}

// The message of the FileError fn throws, or fails the test.
template <typename Fn>
std::string file_error(Fn fn) {
  try {
    fn();
  } catch (const FileError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected FileError";
  return "";
}

TEST(Files, WriteThenReadRoundTrip) {
  TempDir dir;
  const std::string path = dir.file("data.bin");
  std::string data(200000, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31);
  write_file_atomic(path, data);
  EXPECT_EQ(read_file(path), data);

  write_file_atomic(path, "");
  EXPECT_EQ(read_file(path), "");
}

TEST(Files, TailOfFileQuotesTheLastLines) {
  TempDir dir;
  const std::string path = dir.file("log.txt");
  write_file_atomic(path, "one\ntwo\nthree\nfour\n");
  EXPECT_EQ(tail_of_file(path, 2), "three\nfour\n");
  EXPECT_EQ(tail_of_file(path, 10), "one\ntwo\nthree\nfour\n");
  write_file_atomic(path, "no newline at the end");
  EXPECT_EQ(tail_of_file(path, 1), "no newline at the end");
  EXPECT_EQ(tail_of_file(dir.file("missing"), 3), "");
}

TEST(Files, AtomicWriteLeavesNoTempFilesAndReplacesTarget) {
  TempDir dir;
  const std::string path = dir.file("config.json");
  write_file_atomic(path, "first");
  write_file_atomic(path, "second");
  EXPECT_EQ(read_file(path), "second");
  EXPECT_EQ(entries(dir.str()), std::vector<std::string>{"config.json"});
}

TEST(Files, AtomicWriteSetsModeRegardlessOfUmask) {
  TempDir dir;
  const mode_t old_umask = ::umask(077);
  write_file_atomic(dir.file("public"), "x", 0644);
  ::umask(old_umask);
  EXPECT_EQ(mode_of(dir.file("public")), 0644u);

  write_file_atomic(dir.file("secret"), "x", 0600);
  EXPECT_EQ(mode_of(dir.file("secret")), 0600u);

  // Rewriting an existing file applies the new mode too.
  write_file_atomic(dir.file("public"), "y", 0640);
  EXPECT_EQ(mode_of(dir.file("public")), 0640u);
}

TEST(Files, WriteIntoMissingDirectoryNamesPath) {
  TempDir dir;
  const std::string path = dir.file("no/such/dir/file");
  const std::string msg = file_error([&] { write_file_atomic(path, "x"); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  EXPECT_TRUE(entries(dir.str()).empty());
}

TEST(Files, FailedWriteRemovesTempFileAndKeepsOldContent) {
  // A file-size limit makes write(2) fail with EFBIG half-way, even as root.
  TempDir dir;
  const std::string path = dir.file("f");
  write_file_atomic(path, "old");
  struct rlimit before {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &before), 0);
  auto* previous = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit tiny = before;
  tiny.rlim_cur = 2;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &tiny), 0);
  const std::string msg = file_error([&] { write_file_atomic(path, "new and longer"); });
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &before), 0);
  ::signal(SIGXFSZ, previous);
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_EQ(read_file(path), "old");
  EXPECT_EQ(entries(dir.str()), std::vector<std::string>{"f"});
}

TEST(Files, RenameOntoDirectoryFailsAndRemovesTempFile) {
  // rename(2) of a file over a non-empty directory fails after the temp file was
  // written, which exercises the clean-up path even as root.
  TempDir dir;
  const std::string target = dir.file("target");
  make_dirs(target + "/inside");
  const std::string msg = file_error([&] { write_file_atomic(target, "x"); });
  EXPECT_NE(msg.find(target), std::string::npos) << msg;
  EXPECT_EQ(entries(dir.str()), std::vector<std::string>{"target"});
}

TEST(Files, ReadMissingFileNamesPathAndReason) {
  TempDir dir;
  const std::string path = dir.file("absent");
  const std::string msg = file_error([&] { read_file(path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
}

TEST(Files, ReadDirectoryIsAnError) {
  TempDir dir;
  const std::string msg = file_error([&] { read_file(dir.str()); });
  EXPECT_NE(msg.find(dir.str()), std::string::npos) << msg;
}

TEST(Files, MakeDirsCreatesNestedAndIsIdempotent) {
  TempDir dir;
  const std::string deep = dir.file("a/b/c/");
  make_dirs(deep);
  EXPECT_TRUE(fs::is_directory(dir.file("a/b/c")));
  make_dirs(deep);  // already there: fine
  make_dirs(dir.file("a//b/d"));
  EXPECT_TRUE(fs::is_directory(dir.file("a/b/d")));
}

TEST(Files, MakeDirsThroughAFileFails) {
  TempDir dir;
  write_file_atomic(dir.file("plain"), "x");
  const std::string msg = file_error([&] { make_dirs(dir.file("plain/sub")); });
  EXPECT_NE(msg.find(dir.file("plain")), std::string::npos) << msg;
  EXPECT_NE(msg.find("Not a directory"), std::string::npos) << msg;
}

TEST(FileLockTest, SecondHolderIsRefusedWithTheFirstOnesPid) {
  const std::string path = (fs::temp_directory_path() / ("shardguard-lock-" + std::to_string(::getpid()))).string();
  {
    FileLock first(path);
    try {
      FileLock second(path);  // another open file description: flock refuses it
      FAIL() << "locked twice";
    } catch (const FileLockBusy& e) {
      EXPECT_EQ(e.holder_pid(), static_cast<long>(::getpid()));
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  FileLock again(path);  // released with the first
  EXPECT_EQ(read_file(path), std::to_string(::getpid()) + "\n");
  fs::remove(path);
}

}  // namespace
}  // namespace shardguard
