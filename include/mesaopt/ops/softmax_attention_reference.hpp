#pragma once
// Plain reference for causal softmax attention (MATH.md §2, M4): materialises
// the T x T logits and probabilities (O(T^2) memory; for tests only) and
// differentiates M4 literally, with sum_j a_{t,j} da_{t,j} summed over the
// row rather than taken from g_t . o_t as the tiled kernel does.
// Not included by mesaopt/ops.hpp; include it where you need it.
#include <mesaopt/ops/softmax_attention.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mesaopt {

namespace detail {

// a_{t,i} for i <= t (0 above the diagonal), and lse_t; max-subtracted.
template <class T>
RowMatrix<T> softmax_attention_probabilities_reference(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                                       Vector<T>* lse) {
  const long n = q.rows();
  const T scale = T(1) / std::sqrt(T(q.cols()));
  RowMatrix<T> a = RowMatrix<T>::Zero(n, n);
  for (long t = 0; t < n; ++t) {
    T mx = -std::numeric_limits<T>::infinity();
    for (long i = 0; i <= t; ++i) {
      a(t, i) = q.row(t).dot(k.row(i)) * scale;  // s_{t,i}
      mx = std::max(mx, a(t, i));
    }
    T sum = 0;
    for (long i = 0; i <= t; ++i) {
      a(t, i) = std::exp(a(t, i) - mx);
      sum += a(t, i);
    }
    for (long i = 0; i <= t; ++i) a(t, i) /= sum;
    if (lse) (*lse)(t) = mx + std::log(sum);
  }
  return a;
}

}  // namespace detail

// q, k are (T, d); v is (T, dv); out is (T, dv). Fills sc like the tiled forward.
template <class T>
void softmax_attention_forward_reference(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                         MatrixRef<T> out, SoftmaxCache<T>& sc) {
  const char* where = "softmax_attention_forward_reference";
  detail::check_softmax_attention_inputs<T>(where, q, k, v);
  detail::check_shape(where, "out", out, q.rows(), v.cols());
  sc.lse.resize(q.rows());
  sc.d = q.cols();
  const RowMatrix<T> a = detail::softmax_attention_probabilities_reference<T>(q, k, &sc.lse);
  out.noalias() = a * v;  // o_t = sum_{i<=t} a_{t,i} v_i  (M4)
  sc.out = out;
}

// dout is (T, dv); writes (overwrites) dq, dk (T, d) and dv_ (T, dv). M4 backward:
//   da_{t,i} = g_t . v_i,  ds_{t,i} = a_{t,i} (da_{t,i} - sum_j a_{t,j} da_{t,j}),
//   dq_t = sum_i ds_{t,i} k_i / sqrt(d),  dk_i = sum_t ds_{t,i} q_t / sqrt(d),  dv_i = sum_t a_{t,i} g_t.
template <class T>
void softmax_attention_backward_reference(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                          ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk,
                                          MatrixRef<T> dv_) {
  const char* where = "softmax_attention_backward_reference";
  detail::check_softmax_attention_inputs<T>(where, q, k, v);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_shape(where, "dout", dout, n, dv);
  detail::check_shape(where, "dq", dq, n, d);
  detail::check_shape(where, "dk", dk, n, d);
  detail::check_shape(where, "dv", dv_, n, dv);
  const T scale = T(1) / std::sqrt(T(d));
  const RowMatrix<T> a = detail::softmax_attention_probabilities_reference<T>(q, k, nullptr);
  const RowMatrix<T> da = dout * v.transpose();  // da_{t,i} = g_t . v_i
  RowMatrix<T> ds = RowMatrix<T>::Zero(n, n);
  for (long t = 0; t < n; ++t) {
    T sum = 0;
    for (long j = 0; j <= t; ++j) sum += a(t, j) * da(t, j);
    for (long i = 0; i <= t; ++i) ds(t, i) = a(t, i) * (da(t, i) - sum);
  }
  dq.noalias() = scale * (ds * k);
  dk.noalias() = scale * (ds.transpose() * q);
  dv_.noalias() = a.transpose() * dout;
}

// Non-template overload of the backward reference (callers need not name the scalar).
#define MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOAD(S)                                                        \
  inline void softmax_attention_backward_reference(ConstMatrixRef<S> q, ConstMatrixRef<S> k,                   \
                                                   ConstMatrixRef<S> v, ConstMatrixRef<S> dout,                \
                                                   MatrixRef<S> dq, MatrixRef<S> dk, MatrixRef<S> dv_) {       \
    softmax_attention_backward_reference<S>(q, k, v, dout, dq, dk, dv_);                                       \
  }
MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOAD(float)
MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOAD(double)
#undef MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOAD

}  // namespace mesaopt
