#pragma once
// Plain reference for causal linear attention (MATH.md §1): the quadratic form
// that materialises the T x T matrix A_{t,i} = q_t . k_i (i <= t) with loops,
// no blocking, no SIMD. Tests compare the recurrent and chunked paths with it.
// O(T^2 (d + dv)) time and O(T^2) memory: for tests only.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

namespace mesaopt {

namespace detail {

template <class T>
void check_linear_attention_inputs(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                   const ConstMatrixRef<T>& v) {
  check_positive_size(where, "T (rows of q)", q.rows());
  check_positive_size(where, "d (columns of q)", q.cols());
  check_positive_size(where, "dv (columns of v)", v.cols());
  check_shape(where, "k", k, q.rows(), q.cols());
  check_shape(where, "v", v, q.rows(), v.cols());
}

}  // namespace detail

// o_t = sum_{i<=t} v_i (k_i . q_t)  (M1-M2, written as the masked quadratic form).
// q, k are (T, d); v is (T, dv); out is (T, dv); one token per row.
template <class T>
void linear_attention_forward_reference(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                        MatrixRef<T> out) {
  const char* where = "linear_attention_forward_reference";
  detail::check_linear_attention_inputs<T>(where, q, k, v);
  detail::check_shape(where, "out", out, q.rows(), v.cols());
  const long n = q.rows();
  for (long t = 0; t < n; ++t) {
    for (long j = 0; j < v.cols(); ++j) out(t, j) = T(0);
    for (long i = 0; i <= t; ++i) {
      T a = 0;  // A_{t,i} = q_t . k_i
      for (long c = 0; c < q.cols(); ++c) a += q(t, c) * k(i, c);
      for (long j = 0; j < v.cols(); ++j) out(t, j) += a * v(i, j);
    }
  }
}

// Gradients of the quadratic form, written from its definition rather than
// from M3: with A_{t,i} = q_t . k_i and B_{t,i} = g_t . v_i (i <= t),
//   dq_t = sum_{i<=t} B_{t,i} k_i,  dk_i = sum_{t>=i} B_{t,i} q_t,  dv_i = sum_{t>=i} A_{t,i} g_t.
// dout is (T, dv); dq, dk are (T, d) and dv_ is (T, dv); all three are overwritten.
template <class T>
void linear_attention_backward_reference(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                         ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk,
                                         MatrixRef<T> dv_) {
  const char* where = "linear_attention_backward_reference";
  detail::check_linear_attention_inputs<T>(where, q, k, v);
  detail::check_shape(where, "dout", dout, q.rows(), v.cols());
  detail::check_shape(where, "dq", dq, q.rows(), q.cols());
  detail::check_shape(where, "dk", dk, q.rows(), q.cols());
  detail::check_shape(where, "dv", dv_, q.rows(), v.cols());
  dq.setZero();
  dk.setZero();
  dv_.setZero();
  const long n = q.rows();
  for (long t = 0; t < n; ++t) {
    for (long i = 0; i <= t; ++i) {
      T a = 0, b = 0;
      for (long c = 0; c < q.cols(); ++c) a += q(t, c) * k(i, c);
      for (long j = 0; j < v.cols(); ++j) b += dout(t, j) * v(i, j);
      for (long c = 0; c < q.cols(); ++c) {
        dq(t, c) += b * k(i, c);
        dk(i, c) += b * q(t, c);
      }
      for (long j = 0; j < v.cols(); ++j) dv_(i, j) += a * dout(t, j);
    }
  }
}

// Non-template overloads (callers need not name the scalar).
#define MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS(S)                                                        \
  inline void linear_attention_forward_reference(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v, \
                                                 MatrixRef<S> out) {                                           \
    linear_attention_forward_reference<S>(q, k, v, out);                                                       \
  }                                                                                                            \
  inline void linear_attention_backward_reference(ConstMatrixRef<S> q, ConstMatrixRef<S> k,                    \
                                                  ConstMatrixRef<S> v, ConstMatrixRef<S> dout, MatrixRef<S> dq, \
                                                  MatrixRef<S> dk, MatrixRef<S> dv_) {                         \
    linear_attention_backward_reference<S>(q, k, v, dout, dq, dk, dv_);                                        \
  }
MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS(float)
MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS(double)
#undef MESAOPT_LINEAR_ATTENTION_REFERENCE_OVERLOADS

}  // namespace mesaopt
