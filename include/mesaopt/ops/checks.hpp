#pragma once
// Argument checks shared by the three ops and their references, so that every
// entry point rejects bad shapes with the same message naming the argument.
// Naming across ops: seq_len is the sequence length (rows of q), d the key
// width, dv the value width; q, k (seq_len, d), v (seq_len, dv), out and dout
// (seq_len, dv); the gradients are dq, dk (seq_len, d) and grad_v (seq_len, dv).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

namespace mesaopt::detail {

// q, k (seq_len, d) and v (seq_len, dv) with seq_len, d, dv >= 1.
template <class T>
void check_sequence_inputs(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                           const ConstMatrixRef<T>& v) {
  check_positive_size(where, "seq_len (rows of q)", q.rows());
  check_positive_size(where, "d (columns of q)", q.cols());
  check_positive_size(where, "dv (columns of v)", v.cols());
  check_shape(where, "k", k, q.rows(), q.cols());
  check_shape(where, "v", v, q.rows(), v.cols());
}

// out (seq_len, dv) for inputs q (seq_len, d), v (seq_len, dv).
template <class T>
void check_output(const char* where, const char* what, const MatrixRef<T>& out, long seq_len, long dv) {
  check_shape(where, what, out, seq_len, dv);
}

// dout (seq_len, dv), dq and dk (seq_len, d), grad_v (seq_len, dv).
template <class T>
void check_gradient_shapes(const char* where, long seq_len, long d, long dv, const ConstMatrixRef<T>& dout,
                           const MatrixRef<T>& dq, const MatrixRef<T>& dk, const MatrixRef<T>& grad_v) {
  check_shape(where, "dout", dout, seq_len, dv);
  check_shape(where, "dq", dq, seq_len, d);
  check_shape(where, "dk", dk, seq_len, d);
  check_shape(where, "grad_v", grad_v, seq_len, dv);
}

// One token: q, k of size d and v of size dv, out of size dv (vectors or 1-row matrices).
template <class Q, class K, class V, class O>
void check_token_inputs(const char* where, const Q& q, const K& k, const V& v, const O& out, long d, long dv) {
  if (q.size() != d) fail(where, "q has ", q.size(), " entries but the state has d = ", d);
  if (k.size() != d) fail(where, "k has ", k.size(), " entries but the state has d = ", d);
  if (v.size() != dv) fail(where, "v has ", v.size(), " entries but the state has dv = ", dv);
  if (out.size() != dv) fail(where, "out has ", out.size(), " entries but the state has dv = ", dv);
}

// Pointer to row t of a row-major view (inner stride 1, any outer stride).
template <class M>
auto row_ptr(M& m, long t) {
  return m.data() + t * m.outerStride();
}

}  // namespace mesaopt::detail
