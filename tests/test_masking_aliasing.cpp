// Non-finite values must not cross the causal mask, and outputs that alias
// inputs are rejected (docs/streaming.md, "Failures and what they produce").
//
// The masking tests put an Inf or NaN at one position t0 and check that every
// quantity that does not depend on t0 is finite and equal to the same quantity
// of a clean run. Before masked_product (ops/masked_product.hpp) the tiled
// softmax and the chunked linear attention multiplied masked entries by zero,
// so 0 * Inf = NaN spread to earlier positions.
#include <catch2/catch.hpp>

#include <mesaopt/ops.hpp>
#include <mesaopt/reference.hpp>

#include "test_util.hpp"

#include <array>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_masking_aliasing {

using namespace mesaopt;
using test::random_matrix;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// rows [first, last) of a and b: all finite in a, and a == b to rtol.
template <class A, class B>
void require_rows_clean(const A& a, const B& b, long first, long last, double rtol) {
  if (last <= first) return;
  const auto ra = a.middleRows(first, last - first);
  const auto rb = b.middleRows(first, last - first);
  REQUIRE(ra.allFinite());
  REQUIRE(test::relative_rms(ra, rb) < rtol);
}

// The three sequence ops in their tiled/chunked forms, with small tiles so
// that a sequence spans several tiles and t0 falls inside a diagonal tile.
struct SoftmaxOp {
  SoftmaxAttentionOptions opt{8, 8};
  void forward(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v,
               RowMatrix<double>& out, SoftmaxCache<double>& cache) const {
    softmax_attention_forward<double>(q, k, v, opt, out, cache);
  }
  void backward(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v,
                const RowMatrix<double>& dout, const SoftmaxCache<double>& cache, RowMatrix<double>& dq,
                RowMatrix<double>& dk, RowMatrix<double>& grad_v) const {
    softmax_attention_backward<double>(q, k, v, opt, dout, cache, dq, dk, grad_v);
  }
};

struct ChunkedLinearOp {
  long chunk = 8;
  void forward(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v,
               RowMatrix<double>& out, int&) const {
    linear_attention_forward_chunked<double>(q, k, v, out, chunk);
  }
  void backward(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v,
                const RowMatrix<double>& dout, const int&, RowMatrix<double>& dq, RowMatrix<double>& dk,
                RowMatrix<double>& grad_v) const {
    linear_attention_backward_chunked<double>(q, k, v, dout, dq, dk, grad_v, chunk);
  }
};

template <class Op, class Cache>
void check_mask_holds(const Op& op, Cache cache) {
  const long n = 37, d = 5, dv = 3;
  for (const double bad : {kInf, kNaN}) {
    for (const long t0 : {1L, 9L, 20L, 36L}) {
      CAPTURE(bad, t0);
      const RowMatrix<double> q = random_matrix<double>(n, d, 1), k = random_matrix<double>(n, d, 2);
      const RowMatrix<double> v = random_matrix<double>(n, dv, 3), dout = random_matrix<double>(n, dv, 4);
      RowMatrix<double> out_clean(n, dv), out_bad(n, dv);
      op.forward(q, k, v, out_clean, cache);

      // Forward: a bad value in v or k at t0 reaches only the outputs t >= t0.
      for (const bool in_v : {true, false}) {
        RowMatrix<double> kb = k, vb = v;
        (in_v ? vb(t0, 1) : kb(t0, 2)) = bad;
        Cache c = cache;
        op.forward(q, kb, vb, out_bad, c);
        require_rows_clean(out_bad, out_clean, 0, t0, 1e-12);

        // Backward: dq_t for t < t0 depends only on tokens <= t.
        RowMatrix<double> dq(n, d), dk(n, d), gv(n, dv);
        op.backward(q, kb, vb, dout, c, dq, dk, gv);
        RowMatrix<double> dq0(n, d), dk0(n, d), gv0(n, dv);
        Cache c0 = cache;
        op.forward(q, k, v, out_clean, c0);
        op.backward(q, k, v, dout, c0, dq0, dk0, gv0);
        require_rows_clean(dq, dq0, 0, t0, 1e-12);
      }

      // Backward: a bad dout at t0 reaches only the keys/values i <= t0, and
      // the result for i > t0 is that of a zero gradient at t0.
      RowMatrix<double> dout_bad = dout, dout_zero = dout;
      dout_bad(t0, 0) = bad;
      dout_zero.row(t0).setZero();
      Cache c = cache;
      op.forward(q, k, v, out_clean, c);
      RowMatrix<double> dq(n, d), dk(n, d), gv(n, dv), dq0(n, d), dk0(n, d), gv0(n, dv);
      op.backward(q, k, v, dout_bad, c, dq, dk, gv);
      op.backward(q, k, v, dout_zero, c, dq0, dk0, gv0);
      require_rows_clean(dk, dk0, t0 + 1, n, 1e-12);
      require_rows_clean(gv, gv0, t0 + 1, n, 1e-12);
      require_rows_clean(dq, dq0, 0, t0, 1e-12);
    }
  }
}

}  // namespace

