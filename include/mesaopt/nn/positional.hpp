#pragma once
// Sinusoidal positional encoding (Vaswani et al. 2017), concatenated to the
// tokens that feed keys and queries of the first softmax block of the paper's
// full models (docs/paper.md §2: the layer that learns to copy s_{t-1} next to s_t).
//
//   PE[t, 2i]   = sin(t * base^(-2i/p))
//   PE[t, 2i+1] = cos(t * base^(-2i/p)),      t = 0..T-1 (0-based position)
// (for odd p the last column is a sine). The encoding is fixed: no parameters.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <cmath>

namespace mesaopt::nn {

// The (seq_len, dim) encoding; row t is the code of position t (0-based).
template <class T>
RowMatrix<T> sinusoidal_encoding(long seq_len, long dim, double base = 10000.0) {
  detail::check_positive_size("sinusoidal_encoding", "seq_len", seq_len);
  detail::check_positive_size("sinusoidal_encoding", "dim", dim);
  if (!(std::isfinite(base) && base > 1.0)) detail::fail("sinusoidal_encoding", "base must be finite and > 1, got ", base);
  RowMatrix<T> pe(seq_len, dim);
  for (long t = 0; t < seq_len; ++t) {
    for (long j = 0; j < dim; ++j) {
      const long pair = j / 2;  // i: columns 2i and 2i+1 share a frequency
      const double freq = std::pow(base, -2.0 * static_cast<double>(pair) / static_cast<double>(dim));
      const double angle = static_cast<double>(t) * freq;
      pe(t, j) = static_cast<T>(j % 2 == 0 ? std::sin(angle) : std::cos(angle));
    }
  }
  return pe;
}

// x is (B*T, D), sequence-major (sequence b in rows [b*T, (b+1)*T)); pe is (T, p);
// out is (B*T, D + p) with out row b*T+t = [x row b*T+t, pe row t].
template <class T>
void positional_concat_forward(ConstMatrixRef<T> x, ConstMatrixRef<T> pe, MatrixRef<T> out) {
  const long seq_len = pe.rows();
  detail::check_positive_size("positional_concat_forward", "pe.rows() (T)", seq_len);
  if (x.rows() % seq_len != 0)
    detail::fail("positional_concat_forward", "x has ", x.rows(), " rows, not a multiple of pe.rows() = ",
                          seq_len, " (expected B*T rows)");
  detail::check_shape("positional_concat_forward", "out", out, x.rows(), x.cols() + pe.cols());
  const long batch = x.rows() / seq_len;
  out.leftCols(x.cols()) = x;
  for (long b = 0; b < batch; ++b) out.block(b * seq_len, x.cols(), seq_len, pe.cols()) = pe;
}

// dout is (B*T, D + p) = dL/dout; writes dx = dL/dx, (B*T, D): the first D
// columns (the encoding is fixed, so its part of the gradient is dropped).
template <class T>
void positional_concat_backward(ConstMatrixRef<T> dout, MatrixRef<T> dx) {
  if (dx.cols() > dout.cols())
    detail::fail("positional_concat_backward", "dx has ", dx.cols(), " columns but dout only ", dout.cols());
  detail::check_size("positional_concat_backward", "dx.rows()", dx.rows(), dout.rows(), "dout.rows()");
  // forward: out = [x, pe]   =>   dx = dout[:, :D]
  dx = dout.leftCols(dx.cols());
}

}  // namespace mesaopt::nn
