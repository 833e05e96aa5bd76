#pragma once
// The running outer-product state shared by linear attention (M1-M2) and the
// mesa layer (M8-M9), fused with its application:
//
//   St <- scale St + k v^T,   o = St^T a        (St = S^T is d x dv)
//
// S is stored transposed so that o = S a = sum_r a_r St_r is a sum of rows:
// one pass over the state, vector accumulators, no horizontal sums.
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>

#include <cmath>
#include <cstddef>

namespace mesaopt::kernels {

#if MESAOPT_SIMD
namespace detail {

// Columns [j0, j0 + NB W) of every row. The NB batches of v stay in registers
// for the whole pass (NB <= 4: 4 v + 4 accumulators + broadcasts fit in the 16
// AVX2 registers; measured 51% vs 44% of peak at d = dv = 64 against reloading v
// every row). With NB <= 2 there would be only 1-2 accumulator chains of 4-cycle
// FMAs, so even and odd rows go to separate accumulators (summed at the end).
template <class T, std::size_t NB, bool Scaled>
void state_update_columns(std::size_t d, T* St, std::size_t lds, T scale, const T* k, const T* v, const T* a,
                          T* o, std::size_t j0) {
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  constexpr std::size_t P = NB <= 2 ? 2 : 1;  // rows in flight, each with its own accumulators
  B acc[P][NB], vj[NB];
  for (std::size_t n = 0; n < NB; ++n) {
    vj[n] = B::load_unaligned(v + j0 + n * W);
    for (std::size_t p = 0; p < P; ++p) acc[p][n] = B(T(0));
  }
  const B s(scale);
  auto row_step = [&](std::size_t r, B* acc_row) {
    const B kr(k[r]);
    const B ar(a[r]);
    T* row = St + r * lds + j0;
    for (std::size_t n = 0; n < NB; ++n) {
      B x = B::load_unaligned(row + n * W);
      if (Scaled) x = x * s;
      x = xsimd::fma(kr, vj[n], x);
      x.store_unaligned(row + n * W);
      acc_row[n] = xsimd::fma(ar, x, acc_row[n]);
    }
  };
  std::size_t r = 0;
  for (; r + P <= d; r += P)
    for (std::size_t p = 0; p < P; ++p) row_step(r + p, acc[p]);
  for (; r < d; ++r) row_step(r, acc[0]);
  for (std::size_t n = 0; n < NB; ++n) {
    B total = acc[0][n];
    for (std::size_t p = 1; p < P; ++p) total = total + acc[p][n];
    total.store_unaligned(o + j0 + n * W);
  }
}

// The last rem < W columns. Scalar on purpose: these are independent FMA
// chains (one per column), and a masked store per row (vmaskmovps) is slow on
// Zen 3; measured on the linear-dynamics models (head size 20 = 16 + 4).
// Unlike the Sherman-Morrison kernel there is no symmetry to preserve here.
template <class T, bool Scaled>
void state_update_tail(std::size_t d, T* St, std::size_t lds, T scale, const T* k, const T* v, const T* a, T* o,
                       std::size_t j0, std::size_t rem) {
  constexpr std::size_t W = simd_width<T>;
  T acc[W] = {};
  for (std::size_t r = 0; r < d; ++r) {
    T* row = St + r * lds + j0;
    for (std::size_t j = 0; j < rem; ++j) {
      T x = Scaled ? row[j] * scale : row[j];
      x = std::fma(k[r], v[j0 + j], x);
      row[j] = x;
      acc[j] = std::fma(a[r], x, acc[j]);
    }
  }
  for (std::size_t j = 0; j < rem; ++j) o[j0 + j] = acc[j];
}

template <class T, bool Scaled>
void state_update_all(std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k, const T* v,
                      const T* a, T* o) {
  constexpr std::size_t W = simd_width<T>;
  std::size_t j = 0;
  for (; j + 4 * W <= dv; j += 4 * W) state_update_columns<T, 4, Scaled>(d, St, lds, scale, k, v, a, o, j);
  const std::size_t full = (dv - j) / W;
  if (full == 3) state_update_columns<T, 3, Scaled>(d, St, lds, scale, k, v, a, o, j);
  if (full == 2) state_update_columns<T, 2, Scaled>(d, St, lds, scale, k, v, a, o, j);
  if (full == 1) state_update_columns<T, 1, Scaled>(d, St, lds, scale, k, v, a, o, j);
  j += full * W;
  if (j < dv) state_update_tail<T, Scaled>(d, St, lds, scale, k, v, a, o, j, dv - j);
}

}  // namespace detail
#endif

// St <- scale St + k v^T, then o = St^T a. St: d x dv row-major, row stride
// lds >= dv; o (dv entries) must not alias the inputs. scale = 1: no decay.
template <class T>
void state_update_apply(std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k, const T* v,
                        const T* a, T* o) {
#if MESAOPT_SIMD
  if (scale != T(1)) detail::state_update_all<T, true>(d, dv, St, lds, scale, k, v, a, o);
  else detail::state_update_all<T, false>(d, dv, St, lds, scale, k, v, a, o);
#else
  reference::state_update_apply(d, dv, St, lds, scale, k, v, a, o);
#endif
}

}  // namespace mesaopt::kernels
