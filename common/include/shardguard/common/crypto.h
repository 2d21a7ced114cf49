// AES-256-GCM and randomness (OpenSSL EVP). Used for shard checkpoints at rest.
#pragma once

#include <stdexcept>
#include <string>

namespace shardguard {

class CryptoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr size_t kAesKeyBytes = 32;
inline constexpr size_t kGcmNonceBytes = 12;
inline constexpr size_t kGcmTagBytes = 16;

// n bytes from the OpenSSL CSPRNG.
std::string random_bytes(size_t n);

// Encrypts plaintext under a 32-byte key with a fresh random nonce, authenticating
// aad too. Returns nonce || ciphertext || tag.
std::string aes256gcm_seal(const std::string& key, const std::string& aad,
                           const std::string& plaintext);

// Inverse of aes256gcm_seal. Throws CryptoError("authentication failed ...") when
// the key is wrong or any byte of the sealed text or the aad was changed; never
// returns unauthenticated plaintext.
std::string aes256gcm_open(const std::string& key, const std::string& aad,
                           const std::string& sealed);

// Reads a key file that must hold exactly 32 raw bytes; the error names the path
// and the size found.
std::string load_key_file(const std::string& path);

// Writes 32 fresh random bytes to path atomically with mode 0600.
void generate_key_file(const std::string& path);

// Lower-case hex of SHA-256(data).
std::string sha256_hex(const std::string& data);

// The oldest queued OpenSSL error of this thread as text (the first failure, the
// cause of the others), clearing the queue; "unknown OpenSSL error" when it is empty.
std::string openssl_error();

// Standard base64 (RFC 4648, '+' '/', '=' padding), through OpenSSL.
std::string base64_encode(const std::string& bytes);
// Its inverse, strict: the length a multiple of 4, only the alphabet, '=' only as the
// last one or two characters. On bad input returns false and says why in *error
// (with the offset); `out` is then unchanged.
bool base64_decode(const std::string& text, std::string& out, std::string* error = nullptr);

}  // namespace shardguard
