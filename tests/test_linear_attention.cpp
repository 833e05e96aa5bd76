// Causal linear attention (docs/math.md §1, M1-M3): recurrent and chunked forms
// against the materialised reference, every backward against central finite
// differences, the one-step-of-GD identity, and bad input.
#include <catch2/catch.hpp>
#include <mesaopt/ops/linear_attention.hpp>
#include <mesaopt/ops/linear_attention_reference.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <functional>
#include <string>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_linear_attention {

using mesaopt::RowMatrix;
using mesaopt::test::random_matrix;
using mesaopt::test::relative_rms;

namespace {

using Forward = std::function<void(const RowMatrix<double>&, const RowMatrix<double>&, const RowMatrix<double>&,
                                   RowMatrix<double>&)>;
using Backward = std::function<void(const RowMatrix<double>&, const RowMatrix<double>&, const RowMatrix<double>&,
                                    const RowMatrix<double>&, RowMatrix<double>&, RowMatrix<double>&,
                                    RowMatrix<double>&)>;

// L = sum(out .* W) for a fixed random W, so dL/dout = W.
void gradcheck_all_inputs(const Forward& fwd, const Backward& bwd, long T, long d, long dv, std::uint64_t seed) {
  RowMatrix<double> q = random_matrix<double>(T, d, seed);
  RowMatrix<double> k = random_matrix<double>(T, d, seed + 1);
  RowMatrix<double> v = random_matrix<double>(T, dv, seed + 2);
  const RowMatrix<double> w = random_matrix<double>(T, dv, seed + 3);
  RowMatrix<double> out(T, dv);
  auto loss = [&] {
    fwd(q, k, v, out);
    return (out.array() * w.array()).sum();
  };
  // Prefill with garbage: the backward must overwrite, not accumulate.
  RowMatrix<double> dq = RowMatrix<double>::Constant(T, d, 1e3);
  RowMatrix<double> dk = RowMatrix<double>::Constant(T, d, 1e3);
  RowMatrix<double> dv_ = RowMatrix<double>::Constant(T, dv, 1e3);
  bwd(q, k, v, w, dq, dk, dv_);
  const auto rq = mesaopt::test::check_gradient(loss, q, dq);
  const auto rk = mesaopt::test::check_gradient(loss, k, dk);
  const auto rv = mesaopt::test::check_gradient(loss, v, dv_);
  INFO(rq.describe("dq"));
  INFO(rk.describe("dk"));
  INFO(rv.describe("dv"));
  CHECK(rq.error < 1e-6);
  CHECK(rk.error < 1e-6);
  CHECK(rv.error < 1e-6);
}

}  // namespace

TEST_CASE("linear attention backward matches finite differences (all forms, all inputs)") {
  // T >= 17; d, dv not multiples of any SIMD width.
  const long T = 19, d = 11, dv = 7;
  SECTION("recurrent") {
    gradcheck_all_inputs(
        [](auto& q, auto& k, auto& v, auto& o) { mesaopt::linear_attention_forward_recurrent(q, k, v, o); },
        [](auto& q, auto& k, auto& v, auto& g, auto& dq, auto& dk, auto& dv) {
          mesaopt::linear_attention_backward_recurrent(q, k, v, g, dq, dk, dv);
        },
        T, d, dv, 11);
  }
  for (long chunk : {1L, 4L, 5L, 19L, 64L}) {
    DYNAMIC_SECTION("chunked, chunk " << chunk) {
      gradcheck_all_inputs(
          [chunk](auto& q, auto& k, auto& v, auto& o) { mesaopt::linear_attention_forward_chunked(q, k, v, o, chunk); },
          [chunk](auto& q, auto& k, auto& v, auto& g, auto& dq, auto& dk, auto& dv) {
            mesaopt::linear_attention_backward_chunked(q, k, v, g, dq, dk, dv, chunk);
          },
          T, d, dv, 21);
    }
  }
  SECTION("dispatching entry points (recurrent side of the crossover)") {
    REQUIRE_FALSE(mesaopt::linear_attention_use_chunked(T, d, dv, sizeof(double)));
    gradcheck_all_inputs(
        [](auto& q, auto& k, auto& v, auto& o) { mesaopt::linear_attention_forward(q, k, v, o); },
        [](auto& q, auto& k, auto& v, auto& g, auto& dq, auto& dk, auto& dv) {
          mesaopt::linear_attention_backward(q, k, v, g, dq, dk, dv);
        },
        T, d, dv, 31);
  }
  SECTION("reference") {
    gradcheck_all_inputs(
        [](auto& q, auto& k, auto& v, auto& o) { mesaopt::reference::linear_attention_forward(q, k, v, o); },
        [](auto& q, auto& k, auto& v, auto& g, auto& dq, auto& dk, auto& dv) {
          mesaopt::reference::linear_attention_backward(q, k, v, g, dq, dk, dv);
        },
        T, d, dv, 41);
  }
}

