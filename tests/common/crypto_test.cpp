#include "shardguard/common/crypto.h"

#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "support/temp_dir.h"
#include <openssl/err.h>
#include <openssl/x509.h>
#include <sys/stat.h>

#include "shardguard/common/files.h"

namespace shardguard {
namespace {

using testsupport::TempDir;

// The error message of the CryptoError fn throws, or fails the test.
template <typename Fn>
std::string crypto_error(Fn fn) {
  try {
    fn();
  } catch (const CryptoError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected CryptoError";
  return "";
}

TEST(Crypto, SealOpenRoundTrip) {
  const std::string key = random_bytes(kAesKeyBytes);
  const std::string plain = std::string("layer 7 weights \x00\x01\xff bytes", 25);
  const std::string sealed = aes256gcm_seal(key, "job=a shard=3", plain);
  EXPECT_EQ(sealed.size(), kGcmNonceBytes + plain.size() + kGcmTagBytes);
  EXPECT_EQ(sealed.find(plain), std::string::npos);
  EXPECT_EQ(aes256gcm_open(key, "job=a shard=3", sealed), plain);
}

TEST(Crypto, EmptyPlaintextAndLargePlaintextRoundTrip) {
  const std::string key = random_bytes(kAesKeyBytes);
  const std::string empty_sealed = aes256gcm_seal(key, "", "");
  EXPECT_EQ(empty_sealed.size(), kGcmNonceBytes + kGcmTagBytes);
  EXPECT_EQ(aes256gcm_open(key, "", empty_sealed), "");

  const std::string big = random_bytes(3 * 1024 * 1024 + 7);
  EXPECT_EQ(aes256gcm_open(key, "aad", aes256gcm_seal(key, "aad", big)), big);
}

TEST(Crypto, TwoSealsOfSamePlaintextDiffer) {
  const std::string key = random_bytes(kAesKeyBytes);
  const std::string a = aes256gcm_seal(key, "x", "same plaintext");
  const std::string b = aes256gcm_seal(key, "x", "same plaintext");
  EXPECT_NE(a, b);
  EXPECT_NE(a.substr(0, kGcmNonceBytes), b.substr(0, kGcmNonceBytes));
}

TEST(Crypto, EveryFlippedByteIsRejected) {
  const std::string key = random_bytes(kAesKeyBytes);
  const std::string sealed = aes256gcm_seal(key, "aad", "sixteen+ bytes of plaintext");
  // Covers the nonce, every ciphertext byte and the tag.
  for (size_t i = 0; i < sealed.size(); ++i) {
    for (unsigned char bit : {0x01, 0x80}) {
      std::string tampered = sealed;
      tampered[i] = static_cast<char>(tampered[i] ^ bit);
      const std::string msg = crypto_error([&] { aes256gcm_open(key, "aad", tampered); });
      EXPECT_NE(msg.find("authentication failed"), std::string::npos) << "byte " << i << ": " << msg;
    }
  }
}

TEST(Crypto, WrongKeyIsRejected) {
  const std::string key = random_bytes(kAesKeyBytes);
  std::string other = key;
  other[31] = static_cast<char>(other[31] ^ 1);
  const std::string sealed = aes256gcm_seal(key, "aad", "secret");
  const std::string msg = crypto_error([&] { aes256gcm_open(other, "aad", sealed); });
  EXPECT_NE(msg.find("authentication failed"), std::string::npos) << msg;
}

TEST(Crypto, WrongAadIsRejected) {
  const std::string key = random_bytes(kAesKeyBytes);
  const std::string sealed = aes256gcm_seal(key, "shard=1", "secret");
  for (const std::string aad : {"shard=2", "", "shard=1 "}) {
    const std::string msg = crypto_error([&] { aes256gcm_open(key, aad, sealed); });
    EXPECT_NE(msg.find("authentication failed"), std::string::npos) << aad << ": " << msg;
  }
}

TEST(Crypto, TruncatedOrExtendedInputIsRejected) {
  const std::string key = random_bytes(kAesKeyBytes);
  const std::string sealed = aes256gcm_seal(key, "", "some plaintext");
  for (size_t len = 0; len < sealed.size(); ++len) {
    const std::string msg = crypto_error([&] { aes256gcm_open(key, "", sealed.substr(0, len)); });
    EXPECT_NE(msg.find("authentication failed"), std::string::npos) << "length " << len << ": " << msg;
  }
  const std::string msg = crypto_error([&] { aes256gcm_open(key, "", sealed + "x"); });
  EXPECT_NE(msg.find("authentication failed"), std::string::npos) << msg;
}

TEST(Crypto, KeyOfWrongSizeIsRefused) {
  const std::string msg = crypto_error([] { aes256gcm_seal(std::string(16, 'k'), "", "x"); });
  EXPECT_NE(msg.find("16"), std::string::npos) << msg;
  crypto_error([] { aes256gcm_open(std::string(33, 'k'), "", std::string(40, 'x')); });
}

TEST(Crypto, RandomBytes) {
  EXPECT_EQ(random_bytes(0).size(), 0u);
  std::set<std::string> seen;
  for (int i = 0; i < 16; ++i) seen.insert(random_bytes(32));
  EXPECT_EQ(seen.size(), 16u);
}

TEST(Crypto, Sha256KnownAnswers) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Crypto, GenerateThenLoadKeyFile) {
  TempDir dir;
  const std::string path = dir.file("shard.key");
  generate_key_file(path);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  const std::string key = load_key_file(path);
  EXPECT_EQ(key.size(), kAesKeyBytes);
  EXPECT_EQ(aes256gcm_open(key, "", aes256gcm_seal(key, "", "ok")), "ok");

  generate_key_file(path);  // replaces it with a different key
  EXPECT_NE(load_key_file(path), key);
  // No temp files left beside it.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.str()), std::filesystem::directory_iterator()), 1);
}

TEST(Crypto, KeyFileOfWrongSizeIsRejectedNamingPathAndSize) {
  TempDir dir;
  const std::string path = dir.file("short.key");
  write_file_atomic(path, std::string(31, 'k'), 0600);
  const std::string msg = crypto_error([&] { load_key_file(path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("31"), std::string::npos) << msg;

  write_file_atomic(path, std::string(33, 'k'), 0600);
  EXPECT_NE(crypto_error([&] { load_key_file(path); }).find("33"), std::string::npos);
}

TEST(Crypto, MissingKeyFileNamesPath) {
  TempDir dir;
  const std::string path = dir.file("absent.key");
  try {
    load_key_file(path);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace shardguard

// One base64 (through OpenSSL) for Secrets, kubeconfigs and the shardctl pod files.
TEST(Base64, RoundTripsAndRefusesWhatIsNotBase64) {
  using shardguard::base64_decode;
  using shardguard::base64_encode;
  EXPECT_EQ(base64_encode(""), "");
  EXPECT_EQ(base64_encode("f"), "Zg==");
  EXPECT_EQ(base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(base64_encode(std::string("\xff\x00\xfe", 3)), "/wD+");
  for (const std::string& s : {std::string(""), std::string("f"), std::string("fo"), std::string("foo"),
                               std::string(1000, '\x01'), std::string("\0\0\0\xff", 4)}) {
    std::string out = "unchanged";
    ASSERT_TRUE(base64_decode(base64_encode(s), out));
    EXPECT_EQ(out, s);
  }
  for (const std::string& bad : {std::string("Zg="), std::string("Z==="), std::string("Zg==Zg=="),
                                 std::string("Zm9v\n"), std::string("Zm 9"), std::string("Zm9-"), std::string("=Zm9")}) {
    SCOPED_TRACE(bad);
    std::string out = "unchanged", why;
    EXPECT_FALSE(base64_decode(bad, out, &why));
    EXPECT_EQ(out, "unchanged");
    EXPECT_FALSE(why.empty());
  }
}

// The cause first, and the queue left empty for the next call.
TEST(OpensslError, NamesTheOldestErrorAndClearsTheQueue) {
  ERR_clear_error();
  const unsigned char garbage[] = {0x30, 0x03, 0x02, 0x01};
  const unsigned char* p = garbage;
  X509* cert = d2i_X509(nullptr, &p, sizeof garbage);
  ASSERT_EQ(cert, nullptr);
  const unsigned long oldest = ERR_peek_error();
  ASSERT_NE(oldest, 0u);
  char expected[256];
  ERR_error_string_n(oldest, expected, sizeof expected);
  EXPECT_EQ(shardguard::openssl_error(), expected);
  EXPECT_EQ(ERR_peek_error(), 0u);
  EXPECT_EQ(shardguard::openssl_error(), "unknown OpenSSL error");
}
