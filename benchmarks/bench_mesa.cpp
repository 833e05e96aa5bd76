// The mesa op (include/mesaopt/ops/mesa.hpp), float, single thread: forward and
// forward+backward of B*H = 8 independent sequences per iteration, beside the
// plain Eigen recursion (reference::mesa_forward), for T in {256, 1024,
// 4096} and d = dv in {16, 32, 64, 128}.
//
// Counters:
//   head_tokens   head-tokens per second (8 T per iteration, kIsIterationInvariantRate)
//   GFLOPS        flop/s by the counts below (kIsIterationInvariantRate)
//   peak_frac     GFLOPS over this machine's measured single-core FP32 FMA peak
//                 (mesaopt::bench::peak_flops<float>(1), measured once in main)
//
// Flop counts per token and head (one FMA = 2 flops; O(d) terms not counted):
//   forward            6 d^2 + 4 d dv    (M7/M9 fused update: R update + R q + R k_next;
//                                         M8/M9: S update + S a)
//   backward          14 d^2 + 12 d dv   S sweep for da = S^T g (4 d dv), chunk recompute
//                                         8 d^2 (the forward's R update and R q, R k_next,
//                                         plus dq = R da) and reverse sweep 6 d^2 + 8 d dv
//                                         (M += dq a^T + a dq^T with M k; G^T and G each
//                                         updated, with G k and G^T v)
//   forward+backward  20 d^2 + 16 d dv   (20 d^2 + 14 d dv before 2026-12-07, when the
//                                         backward updated one G^T and applied it twice)
// The naive forward is credited with the same 6 d^2 + 4 d dv, so its GFLOPS is
// directly comparable.
//
// Run (as quoted in docs/mesa.md):
//   ./build-mesa/benchmarks/bench_mesa --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <mesaopt/ops/mesa.hpp>
#include <mesaopt/ops/mesa_reference.hpp>

#include "peak.hpp"

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

using Mat = mesaopt::RowMatrix<float>;
constexpr int kSequences = 8;  // B * H independent (head, sequence) pairs per iteration
double g_peak = 0;

Mat random_rows(long rows, long cols, unsigned seed, double norm) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  Mat m(rows, cols);
  for (long i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(n01(rng));
  if (norm > 0)
    for (long i = 0; i < rows; ++i) m.row(i) *= static_cast<float>(norm / m.row(i).norm());
  return m;
}

struct Problem {
  std::vector<Mat> q, k, v, out, dout, dq, dk, dv;
  std::vector<mesaopt::MesaCache<float>> cache;
  mesaopt::MesaOptions<float> opt;
  Problem(long T, long d, long dv_) : cache(kSequences) {
    for (int s = 0; s < kSequences; ++s) {
      q.push_back(random_rows(T, d, 10 * s + 1, 1.0));
      k.push_back(random_rows(T, d, 10 * s + 2, 1.0));  // unit-norm keys
      v.push_back(random_rows(T, dv_, 10 * s + 3, 0));
      dout.push_back(random_rows(T, dv_, 10 * s + 4, 0));
      out.emplace_back(T, dv_);
      dq.emplace_back(T, d);
      dk.emplace_back(T, d);
      dv.emplace_back(T, dv_);
    }
  }
};

void set_counters(benchmark::State& state, long T, double flops_per_token) {
  const double tokens = double(kSequences) * double(T);
  state.counters["head_tokens"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(tokens * flops_per_token, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] =
      benchmark::Counter(tokens * flops_per_token / g_peak, benchmark::Counter::kIsIterationInvariantRate);
}

double forward_flops(double d, double dv) { return 6 * d * d + 4 * d * dv; }
double fwdbwd_flops(double d, double dv) { return 20 * d * d + 16 * d * dv; }

void BM_mesa_forward(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1), dv = d;
  Problem p(T, d, dv);
  for (auto _ : state) {
    for (int s = 0; s < kSequences; ++s) mesaopt::mesa_forward(p.q[s], p.k[s], p.v[s], p.opt, p.out[s], p.cache[s]);
    benchmark::DoNotOptimize(p.out[kSequences - 1].data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, forward_flops(double(d), double(dv)));
}

void BM_naive_forward(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1), dv = d;
  Problem p(T, d, dv);
  for (auto _ : state) {
    for (int s = 0; s < kSequences; ++s) mesaopt::reference::mesa_forward<float>(p.q[s], p.k[s], p.v[s], p.opt, p.out[s]);
    benchmark::DoNotOptimize(p.out[kSequences - 1].data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, forward_flops(double(d), double(dv)));
}

void BM_mesa_fwdbwd(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1), dv = d;
  Problem p(T, d, dv);
  float sink = 0;
  for (auto _ : state) {
    for (int s = 0; s < kSequences; ++s) {
      mesaopt::mesa_forward(p.q[s], p.k[s], p.v[s], p.opt, p.out[s], p.cache[s]);
      sink += mesaopt::mesa_backward(p.q[s], p.k[s], p.v[s], p.opt, p.dout[s], p.cache[s], p.dq[s], p.dk[s], p.dv[s]);
    }
    benchmark::DoNotOptimize(sink);
    benchmark::ClobberMemory();
  }
  set_counters(state, T, fwdbwd_flops(double(d), double(dv)));
}

void grid(benchmark::internal::Benchmark* b) {
  for (long T : {256L, 1024L, 4096L})
    for (long d : {16L, 32L, 64L, 128L}) b->Args({T, d});
  b->ArgNames({"T", "d"})->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_mesa_forward)->Apply(grid);
BENCHMARK(BM_naive_forward)->Apply(grid);
BENCHMARK(BM_mesa_fwdbwd)->Apply(grid);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  g_peak = mesaopt::bench::peak_flops<float>(1);  // measured once, before any benchmark
  benchmark::AddCustomContext("simd_arch", mesaopt::kernels::simd_arch_name());
  benchmark::AddCustomContext("peak_fp32_1core_GFLOPS", std::to_string(g_peak * 1e-9));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
