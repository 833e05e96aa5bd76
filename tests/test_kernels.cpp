// The SIMD kernels (include/mesaopt/kernels/) against their scalar references
// (kernels/reference.hpp) on random inputs, float and double:
//   - every size 1..130 (all tails of every SIMD width and block size) plus a
//     few large ones, on pointers offset by one element (unaligned) and on
//     exact-size heap buffers (so AddressSanitizer sees any read past the end);
//   - matrices with row stride ld > d;
//   - guard regions: sentinel values before and after every output buffer and
//     in the padding columns of every matrix, checked after each call, so any
//     out-of-bounds write fails a test;
//   - sherman_morrison_update keeps R bitwise symmetric over many steps (docs/math.md §3);
//     rank2_update_apply keeps M symmetric to within rounding (not bitwise);
//   - read-only inputs are left unchanged;
//   - the mesa recursion built from the kernels equals a direct ridge solve (M5-M6).
//
// Tolerances. For a sum s = sum_i p_i of n products evaluated in any order,
// with or without FMA, the classic bound is |fl(s) - s| <= gamma_n sum_i |p_i|,
// gamma_n = n u / (1 - n u), u = eps / 2. Fast kernel and reference each obey
// it, so |fast - ref| <= 2 gamma_n sum_i |p_i| ~ n eps sum_i |p_i|. We allow
// 2 (n + 2) eps sum_i |p_i|: a safe margin over the bound (the "+2" covers the
// rounding of the fused element update before the sum), yet any indexing or
// tail bug produces an error of the order of sum_i |p_i| itself, 10^2..10^6
// times larger, so the tests can fail. Element-wise updates (axpy, ger, ...)
// differ by at most two roundings: 2 eps (|a| + |b c|) per entry.
#include <catch2/catch.hpp>
#include <mesaopt/kernels.hpp>

#include "test_util.hpp"

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_kernels {

namespace {

namespace k = mesaopt::kernels;
namespace ref = mesaopt::kernels::reference;

// A value no kernel produces from the inputs used here.
template <class T>
constexpr T kSentinel = T(-777.125);

// Every size 1..130 and a few large ones.
std::vector<std::size_t> vector_sizes() {
  std::vector<std::size_t> s;
  for (std::size_t n = 1; n <= 130; ++n) s.push_back(n);
  for (std::size_t n : {257, 1000, 4099}) s.push_back(n);
  return s;
}
std::vector<std::size_t> matrix_sizes() {
  std::vector<std::size_t> s;
  for (std::size_t n = 1; n <= 130; ++n) s.push_back(n);
  for (std::size_t n : {255, 300}) s.push_back(n);
  return s;
}

template <class T>
std::vector<T> random_values(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

// A rows x cols matrix with row stride ld >= cols inside a larger buffer:
// `guard` sentinels before and after, sentinels in the padding columns
// [cols, ld) of every row, and the data pointer `offset` elements past the
// guard (offset 1 = not aligned to any SIMD width). A vector is rows = 1.
template <class T>
struct Guarded {
  static constexpr std::size_t kGuard = 17;
  std::size_t rows, cols, ld, offset;
  std::vector<T> storage;

  Guarded(std::size_t rows_, std::size_t cols_, std::size_t ld_, std::size_t offset_)
      : rows(rows_), cols(cols_), ld(ld_), offset(offset_), storage(kGuard + offset_ + rows_ * ld_ + kGuard, kSentinel<T>) {}

  T* data() { return storage.data() + kGuard + offset; }
  T& at(std::size_t r, std::size_t c) { return data()[r * ld + c]; }

  // Fills the live entries from `values` (row-major, rows x cols).
  void set(const std::vector<T>& values) {
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t c = 0; c < cols; ++c) at(r, c) = values[r * cols + c];
  }
  std::vector<T> get() {
    std::vector<T> v(rows * cols);
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t c = 0; c < cols; ++c) v[r * cols + c] = at(r, c);
    return v;
  }

  // Number of entries outside the live region that are no longer the sentinel.
  std::size_t guard_violations() const {
    const std::size_t begin = kGuard + offset;
    std::size_t bad = 0;
    for (std::size_t i = 0; i < storage.size(); ++i) {
      bool live = false;
      if (i >= begin && i < begin + rows * ld) live = (i - begin) % ld < cols;
      if (!live && std::memcmp(&storage[i], &kSentinel<T>, sizeof(T)) != 0) ++bad;
    }
    return bad;
  }
};

template <class T>
Guarded<T> guarded_vector(const std::vector<T>& values, std::size_t offset) {
  Guarded<T> g(1, values.size(), values.size(), offset);
  g.set(values);
  return g;
}

template <class T>
Guarded<T> guarded_matrix(std::size_t rows, std::size_t cols, std::size_t ld, std::size_t offset,
                          const std::vector<T>& values) {
  Guarded<T> g(rows, cols, ld, offset);
  g.set(values);
  return g;
}

template <class T>
constexpr double eps() {
  return std::numeric_limits<T>::epsilon();
}

// max_i |a_i - b_i| / tol_i; <= 1 means every entry is within its tolerance.
template <class T>
double worst_ratio(const std::vector<T>& a, const std::vector<T>& b, const std::vector<double>& tol) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double diff = std::abs(double(a[i]) - double(b[i]));
    // NaN (e.g. a sentinel read into a result) must fail too.
    if (!(diff <= tol[i] * 1e30)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, diff / std::max(tol[i], std::numeric_limits<double>::min()));
  }
  return worst;
}

bool bitwise_equal(const void* a, const void* b, std::size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

}  // namespace

// ---- level 1 -------------------------------------------------------------------

TEMPLATE_TEST_CASE("dot matches the scalar reference at every size", "[kernels][dot]", float, double) {
  using T = TestType;
  for (std::size_t n : vector_sizes()) {
    const auto x = random_values<T>(n, 100 + n), y = random_values<T>(n, 200 + n);
    double magnitude = 0;  // sum_i |x_i y_i|
    for (std::size_t i = 0; i < n; ++i) magnitude += std::abs(double(x[i]) * double(y[i]));
    const double tol = 2.0 * (n + 2) * eps<T>() * magnitude;
    const double expected = ref::dot(x.data(), y.data(), n);
    INFO("n = " << n);
    // Exact-size heap buffers: a read past the end is an ASan error.
    CHECK(std::abs(double(k::dot(x.data(), y.data(), n)) - expected) <= tol);
    for (std::size_t offset : {0, 1}) {
      auto gx = guarded_vector(x, offset), gy = guarded_vector(y, offset + 1);
      INFO("offsets " << offset << ", " << offset + 1);
      CHECK(std::abs(double(k::dot(gx.data(), gy.data(), n)) - expected) <= tol);
    }
  }
}

TEMPLATE_TEST_CASE("axpy matches the scalar reference and writes only y", "[kernels][axpy]", float, double) {
  using T = TestType;
  const T alpha = T(-0.7);
  for (std::size_t n : vector_sizes()) {
    const auto x = random_values<T>(n, 300 + n), y0 = random_values<T>(n, 400 + n);
    std::vector<T> expected(y0);
    ref::axpy(n, alpha, x.data(), expected.data());
    std::vector<double> tol(n);
    for (std::size_t i = 0; i < n; ++i) tol[i] = 2 * eps<T>() * (std::abs(double(y0[i])) + std::abs(alpha * double(x[i])));
    INFO("n = " << n);
    std::vector<T> y(y0);
    k::axpy(n, alpha, x.data(), y.data());
    CHECK(worst_ratio(y, expected, tol) <= 1.0);
    for (std::size_t offset : {0, 1}) {
      auto gx = guarded_vector(x, offset), gy = guarded_vector(y0, 1);
      k::axpy(n, alpha, gx.data(), gy.data());
      CHECK(worst_ratio(gy.get(), expected, tol) <= 1.0);
      CHECK(gy.guard_violations() == 0);
      CHECK(gx.guard_violations() == 0);
      CHECK(gx.get() == x);  // x is read-only
    }
  }
}

// ---- level 2 -------------------------------------------------------------------

