// Token datasets (spec.dataset.format: tokens): a directory with train.tokens and
// validation.tokens, each a flat array of little-endian uint16 token ids. Torch-free:
// shardd reads them for training, shardctl checks them before a run and writes them
// (`shardctl data tokens`).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace shardguard {

class TokenFileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kTrainTokensFile = "train.tokens";
inline constexpr const char* kValidationTokensFile = "validation.tokens";

// <dir>/train.tokens or <dir>/validation.tokens.
std::string token_file_path(const std::string& dir, bool train);

// Reads a whole token file. Throws TokenFileError naming the file when it is
// missing, unreadable, larger than max_bytes, or not a whole number of uint16s.
std::vector<uint16_t> read_token_file(const std::string& path, std::size_t max_bytes = std::size_t{1} << 32);

// Checks that the tokens fit a model of `vocab` token ids and `context` tokens per
// sequence: every id < vocab, and at least one window of context + 1 tokens.
// Throws TokenFileError naming the file, the mismatch and the spec field.
void check_tokens(const std::vector<uint16_t>& tokens, const std::string& path, int vocab, int context);

// Windows of context + 1 tokens a split of `tokens` tokens offers per pass:
// validation: (tokens - 1) / context, back to back; training: one fewer when there
// are at least two, so that each pass can start at a random offset (docs/models.md).
int64_t token_windows(int64_t tokens, int context, bool train);

// The baseline a language model has to beat: the cross-entropy, in bits per token,
// of `validation` under the token frequencies of `train` (add-one smoothed over
// `vocab` ids). About 4.5 bits for English text as bytes.
double unigram_bits_per_token(const std::vector<uint16_t>& train, const std::vector<uint16_t>& validation, int vocab);

// Writes tokens as little-endian uint16 (atomically). Throws FileError.
void write_token_file(const std::string& path, const std::vector<uint16_t>& tokens);

}  // namespace shardguard
