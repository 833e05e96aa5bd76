#pragma once
// Rank-1 updates of a row-major matrix: the general A += c x y^T and the
// symmetric A -= c u u^T. Each row is one axpy. Note: syr_sub rounds (i,j) and
// (j,i) differently (c u_i u_j vs c u_j u_i); where bitwise symmetry matters
// use the w w^T form of sherman_morrison.hpp (docs/math.md §3).
#include <mesaopt/kernels/vector_ops.hpp>

#include <cstddef>

namespace mesaopt::kernels {

// A += c x y^T; A is m x n row-major, row stride lda.
template <class T>
void ger(std::size_t m, std::size_t n, T c, const T* x, const T* y, T* A, std::size_t lda) {
  for (std::size_t i = 0; i < m; ++i) axpy(n, c * x[i], y, A + i * lda);
}

// A -= c u u^T; A is n x n row-major, row stride lda.
template <class T>
void syr_sub(std::size_t n, T c, const T* u, T* A, std::size_t lda) {
  for (std::size_t i = 0; i < n; ++i) axpy(n, -c * u[i], u, A + i * lda);
}

}  // namespace mesaopt::kernels
