// AES-256-GCM, randomness and SHA-256 over OpenSSL 3 EVP (see crypto.h).
#include "shardguard/common/crypto.h"

#include <algorithm>
#include <climits>
#include <memory>
#include <string>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "shardguard/common/files.h"

namespace shardguard {
namespace {

struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

// OpenSSL's update calls take an int length; feed larger inputs in chunks.
constexpr size_t kChunk = size_t{1} << 30;

[[noreturn]] void fail(const std::string& what) { throw CryptoError(what + ": " + openssl_error()); }

unsigned char* bytes(std::string& s) { return reinterpret_cast<unsigned char*>(&s[0]); }
const unsigned char* bytes(const std::string& s) { return reinterpret_cast<const unsigned char*>(s.data()); }

void check_key(const std::string& key) {
  if (key.size() != kAesKeyBytes) {
    throw CryptoError("AES-256-GCM key must be " + std::to_string(kAesKeyBytes) + " bytes, got " +
                      std::to_string(key.size()));
  }
}

CipherCtx new_ctx() {
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  if (!ctx) fail("EVP_CIPHER_CTX_new");
  return ctx;
}

// Feeds aad (out == nullptr) or data through EncryptUpdate/DecryptUpdate in chunks.
// Returns the number of bytes written to out.
template <typename Update>
size_t update_chunked(Update update, EVP_CIPHER_CTX* ctx, unsigned char* out, const unsigned char* in,
                      size_t len, const char* what) {
  size_t written = 0;
  size_t done = 0;
  do {
    const size_t n = std::min(kChunk, len - done);
    int outl = 0;
    if (update(ctx, out ? out + written : nullptr, &outl, in + done, static_cast<int>(n)) != 1) fail(what);
    written += static_cast<size_t>(outl);
    done += n;
  } while (done < len);
  return written;
}

}  // namespace

std::string random_bytes(size_t n) {
  std::string out(n, '\0');
  for (size_t done = 0; done < n;) {
    const size_t chunk = std::min(kChunk, n - done);
    if (RAND_bytes(bytes(out) + done, static_cast<int>(chunk)) != 1) fail("RAND_bytes");
    done += chunk;
  }
  return out;
}

std::string aes256gcm_seal(const std::string& key, const std::string& aad, const std::string& plaintext) {
  check_key(key);
  const std::string nonce = random_bytes(kGcmNonceBytes);
  CipherCtx ctx = new_ctx();

  if (EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1) fail("EVP_EncryptInit_ex");
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kGcmNonceBytes), nullptr) != 1) {
    fail("EVP_CTRL_GCM_SET_IVLEN");
  }
  if (EVP_EncryptInit_ex(ctx.get(), nullptr, nullptr, bytes(key), bytes(nonce)) != 1) fail("EVP_EncryptInit_ex(key)");

  update_chunked(EVP_EncryptUpdate, ctx.get(), nullptr, bytes(aad), aad.size(), "EVP_EncryptUpdate(aad)");

  // GCM is a stream mode: the ciphertext is exactly as long as the plaintext.
  std::string out(kGcmNonceBytes + plaintext.size() + kGcmTagBytes, '\0');
  out.replace(0, kGcmNonceBytes, nonce);
  unsigned char* ct = bytes(out) + kGcmNonceBytes;
  size_t written = update_chunked(EVP_EncryptUpdate, ctx.get(), ct, bytes(plaintext), plaintext.size(),
                                  "EVP_EncryptUpdate");
  int final_len = 0;
  if (EVP_EncryptFinal_ex(ctx.get(), ct + written, &final_len) != 1) fail("EVP_EncryptFinal_ex");
  written += static_cast<size_t>(final_len);
  if (written != plaintext.size()) throw CryptoError("AES-256-GCM produced an unexpected ciphertext length");

  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kGcmTagBytes), ct + written) != 1) {
    fail("EVP_CTRL_GCM_GET_TAG");
  }
  return out;
}

