#pragma once
// The running outer-product state of linear attention over a whole sequence
// (docs/math.md M1-M2; its backward M3 is three such sweeps):
//
//   for t in 0, 1, ..., n - 1 (or n - 1, ..., 0 when reverse):
//     St <- scale St + k_t v_t^T,   o_t = St^T a_t          (St = S^T is d x dv)
//
// scale = 1 for linear attention; the mesa op (M8-M9, its backward M10-M11)
// sweeps its S and G states this way with scale = gamma, its forgetting factor,
// and its symmetric rank-2 accumulator M (M11) with rank2_sweep below, the same
// blocks with two outer products per token.
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
// in a half-width batch or in a full one that overlaps the batch before it,
// so no load or store is masked. docs/kernels.md, "state_sweep and
// rank2_sweep".
//
// Summation order of o_t[j]: row blocks in order r0 = 0, R, 2R, ...; inside a
// block two partial sums (even and odd rows) added at the end. Not the order
// of state_update_apply: results agree to rounding, not bit for bit.
#include <mesaopt/kernels/rank2.hpp>
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>
#include <mesaopt/kernels/state_update.hpp>

#include <algorithm>
#include <cstddef>
#include <utility>

namespace mesaopt::kernels {

// Rows and column batches of St held in registers per pass (at most 2 batches
// per pass: the block is instantiated for one and two). R NB state batches,
// 2 NB accumulators, NB batches of v_t and two broadcasts: with R = 8 that is
// 13 of AVX2's 16 registers for NB = 1 and 26 of AVX-512's 32 for NB = 2.
inline constexpr std::size_t kStateSweepRows = 8;
#if defined(__AVX512F__)
inline constexpr std::size_t kStateSweepBatches = 2;
#else
inline constexpr std::size_t kStateSweepBatches = 1;
#endif

namespace detail {

// The per-token operands of a sweep: row t of each is one token. k2, v2 are
// the second outer product of the rank-2 sweep (null for rank 1).
template <class T>
struct SweepOperands {
  const T* k;
  std::size_t ldk;
  const T* v;
  std::size_t ldv;
  const T* k2;
  std::size_t ldk2;
  const T* v2;
  std::size_t ldv2;
  const T* a;
  std::size_t lda;
  T* o;
  std::size_t ldo;
};

}  // namespace detail

#if MESAOPT_SIMD
namespace detail {

// One column batch's state update for one row and token: s <- scale s + k_r v
// (+ k2_r v2 for the rank-2 sweep), in that order.
template <class B, bool Scaled, bool Rank2, class T>
inline void sweep_update(B& s, const B& v, const B& v2, T kr, T k2r, const B& scale) {
  s = xsimd::fma(B(kr), v, Scaled ? s * scale : s);
  if (Rank2) s = xsimd::fma(B(k2r), v2, s);
}

// One block: rows [r0, r0 + R) of St and one or two column batches, the first
// of type B0 at column c[0], the second (Two) of type B1 at c[1]. B1 is either
// B0 or the half-width batch (simd_half_batch) for columns past the last
// multiple of W. All loads and stores are full batches inside [0, dv): no
// masks. The two batches may overlap (c[1] < c[0] + width of B0, the columns
// past the last multiple of W): both then compute the shared columns with the
// same instructions on the same inputs, so they hold the same bits, and o's
// batches are all loaded before any is stored, so a shared column is added to
// once. first: these rows are the first of o_t's sum (store), else add to what
// the earlier row blocks left. Rank2: St += k v^T + k2 v2^T, the two products
// in that order (the order of rank2_update_apply).
template <class T, class B0, class B1, std::size_t R, bool Two, bool Scaled, bool Rank2>
void state_sweep_block(std::size_t n, std::size_t r0, const std::size_t* c, T* St, std::size_t lds, T scale,
                       const SweepOperands<T>& op, bool reverse, bool first) {
  const B0 sc0(scale);
  const B1 sc1(scale);
  B0 s0[R];
  B1 s1[R];
  for (std::size_t r = 0; r < R; ++r) {
    s0[r] = B0::load_unaligned(St + (r0 + r) * lds + c[0]);
    if (Two) s1[r] = B1::load_unaligned(St + (r0 + r) * lds + c[1]);
  }
  // The operands in locals: the stores to o below could alias op's fields, and
  // the compiler would reload them every token.
  const T *k = op.k, *v = op.v, *k2 = op.k2, *v2 = op.v2, *a = op.a;
  const std::size_t ldk = op.ldk, ldv = op.ldv, ldk2 = op.ldk2, ldv2 = op.ldv2, lda = op.lda, ldo = op.ldo;
  T* o = op.o;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t t = reverse ? n - 1 - i : i;
    const T* kt = k + t * ldk + r0;
    const T* at = a + t * lda + r0;
    const T* vt = v + t * ldv;
    const T* k2t = Rank2 ? k2 + t * ldk2 + r0 : nullptr;
    const T* v2t = Rank2 ? v2 + t * ldv2 : nullptr;
    T* ot = o + t * ldo;
    B0 v0 = B0::load_unaligned(vt + c[0]), v20(T(0)), acc00(T(0)), acc01(T(0));
    B1 v1(T(0)), v21(T(0)), acc10(T(0)), acc11(T(0));
    if (Two) v1 = B1::load_unaligned(vt + c[1]);
    if (Rank2) {
      v20 = B0::load_unaligned(v2t + c[0]);
      if (Two) v21 = B1::load_unaligned(v2t + c[1]);
    }
    for (std::size_t r = 0; r < R; ++r) {
      const T kr = kt[r], ar = at[r], k2r = Rank2 ? k2t[r] : T(0);
      sweep_update<B0, Scaled, Rank2>(s0[r], v0, v20, kr, k2r, sc0);
      if (Two) sweep_update<B1, Scaled, Rank2>(s1[r], v1, v21, kr, k2r, sc1);
      if (r % 2 == 0) {
        acc00 = xsimd::fma(B0(ar), s0[r], acc00);
        if (Two) acc10 = xsimd::fma(B1(ar), s1[r], acc10);
      } else {
        acc01 = xsimd::fma(B0(ar), s0[r], acc01);
        if (Two) acc11 = xsimd::fma(B1(ar), s1[r], acc11);
      }
    }
    B0 total0 = R > 1 ? acc00 + acc01 : acc00;
    B1 total1 = R > 1 ? acc10 + acc11 : acc10;
    if (!first) {
      total0 = B0::load_unaligned(ot + c[0]) + total0;
      if (Two) total1 = B1::load_unaligned(ot + c[1]) + total1;
    }
    total0.store_unaligned(ot + c[0]);
    if (Two) total1.store_unaligned(ot + c[1]);
  }
  for (std::size_t r = 0; r < R; ++r) {
    s0[r].store_unaligned(St + (r0 + r) * lds + c[0]);
    if (Two) s1[r].store_unaligned(St + (r0 + r) * lds + c[1]);
  }
}

// Rows of St per block for one or two batches per pass (see kStateSweepRows).
template <bool Two>
inline constexpr std::size_t state_sweep_rows_max = !Two || kStateSweepBatches == 2 ? kStateSweepRows : 4;

// One pass: the columns of the batches at c over all rows, in blocks of equal
// size (d = 20 with 8 rows at most: 7 + 7 + 6), each dispatched to its
// instantiation.
template <class T, class B0, class B1, bool Two, bool Scaled, bool Rank2, std::size_t... Rs>
void state_sweep_pass(std::index_sequence<Rs...>, std::size_t n, std::size_t d, const std::size_t* c, T* St,
                      std::size_t lds, T scale, const SweepOperands<T>& op, bool reverse) {
  constexpr std::size_t rmax = state_sweep_rows_max<Two>;
  const std::size_t blocks = (d + rmax - 1) / rmax;
  const std::size_t block_rows = (d + blocks - 1) / blocks;
  for (std::size_t r0 = 0; r0 < d; r0 += block_rows) {
    const std::size_t rows = std::min(block_rows, d - r0);
    (void)((rows == Rs + 1 ? (state_sweep_block<T, B0, B1, Rs + 1, Two, Scaled, Rank2>(n, r0, c, St, lds, scale, op,
                                                                                       reverse, r0 == 0),
                              true)
                           : false) ||
           ...);
  }
}

// The passes over columns for dv >= W: batches of W columns, two per pass
// where kStateSweepBatches allows. The columns past the last multiple of W
// share a pass with the batch before them: in a half-width batch when they
// fit in one (dv = 20 with AVX-512, W = 16: columns [0, 16) and [12, 20) in
// an 8-wide batch; with AVX2, W = 8: [0, 8), then [8, 16) and [16, 20) in a
// 4-wide one), else in a full batch that overlaps the one before it (dv = 28,
// W = 16: [0, 16) and [12, 28)). On AMD Zen 4 a 512-bit FMA takes two
// 256-bit units, so the half-width batch costs half a full one (d = dv = 20:
// 1.45x the sweep with two full batches, docs/kernels.md).
template <class T, bool Scaled, bool Rank2>
void state_sweep_columns(std::size_t n, std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale,
                         const SweepOperands<T>& op, bool reverse) {
  using B = simd_batch<T>;
  using H = simd_half_batch<T>;
  constexpr std::size_t W = B::size, Wh = H::size;
  const auto rows1 = std::make_index_sequence<state_sweep_rows_max<false>>{};
  const auto rows2 = std::make_index_sequence<state_sweep_rows_max<true>>{};
  for (std::size_t j0 = 0; j0 < dv;) {
    const std::size_t rest = dv - j0;
    const bool two_full = kStateSweepBatches == 2 && rest >= 2 * W && (rest == 2 * W || rest - 2 * W >= W);
    if (rest > W && rest - W <= Wh) {
      const std::size_t c[2] = {j0, dv - Wh};
      state_sweep_pass<T, B, H, true, Scaled, Rank2>(rows2, n, d, c, St, lds, scale, op, reverse);
      j0 += rest;
    } else if (two_full || (rest > W && rest < 2 * W)) {
      const std::size_t c[2] = {j0, two_full ? j0 + W : dv - W};
      state_sweep_pass<T, B, B, true, Scaled, Rank2>(rows2, n, d, c, St, lds, scale, op, reverse);
      j0 += two_full ? 2 * W : rest;
    } else {
      const std::size_t c[1] = {j0};
      state_sweep_pass<T, B, B, false, Scaled, Rank2>(rows1, n, d, c, St, lds, scale, op, reverse);
      j0 += W;
    }
  }
}

template <class T, bool Rank2>
void state_sweep_any_scale(std::size_t n, std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale,
                           const SweepOperands<T>& op, bool reverse) {
  if (scale == T(1)) state_sweep_columns<T, false, Rank2>(n, d, dv, St, lds, scale, op, reverse);
  else state_sweep_columns<T, true, Rank2>(n, d, dv, St, lds, scale, op, reverse);
}

}  // namespace detail
#endif

