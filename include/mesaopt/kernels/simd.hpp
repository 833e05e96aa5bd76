#pragma once
// The SIMD layer's common ground: which xsimd architecture the kernels use,
// a horizontal-sum shim across xsimd versions, and zero-padded partial
// loads/stores so that a tail (d not a multiple of the SIMD width) runs through
// exactly the same batch instructions as the body. That last point matters for
// the Sherman-Morrison kernel: entry (i, j) and (j, i) of R must be computed by
// the same instruction sequence, or R stops being bitwise symmetric (docs/math.md §3).
#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(XSIMD_NO_SUPPORTED_ARCHITECTURE) || defined(MESAOPT_NO_SIMD)
#define MESAOPT_SIMD 0
#else
#define MESAOPT_SIMD 1
#endif

namespace mesaopt::kernels {

#if MESAOPT_SIMD
// The best architecture enabled at compile time (AVX2+FMA with -march=native on
// this machine; SSE2 on a plain x86-64 build).
using simd_arch = xsimd::default_arch;
template <class T>
using simd_batch = xsimd::batch<T, simd_arch>;

// Lanes per batch for T; 1 when kernels fall back to scalar code.
template <class T>
inline constexpr std::size_t simd_width = simd_batch<T>::size;

// A batch of half the width, for columns past the last multiple of the width
// (kernels/state_sweep.hpp): 256-bit with AVX-512 (with FMA3), 128-bit with
// AVX2; with SSE only, the full batch again (no narrower one to use).
#if defined(__AVX512F__) && XSIMD_WITH_FMA3_AVX2
template <class T>
using simd_half_batch = xsimd::batch<T, xsimd::fma3<xsimd::avx2>>;
#elif defined(__AVX2__)
template <class T>
using simd_half_batch = xsimd::batch<T, xsimd::sse4_2>;
#else
template <class T>
using simd_half_batch = simd_batch<T>;
#endif

// Name of the architecture, for benchmark labels and test logs.
inline const char* simd_arch_name() { return simd_arch::name(); }

namespace detail {

// xsimd 8 spells the horizontal sum hadd; 9 renamed it reduce_add. Any batch
// type: full (simd_batch) or half width (simd_half_batch).
template <class B>
typename B::value_type horizontal_sum(const B& b) {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_add(b);
#else
  return xsimd::hadd(b);
#endif
}

// x y + z with a single rounding, whatever the compiler decides, for a full
// or a half-width batch. xsimd's AVX-512 back end (xsimd 8, as Debian ships
// it) has no fma of its own: it falls back to the generic x * y + z and leaves
// the fusing to floating-point contraction, which GCC applies in most
// instantiations but not all (seen: the Sherman-Morrison pass without its
// second product, at d >= 33, computed some entries unfused). The kernels
// whose results must not depend on that (Sherman-Morrison: R bitwise
// symmetric, the backward's recomputation bitwise the forward's) use this one:
// the instruction itself for 512-, 256- and 128-bit batches (the half-width
// batch of an AVX2 build is xsimd's SSE one, whose fma is generic too),
// xsimd's otherwise. For -(x y) + z pass -x: the negation is exact, so
// fma_exact(-x, y, z) has the bits of a fused negative multiply-add.
template <class B>
B fma_exact(const B& x, const B& y, const B& z) {
  using T [[maybe_unused]] = typename B::value_type;  // unused without AVX-512 and FMA
#if defined(__AVX512F__)
  if constexpr (sizeof(B) == 64) {
    if constexpr (std::is_same_v<T, float>) return B(_mm512_fmadd_ps(x, y, z));
    else return B(_mm512_fmadd_pd(x, y, z));
  }
#endif
#if defined(__FMA__)
  if constexpr (sizeof(B) == 32) {
    if constexpr (std::is_same_v<T, float>) return B(_mm256_fmadd_ps(x, y, z));
    else return B(_mm256_fmadd_pd(x, y, z));
  }
  if constexpr (sizeof(B) == 16) {
    if constexpr (std::is_same_v<T, float>) return B(_mm_fmadd_ps(x, y, z));
    else return B(_mm_fmadd_pd(x, y, z));
  }
#endif
  return xsimd::fma(x, y, z);
}

// Masks for partial loads/stores: lanes [0, n) on. The native masked
// instructions matter for speed, not just tidiness: a tail through a stack
// buffer (copy in, load, store, copy out) makes every row of a state pay a
// store-forwarding stall (measurements in docs/kernels.md). Masked-off lanes
// are never touched in memory, so the "never reads/writes past ptr + n"
// contract holds.
#if defined(__AVX__) && !defined(__AVX512F__)
// Sliding-window masks: loadu(table + W - n) gives n lanes of all-ones.
alignas(64) inline constexpr std::int32_t kMask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
alignas(64) inline constexpr std::int64_t kMask64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
#endif

// Loads n < width elements, zero-padded; never reads past ptr + n.
template <class T>
simd_batch<T> load_partial(const T* ptr, std::size_t n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(simd_batch<T>) == 64) {
    if constexpr (std::is_same_v<T, float>)
      return simd_batch<T>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), ptr));
    else
      return simd_batch<T>(_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1u), ptr));
  }
