#pragma once
// The fused Sherman-Morrison step of the mesa layer, docs/math.md (M7, M9):
//
//   R_t = scale * R_{t-1} - w w^T        (w = u / sqrt(gamma (gamma + k.u)), scale = 1/gamma)
//   a_t = R_t q_t,   b = R_t k_{t+1}     (b is u_{t+1} of the next step)
//   y = R_t x                            (optional: the backward's dq_t = R_t da_t, M10)
//
// in ONE pass over R: while row r of R_t is written it is immediately used for
// the matrix-vector products. Because R is symmetric, (R q)_j = sum_r q_r R_rj:
// each row contributes q_r * row_r to a vector accumulator, so no horizontal
// sums are needed and a, b stay in registers for a block of columns.
//
// Bitwise symmetry: entry (i, j) is fnma(w_i, w_j, scale R_ij) and entry (j, i)
// is fnma(w_j, w_i, scale R_ji); the product is commutative and every entry,
// overlapping batches included, goes through the same batch instruction, so R
// stays exactly symmetric (docs/math.md §3 shows why that matters in float32).
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>
#include <mesaopt/kernels/vector_ops.hpp>

#include <cmath>
#include <cstddef>
#include <type_traits>

namespace mesaopt::kernels {

#if MESAOPT_SIMD
namespace detail {

// W zeros then W ones: loadu(kSkipMask<T>.lanes + W - s) has its first s lanes 0.
template <class T>
struct SkipMask {
  alignas(64) T lanes[2 * simd_width<T>];
  constexpr SkipMask() : lanes{} {
    for (std::size_t i = simd_width<T>; i < 2 * simd_width<T>; ++i) lanes[i] = T(1);
  }
};
template <class T>
inline constexpr SkipMask<T> kSkipMask{};

// One batch of one row: R's entries <- scale R - w_r w_j (stored back), and
// their products with q_r (and k_r, x_r) added to the batch's accumulators.
template <class Bt, bool Scaled, bool WithB, bool WithX, class T>
inline void sherman_morrison_row_batch(Bt rr, T* dst, const Bt& wj, T scale, T wr, T qr, T kr, T xr, Bt& acc_a,
                                       Bt& acc_b, Bt& acc_y) {
  if (Scaled) rr = rr * Bt(scale);
  rr = fma_exact(Bt(-wr), wj, rr);  // -w_r w_j + R: the negation is exact
  rr.store_unaligned(dst);
  acc_a = fma_exact(Bt(qr), rr, acc_a);
  if (WithB) acc_b = fma_exact(Bt(kr), rr, acc_b);
  if (WithX) acc_y = fma_exact(Bt(xr), rr, acc_y);
}

// One pass over all rows for the columns of NB batches at the offsets c[0..NB)
// (for_each_overlapping_column_pass): NB - 1 full batches, then a last one,
// half-width when Half, that may overlap the one before it. A row's last batch
// is loaded before any of its batches is stored, so a shared column is updated
// once, from the old value, in both batches with the same bits. Up to 3
// products ride along with the update: a = R q always, b = R k_next (WithB),
// y = R x (WithX, the backward's dq = R da). NB = 4 gives 4-12 independent
// accumulator chains, enough to cover the 4-cycle FMA latency at 2 FMAs per
// cycle. At d = 20 (float, AVX-512) one pass of a full and a half-width batch
// replaced a full pass and a masked tail pass (docs/kernels.md).
//
// WithDen (with WithB): also returns this pass's share of k_next . b, summed
// from the accumulators before they are stored: the full batches' products
// in one FMA chain, then the last batch's with its columns shared with the
// batch before it masked out (each column counted once).
template <class T, std::size_t NB, bool Half, bool Scaled, bool WithB, bool WithX, bool WithDen = false>
T sherman_morrison_pass(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q, const T* k_next,
                        const T* x, T* a, T* b, T* y, const std::size_t* offsets) {
  using B = simd_batch<T>;
  using L = std::conditional_t<Half, simd_half_batch<T>, B>;  // the last batch
  constexpr std::size_t NF = NB - 1;                         // the full batches before it
  B acc_a[NF + 1], acc_b[NF + 1], acc_y[NF + 1], wj[NF + 1];  // (+ 1: no zero-size arrays)
  // w's batches stay in registers for passes of up to 3 batches; with 4, the
  // registers are better spent elsewhere and w is read from L1 every row (d =
  // 64: 287 against 304 ns per call, d = 32 and 40: 65 against 75 ns and 109
  // against 119 ns the other way round; docs/kernels.md).
  constexpr bool kHoistW = NB < 4;
  std::size_t c[NB];
  for (std::size_t n = 0; n < NB; ++n) c[n] = offsets[n];
  for (std::size_t n = 0; n < NF; ++n) {
    acc_a[n] = acc_b[n] = acc_y[n] = B(T(0));
    wj[n] = B::load_unaligned(w + c[n]);
  }
  L last_a(T(0)), last_b(T(0)), last_y(T(0));
  const L last_w = L::load_unaligned(w + c[NF]);
  for (std::size_t r = 0; r < d; ++r) {
    const T wr = w[r], qr = q[r], kr = WithB ? k_next[r] : T(0), xr = WithX ? x[r] : T(0);
    T* row = R + r * ldr;
    // The last batch, the only one that may overlap another, is loaded before any store.
    const L last = L::load_unaligned(row + c[NF]);
    for (std::size_t n = 0; n < NF; ++n)
      sherman_morrison_row_batch<B, Scaled, WithB, WithX>(B::load_unaligned(row + c[n]), row + c[n],
                                                          kHoistW ? wj[n] : B::load_unaligned(w + c[n]), scale, wr,
                                                          qr, kr, xr, acc_a[n], acc_b[n], acc_y[n]);
    sherman_morrison_row_batch<L, Scaled, WithB, WithX>(last, row + c[NF], last_w, scale, wr, qr, kr, xr, last_a,
                                                        last_b, last_y);
  }
  for (std::size_t n = 0; n < NF; ++n) {
    acc_a[n].store_unaligned(a + c[n]);
    if (WithB) acc_b[n].store_unaligned(b + c[n]);
    if (WithX) acc_y[n].store_unaligned(y + c[n]);
  }
  last_a.store_unaligned(a + c[NF]);
  if (WithB) last_b.store_unaligned(b + c[NF]);
  if (WithX) last_y.store_unaligned(y + c[NF]);
  if constexpr (WithDen) {
    static_assert(WithB, "k_next . b needs b");
    // Columns of the last batch already in the batch before it: its first `shared` lanes.
    const std::size_t shared = NB >= 2 ? c[NF - 1] + simd_width<T> - c[NF] : 0;
    const L kept = L::load_unaligned(kSkipMask<T>.lanes + simd_width<T> - shared);  // 0 for shared lanes, else 1
    T sum = T(0);
    if constexpr (NF > 0) {
      B p = B::load_unaligned(k_next + c[0]) * acc_b[0];
      for (std::size_t n = 1; n < NF; ++n) p = fma_exact(B::load_unaligned(k_next + c[n]), acc_b[n], p);
      sum = horizontal_sum(p);
    }
    return sum + horizontal_sum((L::load_unaligned(k_next + c[NF]) * kept) * last_b);
  }
  return T(0);
}

// d < W: one zero-padded batch per row, through masked loads and stores.
// WithDen: returns k_next . b (k_next's padding lanes load as 0).
template <class T, bool Scaled, bool WithB, bool WithX, bool WithDen = false>
T sherman_morrison_narrow(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q, const T* k_next,
                          const T* x, T* a, T* b, T* y) {
  using B = simd_batch<T>;
  B acc_a(T(0)), acc_b(T(0)), acc_y(T(0));
  const B s(scale);
  const B wj = load_partial(w, d);
  for (std::size_t r = 0; r < d; ++r) {
    T* row = R + r * ldr;
    B rr = load_partial(row, d);
    if (Scaled) rr = rr * s;
    rr = fma_exact(B(-w[r]), wj, rr);
    store_partial(rr, row, d);
    acc_a = fma_exact(B(q[r]), rr, acc_a);
    if (WithB) acc_b = fma_exact(B(k_next[r]), rr, acc_b);
    if (WithX) acc_y = fma_exact(B(x[r]), rr, acc_y);
  }
  store_partial(acc_a, a, d);
  if (WithB) store_partial(acc_b, b, d);
  if (WithX) store_partial(acc_y, y, d);
  if constexpr (WithDen) return horizontal_sum(load_partial(k_next, d) * acc_b);
  return T(0);
}

template <class T, bool Scaled, bool WithB, bool WithX, bool WithDen = false>
T sherman_morrison_all(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q, const T* k_next,
                       const T* x, T* a, T* b, T* y) {
  if (d == 0) return T(0);
  if (d < simd_width<T>)
    return sherman_morrison_narrow<T, Scaled, WithB, WithX, WithDen>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
  T sum = T(0);  // k_next . b over the passes, in column order
  for_each_overlapping_column_pass<T>(d, [&](auto nb, auto half, const std::size_t* c) {
    sum += sherman_morrison_pass<T, decltype(nb)::value, decltype(half)::value, Scaled, WithB, WithX, WithDen>(
        d, R, ldr, w, scale, q, k_next, x, a, b, y, c);
  });
  return sum;
}

template <class T, bool Scaled, bool WithB, bool WithDen = false>
T sherman_morrison_dispatch_x(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                              const T* k_next, const T* x, T* a, T* b, T* y) {
  if (x != nullptr) return sherman_morrison_all<T, Scaled, WithB, true, WithDen>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
  return sherman_morrison_all<T, Scaled, WithB, false, WithDen>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
}

}  // namespace detail
#endif

// R <- scale R - w w^T, then a = R q, (if k_next != nullptr) b = R k_next and
// (if x != nullptr) y = R x, all in the one pass over R. R: d x d row-major,
// symmetric, row stride ldr >= d. a, b and y must not alias R, w, q, k_next, x
// or each other. scale = 1 skips the multiply (no forgetting). The update of
// R and a do not depend on whether b or y are asked for (same instructions,
// same bits): the mesa backward's recomputation with y reproduces the
// forward's R_t and a_t exactly.
template <class T>
void sherman_morrison_update(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                             const T* k_next, T* a, T* b, const T* x = nullptr, T* y = nullptr) {
#if MESAOPT_SIMD
  const bool scaled = scale != T(1);
  if (k_next != nullptr) {
    if (scaled) detail::sherman_morrison_dispatch_x<T, true, true>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
    else detail::sherman_morrison_dispatch_x<T, false, true>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
  } else {
    if (scaled) detail::sherman_morrison_dispatch_x<T, true, false>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
    else detail::sherman_morrison_dispatch_x<T, false, false>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
  }
#else
  reference::sherman_morrison_update(d, R, ldr, w, scale, q, k_next, a, b, x, y);
#endif
}

namespace detail {
// w = u / sqrt(gamma den): the gain's second half, shared by
// sherman_morrison_gain and sherman_morrison_update_gain (the same bits for
// the same u and den). A plain loop: the next token's pass loads w_r one by
// one, and those loads stalled behind vector stores in the pass's
// overlapping batch layout (docs/kernels.md). w may be u.
template <class T>
void scale_to_gain(std::size_t d, const T* u, T gamma, T den, T* w) {
  const T inv = T(1) / std::sqrt(gamma * den);
  for (std::size_t i = 0; i < d; ++i) w[i] = u[i] * inv;
}
}  // namespace detail

// sherman_morrison_update with k_next given, followed by the gain of the next
// token (sherman_morrison_gain) from b = R_t k_next = u_{t+1}:
//   den = gamma + k_next . b,   w_next = b / sqrt(gamma den);   returns den.
// R, a, b and y have the bits sherman_morrison_update gives them. den is
// summed from the pass's accumulators in registers, without reloading b (in
// a different order than sherman_morrison_gain's dot, so its last bits may
// differ from that one's). w_next must not alias R, w, q, k_next, x, a or y; it may be b.
template <class T>
T sherman_morrison_update_gain(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                               const T* k_next, T gamma, T* a, T* b, T* w_next, const T* x = nullptr,
                               T* y = nullptr) {
#if MESAOPT_SIMD
  const T dot_kb = scale != T(1)
                       ? detail::sherman_morrison_dispatch_x<T, true, true, true>(d, R, ldr, w, scale, q, k_next, x, a, b, y)
                       : detail::sherman_morrison_dispatch_x<T, false, true, true>(d, R, ldr, w, scale, q, k_next, x, a, b, y);
#else
  reference::sherman_morrison_update(d, R, ldr, w, scale, q, k_next, a, b, x, y);
  const T dot_kb = reference::dot(k_next, b, d);
#endif
  const T den = gamma + dot_kb;
  detail::scale_to_gain(d, b, gamma, den, w_next);
  return den;
}

// The w of (M7) with forgetting factor gamma (docs/math.md §3):
//   R_t = (R_{t-1} - u u^T / (gamma + k.u)) / gamma = R_{t-1}/gamma - w w^T,
//   w = u / sqrt(gamma (gamma + k.u)).
// Writes w (d entries) and returns den = gamma + k.u (> 0 while R is SPD).
template <class T>
T sherman_morrison_gain(std::size_t d, const T* k, const T* u, T gamma, T* w) {
  const T den = gamma + dot(k, u, d);
  detail::scale_to_gain(d, u, gamma, den, w);
  return den;
}

}  // namespace mesaopt::kernels
