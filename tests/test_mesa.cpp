// Tests of the mesa op (include/mesaopt/ops/mesa.hpp): forward against the
// direct ridge solve at every position, backward against central finite
// differences for every input and parameter, chunk-size invariance, float
// precision on long sequences, the cache's memory, and bad input.
#include <catch2/catch.hpp>
#include <mesaopt/ops/mesa.hpp>
#include <mesaopt/ops/mesa_reference.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_mesa {

using mesaopt::MesaCache;
using mesaopt::MesaOptions;
using mesaopt::RowMatrix;
namespace test = mesaopt::test;

namespace {

// Rows scaled to norm `norm` (unit-norm keys for the precision tests).
template <class T>
RowMatrix<T> normalized_rows(long rows, long cols, std::uint64_t seed, double norm) {
  RowMatrix<double> m = test::random_matrix<double>(rows, cols, seed);
  for (long i = 0; i < rows; ++i) m.row(i) *= norm / m.row(i).norm();
  return m.cast<T>();
}

// max_t ||a_t - b_t|| / ||b_t||: the worst relative error over positions.
double max_row_relative(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  double worst = 0;
  for (long t = 0; t < a.rows(); ++t) {
    const double den = std::max(b.row(t).norm(), 1e-300);
    worst = std::max(worst, (a.row(t) - b.row(t)).norm() / den);
  }
  return worst;
}

template <class T>
RowMatrix<T> run_forward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v,
                         const MesaOptions<T>& opt, MesaCache<T>& cache) {
  RowMatrix<T> out(q.rows(), v.cols());
  mesaopt::mesa_forward(q, k, v, opt, out, cache);
  return out;
}

struct Grads {
  RowMatrix<double> dq, dk, dv;
  double dlambda = 0, dforget = 0;
};

Grads run_backward(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v,
                   const MesaOptions<double>& opt, const RowMatrix<double>& dout) {
  MesaCache<double> cache;
  run_forward(q, k, v, opt, cache);
  Grads g;
  g.dq.resize(q.rows(), q.cols());
  g.dk.resize(k.rows(), k.cols());
  g.dv.resize(v.rows(), v.cols());
  g.dlambda = mesaopt::mesa_backward(q, k, v, opt, dout, cache, g.dq, g.dk, g.dv, &g.dforget);
  return g;
}

}  // namespace

TEST_CASE("mesa forward equals the direct ridge solve at every position (double)", "[mesa]") {
  struct Case {
    long T, d, dv;
    double lambda, gamma;
  };
  const Case cases[] = {{40, 11, 7, 1.0, 1.0},  {33, 1, 1, 0.5, 1.0},   {50, 8, 8, 3.0, 1.0},
                        {64, 17, 16, 1.0, 1.0}, {30, 33, 5, 0.7, 1.0},  {40, 11, 7, 1.0, 0.9},
                        {33, 1, 1, 0.5, 0.8},   {64, 17, 16, 2.0, 0.97}, {30, 33, 5, 0.7, 0.95}};
  for (const Case& c : cases) {
    const auto q = test::random_matrix<double>(c.T, c.d, 11 + c.d, 1.0 / std::sqrt(double(c.d)));
    const auto k = test::random_matrix<double>(c.T, c.d, 23 + c.d, 1.0 / std::sqrt(double(c.d)));
    const auto v = test::random_matrix<double>(c.T, c.dv, 37 + c.dv);
    MesaOptions<double> opt;
    opt.lambda = c.lambda;
    opt.forget = c.gamma;
    MesaCache<double> cache;
    const RowMatrix<double> out = run_forward(q, k, v, opt, cache);
    const RowMatrix<double> ref = mesaopt::reference::mesa_forward_direct(q, k, v, c.lambda, c.gamma);
    const double err = max_row_relative(out, ref);
    INFO("T=" << c.T << " d=" << c.d << " dv=" << c.dv << " lambda=" << c.lambda << " gamma=" << c.gamma
              << " max relative error over t: " << err);
    CHECK(err < 1e-10);

    // The plain Eigen recursion (the benchmark's baseline) agrees too.
    RowMatrix<double> naive(c.T, c.dv);
    mesaopt::reference::mesa_forward<double>(q, k, v, opt, naive);
    CHECK(max_row_relative(naive, ref) < 1e-10);
  }
}

