// Causal linear attention (docs/math.md §1): forward and forward+backward, recurrent
// vs chunked vs the dispatching entry point, 8 independent sequences (B*H = 8)
// per iteration, single thread, float.
//
// Counters:
//   head_tokens/s  8 T per iteration.
//   GFLOPS         model flops, the recurrent form's work: 4 d dv per token
//                  forward (St += k v^T, o = St^T q), 16 d dv per token
//                  forward+backward (the backward is three such sweeps). The same
//                  count is used for every form, so GFLOPS compares forms directly.
//   GFLOPS_exec    flops the chunked form actually executes: per chunk of C
//                  tokens 2C^2 d (Q K^T, full block) + 2C^2 dv (A V) + 2 C d dv
//                  (Q St) + 2 C d dv (St += K^T V); backward 2 + 3 x that pattern
//                  (see linear_attention_backward_chunked). Equals GFLOPS for the
//                  recurrent form.
//   peak_frac      GFLOPS / measured single-thread FMA peak (benchmarks/peak.hpp).
#include <benchmark/benchmark.h>
#include <mesaopt/ops/linear_attention.hpp>
#include <mesaopt/ops/linear_attention_reference.hpp>

#include "peak.hpp"

#include <Eigen/Core>

#include <vector>

namespace {

using M = mesaopt::RowMatrix<float>;
constexpr int kSequences = 8;

enum Form { kRecurrent = 0, kChunked = 1, kAuto = 2, kReference = 3 };

struct Inputs {
  std::vector<M> q, k, v, g, out, dq, dk, dv;
  Inputs(long T, long d, long dv_) {
    for (int s = 0; s < kSequences; ++s) {
      // Scaled so that outputs stay O(1) over long sequences.
      q.push_back(M::Random(T, d) * 0.1f);
      k.push_back(M::Random(T, d) * 0.1f);
      v.push_back(M::Random(T, dv_));
      g.push_back(M::Random(T, dv_));
      out.emplace_back(T, dv_);
      dq.emplace_back(T, d);
      dk.emplace_back(T, d);
      dv.emplace_back(T, dv_);
    }
  }
};

double chunked_forward_flops(double T, double d, double dv, double C) {
  const double chunks = T / C;
  return chunks * (2 * C * C * d + 2 * C * C * dv + 4 * C * d * dv);
}

void set_counters(benchmark::State& state, double T, double model_flops, double exec_flops) {
  state.counters["head_tokens/s"] = benchmark::Counter(kSequences * T, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(kSequences * model_flops * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS_exec"] = benchmark::Counter(kSequences * exec_flops * 1e-9,
                                                     benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] = benchmark::Counter(kSequences * model_flops / mesaopt::bench::peak_flops<float>(1),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

void forward(Form form, Inputs& in, int s, long chunk) {
  switch (form) {
    case kRecurrent: mesaopt::linear_attention_forward_recurrent(in.q[s], in.k[s], in.v[s], in.out[s]); break;
    case kChunked: mesaopt::linear_attention_forward_chunked(in.q[s], in.k[s], in.v[s], in.out[s], chunk); break;
    case kAuto: mesaopt::linear_attention_forward(in.q[s], in.k[s], in.v[s], in.out[s]); break;
    case kReference: mesaopt::reference::linear_attention_forward(in.q[s], in.k[s], in.v[s], in.out[s]); break;
  }
}

void backward(Form form, Inputs& in, int s, long chunk) {
  switch (form) {
    case kRecurrent:
      mesaopt::linear_attention_backward_recurrent(in.q[s], in.k[s], in.v[s], in.g[s], in.dq[s], in.dk[s], in.dv[s]);
      break;
    case kChunked:
      mesaopt::linear_attention_backward_chunked(in.q[s], in.k[s], in.v[s], in.g[s], in.dq[s], in.dk[s], in.dv[s],
                                                 chunk);
      break;
    case kAuto:
      mesaopt::linear_attention_backward(in.q[s], in.k[s], in.v[s], in.g[s], in.dq[s], in.dk[s], in.dv[s]);
      break;
    case kReference:
      mesaopt::reference::linear_attention_backward(in.q[s], in.k[s], in.v[s], in.g[s], in.dq[s], in.dk[s],
                                                   in.dv[s]);
      break;
  }
}

// Executed flops of the form that actually runs.
double exec_flops(Form form, long T, long d, long dv, long chunk, bool with_backward) {
  const bool chunked =
      form == kChunked || (form == kAuto && mesaopt::linear_attention_use_chunked(T, d, dv));
  if (!chunked) return (with_backward ? 16.0 : 4.0) * T * d * dv;
  const long C = std::min<long>(T, chunk > 0 ? chunk : mesaopt::linear_attention_default_chunk(d, dv));
  const double f = chunked_forward_flops(T, d, dv, C);
  // backward: forward sweep ~ one forward; reverse sweep ~ two forwards (A, B,
  // A^T dO, B^T Q, K Gt, V Gt^T, Q^T dO).
  return with_backward ? 4.0 * f : f;
}

// Args: T, d (= dv), chunk (0 = default; chunked form only).
template <Form F, bool WithBackward>
void BM_Linear(benchmark::State& state) {
  const long T = state.range(0), d = state.range(1), dv = d, chunk = state.range(2);
  Inputs in(T, d, dv);
  for (auto _ : state) {
    for (int s = 0; s < kSequences; ++s) {
      forward(F, in, s, chunk);
      if (WithBackward) backward(F, in, s, chunk);
    }
    benchmark::DoNotOptimize(in.out[0].data());
    benchmark::DoNotOptimize(in.dq[0].data());
    benchmark::ClobberMemory();
  }
  const double model = (WithBackward ? 16.0 : 4.0) * T * d * dv;
  set_counters(state, double(T), model, F == kReference ? model : exec_flops(F, T, d, dv, chunk, WithBackward));
}

void grid(benchmark::internal::Benchmark* b) {
  for (long T : {256, 1024, 4096})
    for (long d : {16, 32, 64, 128}) b->Args({T, d, 0});
}

// Chunk length sweep at T = 1024 (for the crossover rule and the default chunk).
void chunk_grid(benchmark::internal::Benchmark* b) {
  for (long d : {16, 32, 64, 128})
    for (long C : {16, 32, 64, 128, 256}) b->Args({1024, d, C});
}

// Beyond the required grid: wide heads, where the state St (d x dv) outgrows
// L1/L2, to locate the recurrent/chunked crossover.
void wide_grid(benchmark::internal::Benchmark* b) {
  for (long d : {128, 192, 256, 384})
    for (long C : {0, 32}) b->Args({1024, d, C});
}

void reference_grid(benchmark::internal::Benchmark* b) {
  for (long d : {16, 64}) b->Args({256, d, 0});
}

}  // namespace

BENCHMARK_TEMPLATE(BM_Linear, kRecurrent, false)->Name("fwd/recurrent")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kChunked, false)->Name("fwd/chunked")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kAuto, false)->Name("fwd/auto")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kRecurrent, true)->Name("fwdbwd/recurrent")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kChunked, true)->Name("fwdbwd/chunked")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kAuto, true)->Name("fwdbwd/auto")->Apply(grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kChunked, false)->Name("chunksweep/fwd")->Apply(chunk_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kChunked, true)->Name("chunksweep/fwdbwd")->Apply(chunk_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kRecurrent, false)->Name("wide/fwd/recurrent")->Apply(wide_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kChunked, false)->Name("wide/fwd/chunked")->Apply(wide_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kRecurrent, true)->Name("wide/fwdbwd/recurrent")->Apply(wide_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kChunked, true)->Name("wide/fwdbwd/chunked")->Apply(wide_grid)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Linear, kReference, false)->Name("fwd/reference")->Apply(reference_grid)->Unit(benchmark::kMillisecond);

int main(int argc, char** argv) {
  // Single thread: the ops' Eigen GEMMs would otherwise use OpenMP threads.
  Eigen::setNbThreads(1);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("peak_GFLOPS_1thread_float", std::to_string(mesaopt::bench::peak_flops<float>(1) * 1e-9));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
