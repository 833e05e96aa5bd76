#pragma once
// Measures this machine's FMA peak with xsimd so that every benchmark can quote
// its GFLOP/s as a fraction of measured (not datasheet) peak:
//   state.counters["peak_frac"] = flops_per_second / mesaopt::bench::peak_flops<float>();
// (use a plain counter computed from the measured rate; see bench_kernels.cpp).
#include <mesaopt/kernels/simd.hpp>

#include <chrono>
#include <cstddef>
#include <thread>
#include <vector>

namespace mesaopt::bench {

namespace detail {

// 12 independent FMA chains: latency 4 cycles x 2 FMAs per cycle needs >= 8 in
// flight; 12 leaves slack. Returns flops done.
template <class T>
double fma_burst(std::size_t iterations, T seed) {
#if MESAOPT_SIMD
  using B = kernels::simd_batch<T>;
  constexpr std::size_t W = B::size;
#else
  using B = T;
  constexpr std::size_t W = 1;
#endif
  B acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = B(seed * T(i + 1));
  const B x(T(0.999999)), y(T(1e-7));
  for (std::size_t it = 0; it < iterations; ++it) {
    for (int i = 0; i < 12; ++i) {
#if MESAOPT_SIMD
      acc[i] = xsimd::fma(acc[i], x, y);
#else
      acc[i] = acc[i] * x + y;
#endif
    }
  }
  B sum = acc[0];
  for (int i = 1; i < 12; ++i) sum = sum + acc[i];
  // Publish the result so the loop cannot be removed.
  volatile T sink = T(0);
#if MESAOPT_SIMD
  sink = sum.get(0);
#else
  sink = sum;
#endif
  (void)sink;
  return 2.0 * 12.0 * W * static_cast<double>(iterations);
}

// Best of several timed bursts on `threads` threads running at once.
template <class T>
double measure_peak(int threads) {
  const std::size_t iterations = 2'000'000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<std::thread> pool;
    const auto start = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { fma_burst<T>(iterations, T(1e-3) * T(t + 1)); });
    for (auto& th : pool) th.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double flops = threads * 2.0 * 12.0 * kernels::simd_width<T> * static_cast<double>(iterations);
    if (flops / seconds > best) best = flops / seconds;
  }
  return best;
}

}  // namespace detail

// Measured FMA peak in flop/s for T on `threads` cores (cached per process).
template <class T>
double peak_flops(int threads = 1) {
  static double cached[2] = {0, 0};
  double& c = cached[threads > 1 ? 1 : 0];
  if (c == 0) c = detail::measure_peak<T>(threads);
  return c;
}

}  // namespace mesaopt::bench
