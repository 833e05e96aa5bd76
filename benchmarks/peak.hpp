#pragma once
// Measures this machine's FMA peak with xsimd so that every benchmark can quote
// its GFLOP/s as a fraction of measured (not datasheet) peak:
//   const double peak = mesaopt::bench::peak_flops<float>(1);   // flop/s, one core
//   ... state.counters["peak_frac"] = benchmark::Counter(flops / peak,
//                                      benchmark::Counter::kIsIterationInvariantRate);
// (see bench_kernels.cpp; benchmarks/peak.cpp reports the same numbers with
// Google Benchmark, on 1 and 2 threads).
//
// Timing uses each thread's own CPU time (CLOCK_THREAD_CPUTIME_ID where
// available), not the wall clock: the machine is shared, and a burst that gets
// preempted half-way would otherwise under-report the peak. Google Benchmark's
// default "CPU" time is also CPU time, so kernel rates and the peak are measured
// on the same clock. For threads > 1 the peak is the sum of the per-thread rates
// of threads that run at the same time (so it includes any clock drop when all
// cores are busy); benchmarks/peak.cpp also reports the wall-clock rate.
#include <mesaopt/kernels/simd.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <time.h>
#endif

namespace mesaopt::bench {

namespace detail {

// Seconds of CPU time used by the calling thread (wall clock as a fallback).
inline double thread_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
#else
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
#endif
}

// Independent FMA chains in fma_burst: FMA latency is 4 cycles and two issue
// per cycle, so at least 8 must be in flight; 12 leaves slack and still fits in
// the 16 AVX2 registers together with the two operands.
inline constexpr int kChains = 12;

// Flops done by fma_burst(iterations).
template <class T>
double burst_flops(std::size_t iterations) {
  return 2.0 * kChains * static_cast<double>(kernels::simd_width<T>) * static_cast<double>(iterations);
}

// `iterations` rounds of kChains independent FMAs acc = acc * x + y. With
// x = 0.999999 and y = 1e-7 every chain converges to 0.1: no overflow, no
// denormals (which would slow the FMA unit down). Returns flops done.
template <class T>
double fma_burst(std::size_t iterations, T seed) {
#if MESAOPT_SIMD
  using B = kernels::simd_batch<T>;
#else
  using B = T;
#endif
  B acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = B(seed * T(i + 1));
  const B x(T(0.999999)), y(T(1e-7));
  for (std::size_t it = 0; it < iterations; ++it) {
    for (int i = 0; i < kChains; ++i) {
#if MESAOPT_SIMD
      acc[i] = xsimd::fma(acc[i], x, y);
#else
      acc[i] = acc[i] * x + y;
#endif
    }
  }
  B sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = sum + acc[i];
  // Publish the result so the loop cannot be removed.
  volatile T sink = T(0);
#if MESAOPT_SIMD
  sink = sum.get(0);
#else
  sink = sum;
#endif
  (void)sink;
  return burst_flops<T>(iterations);
}

// Best of several bursts (about 3 ms each at peak) on `threads` threads started
// together. Each thread times its own burst in CPU time; a repetition's rate is
// the sum over threads.
template <class T>
double measure_peak(int threads) {
  constexpr std::size_t iterations = 1'000'000;
  const int repetitions = 9;
  threads = std::max(threads, 1);
  double best = 0;
  for (int rep = 0; rep < repetitions; ++rep) {
    std::vector<double> rate(static_cast<std::size_t>(threads), 0.0);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&rate, t] {
        const double start = thread_seconds();
        const double flops = fma_burst<T>(iterations, T(1e-3) * T(t + 1));
        const double seconds = thread_seconds() - start;
        rate[static_cast<std::size_t>(t)] = seconds > 0 ? flops / seconds : 0.0;
      });
    }
    for (auto& th : pool) th.join();
    double total = 0;
    for (double r : rate) total += r;
    best = std::max(best, total);
  }
  return best;
}

}  // namespace detail

// Measured FMA peak in flop/s for T on `threads` threads running at once
// (measured on first use, then cached per thread count for the process).
template <class T>
double peak_flops(int threads = 1) {
  static std::mutex mutex;
  static std::map<int, double> cached;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cached.find(threads);
  if (it == cached.end()) it = cached.emplace(threads, detail::measure_peak<T>(threads)).first;
  return it->second;
}

}  // namespace mesaopt::bench