TEMPLATE_TEST_CASE("linear attention: recurrent, chunked and reference agree at awkward sizes", "", float, double) {
  using T_ = TestType;
  const double tol = std::is_same<T_, float>::value ? 2e-5 : 1e-12;
  struct Size {
    long T, d, dv;
  };
  const std::vector<Size> sizes = {{1, 1, 1}, {1, 60, 5}, {7, 60, 5}, {7, 3, 17}, {63, 60, 5},
                                   {63, 17, 33}, {200, 60, 5}, {200, 9, 40}, {200, 33, 31}};
  std::uint64_t seed = 100;
  for (const auto& s : sizes) {
    const RowMatrix<T_> q = random_matrix<T_>(s.T, s.d, seed++);
    const RowMatrix<T_> k = random_matrix<T_>(s.T, s.d, seed++);
    const RowMatrix<T_> v = random_matrix<T_>(s.T, s.dv, seed++);
    const RowMatrix<T_> g = random_matrix<T_>(s.T, s.dv, seed++);
    RowMatrix<T_> o_ref(s.T, s.dv), dq_ref(s.T, s.d), dk_ref(s.T, s.d), dv_ref(s.T, s.dv);
    mesaopt::reference::linear_attention_forward(q, k, v, o_ref);
    mesaopt::reference::linear_attention_backward(q, k, v, g, dq_ref, dk_ref, dv_ref);

    RowMatrix<T_> o(s.T, s.dv), dq(s.T, s.d), dk(s.T, s.d), dv(s.T, s.dv);
    auto compare = [&](const std::string& what) {
      INFO(what << " T " << s.T << " d " << s.d << " dv " << s.dv);
      CHECK(relative_rms(o, o_ref) < tol);
      CHECK(relative_rms(dq, dq_ref) < tol);
      CHECK(relative_rms(dk, dk_ref) < tol);
      CHECK(relative_rms(dv, dv_ref) < tol);
    };
    mesaopt::linear_attention_forward_recurrent(q, k, v, o);
    mesaopt::linear_attention_backward_recurrent(q, k, v, g, dq, dk, dv);
    compare("recurrent");
    // Chunk sizes that do not divide T, one larger than T, and the default.
    for (long chunk : {0L, 1L, 5L, 16L, 64L, 256L}) {
      o.setConstant(T_(7));
      mesaopt::linear_attention_forward_chunked(q, k, v, o, chunk);
      mesaopt::linear_attention_backward_chunked(q, k, v, g, dq, dk, dv, chunk);
      compare("chunked " + std::to_string(chunk));
    }
    mesaopt::linear_attention_forward(q, k, v, o);
    mesaopt::linear_attention_backward(q, k, v, g, dq, dk, dv);
    compare("dispatch");
  }
}

TEST_CASE("linear attention dispatch follows linear_attention_use_chunked on both sides of the crossover") {
  // The rule itself (measured in docs/linear_attention.md): chunked once the
  // state St reaches 256 KiB and T >= 64.
  CHECK_FALSE(mesaopt::linear_attention_use_chunked(4096, 128, 128, 4));
  CHECK(mesaopt::linear_attention_use_chunked(4096, 256, 256, 4));
  CHECK(mesaopt::linear_attention_use_chunked(64, 128, 256, 8));
  CHECK_FALSE(mesaopt::linear_attention_use_chunked(63, 256, 256, 4));
  struct Size {
    long T, d, dv;
  };
  for (const Size s : {Size{70, 256, 256}, Size{70, 64, 64}, Size{40, 256, 256}}) {
    const bool chunked = mesaopt::linear_attention_use_chunked(s.T, s.d, s.dv, sizeof(float));
    INFO("T " << s.T << " d " << s.d << " dv " << s.dv << " chunked " << chunked);
    const RowMatrix<float> q = random_matrix<float>(s.T, s.d, 1), k = random_matrix<float>(s.T, s.d, 2);
    const RowMatrix<float> v = random_matrix<float>(s.T, s.dv, 3), g = random_matrix<float>(s.T, s.dv, 4);
    RowMatrix<float> o(s.T, s.dv), o_form(s.T, s.dv), dq(s.T, s.d), dk(s.T, s.d), dv(s.T, s.dv);
    RowMatrix<float> dq_form(s.T, s.d), dk_form(s.T, s.d), dv_form(s.T, s.dv);
    mesaopt::linear_attention_forward(q, k, v, o);
    mesaopt::linear_attention_backward(q, k, v, g, dq, dk, dv);
    if (chunked) {
      mesaopt::linear_attention_forward_chunked(q, k, v, o_form);
      mesaopt::linear_attention_backward_chunked(q, k, v, g, dq_form, dk_form, dv_form);
    } else {
      mesaopt::linear_attention_forward_recurrent(q, k, v, o_form);
      mesaopt::linear_attention_backward_recurrent(q, k, v, g, dq_form, dk_form, dv_form);
    }
    // Bitwise: the entry points must run exactly the chosen form.
    CHECK(o == o_form);
    CHECK(dq == dq_form);
    CHECK(dk == dk_form);
    CHECK(dv == dv_form);
  }
}

