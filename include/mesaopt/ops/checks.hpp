#pragma once
// Argument checks shared by the three ops and their references, so that every
// entry point rejects bad shapes with the same message naming the argument.
// Naming across ops: seq_len is the sequence length (rows of q), d the key
// width, dv the value width; q, k (seq_len, d), v (seq_len, dv), out and dout
// (seq_len, dv); the gradients are dq, dk (seq_len, d) and grad_v (seq_len, dv).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <cstddef>
#include <cstdint>
#include <utility>

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

// Whether two dense views share an element. A view is normalised to rows of
// contiguous elements (base, rows, cols, stride between rows); two views with
// the same row stride overlap exactly when their address ranges meet and their
// column windows meet modulo the stride, so column blocks of one matrix (q and
// out side by side in a buffer) are told apart. Other layouts fall back to the
// address ranges alone (may reject a disjoint interleaving, never accept an
// overlap).
struct MemoryView {
  std::uintptr_t base = 0;  // address of the first element
  long rows = 0, cols = 0;  // rows of `cols` contiguous elements
  long stride = 0;          // elements between row starts
  std::size_t elem = 1;     // bytes per element
  std::uintptr_t end() const {  // one past the last byte
    return base + (static_cast<std::uintptr_t>(rows - 1) * static_cast<std::uintptr_t>(stride) +
                   static_cast<std::uintptr_t>(cols)) * elem;
  }
};

template <class M>
MemoryView memory_view(const M& m) {
  MemoryView view;
  view.elem = sizeof(typename M::Scalar);
  view.base = reinterpret_cast<std::uintptr_t>(m.data());
  const long rows = m.rows(), cols = m.cols(), rs = m.rowStride(), cs = m.colStride();
  if (rows <= 0 || cols <= 0) return view;  // empty: overlaps nothing
  if (cs == 1 || cols == 1) {               // rows of contiguous elements
    view.rows = rows, view.cols = cols, view.stride = rows > 1 ? rs : cols;
  } else if (rs == 1 || rows == 1) {        // column-major: contiguous columns, read transposed
    view.rows = cols, view.cols = rows, view.stride = cols > 1 ? cs : rows;
  } else {                                  // scattered: the whole address range as one row
    view.rows = 1, view.cols = (rows - 1) * rs + (cols - 1) * cs + 1, view.stride = view.cols;
  }
  return view;
}

inline bool views_overlap(const MemoryView& a, const MemoryView& b) {
  if (a.rows <= 0 || a.cols <= 0 || b.rows <= 0 || b.cols <= 0) return false;
  if (a.end() <= b.base || b.end() <= a.base) return false;  // address ranges apart
  if (a.rows == 1 || b.rows == 1 || a.stride != b.stride || a.elem != b.elem) return true;
  const std::uintptr_t bytes = b.base > a.base ? b.base - a.base : a.base - b.base;
  if (bytes % a.elem != 0) return true;
  const long s = a.stride;
  // Offset of b's first column within a's row period (and the reverse).
  const long delta = static_cast<long>(bytes / a.elem) % s;
  const long ob = b.base >= a.base ? delta : (s - delta) % s;  // b's window start, relative to a's row starts
  // a occupies [0, a.cols) of each period, b occupies [ob, ob + b.cols) (mod s).
  return ob < a.cols || ob + b.cols > s;
}

// Throws std::invalid_argument when an output shares memory with an input or
// another output: the ops read their inputs after writing outputs, so an
// aliased output would silently give wrong results.
template <class Out, class In>
void check_distinct(const char* where, const char* out_name, const Out& out, const char* in_name, const In& in) {
  if (views_overlap(memory_view(out), memory_view(in)))
    fail(where, out_name, " shares memory with ", in_name, "; outputs must not alias inputs or other outputs");
}

// out must not alias q, k or v.
template <class T>
void check_output_distinct(const char* where, const MatrixRef<T>& out, const ConstMatrixRef<T>& q,
                           const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v) {
  check_distinct(where, "out", out, "q", q);
  check_distinct(where, "out", out, "k", k);
  check_distinct(where, "out", out, "v", v);
}

// dq, dk, grad_v must not alias q, k, v, dout or each other.
template <class T>
void check_gradients_distinct(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                              const ConstMatrixRef<T>& v, const ConstMatrixRef<T>& dout, const MatrixRef<T>& dq,
                              const MatrixRef<T>& dk, const MatrixRef<T>& grad_v) {
  const std::pair<const char*, const MatrixRef<T>*> outs[] = {{"dq", &dq}, {"dk", &dk}, {"grad_v", &grad_v}};
  const std::pair<const char*, const ConstMatrixRef<T>*> ins[] = {{"q", &q}, {"k", &k}, {"v", &v}, {"dout", &dout}};
  for (const auto& o : outs)
    for (const auto& i : ins) check_distinct(where, o.first, *o.second, i.first, *i.second);
  check_distinct(where, "dq", dq, "dk", dk);
  check_distinct(where, "dq", dq, "grad_v", grad_v);
  check_distinct(where, "dk", dk, "grad_v", grad_v);
}

// One token: out must not alias q, k or v.
template <class Q, class K, class V, class O>
void check_token_output_distinct(const char* where, const Q& q, const K& k, const V& v, const O& out) {
  check_distinct(where, "out", out, "q", q);
  check_distinct(where, "out", out, "k", k);
  check_distinct(where, "out", out, "v", v);
}

// Pointer to row t of a row-major view (inner stride 1, any outer stride).
template <class M>
auto row_ptr(M& m, long t) {
  return m.data() + t * m.outerStride();
}

// Distance between consecutive rows, in elements, for the kernels' ld arguments.
template <class M>
std::size_t row_stride(const M& m) {
  return std::size_t(m.outerStride());
}

}  // namespace mesaopt::detail