TEST_CASE("tiled softmax: an Inf or NaN does not cross the causal mask", "[masking]") {
  check_mask_holds(SoftmaxOp{}, SoftmaxCache<double>{});
  SoftmaxOp unaligned;  // tiles that do not line up with each other
  unaligned.opt = {5, 7};
  check_mask_holds(unaligned, SoftmaxCache<double>{});
}

TEST_CASE("chunked linear attention: an Inf or NaN does not cross the causal mask", "[masking]") {
  check_mask_holds(ChunkedLinearOp{}, 0);
  check_mask_holds(ChunkedLinearOp{5}, 0);
}

TEST_CASE("masked_product: finite inputs give the plain product's bits", "[masking]") {
  // The GEMM path is taken whenever the masked rows are finite, so the result
  // is the plain product of the zero-masked tile, bit for bit.
  const long n = 13, m = 4;
  RowMatrix<double> L = random_matrix<double>(n, n, 5);
  for (long i = 0; i < n; ++i)
    for (long j = i + 1; j < n; ++j) L(i, j) = 0;
  const RowMatrix<double> X = random_matrix<double>(n, m, 6);
  RowMatrix<double> Y(n, m);
  detail::masked_product(
      L, [](long) { return 0L; }, [](long i) { return i + 1; }, X, Y, false);
  const RowMatrix<double> plain = L * X;
  REQUIRE(Y == plain);
  // And with a NaN in X's last row, the rows that cannot see it match to rounding.
  RowMatrix<double> Xb = X;
  Xb(n - 1, 2) = kNaN;
  detail::masked_product(
      L, [](long) { return 0L; }, [](long i) { return i + 1; }, Xb, Y, false);
  REQUIRE(Y.topRows(n - 1).allFinite());
  REQUIRE(test::relative_rms(Y.topRows(n - 1), plain.topRows(n - 1)) < 1e-14);
  REQUIRE(std::isnan(Y(n - 1, 2)));
}

TEST_CASE("views_overlap tells column blocks of one buffer apart", "[aliasing]") {
  RowMatrix<double> buf(6, 10);
  using detail::memory_view;
  using detail::views_overlap;
  const auto left = buf.leftCols(4), right = buf.rightCols(6), mid = buf.middleCols(3, 2);
  CHECK_FALSE(views_overlap(memory_view(left), memory_view(right)));
  CHECK(views_overlap(memory_view(left), memory_view(mid)));
  CHECK(views_overlap(memory_view(mid), memory_view(right)));
  CHECK(views_overlap(memory_view(buf), memory_view(buf.block(2, 3, 1, 1))));
  CHECK_FALSE(views_overlap(memory_view(buf.topRows(3)), memory_view(buf.bottomRows(3))));
  CHECK(views_overlap(memory_view(buf.topRows(4)), memory_view(buf.bottomRows(3))));
  // Column-major and a vector inside a row.
  Eigen::MatrixXd cm(5, 4);
  CHECK_FALSE(views_overlap(memory_view(cm.leftCols(2)), memory_view(cm.rightCols(2))));
  CHECK(views_overlap(memory_view(cm.col(1)), memory_view(cm.block(2, 1, 1, 3))));
  const Eigen::Map<Eigen::VectorXd> row2(buf.row(2).data(), 10);
  CHECK(views_overlap(memory_view(row2), memory_view(right)));
  CHECK_FALSE(views_overlap(memory_view(row2), memory_view(buf.row(3))));
  // Empty views overlap nothing.
  CHECK_FALSE(views_overlap(memory_view(buf.leftCols(0)), memory_view(buf)));
}

