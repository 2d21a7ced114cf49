#include "export_service.h"

#include <algorithm>

namespace shardguard::shardd {

void ExportService::publish(const torch::nn::Sequential& model, int64_t step) {
  auto bytes = std::make_shared<std::string>();
  for (const auto& p : model->parameters()) {
    const auto t = p.detach().to(torch::kCPU, torch::kFloat32).contiguous();
    bytes->append(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel()) * sizeof(float));
  }
  std::lock_guard<std::mutex> lock(mu_);
  snapshot_ = std::move(bytes);
  step_ = step;
}

grpc::Status ExportService::Export(grpc::ServerContext* ctx, const v1::ExportRequest* req,
                                   grpc::ServerWriter<v1::ExportChunk>* writer) {
  std::shared_ptr<const std::string> bytes;
  int64_t step = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    bytes = snapshot_;
    step = step_;
  }
  if (!bytes) return {grpc::StatusCode::UNAVAILABLE, "no checkpoint written yet: nothing to export"};
  const uint64_t total = bytes->size();
  if (req->length() == 0 || req->offset() >= total || req->length() > total - req->offset()) {
    return {grpc::StatusCode::OUT_OF_RANGE, "range [" + std::to_string(req->offset()) + ", +" +
                                                std::to_string(req->length()) + ") is not within the shard's " +
                                                std::to_string(total) + " parameter bytes"};
  }
  for (uint64_t at = req->offset(), end = req->offset() + req->length(); at < end && !ctx->IsCancelled();) {
    const uint64_t n = std::min<uint64_t>(kChunkBytes, end - at);
    v1::ExportChunk chunk;
    chunk.set_offset(at);
    chunk.set_data(bytes->data() + at, n);
    chunk.set_total_bytes(total);
    chunk.set_step(step);
    if (!writer->Write(chunk)) return {grpc::StatusCode::CANCELLED, "the caller went away"};
    at += n;
  }
  return grpc::Status::OK;
}

}  // namespace shardguard::shardd