// St (d x dv, row-major, row stride lds >= dv) holds the initial state on entry
// and the final one on return. k: n x d (row stride ldk), v: n x dv, a: n x d,
// o: n x dv; o must not alias the inputs. reverse = true runs t = n - 1 ... 0
// (the backward pass's sweeps from the last token). scale = 1 skips the
// multiplication (the update is then St + k v^T, bit for bit).
template <class T>
void state_sweep(std::size_t n, std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k,
                 std::size_t ldk, const T* v, std::size_t ldv, const T* a, std::size_t lda, T* o, std::size_t ldo,
                 bool reverse) {
#if MESAOPT_SIMD
  constexpr std::size_t W = simd_width<T>;
  if (d == 0) {
    for (std::size_t t = 0; t < n; ++t) std::fill(o + t * ldo, o + t * ldo + dv, T(0));
    return;
  }
  if (dv >= W) {
    const detail::SweepOperands<T> op{k, ldk, v, ldv, nullptr, 0, nullptr, 0, a, lda, o, ldo};
    detail::state_sweep_any_scale<T, false>(n, d, dv, St, lds, scale, op, reverse);
    return;
  }
  // dv < W (tiny heads): the one-token kernel, whose masked tail is one batch.
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t t = reverse ? n - 1 - i : i;
    state_update_apply(d, dv, St, lds, scale, k + t * ldk, v + t * ldv, a + t * lda, o + t * ldo);
  }