TEMPLATE_TEST_CASE("ger and syr_sub match the reference with ld > n and guards", "[kernels][rank1]", float, double) {
  using T = TestType;
  const T c = T(0.37);
  for (std::size_t d : matrix_sizes()) {
    const std::size_t m = d % 7 + 1;  // ger: a non-square m x d as well
    const std::size_t ld = d + 3;
    const std::size_t max_rows = std::max(m, d);
    const auto x = random_values<T>(max_rows, 500 + d), y = random_values<T>(d, 600 + d);
    const auto A0 = random_values<T>(max_rows * d, 700 + d);
    INFO("d = " << d << ", m = " << m << ", ld = " << ld);

    for (std::size_t rows : {m, d}) {
      std::vector<T> expected(A0.begin(), A0.begin() + rows * d);
      ref::ger(rows, d, c, x.data(), y.data(), expected.data(), d);
      std::vector<double> tol(rows * d);
      for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < d; ++j)
          tol[i * d + j] = 2 * eps<T>() * (std::abs(double(A0[i * d + j])) + std::abs(c * double(x[i]) * double(y[j])));
      auto A = guarded_matrix(rows, d, ld, 1, std::vector<T>(A0.begin(), A0.begin() + rows * d));
      auto gx = guarded_vector(std::vector<T>(x.begin(), x.begin() + rows), 1), gy = guarded_vector(y, 0);
      k::ger(rows, d, c, gx.data(), gy.data(), A.data(), ld);
      CHECK(worst_ratio(A.get(), expected, tol) <= 1.0);
      CHECK(A.guard_violations() == 0);
    }

    std::vector<T> expected(A0.begin(), A0.begin() + d * d);
    ref::syr_sub(d, c, x.data(), expected.data(), d);
    std::vector<double> tol(d * d);
    for (std::size_t i = 0; i < d; ++i)
      for (std::size_t j = 0; j < d; ++j)
        tol[i * d + j] = 2 * eps<T>() * (std::abs(double(A0[i * d + j])) + std::abs(c * double(x[i]) * double(x[j])));
    auto A = guarded_matrix(d, d, ld, 1, expected);
    A.set(std::vector<T>(A0.begin(), A0.begin() + d * d));
    auto gu = guarded_vector(std::vector<T>(x.begin(), x.begin() + d), 1);
    k::syr_sub(d, c, gu.data(), A.data(), ld);
    CHECK(worst_ratio(A.get(), expected, tol) <= 1.0);
    CHECK(A.guard_violations() == 0);
    CHECK(gu.guard_violations() == 0);
  }
}

TEMPLATE_TEST_CASE("gemv matches the reference for m x n with ld > n", "[kernels][gemv]", float, double) {
  using T = TestType;
  for (std::size_t n : matrix_sizes()) {
    // Square, and a few row counts that exercise the 4-row blocking and its remainder.
    for (std::size_t m : {n, n % 9 + 1}) {
      const std::size_t ld = n + 5;
      const auto A0 = random_values<T>(m * n, 800 + n + m), x = random_values<T>(n, 900 + n);
      std::vector<T> expected(m);
      ref::gemv(m, n, A0.data(), n, x.data(), expected.data());
      std::vector<double> tol(m, 0.0);
      for (std::size_t i = 0; i < m; ++i) {
        double magnitude = 0;
        for (std::size_t j = 0; j < n; ++j) magnitude += std::abs(double(A0[i * n + j]) * double(x[j]));
        tol[i] = 2.0 * (n + 2) * eps<T>() * magnitude;
      }
      INFO("m = " << m << ", n = " << n << ", ld = " << ld);
      // Exact-size buffers, ld = n (ASan sees over-reads).
      std::vector<T> y(m);
      k::gemv(m, n, A0.data(), n, x.data(), y.data());
      CHECK(worst_ratio(y, expected, tol) <= 1.0);
      // Unaligned, padded, guarded.
      auto A = guarded_matrix(m, n, ld, 1, A0);
      auto gx = guarded_vector(x, 1);
      auto gy = guarded_vector(std::vector<T>(m, T(0)), 1);
      k::gemv(m, n, A.data(), ld, gx.data(), gy.data());
      CHECK(worst_ratio(gy.get(), expected, tol) <= 1.0);
      CHECK(gy.guard_violations() == 0);
      CHECK(A.get() == A0);  // A is read-only
    }
  }
}

// ---- small matrix products (kernels/gemm.hpp) ---------------------------------------

namespace {

// C = A B (tn = false, A: n x k) or A^T B (tn = true, A: k x n) in double, and
// sum_p |A_ip B_pj| for the tolerance.
template <class T>
void gemm_in_double(bool tn, std::size_t n, std::size_t m, std::size_t kk, const std::vector<T>& A,
                    const std::vector<T>& B, std::vector<double>& C, std::vector<double>& magnitude) {
  C.assign(n * m, 0.0);
  magnitude.assign(n * m, 0.0);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < m; ++j)
      for (std::size_t p = 0; p < kk; ++p) {
        const double a = tn ? double(A[p * n + i]) : double(A[i * kk + p]), b = double(B[p * m + j]);
        C[i * m + j] += a * b;
        magnitude[i * m + j] += std::abs(a * b);
      }
}

// The rounding gemm.hpp promises: per entry one chain of FMAs from zero over
// p in order, then one addition to the old value.
template <class T>
std::vector<T> gemm_fma_chain(bool tn, std::size_t n, std::size_t m, std::size_t kk, const std::vector<T>& A,
                              const std::vector<T>& B, const std::vector<T>& C0, bool accumulate) {
  std::vector<T> C(n * m);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < m; ++j) {
      T s(0);
      for (std::size_t p = 0; p < kk; ++p) s = std::fma(tn ? A[p * n + i] : A[i * kk + p], B[p * m + j], s);
      C[i * m + j] = accumulate ? C0[i * m + j] + s : s;
    }
  return C;
}

template <class T>
void check_gemm(bool tn, std::size_t n, std::size_t m, std::size_t kk, bool accumulate) {
  const std::size_t a_rows = tn ? kk : n, a_cols = tn ? n : kk;
  const auto A0 = random_values<T>(a_rows * a_cols, 1000 + 7 * n + 131 * m + kk);
  const auto B0 = random_values<T>(kk * m, 2000 + 5 * n + 17 * m + kk);
  const auto C0 = random_values<T>(n * m, 3000 + n + m + 3 * kk);
  std::vector<double> exact, magnitude;
  gemm_in_double(tn, n, m, kk, A0, B0, exact, magnitude);
  std::vector<T> expected(n * m);
  std::vector<double> tol(n * m);
  for (std::size_t i = 0; i < n * m; ++i) {
    expected[i] = T(accumulate ? double(C0[i]) + exact[i] : exact[i]);
    tol[i] = 2.0 * (kk + 2) * eps<T>() * (magnitude[i] + (accumulate ? std::abs(double(C0[i])) : 0.0));
  }
  auto run = [&](const T* A, std::size_t lda, const T* B, std::size_t ldb, T* C, std::size_t ldc, std::size_t rows) {
    if (tn) k::gemm_tn(rows, m, kk, A, lda, B, ldb, C, ldc, accumulate);
    else k::gemm(rows, m, kk, A, lda, B, ldb, C, ldc, accumulate);
  };
  INFO((tn ? "gemm_tn" : "gemm") << ": n = " << n << ", m = " << m << ", k = " << kk << ", accumulate = " << accumulate);
  // Exact-size buffers (ASan sees over-reads and over-writes).
  std::vector<T> C = C0;
  run(A0.data(), a_cols, B0.data(), m, C.data(), m, n);
  CHECK(worst_ratio(C, expected, tol) <= 1.0);
#if MESAOPT_SIMD && (defined(__FMA__) || defined(__AVX512F__))
  // Bit for bit the chain of FMAs, whatever block or batch an entry fell in.
  CHECK(C == gemm_fma_chain(tn, n, m, kk, A0, B0, C0, accumulate));
#endif
  // Cut into row chunks of 1, 3 and the rest (as the layers cut a product for
  // threads): the same bits.
  std::vector<T> Cc = C0;
  for (std::size_t r0 = 0; r0 < n;) {
    const std::size_t rows = std::min(n - r0, r0 == 0 ? std::size_t(1) : r0 == 1 ? std::size_t(3) : n);
    // (k = 0: A0 is empty and its data() may be null, which takes no offset)
    const T* a_chunk = A0.empty() ? A0.data() : tn ? A0.data() + r0 : A0.data() + r0 * a_cols;
    run(a_chunk, a_cols, B0.data(), m, Cc.data() + r0 * m, m, rows);
    r0 += rows;
  }
  CHECK(Cc == C);
  // Unaligned, padded, guarded; inputs untouched.
  auto A = guarded_matrix(a_rows, a_cols, a_cols + 3, 1, A0);
  auto B = guarded_matrix(kk, m, m + 5, 1, B0);
  auto Cg = guarded_matrix(n, m, m + 2, 1, C0);
  run(A.data(), A.ld, B.data(), B.ld, Cg.data(), Cg.ld, n);
  CHECK(Cg.get() == C);
  CHECK(Cg.guard_violations() == 0);
  CHECK(A.get() == A0);
  CHECK(B.get() == B0);
}

}  // namespace

