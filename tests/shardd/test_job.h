// Small jobs for the shardd tests: the real decoder, tiny data.
#pragma once

#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/token_file.h"

namespace shardguard::testing {

inline nlohmann::json small_job_json(const std::string& arch, int shards, int train_samples = 256) {
  nlohmann::json model = {{"architecture", arch}, {"hidden", 32}, {"depth", 3}, {"channels", 4}, {"heads", 2},
                          {"patchSize", 7}};
  return {{"apiVersion", "shardguard.io/v1alpha1"},
          {"kind", "ShardedTrainingJob"},
          {"metadata", {{"name", "t-" + arch}, {"namespace", "default"}}},
          {"spec",
           {{"model", model},
            {"dataset", {{"name", "fashion-mnist"}, {"path", "/usr/share/datasets/fashion-mnist"},
                         {"maxTrainSamples", train_samples}, {"maxTestSamples", 200}}},
            {"training", {{"epochs", 1}, {"batchSize", 32}, {"microBatches", 4},
                          {"optimizer", {{"name", "adam"}, {"learningRate", 0.002}}}, {"seed", 7},
                          {"evalBatchSize", 64}}},
            {"sharding", {{"shards", shards}, {"balance", "parameters"}}},
            {"checkpoint", {{"everySteps", 3}}}}}};
}

inline JobSpec small_job(const std::string& arch, int shards, int train_samples = 256) {
  return job_from_json(small_job_json(arch, shards, train_samples));
}

// A small learnable text as byte tokens: words drawn by a fixed LCG, where each
// word mostly decides the next, in <dir>/train.tokens and <dir>/validation.tokens.
inline void write_small_tokens(const std::string& dir, int64_t train_tokens = 12000, int64_t val_tokens = 1200) {
  static const char* const kWords[] = {"the cat ", "sat on ", "a mat. ", "the dog ", "ran to ", "a tree. ",
                                       "we saw ", "it rain. "};
  uint64_t state = 12345;
  int word = 0;
  auto text = [&](int64_t n) {
    std::vector<uint16_t> out;
    while (static_cast<int64_t>(out.size()) < n) {
      for (const char* c = kWords[word]; *c && static_cast<int64_t>(out.size()) < n; ++c) {
        out.push_back(static_cast<unsigned char>(*c));
      }
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      word = (state >> 61) < 6 ? (word + 1) % 8 : static_cast<int>((state >> 33) % 8);
    }
    return out;
  };
  make_dirs(dir);
  write_token_file(token_file_path(dir, true), text(train_tokens));
  write_token_file(token_file_path(dir, false), text(val_tokens));
}

// A small gpt (4 blocks: embed, 2 layers, head) on the tokens under data_dir.
inline nlohmann::json small_gpt_job_json(int shards, const std::string& data_dir, int train_windows = 512) {
  nlohmann::json j = small_job_json("gpt", shards, train_windows);
  j["spec"]["model"] = {{"architecture", "gpt"}, {"hidden", 32}, {"depth", 2}, {"heads", 2}, {"context", 16},
                        {"vocab", 256}};
  j["spec"]["dataset"] = {{"name", "words"}, {"format", "tokens"}, {"path", data_dir},
                          {"maxTrainSamples", train_windows}, {"maxTestSamples", 200}};
  return j;
}

// A .npy file (format 1.0) as NumPy writes it: magic, version, header length, the
// header dict padded with spaces to a multiple of 64 bytes and ended by '\n', the data.
inline void write_npy(const std::string& path, const std::string& descr, const std::string& shape,
                      const std::string& data, const std::string& order = "False") {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': " + order + ", 'shape': " + shape + ", }";
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xFF));
  out.push_back(static_cast<char>(header.size() >> 8));
  write_file_atomic(path, out + header + data);
}

template <typename T>
inline std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

}  // namespace shardguard::testing
