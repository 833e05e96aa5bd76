// A first look at mesaopt's core kernel: runs the fused Sherman-Morrison
// recursion (docs/math.md M7-M9) over a random sequence and checks the final
// prediction against a direct ridge solve.
#include <mesaopt/mesaopt.hpp>

#include "ranks.hpp"

#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  mesaopt::examples::Ranks ranks(argc, argv, "demo");  // under mpirun: rank 0 prints
  const int T = 200, d = 16, dv = 8;
  const double lambda = 1.0;
  std::mt19937_64 rng(42);
  std::normal_distribution<double> n01(0.0, 1.0);
  using M = mesaopt::RowMatrix<double>;
  M K(T, d), Q(T, d), V(T, dv);
  for (long i = 0; i < K.size(); ++i) K.data()[i] = n01(rng) / std::sqrt(double(d));
  for (long i = 0; i < Q.size(); ++i) Q.data()[i] = n01(rng);
  for (long i = 0; i < V.size(); ++i) V.data()[i] = n01(rng);

  // R_0 = lambda I, S_0 = 0; u_1 = R_0 k_1.
  M R = M::Identity(d, d) * lambda, St = M::Zero(d, dv);
  std::vector<double> u(d), w(d), a(d), u_next(d), o(dv);
  for (int i = 0; i < d; ++i) u[i] = lambda * K(0, i);
  for (int t = 0; t < T; ++t) {
    mesaopt::kernels::sherman_morrison_gain<double>(d, &K(t, 0), u.data(), 1.0, w.data());
    const double* k_next = t + 1 < T ? &K(t + 1, 0) : nullptr;
    mesaopt::kernels::sherman_morrison_update<double>(d, R.data(), d, w.data(), 1.0, &Q(t, 0), k_next, a.data(),
                                                      u_next.data());
    mesaopt::kernels::state_update_apply<double>(d, dv, St.data(), dv, 1.0, &K(t, 0), &V(t, 0), a.data(), o.data());
    u.swap(u_next);
  }
  // Direct ridge solve at t = T (M5-M6): o = V^T K (K^T K + I/lambda)^{-1} q.
  Eigen::MatrixXd A = K.transpose() * K + Eigen::MatrixXd::Identity(d, d) / lambda;
  Eigen::VectorXd direct = V.transpose() * K * A.ldlt().solve(Q.row(T - 1).transpose());
  double err = 0;
  for (int j = 0; j < dv; ++j) err = std::max(err, std::abs(direct[j] - o[j]));
  std::printf("mesaopt %s, SIMD architecture: %s\n", MESAOPT_VERSION_STRING, mesaopt::kernels::simd_arch_name());
  std::printf("mesa recursion over T=%d tokens (d=%d, dv=%d, lambda=%g)\n", T, d, dv, lambda);
  std::printf("  o_T[0..3]         = % .6f % .6f % .6f % .6f\n", o[0], o[1], o[2], o[3]);
  std::printf("  direct ridge solve= % .6f % .6f % .6f % .6f\n", direct[0], direct[1], direct[2], direct[3]);
  std::printf("  max |difference|  = %.3e\n", err);
  return err < 1e-9 ? 0 : 1;
}
