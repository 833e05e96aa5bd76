#pragma once
// Softmax kernel regression, the "induction head" baseline:
//     y_hat_t = sum_{i<t} y_i softmax_i(beta x_i . x_t)
// (one causal softmax-attention head with k_i = x_i, q = beta x_t, v_i = y_i,
// attending to the pairs before t only; docs/math.md M4 without the 1/sqrt(d),
// which beta absorbs). Tune beta with learners::tune_for_loss.
#include <mesaopt/learners/context.hpp>

#include <Eigen/Core>
#include <cmath>

namespace mesaopt::learners {

struct SoftmaxKernelRegression {
  double beta = 1.0;  // inverse temperature

  std::string name() const { return "softmax-kernel"; }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    const char* where = "SoftmaxKernelRegression::predict";
    if (!std::isfinite(beta)) detail::fail(where, "beta must be finite, got ", beta);
    const double bt = beta;
    return detail::for_each_sequence<T>(where, x, y, seq_len, num_threads,
                                        [bt](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                             RowMatrix<double>& P) {
      Eigen::VectorXd logits(X.rows());
      for (long t = 1; t < X.rows(); ++t) {
        logits.head(t).noalias() = bt * (X.topRows(t) * X.row(t).transpose());
        const double m = logits.head(t).maxCoeff();  // subtract the max: no overflow
        Eigen::VectorXd w = (logits.head(t).array() - m).exp().matrix();
        w /= w.sum();
        P.row(t) = w.transpose() * Y.topRows(t);
      }
    });
  }
};

}  // namespace mesaopt::learners