TEST_CASE("linear attention accepts strided views (blocks of wider matrices)") {
  const long T = 37, d = 13, dv = 6;
  const RowMatrix<float> wide = random_matrix<float>(T, 3 * d + 2 * dv + 5, 7);
  // q, k, v as column blocks of one packed (T, 3d+2dv+5) matrix: outer stride != cols.
  const auto q = wide.middleCols(1, d);
  const auto k = wide.middleCols(1 + d, d);
  const auto v = wide.middleCols(1 + 2 * d, dv);
  RowMatrix<float> out_wide = RowMatrix<float>::Zero(T, 2 * dv + 3);
  RowMatrix<float> o_ref(T, dv);
  mesaopt::reference::linear_attention_forward(RowMatrix<float>(q), RowMatrix<float>(k), RowMatrix<float>(v), o_ref);
  mesaopt::linear_attention_forward_recurrent(q, k, v, out_wide.middleCols(2, dv));
  CHECK(relative_rms(RowMatrix<float>(out_wide.middleCols(2, dv)), o_ref) < 1e-5);
  CHECK(out_wide.leftCols(2).isZero(0));
  CHECK(out_wide.rightCols(dv + 1).isZero(0));
  out_wide.setZero();
  mesaopt::linear_attention_forward_chunked(q, k, v, out_wide.middleCols(2, dv), 8);
  CHECK(relative_rms(RowMatrix<float>(out_wide.middleCols(2, dv)), o_ref) < 1e-5);
}

TEST_CASE("linear attention with the weights of docs/math.md §1 is one step of gradient descent") {
  // In-context regression: pairs (x_i, y_i), i = 1..n, then a query x.
  const long dx = 5, dy = 3;
  const double eta = 0.37;
  for (long n : {1L, 6L, 40L, 150L}) {
    const RowMatrix<double> X = random_matrix<double>(n, dx, 500 + n);   // x_i in rows
    const RowMatrix<double> Wstar = random_matrix<double>(dy, dx, 600 + n);
    const RowMatrix<double> Y = X * Wstar.transpose() + 0.1 * random_matrix<double>(n, dy, 700 + n);
    const RowMatrix<double> xq = random_matrix<double>(1, dx, 800 + n);

    // One GD step on L(W) = 1/2 sum_i ||y_i - W x_i||^2 from W_0 = 0:
    // grad L(W_0) = sum_i (W_0 x_i - y_i) x_i^T, W_1 = W_0 - eta grad.
    RowMatrix<double> W0 = RowMatrix<double>::Zero(dy, dx);
    RowMatrix<double> grad = RowMatrix<double>::Zero(dy, dx);
    for (long i = 0; i < n; ++i) {
      const Eigen::VectorXd xi = X.row(i).transpose();
      const Eigen::VectorXd yi = Y.row(i).transpose();
      grad += (W0 * xi - yi) * xi.transpose();
    }
    const RowMatrix<double> W1 = W0 - eta * grad;
    const Eigen::VectorXd gd_prediction = W1 * xq.row(0).transpose();

    // Tokens 1..n carry k_i = x_i, v_i = eta y_i; token n+1 carries k = x_query
    // and v = 0 (it is included by the causal diagonal but adds nothing), q = x_query.
    const long T = n + 1;
    RowMatrix<double> k(T, dx), v(T, dy);
    k.topRows(n) = X;
    k.row(n) = xq.row(0);
    v.topRows(n) = eta * Y;
    v.row(n).setZero();
    RowMatrix<double> q = random_matrix<double>(T, dx, 900 + n);  // earlier queries do not matter here
    q.row(n) = xq.row(0);

    RowMatrix<double> o(T, dy);
    INFO("n " << n);
    mesaopt::linear_attention_forward_recurrent(q, k, v, o);
    CHECK((o.row(n).transpose() - gd_prediction).norm() <= 1e-12 * (1 + gd_prediction.norm()));
    mesaopt::linear_attention_forward_chunked(q, k, v, o, 16);
    CHECK((o.row(n).transpose() - gd_prediction).norm() <= 1e-12 * (1 + gd_prediction.norm()));
    mesaopt::linear_attention_forward(q, k, v, o);
    CHECK((o.row(n).transpose() - gd_prediction).norm() <= 1e-12 * (1 + gd_prediction.norm()));
    // Sanity: the prediction is not trivially zero.
    CHECK(gd_prediction.norm() > 1e-3);
  }
}

