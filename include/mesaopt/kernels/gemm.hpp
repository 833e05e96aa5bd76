#pragma once
// Matrix products at the shapes of the attention layers' projections
// (layers/attention_projections.hpp): a few hundred token rows against a
// weight of a few dozen to a few hundred columns, with a short inner
// dimension (the paper's models: K = 40 or 120).
//
//   gemm:     C (n x m) = A B     or  C += A B,     A: n x k,  B: k x m
//   gemm_tn:  C (n x m) = A^T B   or  C += A^T B,   A: k x n,  B: k x m
//
// all row-major with row strides. gemm_tn is the weight gradient (dW += dY^T X:
// the inner dimension runs over tokens). A product with a transposed weight,
// X W^T, is gemm against W^T stored once per call by the caller.
//
// Why not Eigen's GEMM: at these shapes it packs both operands into its own
// layout on every call, and the packing alone was about a tenth of a linear-1L
// training step (measurements: docs/kernels.md, "gemm and gemm_tn", and
// docs/training.md). Row-major B is already the layout the inner loop
// wants: a block of R rows of C by NB batches of columns lives in R NB
// registers, and each step p of the inner dimension loads NB batches of row p
// of B, broadcasts R entries of A and does R NB FMAs. Columns past the last
// multiple of the SIMD width go in a half-width or an overlapping batch
// (detail::for_each_overlapping_column_pass), so no load or store is masked.
//
// Rounding: every entry is one chain of fused multiply-adds over p = 0 ... k-1
// from zero, then (accumulate) one addition to C's old value:
//   C_ij <- C_ij + fma(A_i,k-1, B_k-1,j, ... fma(A_i0, B_0j, 0)).
// It does not depend on where the entry falls (row block, column batch, how
// many rows the call has), so a product cut into row chunks for threads gives
// the same bits as one call (tests/test_kernels.cpp checks this bit for bit
// against a scalar loop of std::fma). Products narrower than the SIMD width
// (m < W, e.g. a read-out to n = 10 outputs) run one masked batch.
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>

// Full unrolling of the register block's loops at any optimisation level: at
// -O2 GCC keeps them as loops and the block goes through memory (several times
// slower; docs/kernels.md).
#ifndef MESAOPT_UNROLL
#if defined(__GNUC__)
#define MESAOPT_UNROLL _Pragma("GCC unroll 16")
#else
#define MESAOPT_UNROLL
#endif
#endif

