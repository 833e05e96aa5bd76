#pragma once
// The running outer-product state shared by linear attention (M1-M2) and the
// mesa layer (M8-M9), fused with its application:
//
//   St <- scale St + k v^T,   o = St^T a        (St = S^T is d x dv)
//
// S is stored transposed so that o = S a = sum_r a_r St_r is a sum of rows:
// one pass over the state, vector accumulators, no horizontal sums.
//
// The mesa backward pass (M10) needs the other product with the same update:
//
//   St <- scale St + k v^T,   da = St g         (state_update_dot)
//
// a dot product per row: each row is updated and dotted with g while it is in
// registers, instead of a second pass that would read St again.
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>

namespace mesaopt::kernels {

#if MESAOPT_SIMD
namespace detail {

// Columns [j0, j0 + NB W) of every row. The NB batches of v stay in registers
// for the whole pass (NB <= 4: 4 v + 4 accumulators + broadcasts fit in the 16
// AVX2 registers; faster than reloading v every row, see docs/kernels.md).
// With NB <= 2 there would be only 1-2 accumulator chains of 4-cycle FMAs, so
// even and odd rows go to separate accumulators (summed at the end).
// Partial: the last batch is only `last` < W columns wide (masked loads and
// stores; zero-padded lanes stay zero and are never written back).
template <class T, std::size_t NB, bool Scaled, bool Partial = false>
void state_update_columns(std::size_t d, T* St, std::size_t lds, T scale, const T* k, const T* v, const T* a,
                          T* o, std::size_t j0, std::size_t last = simd_width<T>) {
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  constexpr std::size_t P = NB <= 2 ? 2 : 1;  // rows in flight, each with its own accumulators
  auto partial = [](std::size_t n) { return Partial && n == NB - 1; };
  auto load = [&](const T* p, std::size_t n) { return partial(n) ? load_partial(p, last) : B::load_unaligned(p); };
  auto store = [&](const B& x, T* p, std::size_t n) {
    if (partial(n)) store_partial(x, p, last);
    else x.store_unaligned(p);
  };
  B acc[P][NB], vj[NB];
  for (std::size_t n = 0; n < NB; ++n) {
    vj[n] = load(v + j0 + n * W, n);
    for (std::size_t p = 0; p < P; ++p) acc[p][n] = B(T(0));
  }
  const B s(scale);
  auto row_step = [&](std::size_t r, B* acc_row) {
    const B kr(k[r]);
    const B ar(a[r]);
    T* row = St + r * lds + j0;
    for (std::size_t n = 0; n < NB; ++n) {
      B x = load(row + n * W, n);
      if (Scaled) x = x * s;
      x = xsimd::fma(kr, vj[n], x);
      store(x, row + n * W, n);
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
    store(total, o + j0 + n * W, n);
  }
}

// The last rem < W columns. Scalar on purpose: these are independent FMA
// chains (one per column), and a masked store per row (vmaskmovps) can be slow
// (measured faster than the masked tail; docs/kernels.md). Unlike the
// Sherman-Morrison kernel there is no symmetry to preserve here.
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
#if defined(__AVX512F__)
  // Masked loads and stores are single instructions here: the last < W columns
  // ride along in the last block (one pass over the rows, not two; at the
  // paper's head size 20 in float, 16 + 4 columns; docs/kernels.md). Only for
  // a row stride that is a multiple of W (padded_stride): with rows that
  // straddle cache lines, a row's masked store and the next token's load of
  // it stall, and the masked pass was slower than the scalar tail.
  if (sizeof(simd_batch<T>) == 64 && lds % simd_width<T> == 0) {
    for_each_column_block_masked<T>(dv, [&](auto nb, std::size_t j0, std::size_t last) {
      constexpr std::size_t NB = decltype(nb)::value;
      if (last == simd_width<T>) state_update_columns<T, NB, Scaled, false>(d, St, lds, scale, k, v, a, o, j0);
      else state_update_columns<T, NB, Scaled, true>(d, St, lds, scale, k, v, a, o, j0, last);
    });
    return;
  }
#endif
  for_each_column_block<T>(
      dv,
      [&](auto nb, std::size_t j0) {
        state_update_columns<T, decltype(nb)::value, Scaled>(d, St, lds, scale, k, v, a, o, j0);
      },
      [&](std::size_t j0, std::size_t rem) { state_update_tail<T, Scaled>(d, St, lds, scale, k, v, a, o, j0, rem); });
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

// St <- scale St + k v^T, then da = St g (da_r = sum_j St_rj g_j; = S^T g with
// S = St^T). St: d x dv row-major, row stride lds >= dv; da (d entries) must
// not alias the inputs. scale = 1 skips the multiply (no decay).
// Row by row: two accumulators (two independent FMA chains) over 2-batch
// steps, the last < 2 W columns one batch at a time (a zero-padded partial
// batch for the final < W), one horizontal sum per row.
template <class T>
void state_update_dot(std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k, const T* v,
                      const T* g, T* da) {
#if MESAOPT_SIMD
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  const bool scaled = scale != T(1);
  const B s(scale);
  for (std::size_t r = 0; r < d; ++r) {
    T* row = St + r * lds;
    const B kr(k[r]);
    B acc0(T(0)), acc1(T(0));
    std::size_t j = 0;
    for (; j + 2 * W <= dv; j += 2 * W) {
      B x0 = B::load_unaligned(row + j), x1 = B::load_unaligned(row + j + W);
      if (scaled) {
        x0 = x0 * s;
        x1 = x1 * s;
      }
      x0 = xsimd::fma(kr, B::load_unaligned(v + j), x0);
      x1 = xsimd::fma(kr, B::load_unaligned(v + j + W), x1);
      x0.store_unaligned(row + j);
      x1.store_unaligned(row + j + W);
      acc0 = xsimd::fma(x0, B::load_unaligned(g + j), acc0);
      acc1 = xsimd::fma(x1, B::load_unaligned(g + j + W), acc1);
    }
    for (; j < dv; j += W) {
      const std::size_t n = std::min(W, dv - j);
      B x = n == W ? B::load_unaligned(row + j) : detail::load_partial(row + j, n);
      if (scaled) x = x * s;
      x = xsimd::fma(kr, n == W ? B::load_unaligned(v + j) : detail::load_partial(v + j, n), x);
      if (n == W) x.store_unaligned(row + j);
      else detail::store_partial(x, row + j, n);
      acc0 = xsimd::fma(x, n == W ? B::load_unaligned(g + j) : detail::load_partial(g + j, n), acc0);
    }
    da[r] = detail::horizontal_sum(acc0 + acc1);
  }
#else
  reference::state_update_dot(d, dv, St, lds, scale, k, v, g, da);
#endif
}

}  // namespace mesaopt::kernels
