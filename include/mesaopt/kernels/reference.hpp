#pragma once
// Plain scalar references for every SIMD kernel. They are the definition the
// fast kernels are tested against (tests/test_kernels.cpp) and the fallback
// when xsimd has no usable architecture. Straight loops, no tricks.
#include <cmath>
#include <cstddef>

namespace mesaopt::kernels {

// The constants of one Adam update (kernels/adam_update.hpp; the equations
// in train/adam.hpp).
struct AdamCoefficients {
  double beta1 = 0.9, beta2 = 0.999;  // moment decays
  double bias1 = 1, bias2 = 1;        // 1 - beta1^t, 1 - beta2^t at the 1-based step t
  double eps = 1e-8;
  double weight_decay = 0;
  double lr = 0;
  bool decoupled = true;  // AdamW's decay (true) or decay added to the gradient (false)
};

}  // namespace mesaopt::kernels

namespace mesaopt::kernels::reference {

// sum_i x_i y_i
template <class T>
T dot(const T* x, const T* y, std::size_t n) {
  T s = 0;
  for (std::size_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// y += alpha x
template <class T>
void axpy(std::size_t n, T alpha, const T* x, T* y) {
  for (std::size_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Every entry of the rows x cols row-major X (row stride ld) finite.
template <class T>
bool all_finite(std::size_t rows, std::size_t cols, const T* X, std::size_t ld) {
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t j = 0; j < cols; ++j)
      if (!std::isfinite(X[r * ld + j])) return false;
  return true;
}

// x y + z rounded once where the machine has a fused multiply-add (as the
// compiler contracts it there), twice where it has none: the rounding of
// kernels::adam_update's fma_exact in either case.
inline double fused(double x, double y, double z) {
#if defined(__FMA__) || defined(__AVX512F__)
  return std::fma(x, y, z);
#else
  return x * y + z;
#endif
}

// One Adam update (train/adam.hpp's equations), in double. The multiply-adds
// are the ones GCC fused in train::Adam's loop before it became a kernel, so
// training keeps its bits.
template <class T>
void adam_update(std::size_t n, T* value, const T* grad, T* m, T* v, const AdamCoefficients& c) {
  for (std::size_t i = 0; i < n; ++i) {
    const double theta = static_cast<double>(value[i]);
    double g = static_cast<double>(grad[i]);
    if (!c.decoupled) g = fused(c.weight_decay, theta, g);
    const double mi = fused(c.beta1, static_cast<double>(m[i]), (1.0 - c.beta1) * g);
    const double vi = fused(c.beta2, static_cast<double>(v[i]), ((1.0 - c.beta2) * g) * g);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    double step = (mi / c.bias1) / (std::sqrt(vi / c.bias2) + c.eps);
    if (c.decoupled) step = fused(c.weight_decay, theta, step);
    value[i] = static_cast<T>(fused(-c.lr, step, theta));
  }
}

// A += c x y^T, A is m x n row-major with row stride lda.
template <class T>
void ger(std::size_t m, std::size_t n, T c, const T* x, const T* y, T* A, std::size_t lda) {
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) A[i * lda + j] += c * x[i] * y[j];
}

// A -= c u u^T, A is n x n row-major with row stride lda.
template <class T>
void syr_sub(std::size_t n, T c, const T* u, T* A, std::size_t lda) {
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) A[i * lda + j] -= c * u[i] * u[j];
}

// y = A x, A is m x n row-major with row stride lda.
template <class T>
void gemv(std::size_t m, std::size_t n, const T* A, std::size_t lda, const T* x, T* y) {
  for (std::size_t i = 0; i < m; ++i) y[i] = dot(A + i * lda, x, n);
}

// C (n x m) = A B, or C += A B when accumulate; A's entry (i, p) at
// A[i * ars + p * aks] (A itself: ars = lda, aks = 1; the transpose of a
// stored k x n matrix: ars = 1, aks = lda), B: k x m with row stride ldb.
template <class T>
void gemm(std::size_t n, std::size_t m, std::size_t k, const T* A, std::size_t ars, std::size_t aks, const T* B,
          std::size_t ldb, T* C, std::size_t ldc, bool accumulate) {
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < m; ++j) {
      T s = 0;
      for (std::size_t p = 0; p < k; ++p) s += A[i * ars + p * aks] * B[p * ldb + j];
      C[i * ldc + j] = accumulate ? C[i * ldc + j] + s : s;
    }
}

// docs/math.md (M7, M9, M10), fused:  R <- scale R - w w^T;  a = R q;  b = R k_next;  y = R x.
// R is d x d row-major (row stride ldr); k_next/b may be null (last token), x/y
// may be null (only the mesa backward asks for y = R da).
template <class T>
void sherman_morrison_update(std::size_t d, T* R, std::size_t ldr, const T* w, T scale, const T* q,
                             const T* k_next, T* a, T* b, const T* x = nullptr, T* y = nullptr) {
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < d; ++j) R[i * ldr + j] = scale * R[i * ldr + j] - w[i] * w[j];
  gemv(d, d, R, ldr, q, a);
  if (k_next != nullptr) gemv(d, d, R, ldr, k_next, b);
  if (x != nullptr) gemv(d, d, R, ldr, x, y);
}

