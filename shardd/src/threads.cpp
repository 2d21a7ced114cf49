#include "shardguard/shardd/threads.h"

#include <dlfcn.h>

#include <ATen/Parallel.h>

namespace shardguard::shardd {

void set_compute_threads(int threads) {
  if (threads <= 0) return;
  at::set_num_threads(threads);
  // libblas.so.3 is OpenBLAS when libopenblas0-pthread is installed (make deps);
  // look the symbol up instead of linking it, so another BLAS still works.
  using SetThreads = void (*)(int);
  if (auto fn = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) fn(threads);
}

}  // namespace shardguard::shardd
