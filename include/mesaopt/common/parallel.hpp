#pragma once
// Thread-parallel loops over independent work items (e.g. (batch, head) pairs).
// OpenMP when the translation unit is compiled with it, serial otherwise.
// Each item writes only its own outputs, so results are bit-identical for any
// thread count; reductions across items are done by the caller in a fixed order.
#include <atomic>
#include <cstddef>
#include <exception>
#include <type_traits>
#include <vector>
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

// A loop whose items may throw, on any threads: loop(n, item) must call
// item(i) once for every i in [0, n). Every item's exception is caught into
// its own slot (none crosses the threads, where it would terminate) and the
// one of the lowest index is rethrown after the loop. The callers validate
// their inputs first; this is a safety net (e.g. std::bad_alloc).
template <class Loop, class Body>
void for_each_rethrow(std::ptrdiff_t n, Loop&& loop, Body&& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n > 0 ? n : 0));
  loop(n, [&](std::ptrdiff_t i) {
    try {
      body(i);
    } catch (...) {
      errors[static_cast<std::size_t>(i)] = std::current_exception();
    }
  });
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// A three-stage pipeline over n items: pre(i) and post(i) may run on any
// thread and in parallel with other items' stages, seq(i) runs strictly in
// item order (seq(i) after seq(i - 1)), and each item's stages run in the order
// pre(i), seq(i), post(i). This is the shape of a scan whose carried value is
// cheap to advance but whose per-item work is not: seq carries the value from
// item to item, pre prepares what seq(i) needs without the carried value, post
// finishes item i with it. Any stage may be a no-op. `window` >= 1 bounds how
// far ahead the pipeline runs: pre(i) starts only after post(i - window) has
// finished, so a caller may keep per-item scratch in window slots (i % window).
//
// With OpenMP every stage is a task, and the order above is the tasks'
// dependences: pre(i) on post(i - window), seq(i) on pre(i) and seq(i - 1),
// post(i) on seq(i). The calling thread (the team's master) creates them all,
// then every thread of the team runs them as they become ready. No busy
// waiting of our own: idle threads wait in the OpenMP runtime. There is
// deliberately no `taskwait depend`: LLVM's libomp before 19 (clang 14 in
// Debian 12) keeps that construct's dependence node on the waiting thread's
// stack and may still touch it after the wait returns (LLVM issue 85963), which
// corrupted the runtime's allocator in CI (docs/building.md, "OpenMP").
// Serial in item order (pre, seq, post of item 0, then of item 1, ...) for one
// thread or item, or without OpenMP. Every stage sees its inputs exactly as in
// the serial order, so results are bit-identical for any thread count as long
// as each stage writes only its own item's outputs and seq alone touches the
// carried value. An exception from a stage is caught; after a failed pre or
// seq the later items' stages are skipped, and the exception the serial order
// would have thrown first (lowest item; pre, then seq, then post) is rethrown
// after the loop.
template <class Pre, class Seq, class Post>
void ordered_pipeline(std::ptrdiff_t n, int num_threads, std::ptrdiff_t window, Pre&& pre, Seq&& seq, Post&& post) {
#if defined(_OPENMP)
  const int team = parallel_team_size(n, num_threads);
  if (team > 1) {
    if (window < 1) window = 1;
    const std::size_t un = static_cast<std::size_t>(n);
    // Dependence addresses: pd[i] pre(i) done, sd[i + 1] seq(i) done (sd[0]
    // is never written: seq(0) waits for no seq), qd[i] post(i) done.
    std::vector<char> deps(3 * un + 1);
    std::vector<std::exception_ptr> err_pre(un), err_seq(un), err_post(un);
    std::vector<char> seq_ran(un, 0);  // seq(i) returned normally: post(i) may run
    // The lowest item whose pre or seq failed (n: none). Stages of later items
    // are skipped (their results are never used: the exception is rethrown).
    std::atomic<std::ptrdiff_t> failed{n};
    const auto fail_at = [&failed](std::ptrdiff_t i) {
      std::ptrdiff_t f = failed.load();
      while (i < f && !failed.compare_exchange_weak(f, i)) {
      }
    };
    const auto run_pre = [&](std::ptrdiff_t i) {
      if (failed.load() < i) return;
      try {
        pre(i);
      } catch (...) {
        err_pre[static_cast<std::size_t>(i)] = std::current_exception();
        fail_at(i);
      }
    };
    const auto run_seq = [&](std::ptrdiff_t i) {
      if (failed.load() <= i) return;  // this item's pre, or an earlier pre or seq, failed
      try {
        seq(i);
        seq_ran[static_cast<std::size_t>(i)] = 1;
      } catch (...) {
        err_seq[static_cast<std::size_t>(i)] = std::current_exception();
        fail_at(i);
      }
    };
    const auto run_post = [&](std::ptrdiff_t i) {
      if (!seq_ran[static_cast<std::size_t>(i)]) return;
      try {
        post(i);
      } catch (...) {
        err_post[static_cast<std::size_t>(i)] = std::current_exception();
      }
    };
    char* pd = deps.data();
    char* sd = pd + un;
    char* qd = sd + un + 1;
    // master, not single: the thread that creates the tasks is then always the
    // calling one (with single, a worker thread's dependence table leaked in
    // GCC 12's libgomp under LeakSanitizer). The other threads start on tasks
    // at once; all wait for the rest in the region's closing barrier, which
    // also ends every task.
#pragma omp parallel num_threads(team)
#pragma omp master
    {
      for (std::ptrdiff_t i = 0; i < n; ++i) {
        if (i < window) {
#pragma omp task firstprivate(i) shared(run_pre) depend(out : pd[i:1])
          run_pre(i);
        } else {
          const std::ptrdiff_t j = i - window;
#pragma omp task firstprivate(i, j) shared(run_pre) depend(in : qd[j:1]) depend(out : pd[i:1])
          run_pre(i);
        }
#pragma omp task firstprivate(i) shared(run_seq) depend(in : pd[i:1], sd[i:1]) depend(out : sd[i + 1:1])
        run_seq(i);
#pragma omp task firstprivate(i) shared(run_post) depend(in : sd[i + 1:1]) depend(out : qd[i:1])
        run_post(i);
      }
    }  // the region's closing barrier: every task has finished
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      const std::size_t u = static_cast<std::size_t>(i);
      if (err_pre[u]) std::rethrow_exception(err_pre[u]);
      if (err_seq[u]) std::rethrow_exception(err_seq[u]);
      if (err_post[u]) std::rethrow_exception(err_post[u]);
    }
    return;
  }
#else
  (void)num_threads;
#endif
  (void)window;
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    pre(i);
    seq(i);
    post(i);
  }
}

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
  [[maybe_unused]] int saved_ = 1;  // unused without OpenMP
};

}  // namespace detail

}  // namespace mesaopt
