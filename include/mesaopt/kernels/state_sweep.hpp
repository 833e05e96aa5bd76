#pragma once
// The running outer-product state of linear attention over a whole sequence
// (docs/math.md M1-M2; its backward M3 is three such sweeps):
//
//   for t in 0, 1, ..., n - 1 (or n - 1, ..., 0 when reverse):
//     St <- St + k_t v_t^T,   o_t = St^T a_t          (St = S^T is d x dv)
//
// state_update_apply (state_update.hpp) does one token per call: every token
// loads each row of St from memory, updates it, stores it back, and the next
// token loads it again. At the paper's head size (d = dv = 20) the state is a
// few cache lines and the per-token loads, stores and calls, not the FMAs, set
// the speed. Entry (r, j) of St depends only on k_t[r] and v_t[j], and o_t is
// a sum over rows, so the state splits into independent blocks of R rows x NB
// batches of W columns (W the SIMD width): each block is loaded into R NB
// registers once, swept over the whole sequence, and stored once. Per token a
// block costs R broadcasts of k_t, R of a_t, NB loads of v_t and 2 R NB FMAs;
// o_t's columns get the block's partial sum over its rows (the first row block
// stores it, the later ones add to it). Columns past the last multiple of W go
// in a batch that overlaps the one before it, so no load or store is masked.
// docs/kernels.md, "state_sweep".
//
// Summation order of o_t[j]: row blocks in order r0 = 0, R, 2R, ...; inside a
// block two partial sums (even and odd rows) added at the end. Not the order
// of state_update_apply: results agree to rounding, not bit for bit.
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>
#include <mesaopt/kernels/state_update.hpp>

#include <algorithm>
#include <cstddef>
#include <utility>

