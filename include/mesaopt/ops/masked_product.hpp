#pragma once
// Products with a causally masked left factor, selecting the unmasked entries
// instead of multiplying the masked ones by zero.
//
// The tiled softmax and the chunked linear attention build a tile L whose row
// i is only meaningful on the columns [begin(i), end(i)) (the keys a query may
// see, or in the backward the queries a key is seen by) and write zeros
// elsewhere, then multiply L by a block X of keys, values or gradients with a
// GEMM. Each masked zero meets a row of X that belongs to a position the row
// of L must not depend on: if that row holds an Inf or NaN, 0 * Inf = NaN and
// the non-finite value leaks across the mask (a NaN in v at position 9 would
// turn the outputs of positions 0..8 into NaN).
//
// masked_product therefore uses the GEMM only when every row of X that a
// masked zero can meet is finite (an O(rows of X) check beside the GEMM's
// O(rows of L x rows of X) work): then each masked term is exactly 0 and the
// GEMM's result is the sum over the unmasked entries. Otherwise it sums each
// row over its unmasked columns only. Finite inputs therefore give the same
// bits as the plain GEMM did.
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/kernels/vector_ops.hpp>

#include <algorithm>
#include <cmath>

namespace mesaopt::detail {

// True when every entry of X is finite. x * 0 is +-0 for finite x and NaN for
// NaN or +-Inf, so the sum of the products is finite exactly when X is; unlike
// allFinite() (two compares per entry, no early exit either), Eigen vectorises
// this sum, which matters beside the small GEMMs of short sequences (measured:
// docs/softmax_attention.md, "Bad values and aliasing").
// A row-major block with unit inner stride (the ops' operands: rows of q, k,
// v or of a gradient) goes through kernels::all_finite, which runs each row's
// tail as one masked batch.
template <class M>
bool all_entries_finite(const M& X) {
  using Scalar = typename M::Scalar;
  if (X.size() == 0) return true;
  if constexpr (bool(M::Flags & Eigen::DirectAccessBit) && bool(M::IsRowMajor)) {
    if (X.innerStride() == 1)
      return kernels::all_finite(std::size_t(X.rows()), std::size_t(X.cols()), X.data(), std::size_t(X.outerStride()));
  }
  return std::isfinite((X.array() * Scalar(0)).sum());
}

// Y = L X (accumulate = false) or Y += L X (accumulate = true), where row i of
// L is masked outside the columns [begin(i), end(i)) (clamped to [0, L.cols())).
// Masked entries of L are never read in the row-by-row path; in the GEMM path
// they must be zero. The GEMM path calls product(), which must compute the
// whole product into Y (accumulating or not, as asked): callers with the
// operands' raw layout use the kernels' GEMM there (the tiled softmax).
template <class Lhs, class Rhs, class Out, class Begin, class End, class Product>
void masked_product_with(const Lhs& L, Begin begin, End end, const Rhs& X, Out&& Y, bool accumulate,
                         Product product) {
  const long rows = L.rows(), cols = L.cols();
  // Columns unmasked in every row: [common_begin, common_end).
  long common_begin = 0, common_end = cols;
  for (long i = 0; i < rows; ++i) {
    common_begin = std::max(common_begin, std::clamp(begin(i), 0L, cols));
    common_end = std::min(common_end, std::clamp(end(i), 0L, cols));
  }
  bool safe;
  if (common_begin >= common_end) {
    safe = all_entries_finite(X.topRows(cols));
  } else {
    safe = all_entries_finite(X.topRows(common_begin)) &&
           all_entries_finite(X.middleRows(common_end, cols - common_end));
  }
  if (safe) {
    product();
    return;
  }
  for (long i = 0; i < rows; ++i) {
    const long b = std::clamp(begin(i), 0L, cols), e = std::clamp(end(i), 0L, cols);
    if (!accumulate) Y.row(i).setZero();
    if (e > b) Y.row(i).noalias() += L.row(i).segment(b, e - b) * X.middleRows(b, e - b);
  }
}

// The same with Eigen's product in the GEMM path.
template <class Lhs, class Rhs, class Out, class Begin, class End>
void masked_product(const Lhs& L, Begin begin, End end, const Rhs& X, Out&& Y, bool accumulate) {
  masked_product_with(L, begin, end, X, Y, accumulate, [&] {
    if (accumulate)
      Y.noalias() += L * X.topRows(L.cols());
    else
      Y.noalias() = L * X.topRows(L.cols());
  });
}

}  // namespace mesaopt::detail
