// gRPC's own log lines go through the JSON logger once the bridge is installed
// (issue 16 item 8): a binary's stderr is JSON lines throughout.
#include "shardguard/proto/grpc_log.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>

#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace shardguard::proto {
namespace {

TEST(GrpcLogTest, GrpcErrorsBecomeJsonLines) {
  route_grpc_logs_to_json();
  ::testing::internal::CaptureStderr();
  {
    // A TLS channel with a certificate that is no PEM: gRPC logs "Invalid cert chain
    // file." and friends at ERROR when it builds the handshaker.
    grpc::SslCredentialsOptions o;
    o.pem_cert_chain = "not a certificate";
    o.pem_private_key = "not a key";
    auto channel = grpc::CreateChannel("127.0.0.1:1", grpc::SslCredentials(o));
    channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  }
  const std::string err = ::testing::internal::GetCapturedStderr();
  std::istringstream lines(err);
  std::string line;
  int grpc_lines = 0;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(j.is_object()) << "not a JSON line: " << line;
    EXPECT_TRUE(j.contains("ts") && j.contains("level") && j.contains("msg")) << line;
    if (j.value("source", "") == "grpc") {
      ++grpc_lines;
      EXPECT_EQ(j.value("level", ""), "warn") << line;
      EXPECT_NE(j.value("file", "").find(".cc:"), std::string::npos) << line;
    }
  }
  EXPECT_GE(grpc_lines, 1) << "gRPC logged nothing this test could see:\n" << err;
}

}  // namespace
}  // namespace shardguard::proto
