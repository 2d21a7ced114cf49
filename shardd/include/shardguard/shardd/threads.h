#pragma once

namespace shardguard::shardd {

// Sets LibTorch's intra-op threads and, when the BLAS in use is OpenBLAS, its
// thread count too, so that the two pools do not fight over the same cores.
// threads <= 0 keeps the defaults.
void set_compute_threads(int threads);

}  // namespace shardguard::shardd
