#include "shardguard/shardd/transport.h"

#include "shardguard/model/model_desc.h"

namespace shardguard::shardd {

void check_frame_shape(const std::string& dtype, const std::vector<int64_t>& shape,
                       const std::vector<int64_t>& sample_shape, int64_t max_batch) {
  bool ok = dtype == "float32" && shape.size() == sample_shape.size() + 1;
  if (ok) {
    ok = shape[0] >= 1 && shape[0] <= max_batch;
    for (size_t i = 0; ok && i < sample_shape.size(); ++i) ok = shape[i + 1] == sample_shape[i];
  }
  if (!ok) {
    const std::string want = "float32[1.." + std::to_string(max_batch) +
                             model::shape_str(sample_shape).replace(0, 1, ", ");
    throw FrameError("expected a tensor " + want + ", received " + dtype + model::shape_str(shape));
  }
}

}  // namespace shardguard::shardd