TEST_CASE("mesa forward accepts strided views and writes only its output rows", "[mesa]") {
  const long T = 21, d = 9, dv = 5;
  const auto big = test::random_matrix<double>(T, 2 * d + dv, 5, 0.4);
  const RowMatrix<double> q = big.leftCols(d), k = big.middleCols(d, d), v = big.rightCols(dv);
  MesaOptions<double> opt;
  MesaCache<double> c1, c2;
  const RowMatrix<double> out = run_forward(q, k, v, opt, c1);
  RowMatrix<double> wide = RowMatrix<double>::Constant(T, dv + 3, 42.0);
  mesaopt::mesa_forward(big.leftCols(d), big.middleCols(d, d), big.rightCols(dv), opt, wide.leftCols(dv), c2);
  CHECK((wide.leftCols(dv) - out).cwiseAbs().maxCoeff() == 0.0);
  CHECK((wide.rightCols(3).array() == 42.0).all());
}

TEST_CASE("mesa backward matches central finite differences (double)", "[mesa][grad]") {
  struct Case {
    long T, d, dv;
    double lambda, gamma;
  };
  const Case cases[] = {{19, 11, 7, 0.8, 1.0}, {19, 11, 7, 1.3, 0.85}, {17, 5, 9, 2.0, 0.93}, {18, 1, 3, 0.6, 0.9}};
  for (const Case& c : cases) {
    RowMatrix<double> q = test::random_matrix<double>(c.T, c.d, 101 + c.d, 0.5);
    RowMatrix<double> k = test::random_matrix<double>(c.T, c.d, 202 + c.d, 0.5);
    RowMatrix<double> v = test::random_matrix<double>(c.T, c.dv, 303 + c.dv);
    const RowMatrix<double> dout = test::random_matrix<double>(c.T, c.dv, 404);  // L = sum dout .* out
    MesaOptions<double> opt;
    opt.lambda = c.lambda;
    opt.forget = c.gamma;
    opt.chunk = 4;
    const Grads g = run_backward(q, k, v, opt, dout);

    MesaCache<double> cache;
    RowMatrix<double> out(c.T, c.dv);
    auto loss = [&] {
      mesaopt::mesa_forward(q, k, v, opt, out, cache);
      return (out.array() * dout.array()).sum();
    };
    INFO("T=" << c.T << " d=" << c.d << " dv=" << c.dv << " lambda=" << c.lambda << " gamma=" << c.gamma);
    const auto rq = test::check_gradient(loss, q, g.dq);
    const auto rk = test::check_gradient(loss, k, g.dk);
    const auto rv = test::check_gradient(loss, v, g.dv);
    const auto rl = test::check_gradient(loss, opt.lambda, g.dlambda);
    CHECK(opt.lambda == c.lambda);
    INFO(rq.describe("dq") << "\n" << rk.describe("dk") << "\n" << rv.describe("dv") << "\n"
                           << rl.describe("dlambda"));
    CHECK(rq.error < 1e-6);
    CHECK(rk.error < 1e-6);
    CHECK(rv.error < 1e-6);
    CHECK(rl.error < 1e-6);
    // gamma = 1 is the boundary of (0, 1]: use a one-sided check there by
    // moving the evaluation point slightly inside (the formula is analytic in gamma).
    if (c.gamma < 1.0) {
      const auto rf = test::check_gradient(loss, opt.forget, g.dforget);
      INFO(rf.describe("dforget"));
      CHECK(rf.error < 1e-6);
    }
  }
}