namespace mesaopt::kernels {

#if MESAOPT_SIMD
namespace detail {

// Register budget of a block: R NB accumulators, NB batches of B's row and a
// broadcast of A must fit in the vector registers (32 with AVX-512, 16
// otherwise). Passes of at most 4 (AVX-512) or 2 batches.
#if defined(__AVX512F__)
inline constexpr std::size_t kGemmRegisters = 32, kGemmBatchesMax = 4;
#else
inline constexpr std::size_t kGemmRegisters = 16, kGemmBatchesMax = 2;
#endif

// Rows of C per block for passes of NB batches (AVX-512: 6, 9, 14, 16 for
// NB = 4, 3, 2, 1; AVX2: 6, 13).
template <std::size_t NB>
inline constexpr std::size_t gemm_rows = std::min<std::size_t>(16, (kGemmRegisters - NB - 2) / NB);

// One block: rows [0, R) of C (from C) by the NB batches at columns c[0..NB),
// the last of type BL (a half-width batch or a full one). A's entry (i, p) is
// A[i * ars + p * aks]. The last batch may overlap the one before it: both
// compute the shared columns by the same instructions from the same inputs
// and store the same bits.
//
// Masked (NB = 1, BL the full batch): the one batch holds only `width` < W
// columns, loaded and stored with load_partial / store_partial (heads
// narrower than one batch).
template <class T, class BL, std::size_t R, std::size_t NB, bool Masked = false>
inline void gemm_block(std::size_t k, const T* A, std::size_t ars, std::size_t aks, const T* B, std::size_t ldb,
                       const std::size_t* c, T* C, std::size_t ldc, bool accumulate, std::size_t width = 0) {
  static_assert(!Masked || (NB == 1 && std::is_same_v<BL, simd_batch<T>>), "a masked block is one full batch");
  using BF = simd_batch<T>;
  constexpr std::size_t NF = NB - 1;  // full batches before the last one
  BF acc[R][NF > 0 ? NF : 1];
  BL acc_last[R];
  MESAOPT_UNROLL for (std::size_t r = 0; r < R; ++r) {
    MESAOPT_UNROLL for (std::size_t b = 0; b < NF; ++b) acc[r][b] = BF(T(0));
    acc_last[r] = BL(T(0));
  }
  for (std::size_t p = 0; p < k; ++p) {
    const T* bp = B + p * ldb;
    BF bv[NF > 0 ? NF : 1];
    MESAOPT_UNROLL for (std::size_t b = 0; b < NF; ++b) bv[b] = BF::load_unaligned(bp + c[b]);
    BL bl;
    if constexpr (Masked) bl = load_partial(bp + c[NF], width);
    else bl = BL::load_unaligned(bp + c[NF]);
    const T* ap = A + p * aks;
    MESAOPT_UNROLL for (std::size_t r = 0; r < R; ++r) {
      const T a = ap[r * ars];
      MESAOPT_UNROLL for (std::size_t b = 0; b < NF; ++b) acc[r][b] = fma_exact(BF(a), bv[b], acc[r][b]);
      acc_last[r] = fma_exact(BL(a), bl, acc_last[r]);
    }
  }
  MESAOPT_UNROLL for (std::size_t r = 0; r < R; ++r) {
    T* cr = C + r * ldc;
    // All of the row's old values are loaded before any store (the last batch
    // may overlap the one before it).
    if (accumulate) {
      MESAOPT_UNROLL for (std::size_t b = 0; b < NF; ++b) acc[r][b] = BF::load_unaligned(cr + c[b]) + acc[r][b];
      if constexpr (Masked) acc_last[r] = load_partial(cr + c[NF], width) + acc_last[r];
      else acc_last[r] = BL::load_unaligned(cr + c[NF]) + acc_last[r];
    }
    MESAOPT_UNROLL for (std::size_t b = 0; b < NF; ++b) acc[r][b].store_unaligned(cr + c[b]);
    if constexpr (Masked) store_partial(acc_last[r], cr + c[NF], width);
    else acc_last[r].store_unaligned(cr + c[NF]);
  }
}

// Rows [0, n) of C in blocks of R = gemm_rows<NB>, the rest in blocks of 8,
// 4, 2 and 1 rows (fewer instantiations than one per row count).
template <class T, class BL, std::size_t NB, bool Masked = false>
void gemm_rows_pass(std::size_t n, std::size_t k, const T* A, std::size_t ars, std::size_t aks, const T* B,
                    std::size_t ldb, const std::size_t* c, T* C, std::size_t ldc, bool accumulate,
                    std::size_t width = 0) {
  constexpr std::size_t R = gemm_rows<NB>;
  std::size_t i = 0;
  for (; i + R <= n; i += R)
    gemm_block<T, BL, R, NB, Masked>(k, A + i * ars, ars, aks, B, ldb, c, C + i * ldc, ldc, accumulate, width);
  auto tail = [&](auto rows) {
    constexpr std::size_t P = decltype(rows)::value;
    if constexpr (P < R) {
      if (n - i >= P) {
        gemm_block<T, BL, P, NB, Masked>(k, A + i * ars, ars, aks, B, ldb, c, C + i * ldc, ldc, accumulate, width);
        i += P;
      }
    }
  };
  tail(std::integral_constant<std::size_t, 8>{});
  tail(std::integral_constant<std::size_t, 4>{});
  tail(std::integral_constant<std::size_t, 2>{});
  tail(std::integral_constant<std::size_t, 1>{});
}

template <class T>
void gemm_strided(std::size_t n, std::size_t m, std::size_t k, const T* A, std::size_t ars, std::size_t aks,
                  const T* B, std::size_t ldb, T* C, std::size_t ldc, bool accumulate) {
  if (n == 0 || m == 0) return;
  if (k == 0) {  // an empty sum: no pointer arithmetic on A or B (they may be null)
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < m; ++j) C[i * ldc + j] = accumulate ? C[i * ldc + j] + T(0) : T(0);
    return;
  }
  if (m < simd_width<T>) {  // narrower than one batch: one masked batch, the same FMAs per lane
    const std::size_t c[1] = {0};
    gemm_rows_pass<T, simd_batch<T>, 1, true>(n, k, A, ars, aks, B, ldb, c, C, ldc, accumulate, m);
    return;
  }
  for_each_overlapping_column_pass<T, kGemmBatchesMax>(m, [&](auto nb, auto half, const std::size_t* c) {
    constexpr std::size_t NB = decltype(nb)::value;
    using BL = std::conditional_t<decltype(half)::value, simd_half_batch<T>, simd_batch<T>>;
    gemm_rows_pass<T, BL, NB>(n, k, A, ars, aks, B, ldb, c, C, ldc, accumulate);
  });
}

}  // namespace detail
#endif

