#include "shardguard/shardd/tensor_codec.h"

#include <cstring>
#include <memory>

#include "shardguard/model/model_desc.h"

namespace shardguard::shardd {
namespace {

const char* dtype_name(v1::DType d) {
  switch (d) {
    case v1::DTYPE_FLOAT32: return "float32";
    case v1::DTYPE_INT64: return "int64";
    default: return "unspecified";
  }
}

}  // namespace

void encode_tensor(const torch::Tensor& tensor, v1::Tensor* msg) {
  const auto t = tensor.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  msg->set_dtype(v1::DTYPE_FLOAT32);
  msg->clear_shape();
  for (auto d : t.sizes()) msg->add_shape(d);
  msg->set_data(t.data_ptr(), static_cast<size_t>(t.numel()) * sizeof(float));
}

std::string describe(const v1::Tensor& msg) {
  return std::string(dtype_name(msg.dtype())) + model::shape_str({msg.shape().begin(), msg.shape().end()});
}

torch::Tensor decode_tensor(v1::Tensor* msg, const std::vector<int64_t>& sample_shape, int64_t max_batch) {
  const std::vector<int64_t> shape(msg->shape().begin(), msg->shape().end());
  check_frame_shape(dtype_name(msg->dtype()), shape, sample_shape, max_batch);
  int64_t numel = 1;
  for (auto d : shape) numel *= d;
  if (msg->data().size() != static_cast<size_t>(numel) * sizeof(float)) {
    throw FrameError("tensor " + describe(*msg) + " must carry " + std::to_string(numel * 4) + " bytes, received " +
                     std::to_string(msg->data().size()));
  }
  auto holder = std::make_shared<std::string>(std::move(*msg->mutable_data()));
  return torch::from_blob(holder->data(), shape, [holder](void*) mutable { holder.reset(); },
                          torch::TensorOptions().dtype(torch::kFloat32));
}

}  // namespace shardguard::shardd
