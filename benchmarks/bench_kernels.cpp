// Every SIMD kernel of include/mesaopt/kernels/ next to its scalar reference
// (kernels/reference.hpp), at d in {16, 32, 64, 128} (d in {20, 32, 64, 128}
// for state_update_dot and rank2_update_apply), float and double.
//
// Counters:
//   GFLOPS     flop/s of the kernel (benchmark::Counter kIsIterationInvariantRate,
//              printed by Google Benchmark in units of flop/s with k/M/G suffix)
//   peak_frac  that rate divided by this machine's *measured* single-core FMA
//              peak for the same type (mesaopt::bench::peak_flops<T>(1),
//              measured once before any benchmark runs)
//
// Flop counts (one FMA = 2 flops):
//   dot, axpy                  2 n
//   ger, syr_sub, gemv         2 d^2
//   state_update_apply         4 d^2          (St update + o = St^T a, dv = d)
//   state_sweep                4 d^2 T        (T tokens of state_update_apply, scale 1;
//                                              /sweep: kernels::state_sweep, /per_token:
//                                              one state_update_apply call per token)
//   state_update_dot           4 d^2          (4 d dv with dv = d: St update, 2 flops per
//                                              entry, + da = St g, 2 flops per entry)
//   rank2_update_apply         6 d^2          (M update, 2 FMAs = 4 flops per entry,
//                                              + out = M k, 2 flops per entry; the
//                                              scale multiply is skipped at scale = 1)
//   sherman_morrison_update    6 d^2          (R update + R q + R k_next, docs/math.md M7, M9)
//   sherman_morrison_gain      3 d            (k.u, then w = u / sqrt(den))
//   mesa_step                  6 d^2          (gain + fused update, one token of the
//                                              mesa recursion; the O(d) gain is not counted)
//   gemm, gemm_tn              2 n m k        (C (n x m) = A B or += A^T B, inner dimension k;
//                                              /simd: kernels::gemm, /eigen: the same product
//                                              by Eigen on the same row-major buffers, as the
//                                              layers computed it before kernels/gemm.hpp;
//                                              shapes: one shard of the paper's models, 400
//                                              tokens of width 40, H (2d + dv) = 120)
//   adam_update                counted in parameters/s instead (three divisions and
//                              a square root per entry, in double: no FMA-bound
//                              rate to compare with); n = the parameter counts of
//                              linear-1L, mesa-1L and linear-2L (6400, 12804, 25600)
//
// Run, e.g.:
//   ./build/benchmarks/bench_kernels --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <Eigen/Core>
#include <mesaopt/kernels.hpp>

#include "peak.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <string>
#include <new>
#include <type_traits>
#include <vector>

