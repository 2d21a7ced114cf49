// `shardctl data tokens`: text files → a byte-level token dataset (train.tokens,
// validation.tokens). Torch-free.
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "shardguard/common/files.h"
#include "shardguard/common/token_file.h"
#include "shardguard/shardctl/commands.h"

namespace shardguard::shardctl {
namespace {

namespace fs = std::filesystem;

struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The files an input names: itself, or a directory's regular files (sorted).
std::vector<std::string> expand(const std::string& input, std::vector<std::string>& skipped) {
  std::error_code ec;
  const auto st = fs::symlink_status(input, ec);
  if (ec || !fs::exists(st)) throw BadInput(input + ": no such file or directory");
  if (fs::is_directory(st)) {
    std::vector<std::string> files;
    for (const auto& entry : fs::directory_iterator(input, ec)) {
      if (entry.is_symlink()) {
        skipped.push_back(entry.path().string() + " (a symbolic link)");
      } else if (entry.is_regular_file()) {
        files.push_back(entry.path().string());
      }
    }
    if (ec) throw BadInput(input + ": cannot list the directory: " + ec.message());
    std::sort(files.begin(), files.end());
    return files;
  }
  // A link named on the command line is followed: the user asked for it.
  if (!fs::is_regular_file(fs::status(input, ec))) throw BadInput(input + ": not a regular file or a directory");
  return {input};
}

// Where a file's training part ends: after `want` bytes, moved back to just after
// the last newline within 10 % of the file before it (a fortune or a paragraph is
// not cut in two), else exactly at `want`.
size_t cut_point(const std::string& text, size_t want) {
  const size_t window = text.size() / 10;
  for (size_t i = want; i > 0 && want - i <= window; --i) {
    if (text[i - 1] == '\n') return i;
  }
  return want;
}

}  // namespace

int RunDataTokens(const DataTokensOptions& o) {
  if (o.inputs.empty()) {
    std::cerr << "shardctl data tokens: name at least one text file or directory\n";
    return 2;
  }
  if (o.out.empty()) {
    std::cerr << "shardctl data tokens: --out DIR is required\n";
    return 2;
  }
  if (!(o.validation > 0 && o.validation < 1)) {
    std::cerr << "shardctl data tokens: --validation must be between 0 and 1 (exclusive), got " << o.validation << "\n";
    return 2;
  }
  std::vector<std::string> files, skipped;
  size_t total = 0;
  try {
    for (const auto& in : o.inputs) {
      for (auto& f : expand(in, skipped)) files.push_back(std::move(f));
    }
    for (const auto& f : files) total += static_cast<size_t>(fs::file_size(f));
  } catch (const std::exception& e) {
    std::cerr << "shardctl data tokens: " << e.what() << "\n";
    return 2;
  }
  if (files.empty()) {
    std::cerr << "shardctl data tokens: no files found in";
    for (const auto& in : o.inputs) std::cerr << " " << in;
    std::cerr << "\n";
    return 2;
  }
  if (total > o.max_bytes) {
    std::cerr << "shardctl data tokens: the inputs hold " << total << " bytes, more than the " << o.max_bytes
              << " this command reads (uint16 token files of at most 4 GiB)\n";
    return 2;
  }

  constexpr size_t kProgressEvery = size_t{64} << 20;
  const bool show_progress = total >= kProgressEvery;
  std::vector<uint16_t> train, validation;
  train.reserve(total);
  size_t read = 0, next_report = kProgressEvery, used = 0;
  for (const auto& f : files) {
    std::string text;
    try {
      text = read_file(f, o.max_bytes);
    } catch (const std::exception& e) {
      std::cerr << "shardctl data tokens: " << e.what() << "\n";
      return 1;
    }
    read += text.size();
    if (text.find('\0') != std::string::npos) {
      skipped.push_back(f + " (binary: holds a NUL byte)");
      continue;
    }
    if (text.empty()) continue;
    ++used;
    const size_t cut = cut_point(text, static_cast<size_t>(static_cast<double>(text.size()) * (1 - o.validation)));
    for (size_t i = 0; i < text.size(); ++i) {
      (i < cut ? train : validation).push_back(static_cast<unsigned char>(text[i]));
    }
    if (show_progress && read >= next_report) {
      std::fprintf(stderr, "shardctl data tokens: read %zu of %zu MiB\n", read >> 20, total >> 20);
      next_report += kProgressEvery;
    }
  }
  if (!skipped.empty()) {
    std::fprintf(stderr, "shardctl data tokens: skipped %zu file(s), e.g. %s\n", skipped.size(), skipped.front().c_str());
  }
  if (train.empty() || validation.empty()) {
    std::cerr << "shardctl data tokens: the text files hold " << train.size() + validation.size()
              << " bytes: too little for both a training and a validation split\n";
    return 2;
  }
  try {
    make_dirs(o.out);
    write_token_file(token_file_path(o.out, true), train);
    write_token_file(token_file_path(o.out, false), validation);
  } catch (const std::exception& e) {
    std::cerr << "shardctl data tokens: --out " << o.out << ": " << e.what() << "\n";
    return 1;
  }
  std::printf("wrote %s: %zu tokens\n", token_file_path(o.out, true).c_str(), train.size());
  std::printf("wrote %s: %zu tokens\n", token_file_path(o.out, false).c_str(), validation.size());
  std::printf("from %zu text file(s), one token per byte (spec.model.vocab 256); unigram baseline %.3f bits/byte\n",
              used, unigram_bits_per_token(train, validation, 256));
  return 0;
}

}  // namespace shardguard::shardctl
