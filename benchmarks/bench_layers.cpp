// The multi-head layers (include/mesaopt/layers): LinearAttentionLayer,
// SoftmaxAttentionLayer and MesaLayer, float, B = 8 sequences, H = 4 heads,
// D = 256, d = dv = 64, T in {256, 1024}; forward ("fwd") and forward +
// backward ("fwdbwd"), on 1 and 2 threads (the layer's num_threads; the
// (batch, head) pairs and the projection GEMMs are spread over them).
//
// Counters (wall-clock rates: the benchmarks use real time):
//   tokens/s    B T tokens per iteration.
//   GFLOPS      model flops per iteration (one FMA = 2 flops):
//               projections  forward 2 N D H (2d + dv) (X W_qkv^T) + 2 N H dv D
//                            (O W_o^T); backward twice that (dX and dW).
//               per head and sequence, as the op benchmarks count them:
//                 linear   forward 4 d dv T, forward+backward 16 d dv T
//                 softmax  forward T^2 (d + dv) (causal halves of Q K^T and P V),
//                          forward+backward T^2 (4 d + 3 dv)
//                 mesa     forward (6 d^2 + 4 d dv) T, forward+backward (20 d^2 + 16 d dv) T
//   peak_frac   GFLOPS over the measured FP32 FMA peak of as many cores as
//               threads (mesaopt::bench::peak_flops<float>(threads)).
//
// Run (as quoted in docs/layers.md):
//   ./build-layers/benchmarks/bench_layers --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <mesaopt/layers.hpp>
#include <mesaopt/nn/random.hpp>

#include "peak.hpp"

#include <string>
#include <vector>

namespace {

using M = mesaopt::RowMatrix<float>;
constexpr long kB = 8, kH = 4, kD = 256, kd = 64, kdv = 64;

enum Kind { kLinear = 0, kSoftmax = 1, kMesa = 2 };

M random_normal(long rows, long cols, std::uint64_t seed) {
  mesaopt::nn::SplitMix64 rng(seed);
  M m(rows, cols);
  mesaopt::nn::fill_normal(m.data(), std::size_t(m.size()), 1.0, rng);
  return m;
}

double projection_flops(double N, bool backward) {
  const double f = 2 * N * kD * kH * (2 * kd + kdv) + 2 * N * kH * kdv * kD;
  return backward ? 3 * f : f;
}

double head_flops(Kind kind, double T, bool backward) {
  const double d = kd, dv = kdv, seqs_heads = double(kB * kH);
  switch (kind) {
    case kLinear: return seqs_heads * T * (backward ? 16 : 4) * d * dv;
    case kSoftmax: return seqs_heads * T * T * (backward ? 4 * d + 3 * dv : d + dv);
    case kMesa: return seqs_heads * T * (backward ? 20 * d * d + 16 * d * dv : 6 * d * d + 4 * d * dv);
  }
  return 0;
}

template <class Layer>
Layer make_layer(int threads) {
  typename Layer::Config c;
  c.D = kD;
  c.H = kH;
  c.d = kd;
  c.dv = kdv;
  c.num_threads = threads;
  Layer layer(c);
  layer.init(1, 0.05);  // docs/paper.md §2: N(0, 0.05^2) for full models
  return layer;
}

template <class Layer, Kind kind, bool Backward>
void BM_Layer(benchmark::State& state) {
  const long T = state.range(0);
  const int threads = int(state.range(1));
  Layer layer = make_layer<Layer>(threads);
  const M x = random_normal(kB * T, kD, 2);
  const M dy = random_normal(kB * T, kD, 3);
  M y(kB * T, kD), dx(kB * T, kD);
  typename Layer::Cache cache;
  for (auto _ : state) {
    layer.forward(x, T, cache, y);
    if (Backward) layer.backward(x, T, dy, cache, dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  const double N = double(kB * T);
  const double flops = projection_flops(N, Backward) + head_flops(kind, double(T), Backward);
  state.counters["tokens/s"] = benchmark::Counter(N, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] = benchmark::Counter(flops / mesaopt::bench::peak_flops<float>(threads),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

void grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "threads"});
  for (long T : {256, 1024})
    for (long threads : {1, 2}) b->Args({T, threads});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

using Linear = mesaopt::LinearAttentionLayer<float>;
using Softmax = mesaopt::SoftmaxAttentionLayer<float>;
using Mesa = mesaopt::MesaLayer<float>;

}  // namespace

BENCHMARK_TEMPLATE(BM_Layer, Linear, kLinear, false)->Name("linear/fwd")->Apply(grid);
BENCHMARK_TEMPLATE(BM_Layer, Linear, kLinear, true)->Name("linear/fwdbwd")->Apply(grid);
BENCHMARK_TEMPLATE(BM_Layer, Softmax, kSoftmax, false)->Name("softmax/fwd")->Apply(grid);
BENCHMARK_TEMPLATE(BM_Layer, Softmax, kSoftmax, true)->Name("softmax/fwdbwd")->Apply(grid);
BENCHMARK_TEMPLATE(BM_Layer, Mesa, kMesa, false)->Name("mesa/fwd")->Apply(grid);
BENCHMARK_TEMPLATE(BM_Layer, Mesa, kMesa, true)->Name("mesa/fwdbwd")->Apply(grid);

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("peak_GFLOPS_1thread_float", std::to_string(mesaopt::bench::peak_flops<float>(1) * 1e-9));
  benchmark::AddCustomContext("peak_GFLOPS_2threads_float",
                              std::to_string(mesaopt::bench::peak_flops<float>(2) * 1e-9));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
