#pragma once
// Deterministic threading for the multi-head layers.
//
// The layers spread independent work items over threads with
// mesaopt::parallel_for: (batch, head) pairs for the per-head ops, fixed chunks
// of token rows for the projection GEMMs, fixed blocks of weight rows for the
// weight-gradient GEMMs. The partition never depends on the thread count and
// every item writes only its own memory, so results are bit-identical for any
// thread count.
//
// One trap: Eigen multithreads a large GEMM with OpenMP when it is called
// outside a parallel region, and then picks its cache blocking (the order of
// the sums over the inner dimension) from the thread count. Inside a parallel
// region Eigen runs serially. So when a layer runs on one thread (no region is
// opened) its GEMMs would be computed by Eigen on omp_get_max_threads() threads
// with a different blocking than the same GEMMs inside the 2-thread region.
// ScopedSerialEigen sets the calling thread's OpenMP default team size
// (nthreads-var, a per-thread ICV: other user threads are unaffected) to 1 for
// the duration of a layer call, so Eigen runs every GEMM serially; the layers
// pass their thread count to parallel_for explicitly. (If a program calls
// Eigen::setNbThreads(n > 1) itself, Eigen ignores OpenMP's setting and this
// guarantee is lost; the layers do not touch that global.)
#include <mesaopt/common/parallel.hpp>

#include <cstddef>
#include <exception>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mesaopt::detail {

// The thread count a layer uses: `requested` when > 0, else the library default.
inline int resolve_num_threads(int requested) { return requested > 0 ? requested : default_num_threads(); }

// While alive, Eigen's GEMMs called from this thread run single-threaded.
class ScopedSerialEigen {
 public:
  ScopedSerialEigen() {
#if defined(_OPENMP)
    saved_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
  ~ScopedSerialEigen() {
#if defined(_OPENMP)
    omp_set_num_threads(saved_);
#endif
  }
  ScopedSerialEigen(const ScopedSerialEigen&) = delete;
  ScopedSerialEigen& operator=(const ScopedSerialEigen&) = delete;

 private:
  int saved_ = 1;
};

// parallel_for whose items may throw: every item's exception is caught into
// its own slot (no exception crosses the OpenMP region, which would terminate)
// and the one from the lowest item index is rethrown afterwards. Inputs are
// validated before the layers get here; this is a safety net (e.g. bad_alloc).
template <class Body>
void parallel_for_rethrow(std::ptrdiff_t n, int num_threads, Body&& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n > 0 ? n : 0));
  parallel_for(n, num_threads, [&](std::ptrdiff_t i) {
    try {
      body(i);
    } catch (...) {
      errors[static_cast<std::size_t>(i)] = std::current_exception();
    }
  });
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Number of chunks of `chunk` items covering n items.
inline long num_chunks(long n, long chunk) { return (n + chunk - 1) / chunk; }

}  // namespace mesaopt::detail
