#pragma once
// The symmetric rank-2 accumulator of the mesa backward pass, docs/math.md (M11),
// fused with its application:
//
//   M <- scale M + x y^T + y x^T   (M symmetric, d x d),   out = M k
//
// in ONE pass over M. Because M is symmetric, (M k)_j = sum_r k_r M_rj: while
// row r is written, k_r * row_r is added to vector accumulators for a block of
// columns, so there are no horizontal sums and x_j, y_j stay in registers for
// the whole column block (the structure of sherman_morrison.hpp).
//
// Entry (i, j) is fma(y_i, x_j, fma(x_i, y_j, scale M_ij)): its two products
// are rounded in a different order than those of entry (j, i), so unlike the
// Sherman-Morrison kernel this one does NOT keep M bitwise symmetric; M stays
// symmetric to within a rounding per entry, and out = M^T k (the sum over
// rows) is what is computed. docs/kernels.md has the details.
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>

#include <cstddef>

namespace mesaopt::kernels {

#if MESAOPT_SIMD
namespace detail {

// Columns [j0, j0 + NB W) of M <- scale M + x y^T + y x^T and (M k)_j = sum_r k_r M_rj.
// x_j, y_j stay in registers for the whole column block: NB = 4 gives 4
// accumulators + 8 operands + 3 broadcasts = 15 of 16 AVX2 registers.
template <class T, std::size_t NB, bool Scaled>
void rank2_columns(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k, T* out,
                   std::size_t j0) {
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  B acc[NB], xj[NB], yj[NB];
  for (std::size_t n = 0; n < NB; ++n) {
    acc[n] = B(T(0));
    xj[n] = B::load_unaligned(x + j0 + n * W);
    yj[n] = B::load_unaligned(y + j0 + n * W);
  }
  const B s(scale);
  for (std::size_t r = 0; r < d; ++r) {
    const B xr(x[r]), yr(y[r]), kr(k[r]);
    T* row = M + r * ldm + j0;
    for (std::size_t n = 0; n < NB; ++n) {
      B m = B::load_unaligned(row + n * W);
      if (Scaled) m = m * s;
      m = xsimd::fma(xr, yj[n], m);
      m = xsimd::fma(yr, xj[n], m);
      m.store_unaligned(row + n * W);
      acc[n] = xsimd::fma(kr, m, acc[n]);
    }
  }
  for (std::size_t n = 0; n < NB; ++n) acc[n].store_unaligned(out + j0 + n * W);
}

// The last rem < W columns, through the same instructions on zero-padded batches.
template <class T, bool Scaled>
void rank2_tail(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k, T* out,
                std::size_t j0, std::size_t rem) {
  using B = simd_batch<T>;
  B acc(T(0));
  const B s(scale);
  const B xj = load_partial(x + j0, rem);
  const B yj = load_partial(y + j0, rem);
  for (std::size_t r = 0; r < d; ++r) {
    T* row = M + r * ldm + j0;
    B m = load_partial(row, rem);
    if (Scaled) m = m * s;
    m = xsimd::fma(B(x[r]), yj, m);
    m = xsimd::fma(B(y[r]), xj, m);
    store_partial(m, row, rem);
    acc = xsimd::fma(B(k[r]), m, acc);
  }
  store_partial(acc, out + j0, rem);
}

template <class T, bool Scaled>
void rank2_all(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k, T* out) {
  for_each_column_block<T>(
      d,
      [&](auto nb, std::size_t j0) { rank2_columns<T, decltype(nb)::value, Scaled>(d, M, ldm, scale, x, y, k, out, j0); },
      [&](std::size_t j0, std::size_t rem) { rank2_tail<T, Scaled>(d, M, ldm, scale, x, y, k, out, j0, rem); });
}

}  // namespace detail
#endif

// M <- scale M + x y^T + y x^T, then out = M k (computed as out_j = sum_r k_r M_rj,
// which is M k for symmetric M). M: d x d row-major, symmetric, row stride
// ldm >= d. out (d entries) must not alias M, x, y or k. scale = 1 skips the
// multiply (no forgetting).
template <class T>
void rank2_update_apply(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k,
                        T* out) {
#if MESAOPT_SIMD
  if (scale != T(1)) detail::rank2_all<T, true>(d, M, ldm, scale, x, y, k, out);
  else detail::rank2_all<T, false>(d, M, ldm, scale, x, y, k, out);
#else
  reference::rank2_update_apply(d, M, ldm, scale, x, y, k, out);
#endif
}

}  // namespace mesaopt::kernels