TEST_CASE("mesa dforget near gamma = 1 matches finite differences", "[mesa][grad]") {
  // Central differences need gamma + h <= 1: evaluate at 1 - 1e-4 and compare with gamma = 1 exactly.
  const long T = 20, d = 6, dv = 4;
  RowMatrix<double> q = test::random_matrix<double>(T, d, 1, 0.5), k = test::random_matrix<double>(T, d, 2, 0.5);
  RowMatrix<double> v = test::random_matrix<double>(T, dv, 3);
  const RowMatrix<double> dout = test::random_matrix<double>(T, dv, 4);
  MesaOptions<double> opt;
  opt.forget = 1.0 - 1e-4;
  const Grads g = run_backward(q, k, v, opt, dout);
  MesaCache<double> cache;
  RowMatrix<double> out(T, dv);
  auto loss = [&] {
    mesaopt::mesa_forward(q, k, v, opt, out, cache);
    return (out.array() * dout.array()).sum();
  };
  const auto rf = test::check_gradient(loss, opt.forget, g.dforget, 1e-6);
  INFO(rf.describe("dforget"));
  CHECK(rf.error < 1e-6);
  // At gamma = 1 exactly the gradient is the continuous limit.
  MesaOptions<double> one;
  const Grads g1 = run_backward(q, k, v, one, dout);
  CHECK(std::abs(g1.dforget - g.dforget) < 1e-2 * std::abs(g.dforget));
}

TEST_CASE("mesa gradients do not depend on the checkpoint interval", "[mesa][grad]") {
  const long T = 23, d = 13, dv = 10;
  const auto q = test::random_matrix<double>(T, d, 7, 0.5), k = test::random_matrix<double>(T, d, 8, 0.5);
  const auto v = test::random_matrix<double>(T, dv, 9);
  const auto dout = test::random_matrix<double>(T, dv, 10);
  for (double gamma : {1.0, 0.9}) {
    MesaOptions<double> opt;
    opt.lambda = 1.7;
    opt.forget = gamma;
    opt.chunk = 0;
    const Grads ref = run_backward(q, k, v, opt, dout);
    for (long C : {1L, 4L, T, 5 * T}) {
      opt.chunk = C;
      const Grads g = run_backward(q, k, v, opt, dout);
      INFO("gamma=" << gamma << " chunk=" << C);
      // Recomputation from a checkpoint reproduces the forward bitwise, so only the
      // grouping of the scalar sums may differ.
      CHECK(test::relative_rms(g.dq, ref.dq) < 1e-13);
      CHECK(test::relative_rms(g.dk, ref.dk) < 1e-13);
      CHECK(test::relative_rms(g.dv, ref.dv) < 1e-13);
      CHECK(std::abs(g.dlambda - ref.dlambda) <= 1e-12 * std::abs(ref.dlambda));
      CHECK(std::abs(g.dforget - ref.dforget) <= 1e-12 * std::abs(ref.dforget));
    }
  }
}

TEST_CASE("mesa float backward agrees with double", "[mesa][grad]") {
  const long T = 300, d = 19, dv = 12;
  const auto q = normalized_rows<double>(T, d, 1, 1.0), k = normalized_rows<double>(T, d, 2, 1.0);
  const auto v = test::random_matrix<double>(T, dv, 3);
  const auto dout = test::random_matrix<double>(T, dv, 4);
  for (double gamma : {1.0, 0.98}) {
    MesaOptions<double> od;
    od.forget = gamma;
    const Grads gd = run_backward(q, k, v, od, dout);
    MesaOptions<float> of;
    of.forget = static_cast<float>(gamma);
    MesaCache<float> cache;
    RowMatrix<float> out(T, dv), dq(T, d), dk(T, d), dvv(T, dv);
    mesaopt::mesa_forward(q.cast<float>(), k.cast<float>(), v.cast<float>(), of, out, cache);
    float dforget = 0;
    const float dlambda = mesaopt::mesa_backward(q.cast<float>(), k.cast<float>(), v.cast<float>(), of,
                                                 dout.cast<float>(), cache, dq, dk, dvv, &dforget);
    const double eq = test::relative_rms(dq, gd.dq), ek = test::relative_rms(dk, gd.dk),
                 ev = test::relative_rms(dvv, gd.dv);
    const double el = std::abs(dlambda - gd.dlambda) / std::abs(gd.dlambda);
    const double ef = std::abs(dforget - gd.dforget) / std::abs(gd.dforget);
    WARN("float vs double gradients, T=" << T << " gamma=" << gamma << ": dq " << eq << ", dk " << ek << ", dv "
                                         << ev << ", dlambda " << el << ", dforget " << ef);
    CHECK(eq < 1e-4);
    CHECK(ek < 1e-4);
    CHECK(ev < 1e-4);
    CHECK(el < 1e-4);
    CHECK(ef < 1e-3);
  }
}

