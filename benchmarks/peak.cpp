// The machine's FP32 and FP64 FMA peak, measured with xsimd (the same
// fma_burst as benchmarks/peak.hpp), on one thread and on 2 threads running at
// once (all cores of the development machine).
//
// Counters:
//   GFLOPS      flop/s of all threads together, over wall time (rows named
//               real_time) or over each thread's CPU time (rows named cpu_time).
//               Printed as e.g. 95.1G/s.
//   per_thread  flop/s of one thread (GFLOPS / threads).
// The context lines peak_flops<T>(n) are what peak.hpp returns to the other
// benchmarks (best of 9 bursts, per-thread CPU time, summed over threads).
//
// fma_bursts/idle_us:N/threads:2 asks whether the two threads really have a
// core each, all the time. On the development VM they did not: for stretches
// (0.1-0.3 s in the training runs) each of two threads ran at about half
// speed, although both were running and on different vCPUs. Each thread
// alternates a float burst of about 2.6 ms (timed on the wall clock) and a
// sleep of N microseconds (0: back to back, as in a long GEMM; 200: as a
// training step's helper thread that sleeps between steps).
//   slow_frac   the fraction of a thread's bursts that took over 1.5 times its
//               5th-percentile burst (averaged over the threads). Near 0 on
//               two dedicated cores; docs/training.md, "Stop 46", has what the
//               development VM gave and what it does to the 2-thread training
//               step.
//
// Run: ./build/benchmarks/peak --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include "peak.hpp"

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

namespace {

template <class T>
void BM_fma_peak(benchmark::State& state) {
  // About 1 ms of FMAs per iteration at peak; enough to amortise the loop.
  const std::size_t iterations = 250'000;
  double flops = 0;
  for (auto _ : state) flops += mesaopt::bench::detail::fma_burst<T>(iterations, T(1e-3) * T(state.thread_index() + 1));
  // Google Benchmark 1.7 sums a kIsRate counter over threads and divides by the
  // summed per-thread time, which yields the per-thread rate (checked on an idle
  // machine: threads:1 and threads:2 show the same time per iteration).
  // Scaling by the thread count gives the rate of all threads together.
  state.counters["per_thread"] = benchmark::Counter(flops, benchmark::Counter::kIsRate);
  state.counters["GFLOPS"] = benchmark::Counter(flops * state.threads(), benchmark::Counter::kIsRate);
}

// Wall clock: the rate the threads really achieve together (needs idle cores).
BENCHMARK_TEMPLATE(BM_fma_peak, float)->Name("fma_peak<float>")->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK_TEMPLATE(BM_fma_peak, double)->Name("fma_peak<double>")->Threads(1)->Threads(2)->UseRealTime();
// CPU time (the default clock of Google Benchmark, and what the kernel
// benchmarks' rates use): robust when other processes share the cores, since
// time a thread spends descheduled is not counted. On an idle machine both
// agree.
BENCHMARK_TEMPLATE(BM_fma_peak, float)->Name("fma_peak<float>/cpu_time")->Threads(1)->Threads(2);
BENCHMARK_TEMPLATE(BM_fma_peak, double)->Name("fma_peak<double>/cpu_time")->Threads(1)->Threads(2);

void BM_fma_bursts(benchmark::State& state) {
  const auto idle = std::chrono::microseconds(state.range(0));
  const std::size_t iterations = 1'600'000;  // about 2.6 ms at a float peak of 240 GFLOP/s
  std::vector<double> seconds;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    mesaopt::bench::detail::fma_burst<float>(iterations, 1e-3f * float(state.thread_index() + 1));
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (idle.count() > 0) std::this_thread::sleep_for(idle);
  }
  if (seconds.empty()) return;
  std::vector<double> sorted = seconds;
  std::sort(sorted.begin(), sorted.end());
  const double fast = sorted[sorted.size() / 20];
  const auto slow = std::count_if(seconds.begin(), seconds.end(), [fast](double s) { return s > 1.5 * fast; });
  state.counters["slow_frac"] = benchmark::Counter(double(slow) / double(seconds.size()), benchmark::Counter::kAvgThreads);
}

// 20 s each: the stretches come and go over seconds.
BENCHMARK(BM_fma_bursts)->Name("fma_bursts")->ArgName("idle_us")->Arg(0)->Arg(200)->Threads(2)->UseRealTime()->MinTime(20);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("simd_arch", mesaopt::kernels::simd_arch_name());
  benchmark::AddCustomContext("simd_width_float", std::to_string(mesaopt::kernels::simd_width<float>));
  benchmark::AddCustomContext("peak_flops<float>(1)_GFLOPS", std::to_string(mesaopt::bench::peak_flops<float>(1) * 1e-9));
  benchmark::AddCustomContext("peak_flops<float>(2)_GFLOPS", std::to_string(mesaopt::bench::peak_flops<float>(2) * 1e-9));
  benchmark::AddCustomContext("peak_flops<double>(1)_GFLOPS", std::to_string(mesaopt::bench::peak_flops<double>(1) * 1e-9));
  benchmark::AddCustomContext("peak_flops<double>(2)_GFLOPS", std::to_string(mesaopt::bench::peak_flops<double>(2) * 1e-9));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