TEMPLATE_TEST_CASE("gemm and gemm_tn match the product in double, bit for bit one FMA chain per entry",
                   "[kernels][gemm]", float, double) {
  using T = TestType;
  std::vector<std::size_t> widths;
  for (std::size_t m = 1; m <= 70; ++m) widths.push_back(m);
  for (std::size_t m : {120, 127, 130}) widths.push_back(m);
  for (bool tn : {false, true})
    for (bool accumulate : {false, true})
      for (std::size_t m : widths)
        for (std::size_t n : {0, 1, 2, 5, 6, 7, 9, 13, 14, 15, 16, 17, 23})
          for (std::size_t kk : {0, 1, 7, 40}) check_gemm<T>(tn, n, m, kk, accumulate);
  // The projections' shapes in the paper's models: 400 tokens (one shard),
  // width 40, 2 heads of q, k, v (120 columns); the weight gradient's inner
  // dimension runs over the tokens.
  check_gemm<T>(false, 400, 120, 40, false);
  check_gemm<T>(false, 400, 40, 120, false);
  check_gemm<T>(true, 120, 40, 400, true);
}

TEMPLATE_TEST_CASE("gemm_entry has the bits of an entry of gemm's product", "[kernels][gemm]", float, double) {
  using T = TestType;
  for (std::size_t kk : {0, 1, 2, 7, 16, 20, 33, 64}) {
    // A 3 x kk times kk x m product; gemm_entry of A's row i and B's column j
    // (stride m) must equal C(i, j) wherever j falls (full, half-width,
    // overlapping or masked batch).
    for (std::size_t m : {1, 5, 8, 13, 16, 20, 40, 50}) {
      // (one spare entry each: at k = 0 the pointers must still point into a buffer)
      const auto A = random_values<T>(3 * kk + 1, 40 + kk + m), B = random_values<T>(kk * m + m, 50 + kk + 3 * m);
      std::vector<T> C(3 * m, T(1));
      k::gemm<T>(3, m, kk, A.data(), kk, B.data(), m, C.data(), m, false);
      INFO("k = " << kk << ", m = " << m);
      std::size_t mismatches = 0;
      for (std::size_t i = 0; i < 3; ++i)
        for (std::size_t j = 0; j < m; ++j) {
          const T e = k::gemm_entry<T>(kk, A.data() + i * kk, 1, B.data() + j, m);
          if (std::memcmp(&e, &C[i * m + j], sizeof(T)) != 0) ++mismatches;
        }
      CHECK(mismatches == 0);
    }
  }
}

TEMPLATE_TEST_CASE("all_finite finds every NaN and Inf and reads only the live entries", "[kernels][all_finite]", float,
                   double) {
  using T = TestType;
  const T bad[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                   -std::numeric_limits<T>::infinity()};
  for (std::size_t rows : {0, 1, 2, 5})
    for (std::size_t cols = 1; cols <= 70; ++cols) {
      INFO("rows = " << rows << ", cols = " << cols);
      auto X = guarded_matrix(rows, cols, cols + 3, 1, random_values<T>(rows * cols, 60 + cols + rows, -1e30, 1e30));
      // Non-finite values everywhere outside the live entries: never read.
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = cols; c < X.ld; ++c) X.at(r, c) = bad[(r + c) % 3];
      for (std::size_t g = 0; g < Guarded<T>::kGuard; ++g) X.storage[g] = X.storage[X.storage.size() - 1 - g] = bad[g % 3];
      CHECK(k::all_finite<T>(rows, cols, X.data(), X.ld));
      CHECK(ref::all_finite<T>(rows, cols, X.data(), X.ld));
      std::size_t missed = 0;
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < cols; ++c) {
          const T keep = X.at(r, c);
          X.at(r, c) = bad[(r * cols + c) % 3];
          if (k::all_finite<T>(rows, cols, X.data(), X.ld) || ref::all_finite<T>(rows, cols, X.data(), X.ld)) ++missed;
          X.at(r, c) = keep;
        }
      CHECK(missed == 0);
    }
}

// ---- Adam update (train/adam.hpp's equations) ---------------------------------------------

TEMPLATE_TEST_CASE("adam_update has the reference's bits at every n, tails included, and writes nothing past n",
                   "[kernels][adam]", float, double) {
  using T = TestType;
  // The kernel writes every multiply-add the reference fuses as one
  // instruction (fma_exact), so the two agree bit for bit.
  const T sentinel = T(12345.5);
  constexpr std::size_t kGuard = 17;
  for (std::size_t n : {0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 1000})
    for (bool decoupled : {true, false})
      for (long t : {1L, 2L, 50L}) {
        INFO("n = " << n << ", decoupled = " << decoupled << ", t = " << t);
        k::AdamCoefficients c;
        c.bias1 = 1.0 - std::pow(c.beta1, double(t));
        c.bias2 = 1.0 - std::pow(c.beta2, double(t));
        c.weight_decay = 0.1;
        c.lr = 1e-2;
        c.decoupled = decoupled;
        auto with_guard = [&](std::vector<T> x) {
          x.resize(n + kGuard, sentinel);
          return x;
        };
        const std::uint64_t seed = 1000 * n + 10 * std::uint64_t(t) + (decoupled ? 1 : 0);
        auto value = with_guard(random_values<T>(n, seed));
        auto grad = with_guard(random_values<T>(n, seed + 1, -1e-2, 1e-2));
        auto m = with_guard(random_values<T>(n, seed + 2, -1e-2, 1e-2));
        auto v = with_guard(random_values<T>(n, seed + 3, 0.0, 1e-4));
        // One entry with a zero gradient and zero moments: vhat = 0.
        if (n > 2) value[n / 2 + 1] = grad[n / 2 + 1] = m[n / 2 + 1] = v[n / 2 + 1] = T(0);
        const auto value_before = value, grad_before = grad;
        auto rvalue = value, rm = m, rv = v;
        k::adam_update<T>(n, value.data(), grad.data(), m.data(), v.data(), c);
        ref::adam_update<T>(n, rvalue.data(), grad.data(), rm.data(), rv.data(), c);
        std::size_t off = 0, still = 0;
        for (std::size_t i = 0; i < n; ++i) {
          if (value[i] != rvalue[i] || m[i] != rm[i] || v[i] != rv[i]) ++off;
          // Every entry with a gradient moves by about lr: a kernel that skips entries fails.
          if (grad[i] != T(0) && value[i] == value_before[i]) ++still;
        }
        CHECK(off == 0);
        CHECK(still == 0);
        for (std::size_t i = n; i < n + kGuard; ++i) {
          CHECK(value[i] == sentinel);
          CHECK(m[i] == sentinel);
          CHECK(v[i] == sentinel);
        }
        CHECK(grad == grad_before);
      }
}

// ---- Sherman-Morrison (docs/math.md M7, M9) --------------------------------------------

namespace {

// A random symmetric positive definite d x d matrix: I + B B^T / d.
template <class T>
std::vector<T> random_spd(std::size_t d, std::uint64_t seed) {
  const auto b = random_values<double>(d * d, seed);
  std::vector<T> R(d * d);
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j <= i; ++j) {
      double s = i == j ? 1.0 : 0.0;
      for (std::size_t l = 0; l < d; ++l) s += b[i * d + l] * b[j * d + l] / double(d);
      R[i * d + j] = R[j * d + i] = static_cast<T>(s);
    }
  return R;
}