TEST_CASE("mesa float32 precision on long sequences", "[mesa][precision]") {
  const long d = 32, dv = 32;
  struct Case {
    long T;
    double lambda, key_norm, bound_last, bound_all;
  };
  // Bounds: the measured errors of docs/mesa.md with a margin of 5-10; the hard
  // case's last-10% bound 1e-4 is the requirement. In the hard case the early
  // positions (few keys, lambda = 100: an ill-conditioned ridge problem) carry
  // most of the error, hence the looser bound over all positions.
  const long Tlong = test::kSanitized ? 8192 : 65536;
  const Case cases[] = {{4096, 1.0, 1.0, 1e-5, 1e-5},
                        {Tlong, 1.0, 1.0, 1e-4, 3e-5},
                        {4096, 100.0, 4.0, 1e-4, 1e-3},
                        {Tlong, 100.0, 4.0, 1e-4, 1e-3}};
  for (const Case& c : cases) {
    const auto q = normalized_rows<double>(c.T, d, 71, 1.0);
    const auto k = normalized_rows<double>(c.T, d, 72, c.key_norm);
    const auto v = test::random_matrix<double>(c.T, dv, 73);
    MesaOptions<double> od;
    od.lambda = c.lambda;
    MesaOptions<float> of;
    of.lambda = static_cast<float>(c.lambda);
    MesaCache<double> cd;
    MesaCache<float> cf;
    const RowMatrix<double> ref = run_forward(q, k, v, od, cd);
    const RowMatrix<float> out = run_forward<float>(q.cast<float>(), k.cast<float>(), v.cast<float>(), of, cf);
    const long tail = c.T / 10;
    const double all = test::relative_rms(out, ref);
    const double last = test::relative_rms(out.bottomRows(tail), ref.bottomRows(tail));
    WARN("float32 vs double, d=32, T=" << c.T << " lambda=" << c.lambda << " |k|=" << c.key_norm
                                       << ": relative RMS error all " << all << ", last 10% " << last);
    CHECK(last < c.bound_last);
    CHECK(all < c.bound_all);
  }
}

TEST_CASE("mesa cache is far smaller than storing every R_t", "[mesa]") {
  const long T = 4096, d = 64, dv = 64;
  const auto q = test::random_matrix<float>(T, d, 1, 0.125), k = test::random_matrix<float>(T, d, 2, 0.125);
  const auto v = test::random_matrix<float>(T, dv, 3);
  MesaOptions<float> opt;
  MesaCache<float> cache;
  const RowMatrix<float> out = run_forward(q, k, v, opt, cache);
  RowMatrix<float> dq(T, d), dk(T, d), dvv(T, dv);
  mesaopt::mesa_backward(q, k, v, opt, out, cache, dq, dk, dvv);  // allocates the backward scratch too
  const double all_R = double(T) * d * d * sizeof(float);
  WARN("cache at T=4096, d=dv=64, float: " << cache.bytes() << " bytes, chunk C=" << cache.chunk() << ", "
                                           << cache.num_checkpoints() << " checkpoints; all R_t: " << all_R
                                           << " bytes");
  CHECK(cache.bytes() < all_R / 10);
  CHECK(dq.allFinite());
}

