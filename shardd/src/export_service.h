// ShardExport (pipeline.proto): serves this shard's parameters as of its newest
// checkpoint. Only the sidecar in front of shardd decides who may call it
// (docs/pipeline.md, "Parameter export").
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include <torch/nn/modules/container/sequential.h>

#include "shardguard/v1/pipeline.grpc.pb.h"

namespace shardguard::shardd {

class ExportService final : public v1::ShardExport::Service {
 public:
  static constexpr size_t kChunkBytes = 1 << 20;

  // Copies the parameters (to CPU, float32) into a new snapshot; an export in
  // progress keeps the one it started with. The engine's thread (ParameterSink).
  void publish(const torch::nn::Sequential& model, int64_t step);

  grpc::Status Export(grpc::ServerContext* ctx, const v1::ExportRequest* req,
                      grpc::ServerWriter<v1::ExportChunk>* writer) override;

 private:
  std::mutex mu_;
  std::shared_ptr<const std::string> snapshot_;
  int64_t step_ = 0;
};

}  // namespace shardguard::shardd
