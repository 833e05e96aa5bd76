#pragma once
// Thread-parallel loops over independent work items (e.g. (batch, head) pairs).
// OpenMP when the translation unit is compiled with it, serial otherwise.
// Each item writes only its own outputs, so results are bit-identical for any
// thread count; reductions across items are done by the caller in a fixed order.
#include <cstddef>
#include <type_traits>
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

// Threads a parallel loop over n items with `num_threads` (<= 0: default)
// runs on (the team size): the bound of the worker index a loop body may take.
inline int parallel_team_size(std::ptrdiff_t n, int num_threads) {
#if defined(_OPENMP)
  const int threads = num_threads > 0 ? num_threads : default_num_threads();
  if (threads > 1 && n > 1) return threads < n ? threads : int(n);
#else
  (void)num_threads;
#endif
  return n > 0 ? 1 : 0;
}

namespace detail {

// The loop behind parallel_for (static: item i always goes to the same thread
// of a team) and parallel_for_dynamic (items handed out in order to whichever
// thread is free). Serial for one thread or item, or without OpenMP. The body
// is called as body(i), or as body(i, worker) when it takes two arguments:
// worker in [0, parallel_team_size(n, num_threads)) names the thread of this
// loop's team running item i (0 in the serial case, even inside an enclosing
// parallel region), for per-worker scratch.
template <class Body>
void call_item(Body& body, std::ptrdiff_t i, int worker) {
  if constexpr (std::is_invocable_v<Body&, std::ptrdiff_t, int>) body(i, worker);
  else {
    (void)worker;
    body(i);
  }
}

template <class Body>
void parallel_loop(std::ptrdiff_t n, int num_threads, bool dynamic, Body&& body) {
#if defined(_OPENMP)
  const int team = parallel_team_size(n, num_threads);
  if (team > 1) {
    if (dynamic) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
      for (std::ptrdiff_t i = 0; i < n; ++i) call_item(body, i, omp_get_thread_num());
    } else {
#pragma omp parallel for schedule(static) num_threads(team)
      for (std::ptrdiff_t i = 0; i < n; ++i) call_item(body, i, omp_get_thread_num());
    }
    return;
  }
#else
  (void)num_threads;
  (void)dynamic;
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) call_item(body, i, 0);
}

}  // namespace detail

// Calls body(i) for i in [0, n) on up to `num_threads` threads (<= 0: default).
template <class Body>
void parallel_for(std::ptrdiff_t n, int num_threads, Body&& body) {
  detail::parallel_loop(n, num_threads, false, body);
}

// Calls body(i) for i in [0, n) on up to `num_threads` threads (<= 0:
// default), handing out items one at a time in index order to whichever
// thread is free (dynamic schedule). For items of uneven cost or a machine
// whose cores are shared: a thread that is descheduled holds up only the item
// it is running, the others take the rest. The caller must make each item's
// result independent of the thread that runs it. body(i) or body(i, worker)
// (detail::parallel_loop).
template <class Body>
void parallel_for_dynamic(std::ptrdiff_t n, int num_threads, Body&& body) {
  detail::parallel_loop(n, num_threads, true, body);
}

namespace detail {

// Eigen multithreads a large GEMM with OpenMP when it is called
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
// guarantee is lost; mesaopt never touches that global.)
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

}  // namespace detail

}  // namespace mesaopt