// x . y over p = 0 ... k-1 (x with stride incx, y with incy) rounded as one
// entry of gemm's product without accumulate: one fused multiply-add per p,
// in order, from zero. For a caller that must match an entry of a gemm result
// bit for bit (the softmax backward's D_t = g_t . o_t against the entries
// g_t . v_i of its dO V^T, whose difference is exactly 0 where o_t = v_i;
// ops/softmax_attention.hpp). A build without FMA instructions has no fused
// chain in gemm either (fma_exact falls back to xsimd's x * y + z, two
// roundings), and without SIMD gemm is reference::gemm's loop: both are the
// plain loop here.
template <class T>
T gemm_entry(std::size_t k, const T* x, std::size_t incx, const T* y, std::size_t incy) {
  T s = 0;
#if MESAOPT_SIMD && (defined(__FMA__) || defined(__AVX512F__))
  for (std::size_t p = 0; p < k; ++p) s = std::fma(x[p * incx], y[p * incy], s);
#else
  for (std::size_t p = 0; p < k; ++p) s += x[p * incx] * y[p * incy];
#endif
  return s;
}

// C (n x m, row stride ldc) = A B, or C += A B when accumulate; A: n x k (row
// stride lda), B: k x m (row stride ldb). C must not overlap A or B.
template <class T>
void gemm(std::size_t n, std::size_t m, std::size_t k, const T* A, std::size_t lda, const T* B, std::size_t ldb, T* C,
          std::size_t ldc, bool accumulate) {
#if MESAOPT_SIMD
  detail::gemm_strided(n, m, k, A, lda, 1, B, ldb, C, ldc, accumulate);
#else
  reference::gemm(n, m, k, A, lda, 1, B, ldb, C, ldc, accumulate);
#endif
}

// C (n x m, row stride ldc) = A^T B, or C += A^T B when accumulate; A: k x n
// (row stride lda), B: k x m (row stride ldb). C must not overlap A or B.
template <class T>
void gemm_tn(std::size_t n, std::size_t m, std::size_t k, const T* A, std::size_t lda, const T* B, std::size_t ldb,
             T* C, std::size_t ldc, bool accumulate) {
#if MESAOPT_SIMD
  detail::gemm_strided(n, m, k, A, 1, lda, B, ldb, C, ldc, accumulate);
#else
  reference::gemm(n, m, k, A, 1, lda, B, ldb, C, ldc, accumulate);
#endif
}

}  // namespace mesaopt::kernels
