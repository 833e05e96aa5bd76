#pragma once
// Matrix types used across mesaopt. Sequences are stored row-major, one token
// per row (docs/math.md, notation), so a token is a contiguous span of memory.
#include <Eigen/Core>

#include <type_traits>

namespace mesaopt {

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// A non-deduced context: in `f(Ref<const RowMatrix<identity_t<T>>>)` the scalar
// is fixed by other arguments, so callers may pass any matrix expression.
template <class T>
struct type_identity {
  using type = T;
};
template <class T>
using identity_t = typename type_identity<T>::type;

// Read-only and writable views of a row-major matrix with contiguous rows.
template <class T>
using ConstMatrixRef = Eigen::Ref<const RowMatrix<identity_t<T>>>;
template <class T>
using MatrixRef = Eigen::Ref<RowMatrix<identity_t<T>>>;

// Read-only and writable views of a contiguous vector: a Vector, or one row of
// a RowMatrix (e.g. the token x.row(t)).
template <class T>
using ConstVectorRef = Eigen::Ref<const Vector<identity_t<T>>>;
template <class T>
using VectorRef = Eigen::Ref<Vector<identity_t<T>>>;

namespace detail {

// W^T, row-major, in a buffer owned by the calling thread: what a product
// X W^T needs to run as kernels::gemm(X, W^T) on row-major operands. The
// buffer is reused by this thread's next call, so the pointer is valid until
// then. A lambda that runs on other threads must take this pointer, not call
// the function itself: there it would get (and fill) its own thread's buffer.
template <class T>
const T* transposed_in_thread_buffer(const RowMatrix<T>& w) {
  static thread_local RowMatrix<T> buffer;
  buffer = w.transpose();
  return buffer.data();
}

}  // namespace detail
}  // namespace mesaopt
