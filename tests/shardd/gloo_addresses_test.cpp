// The rewriting of Gloo's rendezvous addresses behind the replica tunnels (issue 20).
#include "shardguard/shardd/gloo_addresses.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include <gloo/transport/tcp/attr.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/context.h>
#include <gloo/transport/pair.h>
#include <gtest/gtest.h>

#include "support/temp_dir.h"

namespace shardguard::shardd {
namespace {

// One address as Gloo lays it out: sockaddr_storage, then the sequence number.
std::vector<uint8_t> address(const char* ip, int port, int64_t seq) {
  std::vector<uint8_t> out(kGlooAddressBytes, 0);
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, ip, &in.sin_addr);
  std::memcpy(out.data(), &in, sizeof(in));
  std::memcpy(out.data() + sizeof(sockaddr_storage), &seq, sizeof(seq));
  return out;
}

std::vector<uint8_t> concat(std::initializer_list<std::vector<uint8_t>> parts) {
  std::vector<uint8_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

TEST(GlooAddresses, OnlyTheNumberedKeysHoldAddresses) {
  EXPECT_EQ(gloo_address_key_rank("incarnation/0/0/2"), 2);
  EXPECT_EQ(gloo_address_key_rank("0/13"), 13);
  EXPECT_EQ(gloo_address_key_rank("7"), 7);
  EXPECT_FALSE(gloo_address_key_rank("0/rank_1").has_value());
  EXPECT_FALSE(gloo_address_key_rank("joins").has_value());
  EXPECT_FALSE(gloo_address_key_rank("0/").has_value());
  EXPECT_FALSE(gloo_address_key_rank("0/1x").has_value());
  EXPECT_FALSE(gloo_address_key_rank("0/12345678").has_value());
}

// The layout this file assumes is the one of the Gloo LibTorch links: a real pair's
// address, as Gloo publishes it, parses to the host its device was made for.
TEST(GlooAddresses, TheLayoutIsTheLinkedGloos) {
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.77.0.1";
  auto device = gloo::transport::tcp::CreateDevice(attr);
  auto context = device->createContext(0, 2);
  auto& pair = context->createPair(1);
  const auto bytes = pair->address().bytes();
  ASSERT_EQ(bytes.size(), kGlooAddressBytes);
  const auto got = gloo_listeners(std::vector<uint8_t>(bytes.begin(), bytes.end()), 0, 2);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got.at(1).rfind("127.77.0.1:", 0), 0u) << got.at(1);
  EXPECT_NE(got.at(1), "127.77.0.1:0");
}

TEST(GlooAddresses, ListenersAreKeyedByTheOtherRanksInOrder) {
  // Rank 1 of 3 publishes its pairs with ranks 0 and 2.
  const auto blob = concat({address("127.77.0.2", 41000, 0), address("127.77.0.2", 42000, 1)});
  const auto got = gloo_listeners(blob, 1, 3);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got.at(0), "127.77.0.2:41000");
  EXPECT_EQ(got.at(2), "127.77.0.2:42000");
}

TEST(GlooAddresses, RewriteKeepsSequenceNumbersAndReplacesEveryAddress) {
  const auto blob = concat({address("127.77.0.1", 41000, 5), address("127.77.0.1", 42000, 6)});
  const auto out = rewrite_gloo_addresses(blob, 0, 3, "127.77.0.1", 7101);
  ASSERT_EQ(out.size(), blob.size());
  const auto got = gloo_listeners(out, 0, 3);
  EXPECT_EQ(got.at(1), "127.77.0.1:7101");
  EXPECT_EQ(got.at(2), "127.77.0.1:7101");
  for (int k = 0; k < 2; ++k) {
    int64_t seq = 0;
    std::memcpy(&seq, out.data() + k * kGlooAddressBytes + sizeof(sockaddr_storage), sizeof(seq));
    EXPECT_EQ(seq, 5 + k);
  }
}

TEST(GlooAddresses, RefusesWhatIsNotTheGlooItWasWrittenFor) {
  const auto one = address("127.77.0.1", 41000, 0);
  // Wrong length: another Gloo's layout, or another group size.
  EXPECT_THROW(gloo_listeners(concat({one, one}), 0, 2), std::runtime_error);
  EXPECT_THROW(gloo_listeners(std::vector<uint8_t>(one.begin(), one.end() - 1), 0, 2), std::runtime_error);
  // IPv6 (or anything not IPv4).
  auto v6 = one;
  const sa_family_t family = AF_INET6;
  std::memcpy(v6.data(), &family, sizeof(family));
  try {
    gloo_listeners(v6, 0, 2);
    FAIL() << "an IPv6 address was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not IPv4"), std::string::npos) << e.what();
  }
  EXPECT_THROW(rewrite_gloo_addresses(one, 0, 2, "localhost", 7101), std::invalid_argument);
  EXPECT_THROW(rewrite_gloo_addresses(one, 0, 2, "127.0.0.1", 0), std::invalid_argument);
  EXPECT_THROW(gloo_listeners(one, 2, 2), std::invalid_argument);
}

TEST(GlooAddresses, TunnelMapIsWrittenWholeLineByLine) {
  testsupport::TempDir dir;
  const std::string path = dir.path().string() + "/gloo.map";
  write_tunnel_map(path, {{"spiffe://td/ns/a/job/j/shard/0/replica/1", "127.77.0.1:41000"},
                          {"spiffe://td/ns/a/job/j/shard/0/replica/2", "127.77.0.1:42000"}});
  write_tunnel_map(path, {{"spiffe://td/ns/a/job/j/shard/0/replica/1", "127.77.0.1:43000"}});
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), "spiffe://td/ns/a/job/j/shard/0/replica/1 127.77.0.1:43000\n");
  EXPECT_THROW(write_tunnel_map(dir.path().string() + "/missing/gloo.map", {}), std::runtime_error);
}

}  // namespace
}  // namespace shardguard::shardd
