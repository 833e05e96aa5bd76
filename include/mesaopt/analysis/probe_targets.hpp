#pragma once
// The per-token targets the paper probes on the linear-dynamics task
// (docs/analysis.md, "Probe targets"; docs/math.md §7, M26). For a batch with
// inputs s_1..s_T (row b*T + t-1 holds s_t) and targets s_2..s_{T+1}:
//
//   previous:        s_{t-1}  (s_0 = 0)
//   current:         s_t
//   next:            s_{t+1}  (the prediction target)
//   preconditioned:  (S_tᵀ S_t + ρ I)⁻¹ s_t,   S_tᵀ S_t = Σ_{i<t} s_i s_iᵀ        (M26)
//
// S_t stacks, as rows, the inputs of the regression pairs seen at position t.
// The constructed token e_t = [0, s_t, s_t, s_{t-1}] carries the pair
// (s_{t-1} -> s_t), so at position t the pairs are (s_{t'-1}, s_{t'}),
// t' = 1..t, with inputs s_0 .. s_{t-1}; s_0 = 0 adds nothing, so S_t =
// [s_1; ...; s_{t-1}] ((t-1) x n, empty at t = 1, where the target is s_1/ρ).
// This is the Gram matrix H_t of the reference learners (docs/math.md §4,
// pairs i < t) and ρ is the regulariser itself, as in the paper (the
// inverse of the mesa layer's λ, which is a prior variance: M5).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/tasks/linear_dynamics.hpp>

#include <Eigen/Cholesky>
#include <cmath>

namespace mesaopt::analysis {

// s_{t-1} at every position (zero at t = 1); inputs (B*T, n) sequence-major.
template <class T>
RowMatrix<T> previous_states(ConstMatrixRef<T> inputs, long seq_len) {
  const char* where = "previous_states";
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_positive_size(where, "inputs.rows()", inputs.rows());
  if (inputs.rows() % seq_len != 0)
    detail::fail(where, "inputs has ", inputs.rows(), " rows, not a multiple of seq_len ", seq_len);
  RowMatrix<T> out = RowMatrix<T>::Zero(inputs.rows(), inputs.cols());
  for (long r = 0; r < inputs.rows(); ++r)
    if (r % seq_len != 0) out.row(r) = inputs.row(r - 1);
  return out;
}

// M26: (Σ_{i<t} s_i s_iᵀ + ρ I)⁻¹ s_t at every position, in double; ρ > 0.
template <class T>
RowMatrix<T> preconditioned_inputs(ConstMatrixRef<T> inputs, long seq_len, double rho) {
  const char* where = "preconditioned_inputs";
  detail::check_positive_finite(where, "rho", rho);
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_positive_size(where, "inputs.rows()", inputs.rows());
  if (inputs.rows() % seq_len != 0)
    detail::fail(where, "inputs has ", inputs.rows(), " rows, not a multiple of seq_len ", seq_len);
  const long n = inputs.cols(), B = inputs.rows() / seq_len;
  RowMatrix<T> out(inputs.rows(), n);
  for (long b = 0; b < B; ++b) {
    RowMatrix<double> A = RowMatrix<double>::Identity(n, n) * rho;
    for (long t = 0; t < seq_len; ++t) {
      const long r = b * seq_len + t;
      const Vector<double> s = inputs.row(r).transpose().template cast<double>();
      out.row(r) = A.llt().solve(s).transpose().template cast<T>();
      A.noalias() += s * s.transpose();  // s_t joins S for positions > t
    }
  }
  return out;
}

// All four targets of a dynamics batch, (B*T, n) each.
template <class T>
struct DynamicsProbeTargets {
  RowMatrix<T> previous;        // s_{t-1}
  RowMatrix<T> current;         // s_t
  RowMatrix<T> next;            // s_{t+1}
  RowMatrix<T> preconditioned;  // M26
};

template <class T>
DynamicsProbeTargets<T> dynamics_probe_targets(const tasks::DynamicsBatch<T>& batch, double rho) {
  const char* where = "dynamics_probe_targets";
  if (batch.inputs.rows() != batch.batch * batch.seq_len || batch.targets.rows() != batch.inputs.rows() ||
      batch.targets.cols() != batch.inputs.cols())
    detail::fail(where, "batch is inconsistent: inputs ", batch.inputs.rows(), " x ", batch.inputs.cols(),
                 ", targets ", batch.targets.rows(), " x ", batch.targets.cols(), " for batch ", batch.batch,
                 " x seq_len ", batch.seq_len);
  DynamicsProbeTargets<T> out;
  out.previous = previous_states<T>(batch.inputs, batch.seq_len);
  out.current = batch.inputs;
  out.next = batch.targets;
  out.preconditioned = preconditioned_inputs<T>(batch.inputs, batch.seq_len, rho);
  return out;
}

}  // namespace mesaopt::analysis
