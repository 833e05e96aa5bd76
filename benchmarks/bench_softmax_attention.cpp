// Causal softmax attention (docs/math.md §2, M4): tiled flash forward and
// forward+backward, 8 independent sequences (B*H = 8) per iteration, single
// thread, float.
//
// Counters:
//   head_tokens/s  8 T per iteration.
//   GFLOPS         causal half of the attention GEMMs: forward T^2 d (Q K^T) +
//                  T^2 dv (P V) = 2 T^2 d for d = dv; forward+backward adds the
//                  flash backward's five half-size GEMMs (recompute Q K^T, P^T dO,
//                  dO V^T, dS K, dS^T Q) = 5 T^2 d, so 7 T^2 d in all. exp,
//                  max and sums are not counted. The tiles on the diagonal are
//                  computed in full and masked, so slightly more is executed.
//   peak_frac      GFLOPS / measured single-thread FMA peak (benchmarks/peak.hpp).
#include <benchmark/benchmark.h>
#include <mesaopt/ops/softmax_attention.hpp>
#include <mesaopt/ops/softmax_attention_reference.hpp>

#include "peak.hpp"

#include <Eigen/Core>

#include <vector>

namespace {

using M = mesaopt::RowMatrix<float>;
constexpr int kSequences = 8;

struct Inputs {
  std::vector<M> q, k, v, g, out, dq, dk, dv;
  std::vector<mesaopt::SoftmaxCache<float>> cache;
  Inputs(long T, long d, long dv_) : cache(kSequences) {
    for (int s = 0; s < kSequences; ++s) {
      q.push_back(M::Random(T, d));
      k.push_back(M::Random(T, d));
      v.push_back(M::Random(T, dv_));
      g.push_back(M::Random(T, dv_));
      out.emplace_back(T, dv_);
      dq.emplace_back(T, d);
      dk.emplace_back(T, d);
      dv.emplace_back(T, dv_);
    }
  }
};

void set_counters(benchmark::State& state, double T, double flops) {
  state.counters["head_tokens/s"] = benchmark::Counter(kSequences * T, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(kSequences * flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] = benchmark::Counter(kSequences * flops / mesaopt::bench::peak_flops<float>(1),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

// Args: T, d (= dv), query tile rows (0 = default), key tile rows (0 = default).
template <bool WithBackward>
void BM_Softmax(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1), dv = d;
  mesaopt::SoftmaxAttentionTiles tiles;
  if (state.range(2) > 0) tiles.query_rows = state.range(2);
  if (state.range(3) > 0) tiles.key_rows = state.range(3);
  Inputs in(T, d, dv);
  for (auto _ : state) {
    for (int s = 0; s < kSequences; ++s) {
      mesaopt::softmax_attention_forward(in.q[s], in.k[s], in.v[s], in.out[s], in.cache[s], tiles);
      if (WithBackward)
        mesaopt::softmax_attention_backward(in.q[s], in.k[s], in.v[s], in.g[s], in.cache[s], in.dq[s], in.dk[s],
                                            in.dv[s], tiles);
    }
    benchmark::DoNotOptimize(in.out[0].data());
    benchmark::DoNotOptimize(in.dq[0].data());
    benchmark::ClobberMemory();
  }
  const double Td = double(T);
  set_counters(state, Td, (WithBackward ? 7.0 : 2.0) * Td * Td * d);
}

// The materialised reference, for the ratio in the same run.
void BM_SoftmaxReference(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1), dv = d;
  Inputs in(T, d, dv);
  for (auto _ : state) {
    for (int s = 0; s < kSequences; ++s)
      mesaopt::reference::softmax_attention_forward(in.q[s], in.k[s], in.v[s], in.out[s]);
    benchmark::DoNotOptimize(in.out[0].data());
    benchmark::ClobberMemory();
  }
  const double Td = double(T);
  set_counters(state, Td, 2.0 * Td * Td * d);
}

void grid(benchmark::internal::Benchmark* b) {
  for (long T : {256, 1024, 4096})
    for (long d : {16, 32, 64, 128}) b->Args({T, d, 0, 0});
}

// Tile sweep at T = 1024 (how the default tiles were chosen).
void tile_grid(benchmark::internal::Benchmark* b) {
  for (long d : {64, 128})
    for (long br : {32, 64, 128})
      for (long bc : {32, 64, 128, 256}) b->Args({1024, d, br, bc});
}

}  // namespace

BENCHMARK_TEMPLATE(BM_Softmax, false)->Name("fwd/tiled")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Softmax, true)->Name("fwdbwd/tiled")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Softmax, false)->Name("tilesweep/fwd")->Apply(tile_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Softmax, true)->Name("tilesweep/fwdbwd")->Apply(tile_grid)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SoftmaxReference)->Name("fwd/reference")->Args({256, 64})->Args({1024, 64})->Unit(benchmark::kMillisecond);

int main(int argc, char** argv) {
  // Single thread: the op's Eigen GEMMs would otherwise use OpenMP threads.
  Eigen::setNbThreads(1);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("peak_GFLOPS_1thread_float", std::to_string(mesaopt::bench::peak_flops<float>(1) * 1e-9));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
