#pragma once
// Level-1 kernels: dot product, axpy and the finiteness check of a matrix,
// with xsimd batches.
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>

#include <cmath>
#include <cstddef>

namespace mesaopt::kernels {

// sum_i x_i y_i over n elements (any alignment).
template <class T>
T dot(const T* x, const T* y, std::size_t n) {
#if MESAOPT_SIMD
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  // Four accumulators: FMA latency is 4 cycles and two issue per cycle, so one
  // chain would run at 1/8 of peak; four hide most of it for a memory-bound op.
  B s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
  std::size_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 = xsimd::fma(B::load_unaligned(x + i), B::load_unaligned(y + i), s0);
    s1 = xsimd::fma(B::load_unaligned(x + i + W), B::load_unaligned(y + i + W), s1);
    s2 = xsimd::fma(B::load_unaligned(x + i + 2 * W), B::load_unaligned(y + i + 2 * W), s2);
    s3 = xsimd::fma(B::load_unaligned(x + i + 3 * W), B::load_unaligned(y + i + 3 * W), s3);
  }
  for (; i + W <= n; i += W) s0 = xsimd::fma(B::load_unaligned(x + i), B::load_unaligned(y + i), s0);
  if (i < n) s1 = xsimd::fma(detail::load_partial(x + i, n - i), detail::load_partial(y + i, n - i), s1);
  return detail::horizontal_sum((s0 + s1) + (s2 + s3));
#else
  return reference::dot(x, y, n);
#endif
}

// y += alpha x over n elements.
template <class T>
void axpy(std::size_t n, T alpha, const T* x, T* y) {
#if MESAOPT_SIMD
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  const B a(alpha);
  std::size_t i = 0;
  for (; i + W <= n; i += W) xsimd::fma(a, B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(y + i);
  if (i < n) {
    detail::store_partial(xsimd::fma(a, detail::load_partial(x + i, n - i), detail::load_partial(y + i, n - i)),
                          y + i, n - i);
  }
#else
  reference::axpy(n, alpha, x, y);
#endif
}

// True when every entry of the rows x cols row-major matrix X (row stride ld)
// is finite. x * 0 is +-0 for finite x and NaN for NaN or +-Inf, so the sum of
// the products is finite exactly when X is. For the masked products' check
// before a GEMM (ops/masked_product.hpp): rows of 20 entries at the paper's
// sizes, where Eigen's reduction over a strided block ran a scalar tail on
// every row (5 % of a softmax-1L training step; docs/softmax_attention.md).
template <class T>
bool all_finite(std::size_t rows, std::size_t cols, const T* X, std::size_t ld) {
#if MESAOPT_SIMD
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  const B zero(T(0));
  B s0(T(0)), s1(T(0));  // two chains: the adds of a row do not wait on the last row's
  for (std::size_t r = 0; r < rows; ++r) {
    const T* x = X + r * ld;
    std::size_t j = 0;
    for (; j + 2 * W <= cols; j += 2 * W) {
      s0 = s0 + B::load_unaligned(x + j) * zero;
      s1 = s1 + B::load_unaligned(x + j + W) * zero;
    }
    if (j + W <= cols) {
      s0 = s0 + B::load_unaligned(x + j) * zero;
      j += W;
    }
    if (j < cols) s1 = s1 + detail::load_partial(x + j, cols - j) * zero;
  }
  return std::isfinite(detail::horizontal_sum(s0 + s1));
#else
  return reference::all_finite(rows, cols, X, ld);
#endif
}

}  // namespace mesaopt::kernels