TEMPLATE_TEST_CASE("outputs that alias inputs are rejected", "[aliasing]", float, double) {
  using T = TestType;
  const long n = 12, d = 4;
  RowMatrix<T> q = random_matrix<T>(n, d, 7), k = random_matrix<T>(n, d, 8), v = random_matrix<T>(n, d, 9);
  RowMatrix<T> out(n, d), dout = random_matrix<T>(n, d, 10), dq(n, d), dk(n, d), gv(n, d);
  SoftmaxCache<T> sc;
  const SoftmaxAttentionOptions sopt;
  MesaCache<T> mc;
  const MesaOptions<T> mopt;

  // Forwards: out is q, k or v.
  for (RowMatrix<T>* in : {&q, &k, &v}) {
    CHECK_THROWS_AS(linear_attention_forward<T>(q, k, v, *in), std::invalid_argument);
    CHECK_THROWS_AS(linear_attention_forward_chunked<T>(q, k, v, *in, 4), std::invalid_argument);
    CHECK_THROWS_AS(softmax_attention_forward<T>(q, k, v, sopt, *in, sc), std::invalid_argument);
    CHECK_THROWS_AS(reference::linear_attention_forward<T>(q, k, v, *in), std::invalid_argument);
    CHECK_THROWS_AS(reference::softmax_attention_forward<T>(q, k, v, *in), std::invalid_argument);
    CHECK_THROWS_AS(mesa_forward<T>(q, k, v, mopt, *in, mc), std::invalid_argument);
    CHECK_THROWS_AS(reference::mesa_forward<T>(q, k, v, mopt, *in), std::invalid_argument);
  }
  CHECK_THROWS_WITH(mesa_forward<T>(q, k, v, mopt, k, mc), Catch::Contains("out shares memory with k"));
  CHECK_THROWS_WITH(linear_attention_forward<T>(q, k, v, v), Catch::Contains("out shares memory with v"));

  // Backwards: a gradient is an input, or two gradients share memory.
  linear_attention_forward<T>(q, k, v, out);
  softmax_attention_forward<T>(q, k, v, sopt, out, sc);
  mesa_forward<T>(q, k, v, mopt, out, mc);
  CHECK_THROWS_WITH(mesa_backward<T>(q, k, v, mopt, dout, mc, dq, dk, dq), Catch::Contains("dq shares memory with grad_v"));
  CHECK_THROWS_AS(mesa_backward<T>(q, k, v, mopt, dout, mc, v, dk, gv), std::invalid_argument);
  CHECK_THROWS_AS(reference::mesa_backward<T>(q, k, v, mopt, dout, dq, dout, gv), std::invalid_argument);
  CHECK_THROWS_WITH(linear_attention_backward<T>(q, k, v, dout, dout, dk, gv), Catch::Contains("dq shares memory with dout"));
  CHECK_THROWS_WITH(linear_attention_backward<T>(q, k, v, dout, dq, dq, gv), Catch::Contains("dq shares memory with dk"));
  CHECK_THROWS_AS(linear_attention_backward_chunked<T>(q, k, v, dout, dq, k, gv, 4), std::invalid_argument);
  CHECK_THROWS_AS(softmax_attention_backward<T>(q, k, v, sopt, dout, sc, dq, dk, v), std::invalid_argument);
  CHECK_THROWS_AS(reference::linear_attention_backward<T>(q, k, v, dout, q, dk, gv), std::invalid_argument);
  CHECK_THROWS_AS(reference::softmax_attention_backward<T>(q, k, v, dout, dq, dk, dk), std::invalid_argument);

  // Steps: out is the token's q.
  LinearAttentionState<T> ls = linear_attention_initial_state<T>(d, d);
  Vector<T> tok = random_matrix<T>(1, d, 11).row(0).transpose(), kt = tok, vt = tok, ot(d);
  CHECK_THROWS_AS(linear_attention_step<T>(tok, kt, vt, ls, tok), std::invalid_argument);
  SoftmaxKVCache<T> kv(d, d);
  CHECK_THROWS_AS(softmax_attention_step<T>(tok, kt, vt, kv, vt), std::invalid_argument);
  CHECK(kv.length() == 0);  // rejected before anything was appended
  MesaState<T> ms = mesa_initial_state<T>(d, d, mopt);
  CHECK_THROWS_AS(mesa_step<T>(tok, kt, vt, mopt, ms, kt), std::invalid_argument);

  // Disjoint column blocks of one buffer are accepted and give the same result.
  RowMatrix<T> buf(n, 2 * d);
  buf.leftCols(d) = q;
  RowMatrix<T> expected(n, d);
  linear_attention_forward<T>(q, k, v, expected);
  linear_attention_forward<T>(buf.leftCols(d), k, v, buf.rightCols(d));
  CHECK(RowMatrix<T>(buf.rightCols(d)) == expected);
}