namespace {

namespace k = mesaopt::kernels;
namespace ref = mesaopt::kernels::reference;

// Measured once in main() before the benchmarks run.
double g_peak_float = 0;
double g_peak_double = 0;

template <class T>
double peak_of() {
  return std::is_same_v<T, float> ? g_peak_float : g_peak_double;
}

// 64-byte aligned storage for matrices (R, St, A): what an Eigen matrix gets
// with AVX enabled (32 bytes) or better, so no row straddles a cache line
// because of the allocator. The kernels themselves accept any alignment.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(((n * sizeof(T) + 63) / 64) * 64, std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

template <class T>
AlignedVector<T> random_vector(std::size_t n, unsigned seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  AlignedVector<T> v(n);
  for (auto& x : v) x = static_cast<T>(scale * n01(rng));
  return v;
}

// Sets the two counters from the flops one iteration performs. peak_frac is a
// plain number (not a rate): the measured rate over the same CPU time that
// Google Benchmark uses, divided by the measured peak, so it is the GFLOPS
// counter over peak_flops<T>(1).
template <class T>
void set_counters(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOPS"] = benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] = benchmark::Counter(flops_per_iteration / peak_of<T>(),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

// ---- level 1 -----------------------------------------------------------------

template <class T, bool Fast>
void BM_dot(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  const auto x = random_vector<T>(n, 1), y = random_vector<T>(n, 2);
  for (auto _ : state) {
    benchmark::DoNotOptimize(x.data());
    benchmark::DoNotOptimize(y.data());
    T s = Fast ? k::dot(x.data(), y.data(), n) : ref::dot(x.data(), y.data(), n);
    benchmark::DoNotOptimize(s);
  }
  set_counters<T>(state, 2.0 * n);
}

template <class T, bool Fast>
void BM_axpy(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  const auto x = random_vector<T>(n, 1);
  auto y = random_vector<T>(n, 2);
  // alpha and -alpha alternate so y stays bounded (no overflow, no denormals).
  T alpha = T(0.5);
  for (auto _ : state) {
    if (Fast) k::axpy(n, alpha, x.data(), y.data());
    else ref::axpy(n, alpha, x.data(), y.data());
    alpha = -alpha;
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 2.0 * n);
}

// One AdamW step over n parameters: m, v and the weights stay bounded (the
// gradient is fixed, so the weights drift by at most lr per step).
template <class T, bool Fast>
void BM_adam_update(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  auto value = random_vector<T>(n, 1);
  std::vector<T> m(n, T(0)), v(n, T(0));
  auto grad = random_vector<T>(n, 2);
  for (auto& g : grad) g *= T(1e-2);
  k::AdamCoefficients c;
  c.bias1 = 1 - c.beta1;
  c.bias2 = 1 - c.beta2;
  c.weight_decay = 1e-4;
  c.lr = 1e-6;
  for (auto _ : state) {
    if (Fast) k::adam_update(n, value.data(), grad.data(), m.data(), v.data(), c);
    else ref::adam_update(n, value.data(), grad.data(), m.data(), v.data(), c);
    benchmark::ClobberMemory();
  }
  state.counters["parameters/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}

// ---- level 2 -----------------------------------------------------------------

template <class T, bool Fast>
void BM_ger(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  const auto x = random_vector<T>(d, 1), y = random_vector<T>(d, 2);
  auto A = random_vector<T>(d * d, 3);
  T c = T(0.25);
  for (auto _ : state) {
    if (Fast) k::ger(d, d, c, x.data(), y.data(), A.data(), d);
    else ref::ger(d, d, c, x.data(), y.data(), A.data(), d);
    c = -c;
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 2.0 * d * d);
}

template <class T, bool Fast>
void BM_syr_sub(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  const auto u = random_vector<T>(d, 1);
  auto A = random_vector<T>(d * d, 3);
  T c = T(0.25);
  for (auto _ : state) {
    if (Fast) k::syr_sub(d, c, u.data(), A.data(), d);
    else ref::syr_sub(d, c, u.data(), A.data(), d);
    c = -c;
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 2.0 * d * d);
}

template <class T, bool Fast>
void BM_gemv(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  const auto A = random_vector<T>(d * d, 3), x = random_vector<T>(d, 1);
  AlignedVector<T> y(d);
  for (auto _ : state) {
    benchmark::DoNotOptimize(A.data());
    if (Fast) k::gemv(d, d, A.data(), d, x.data(), y.data());
    else ref::gemv(d, d, A.data(), d, x.data(), y.data());
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 2.0 * d * d);
}

// St <- St + k v^T, o = St^T a, with v alternating sign so St stays bounded.
template <class T, bool Fast>
void BM_state_update_apply(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  auto St = random_vector<T>(d * d, 3);
  const auto kv = random_vector<T>(d, 1), a = random_vector<T>(d, 4);
  auto v = random_vector<T>(d, 2);
  AlignedVector<T> o(d);
  for (auto _ : state) {
    if (Fast) k::state_update_apply(d, d, St.data(), d, T(1), kv.data(), v.data(), a.data(), o.data());
    else ref::state_update_apply(d, d, St.data(), d, T(1), kv.data(), v.data(), a.data(), o.data());
    for (auto& x : v) x = -x;
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 4.0 * d * d);
}

// T tokens of linear attention's state (M1-M2) from S_0 = 0, d = dv: the
// whole-sequence kernel against one state_update_apply per token (the loop the
// recurrent op ran before state_sweep). Args: d, T. Same row layout as the op
// (St rows padded to the width, q/k/v/o rows back to back).
template <class T, bool Sweep>
void BM_state_sweep(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0)), n = static_cast<std::size_t>(state.range(1));
  const std::size_t lds = k::padded_stride<T>(d);
  const auto kk = random_vector<T>(n * d, 1), v = random_vector<T>(n * d, 2), q = random_vector<T>(n * d, 3);
  AlignedVector<T> St(d * lds), o(n * d);
  for (auto _ : state) {
    std::fill(St.begin(), St.end(), T(0));
    if (Sweep) {
      k::state_sweep(n, d, d, St.data(), lds, T(1), kk.data(), d, v.data(), d, q.data(), d, o.data(), d, false);
    } else {
      for (std::size_t t = 0; t < n; ++t)
        k::state_update_apply(d, d, St.data(), lds, T(1), kk.data() + t * d, v.data() + t * d, q.data() + t * d,
                              o.data() + t * d);
    }
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 4.0 * double(d) * double(d) * double(n));
}

// St <- St + k v^T, da = St g (the mesa backward's M10), v alternating sign so St stays bounded.
template <class T, bool Fast>
void BM_state_update_dot(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  auto St = random_vector<T>(d * d, 3);
  const auto kv = random_vector<T>(d, 1), g = random_vector<T>(d, 4);
  auto v = random_vector<T>(d, 2);
  AlignedVector<T> da(d);
  for (auto _ : state) {
    if (Fast) k::state_update_dot(d, d, St.data(), d, T(1), kv.data(), v.data(), g.data(), da.data());
    else ref::state_update_dot(d, d, St.data(), d, T(1), kv.data(), v.data(), g.data(), da.data());
    for (auto& x : v) x = -x;
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 4.0 * d * d);
}

// M <- M + x y^T + y x^T, out = M k (the mesa backward's M11), x alternating
// sign so M stays bounded (starts symmetric, as the kernel requires).
template <class T, bool Fast>
void BM_rank2_update_apply(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  auto M = random_vector<T>(d * d, 3);
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < i; ++j) M[j * d + i] = M[i * d + j];
  const auto y = random_vector<T>(d, 2), kv = random_vector<T>(d, 4);
  auto x = random_vector<T>(d, 1);
  AlignedVector<T> out(d);
  for (auto _ : state) {
    if (Fast) k::rank2_update_apply(d, M.data(), d, T(1), x.data(), y.data(), kv.data(), out.data());
    else ref::rank2_update_apply(d, M.data(), d, T(1), x.data(), y.data(), kv.data(), out.data());
    for (auto& e : x) e = -e;
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 6.0 * d * d);
}

// ---- the mesa recursion --------------------------------------------------------

// A stored random sequence for the Sherman-Morrison benchmarks. Keys have
// i.i.d. N(0, 1/d) entries (|k| about 1) and lambda = 1, so after t tokens
// R_t = (K^T K + I)^{-1} has eigenvalues between about 1/(1 + t/d) and 1: well
// conditioned, no denormals, no growth. R is reset to lambda I at the start of
// every sequence (docs/math.md M5-M7 with R_0 = lambda I).
template <class T>
struct MesaSequence {
  static constexpr std::size_t kTokens = 256;
  std::size_t d;
  T lambda = T(1);
  AlignedVector<T> keys, queries;  // (kTokens + 1, d), one token per row; the extra row is k_{T+1}
  AlignedVector<T> R, w, a, u;     // R is d x d; u = R_{t-1} k_t

