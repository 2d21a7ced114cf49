// The manifest and the sealed package container of split models (model/package.h),
// without LibTorch: round trips, and what open_package refuses before and after
// decryption.
#include "shardguard/model/package.h"

#include <gtest/gtest.h>

#include "shardguard/common/crypto.h"

namespace shardguard::model {
namespace {

PackageManifest two_shards() {
  PackageManifest m;
  m.split_id = "0123456789abcdef0123456789abcdef";
  m.source_sha256 = std::string(64, 'a');
  m.job = "lm";
  m.attribute = "blocks";
  for (int i = 0; i < 3; ++i) {
    m.blocks.push_back({i, "blocks." + std::to_string(i), "__torch__.Layer", {16, 32}, {16, 32}, "float32",
                        "float32", 100 * (i + 1)});
  }
  m.shards.push_back({0, 0, 2, 300, 0.5, {{"block0.w", {10, 10}, 100}, {"block1.w", {200}, 200}},
                      package_file_name(0), "", 0});
  m.shards.push_back({1, 2, 3, 300, 0.5, {{"block2.w", {300}, 300}}, package_file_name(1), "", 0});
  return m;
}

std::string shard_text(const PackageManifest& m, int shard) { return "archive of shard " + std::to_string(shard); }

TEST(PackageTest, ManifestRoundTripsAndDescribesTheBlocks) {
  const auto m = two_shards();
  const auto back = parse_manifest(to_json(m).dump(), "m.json");
  EXPECT_EQ(to_json(back), to_json(m));
  EXPECT_EQ(back.parameters(), 600);
  const auto d = back.desc();
  ASSERT_EQ(d.blocks.size(), 3u);
  EXPECT_EQ(d.blocks[2].name, "blocks.2");
  EXPECT_EQ(d.blocks[2].parameters, 300);
  EXPECT_EQ(d.parameters(), 600);
}

TEST(PackageTest, ManifestErrorsNameTheField) {
  auto j = to_json(two_shards());
  j["shards"][1].erase("sha256");
  try {
    manifest_from_json(j, "m.json");
    FAIL();
  } catch (const PackageError& e) {
    EXPECT_STREQ(e.what(), "manifest m.json: shards[1].sha256 is missing");
  }
  j = to_json(two_shards());
  j["shards"][1]["blocks"] = {1, 3};  // overlaps shard 0
  EXPECT_THROW(manifest_from_json(j, "m.json"), PackageError);
  j = to_json(two_shards());
  j["shards"].erase(1);  // block 2 uncovered
  try {
    manifest_from_json(j, "m.json");
    FAIL();
  } catch (const PackageError& e) {
    EXPECT_NE(std::string(e.what()).find("cover blocks 0..1 of 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_manifest("{", "m.json"), PackageError);
}

TEST(PackageTest, SealedPackageOpensOnlyWithItsKeyDigestAndHeader) {
  auto m = two_shards();
  const std::string k0 = random_bytes(kAesKeyBytes), k1 = random_bytes(kAesKeyBytes);
  const std::string p0 = seal_package({m.split_id, 0, 2, 0, 2}, k0, shard_text(m, 0));
  const std::string p1 = seal_package({m.split_id, 1, 2, 2, 3}, k1, shard_text(m, 1));
  m.shards[0].sha256 = sha256_hex(p0);
  m.shards[1].sha256 = sha256_hex(p1);
  EXPECT_EQ(open_package(p0, k0, m, 0, "p0"), shard_text(m, 0));
  EXPECT_EQ(open_package(p1, k1, m, 1, "p1"), shard_text(m, 1));
  // The plaintext is not in the file.
  EXPECT_EQ(p0.find(shard_text(m, 0)), std::string::npos);

  auto refused = [&](const std::string& bytes, const std::string& key, const PackageManifest& man, int shard) {
    try {
      open_package(bytes, key, man, shard, "pkg");
    } catch (const PackageError& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "opened";
    return std::string();
  };
  EXPECT_NE(refused(p0, k1, m, 0).find("refused: authentication failed"), std::string::npos);
  std::string bad = p0;
  bad.back() ^= 1;
  EXPECT_NE(refused(bad, k0, m, 0).find("SHA-256"), std::string::npos);
  auto forged = m;
  forged.shards[0].sha256 = sha256_hex(bad);
  EXPECT_NE(refused(bad, k0, forged, 0).find("authentication failed"), std::string::npos);
  forged.shards[0].sha256 = sha256_hex(p1);
  EXPECT_NE(refused(p1, k1, forged, 0).find("is shard 1 of 2"), std::string::npos);
  // A package of another split (same shard, same blocks) is refused by its header.
  const std::string other = seal_package({"ffff", 0, 2, 0, 2}, k0, shard_text(m, 0));
  forged = m;
  forged.shards[0].sha256 = sha256_hex(other);
  EXPECT_NE(refused(other, k0, forged, 0).find("of split ffff"), std::string::npos);
  EXPECT_NE(refused(p0, k0, m, 2).find("shard 2 is not in the manifest"), std::string::npos);
}

}  // namespace
}  // namespace shardguard::model
