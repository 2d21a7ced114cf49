// The pure pieces of the HTTP/2 relay (sidecar/h2/grpc_frames.h), without I/O.
#include "shardguard/sidecar/h2/grpc_frames.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace shardguard::sidecar::h2 {
namespace {

std::string framed(const std::string& payload, bool compressed = false) {
  return grpc_prefix(compressed, static_cast<uint32_t>(payload.size())) + payload;
}

TEST(GrpcFrameInspector, ReadsPrefixesAcrossEveryPossibleCut) {
  const std::string stream = framed("hello") + framed("") + framed(std::string(300, 'x'), true) + framed("z");
  for (size_t cut = 1; cut <= stream.size(); ++cut) {
    GrpcFrameInspector inspector(1024, true);
    std::vector<GrpcMessage> out;
    for (size_t pos = 0; pos < stream.size(); pos += cut)
      ASSERT_EQ(inspector.feed(std::string_view(stream).substr(pos, cut), &out), GrpcFrameInspector::Result::ok);
    ASSERT_EQ(out.size(), 4u) << "cut " << cut;
    EXPECT_EQ(out[0].payload, "hello");
    EXPECT_EQ(out[1].payload, "");
    EXPECT_EQ(out[2].payload, std::string(300, 'x'));
    EXPECT_TRUE(out[2].compressed);
    EXPECT_FALSE(out[3].compressed);
    EXPECT_EQ(inspector.messages(), 4u);
    EXPECT_FALSE(inspector.mid_message());
  }
}

TEST(GrpcFrameInspector, RefusesFromThePrefixBeforeAnyPayload) {
  GrpcFrameInspector inspector(100, false);
  EXPECT_EQ(inspector.feed(framed(std::string(100, 'a'))), GrpcFrameInspector::Result::ok);
  // Only the 5 prefix bytes of a 4 GiB message: refused at once.
  std::string prefix = grpc_prefix(false, 0xffffffffu);
  EXPECT_EQ(inspector.feed(prefix.substr(0, 3)), GrpcFrameInspector::Result::ok);
  EXPECT_EQ(inspector.feed(prefix.substr(3)), GrpcFrameInspector::Result::too_large);
  EXPECT_EQ(inspector.announced(), 0xffffffffu);
  EXPECT_TRUE(inspector.failed());
  EXPECT_EQ(inspector.feed("x"), GrpcFrameInspector::Result::too_large);
}

TEST(GrpcFrameInspector, StreamsWithoutCollectingHoldNothing) {
  GrpcFrameInspector inspector(1 << 20, false);
  std::vector<GrpcMessage> out;
  EXPECT_EQ(inspector.feed(framed(std::string(1000, 'q')), &out), GrpcFrameInspector::Result::ok);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(inspector.feed(grpc_prefix(false, 10) + "abc"), GrpcFrameInspector::Result::ok);
  EXPECT_TRUE(inspector.mid_message());
}

TEST(GrpcMessageEncoding, PercentEncodesAsGrpcDoes) {
  EXPECT_EQ(percent_encode_grpc_message("plain text: ok"), "plain text: ok");
  EXPECT_EQ(percent_encode_grpc_message("100%"), "100%25");
  EXPECT_EQ(percent_encode_grpc_message("a\nb"), "a%0Ab");
  EXPECT_EQ(percent_encode_grpc_message("\xc3\xbc"), "%C3%BC");
  const std::string any = "rule x: 50% \x01\xff\xc3\xbc end";
  EXPECT_EQ(percent_decode_grpc_message(percent_encode_grpc_message(any)), any);
  EXPECT_EQ(percent_decode_grpc_message("bad %G1 and %4"), "bad %G1 and %4");
}

TEST(GrpcStatus, ParsesOnlySmallDecimals) {
  EXPECT_EQ(parse_grpc_status("0"), 0);
  EXPECT_EQ(parse_grpc_status("14"), 14);
  EXPECT_EQ(parse_grpc_status(""), -1);
  EXPECT_EQ(parse_grpc_status("1a"), -1);
  EXPECT_EQ(parse_grpc_status("123"), -1);
  EXPECT_EQ(header_field_size("ab", "cde"), 37u);
}

}  // namespace
}  // namespace shardguard::sidecar::h2
