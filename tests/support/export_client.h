// The export principal's side of ShardExport/Export, as tests call it: one request
// for [offset, offset + length) over mTLS with the given certificate, every chunk's
// bytes appended to *got (when given) in arrival order. Header-only: the callers
// already link the generated pipeline code.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include <grpcpp/grpcpp.h>

#include "shardguard/v1/pipeline.grpc.pb.h"
#include "support/grpc_echo.h"

namespace shardguard::testsupport {

// `check` sees every chunk before it is appended (e.g. to assert its range).
template <typename Check>
grpc::Status export_pull(const std::string& address, const std::string& cert_pem, const std::string& key_pem,
                         uint64_t offset, uint64_t length, std::string* got, Check check) {
  auto stub = v1::ShardExport::NewStub(tls_channel(address, cert_pem, key_pem));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::ExportRequest req;
  req.set_offset(offset);
  req.set_length(length);
  auto reader = stub->Export(&ctx, req);
  v1::ExportChunk chunk;
  while (reader->Read(&chunk)) {
    check(chunk);
    if (got) got->append(chunk.data());
  }
  return reader->Finish();
}

inline grpc::Status export_pull(const std::string& address, const std::string& cert_pem, const std::string& key_pem,
                                uint64_t offset, uint64_t length, std::string* got = nullptr) {
  return export_pull(address, cert_pem, key_pem, offset, length, got, [](const v1::ExportChunk&) {});
}

}  // namespace shardguard::testsupport