#elif defined(__AVX__)
  if constexpr (sizeof(simd_batch<T>) == 32) {
    if constexpr (std::is_same_v<T, float>)
      return simd_batch<T>(_mm256_maskload_ps(
          ptr, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask32 + 8 - n))));
    else
      return simd_batch<T>(_mm256_maskload_pd(
          ptr, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask64 + 4 - n))));
  }
#endif
  alignas(64) T buf[simd_width<T>] = {};
  std::copy(ptr, ptr + n, buf);
  return simd_batch<T>::load_aligned(buf);
}

// Stores the first n < width lanes; never writes past ptr + n.
template <class T>
void store_partial(const simd_batch<T>& b, T* ptr, std::size_t n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(simd_batch<T>) == 64) {
    if constexpr (std::is_same_v<T, float>)
      _mm512_mask_storeu_ps(ptr, static_cast<__mmask16>((1u << n) - 1u), b);
    else
      _mm512_mask_storeu_pd(ptr, static_cast<__mmask8>((1u << n) - 1u), b);
    return;
  }
#elif defined(__AVX__)
  if constexpr (sizeof(simd_batch<T>) == 32) {
    if constexpr (std::is_same_v<T, float>)
      _mm256_maskstore_ps(ptr, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask32 + 8 - n)), b);
    else
      _mm256_maskstore_pd(ptr, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask64 + 4 - n)), b);
    return;
  }
#endif
  alignas(64) T buf[simd_width<T>];
  b.store_aligned(buf);
  std::copy(buf, buf + n, ptr);
}

// The column-block ladder of the one-pass matrix kernels (sherman_morrison,
// state_update, rank2): columns [0, n) go in blocks of 4 SIMD widths, then at
// most one block of 3, 2 or 1 widths, then a partial tail of rem < W columns:
//
//   block(std::integral_constant<std::size_t, NB>{}, j0)   columns [j0, j0 + NB W)
//   tail(j0, rem)                                          columns [j0, j0 + rem)
//
// NB is a compile-time constant so that a block's NB accumulators and operands
// live in registers. One block of 3/2/1 instead of a loop of 1-width blocks:
// fewer passes over the rows. Both callables are lambdas at the call sites and
// inline away (docs/kernels.md: same speed as the hand-written ladders).
template <class T, class Block, class Tail>
inline void for_each_column_block(std::size_t n, Block&& block, Tail&& tail) {
  constexpr std::size_t W = simd_width<T>;
  std::size_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) block(std::integral_constant<std::size_t, 4>{}, j);
  const std::size_t full = (n - j) / W;
  if (full == 3) block(std::integral_constant<std::size_t, 3>{}, j);
  else if (full == 2) block(std::integral_constant<std::size_t, 2>{}, j);
  else if (full == 1) block(std::integral_constant<std::size_t, 1>{}, j);
  j += full * W;
  if (j < n) tail(j, n - j);
}

// The same ladder with the tail folded into the last block as a partial last
// batch: block(NB, j0, last) covers columns [j0, j0 + (NB - 1) W + last), its
// last batch `last` in [1, W] columns wide (W: a full one). For instruction
// sets with single-instruction masked loads and stores (AVX-512), where a
// partial batch costs no more than a full one: one pass over the rows instead
// of a block pass and a tail pass (docs/kernels.md, "Head sizes that are not a
// multiple of the width").
template <class T, class Block>
inline void for_each_column_block_masked(std::size_t n, Block&& block) {
  constexpr std::size_t W = simd_width<T>;
  if (n == 0) return;
  const std::size_t batches = (n + W - 1) / W;  // the last one possibly partial
  std::size_t j = 0, b = 0;
  for (; batches - b > 4; b += 4, j += 4 * W) block(std::integral_constant<std::size_t, 4>{}, j, W);
  const std::size_t left = batches - b;     // 1..4 batches
  const std::size_t last = n - j - (left - 1) * W;  // 1..W columns
  if (left == 4) block(std::integral_constant<std::size_t, 4>{}, j, last);
  else if (left == 3) block(std::integral_constant<std::size_t, 3>{}, j, last);
  else if (left == 2) block(std::integral_constant<std::size_t, 2>{}, j, last);
  else block(std::integral_constant<std::size_t, 1>{}, j, last);
}

