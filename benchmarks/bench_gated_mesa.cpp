// The gated mesa op (include/mesaopt/ops/gated_mesa.hpp, docs/gated_mesa.md),
// float, one head of one sequence per iteration (single thread, except the
// threads cases at the end): the
// token-by-token recurrent form (opt.chunk = 0) against the chunkwise form
// (opt.chunk = C = 64), for both solvers (exact: Sherman-Morrison / chunkwise
// Woodbury; cg: MesaNet's objective, 30 CG steps), T in {256, 1024, 4096} and
// d = dv in {32, 64, 128}, forward and forward+backward.
//
// Counters:
//   head_tokens   head-tokens per second (T per iteration, kIsIterationInvariantRate)
//   GFLOPS        flop/s by the counts below (kIsIterationInvariantRate)
//   peak_frac     GFLOPS over this machine's measured single-core FP32 FMA peak
//                 (mesaopt::bench::peak_flops<float>(1), measured once in main)
//
// Flop counts per token: each form is credited with what its own algorithm
// does (see flops() below), so peak_frac says how well that algorithm uses the
// core and head_tokens compares the forms.
//
// Run (as quoted in docs/gated_mesa.md):
//   ./build/benchmarks/bench_gated_mesa --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
// The one-long-sequence cases on 1 and 2 threads (opt.threads; names end in /threads:N, wall time):
//   ./build/benchmarks/bench_gated_mesa --benchmark_filter='threads:' --benchmark_repetitions=3
// The JAX peer of the chunkwise cg form: benchmarks/peers/gated_mesa_cg_jax.py.
#include <benchmark/benchmark.h>
#include <mesaopt/ops/gated_mesa.hpp>

#include "peak.hpp"

#include <random>
#include <string>

namespace {

using Mat = mesaopt::RowMatrix<float>;
using Vec = mesaopt::Vector<float>;
using mesaopt::MesaSolver;
constexpr long kChunk = 64;
constexpr int kCgSteps = 30;
double g_peak = 0;

Mat random_rows(long rows, long cols, unsigned seed, bool unit) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  Mat m(rows, cols);
  for (long i = 0; i < m.size(); ++i) m.data()[i] = n01(rng);
  if (unit)
    for (long i = 0; i < rows; ++i) m.row(i).normalize();  // MesaNet L2-normalises q and k
  return m;
}

Vec uniform(long n, unsigned seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  Vec x(n);
  for (long i = 0; i < n; ++i) x[i] = u(rng);
  return x;
}

// One head: MesaNet-like inputs (unit q, k; input gates in [0.3, 1], forget
// gates in [0.9, 1], lambda in [0.25, 1]).
struct Problem {
  Mat q, k, v, out, dout, dq, dk, dv;
  Vec beta, gamma, lam, dbeta, dgamma, dlam;
  mesaopt::GatedMesaOptions<float> opt;
  mesaopt::GatedMesaCache<float> cache;
  Problem(long T, long d, MesaSolver solver, long chunk, int threads = 1)
      : q(random_rows(T, d, 1, true)), k(random_rows(T, d, 2, true)), v(random_rows(T, d, 3, false)), out(T, d),
        dout(random_rows(T, d, 4, false)), dq(T, d), dk(T, d), dv(T, d), beta(uniform(T, 5, 0.3f, 1.0f)),
        gamma(uniform(T, 6, 0.9f, 1.0f)), lam(uniform(d, 7, 0.25f, 1.0f)), dbeta(T), dgamma(T), dlam(d) {
    opt.solver = solver;
    opt.chunk = chunk;
    opt.cg_steps = kCgSteps;
    opt.threads = threads;
  }
  void forward() { mesaopt::gated_mesa_forward<float>(q, k, v, beta, gamma, lam, opt, out, cache); }
  void backward() {
    mesaopt::gated_mesa_backward<float>(q, k, v, beta, gamma, lam, opt, dout, cache, dq, dk, dv, dbeta, dgamma, dlam);
  }
};

// Flops per token, d = dv (one FMA = 2 flops; the derivations:
// docs/gated_mesa_chunkwise_exact.md and docs/gated_mesa_chunkwise_cg.md,
// "Cost per token"; n = CG steps, C = chunk size):
//   exact recurrent   fwd 7d^2 + 5d dv                       fwd+bwd 25d^2 + 21d dv
//   exact chunkwise   fwd 8d^2 + 4d^3/C + 4d dv + 7Cd + C dv + 2.7C^2
//                     fwd+bwd 22d^2 + 4d^3/C + 12d dv + 27Cd + 4C dv + 15.3C^2
//                     (the 4d^2 + 4d^3/C of the forward: the Joseph form of R_C;
//                     C^2/3 of the C^2 terms per pass: the inverse of L)
//   cg recurrent      fwd (2n+1)d^2 + 4d dv                  fwd+bwd (6n+12)d^2 + 18d dv
//   cg chunkwise      fwd n(2d^2 + 3Cd) + 2d^2 + 4d dv + 2Cd + 2C dv
//                     fwd+bwd 2n(2d^2 + 3Cd) + 8d^2 + 12d dv + 12Cd + 6C dv + 2C^2
//                     (the backward's one solve: the forward's X is in the cache;
//                     3Cd: each step's C x C x d products skip the upper half's
//                     empty quarter from C = kSplitRows (32) on, as the benchmark's C = 64 is)
double flops(MesaSolver solver, long chunk, double d, bool backward) {
  const double n = kCgSteps, C = double(kChunk), dv = d;
  if (solver == MesaSolver::exact) {
    if (chunk == 0) return backward ? 25 * d * d + 21 * d * dv : 7 * d * d + 5 * d * dv;
    return backward ? 22 * d * d + 4 * d * d * d / C + 12 * d * dv + 27 * C * d + 4 * C * dv + 15.3 * C * C
                    : 8 * d * d + 4 * d * d * d / C + 4 * d * dv + 7 * C * d + C * dv + 2.7 * C * C;
  }
  if (chunk == 0) return backward ? (6 * n + 12) * d * d + 18 * d * dv : (2 * n + 1) * d * d + 4 * d * dv;
  const double step = 2 * d * d + (kChunk >= mesaopt::detail::gated_cg_chunk_impl::kSplitRows ? 3 : 4) * C * d;
  return backward ? 2 * n * step + 8 * d * d + 12 * d * dv + 12 * C * d + 6 * C * dv + 2 * C * C
                  : n * step + 2 * d * d + 4 * d * dv + 2 * C * d + 2 * C * dv;
}