// One fused update checked against the reference: R, a and (optionally) b and
// y, with R in a padded, unaligned, guarded buffer and every vector guarded.
template <class T>
void check_sherman_morrison_update(std::size_t d, T scale, bool with_next, bool with_x) {
  const std::size_t ld = d + 2;
  const auto R0 = random_spd<T>(d, 1000 + d);
  const auto w = random_values<T>(d, 1100 + d, -0.3, 0.3), q = random_values<T>(d, 1200 + d);
  const auto kn = random_values<T>(d, 1300 + d), x = random_values<T>(d, 1400 + d);

  std::vector<T> R_ref(R0), a_ref(d), b_ref(d), y_ref(d);
  ref::sherman_morrison_update(d, R_ref.data(), d, w.data(), scale, q.data(), with_next ? kn.data() : nullptr,
                               a_ref.data(), with_next ? b_ref.data() : nullptr, with_x ? x.data() : nullptr,
                               with_x ? y_ref.data() : nullptr);

  // Tolerances: entry (i,j) is two roundings of scale R_ij - w_i w_j; row sums
  // of |scale R_ij| + |w_i w_j| weighted by |q_j| (|k_j|, |x_j|) bound a (b, y).
  std::vector<double> tol_R(d * d), tol_a(d), tol_b(d), tol_y(d);
  for (std::size_t i = 0; i < d; ++i) {
    double ma = 0, mb = 0, my = 0;
    for (std::size_t j = 0; j < d; ++j) {
      const double mag = std::abs(double(scale) * double(R0[i * d + j])) + std::abs(double(w[i]) * double(w[j]));
      tol_R[i * d + j] = 2 * eps<T>() * mag;
      ma += mag * std::abs(double(q[j]));
      mb += mag * std::abs(double(kn[j]));
      my += mag * std::abs(double(x[j]));
    }
    tol_a[i] = 2.0 * (d + 2) * eps<T>() * ma;
    tol_b[i] = 2.0 * (d + 2) * eps<T>() * mb;
    tol_y[i] = 2.0 * (d + 2) * eps<T>() * my;
  }

  auto R = guarded_matrix(d, d, ld, 1, R0);
  auto gw = guarded_vector(w, 1), gq = guarded_vector(q, 0), gk = guarded_vector(kn, 1), gx = guarded_vector(x, 0);
  auto ga = guarded_vector(std::vector<T>(d, T(0)), 1), gb = guarded_vector(std::vector<T>(d, T(0)), 0);
  auto gy = guarded_vector(std::vector<T>(d, T(0)), 1);
  k::sherman_morrison_update(d, R.data(), ld, gw.data(), scale, gq.data(), with_next ? gk.data() : nullptr, ga.data(),
                             with_next ? gb.data() : nullptr, with_x ? gx.data() : nullptr,
                             with_x ? gy.data() : nullptr);
  CHECK(worst_ratio(R.get(), R_ref, tol_R) <= 1.0);
  CHECK(worst_ratio(ga.get(), a_ref, tol_a) <= 1.0);
  if (with_next) CHECK(worst_ratio(gb.get(), b_ref, tol_b) <= 1.0);
  if (with_x) CHECK(worst_ratio(gy.get(), y_ref, tol_y) <= 1.0);
  // Without k_next (x), b (y) is not touched at all.
  if (!with_next) CHECK(gb.get() == std::vector<T>(d, T(0)));
  if (!with_x) CHECK(gy.get() == std::vector<T>(d, T(0)));
  // R stays bitwise symmetric, the overlapping batches' columns included.
  const auto Rv = R.get();
  std::size_t asymmetric = 0;
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < i; ++j) asymmetric += Rv[i * d + j] != Rv[j * d + i];
  CHECK(asymmetric == 0);
  CHECK(R.guard_violations() == 0);
  CHECK(ga.guard_violations() + gb.guard_violations() + gy.guard_violations() == 0);
  CHECK(gw.get() == w);
  CHECK(gq.get() == q);
  CHECK(gk.get() == kn);
  CHECK(gx.get() == x);

  // Exact-size buffers with ld = d: ASan sees any read or write past the end.
  std::vector<T> R2(R0), a2(d), b2(d), y2(d);
  k::sherman_morrison_update(d, R2.data(), d, w.data(), scale, q.data(), with_next ? kn.data() : nullptr, a2.data(),
                             with_next ? b2.data() : nullptr, with_x ? x.data() : nullptr,
                             with_x ? y2.data() : nullptr);
  CHECK(worst_ratio(R2, R_ref, tol_R) <= 1.0);
  CHECK(worst_ratio(a2, a_ref, tol_a) <= 1.0);
  // The update and a do not depend on which other products ride along: the
  // mesa backward recomputes the forward's R_t and a_t bit for bit.
  std::vector<T> R3(R0), a3(d), b3(d);
  k::sherman_morrison_update(d, R3.data(), d, w.data(), scale, q.data(), kn.data(), a3.data(), b3.data());
  CHECK(R3 == R2);
  CHECK(a3 == a2);
}

}  // namespace