TEST_CASE("linear attention rejects bad input with a message naming the argument") {
  using M = RowMatrix<float>;
  const M q = M::Ones(5, 4), k = M::Ones(5, 4), v = M::Ones(5, 3), g = M::Ones(5, 3);
  M out(5, 3), dq(5, 4), dk(5, 4), dv(5, 3);
  using Catch::Matchers::Contains;
  const M k_rows = M::Ones(6, 4), k_cols = M::Ones(5, 2), v_rows = M::Ones(4, 3);
  const M empty_q(0, 4), empty_k(0, 4), empty_v(0, 3), q_d0(5, 0), k_d0(5, 0), v_dv0(5, 0);
  M out0(0, 3), out_bad(5, 2), out_dv0(5, 0);

  for (int form = 0; form < 3; ++form) {
    auto fwd = [form](const M& q_, const M& k_, const M& v_, M& o_) {
      if (form == 0) mesaopt::linear_attention_forward(q_, k_, v_, o_);
      if (form == 1) mesaopt::linear_attention_forward_recurrent(q_, k_, v_, o_);
      if (form == 2) mesaopt::linear_attention_forward_chunked(q_, k_, v_, o_, 2);
    };
    auto bwd = [form](const M& q_, const M& k_, const M& v_, const M& g_, M& dq_, M& dk_, M& dv_) {
      if (form == 0) mesaopt::linear_attention_backward(q_, k_, v_, g_, dq_, dk_, dv_);
      if (form == 1) mesaopt::linear_attention_backward_recurrent(q_, k_, v_, g_, dq_, dk_, dv_);
      if (form == 2) mesaopt::linear_attention_backward_chunked(q_, k_, v_, g_, dq_, dk_, dv_, 2);
    };
    INFO("form " << form);
    CHECK_THROWS_WITH(fwd(q, k_rows, v, out), Contains("k is 6 x 4 but must be 5 x 4"));
    CHECK_THROWS_WITH(fwd(q, k_cols, v, out), Contains("k is 5 x 2 but must be 5 x 4"));
    CHECK_THROWS_WITH(fwd(q, k, v_rows, out), Contains("v is 4 x 3 but must be 5 x 3"));
    CHECK_THROWS_WITH(fwd(q, k, v, out_bad), Contains("out is 5 x 2 but must be 5 x 3"));
    CHECK_THROWS_WITH(fwd(empty_q, empty_k, empty_v, out0), Contains("seq_len (rows of q) must be at least 1, got 0"));
    CHECK_THROWS_WITH(fwd(q_d0, k_d0, v, out), Contains("d (columns of q) must be at least 1, got 0"));
    CHECK_THROWS_WITH(fwd(q, k, v_dv0, out_dv0), Contains("dv (columns of v) must be at least 1, got 0"));
    CHECK_THROWS_AS(fwd(q, k_rows, v, out), std::invalid_argument);

    M dq_bad(5, 3), dv_bad(4, 3);
    const M g_bad = M::Ones(5, 4);
    CHECK_THROWS_WITH(bwd(q, k, v, g_bad, dq, dk, dv), Contains("dout is 5 x 4 but must be 5 x 3"));
    CHECK_THROWS_WITH(bwd(q, k, v, g, dq_bad, dk, dv), Contains("dq is 5 x 3 but must be 5 x 4"));
    CHECK_THROWS_WITH(bwd(q, k, v, g, dq, dq_bad, dv), Contains("dk is 5 x 3 but must be 5 x 4"));
    CHECK_THROWS_WITH(bwd(q, k, v, g, dq, dk, dv_bad), Contains("grad_v is 4 x 3 but must be 5 x 3"));
    CHECK_THROWS_WITH(bwd(q, k_rows, v, g, dq, dk, dv), Contains("k is 6 x 4"));
    CHECK_THROWS_WITH(bwd(empty_q, empty_k, empty_v, g, dq, dk, dv), Contains("seq_len (rows of q)"));
  }
  CHECK_THROWS_WITH(mesaopt::linear_attention_forward_chunked(q, k, v, out, -1), Contains("chunk must be >= 0"));
  CHECK_THROWS_WITH(mesaopt::linear_attention_backward_chunked(q, k, v, g, dq, dk, dv, -3),
                    Contains("chunk must be >= 0 (0 = default), got -3"));
  CHECK_THROWS_WITH(mesaopt::reference::linear_attention_forward(q, k_rows, v, out), Contains("k is 6 x 4"));
}

}  // namespace mesaopt_test_linear_attention