// Passes over columns [0, n), n >= W, with only full-size loads and stores:
// each pass is NB <= MaxNB batches at the column offsets c[0..NB) (MaxNB = 2,
// 3 or 4: as many as a kernel's register block holds). When W does not
// divide n, the last pass ends at column n with either a half-width batch
// (simd_half_batch, Half = true: the remainder fits in it) or a full batch
// starting at n - W; either may overlap the batch before it (n = 20, W = 16:
// one pass, c = {0, 12} with an 8-wide last batch; n = 28: c = {0, 12} with a
// full one; W = 8, n = 20: c = {0, 8, 16}, the last 4 wide). A kernel that
// updates a matrix in place must load the last batch of a row before it
// stores any: the shared columns are then computed twice from the same inputs
// by the same instructions and written twice with the same bits. No masked
// load or store is left on the path (docs/kernels.md, "Overlapping passes").
//
//   pass(std::integral_constant<std::size_t, NB>{}, std::bool_constant<Half>{}, c)
template <class T, std::size_t MaxNB = 4, class Pass>
inline void for_each_overlapping_column_pass(std::size_t n, Pass&& pass) {
  static_assert(MaxNB >= 2 && MaxNB <= 4, "passes of 2 to 4 batches");
  constexpr std::size_t W = simd_width<T>, Wh = simd_half_batch<T>::size;
  using Full = std::false_type;
  std::size_t j = 0;
  // Full passes of MaxNB batches; one fewer when MaxNB would leave fewer than
  // W columns.
  while (n - j > MaxNB * W) {
    const std::size_t rest = n - j - MaxNB * W;
    const std::size_t nb = rest < W ? MaxNB - 1 : MaxNB;
    const std::size_t c[4] = {j, j + W, j + 2 * W, j + 3 * W};
    if (nb == MaxNB) pass(std::integral_constant<std::size_t, MaxNB>{}, Full{}, c);
    else pass(std::integral_constant<std::size_t, MaxNB - 1>{}, Full{}, c);
    j += nb * W;
  }
  // The last pass: W <= n - j <= MaxNB W columns.
  const std::size_t full = (n - j) / W, rem = (n - j) % W;
  std::size_t c[4] = {j, j + W, j + 2 * W, j + 3 * W};
  auto last_pass = [&](std::size_t nb, auto half) {
    if constexpr (MaxNB >= 4) {
      if (nb == 4) return pass(std::integral_constant<std::size_t, 4>{}, half, c);
    }
    if constexpr (MaxNB >= 3) {
      if (nb == 3) return pass(std::integral_constant<std::size_t, 3>{}, half, c);
    }
    if (nb == 2) pass(std::integral_constant<std::size_t, 2>{}, half, c);
    else pass(std::integral_constant<std::size_t, 1>{}, half, c);
  };
  if (rem == 0) {
    last_pass(full, Full{});
  } else if (Wh < W && rem <= Wh) {
    c[full] = n - Wh;  // full <= MaxNB - 1 here
    last_pass(full + 1, std::true_type{});
  } else {
    c[full] = n - W;
    last_pass(full + 1, Full{});
  }
}

}  // namespace detail
#else
template <class T>
inline constexpr std::size_t simd_width = 1;
inline const char* simd_arch_name() { return "scalar"; }
#endif

// The row stride to give a matrix whose rows the one-pass kernels sweep (a
// state St, a Sherman-Morrison R): n rounded up to the SIMD width. With the
// allocation aligned to a batch (Eigen aligns to 64 bytes under AVX-512), every
// row then starts on a batch boundary and no row's loads and stores straddle
// two cache lines (at head size 20 in float with AVX-512 that decides the
// state update's speed; docs/kernels.md, "Head sizes that are not a multiple
// of the width").
template <class T>
constexpr std::size_t padded_stride(std::size_t n) {
  constexpr std::size_t W = simd_width<T>;
  return (n + W - 1) / W * W;
}

}  // namespace mesaopt::kernels