TEMPLATE_TEST_CASE("sherman_morrison_update matches the reference (R, a, b, y), guards intact",
                   "[kernels][sherman_morrison]", float, double) {
  using T = TestType;
  for (std::size_t d : matrix_sizes()) {
    for (T scale : {T(1), T(1) / T(0.9)}) {
      for (bool with_next : {true, false}) {
        for (bool with_x : {false, true}) {
          INFO("d = " << d << ", scale = " << scale << ", k_next " << (with_next ? "given" : "null") << ", x "
                      << (with_x ? "given" : "null"));
          check_sherman_morrison_update<T>(d, scale, with_next, with_x);
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("sherman_morrison_gain matches its formula", "[kernels][sherman_morrison]", float, double) {
  using T = TestType;
  for (std::size_t d : vector_sizes()) {
    for (T gamma : {T(1), T(0.95)}) {
      const auto kv = random_values<T>(d, 1400 + d);
      // u_i = k_i c_i with c_i > 0, so k.u > 0 and den > gamma, as for u = R k with R SPD.
      auto u = random_values<T>(d, 1500 + d, 0.5, 1.5);
      double magnitude = gamma;  // gamma + sum_i |k_i u_i|
      for (std::size_t i = 0; i < d; ++i) {
        u[i] *= kv[i];
        magnitude += std::abs(double(kv[i]) * double(u[i]));
      }
      const double den_ref = double(gamma) + ref::dot(kv.data(), u.data(), d);
      auto gw = guarded_vector(std::vector<T>(d, T(0)), 1);
      auto gk = guarded_vector(kv, 0), gu = guarded_vector(u, 1);
      const T den = k::sherman_morrison_gain(d, gk.data(), gu.data(), gamma, gw.data());
      INFO("d = " << d << ", gamma = " << gamma);
      const double tol_den = 2.0 * (d + 2) * eps<T>() * magnitude;
      CHECK(std::abs(double(den) - den_ref) <= tol_den);
      // w = u / sqrt(gamma den): relative error of den (halved by the sqrt) plus
      // a few roundings (sqrt, divide, multiply).
      std::vector<double> tol(d);
      std::vector<T> w_ref(d);
      const double inv = 1.0 / std::sqrt(double(gamma) * den_ref);
      for (std::size_t i = 0; i < d; ++i) {
        w_ref[i] = static_cast<T>(double(u[i]) * inv);
        tol[i] = std::abs(double(u[i]) * inv) * (0.5 * tol_den / den_ref + 6 * eps<T>());
      }
      CHECK(worst_ratio(gw.get(), w_ref, tol) <= 1.0);
      CHECK(gw.guard_violations() == 0);
    }
  }
}

namespace {

// The fused update + next gain against its two-call definition: R, a, b and y
// bit for bit as sherman_morrison_update gives them, den against a double
// reference, w_next = b * (1 / sqrt(gamma den)) bit for bit from the den it returned.
template <class T>
void check_sherman_morrison_update_gain(std::size_t d, T gamma, bool with_x, bool w_next_is_b) {
  const std::size_t ld = d + 2;
  const T scale = T(1) / gamma;
  const auto R0 = random_spd<T>(d, 2000 + d);
  const auto w = random_values<T>(d, 2100 + d, -0.3, 0.3), q = random_values<T>(d, 2200 + d);
  const auto kn = random_values<T>(d, 2300 + d), x = random_values<T>(d, 2400 + d);

  std::vector<T> R_two(R0), a_two(d), b_two(d), y_two(d);
  k::sherman_morrison_update(d, R_two.data(), d, w.data(), scale, q.data(), kn.data(), a_two.data(), b_two.data(),
                             with_x ? x.data() : nullptr, with_x ? y_two.data() : nullptr);
  double magnitude = gamma;  // gamma + sum_i |k_i b_i|
  for (std::size_t i = 0; i < d; ++i) magnitude += std::abs(double(kn[i]) * double(b_two[i]));
  const double den_ref = double(gamma) + ref::dot(kn.data(), b_two.data(), d);

  auto R = guarded_matrix(d, d, ld, 1, R0);
  auto gw = guarded_vector(w, 1), gq = guarded_vector(q, 0), gk = guarded_vector(kn, 1), gx = guarded_vector(x, 0);
  auto ga = guarded_vector(std::vector<T>(d, T(0)), 1), gb = guarded_vector(std::vector<T>(d, T(0)), 0);
  auto gy = guarded_vector(std::vector<T>(d, T(0)), 1), gwn = guarded_vector(std::vector<T>(d, T(0)), 1);
  T* w_next = w_next_is_b ? gb.data() : gwn.data();
  const T den = k::sherman_morrison_update_gain(d, R.data(), ld, gw.data(), scale, gq.data(), gk.data(), gamma,
                                                ga.data(), gb.data(), w_next, with_x ? gx.data() : nullptr,
                                                with_x ? gy.data() : nullptr);
  CHECK(R.get() == R_two);
  CHECK(ga.get() == a_two);
  if (with_x) CHECK(gy.get() == y_two);
  else CHECK(gy.get() == std::vector<T>(d, T(0)));
  CHECK(std::abs(double(den) - den_ref) <= 2.0 * (d + 2) * eps<T>() * magnitude);
  const T inv = T(1) / std::sqrt(gamma * den);
  std::vector<T> w_next_two(d);
  for (std::size_t i = 0; i < d; ++i) w_next_two[i] = b_two[i] * inv;
  if (w_next_is_b) {
    CHECK(gb.get() == w_next_two);
  } else {
    CHECK(gb.get() == b_two);
    CHECK(gwn.get() == w_next_two);
  }
  CHECK(R.guard_violations() == 0);
  CHECK(ga.guard_violations() + gb.guard_violations() + gy.guard_violations() + gwn.guard_violations() == 0);
  CHECK(gw.get() == w);
  CHECK(gq.get() == q);
  CHECK(gk.get() == kn);
  CHECK(gx.get() == x);

  // Exact-size buffers with ld = d: ASan sees any read or write past the end.
  std::vector<T> R2(R0), a2(d), b2(d), wn2(d);
  const T den2 = k::sherman_morrison_update_gain(d, R2.data(), d, w.data(), scale, q.data(), kn.data(), gamma,
                                                 a2.data(), b2.data(), wn2.data());
  CHECK(R2 == R_two);
  CHECK(a2 == a_two);
  CHECK(b2 == b_two);
  CHECK(den2 == den);
  CHECK(wn2 == w_next_two);
}

}  // namespace

TEMPLATE_TEST_CASE("sherman_morrison_update_gain = update then the next token's gain", "[kernels][sherman_morrison]",
                   float, double) {
  using T = TestType;
  for (std::size_t d : matrix_sizes()) {
    for (T gamma : {T(1), T(0.9)}) {
      for (bool with_x : {false, true}) {
        for (bool w_next_is_b : {false, true}) {
          INFO("d = " << d << ", gamma = " << gamma << ", x " << (with_x ? "given" : "null") << ", w_next "
                      << (w_next_is_b ? "is b" : "apart"));
          check_sherman_morrison_update_gain<T>(d, gamma, with_x, w_next_is_b);
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("sherman_morrison_update keeps R bitwise symmetric over many steps", "[kernels][sherman_morrison]",
                   float, double) {
  using T = TestType;
  // Sizes with tails for both SIMD widths and every column-block count.
  for (std::size_t d : {13, 37, 67}) {
    for (T gamma : {T(1), T(0.97)}) {
      const std::size_t ld = d + 1, steps = 400;
      const T lambda = T(10);
      // |k| about 2: large enough that the update subtracts a lot from R each step.
      const auto keys = random_values<T>((steps + 1) * d, 1600 + d, -3.5 / std::sqrt(double(d)), 3.5 / std::sqrt(double(d)));
      const auto queries = random_values<T>(steps * d, 1700 + d);
      Guarded<T> R(d, d, ld, 1);
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) R.at(i, j) = i == j ? lambda : T(0);
      std::vector<T> u(d), w(d), a(d);
      for (std::size_t i = 0; i < d; ++i) u[i] = lambda * keys[i];  // u_1 = R_0 k_1
      std::size_t asymmetric = 0, first_bad_step = 0;
      for (std::size_t t = 0; t < steps; ++t) {
        k::sherman_morrison_gain(d, keys.data() + t * d, u.data(), gamma, w.data());
        k::sherman_morrison_update(d, R.data(), ld, w.data(), T(1) / gamma, queries.data() + t * d,
                                   keys.data() + (t + 1) * d, a.data(), u.data());
        for (std::size_t i = 0; i < d; ++i)
          for (std::size_t j = 0; j < i; ++j)
            if (!bitwise_equal(&R.at(i, j), &R.at(j, i), sizeof(T)) && asymmetric++ == 0) first_bad_step = t;
      }
      INFO("d = " << d << ", gamma = " << gamma << ", first asymmetric step " << first_bad_step);
      CHECK(asymmetric == 0);
      CHECK(R.guard_violations() == 0);
      // The check is not vacuous: R moved far from lambda I.
      CHECK(std::abs(double(R.at(0, 0)) - double(lambda)) > 1e-2 * double(lambda));
    }
  }
}

// ---- state update (M1-M2, M8-M9) ------------------------------------------------------

TEMPLATE_TEST_CASE("state_update_apply matches the reference for d x dv with lds > dv", "[kernels][state_update]",
                   float, double) {
  using T = TestType;
  std::vector<std::pair<std::size_t, std::size_t>> shapes;  // (d, dv)
  for (std::size_t n : matrix_sizes()) {
    shapes.emplace_back(n, n);
    shapes.emplace_back(n % 11 + 1, n);  // every dv (column tails) with a few d
    shapes.emplace_back(n, n % 5 + 1);   // every d with narrow dv
  }
  for (auto [d, dv] : shapes) {
    for (T scale : {T(1), T(0.9)}) {
      const auto St0 = random_values<T>(d * dv, 2000 + d * 7 + dv), kv = random_values<T>(d, 2100 + d);
      const auto v = random_values<T>(dv, 2200 + dv), a = random_values<T>(d, 2300 + d);
      std::vector<T> St_ref(St0), o_ref(dv);
      ref::state_update_apply(d, dv, St_ref.data(), dv, scale, kv.data(), v.data(), a.data(), o_ref.data());
      std::vector<double> tol_S(d * dv), tol_o(dv, 0.0);
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < dv; ++j) {
          const double mag = std::abs(double(scale) * double(St0[i * dv + j])) + std::abs(double(kv[i]) * double(v[j]));
          tol_S[i * dv + j] = 2 * eps<T>() * mag;
          tol_o[j] += mag * std::abs(double(a[i]));
        }
      for (auto& t : tol_o) t *= 2.0 * (d + 2) * eps<T>();
      // An odd stride, and the stride padded to the SIMD width as linear
      // attention keeps its states (with AVX-512 the one-pass masked ladder);
      // the padding is guarded.
      for (const std::size_t lds : {dv + 3, k::padded_stride<T>(dv)}) {
        INFO("d = " << d << ", dv = " << dv << ", lds = " << lds << ", scale = " << scale);
        auto St = guarded_matrix(d, dv, lds, 1, St0);
        auto gk = guarded_vector(kv, 1), gv = guarded_vector(v, 0), ga = guarded_vector(a, 1);
        auto go = guarded_vector(std::vector<T>(dv, T(0)), 1);
        k::state_update_apply(d, dv, St.data(), lds, scale, gk.data(), gv.data(), ga.data(), go.data());
        CHECK(worst_ratio(St.get(), St_ref, tol_S) <= 1.0);
        CHECK(worst_ratio(go.get(), o_ref, tol_o) <= 1.0);
        CHECK(St.guard_violations() == 0);
        CHECK(go.guard_violations() == 0);
      }
      // Exact-size buffers for ASan.
      std::vector<T> St2(St0), o2(dv);
      k::state_update_apply(d, dv, St2.data(), dv, scale, kv.data(), v.data(), a.data(), o2.data());
      CHECK(worst_ratio(o2, o_ref, tol_o) <= 1.0);
    }
  }
}

// The whole-sequence sweep: blocks of rows held in registers, column passes
// whose last two batches may overlap, forward and reverse order, with and
// without the decay (scale, the mesa op's gamma), every row stride larger than
// the row; against one reference step per token.
TEMPLATE_TEST_CASE("state_sweep matches one state_update_apply per token, forward and reverse",
                   "[kernels][state_sweep]", float, double) {
  using T = TestType;
  std::vector<std::size_t> ds, dvs;
  for (std::size_t n = 1; n <= 26; ++n) ds.push_back(n);
  for (std::size_t n : {31, 33, 40, 64}) ds.push_back(n);
  for (std::size_t n = 1; n <= 41; ++n) dvs.push_back(n);
  for (std::size_t n : {47, 64, 65, 100}) dvs.push_back(n);
  for (std::size_t d : ds)
    for (std::size_t dv : dvs)
      for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(13), std::size_t(50)}) {
        if (n == 50 && (d % 7 != 6 || dv % 3 != 2)) continue;  // the long sequence on a sample of shapes
        const std::uint64_t seed = 9000 + 131 * d + 17 * dv + n;
        const auto St0 = random_values<T>(d * dv, seed), kk = random_values<T>(n * d, seed + 1);
        const auto v = random_values<T>(n * dv, seed + 2), a = random_values<T>(n * d, seed + 3);
        for (const bool reverse : {false, true})
        for (const T scale : {T(1), T(0.9)}) {
          std::vector<T> St_ref(St0), o_ref(n * dv);
          ref::state_sweep(n, d, dv, St_ref.data(), dv, scale, kk.data(), d, v.data(), dv, a.data(), d, o_ref.data(),
                           dv, reverse);
          // Bounds from the same sweep on absolute values: every St entry is
          // a sum of at most n + 1 terms, every o entry a sum of d products;
          // with scale != 1 each step rounds twice (the product, then the FMA).
          auto absolute = [](std::vector<T> x) {
            for (auto& e : x) e = std::abs(e);
            return x;
          };
          std::vector<T> S_mag(absolute(St0)), o_mag(n * dv);
          ref::state_sweep(n, d, dv, S_mag.data(), dv, scale, absolute(kk).data(), d, absolute(v).data(), dv,
                           absolute(a).data(), d, o_mag.data(), dv, reverse);
          std::vector<double> tol_S(S_mag.size()), tol_o(o_mag.size());
          for (std::size_t i = 0; i < S_mag.size(); ++i) tol_S[i] = 4.0 * double(n + 1) * eps<T>() * S_mag[i];
          for (std::size_t i = 0; i < o_mag.size(); ++i) tol_o[i] = 4.0 * double(n + d + 2) * eps<T>() * o_mag[i];
          INFO("n = " << n << ", d = " << d << ", dv = " << dv << ", reverse = " << reverse << ", scale = " << scale);
          // Row strides past the row (padding holds sentinels), unaligned data.
          auto St = guarded_matrix(d, dv, dv + 3, 1, St0);
          auto gk = guarded_matrix(n, d, d + 1, 1, kk), ga = guarded_matrix(n, d, d + 2, 0, a);
          auto gv = guarded_matrix(n, dv, dv + 5, 1, v);
          auto go = guarded_matrix(n, dv, dv + 2, 1, std::vector<T>(n * dv, T(0)));
          k::state_sweep(n, d, dv, St.data(), dv + 3, scale, gk.data(), d + 1, gv.data(), dv + 5, ga.data(), d + 2,
                         go.data(), dv + 2, reverse);
          CHECK(worst_ratio(St.get(), St_ref, tol_S) <= 1.0);
          CHECK(worst_ratio(go.get(), o_ref, tol_o) <= 1.0);
          CHECK(St.guard_violations() == 0);
          CHECK(go.guard_violations() == 0);
          CHECK(gk.guard_violations() + gv.guard_violations() + ga.guard_violations() == 0);
          // Exact-size buffers (rows back to back) for ASan.
          std::vector<T> St2(St0), o2(n * dv);
          k::state_sweep(n, d, dv, St2.data(), dv, scale, kk.data(), d, v.data(), dv, a.data(), d, o2.data(), dv,
                         reverse);
          CHECK(worst_ratio(St2, St_ref, tol_S) <= 1.0);
          CHECK(worst_ratio(o2, o_ref, tol_o) <= 1.0);
        }
      }
}

// The rank-2 sweep of the mesa backward's M (M11): the same register blocks
// with two outer products per token; against one reference rank-2 step per
// token, forward and reverse, with and without the decay.
TEMPLATE_TEST_CASE("rank2_sweep matches one rank2_update_apply per token, forward and reverse",
                   "[kernels][state_sweep][rank2]", float, double) {
  using T = TestType;
  std::vector<std::size_t> ds;
  for (std::size_t n = 1; n <= 41; ++n) ds.push_back(n);
  for (std::size_t n : {47, 64, 65, 100}) ds.push_back(n);
  for (std::size_t d : ds)
    for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(13), std::size_t(50)}) {
      if (n == 50 && d % 3 != 2) continue;  // the long sequence on a sample of sizes
      const std::uint64_t seed = 9500 + 131 * d + n;
      auto M0 = random_values<T>(d * d, seed);
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < i; ++j) M0[j * d + i] = M0[i * d + j];  // symmetric, as in the op
      const auto x = random_values<T>(n * d, seed + 1), y = random_values<T>(n * d, seed + 2);
      const auto kk = random_values<T>(n * d, seed + 3);
      for (const bool reverse : {false, true})
        for (const T scale : {T(1), T(0.9)}) {
          std::vector<T> M_ref(M0), o_ref(n * d);
          ref::rank2_sweep(n, d, M_ref.data(), d, scale, x.data(), d, y.data(), d, kk.data(), d, o_ref.data(), d,
                           reverse);
          // Bounds from the same sweep on absolute values: each step rounds an
          // entry up to three times, o_t is a sum of d products.
          auto absolute = [](std::vector<T> e) {
            for (auto& z : e) z = std::abs(z);
            return e;
          };
          std::vector<T> M_mag(absolute(M0)), o_mag(n * d);
          ref::rank2_sweep(n, d, M_mag.data(), d, scale, absolute(x).data(), d, absolute(y).data(), d,
                           absolute(kk).data(), d, o_mag.data(), d, reverse);
          std::vector<double> tol_M(M_mag.size()), tol_o(o_mag.size());
          for (std::size_t i = 0; i < M_mag.size(); ++i) tol_M[i] = 8.0 * double(n + 1) * eps<T>() * M_mag[i];
          for (std::size_t i = 0; i < o_mag.size(); ++i) tol_o[i] = 8.0 * double(n + d + 2) * eps<T>() * o_mag[i];
          INFO("n = " << n << ", d = " << d << ", reverse = " << reverse << ", scale = " << scale);
          auto M = guarded_matrix(d, d, d + 3, 1, M0);
          auto gx = guarded_matrix(n, d, d + 1, 1, x), gy = guarded_matrix(n, d, d + 2, 0, y);
          auto gk = guarded_matrix(n, d, d + 5, 1, kk);
          auto go = guarded_matrix(n, d, d + 2, 1, std::vector<T>(n * d, T(0)));
          k::rank2_sweep(n, d, M.data(), d + 3, scale, gx.data(), d + 1, gy.data(), d + 2, gk.data(), d + 5, go.data(),
                         d + 2, reverse);
          CHECK(worst_ratio(M.get(), M_ref, tol_M) <= 1.0);
          CHECK(worst_ratio(go.get(), o_ref, tol_o) <= 1.0);
          CHECK(M.guard_violations() + go.guard_violations() == 0);
          CHECK(gx.guard_violations() + gy.guard_violations() + gk.guard_violations() == 0);
          // Exact-size buffers (rows back to back) for ASan.
          std::vector<T> M2(M0), o2(n * d);
          k::rank2_sweep(n, d, M2.data(), d, scale, x.data(), d, y.data(), d, kk.data(), d, o2.data(), d, reverse);
          CHECK(worst_ratio(M2, M_ref, tol_M) <= 1.0);
          CHECK(worst_ratio(o2, o_ref, tol_o) <= 1.0);
        }
    }
}

TEMPLATE_TEST_CASE("state_update_dot matches the reference for d x dv with lds > dv, inputs untouched",
                   "[kernels][state_update]", float, double) {
  using T = TestType;
  std::vector<std::pair<std::size_t, std::size_t>> shapes;  // (d, dv)
  for (std::size_t n : matrix_sizes()) {
    shapes.emplace_back(n, n);
    shapes.emplace_back(n % 11 + 1, n);  // every dv (2-batch steps, single batches, partial tails) with a few d
    shapes.emplace_back(n, n % 5 + 1);   // every d with narrow dv
  }
  for (auto [d, dv] : shapes) {
    for (T scale : {T(1), T(0.9)}) {
      const std::size_t lds = dv + 3;
      const auto St0 = random_values<T>(d * dv, 2400 + d * 7 + dv), kv = random_values<T>(d, 2500 + d);
      const auto v = random_values<T>(dv, 2600 + dv), g = random_values<T>(dv, 2700 + dv);
      std::vector<T> St_ref(St0), da_ref(d);
      ref::state_update_dot(d, dv, St_ref.data(), dv, scale, kv.data(), v.data(), g.data(), da_ref.data());
      // St: two roundings of scale St + k v^T per entry; da_i: a sum of dv products.
      std::vector<double> tol_S(d * dv), tol_da(d, 0.0);
      for (std::size_t i = 0; i < d; ++i) {
        for (std::size_t j = 0; j < dv; ++j) {
          const double mag = std::abs(double(scale) * double(St0[i * dv + j])) + std::abs(double(kv[i]) * double(v[j]));
          tol_S[i * dv + j] = 2 * eps<T>() * mag;
          tol_da[i] += mag * std::abs(double(g[j]));
        }
        tol_da[i] *= 2.0 * (dv + 2) * eps<T>();
      }
      INFO("d = " << d << ", dv = " << dv << ", lds = " << lds << ", scale = " << scale);
      auto St = guarded_matrix(d, dv, lds, 1, St0);
      auto gk = guarded_vector(kv, 1), gv = guarded_vector(v, 0), gg = guarded_vector(g, 1);
      auto gda = guarded_vector(std::vector<T>(d, T(0)), 1);
      k::state_update_dot(d, dv, St.data(), lds, scale, gk.data(), gv.data(), gg.data(), gda.data());
      CHECK(worst_ratio(St.get(), St_ref, tol_S) <= 1.0);
      CHECK(worst_ratio(gda.get(), da_ref, tol_da) <= 1.0);
      CHECK(St.guard_violations() == 0);
      CHECK(gda.guard_violations() == 0);
      CHECK(gk.guard_violations() == 0);
      CHECK(gv.guard_violations() == 0);
      CHECK(gg.guard_violations() == 0);
      CHECK(gk.get() == kv);  // k, v, g are read-only
      CHECK(gv.get() == v);
      CHECK(gg.get() == g);
      // Exact-size buffers with lds = dv for ASan.
      std::vector<T> St2(St0), da2(d);
      k::state_update_dot(d, dv, St2.data(), dv, scale, kv.data(), v.data(), g.data(), da2.data());
      CHECK(worst_ratio(St2, St_ref, tol_S) <= 1.0);
      CHECK(worst_ratio(da2, da_ref, tol_da) <= 1.0);
    }
  }
}

// ---- the symmetric rank-2 accumulator of the mesa backward pass (M11) ---------------------

namespace {

// A random symmetric d x d matrix (not necessarily definite), entries in [-1, 1].
template <class T>
std::vector<T> random_symmetric(std::size_t d, std::uint64_t seed) {
  auto M = random_values<T>(d * d, seed);
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t j = 0; j < i; ++j) M[j * d + i] = M[i * d + j];
  return M;
}

// |scale M_ij| + |x_i y_j| + |y_i x_j|: the magnitude that bounds the rounding
// of entry (i, j) of scale M + x y^T + y x^T (symmetric in i, j when M is).
template <class T>
double rank2_magnitude(const std::vector<T>& M, std::size_t d, std::size_t i, std::size_t j, T scale,
                       const std::vector<T>& x, const std::vector<T>& y) {
  return std::abs(double(scale) * double(M[i * d + j])) + std::abs(double(x[i]) * double(y[j])) +
         std::abs(double(y[i]) * double(x[j]));
}

}  // namespace

TEMPLATE_TEST_CASE("rank2_update_apply matches the reference (M, out), guards intact, inputs untouched",
                   "[kernels][rank2]", float, double) {
  using T = TestType;
  for (std::size_t d : matrix_sizes()) {
    for (T scale : {T(1), T(0.9)}) {
      const std::size_t ld = d + 2;
      const auto M0 = random_symmetric<T>(d, 3000 + d);
      const auto x = random_values<T>(d, 3100 + d), y = random_values<T>(d, 3200 + d);
      const auto kv = random_values<T>(d, 3300 + d);
      std::vector<T> M_ref(M0), out_ref(d);
      ref::rank2_update_apply(d, M_ref.data(), d, scale, x.data(), y.data(), kv.data(), out_ref.data());
      // Entry (i, j): three roundings in the kernel (scale, two FMAs), up to five
      // in the reference: 4 eps of its magnitude. out_j = sum_r k_r M_rj: a sum
      // of d products of such entries: 2 (d + 4) eps sum_r |k_r| magnitude_rj.
      std::vector<double> tol_M(d * d), tol_out(d, 0.0);
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) {
          const double mag = rank2_magnitude(M0, d, i, j, scale, x, y);
          tol_M[i * d + j] = 4 * eps<T>() * mag;
          tol_out[j] += mag * std::abs(double(kv[i]));
        }
      for (auto& t : tol_out) t *= 2.0 * (d + 4) * eps<T>();
      INFO("d = " << d << ", ld = " << ld << ", scale = " << scale);
      auto M = guarded_matrix(d, d, ld, 1, M0);
      auto gx = guarded_vector(x, 1), gy = guarded_vector(y, 0), gk = guarded_vector(kv, 1);
      auto gout = guarded_vector(std::vector<T>(d, T(0)), 1);
      k::rank2_update_apply(d, M.data(), ld, scale, gx.data(), gy.data(), gk.data(), gout.data());
      CHECK(worst_ratio(M.get(), M_ref, tol_M) <= 1.0);
      CHECK(worst_ratio(gout.get(), out_ref, tol_out) <= 1.0);
      CHECK(M.guard_violations() == 0);
      CHECK(gout.guard_violations() == 0);
      CHECK(gx.guard_violations() == 0);
      CHECK(gy.guard_violations() == 0);
      CHECK(gk.guard_violations() == 0);
      CHECK(gx.get() == x);  // x, y, k are read-only
      CHECK(gy.get() == y);
      CHECK(gk.get() == kv);
      // Exact-size buffers with ld = d for ASan.
      std::vector<T> M2(M0), out2(d);
      k::rank2_update_apply(d, M2.data(), d, scale, x.data(), y.data(), kv.data(), out2.data());
      CHECK(worst_ratio(M2, M_ref, tol_M) <= 1.0);
      CHECK(worst_ratio(out2, out_ref, tol_out) <= 1.0);
    }
  }
}

TEMPLATE_TEST_CASE("rank2_update_apply keeps M symmetric to rounding over many steps", "[kernels][rank2]", float,
                   double) {
  using T = TestType;
  // NOT bitwise: entry (i, j) is fma(y_i, x_j, fma(x_i, y_j, scale M_ij)) and
  // (j, i) rounds x_j y_i first, so the two can differ in the last bit (kept
  // that way: the mesa op's results must not change; docs/kernels.md). What
  // holds is that the asymmetry stays at rounding level and does not grow:
  // each step adds at most one rounding of each of the two last operations,
  // and the old asymmetry is multiplied by gamma <= 1. So |M_ij - M_ji| stays
  // within 2 eps times the running sum of |M| + 2 |x_i y_j| + 2 |y_i x_j|
  // magnitudes (bound accumulated in double alongside).
  for (std::size_t d : {13, 37, 67}) {
    for (T gamma : {T(1), T(0.97)}) {
      const std::size_t ld = d + 1, steps = 400;
      const auto xs = random_values<T>(steps * d, 3400 + d), ys = random_values<T>(steps * d, 3500 + d);
      const auto ks = random_values<T>(steps * d, 3600 + d);
      Guarded<T> M(d, d, ld, 1);
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) M.at(i, j) = T(0);
      std::vector<T> out(d);
      std::vector<double> bound(d * d, 0.0);  // accumulated allowance for |M_ij - M_ji|
      double worst = 0;
      for (std::size_t t = 0; t < steps; ++t) {
        const T* x = xs.data() + t * d;
        const T* y = ys.data() + t * d;
        for (std::size_t i = 0; i < d; ++i)
          for (std::size_t j = 0; j < i; ++j) {
            const double mag = std::abs(double(gamma) * double(M.at(i, j))) + std::abs(double(gamma) * double(M.at(j, i))) +
                               2 * std::abs(double(x[i]) * double(y[j])) + 2 * std::abs(double(y[i]) * double(x[j]));
            bound[i * d + j] = double(gamma) * bound[i * d + j] + 2 * eps<T>() * mag;
          }
        k::rank2_update_apply(d, M.data(), ld, gamma, x, y, ks.data() + t * d, out.data());
        for (std::size_t i = 0; i < d; ++i)
          for (std::size_t j = 0; j < i; ++j) {
            const double diff = std::abs(double(M.at(i, j)) - double(M.at(j, i)));
            worst = std::max(worst, diff / std::max(bound[i * d + j], std::numeric_limits<double>::min()));
          }
      }
      INFO("d = " << d << ", gamma = " << gamma << ", worst |M_ij - M_ji| / bound " << worst);
      CHECK(worst <= 1.0);
      CHECK(M.guard_violations() == 0);
      // The check is not vacuous: M grew far from 0.
      double largest = 0;
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) largest = std::max(largest, std::abs(double(M.at(i, j))));
      CHECK(largest > 1.0);
    }
  }
}