  explicit MesaSequence(std::size_t d_)
      : d(d_),
        keys(random_vector<T>((kTokens + 1) * d_, 11, 1.0 / std::sqrt(double(d_)))),
        queries(random_vector<T>((kTokens + 1) * d_, 12, 1.0 / std::sqrt(double(d_)))),
        R(d_ * d_),
        w(d_),
        a(d_),
        u(d_) {}

  // R = lambda I; u_1 = R_0 k_1 = lambda k_1.
  void reset() {
    std::fill(R.begin(), R.end(), T(0));
    for (std::size_t i = 0; i < d; ++i) R[i * d + i] = lambda;
    for (std::size_t i = 0; i < d; ++i) u[i] = lambda * keys[i];
  }
};

// The scalar gain (same formula as kernels::sherman_morrison_gain, gamma = 1).
template <class T>
void reference_gain(std::size_t d, const T* kt, const T* u, T* w) {
  const T den = T(1) + ref::dot(kt, u, d);
  const T inv = T(1) / std::sqrt(den);
  for (std::size_t i = 0; i < d; ++i) w[i] = u[i] * inv;
}

// One token per iteration of the mesa recursion: w_t from (k_t, u_t), then the
// fused R_t = R_{t-1} - w w^T, a_t = R_t q_t, u_{t+1} = R_t k_{t+1} (M7, M9).
template <class T, bool Fast>
void BM_mesa_step(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  MesaSequence<T> s(d);
  s.reset();
  std::size_t t = 0;
  for (auto _ : state) {
    const T* kt = s.keys.data() + t * d;
    const T* qt = s.queries.data() + t * d;
    const T* knext = kt + d;
    if (Fast) {
      k::sherman_morrison_gain(d, kt, s.u.data(), T(1), s.w.data());
      k::sherman_morrison_update(d, s.R.data(), d, s.w.data(), T(1), qt, knext, s.a.data(), s.u.data());
    } else {
      reference_gain(d, kt, s.u.data(), s.w.data());
      ref::sherman_morrison_update(d, s.R.data(), d, s.w.data(), T(1), qt, knext, s.a.data(), s.u.data());
    }
    benchmark::DoNotOptimize(s.a.data());
    if (++t == MesaSequence<T>::kTokens) {
      t = 0;
      s.reset();
    }
  }
  set_counters<T>(state, 6.0 * d * d);
}

// The fused update alone: a fixed w (|w| = 0.1) is subtracted every iteration and
// R is reset to I every 256 iterations, so R stays well inside (0.5 I, I].
template <class T, bool Fast>
void BM_sherman_morrison_update(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  AlignedVector<T> identity(d * d, T(0));
  for (std::size_t i = 0; i < d; ++i) identity[i * d + i] = T(1);
  AlignedVector<T> R(identity);
  const auto w = random_vector<T>(d, 1, 0.1 / std::sqrt(double(d)));
  const auto q = random_vector<T>(d, 2), kn = random_vector<T>(d, 3);
  AlignedVector<T> a(d), b(d);
  std::size_t n = 0;
  for (auto _ : state) {
    if (Fast) k::sherman_morrison_update(d, R.data(), d, w.data(), T(1), q.data(), kn.data(), a.data(), b.data());
    else ref::sherman_morrison_update(d, R.data(), d, w.data(), T(1), q.data(), kn.data(), a.data(), b.data());
    benchmark::ClobberMemory();
    if (++n == 256) {
      n = 0;
      R = identity;
    }
  }
  set_counters<T>(state, 6.0 * d * d);
}

// The O(d) gain alone: den = 1 + k.u, w = u / sqrt(den); 3 d flops.
template <class T, bool Fast>
void BM_sherman_morrison_gain(benchmark::State& state) {
  const std::size_t d = static_cast<std::size_t>(state.range(0));
  const auto kv = random_vector<T>(d, 1, 1.0 / std::sqrt(double(d)));
  const auto u = random_vector<T>(d, 2, 1.0 / std::sqrt(double(d)));
  AlignedVector<T> w(d);
  for (auto _ : state) {
    benchmark::DoNotOptimize(u.data());
    if (Fast) k::sherman_morrison_gain(d, kv.data(), u.data(), T(1), w.data());
    else reference_gain(d, kv.data(), u.data(), w.data());
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 3.0 * d);
}

// ---- small matrix products ----------------------------------------------------

// Arguments: n, m, k, tn (0: C = A B with A n x k; 1: C += A^T B with A k x n).
template <class T, bool Fast>
void BM_gemm(benchmark::State& state) {
  const auto n = std::size_t(state.range(0)), m = std::size_t(state.range(1)), kk = std::size_t(state.range(2));
  const bool tn = state.range(3) != 0;
  const auto A = random_vector<T>(n * kk, 1), B = random_vector<T>(kk * m, 2);
  auto C = random_vector<T>(n * m, 3);
  using Map = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  using MutMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  for (auto _ : state) {
    benchmark::DoNotOptimize(A.data());
    benchmark::DoNotOptimize(B.data());
    if (Fast) {
      if (tn) k::gemm_tn(n, m, kk, A.data(), n, B.data(), m, C.data(), m, true);
      else k::gemm(n, m, kk, A.data(), kk, B.data(), m, C.data(), m, false);
    } else {
      MutMap c(C.data(), long(n), long(m));
      const Map b(B.data(), long(kk), long(m));
      if (tn) c.noalias() += Map(A.data(), long(kk), long(n)).transpose() * b;
      else c.noalias() = Map(A.data(), long(n), long(kk)) * b;
    }
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, 2.0 * double(n) * double(m) * double(kk));
}

void gemm_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "m", "k", "tn"});
  b->Args({400, 120, 40, 0});   // QKV = X W_qkv^T
  b->Args({400, 40, 40, 0});    // Y = O W_o^T, dO = dY W_o
  b->Args({400, 40, 120, 0});   // dX = dQKV W_qkv
  b->Args({120, 40, 400, 1});   // dW_qkv += dQKV^T X
  b->Args({40, 40, 400, 1});    // dW_o += dY^T O
  b->Args({256, 256, 256, 1});  // larger, for comparison
}

