#pragma once
// y = A x for row-major A: one dot product per row, four rows at a time so the
// four accumulator chains are independent and x is loaded once per four rows.
#include <mesaopt/kernels/vector_ops.hpp>

#include <cstddef>

namespace mesaopt::kernels {

// y = A x; A is m x n row-major with row stride lda; y must not alias A or x.
template <class T>
void gemv(std::size_t m, std::size_t n, const T* A, std::size_t lda, const T* x, T* y) {
#if MESAOPT_SIMD
  using B = simd_batch<T>;
  constexpr std::size_t W = B::size;
  std::size_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* r0 = A + i * lda;
    const T* r1 = r0 + lda;
    const T* r2 = r1 + lda;
    const T* r3 = r2 + lda;
    B s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
    std::size_t j = 0;
    for (; j + W <= n; j += W) {
      const B xv = B::load_unaligned(x + j);
      s0 = xsimd::fma(B::load_unaligned(r0 + j), xv, s0);
      s1 = xsimd::fma(B::load_unaligned(r1 + j), xv, s1);
      s2 = xsimd::fma(B::load_unaligned(r2 + j), xv, s2);
      s3 = xsimd::fma(B::load_unaligned(r3 + j), xv, s3);
    }
    if (j < n) {
      const std::size_t rem = n - j;
      const B xv = detail::load_partial(x + j, rem);
      s0 = xsimd::fma(detail::load_partial(r0 + j, rem), xv, s0);
      s1 = xsimd::fma(detail::load_partial(r1 + j, rem), xv, s1);
      s2 = xsimd::fma(detail::load_partial(r2 + j, rem), xv, s2);
      s3 = xsimd::fma(detail::load_partial(r3 + j, rem), xv, s3);
    }
    y[i] = detail::horizontal_sum(s0);
    y[i + 1] = detail::horizontal_sum(s1);
    y[i + 2] = detail::horizontal_sum(s2);
    y[i + 3] = detail::horizontal_sum(s3);
  }
  for (; i < m; ++i) y[i] = dot(A + i * lda, x, n);
#else
  reference::gemv(m, n, A, lda, x, y);
#endif
}

}  // namespace mesaopt::kernels
