#pragma once
// The fused Sherman-Morrison step of the mesa layer, docs/math.md (M7, M9):
//
//   R_t = scale * R_{t-1} - w w^T        (w = u / sqrt(gamma (gamma + k.u)), scale = 1/gamma)
//   a_t = R_t q_t,   b = R_t k_{t+1}     (b is u_{t+1} of the next step)
//
// in ONE pass over R: while row r of R_t is written it is immediately used for
// both matrix-vector products. Because R is symmetric, (R q)_j = sum_r q_r R_rj:
// each row contributes q_r * row_r to a vector accumulator, so no horizontal
// sums are needed and a, b stay in registers for a block of columns.
//
// Bitwise symmetry: entry (i, j) is fnma(w_i, w_j, scale R_ij) and entry (j, i)
// is fnma(w_j, w_i, scale R_ji); the product is commutative and every entry,
// tail included, goes through the same batch instruction, so R stays exactly
// symmetric (docs/math.md §3 shows why that matters in float32).
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>
#include <mesaopt/kernels/vector_ops.hpp>

#include <cmath>
#include <cstddef>

namespace mesaopt::kernels {

#if MESAOPT_SIMD
namespace detail {

// Columns [j0, j0 + NB W) of every row. NB = 4 is the main block: 4 a- and 4
// b-accumulators are 8 independent FMA chains, enough to cover the 4-cycle FMA
// latency at 2 FMAs per cycle, and with w, q_r, k_r they fit in 16 registers.
template <class T, std::size_t NB, bool Scaled, bool WithB>
void sherman_morrison_columns(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                              const T* k_next, T* a, T* b, std::size_t j0) {
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  B acc_a[NB], acc_b[NB];
  for (std::size_t n = 0; n < NB; ++n) acc_a[n] = acc_b[n] = B(T(0));
  const B s(scale);
  for (std::size_t r = 0; r < d; ++r) {
    const B wr(w[r]);
    const B qr(q[r]);
    const B kr(WithB ? k_next[r] : T(0));
    T* row = R + r * ldr + j0;
    for (std::size_t n = 0; n < NB; ++n) {
      B x = B::load_unaligned(row + n * W);
      if (Scaled) x = x * s;
      x = xsimd::fnma(wr, B::load_unaligned(w + j0 + n * W), x);
      x.store_unaligned(row + n * W);
      acc_a[n] = xsimd::fma(qr, x, acc_a[n]);
      if (WithB) acc_b[n] = xsimd::fma(kr, x, acc_b[n]);
    }
  }
  for (std::size_t n = 0; n < NB; ++n) {
    acc_a[n].store_unaligned(a + j0 + n * W);
    if (WithB) acc_b[n].store_unaligned(b + j0 + n * W);
  }
}

// The last rem < W columns, through the same instructions on zero-padded batches.
template <class T, bool Scaled, bool WithB>
void sherman_morrison_tail(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                           const T* k_next, T* a, T* b, std::size_t j0, std::size_t rem) {
  using B = simd_batch<T>;
  B acc_a(T(0)), acc_b(T(0));
  const B s(scale);
  const B wj = load_partial(w + j0, rem);
  for (std::size_t r = 0; r < d; ++r) {
    T* row = R + r * ldr + j0;
    B x = load_partial(row, rem);
    if (Scaled) x = x * s;
    x = xsimd::fnma(B(w[r]), wj, x);
    store_partial(x, row, rem);
    acc_a = xsimd::fma(B(q[r]), x, acc_a);
    if (WithB) acc_b = xsimd::fma(B(k_next[r]), x, acc_b);
  }
  store_partial(acc_a, a + j0, rem);
  if (WithB) store_partial(acc_b, b + j0, rem);
}

template <class T, bool Scaled, bool WithB>
void sherman_morrison_all(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                          const T* k_next, T* a, T* b) {
  for_each_column_block<T>(
      d,
      [&](auto nb, std::size_t j0) {
        sherman_morrison_columns<T, decltype(nb)::value, Scaled, WithB>(d, R, ldr, w, scale, q, k_next, a, b, j0);
      },
      [&](std::size_t j0, std::size_t rem) {
        sherman_morrison_tail<T, Scaled, WithB>(d, R, ldr, w, scale, q, k_next, a, b, j0, rem);
      });
}

}  // namespace detail
#endif

// R <- scale R - w w^T, then a = R q and (if k_next != nullptr) b = R k_next.
// R: d x d row-major, symmetric, row stride ldr >= d. a and b must not alias R,
// w, q or k_next. scale = 1 skips the multiply (no forgetting).
template <class T>
void sherman_morrison_update(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                             const T* k_next, T* a, T* b) {
#if MESAOPT_SIMD
  const bool scaled = scale != T(1);
  if (k_next != nullptr) {
    if (scaled) detail::sherman_morrison_all<T, true, true>(d, R, ldr, w, scale, q, k_next, a, b);
    else detail::sherman_morrison_all<T, false, true>(d, R, ldr, w, scale, q, k_next, a, b);
  } else {
    if (scaled) detail::sherman_morrison_all<T, true, false>(d, R, ldr, w, scale, q, k_next, a, b);
    else detail::sherman_morrison_all<T, false, false>(d, R, ldr, w, scale, q, k_next, a, b);
  }
#else
  reference::sherman_morrison_update(d, R, ldr, w, scale, q, k_next, a, b);
#endif
}

// The w of (M7) with forgetting factor gamma (docs/math.md §3):
//   R_t = (R_{t-1} - u u^T / (gamma + k.u)) / gamma = R_{t-1}/gamma - w w^T,
//   w = u / sqrt(gamma (gamma + k.u)).
// Writes w (d entries) and returns den = gamma + k.u (> 0 while R is SPD).
template <class T>
T sherman_morrison_gain(std::size_t d, const T* k, const T* u, T gamma, T* w) {
  const T den = gamma + dot(k, u, d);
  const T inv = T(1) / std::sqrt(gamma * den);
  for (std::size_t i = 0; i < d; ++i) w[i] = u[i] * inv;
  return den;
}

}  // namespace mesaopt::kernels