// Outputs must not depend on where the caller's memory starts. NumPy hands the
// Python package arrays 16 bytes apart from a 32-byte boundary as often as not;
// the softmax backward used to accumulate dq straight into such memory, and
// Eigen's small products peel unaligned leading entries off their vectorised
// loop, so dq changed in the last bits with the address (found by
// torch.autograd.gradcheck's reentrancy check, 2026-12-04).
namespace {
// A (rows x cols) row-major view that starts `offset` scalars past an aligned
// boundary of `buf`.
template <class T>
Eigen::Map<RowMatrix<T>> view_at(std::vector<T>& buf, long rows, long cols, long offset) {
  buf.assign(std::size_t(rows * cols + 64), T(0));
  T* base = buf.data();
  while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
  return Eigen::Map<RowMatrix<T>>(base + offset, rows, cols);
}
}  // namespace

TEMPLATE_TEST_CASE("the ops give the same bits wherever their outputs start", "[aliasing][alignment]", float,
                   double) {
  using T = TestType;
  for (const auto& dims : {std::array<long, 3>{7, 4, 2}, {37, 5, 3}, {150, 8, 8}, {130, 16, 4}}) {
    // plain variables, not a structured binding: clang 14 cannot capture those in the lambda below
    const long n = dims[0], d = dims[1], dv = dims[2];
    CAPTURE(n, d, dv);
    const RowMatrix<T> q = random_matrix<T>(n, d, 1, 0.5), k = random_matrix<T>(n, d, 2, 0.5);
    const RowMatrix<T> v = random_matrix<T>(n, dv, 3), g = random_matrix<T>(n, dv, 4);
    std::vector<T> b0, b1, b2, b3;
    // out, dq, dk, dv of one op at one offset (copied out of the buffers).
    using Results = std::array<RowMatrix<T>, 4>;
    const auto run = [&](long off, int op) {
      auto out = view_at(b0, n, dv, off);
      auto dq = view_at(b1, n, d, off);
      auto dk = view_at(b2, n, d, off);
      auto gv = view_at(b3, n, dv, off);
      if (op == 0) {
        linear_attention_forward<T>(q, k, v, out);
        linear_attention_backward<T>(q, k, v, g, dq, dk, gv);
      } else if (op == 1) {
        SoftmaxCache<T> c;
        const SoftmaxAttentionOptions opt{};  // the defaults the Python package uses
        softmax_attention_forward<T>(q, k, v, opt, out, c);
        softmax_attention_backward<T>(q, k, v, opt, g, c, dq, dk, gv);
      } else {
        MesaCache<T> c;
        const MesaOptions<T> opt{};
        mesa_forward<T>(q, k, v, opt, out, c);
        mesa_backward<T>(q, k, v, opt, g, c, dq, dk, gv);
      }
      return Results{out, dq, dk, gv};
    };
    for (int op = 0; op < 3; ++op) {
      CAPTURE(op);
      const Results ref = run(0, op);
      for (long off = 1; off < 8; ++off) {
        CAPTURE(off);
        const Results r = run(off, op);
        for (int j = 0; j < 4; ++j) {
          CAPTURE(j);
          CHECK(r[std::size_t(j)] == ref[std::size_t(j)]);
        }
      }
    }
  }
}

}  // namespace mesaopt_test_masking_aliasing
