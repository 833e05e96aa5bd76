#pragma once
// Deterministic threading for the multi-head layers.
//
// The layers spread independent work items over threads with
// mesaopt::parallel_for: (batch, head) pairs for the per-head ops, fixed chunks
// of token rows for the projection GEMMs, fixed blocks of weight rows for the
// weight-gradient GEMMs. Every item writes only its own memory, and no result
// depends on the partition: the per-head partition never depends on the
// thread count, and the projections' products give the same bits however
// their rows are cut (kernels/gemm.hpp; on one thread each product is one
// call). So results are bit-identical for any thread count.
//
// Eigen's own threading is held off by ScopedSerialEigen (common/parallel.hpp).
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


// parallel_for whose items may throw (detail::for_each_rethrow: the
// exception of the lowest item is rethrown after the OpenMP region).
template <class Body>
void parallel_for_rethrow(std::ptrdiff_t n, int num_threads, Body&& body) {
  for_each_rethrow(
      n, [num_threads](std::ptrdiff_t count, auto&& item) { parallel_for(count, num_threads, item); }, body);
}

// Number of chunks of `chunk` items covering n items.
inline long num_chunks(long n, long chunk) { return (n + chunk - 1) / chunk; }

}  // namespace mesaopt::detail