void set_counters(benchmark::State& state, long T, double flops_per_token) {
  const double tokens = double(T);
  state.counters["head_tokens"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(tokens * flops_per_token, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] =
      benchmark::Counter(tokens * flops_per_token / g_peak, benchmark::Counter::kIsIterationInvariantRate);
}

template <MesaSolver solver, long chunk>
void BM_forward(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1);
  Problem p(T, d, solver, chunk);
  for (auto _ : state) {
    p.forward();
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, flops(solver, chunk, double(d), false));
}

template <MesaSolver solver, long chunk>
void BM_fwdbwd(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1);
  Problem p(T, d, solver, chunk);
  for (auto _ : state) {
    p.forward();
    p.backward();
    benchmark::DoNotOptimize(p.dq.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, flops(solver, chunk, double(d), true));
}

// One long sequence on opt.threads threads (intra-sequence parallelism,
// docs/gated_mesa.md, "Threads"): B*H = 1, T = 16384, d = dv = 64, chunkwise
// (C = 64), threads = range(2). Rates are per wall second (UseRealTime): the
// point is the wall-clock gain of a second thread. Flops are credited as for
// one thread (the split adds no arithmetic), so peak_frac is against ONE core's
// peak and may exceed 1/threads' share. Issue 15's target: threads = 2 at least
// 1.7x threads = 1 forward + backward.
template <MesaSolver solver>
void BM_forward_threads(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1);
  Problem p(T, d, solver, kChunk, int(state.range(2)));
  for (auto _ : state) {
    p.forward();
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, flops(solver, kChunk, double(d), false));
}

template <MesaSolver solver>
void BM_fwdbwd_threads(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1);
  Problem p(T, d, solver, kChunk, int(state.range(2)));
  for (auto _ : state) {
    p.forward();
    p.backward();
    benchmark::DoNotOptimize(p.dq.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, flops(solver, kChunk, double(d), true));
}

void long_sequence(benchmark::internal::Benchmark* b) {
  for (long threads : {1L, 2L}) b->Args({16384, 64, threads});
  b->ArgNames({"T", "d", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

void grid(benchmark::internal::Benchmark* b) {
  for (long T : {256L, 1024L, 4096L})
    for (long d : {32L, 64L, 128L}) b->Args({T, d});
  b->ArgNames({"T", "d"})->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_forward<MesaSolver::exact, 0>)->Name("exact_recurrent_forward")->Apply(grid);
BENCHMARK(BM_forward<MesaSolver::exact, kChunk>)->Name("exact_chunkwise_forward")->Apply(grid);
BENCHMARK(BM_fwdbwd<MesaSolver::exact, 0>)->Name("exact_recurrent_fwdbwd")->Apply(grid);
BENCHMARK(BM_fwdbwd<MesaSolver::exact, kChunk>)->Name("exact_chunkwise_fwdbwd")->Apply(grid);
BENCHMARK(BM_forward<MesaSolver::cg, 0>)->Name("cg_recurrent_forward")->Apply(grid);
BENCHMARK(BM_forward<MesaSolver::cg, kChunk>)->Name("cg_chunkwise_forward")->Apply(grid);
BENCHMARK(BM_fwdbwd<MesaSolver::cg, 0>)->Name("cg_recurrent_fwdbwd")->Apply(grid);
BENCHMARK(BM_fwdbwd<MesaSolver::cg, kChunk>)->Name("cg_chunkwise_fwdbwd")->Apply(grid);
BENCHMARK(BM_forward_threads<MesaSolver::cg>)->Name("cg_chunkwise_forward")->Apply(long_sequence);
BENCHMARK(BM_fwdbwd_threads<MesaSolver::cg>)->Name("cg_chunkwise_fwdbwd")->Apply(long_sequence);
BENCHMARK(BM_forward_threads<MesaSolver::exact>)->Name("exact_chunkwise_forward")->Apply(long_sequence);
BENCHMARK(BM_fwdbwd_threads<MesaSolver::exact>)->Name("exact_chunkwise_fwdbwd")->Apply(long_sequence);

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
