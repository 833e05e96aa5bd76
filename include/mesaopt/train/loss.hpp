#pragma once
// Autoregressive next-token MSE (docs/paper.md §1): predictions and targets are
// (B*T, n), sequence-major (sequence b in rows [b*T, (b+1)*T)), and
//   L = 1/(B T) sum_{b,t} 1/2 ||pred_{b,t} - target_{b,t}||^2
//   per_position[t] = 1/B sum_b 1/2 ||pred_{b,t} - target_{b,t}||^2   (mean over t = L)
//   dL/dpred = (pred - target) / (B T)
// Sums are accumulated in double for both float and double inputs.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <vector>

namespace mesaopt::train {

struct MseLoss {
  double loss = 0;                  // L
  std::vector<double> per_position; // (T): the per-position loss curve
};

}  // namespace mesaopt::train

namespace mesaopt::detail {
template <class T>
void check_mse(const char* where, ConstMatrixRef<T> pred, ConstMatrixRef<T> target, long seq_len) {
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_positive_size(where, "pred.rows()", pred.rows());
  detail::check_shape(where, "target", target, pred.rows(), pred.cols());
  if (pred.rows() % seq_len != 0)
    detail::fail(where, "pred has ", pred.rows(), " rows, not a multiple of seq_len = ", seq_len,
                          " (expected B*T rows)");
}
}  // namespace mesaopt::detail

namespace mesaopt::train {

// pred and target are (B*T, n); seq_len is T.
template <class T>
MseLoss mse_loss_forward(ConstMatrixRef<T> pred, ConstMatrixRef<T> target, long seq_len) {
  detail::check_mse<T>("mse_loss_forward", pred, target, seq_len);
  const long batch = pred.rows() / seq_len;
  MseLoss out;
  out.per_position.assign(static_cast<std::size_t>(seq_len), 0.0);
  for (long b = 0; b < batch; ++b) {
    for (long t = 0; t < seq_len; ++t) {
      const long r = b * seq_len + t;
      double sq = 0;
      for (long j = 0; j < pred.cols(); ++j) {
        const double e = static_cast<double>(pred(r, j)) - static_cast<double>(target(r, j));
        sq += e * e;
      }
      out.per_position[static_cast<std::size_t>(t)] += 0.5 * sq;
    }
  }
  double total = 0;
  for (double& p : out.per_position) {
    total += p;
    p /= static_cast<double>(batch);
  }
  out.loss = total / static_cast<double>(pred.rows());
  return out;
}

// Writes dpred = scale * dL/dpred = scale * (pred - target) / (B*T), (B*T, n).
template <class T>
void mse_loss_backward(ConstMatrixRef<T> pred, ConstMatrixRef<T> target, long seq_len, MatrixRef<T> dpred,
                       double scale = 1.0) {
  detail::check_mse<T>("mse_loss_backward", pred, target, seq_len);
  detail::check_shape("mse_loss_backward", "dpred", dpred, pred.rows(), pred.cols());
  const T factor = static_cast<T>(scale / static_cast<double>(pred.rows()));
  // forward: L = 1/(BT) sum 1/2 ||pred - target||^2   =>   dpred = (pred - target) / (BT)
  dpred = (pred - target) * factor;
}

}  // namespace mesaopt::train
