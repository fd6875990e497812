// Keeps an OpenBLAS thread pool from fighting our own threads.
//
// The CPU kernels split work over (batch, head) with at::parallel_for and call small GEMMs
// (one chunk: 64 x 64 x 128) inside. OpenBLAS (Debian's torch links it) runs every GEMM on its own
// pthread pool, which torch.set_num_threads does not govern: nested inside our OpenMP threads it
// oversubscribes the cores and spins (measured on 2 cores, T=8192 forward: 3.9 s vs 0.14 s with
// OpenBLAS at one thread). While our threads are busy, OpenBLAS therefore runs single-threaded.
// The symbols are looked up at run time so other BLAS builds (MKL, reference BLAS) are untouched.
#pragma once

#include <dlfcn.h>

namespace retention {

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    static const auto api = lookup();
    if (api.get != nullptr && api.set != nullptr) {
      set_ = api.set;
      saved_ = api.get();
      if (saved_ > 1) set_(1);
    }
  }
  ~SingleThreadedBlas() {
    if (set_ != nullptr && saved_ > 1) set_(saved_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  using GetFn = int (*)();
  using SetFn = void (*)(int);
  struct Api {
    GetFn get;
    SetFn set;
  };
  static Api lookup() {
    return {reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")),
            reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))};
  }
  SetFn set_ = nullptr;
  int saved_ = 0;
};

}  // namespace retention
