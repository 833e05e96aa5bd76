#pragma once
// Plain reference for causal linear attention (docs/math.md §1 and §6): the
// quadratic form that materialises A_{t,i} = q_t . k_i (i <= t) with loops,
// no blocking, no SIMD, plus the initial state as its own term. Tests compare
// the recurrent and chunked paths with it. O(seq_len^2 (d + dv)) time: for
// tests and benchmarks, not for production code.
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/state.hpp>

namespace mesaopt::reference {

// o_t = S_0 q_t + sum_{i<=t} v_i (k_i . q_t)  (M1-M2, M13, as the masked quadratic form).
// q, k are (seq_len, d); v, out are (seq_len, dv); initial->S is (dv, d) or null (S_0 = 0).
template <class T>
void linear_attention_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, MatrixRef<T> out,
                              const LinearAttentionState<identity_t<T>>* initial = nullptr) {
  const char* where = "reference::linear_attention_forward";
  detail::check_sequence_inputs<T>(where, q, k, v);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  if (initial != nullptr) detail::check_linear_attention_state(where, "initial", *initial, q.cols(), v.cols());
  const long n = q.rows();
  for (long t = 0; t < n; ++t) {
    for (long j = 0; j < v.cols(); ++j) {
      T s0 = 0;
      if (initial != nullptr)
        for (long c = 0; c < q.cols(); ++c) s0 += initial->S(j, c) * q(t, c);
      out(t, j) = s0;
    }
    for (long i = 0; i <= t; ++i) {
      T a = 0;  // A_{t,i} = q_t . k_i
      for (long c = 0; c < q.cols(); ++c) a += q(t, c) * k(i, c);
      for (long j = 0; j < v.cols(); ++j) out(t, j) += a * v(i, j);
    }
  }
}

// Gradients of the quadratic form, written from its definition rather than
// from M3: with A_{t,i} = q_t . k_i and B_{t,i} = g_t . v_i (i <= t),
//   dq_t = S_0^T g_t + sum_{i<=t} B_{t,i} k_i,  dk_i = sum_{t>=i} B_{t,i} q_t + Sbar^T v_i,
//   grad_v_i = sum_{t>=i} A_{t,i} g_t + Sbar k_i,  dL/dS_0 = sum_t g_t q_t^T + Sbar,
// where Sbar = grad_final->S (dL/dS_T; 0 when null). All outputs are overwritten.
template <class T>
void linear_attention_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                               ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> grad_v,
                               const LinearAttentionState<identity_t<T>>* initial = nullptr,
                               const LinearAttentionState<identity_t<T>>* grad_final = nullptr,
                               LinearAttentionState<identity_t<T>>* grad_initial = nullptr) {
  const char* where = "reference::linear_attention_backward";
  detail::check_sequence_inputs<T>(where, q, k, v);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_gradient_shapes<T>(where, n, d, dv, dout, dq, dk, grad_v);
  detail::check_gradients_distinct<T>(where, q, k, v, dout, dq, dk, grad_v);
  if (initial != nullptr) detail::check_linear_attention_state(where, "initial", *initial, d, dv);
  if (grad_final != nullptr) detail::check_linear_attention_state(where, "grad_final", *grad_final, d, dv);
  dq.setZero();
  dk.setZero();
  grad_v.setZero();
  for (long t = 0; t < n; ++t) {
    for (long i = 0; i <= t; ++i) {
      T a = 0, b = 0;
      for (long c = 0; c < d; ++c) a += q(t, c) * k(i, c);
      for (long j = 0; j < dv; ++j) b += dout(t, j) * v(i, j);
      for (long c = 0; c < d; ++c) {
        dq(t, c) += b * k(i, c);
        dk(i, c) += b * q(t, c);
      }
      for (long j = 0; j < dv; ++j) grad_v(i, j) += a * dout(t, j);
    }
  }
  for (long t = 0; t < n; ++t)
    for (long c = 0; c < d; ++c)
      for (long j = 0; j < dv; ++j) {
        if (initial != nullptr) dq(t, c) += initial->S(j, c) * dout(t, j);
        if (grad_final != nullptr) {
          dk(t, c) += grad_final->S(j, c) * v(t, j);
          grad_v(t, j) += grad_final->S(j, c) * k(t, c);
        }
      }
  if (grad_initial != nullptr) {
    grad_initial->S = grad_final != nullptr ? RowMatrix<T>(grad_final->S) : RowMatrix<T>::Zero(dv, d);
    for (long t = 0; t < n; ++t)
      for (long j = 0; j < dv; ++j)
        for (long c = 0; c < d; ++c) grad_initial->S(j, c) += dout(t, j) * q(t, c);
  }
}

// Overloads for float and double (callers need not name the scalar).
// Each overload is a template on an unused int parameter (template <int = 0>):
// as a plain inline function it would instantiate the float and the double op
// in every translation unit that includes this header, called or not (GCC
// spent about 15 s parsing mesaopt/ops.hpp that way; docs/building.md); a
// template is instantiated only where it is called. f<float>(...) still names
// the generic template (a type is not an int), and a call with the exact Ref
// types picks the overload as the more specialised template.
#define MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS(S)                                                          \
  template <int = 0> inline void linear_attention_forward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,            \
                                       MatrixRef<S> out, const LinearAttentionState<S>* initial = nullptr) {     \
    reference::linear_attention_forward<S>(q, k, v, out, initial);                                                          \
  }                                                                                                              \
  template <int = 0> inline void linear_attention_backward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,           \
                                        ConstMatrixRef<S> dout, MatrixRef<S> dq, MatrixRef<S> dk,                \
                                        MatrixRef<S> grad_v, const LinearAttentionState<S>* initial = nullptr,   \
                                        const LinearAttentionState<S>* grad_final = nullptr,                     \
                                        LinearAttentionState<S>* grad_initial = nullptr) {                       \
    reference::linear_attention_backward<S>(q, k, v, dout, dq, dk, grad_v, initial, grad_final, grad_initial);   \
  }
MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS(float)
MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS(double)
#undef MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS

}  // namespace mesaopt::reference