#else
  reference::state_sweep(n, d, dv, St, lds, scale, k, ldk, v, ldv, a, lda, o, ldo, reverse);
#endif
}

// The symmetric rank-2 accumulator of the mesa backward (M11) over a sequence:
//
//   for t in 0, ..., n - 1 (or n - 1, ..., 0 when reverse):
//     M <- scale M + x_t y_t^T + y_t x_t^T,   o_t = M^T k_t   (= M k_t, M symmetric)
//
// rank2_update_apply (rank2.hpp) token by token, with M's blocks held in
// registers like the state above. M: d x d, row stride ldm >= d; x, y, k: n x
// d; o: n x d, not aliasing the inputs. Entry (i, j) is rounded as
// rank2_update_apply rounds it (x_i y_j first, then y_i x_j), so M stays
// symmetric to a rounding per entry, not bitwise; o_t's sum runs in another
// order than the one-token kernel's.
template <class T>
void rank2_sweep(std::size_t n, std::size_t d, T* M, std::size_t ldm, T scale, const T* x, std::size_t ldx,
                 const T* y, std::size_t ldy, const T* k, std::size_t ldk, T* o, std::size_t ldo, bool reverse) {
#if MESAOPT_SIMD
  if (d >= simd_width<T>) {
    const detail::SweepOperands<T> op{x, ldx, y, ldy, y, ldy, x, ldx, k, ldk, o, ldo};
    detail::state_sweep_any_scale<T, true>(n, d, d, M, ldm, scale, op, reverse);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {  // d < W: the one-token kernel
    const std::size_t t = reverse ? n - 1 - i : i;
    rank2_update_apply(d, M, ldm, scale, x + t * ldx, y + t * ldy, k + t * ldk, o + t * ldo);
  }
#else
  reference::rank2_sweep(n, d, M, ldm, scale, x, ldx, y, ldy, k, ldk, o, ldo, reverse);
#endif
}

}  // namespace mesaopt::kernels
