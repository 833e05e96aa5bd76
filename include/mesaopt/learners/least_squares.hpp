#pragma once
// Least squares, ridge and recursive least squares (docs/math.md §4, M5-M9).
//
// Convention (docs/math.md M5): `lambda` is the prior variance, the regulariser is
// 1/lambda: W_t = G_t (H_t + I/lambda)^{-1} with H_t = sum_{i<t} x_i x_i^T and
// G_t = sum_{i<t} y_i x_i^T, and lambda -> infinity is least squares. docs/paper.md
// §5 writes the regulariser itself ("lambda = 1e-3"); Ridge::from_regularizer
// converts.
#include <mesaopt/learners/context.hpp>

#include <Eigen/Cholesky>
#include <Eigen/QR>

namespace mesaopt::learners {

// Ridge regression solved directly at every t: y_hat_t = G_t (H_t + I/lambda)^{-1} x_t.
// With lag = L > 0 the sums H_t, G_t run over the pairs i < t - L only: the
// paper's "least squares" row of Fig. 4 uses lag 1 (docs/paper.md §5: the pairs
// (s_{t'-1}, s_{t'}) with t' <= t - 1, so positions 1 and 2 both predict 0).
struct Ridge {
  double lambda = 1e3;  // prior variance; regulariser 1/lambda (docs/math.md M5)
  long lag = 0;         // pairs i < t - lag form the context; 0: all pairs i < t

  static Ridge from_regularizer(double regularizer, long lag = 0) { return Ridge{1.0 / regularizer, lag}; }
  std::string name() const {
    return lag == 0 ? "ridge" : lag == 1 ? "ridge-lagged" : "ridge-lag" + std::to_string(lag);
  }

  // x is (B*T, dx), y is (B*T, dy); returns (B*T, dy).
  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    detail::check_positive_finite("Ridge::predict", "lambda", lambda);
    if (lag < 0) detail::fail("Ridge::predict", "lag must be >= 0, got ", lag);
    const double lam = lambda;
    const long L = lag;
    return detail::for_each_sequence<T>("Ridge::predict", x, y, seq_len, num_threads,
                                        [lam, L](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                                 RowMatrix<double>& P) {
      const long dx = X.cols();
      Eigen::MatrixXd H = Eigen::MatrixXd::Identity(dx, dx) / lam;
      Eigen::MatrixXd G = Eigen::MatrixXd::Zero(Y.cols(), dx);
      long used = 0;  // pairs 0 .. used-1 are in H and G
      for (long t = 0; t < X.rows(); ++t) {
        for (; used < t - L; ++used) {
          H.noalias() += X.row(used).transpose() * X.row(used);
          G.noalias() += Y.row(used).transpose() * X.row(used);
        }
        if (used > 0) {
          const Eigen::VectorXd z = H.ldlt().solve(X.row(t).transpose());
          P.row(t) = (G * z).transpose();
        }
      }
    });
  }
};

// Minimum-norm least squares: W_t = Y_{<t}^T pinv(X_{<t}^T) (the solution of
// smallest Frobenius norm when fewer pairs than dimensions), via a complete
// orthogonal decomposition of the (t-1, dx) data matrix.
struct LeastSquares {
  std::string name() const { return "least-squares"; }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    return detail::for_each_sequence<T>("LeastSquares::predict", x, y, seq_len, num_threads,
                                        [](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                           RowMatrix<double>& P) {
      for (long t = 1; t < X.rows(); ++t) {
        Eigen::CompleteOrthogonalDecomposition<Eigen::MatrixXd> cod(X.topRows(t));
        const Eigen::MatrixXd Wt = cod.solve(Eigen::MatrixXd(Y.topRows(t)));  // (dx, dy) = W^T
        P.row(t) = X.row(t) * Wt;
      }
    });
  }
};

// Recursive least squares (docs/math.md M7-M9) with k = x_i, v = y_i, q = x_t:
// R_0 = lambda I, R <- R - w w^T with w = u / sqrt(1 + k.u), u = R k (the
// bitwise-symmetric form of M7), S <- S + v k^T, prediction S R x_t. Equals
// Ridge{lambda} at every t in exact arithmetic.
struct RecursiveLeastSquares {
  double lambda = 1e3;

  std::string name() const { return "rls"; }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    detail::check_positive_finite("RecursiveLeastSquares::predict", "lambda", lambda);
    const double lam = lambda;
    return detail::for_each_sequence<T>("RecursiveLeastSquares::predict", x, y, seq_len, num_threads,
                                        [lam](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                              RowMatrix<double>& P) {
      const long dx = X.cols();
      Eigen::MatrixXd R = Eigen::MatrixXd::Identity(dx, dx) * lam;
      Eigen::MatrixXd S = Eigen::MatrixXd::Zero(Y.cols(), dx);
      for (long t = 0; t < X.rows(); ++t) {
        if (t > 0) P.row(t) = (S * (R * X.row(t).transpose())).transpose();  // M9
        const Eigen::VectorXd k = X.row(t).transpose();
        const Eigen::VectorXd u = R * k;                                   // M7
        const Eigen::VectorXd w = u / std::sqrt(1.0 + k.dot(u));
        R.noalias() -= w * w.transpose();
        S.noalias() += Y.row(t).transpose() * k.transpose();               // M8
      }
    });
  }
};

}  // namespace mesaopt::learners