// ---- the mesa recursion against a direct ridge solve (M5-M9) ---------------------------

namespace {

// Runs the mesa recursion of docs/math.md §3 with forgetting factor gamma on one
// head, with the kernels only: per token
//   w_t = gain(k_t, u_t)                       u_t = R_{t-1} k_t
//   R_t = R_{t-1}/gamma - w w^T, a_t = R_t q_t, u_{t+1} = R_t k_{t+1}     (M7, M9)
//   S_t = gamma S_{t-1} + v_t k_t^T, o_t = S_t a_t                        (M8, M9)
// keys/queries are (T, d), values (T, dv); returns o as (T, dv).
template <class T>
mesaopt::RowMatrix<T> mesa_by_kernels(const mesaopt::RowMatrix<T>& keys, const mesaopt::RowMatrix<T>& queries,
                                      const mesaopt::RowMatrix<T>& values, T lambda, T gamma) {
  const std::size_t steps = keys.rows(), d = keys.cols(), dv = values.cols();
  mesaopt::RowMatrix<T> R = lambda * mesaopt::RowMatrix<T>::Identity(d, d);
  mesaopt::RowMatrix<T> St = mesaopt::RowMatrix<T>::Zero(d, dv);  // S^T
  mesaopt::RowMatrix<T> out(steps, dv);
  std::vector<T> u(d), w(d), a(d);
  for (std::size_t i = 0; i < d; ++i) u[i] = lambda * keys(0, i);
  for (std::size_t t = 0; t < steps; ++t) {
    const T* k_next = t + 1 < steps ? keys.row(t + 1).data() : nullptr;
    k::sherman_morrison_gain(d, keys.row(t).data(), u.data(), gamma, w.data());
    k::sherman_morrison_update(d, R.data(), d, w.data(), T(1) / gamma, queries.row(t).data(), k_next, a.data(),
                               k_next ? u.data() : nullptr);
    k::state_update_apply(d, dv, St.data(), dv, gamma, keys.row(t).data(), values.row(t).data(), a.data(),
                          out.row(t).data());
  }
  return out;
}

// The same outputs from scratch in double at every t (M5-M6 with forgetting):
//   o_t = S_t (sum_i gamma^{t-i} k_i k_i^T + gamma^t / lambda I)^{-1} q_t,
//   S_t = sum_i gamma^{t-i} v_i k_i^T.
mesaopt::RowMatrix<double> mesa_by_direct_solve(const mesaopt::RowMatrix<double>& keys,
                                                const mesaopt::RowMatrix<double>& queries,
                                                const mesaopt::RowMatrix<double>& values, double lambda, double gamma) {
  const long steps = keys.rows(), d = keys.cols(), dv = values.cols();
  mesaopt::RowMatrix<double> out(steps, dv);
  for (long t = 0; t < steps; ++t) {
    Eigen::MatrixXd H = std::pow(gamma, double(t + 1)) / lambda * Eigen::MatrixXd::Identity(d, d);
    Eigen::MatrixXd S = Eigen::MatrixXd::Zero(dv, d);
    for (long i = 0; i <= t; ++i) {
      const double g = std::pow(gamma, double(t - i));
      H += g * keys.row(i).transpose() * keys.row(i);
      S += g * values.row(i).transpose() * keys.row(i);
    }
    const Eigen::VectorXd x = H.ldlt().solve(queries.row(t).transpose());
    out.row(t) = (S * x).transpose();
  }
  return out;
}

}  // namespace