BENCHMARK_TEMPLATE(BM_gemm, float, true)->Name("BM_gemm<float>/simd")->Apply(gemm_shapes);
BENCHMARK_TEMPLATE(BM_gemm, float, false)->Name("BM_gemm<float>/eigen")->Apply(gemm_shapes);
BENCHMARK_TEMPLATE(BM_gemm, double, true)->Name("BM_gemm<double>/simd")->Apply(gemm_shapes);
BENCHMARK_TEMPLATE(BM_gemm, double, false)->Name("BM_gemm<double>/eigen")->Apply(gemm_shapes);

#define MESAOPT_BENCH_PAIR(fn, type)                                                     \
  BENCHMARK_TEMPLATE(fn, type, true)->Name(#fn "<" #type ">/simd")->Arg(16)->Arg(32)->Arg(64)->Arg(128); \
  BENCHMARK_TEMPLATE(fn, type, false)->Name(#fn "<" #type ">/scalar")->Arg(16)->Arg(32)->Arg(64)->Arg(128)

// The mesa backward's kernels: d = 20 (a tail for every SIMD width: 16 + 4
// floats with AVX-512, 2 x 8 + 4 doubles) instead of 16.
#define MESAOPT_BENCH_PAIR_TAIL(fn, type)                                                \
  BENCHMARK_TEMPLATE(fn, type, true)->Name(#fn "<" #type ">/simd")->Arg(20)->Arg(32)->Arg(64)->Arg(128); \
  BENCHMARK_TEMPLATE(fn, type, false)->Name(#fn "<" #type ">/scalar")->Arg(20)->Arg(32)->Arg(64)->Arg(128)

BENCHMARK_TEMPLATE(BM_adam_update, float, true)->Name("BM_adam_update<float>/simd")->Arg(6400)->Arg(12804)->Arg(25600);
BENCHMARK_TEMPLATE(BM_adam_update, float, false)->Name("BM_adam_update<float>/scalar")->Arg(6400)->Arg(12804)->Arg(25600);
BENCHMARK_TEMPLATE(BM_adam_update, double, true)->Name("BM_adam_update<double>/simd")->Arg(6400)->Arg(12804)->Arg(25600);
BENCHMARK_TEMPLATE(BM_adam_update, double, false)->Name("BM_adam_update<double>/scalar")->Arg(6400)->Arg(12804)->Arg(25600);
MESAOPT_BENCH_PAIR(BM_mesa_step, float);
MESAOPT_BENCH_PAIR(BM_mesa_step, double);
MESAOPT_BENCH_PAIR(BM_sherman_morrison_update, float);
MESAOPT_BENCH_PAIR(BM_sherman_morrison_update, double);
// and at the paper's head size, where the last batch of the pass is half-width (AVX-512)
BENCHMARK_TEMPLATE(BM_sherman_morrison_update, float, true)
    ->Name("BM_sherman_morrison_update<float>/simd")
    ->Arg(20);
BENCHMARK_TEMPLATE(BM_sherman_morrison_update, double, true)
    ->Name("BM_sherman_morrison_update<double>/simd")
    ->Arg(20);
MESAOPT_BENCH_PAIR(BM_sherman_morrison_gain, float);
MESAOPT_BENCH_PAIR(BM_sherman_morrison_gain, double);
MESAOPT_BENCH_PAIR(BM_state_update_apply, float);
MESAOPT_BENCH_PAIR(BM_state_update_apply, double);
BENCHMARK_TEMPLATE(BM_state_sweep, float, true)->Name("BM_state_sweep<float>/sweep")->ArgsProduct({{16, 20, 32, 64}, {50, 1024}});
BENCHMARK_TEMPLATE(BM_state_sweep, float, false)->Name("BM_state_sweep<float>/per_token")->ArgsProduct({{16, 20, 32, 64}, {50, 1024}});
BENCHMARK_TEMPLATE(BM_state_sweep, double, true)->Name("BM_state_sweep<double>/sweep")->ArgsProduct({{16, 20, 32, 64}, {50, 1024}});
BENCHMARK_TEMPLATE(BM_state_sweep, double, false)->Name("BM_state_sweep<double>/per_token")->ArgsProduct({{16, 20, 32, 64}, {50, 1024}});
MESAOPT_BENCH_PAIR_TAIL(BM_state_update_dot, float);
MESAOPT_BENCH_PAIR_TAIL(BM_state_update_dot, double);
MESAOPT_BENCH_PAIR_TAIL(BM_rank2_update_apply, float);
MESAOPT_BENCH_PAIR_TAIL(BM_rank2_update_apply, double);
MESAOPT_BENCH_PAIR(BM_gemv, float);
MESAOPT_BENCH_PAIR(BM_gemv, double);
MESAOPT_BENCH_PAIR(BM_ger, float);
MESAOPT_BENCH_PAIR(BM_ger, double);
MESAOPT_BENCH_PAIR(BM_syr_sub, float);
MESAOPT_BENCH_PAIR(BM_syr_sub, double);
MESAOPT_BENCH_PAIR(BM_dot, float);
MESAOPT_BENCH_PAIR(BM_dot, double);
MESAOPT_BENCH_PAIR(BM_axpy, float);
MESAOPT_BENCH_PAIR(BM_axpy, double);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  Eigen::setNbThreads(1);  // the /eigen rows on one core, like the kernels
  // Measured once, before any kernel runs, on one core.
  g_peak_float = mesaopt::bench::peak_flops<float>(1);
  g_peak_double = mesaopt::bench::peak_flops<double>(1);
  benchmark::AddCustomContext("simd_arch", mesaopt::kernels::simd_arch_name());
  benchmark::AddCustomContext("peak_fp32_1core_GFLOPS", std::to_string(g_peak_float * 1e-9));
  benchmark::AddCustomContext("peak_fp64_1core_GFLOPS", std::to_string(g_peak_double * 1e-9));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
