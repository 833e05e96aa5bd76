#pragma once
// Plain references for the mesa op (ops/mesa.hpp), for tests and benchmarks:
//
//  * mesa_forward_direct: the ridge solution solved from scratch at every
//    position (M5-M6), in double, O(T d^3): the independent closed form.
//  * mesa_forward_naive:  the Sherman-Morrison recursion (M7-M9) written as
//    straightforward Eigen expressions, no mesaopt kernels: what the fast path
//    is measured against in benchmarks/bench_mesa.cpp.
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/ops/mesa.hpp>

#include <Eigen/Cholesky>
#include <Eigen/Core>

namespace mesaopt::reference {

// o_t = S_t H_t^{-1} q_t with, at every t (1-based),
//   H_t = sum_{i<=t} gamma^{t-i} k_i k_i^T + gamma^t I / lambda,   S_t = sum_{i<=t} gamma^{t-i} v_i k_i^T,
// H_t factorised afresh (LDL^T) at every t. q, k : (T, d); v : (T, dv); returns (T, dv).
// H_t and S_t are accumulated by their defining sums (gamma H + k k^T), never inverted incrementally.
inline RowMatrix<double> mesa_forward_direct(const RowMatrix<double>& q, const RowMatrix<double>& k,
                                             const RowMatrix<double>& v, double lambda, double gamma = 1.0) {
  const long T = q.rows(), d = q.cols(), dv = v.cols();
  using Mat = Eigen::MatrixXd;
  Mat data = Mat::Zero(d, d);  // sum_i gamma^{t-i} k_i k_i^T
  Mat S = Mat::Zero(dv, d);
  double ridge = 1.0 / lambda;  // gamma^t / lambda
  RowMatrix<double> out(T, dv);
  for (long t = 0; t < T; ++t) {
    const Eigen::VectorXd kt = k.row(t).transpose();
    data = gamma * data + kt * kt.transpose();
    S = gamma * S + v.row(t).transpose() * kt.transpose();
    ridge *= gamma;
    const Mat H = data + ridge * Mat::Identity(d, d);
    const Eigen::VectorXd x = H.ldlt().solve(Eigen::VectorXd(q.row(t).transpose()));
    out.row(t) = (S * x).transpose();
  }
  return out;
}

// The recursion M7-M9 with forgetting, literally:
//   u = R k;  R = (R - u u^T / (gamma + k.u)) / gamma;  S = gamma S + v k^T;  a = R q;  o = S a.
// (The literal rank-1 update; R is not kept bitwise symmetric: MATH.md §3.)
template <class T>
void mesa_forward_naive(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                        MatrixRef<T> out) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  const long T_ = q.rows(), d = q.cols(), dv = v.cols();
  const T gamma = opt.forget;
  Mat R = opt.lambda * Mat::Identity(d, d);
  Mat S = Mat::Zero(dv, d);
  Vec u(d), a(d);
  for (long t = 0; t < T_; ++t) {
    const auto kt = k.row(t).transpose();
    u.noalias() = R * kt;
    const T den = gamma + kt.dot(u);
    R.noalias() -= (u / den) * u.transpose();
    if (gamma != T(1)) R /= gamma;
    if (gamma != T(1)) S *= gamma;
    S.noalias() += v.row(t).transpose() * k.row(t);
    a.noalias() = R * q.row(t).transpose();
    out.row(t).noalias() = (S * a).transpose();
  }
}

}  // namespace mesaopt::reference
