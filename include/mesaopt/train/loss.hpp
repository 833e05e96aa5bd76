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

// The unnormalised sums behind the loss: per_position[t] = sum_b 1/2
// ||pred_{b,t} - target_{b,t}||^2 and total = sum_t per_position[t], in double.
// Sums of disjoint sets of sequences add up (the sharded step adds them over
// shards, train/sharded_step.hpp); mse_loss_normalize turns them into MseLoss.
struct MseSums {
  double total = 0;
  std::vector<double> per_position;  // (T)
  long sequences = 0;                // B
};

template <class T>
MseSums mse_loss_sums(ConstMatrixRef<T> pred, ConstMatrixRef<T> target, long seq_len) {
  detail::check_mse<T>("mse_loss_sums", pred, target, seq_len);
  MseSums out;
  out.sequences = pred.rows() / seq_len;
  out.per_position.assign(static_cast<std::size_t>(seq_len), 0.0);
  for (long b = 0; b < out.sequences; ++b) {
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
  for (double p : out.per_position) out.total += p;
  return out;
}

// MseLoss from sums over B sequences of length T: loss = total / (B T),
// per_position[t] = sums.per_position[t] / B.
inline MseLoss mse_loss_normalize(const MseSums& sums) {
  MseLoss out;
  const double batch = static_cast<double>(sums.sequences);
  out.per_position = sums.per_position;
  for (double& p : out.per_position) p /= batch;
  out.loss = sums.total / (batch * static_cast<double>(sums.per_position.size()));
  return out;
}

// pred and target are (B*T, n); seq_len is T.
template <class T>
MseLoss mse_loss_forward(ConstMatrixRef<T> pred, ConstMatrixRef<T> target, long seq_len) {
  detail::check_mse<T>("mse_loss_forward", pred, target, seq_len);
  return mse_loss_normalize(mse_loss_sums<T>(pred, target, seq_len));
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

// The gradient of the whole batch's loss with respect to the predictions of a
// part of it (a shard of whole sequences): dpred = (pred - target) /
// batch_rows, where batch_rows = B*T of the whole batch (>= pred.rows()). With
// batch_rows = pred.rows() this is mse_loss_backward with scale 1, bit for bit.
template <class T>
void mse_loss_backward_part(ConstMatrixRef<T> pred, ConstMatrixRef<T> target, long seq_len, long batch_rows,
                            MatrixRef<T> dpred) {
  detail::check_mse<T>("mse_loss_backward_part", pred, target, seq_len);
  detail::check_shape("mse_loss_backward_part", "dpred", dpred, pred.rows(), pred.cols());
  if (batch_rows < pred.rows() || batch_rows % seq_len != 0)
    detail::fail("mse_loss_backward_part", "batch_rows must be a multiple of seq_len = ", seq_len,
                 " and >= pred.rows() = ", pred.rows(), ", got ", batch_rows);
  const T factor = static_cast<T>(1.0 / static_cast<double>(batch_rows));
  dpred = (pred - target) * factor;
}

}  // namespace mesaopt::train
