#pragma once
// Plain reference for the gated mesa op (ops/gated_mesa.hpp), for tests:
// reference::gated_mesa_forward_direct solves the weighted ridge problem of
// docs/math.md §8 from scratch at every position, in double, O(seq_len^2 d^2 +
// seq_len d^3): the weights are formed as products of the gates (no recursion),
// the precision matrix is summed and factorised (LDL^T) afresh at every t.
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/gated_mesa.hpp>

#include <Eigen/Cholesky>
#include <Eigen/Core>

namespace mesaopt::reference {

// o_t = S_t P_t^{-1} q_t with (t, i 1-based), w_{t,i} = beta_i prod_{j=i+1}^{t} gamma_j,
//   S_t = sum_{i<=t} w_{t,i} v_i k_i^T,
//   P_t = sum_{i<=t} w_{t,i} k_i k_i^T + c_t Lambda,   c_t = prod_{j<=t} gamma_j (objective exact, M30)
//                                                       c_t = 1                    (objective cg, M32).
// The minimiser of 1/2 sum_i w_{t,i} ||v_i - W k_i||^2 + c_t/2 sum_j Lambda_jj ||W e_j||^2 applied to q_t.
// q, k : (seq_len, d); v : (seq_len, dv); beta, gamma : seq_len; lambda_diag : d; returns (seq_len, dv).
inline RowMatrix<double> gated_mesa_forward_direct(const RowMatrix<double>& q, const RowMatrix<double>& k,
                                                   const RowMatrix<double>& v, const Vector<double>& beta,
                                                   const Vector<double>& gamma, const Vector<double>& lambda_diag,
                                                   MesaSolver objective) {
  const char* where = "reference::gated_mesa_forward_direct";
  detail::check_sequence_inputs<double>(where, q, k, v);
  detail::check_gates<double>(where, beta, gamma, lambda_diag, q.rows(), q.cols());
  if (objective != MesaSolver::exact && objective != MesaSolver::cg)
    detail::fail(where, "objective must be MesaSolver::exact or MesaSolver::cg, got ", static_cast<int>(objective));
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  using Mat = Eigen::MatrixXd;
  RowMatrix<double> out(n, dv);
  for (long t = 0; t < n; ++t) {
    Mat P = Mat::Zero(d, d), S = Mat::Zero(dv, d);
    for (long i = 0; i <= t; ++i) {
      double w = beta[i];
      for (long j = i + 1; j <= t; ++j) w *= gamma[j];
      P += w * k.row(i).transpose() * k.row(i);
      S += w * v.row(i).transpose() * k.row(i);
    }
    double c = 1.0;
    if (objective == MesaSolver::exact)
      for (long j = 0; j <= t; ++j) c *= gamma[j];
    P += c * Mat(lambda_diag.asDiagonal());
    const Eigen::VectorXd x = P.ldlt().solve(Eigen::VectorXd(q.row(t).transpose()));
    out.row(t) = (S * x).transpose();
  }
  return out;
}

}  // namespace mesaopt::reference