TEST_CASE("mesa recursion from the kernels equals a direct ridge solve in double", "[kernels][mesa]") {
  // d = 13 and 37 have SIMD tails; dv = 5 and 11 have column tails.
  for (auto [d, dv] : {std::pair<long, long>{13, 5}, {37, 11}}) {
    for (double gamma : {1.0, 0.95}) {
      const long steps = 120;
      const double lambda = 0.7;
      const auto keys = mesaopt::test::random_matrix<double>(steps, d, 31 + d, 1.0 / std::sqrt(double(d)));
      const auto queries = mesaopt::test::random_matrix<double>(steps, d, 32 + d);
      const auto values = mesaopt::test::random_matrix<double>(steps, dv, 33 + d);
      const auto fast = mesa_by_kernels<double>(keys, queries, values, lambda, gamma);
      const auto direct = mesa_by_direct_solve(keys, queries, values, lambda, gamma);
      INFO("d = " << d << ", dv = " << dv << ", gamma = " << gamma);
      // Every token, not just the last one.
      double worst = 0;
      for (long t = 0; t < steps; ++t)
        worst = std::max(worst, mesaopt::test::relative_rms(fast.row(t), direct.row(t)));
      CHECK(worst < 1e-10);
    }
  }
}

TEST_CASE("mesa recursion in float stays close to the double direct solve", "[kernels][mesa]") {
  // Precision of the float path over a medium sequence with a well-conditioned
  // R (|k| about 1, lambda = 1): measured 4.4e-7 relative RMS over all tokens
  // (GCC 12, AVX2); 1e-5 allowed. A kernel bug gives errors of order 1.
  const long d = 32, dv = 8, steps = 512;
  const auto keys = mesaopt::test::random_matrix<double>(steps, d, 41, 1.0 / std::sqrt(double(d)));
  const auto queries = mesaopt::test::random_matrix<double>(steps, d, 42);
  const auto values = mesaopt::test::random_matrix<double>(steps, dv, 43);
  const auto fast = mesa_by_kernels<float>(keys.cast<float>(), queries.cast<float>(), values.cast<float>(), 1.0f, 1.0f);
  const auto direct = mesa_by_direct_solve(keys, queries, values, 1.0, 1.0);
  const double err = mesaopt::test::relative_rms(fast, direct);
  INFO("relative RMS error over all tokens: " << err);
  CHECK(err < 1e-5);
}

}  // namespace mesaopt_test_kernels
