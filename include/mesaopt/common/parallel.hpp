#pragma once
// Thread-parallel loops over independent work items (e.g. (batch, head) pairs).
// OpenMP when the translation unit is compiled with it, serial otherwise.
// Each item writes only its own outputs, so results are bit-identical for any
// thread count; reductions across items are done by the caller in a fixed order.
#include <cstddef>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mesaopt {

// Threads the library uses when a call does not say: OpenMP's default, or 1.
inline int default_num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Calls body(i) for i in [0, n) on up to `num_threads` threads (<= 0: default).
template <class Body>
void parallel_for(std::ptrdiff_t n, int num_threads, Body&& body) {
#if defined(_OPENMP)
  const int threads = num_threads > 0 ? num_threads : default_num_threads();
  if (threads > 1 && n > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (std::ptrdiff_t i = 0; i < n; ++i) body(i);
    return;
  }
#else
  (void)num_threads;
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) body(i);
}

}  // namespace mesaopt