// docs/math.md (M1-M2, M8-M9) with S stored transposed (St = S^T, d x dv):
// St <- scale St + k v^T;  o = St^T a  (= S a).
template <class T>
void state_update_apply(std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k,
                        const T* v, const T* a, T* o) {
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < dv; ++j) St[i * lds + j] = scale * St[i * lds + j] + k[i] * v[j];
  for (std::size_t j = 0; j < dv; ++j) {
    T s = 0;
    for (std::size_t i = 0; i < d; ++i) s += St[i * lds + j] * a[i];
    o[j] = s;
  }
}

// docs/math.md (M1-M2, M8-M9) over a whole sequence: one state_update_apply
// per token, t = 0 .. n-1, or n-1 .. 0 when reverse (kernels/state_sweep.hpp).
template <class T>
void state_sweep(std::size_t n, std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k,
                 std::size_t ldk, const T* v, std::size_t ldv, const T* a, std::size_t lda, T* o, std::size_t ldo,
                 bool reverse) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t t = reverse ? n - 1 - i : i;
    state_update_apply(d, dv, St, lds, scale, k + t * ldk, v + t * ldv, a + t * lda, o + t * ldo);
  }
}

// docs/math.md (M10): the state update of the mesa backward pass with the other
// product: St <- scale St + k v^T;  da = St g  (da_i = sum_j St_ij g_j).
// (Row by row, each row dotted right after its update: the loop the mesa op
// used before the SIMD kernel existed, kept so that the scalar build's
// results do not change.)
template <class T>
void state_update_dot(std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k, const T* v,
                      const T* g, T* da) {
  for (std::size_t i = 0; i < d; ++i) {
    T* row = St + i * lds;
    T s = 0;
    for (std::size_t j = 0; j < dv; ++j) {
      row[j] = scale * row[j] + k[i] * v[j];
      s += row[j] * g[j];
    }
    da[i] = s;
  }
}

// docs/math.md (M11): the symmetric accumulator of the mesa backward pass,
// M <- scale M + x y^T + y x^T (d x d, row stride ldm);  out = M k, summed as
// out_j = sum_i k_i M_ij (the same for symmetric M, and what the kernel
// computes), row i added right after its update (the mesa op's former loop).
template <class T>
void rank2_update_apply(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k,
                        T* out) {
  for (std::size_t j = 0; j < d; ++j) out[j] = 0;
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < d; ++j) {
      T& m = M[i * ldm + j];
      m = scale * m + x[i] * y[j] + y[i] * x[j];
      out[j] += k[i] * m;
    }
}

// docs/math.md (M11) over a whole sequence: one rank2_update_apply per token,
// t = 0 .. n-1, or n-1 .. 0 when reverse (kernels/state_sweep.hpp).
template <class T>
void rank2_sweep(std::size_t n, std::size_t d, T* M, std::size_t ldm, T scale, const T* x, std::size_t ldx,
                 const T* y, std::size_t ldy, const T* k, std::size_t ldk, T* o, std::size_t ldo, bool reverse) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t t = reverse ? n - 1 - i : i;
    rank2_update_apply(d, M, ldm, scale, x + t * ldx, y + t * ldy, k + t * ldk, o + t * ldo);
  }
}

}  // namespace mesaopt::kernels::reference