namespace mesaopt::kernels {

// Rows and column batches of St held in registers per pass (at most 2 batches
// per pass: the block is instantiated for NB = 1 and 2). R NB state batches,
// 2 NB accumulators, NB batches of v_t and two broadcasts: with R = 8 that is
// 13 of AVX2's 16 registers for NB = 1 and 26 of AVX-512's 32 for NB = 2.
inline constexpr std::size_t kStateSweepRows = 8;
#if defined(__AVX512F__)
inline constexpr std::size_t kStateSweepBatches = 2;
#else
inline constexpr std::size_t kStateSweepBatches = 1;
#endif

#if MESAOPT_SIMD
namespace detail {

// One block: rows [r0, r0 + R) of St, NB batches of W columns starting at the
// columns c[0], c[1] (all inside [0, dv): full loads and stores, no masks).
// The two batches of a pass may overlap (c[1] < c[0] + W, the columns of dv
// past the last multiple of W): both then compute the shared columns with the
// same instructions on the same inputs, so they hold the same bits, and o's
// batches are all loaded before any is stored, so a shared column is added to
// once. first: these rows are the first of o_t's sum (store), else add to what
// the earlier row blocks left.
template <class T, std::size_t R, std::size_t NB>
void state_sweep_block(std::size_t n, std::size_t r0, const std::size_t* c, T* St, std::size_t lds, const T* k,
                       std::size_t ldk, const T* v, std::size_t ldv, const T* a, std::size_t lda, T* o,
                       std::size_t ldo, bool reverse, bool first) {
  using B = simd_batch<T>;
  B s[R][NB];
  for (std::size_t r = 0; r < R; ++r)
    for (std::size_t b = 0; b < NB; ++b) s[r][b] = B::load_unaligned(St + (r0 + r) * lds + c[b]);
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t t = reverse ? n - 1 - i : i;
    const T* kt = k + t * ldk + r0;
    const T* at = a + t * lda + r0;
    const T* vt = v + t * ldv;
    T* ot = o + t * ldo;
    B vb[NB], acc0[NB], acc1[NB];
    for (std::size_t b = 0; b < NB; ++b) {
      vb[b] = B::load_unaligned(vt + c[b]);
      acc0[b] = acc1[b] = B(T(0));
    }
    for (std::size_t r = 0; r < R; ++r) {
      const B kr(kt[r]), ar(at[r]);
      for (std::size_t b = 0; b < NB; ++b) {
        s[r][b] = xsimd::fma(kr, vb[b], s[r][b]);
        if (r % 2 == 0) acc0[b] = xsimd::fma(ar, s[r][b], acc0[b]);
        else acc1[b] = xsimd::fma(ar, s[r][b], acc1[b]);
      }
    }
    B total[NB];
    for (std::size_t b = 0; b < NB; ++b) {
      total[b] = R > 1 ? acc0[b] + acc1[b] : acc0[b];
      if (!first) total[b] = B::load_unaligned(ot + c[b]) + total[b];
    }
    for (std::size_t b = 0; b < NB; ++b) total[b].store_unaligned(ot + c[b]);
  }
  for (std::size_t r = 0; r < R; ++r)
    for (std::size_t b = 0; b < NB; ++b) s[r][b].store_unaligned(St + (r0 + r) * lds + c[b]);
}

// Rows of St per block for NB batches per pass (see kStateSweepRows).
template <std::size_t NB>
inline constexpr std::size_t state_sweep_rows_max = NB == 1 || kStateSweepBatches == 2 ? kStateSweepRows : 4;

// One pass: the columns c[0..NB) over all rows, in blocks of equal size
// (d = 20 with 8 rows at most: 7 + 7 + 6), each dispatched to its
// instantiation.
template <class T, std::size_t NB, std::size_t... Rs>
void state_sweep_pass(std::index_sequence<Rs...>, std::size_t n, std::size_t d, const std::size_t* c, T* St,
                      std::size_t lds, const T* k, std::size_t ldk, const T* v, std::size_t ldv, const T* a,
                      std::size_t lda, T* o, std::size_t ldo, bool reverse) {
  constexpr std::size_t rmax = state_sweep_rows_max<NB>;
  const std::size_t blocks = (d + rmax - 1) / rmax;
  const std::size_t block_rows = (d + blocks - 1) / blocks;
  for (std::size_t r0 = 0; r0 < d; r0 += block_rows) {
    const std::size_t rows = std::min(block_rows, d - r0);
    (void)((rows == Rs + 1 ? (state_sweep_block<T, Rs + 1, NB>(n, r0, c, St, lds, k, ldk, v, ldv, a, lda, o, ldo,
                                                               reverse, r0 == 0),
                              true)
                           : false) ||
           ...);
  }
}

// The passes over columns for dv >= W: batches of W columns, two per pass
// where kStateSweepBatches allows; the columns past the last multiple of W
// share a pass with the batch before them, overlapping it (dv = 20, W = 16:
// columns [0, 16) and [4, 20); W = 8: [0, 8), then [8, 16) and [12, 20)).
template <class T>
void state_sweep_columns(std::size_t n, std::size_t d, std::size_t dv, T* St, std::size_t lds, const T* k,
                         std::size_t ldk, const T* v, std::size_t ldv, const T* a, std::size_t lda, T* o,
                         std::size_t ldo, bool reverse) {
  constexpr std::size_t W = simd_width<T>;
  const auto rows1 = std::make_index_sequence<state_sweep_rows_max<1>>{};
  const auto rows2 = std::make_index_sequence<state_sweep_rows_max<2>>{};
  for (std::size_t j0 = 0; j0 < dv;) {
    const std::size_t rest = dv - j0;
    const bool two_full = kStateSweepBatches == 2 && rest >= 2 * W && (rest == 2 * W || rest - 2 * W >= W);
    if (two_full || (rest > W && rest < 2 * W)) {
      const std::size_t c[2] = {j0, two_full ? j0 + W : dv - W};
      state_sweep_pass<T, 2>(rows2, n, d, c, St, lds, k, ldk, v, ldv, a, lda, o, ldo, reverse);
      j0 += two_full ? 2 * W : rest;
    } else {
      const std::size_t c[1] = {j0};
      state_sweep_pass<T, 1>(rows1, n, d, c, St, lds, k, ldk, v, ldv, a, lda, o, ldo, reverse);
      j0 += W;
    }
  }
}

}  // namespace detail
#endif

// St (d x dv, row-major, row stride lds >= dv) holds the initial state on entry
// and the final one on return. k: n x d (row stride ldk), v: n x dv, a: n x d,
// o: n x dv; o must not alias the inputs. reverse = true runs t = n - 1 ... 0
// (the backward pass's sweeps from the last token).
template <class T>
void state_sweep(std::size_t n, std::size_t d, std::size_t dv, T* St, std::size_t lds, const T* k, std::size_t ldk,
                 const T* v, std::size_t ldv, const T* a, std::size_t lda, T* o, std::size_t ldo, bool reverse) {
#if MESAOPT_SIMD
  constexpr std::size_t W = simd_width<T>;
  if (d == 0) {
    for (std::size_t t = 0; t < n; ++t) std::fill(o + t * ldo, o + t * ldo + dv, T(0));
    return;
  }
  if (dv >= W) {
    detail::state_sweep_columns(n, d, dv, St, lds, k, ldk, v, ldv, a, lda, o, ldo, reverse);
    return;
  }
  // dv < W (tiny heads): the one-token kernel, whose masked tail is one batch.
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t t = reverse ? n - 1 - i : i;
    state_update_apply(d, dv, St, lds, T(1), k + t * ldk, v + t * ldv, a + t * lda, o + t * ldo);
  }
#else
  reference::state_sweep(n, d, dv, St, lds, k, ldk, v, ldv, a, lda, o, ldo, reverse);
#endif
}

}  // namespace mesaopt::kernels