std::string aes256gcm_open(const std::string& key, const std::string& aad, const std::string& sealed) {
  check_key(key);
  if (sealed.size() < kGcmNonceBytes + kGcmTagBytes) {
    throw CryptoError("authentication failed: sealed text is " + std::to_string(sealed.size()) +
                      " bytes, shorter than nonce and tag (" + std::to_string(kGcmNonceBytes + kGcmTagBytes) + ")");
  }
  const size_t ct_len = sealed.size() - kGcmNonceBytes - kGcmTagBytes;
  const unsigned char* nonce = bytes(sealed);
  const unsigned char* ct = nonce + kGcmNonceBytes;
  // SET_TAG wants a non-const pointer; give it a copy.
  std::string tag = sealed.substr(kGcmNonceBytes + ct_len);

  CipherCtx ctx = new_ctx();
  if (EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1) fail("EVP_DecryptInit_ex");
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kGcmNonceBytes), nullptr) != 1) {
    fail("EVP_CTRL_GCM_SET_IVLEN");
  }
  if (EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr, bytes(key), nonce) != 1) fail("EVP_DecryptInit_ex(key)");

  update_chunked(EVP_DecryptUpdate, ctx.get(), nullptr, bytes(aad), aad.size(), "EVP_DecryptUpdate(aad)");

  std::string plain(ct_len, '\0');
  // Wipes the plaintext buffer unless verification succeeded and it is handed out.
  struct Wipe {
    std::string* s;
    ~Wipe() {
      if (s && !s->empty()) OPENSSL_cleanse(&(*s)[0], s->size());
    }
  } wipe{&plain};

  size_t written = update_chunked(EVP_DecryptUpdate, ctx.get(), bytes(plain), ct, ct_len, "EVP_DecryptUpdate");
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kGcmTagBytes), bytes(tag)) != 1) {
    fail("EVP_CTRL_GCM_SET_TAG");
  }
  int final_len = 0;
  if (EVP_DecryptFinal_ex(ctx.get(), bytes(plain) + written, &final_len) != 1) {
    ERR_clear_error();
    throw CryptoError("authentication failed: wrong key, wrong aad, or the sealed text was modified");
  }
  written += static_cast<size_t>(final_len);
  if (written != ct_len) throw CryptoError("AES-256-GCM produced an unexpected plaintext length");
  wipe.s = nullptr;
  return plain;
}

std::string load_key_file(const std::string& path) {
  std::string key = read_file(path);
  if (key.size() != kAesKeyBytes) {
    const size_t found = key.size();
    if (!key.empty()) OPENSSL_cleanse(&key[0], key.size());
    throw CryptoError("key file " + path + " must hold exactly " + std::to_string(kAesKeyBytes) +
                      " raw bytes, found " + std::to_string(found) + " bytes");
  }
  return key;
}

void generate_key_file(const std::string& path) {
  std::string key = random_bytes(kAesKeyBytes);
  try {
    write_file_atomic(path, key, 0600);
  } catch (...) {
    OPENSSL_cleanse(&key[0], key.size());
    throw;
  }
  OPENSSL_cleanse(&key[0], key.size());
}

std::string openssl_error() {
  const unsigned long code = ERR_get_error();  // the oldest queued error: the cause
  ERR_clear_error();
  if (code == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(code, buf, sizeof buf);
  return buf;
}

std::string base64_encode(const std::string& bytes) {
  std::string out((bytes.size() + 2) / 3 * 4 + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<int>(bytes.size()));
  out.resize(n < 0 ? 0 : static_cast<size_t>(n));
  return out;
}

bool base64_decode(const std::string& text, std::string& out, std::string* error) {
  auto fail = [&](const std::string& why) {
    if (error != nullptr) *error = why;
    return false;
  };
  if (text.size() % 4 != 0) return fail("length " + std::to_string(text.size()) + " is not a multiple of 4");
  if (text.size() > static_cast<size_t>(INT_MAX)) return fail("longer than " + std::to_string(INT_MAX) + " bytes");
  size_t pad = 0;
  if (!text.empty() && text.back() == '=') pad = text[text.size() - 2] == '=' ? 2 : 1;
  for (size_t i = 0; i + pad < text.size(); ++i) {
    const char c = text[i];
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/';
    if (!ok) return fail("bad character at offset " + std::to_string(i));
  }
  std::string buf(text.size() / 4 * 3, '\0');
  const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(buf.data()),
                                reinterpret_cast<const unsigned char*>(text.data()), static_cast<int>(text.size()));
  if (n < 0 || static_cast<size_t>(n) < pad) return fail("not valid base64");
  buf.resize(static_cast<size_t>(n) - pad);
  out = std::move(buf);
  return true;
}

std::string sha256_hex(const std::string& data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &md_len, EVP_sha256(), nullptr) != 1) fail("EVP_Digest(SHA-256)");
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(md_len * 2);
  for (unsigned int i = 0; i < md_len; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 0x0f]);
  }
  return out;
}

}  // namespace shardguard