TEST_CASE("mesa rejects bad input", "[mesa][errors]") {
  using Catch::Matchers::Contains;
  const RowMatrix<double> q = test::random_matrix<double>(6, 4, 1), k = test::random_matrix<double>(6, 4, 2);
  const RowMatrix<double> v = test::random_matrix<double>(6, 3, 3);
  RowMatrix<double> out(6, 3);
  MesaOptions<double> opt;
  MesaCache<double> cache;
  auto fwd = [&](const RowMatrix<double>& qq, const RowMatrix<double>& kk, const RowMatrix<double>& vv,
                 const MesaOptions<double>& o, RowMatrix<double>& oo) {
    mesaopt::mesa_forward(qq, kk, vv, o, oo, cache);
  };
  RowMatrix<double> out5(5, 3), out63(6, 2), empty_out(0, 3);
  CHECK_THROWS_WITH(fwd(q, k.topRows(5), v, opt, out), Contains("k is 5 x 4 but must be 6 x 4"));
  CHECK_THROWS_WITH(fwd(q, k.leftCols(3), v, opt, out), Contains("k is 6 x 3"));
  CHECK_THROWS_WITH(fwd(q, k, v.topRows(5), opt, out), Contains("v is 5 x 3 but must be 6 x 3"));
  CHECK_THROWS_WITH(fwd(q, k, v, opt, out5), Contains("out is 5 x 3 but must be 6 x 3"));
  CHECK_THROWS_WITH(fwd(q, k, v, opt, out63), Contains("out is 6 x 2"));
  CHECK_THROWS_WITH(fwd(q.topRows(0), k.topRows(0), v.topRows(0), opt, empty_out), Contains("seq_len (rows of q)"));
  RowMatrix<double> q0(6, 0), out60(6, 0);
  CHECK_THROWS_WITH(fwd(q0, q0, v, opt, out), Contains("d (columns of q) must be at least 1, got 0"));
  CHECK_THROWS_WITH(fwd(q, k, out60, opt, out60), Contains("dv (columns of v) must be at least 1, got 0"));
  for (double lam : {0.0, -1.0, double(INFINITY), double(NAN)}) {
    MesaOptions<double> o;
    o.lambda = lam;
    CHECK_THROWS_WITH(fwd(q, k, v, o, out), Contains("opt.lambda must be finite and > 0"));
  }
  for (double gam : {0.0, -0.5, 1.5, double(NAN)}) {
    MesaOptions<double> o;
    o.forget = gam;
    CHECK_THROWS_WITH(fwd(q, k, v, o, out), Contains("opt.forget must lie in (0, 1]"));
  }
  {
    MesaOptions<double> o;
    o.chunk = -3;
    CHECK_THROWS_WITH(fwd(q, k, v, o, out), Contains("opt.chunk must be >= 0 (0 = automatic), got -3"));
  }

  // Backward: shapes of dout and the gradient buffers, and a cache from other sizes/options.
  fwd(q, k, v, opt, out);
  RowMatrix<double> dq(6, 4), dk(6, 4), dv(6, 3), bad(5, 4);
  CHECK_NOTHROW(mesaopt::mesa_backward(q, k, v, opt, out, cache, dq, dk, dv));
  CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, opt, out5, cache, dq, dk, dv), Contains("dout is 5 x 3"));
  CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, opt, out, cache, bad, dk, dv), Contains("dq is 5 x 4"));
  CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, opt, out, cache, dq, bad, dv), Contains("dk is 5 x 4"));
  CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, opt, out, cache, dq, dk, out5), Contains("grad_v is 5 x 3"));
  {
    MesaCache<double> fresh;
    CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, opt, out, fresh, dq, dk, dv),
                      Contains("cache is for seq_len = 0, d = 0, dv = 0 but the inputs have seq_len = 6, d = 4, dv = 3"));
  }
  {
    MesaCache<double> other;
    RowMatrix<double> o7(7, 3);
    mesaopt::mesa_forward(test::random_matrix<double>(7, 4, 1), test::random_matrix<double>(7, 4, 2),
                          test::random_matrix<double>(7, 3, 3), opt, o7, other);
    CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, opt, out, other, dq, dk, dv), Contains("cache is for seq_len = 7"));
    RowMatrix<double> o5(6, 3);
    mesaopt::mesa_forward(test::random_matrix<double>(6, 5, 1), test::random_matrix<double>(6, 5, 2), v, opt, o5,
                          other);
    CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, opt, out, other, dq, dk, dv), Contains("d = 5"));
  }
  {
    MesaOptions<double> o2;
    o2.lambda = 2.0;
    CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, o2, out, cache, dq, dk, dv),
                      Contains("cache was made with lambda = 1"));
  }
  {
    MesaOptions<double> o3;
    o3.forget = 2.0;
    CHECK_THROWS_WITH(mesaopt::mesa_backward(q, k, v, o3, out, cache, dq, dk, dv), Contains("opt.forget"));
  }
}

}  // namespace mesaopt_test_mesa
