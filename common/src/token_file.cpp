#include "shardguard/common/token_file.h"

#include <cmath>

#include "shardguard/common/files.h"

namespace shardguard {

std::string token_file_path(const std::string& dir, bool train) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d + "/" + (train ? kTrainTokensFile : kValidationTokensFile);
}

std::vector<uint16_t> read_token_file(const std::string& path, std::size_t max_bytes) {
  std::string bytes;
  try {
    bytes = read_file(path, max_bytes);
  } catch (const FileError& e) {
    throw TokenFileError(std::string("token file: ") + e.what() +
                         " (spec.dataset.path; make one with `shardctl data tokens TEXT... --out DIR`)");
  }
  if (bytes.size() % 2 != 0) {
    throw TokenFileError("token file " + path + " has " + std::to_string(bytes.size()) +
                         " bytes, not a whole number of 2-byte (uint16) tokens");
  }
  std::vector<uint16_t> tokens(bytes.size() / 2);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<uint16_t>(static_cast<unsigned char>(bytes[2 * i]) |
                                      (static_cast<unsigned>(static_cast<unsigned char>(bytes[2 * i + 1])) << 8));
  }
  return tokens;
}

void check_tokens(const std::vector<uint16_t>& tokens, const std::string& path, int vocab, int context) {
  const int64_t need = static_cast<int64_t>(context) + 1;
  if (static_cast<int64_t>(tokens.size()) < need) {
    throw TokenFileError("token file " + path + " holds " + std::to_string(tokens.size()) +
                         " tokens, fewer than one window of spec.model.context + 1 = " + std::to_string(need));
  }
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] >= vocab) {
      throw TokenFileError("token file " + path + " holds token " + std::to_string(tokens[i]) + " at position " +
                           std::to_string(i) + ", outside the model's vocabulary 0.." + std::to_string(vocab - 1) +
                           " (spec.model.vocab " + std::to_string(vocab) + ")");
    }
  }
}

int64_t token_windows(int64_t tokens, int context, bool train) {
  if (context < 1 || tokens < static_cast<int64_t>(context) + 1) return 0;
  const int64_t back_to_back = (tokens - 1) / context;
  return train && back_to_back >= 2 ? back_to_back - 1 : back_to_back;
}

double unigram_bits_per_token(const std::vector<uint16_t>& train, const std::vector<uint16_t>& validation, int vocab) {
  if (validation.empty() || vocab < 1) return 0;
  std::vector<double> counts(static_cast<std::size_t>(vocab), 1.0);
  for (uint16_t t : train) {
    if (t < vocab) counts[t] += 1;
  }
  const double total = static_cast<double>(train.size()) + vocab;
  double bits = 0;
  for (uint16_t t : validation) bits -= std::log2((t < vocab ? counts[t] : 1.0) / total);
  return bits / static_cast<double>(validation.size());
}

void write_token_file(const std::string& path, const std::vector<uint16_t>& tokens) {
  std::string bytes(tokens.size() * 2, '\0');
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    bytes[2 * i] = static_cast<char>(tokens[i] & 0xFF);
    bytes[2 * i + 1] = static_cast<char>(tokens[i] >> 8);
  }
  write_file_atomic(path, bytes);
}

}  // namespace shardguard
