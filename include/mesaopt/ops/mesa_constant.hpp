#pragma once
// The per-token solve of the mesa op with the constant regulariser
// (MesaRegularizer::constant, docs/math.md M20):
//
//   P_t = gamma P_{t-1} + k_t k_t^T + ((1 - gamma) / lambda) I,    a_t = P_t^{-1} q_t
//
// P_t = R_t^{-1} is the precision matrix of the ridge problem whose
// regulariser I/lambda does not decay with the data. The ridge term makes the
// step a full-rank update of P, so the exact Sherman-Morrison recursion of the
// decaying mode (M7) does not apply; each token instead refactorises P_t by
// Cholesky (d^3/3 flops) and solves with the factor (2 d^2 per right-hand
// side). In exchange nothing is inverted incrementally: P_t is a sum of
// positive semi-definite terms plus a positive ridge, so rounding cannot make
// it grow without bound the way the decaying mode's R does on directions no
// key spans (docs/mesa.md, "Numerical safety").
//
// This header holds only that linear algebra; ops/mesa.hpp runs the sequence
// (S, outputs, checkpoints, backward) around it.
#include <mesaopt/common/matrix.hpp>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <cmath>
#include <cstddef>

namespace mesaopt::detail {

// P (d x d, column-major, kept full and symmetric) and the Cholesky factor of
// the last advance(). Storage is reused across tokens and calls.
template <class T>
class MesaPrecisionSolver {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  // column-major: Eigen's LLT works on it in place

  long dim() const { return d_; }
  // P's storage (d * d numbers, column-major): what the op checkpoints.
  T* data() { return P_.data(); }
  const T* data() const { return P_.data(); }
  std::size_t capacity() const { return std::size_t(P_.size() + factor_.rows() * factor_.cols()); }

  // P = I / lambda (the empty state, R_0 = lambda I).
  void set_identity_over(long d, T lambda) {
    d_ = d;
    P_.setIdentity(d, d);
    P_ /= lambda;
  }
  // P = the d x d matrix at p (column-major), e.g. a checkpoint.
  void set(long d, const T* p) {
    d_ = d;
    P_ = Eigen::Map<const Matrix>(p, d, d);
  }
  // P = R^{-1} for a symmetric R (row- or column-major: symmetric). Returns
  // false when R is not numerically positive definite (Cholesky fails).
  template <class M>
  bool set_inverse_of(const M& R) {
    d_ = long(R.rows());
    const Eigen::LLT<Matrix> llt{Matrix(R)};
    if (llt.info() != Eigen::Success || !factor_ok(llt.matrixLLT())) return false;
    P_ = llt.solve(Matrix::Identity(d_, d_));
    P_ = (P_ + P_.transpose()).eval() / T(2);  // the solve rounds (i, j) and (j, i) differently
    return true;
  }

  // (M20) P <- gamma P + k k^T + ridge I, then its Cholesky factor. Returns
  // false when the factorisation fails or produces a non-finite pivot (P lost
  // positive definiteness to rounding, or k was not finite).
  bool advance(const T* k, T gamma, T ridge) {
    const Eigen::Map<const Vector<T>> kv(k, d_);
    if (gamma != T(1)) P_ *= gamma;
    P_.noalias() += kv * kv.transpose();
    if (ridge != T(0)) P_.diagonal().array() += ridge;
    factor_.compute(P_);
    return factor_.info() == Eigen::Success && factor_ok(factor_.matrixLLT());
  }

  // y = P^{-1} x with the factor of the last advance() (x and y may alias).
  void solve(const T* x, T* y) const {
    Eigen::Map<Vector<T>> out(y, d_);
    if (x != y) out = Eigen::Map<const Vector<T>>(x, d_);
    factor_.solveInPlace(out);
  }

  // R = P^{-1} (symmetrised) with the factor of the last advance().
  void inverse(RowMatrix<T>& R) const {
    Matrix X = factor_.solve(Matrix::Identity(d_, d_));
    R = (X + X.transpose()) / T(2);
  }

 private:
  // Eigen's LLT reports failure only for a pivot <= 0; a NaN pivot (non-finite
  // input) passes that test, so the diagonal of L is checked too (O(d)).
  static bool factor_ok(const Matrix& L) {
    for (long i = 0; i < L.rows(); ++i)
      if (!(std::isfinite(L(i, i)) && L(i, i) > T(0))) return false;
    return true;
  }

  long d_ = 0;
  Matrix P_;
  Eigen::LLT<Matrix> factor_;
};

}  // namespace mesaopt::detail
