#pragma once
// The SIMD layer's common ground: which xsimd architecture the kernels use,
// a horizontal-sum shim across xsimd versions, and zero-padded partial
// loads/stores so that a tail (d not a multiple of the SIMD width) runs through
// exactly the same batch instructions as the body. That last point matters for
// the Sherman-Morrison kernel: entry (i, j) and (j, i) of R must be computed by
// the same instruction sequence, or R stops being bitwise symmetric (MATH.md §3).
#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cstddef>

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

// Name of the architecture, for benchmark labels and test logs.
inline const char* simd_arch_name() { return simd_arch::name(); }

namespace detail {

// xsimd 8 spells the horizontal sum hadd; 9 renamed it reduce_add.
template <class T>
T horizontal_sum(const simd_batch<T>& b) {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_add(b);
#else
  return xsimd::hadd(b);
#endif
}

// Loads n < width elements, zero-padded; never reads past ptr + n.
template <class T>
simd_batch<T> load_partial(const T* ptr, std::size_t n) {
  alignas(64) T buf[simd_width<T>] = {};
  std::copy(ptr, ptr + n, buf);
  return simd_batch<T>::load_aligned(buf);
}

// Stores the first n < width lanes; never writes past ptr + n.
template <class T>
void store_partial(const simd_batch<T>& b, T* ptr, std::size_t n) {
  alignas(64) T buf[simd_width<T>];
  b.store_aligned(buf);
  std::copy(buf, buf + n, ptr);
}

}  // namespace detail
#else
template <class T>
inline constexpr std::size_t simd_width = 1;
inline const char* simd_arch_name() { return "scalar"; }
#endif

}  // namespace mesaopt::kernels
