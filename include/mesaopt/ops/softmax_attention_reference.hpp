#pragma once
// Plain reference for causal softmax attention (docs/math.md §2 M4, §6 M19):
// materialises the logits and probabilities over [prefix keys; keys] (O(seq_len
// (P + seq_len)) memory; for tests and benchmarks) and differentiates M4
// literally, with sum_j a_{t,j} da_{t,j} summed over the row rather than taken
// from g_t . o_t as the tiled kernel does.
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/state.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mesaopt::detail {

// [initial rows; rows], or rows alone.
template <class T, class Prefix>
RowMatrix<T> reference_with_prefix(const ConstMatrixRef<T>& rows, const SoftmaxKVCache<identity_t<T>>* initial, Prefix prefix) {
  const long P = initial != nullptr ? initial->length() : 0;
  RowMatrix<T> all(P + rows.rows(), rows.cols());
  if (P > 0) all.topRows(P) = prefix(*initial);
  all.bottomRows(rows.rows()) = rows;
  return all;
}

// a (n, P + n): a_{t,i} for i <= P + t, 0 after; max-subtracted.
template <class T>
RowMatrix<T> reference_probabilities(const ConstMatrixRef<T>& q, const RowMatrix<T>& K, long P) {
  const long n = q.rows(), nk = K.rows();
  const T scale = T(1) / std::sqrt(T(q.cols()));
  RowMatrix<T> a = RowMatrix<T>::Zero(n, nk);
  for (long t = 0; t < n; ++t) {
    T mx = -std::numeric_limits<T>::infinity();
    for (long i = 0; i <= P + t; ++i) {
      T s = 0;
      for (long c = 0; c < q.cols(); ++c) s += q(t, c) * K(i, c);
      a(t, i) = s * scale;  // s_{t,i}
      mx = std::max(mx, a(t, i));
    }
    T sum = 0;
    for (long i = 0; i <= P + t; ++i) {
      a(t, i) = std::exp(a(t, i) - mx);
      sum += a(t, i);
    }
    for (long i = 0; i <= P + t; ++i) a(t, i) /= sum;
  }
  return a;
}

}  // namespace mesaopt::detail

namespace mesaopt::reference {

// o_t = sum_{i <= P+t} a_{t,i} v_i over the initial cache's P tokens and the
// sequence's (M4, M19). q, k are (seq_len, d); v, out are (seq_len, dv).
template <class T>
void softmax_attention_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, MatrixRef<T> out,
                               const SoftmaxKVCache<identity_t<T>>* initial = nullptr) {
  const char* where = "reference::softmax_attention_forward";
  detail::check_sequence_inputs<T>(where, q, k, v);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  if (initial != nullptr) detail::check_kv_cache(where, "initial", *initial, q.cols(), v.cols());
  const long P = initial != nullptr ? initial->length() : 0;
  const RowMatrix<T> K = detail::reference_with_prefix<T>(k, initial, [](const auto& c) { return c.keys(); });
  const RowMatrix<T> V = detail::reference_with_prefix<T>(v, initial, [](const auto& c) { return c.values(); });
  out.noalias() = detail::reference_probabilities<T>(q, K, P) * V;
}

// M4 backward, literally: da_{t,i} = g_t . v_i,
//   ds_{t,i} = a_{t,i} (da_{t,i} - sum_j a_{t,j} da_{t,j}),
//   dq_t = sum_i ds_{t,i} k_i / sqrt(d),  dk_i = sum_t ds_{t,i} q_t / sqrt(d),  dv_i = sum_t a_{t,i} g_t,
// over all P + seq_len keys; rows of the prefix go to grad_initial, and
// grad_final (P + seq_len tokens, optional) is added to the matching rows.
// dq, dk, grad_v are overwritten.
template <class T>
void softmax_attention_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> grad_v,
                                const SoftmaxKVCache<identity_t<T>>* initial = nullptr,
                                const SoftmaxKVCache<identity_t<T>>* grad_final = nullptr,
                                SoftmaxKVCache<identity_t<T>>* grad_initial = nullptr) {
  const char* where = "reference::softmax_attention_backward";
  detail::check_sequence_inputs<T>(where, q, k, v);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_gradient_shapes<T>(where, n, d, dv, dout, dq, dk, grad_v);
  detail::check_gradients_distinct<T>(where, q, k, v, dout, dq, dk, grad_v);
  if (initial != nullptr) detail::check_kv_cache(where, "initial", *initial, d, dv);
  const long P = initial != nullptr ? initial->length() : 0;
  if (grad_final != nullptr) {
    detail::check_kv_cache(where, "grad_final", *grad_final, d, dv);
    detail::check_size(where, "grad_final.length()", grad_final->length(), P + n,
                                "initial length + seq_len");
  }
  const T scale = T(1) / std::sqrt(T(d));
  const RowMatrix<T> K = detail::reference_with_prefix<T>(k, initial, [](const auto& c) { return c.keys(); });
  const RowMatrix<T> V = detail::reference_with_prefix<T>(v, initial, [](const auto& c) { return c.values(); });
  const RowMatrix<T> a = detail::reference_probabilities<T>(q, K, P);
  const RowMatrix<T> da = dout * V.transpose();  // da_{t,i} = g_t . v_i
  RowMatrix<T> ds = RowMatrix<T>::Zero(n, P + n);
  for (long t = 0; t < n; ++t) {
    T sum = 0;
    for (long j = 0; j <= P + t; ++j) sum += a(t, j) * da(t, j);
    for (long i = 0; i <= P + t; ++i) ds(t, i) = a(t, i) * (da(t, i) - sum);
  }
  dq.noalias() = scale * (ds * K);
  RowMatrix<T> dK = scale * (ds.transpose() * q);
  RowMatrix<T> dV = a.transpose() * dout;
  if (grad_final != nullptr) {
    dK += grad_final->keys();
    dV += grad_final->values();
  }
  dk = dK.bottomRows(n);
  grad_v = dV.bottomRows(n);
  if (grad_initial != nullptr) {
    *grad_initial = SoftmaxKVCache<T>(d, dv);
    grad_initial->append(dK.topRows(P), dV.topRows(P));
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
#define MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOADS(S)                                                       \
  template <int = 0> inline void softmax_attention_forward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,         \
                                        MatrixRef<S> out, const SoftmaxKVCache<S>* initial = nullptr) {        \
    reference::softmax_attention_forward<S>(q, k, v, out, initial);                                                     \
  }                                                                                                            \
  template <int = 0> inline void softmax_attention_backward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,        \
                                         ConstMatrixRef<S> dout, MatrixRef<S> dq, MatrixRef<S> dk,             \
                                         MatrixRef<S> grad_v, const SoftmaxKVCache<S>* initial = nullptr,      \
                                         const SoftmaxKVCache<S>* grad_final = nullptr,                        \
                                         SoftmaxKVCache<S>* grad_initial = nullptr) {                          \
    reference::softmax_attention_backward<S>(q, k, v, dout, dq, dk, grad_v, initial, grad_final, grad_initial);\
  }
MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOADS(float)
MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOADS(double)
#undef MESAOPT_SOFTMAX_ATTENTION_REFERENCE_OVERLOADS

}  // namespace mesaopt::reference
