// Numerical reliability of the mesa op and layer (docs/mesa.md, "Numerical
// safety"; docs/math.md M20-M22):
//  (a) a recursion that rounding destroys stops with MesaBreakdownError naming
//      the position and lambda |k_t|^2 (op, step, layer with sequence and head)
//      instead of returning NaN; moderate lambda |k|^2 stays accurate;
//  (b) MesaRegularizer::constant: forward against the direct ridge solve and the
//      explicit-inverse reference, gamma = 1 against the decaying mode, every
//      gradient against central differences, state, split, step, layer; and the
//      subspace case where the decaying mode fails and the constant one does not;
//  (c) the references validate their arguments;
//  (d) subnormal lambda and forget are rejected (op, step, references, layer).
// The hidden test "[.measure]" prints the safe range of lambda |k|^2 quoted in
// docs/mesa.md.
#include <catch2/catch.hpp>
#include <mesaopt/layers/mesa_layer.hpp>
#include <mesaopt/ops/mesa.hpp>
#include <mesaopt/ops/mesa_reference.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <Eigen/Cholesky>
#include <Eigen/QR>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_mesa_numerics {

using Catch::Matchers::Contains;
using mesaopt::MesaBreakdownError;
using mesaopt::MesaCache;
using mesaopt::MesaOptions;
using mesaopt::MesaRegularizer;
using mesaopt::MesaState;
using mesaopt::RowMatrix;
namespace test = mesaopt::test;

namespace {

// rows x cols, every row scaled to norm `norm`.
template <class T>
RowMatrix<T> unit_rows(long rows, long cols, std::uint64_t seed, double norm = 1.0) {
  RowMatrix<double> m = test::random_matrix<double>(rows, cols, seed);
  for (long i = 0; i < rows; ++i) m.row(i) *= norm / m.row(i).norm();
  return m.cast<T>();
}

// max_t ||a_t - b_t|| / ||b_t||; infinity if a has a non-finite entry.
template <class A, class B>
double max_row_relative(const A& a, const B& b) {
  const RowMatrix<double> x = a.template cast<double>(), y = b.template cast<double>();
  if (!x.allFinite()) return INFINITY;
  double worst = 0;
  for (long t = 0; t < x.rows(); ++t)
    worst = std::max(worst, (x.row(t) - y.row(t)).norm() / std::max(y.row(t).norm(), 1e-300));
  return worst;
}

template <class T>
MesaOptions<T> options(double lambda, double gamma, MesaRegularizer reg, long chunk = 0) {
  MesaOptions<T> o;
  o.lambda = static_cast<T>(lambda);
  o.forget = static_cast<T>(gamma);
  o.regularizer = reg;
  o.chunk = chunk;
  return o;
}

template <class T>
RowMatrix<T> run_forward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, const MesaOptions<T>& opt,
                         const MesaState<T>* initial = nullptr, MesaState<T>* final = nullptr) {
  MesaCache<T> cache;
  RowMatrix<T> out(q.rows(), v.cols());
  mesaopt::mesa_forward<T>(q, k, v, opt, out, cache, initial, final);
  return out;
}

// A random orthonormal basis B (d x m) and keys k_i = B z_i of unit norm: they
// span an m-dimensional subspace, m < d, and leave d - m directions unspanned.
struct SubspaceKeys {
  RowMatrix<double> basis;  // (d, m)
  RowMatrix<double> z;      // (T, m): the keys' coordinates in the basis
  RowMatrix<double> k;      // (T, d) = z B^T
};
SubspaceKeys subspace_keys(long T, long d, long m, std::uint64_t seed) {
  SubspaceKeys s;
  const Eigen::MatrixXd g = test::random_matrix<double>(d, m, seed);
  s.basis = Eigen::HouseholderQR<Eigen::MatrixXd>(g).householderQ() * Eigen::MatrixXd::Identity(d, m);
  s.z = unit_rows<double>(T, m, seed + 1);
  s.k = s.z * s.basis.transpose();
  return s;
}

// The constant-mode (or any) op's gradients, with optional state arguments.
struct Grads {
  RowMatrix<double> dq, dk, dv;
  double dlambda = 0, dforget = 0;
  MesaState<double> ginit;
};
Grads run_backward(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v,
                   const MesaOptions<double>& opt, const RowMatrix<double>& w, const MesaState<double>* initial,
                   const MesaState<double>* grad_final) {
  MesaCache<double> cache;
  RowMatrix<double> out(q.rows(), v.cols());
  mesaopt::mesa_forward<double>(q, k, v, opt, out, cache, initial);
  Grads g;
  g.dq.resize(q.rows(), q.cols());
  g.dk.resize(k.rows(), k.cols());
  g.dv.resize(v.rows(), v.cols());
  g.dlambda = mesaopt::mesa_backward<double>(q, k, v, opt, w, cache, g.dq, g.dk, g.dv, &g.dforget, initial,
                                             grad_final, &g.ginit);
  return g;
}


// A symmetric positive definite state: the final state of a warm-up sequence.
MesaState<double> warm_state(long d, long dv, MesaRegularizer reg, std::uint64_t seed) {
  const long n = 7;
  const RowMatrix<double> q = test::random_matrix<double>(n, d, seed, 0.5), k = test::random_matrix<double>(n, d, seed + 1, 0.5);
  const RowMatrix<double> v = test::random_matrix<double>(n, dv, seed + 2);
  MesaState<double> s;
  run_forward<double>(q, k, v, options<double>(1.3, 0.9, reg), nullptr, &s);
  return s;
}

}  // namespace

// ===========================================================================
// (a) Breakdown detection

TEST_CASE("float: a key with lambda |k|^2 beyond 1/epsilon stops with MesaBreakdownError at its position",
          "[numerics][breakdown]") {
  const long T = 40, d = 32, dv = 8, bad = 10;
  const RowMatrix<float> q = unit_rows<float>(T, d, 1), v = test::random_matrix<float>(T, dv, 3);
  RowMatrix<float> k = unit_rows<float>(T, d, 2);
  k.row(bad).setZero();
  k(bad, 5) = 1e4f;  // lambda |k|^2 = 1e8 (lambda = 1): den = 1 + k^T R k ~ 1e8 > 1/epsilon_float = 1.7e7
  const MesaOptions<float> opt = options<float>(1.0, 1.0, MesaRegularizer::decaying);
  MesaCache<float> cache;
  RowMatrix<float> out = RowMatrix<float>::Zero(T, dv);
  bool thrown = false;
  try {
    mesaopt::mesa_forward<float>(q, k, v, opt, out, cache);
  } catch (const MesaBreakdownError& e) {
    thrown = true;
    INFO(e.what());
    CHECK(e.position() == bad);
    CHECK(e.batch() == -1);
    CHECK_THAT(e.what(), Contains("mesa_forward: numerical breakdown at position t = 10"));
    CHECK_THAT(e.what(), Contains("lambda |k_t|^2 = 1e+08"));
    CHECK_THAT(e.what(), Contains("cancelled every significant digit"));
    CHECK_THAT(e.what(), Contains("docs/mesa.md, \"Numerical safety\""));
  }
  INFO("without the check the output would be " << (out.allFinite() ? "finite (and wrong)" : "NaN"));
  CHECK(thrown);
  CHECK(out.topRows(bad).allFinite());
  // A forward that threw leaves no usable cache behind.
  RowMatrix<float> dq(T, d), dk(T, d), dvv(T, dv);
  CHECK_THROWS_WITH(mesaopt::mesa_backward<float>(q, k, v, opt, out, cache, dq, dk, dvv),
                    Contains("cache is for seq_len = 0"));

  // The decoding step stops at the same token and leaves the state unchanged.
  MesaState<float> s = mesaopt::mesa_initial_state<float>(d, dv, opt);
  Eigen::VectorXf o(dv);
  long failed_at = -1;
  for (long t = 0; t < T && failed_at < 0; ++t) {
    const MesaState<float> before = s;
    try {
      mesaopt::mesa_step(q.row(t), k.row(t), v.row(t), opt, s, o);
    } catch (const MesaBreakdownError& e) {
      failed_at = t;
      CHECK_THAT(e.what(), Contains("mesa_step: numerical breakdown at position t = 0"));
      CHECK((s.R.array() == before.R.array()).all());
      CHECK((s.S.array() == before.S.array()).all());
    }
  }
  CHECK(failed_at == bad);
}

TEST_CASE("a denominator below gamma/2 (R not positive definite) or a non-finite key is a breakdown, not NaN",
          "[numerics][breakdown]") {
  const long d = 2, dv = 1;
  // An indefinite initial R passes the state checks (symmetric, finite); the first
  // key sees k^T R k = -1, so den = gamma - 1 = 0 < gamma/2.
  MesaState<double> indefinite{RowMatrix<double>::Zero(d, d), RowMatrix<double>::Zero(dv, d)};
  indefinite.R(0, 0) = 1;
  indefinite.R(1, 1) = -1;
  RowMatrix<double> q(1, d), k(1, d), v(1, dv);
  q << 1, 1;
  k << 0, 1;
  v << 1;
  const MesaOptions<double> opt;
  RowMatrix<double> out(1, dv);
  MesaCache<double> cache;
  try {
    mesaopt::mesa_forward<double>(q, k, v, opt, out, cache, &indefinite);
    FAIL("no MesaBreakdownError");
  } catch (const MesaBreakdownError& e) {
    CHECK(e.position() == 0);
    CHECK_THAT(e.what(), Contains("lost positive definiteness"));
    CHECK_THAT(e.what(), Contains("started from a given initial state"));
  }
  MesaState<double> s = indefinite;
  Eigen::VectorXd o(dv);
  CHECK_THROWS_AS(mesaopt::mesa_step(q.row(0), k.row(0), v.row(0), opt, s, o), MesaBreakdownError);
  CHECK((s.R.array() == indefinite.R.array()).all());

  // A NaN in a key: both modes stop at that token instead of propagating NaN.
  for (MesaRegularizer reg : {MesaRegularizer::decaying, MesaRegularizer::constant}) {
    const long T = 12;
    const RowMatrix<float> qq = unit_rows<float>(T, 6, 4), vv = test::random_matrix<float>(T, 3, 6);
    RowMatrix<float> kk = unit_rows<float>(T, 6, 5);
    kk(7, 2) = std::numeric_limits<float>::quiet_NaN();
    RowMatrix<float> oo(T, 3);
    MesaCache<float> c;
    INFO("regularizer " << (reg == MesaRegularizer::constant ? "constant" : "decaying"));
    try {
      mesaopt::mesa_forward<float>(qq, kk, vv, options<float>(1.0, 0.9, reg), oo, c);
      FAIL("no MesaBreakdownError");
    } catch (const MesaBreakdownError& e) {
      CHECK(e.position() == 7);
      CHECK_THAT(e.what(), Contains("not finite"));
    }
  }
}

TEST_CASE("double: lambda = 1e30 stops cleanly with a std::runtime_error, not NaN and not invalid_argument",
          "[numerics][breakdown]") {
  const long T = 50, d = 20, dv = 5;
  const RowMatrix<double> q = unit_rows<double>(T, d, 7), k = unit_rows<double>(T, d, 8),
                          v = test::random_matrix<double>(T, dv, 9);
  for (MesaRegularizer reg : {MesaRegularizer::decaying, MesaRegularizer::constant}) {
    const bool constant = reg == MesaRegularizer::constant;
    INFO("regularizer " << (constant ? "constant" : "decaying"));
    RowMatrix<double> out(T, dv);
    MesaCache<double> cache;
    bool runtime_error = false;
    try {
      mesaopt::mesa_forward<double>(q, k, v, options<double>(1e30, constant ? 0.9 : 1.0, reg), out, cache);
      // The constant mode may legitimately succeed: its P_t >= I/lambda needs no cancellation.
      if (constant) CHECK(out.allFinite());
    } catch (const std::invalid_argument& e) {
      FAIL("std::invalid_argument: " << e.what());
    } catch (const std::runtime_error& e) {
      runtime_error = true;
      const auto* b = dynamic_cast<const MesaBreakdownError*>(&e);
      REQUIRE(b != nullptr);
      INFO(e.what());
      CHECK_THAT(e.what(), Contains("lambda |k_t|^2 = 1e+30"));
    }
    if (!constant) CHECK(runtime_error);
  }
}

TEST_CASE("moderate lambda |k|^2 stays accurate against the direct ridge solve", "[numerics][breakdown]") {
  // Inside the measured safe range of docs/mesa.md with a margin: float within 1e-3 up to
  // lambda |k|^2 ~ 1e3 (here 100), double within 1e-9 up to ~ 5e5 (here 1e4).
  const long T = 256;
  for (long d : {20L, 32L, 64L}) {
    const RowMatrix<double> q = unit_rows<double>(T, d, 11), k = unit_rows<double>(T, d, 12),
                            v = test::random_matrix<double>(T, d, 13);
    for (double lambda : {1.0, 100.0}) {
      const RowMatrix<double> ref = mesaopt::reference::mesa_forward_direct(q, k, v, lambda);
      const RowMatrix<float> of = run_forward<float>(q.cast<float>(), k.cast<float>(), v.cast<float>(),
                                                     options<float>(lambda, 1.0, MesaRegularizer::decaying));
      INFO("d = " << d << ", lambda |k|^2 = " << lambda << ", float max relative error " << max_row_relative(of, ref));
      CHECK(max_row_relative(of, ref) < 1e-3);
    }
    const RowMatrix<double> ref = mesaopt::reference::mesa_forward_direct(q, k, v, 1e4);
    const RowMatrix<double> od = run_forward<double>(q, k, v, options<double>(1e4, 1.0, MesaRegularizer::decaying));
    INFO("d = " << d << ", lambda |k|^2 = 1e4, double max relative error " << max_row_relative(od, ref));
    CHECK(max_row_relative(od, ref) < 1e-9);
  }
}

TEST_CASE("MesaLayer names the sequence and head of a breakdown, in forward and step", "[numerics][breakdown][layers]") {
  mesaopt::MesaLayerConfig c;
  c.D = 8;
  c.H = 2;
  c.d = 4;
  c.dv = 4;
  c.num_threads = 2;
  mesaopt::MesaLayer<float> layer(c);
  layer.init(3, 0.2);
  layer.lambda_raw()(1) = 1e9f;  // head 1: lambda = softplus(1e9) = 1e9
  const long B = 2, T = 6;
  RowMatrix<float> x = test::random_matrix<float>(B * T, c.D, 4);
  x.topRows(T) *= 1e-6f;  // sequence 0: tiny keys, lambda |k|^2 ~ 1e-3; sequence 1: ~ 1e9
  mesaopt::MesaLayerCache<float> cache;
  try {
    layer.forward(x, T, cache);
    FAIL("no MesaBreakdownError");
  } catch (const MesaBreakdownError& e) {
    INFO(e.what());
    CHECK(e.batch() == 1);
    CHECK(e.head() == 1);
    CHECK(e.position() == 0);
    CHECK_THAT(e.what(), Contains("MesaLayer::forward: sequence b = 1, head h = 1: mesa_forward: numerical breakdown "
                                  "at position t = 0"));
  }
  auto state = layer.initial_state(B);
  RowMatrix<float> x_t(B, c.D), y_t(B, c.D);
  x_t.row(0) = x.row(0);
  x_t.row(1) = x.row(T);
  try {
    layer.step(x_t, state, y_t);
    FAIL("no MesaBreakdownError");
  } catch (const MesaBreakdownError& e) {
    INFO(e.what());
    CHECK(e.batch() == 1);
    CHECK(e.head() == 1);
    CHECK_THAT(e.what(), Contains("MesaLayer::step: sequence b = 1, head h = 1: mesa_step: numerical breakdown"));
  }
  // A sane lambda runs.
  layer.lambda_raw()(1) = 0.5f;
  CHECK_NOTHROW(layer.forward(x, T, cache));
}

// ===========================================================================
// (b) Forgetting with keys in a subspace: decaying fails, constant does not

namespace {
template <class T>
void check_subspace_case() {
  const long Tn = 2000, d = 20, m = 8, dv = 6;
  const double gamma = 0.9, lambda = 1.0;
  const SubspaceKeys sk = subspace_keys(Tn, d, m, 21);
  const RowMatrix<T> q = unit_rows<T>(Tn, d, 22), k = sk.k.cast<T>(), v = test::random_matrix<T>(Tn, dv, 23);
  const RowMatrix<double> qd = q.template cast<double>(), kd = k.template cast<double>(), vd = v.template cast<double>();
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-10;

  // Constant: finite and equal to the direct solve of the same objective at every position.
  const RowMatrix<T> oc = run_forward<T>(q, k, v, options<T>(lambda, gamma, MesaRegularizer::constant));
  const RowMatrix<double> ref_c =
      mesaopt::reference::mesa_forward_direct(qd, kd, vd, lambda, gamma, nullptr, MesaRegularizer::constant);
  const double err_c = max_row_relative(oc, ref_c);
  INFO("constant mode, max relative error over 2000 positions: " << err_c);
  CHECK(oc.allFinite());
  CHECK(err_c < tol);

  // Decaying: the exact answer only involves the spanned subspace, so the
  // m-dimensional direct solve on the coordinates z (and q B) is its reference.
  const RowMatrix<double> ref_d = mesaopt::reference::mesa_forward_direct(qd * sk.basis, sk.z, vd, lambda, gamma);
  bool broke = false;
  long position = -1;
  double err_d = INFINITY;
  try {
    const RowMatrix<T> od = run_forward<T>(q, k, v, options<T>(lambda, gamma, MesaRegularizer::decaying));
    err_d = max_row_relative(od, ref_d);
  } catch (const MesaBreakdownError& e) {
    broke = true;
    position = e.position();
  }
  WARN("subspace keys (m = 8 of d = 20), gamma = 0.9, " << (std::is_same_v<T, float> ? "float" : "double")
                                                        << ": decaying mode "
                                                        << (broke ? "broke down at t = " + std::to_string(position)
                                                                  : "error " + std::to_string(err_d))
                                                        << "; constant mode max relative error " << err_c);
  // Documents the failure the constant mode fixes: the decaying recursion either
  // stops or is far off.
  CHECK((broke || err_d > 1e-2));
}
}  // namespace

TEST_CASE("forgetting with keys in a subspace: the constant regulariser stays accurate where the decaying one breaks",
          "[numerics][constant]") {
  SECTION("float") { check_subspace_case<float>(); }
  SECTION("double") { check_subspace_case<double>(); }
}

// ===========================================================================
// (b) The constant regulariser: forward

TEST_CASE("constant regulariser: forward equals the direct ridge solve and the explicit-inverse reference (double)",
          "[numerics][constant]") {
  struct Case {
    long T, d, dv;
    double lambda, gamma;
  };
  const Case cases[] = {{40, 11, 7, 1.0, 0.9},  {33, 1, 1, 0.5, 0.8},  {64, 17, 16, 2.0, 0.97},
                        {30, 33, 5, 0.7, 0.95}, {50, 8, 8, 3.0, 1.0},  {45, 20, 20, 1.0, 0.5}};
  for (const Case& c : cases) {
    const auto q = test::random_matrix<double>(c.T, c.d, 11 + c.d, 1.0 / std::sqrt(double(c.d)));
    const auto k = test::random_matrix<double>(c.T, c.d, 23 + c.d, 1.0 / std::sqrt(double(c.d)));
    const auto v = test::random_matrix<double>(c.T, c.dv, 37 + c.dv);
    for (bool with_initial : {false, true}) {
      const MesaState<double> init = warm_state(c.d, c.dv, MesaRegularizer::constant, 5);
      const MesaState<double>* initial = with_initial ? &init : nullptr;
      const MesaOptions<double> opt = options<double>(c.lambda, c.gamma, MesaRegularizer::constant, 7);
      MesaState<double> fin;
      const RowMatrix<double> out = run_forward<double>(q, k, v, opt, initial, &fin);
      const RowMatrix<double> ref =
          mesaopt::reference::mesa_forward_direct(q, k, v, c.lambda, c.gamma, initial, MesaRegularizer::constant);
      RowMatrix<double> naive(c.T, c.dv);
      MesaState<double> naive_fin;
      mesaopt::reference::mesa_forward<double>(q, k, v, opt, naive, initial, &naive_fin);
      INFO("T=" << c.T << " d=" << c.d << " dv=" << c.dv << " lambda=" << c.lambda << " gamma=" << c.gamma
                << " initial=" << with_initial << ": vs direct " << max_row_relative(out, ref) << ", vs reference "
                << max_row_relative(out, naive));
      CHECK(max_row_relative(out, ref) < 1e-10);
      CHECK(max_row_relative(naive, ref) < 1e-10);
      CHECK(test::relative_rms(fin.R, naive_fin.R) < 1e-10);
      CHECK(test::relative_rms(fin.S, naive_fin.S) < 1e-12);
      CHECK((fin.R - fin.R.transpose()).cwiseAbs().maxCoeff() == 0.0);  // R_T symmetric to the bit
    }
    if (c.gamma < 1) {  // the two objectives differ when gamma < 1
      const RowMatrix<double> decaying = run_forward<double>(q, k, v, options<double>(c.lambda, c.gamma, MesaRegularizer::decaying));
      const RowMatrix<double> constant = run_forward<double>(q, k, v, options<double>(c.lambda, c.gamma, MesaRegularizer::constant));
      CHECK(max_row_relative(constant, decaying) > 1e-6);
    }
  }
}

TEST_CASE("constant regulariser at gamma = 1 equals the decaying one to rounding", "[numerics][constant]") {
  const long T = 300, d = 20, dv = 12;
  const RowMatrix<double> q = unit_rows<double>(T, d, 31), k = unit_rows<double>(T, d, 32),
                          v = test::random_matrix<double>(T, dv, 33);
  for (double lambda : {0.3, 1.0, 10.0}) {
    const RowMatrix<double> dd = run_forward<double>(q, k, v, options<double>(lambda, 1.0, MesaRegularizer::decaying));
    const RowMatrix<double> dc = run_forward<double>(q, k, v, options<double>(lambda, 1.0, MesaRegularizer::constant));
    const RowMatrix<float> fd = run_forward<float>(q.cast<float>(), k.cast<float>(), v.cast<float>(),
                                                   options<float>(lambda, 1.0, MesaRegularizer::decaying));
    const RowMatrix<float> fc = run_forward<float>(q.cast<float>(), k.cast<float>(), v.cast<float>(),
                                                   options<float>(lambda, 1.0, MesaRegularizer::constant));
    INFO("lambda " << lambda << ": double " << max_row_relative(dc, dd) << ", float " << max_row_relative(fc, fd));
    CHECK(max_row_relative(dc, dd) < 1e-12);
    CHECK(max_row_relative(fc, fd) < 5e-5);
  }
}

// ===========================================================================
// (b) The constant regulariser: backward

TEST_CASE("constant regulariser: every gradient matches central finite differences (double)",
          "[numerics][constant][grad]") {
  const long T = 17, d = 5, dv = 3;
  for (double gamma : {0.85, 0.93, 1.0}) {
    for (bool with_initial : {false, true}) {
      for (bool with_final : {false, true}) {
        RowMatrix<double> q = test::random_matrix<double>(T, d, 101, 0.5), k = test::random_matrix<double>(T, d, 202, 0.5);
        RowMatrix<double> v = test::random_matrix<double>(T, dv, 303);
        const RowMatrix<double> w = test::random_matrix<double>(T, dv, 404);
        const MesaState<double> wfin{test::random_matrix<double>(d, d, 505), test::random_matrix<double>(dv, d, 606)};
        MesaState<double> init = warm_state(d, dv, MesaRegularizer::constant, 707);
        MesaOptions<double> opt = options<double>(1.3, gamma, MesaRegularizer::constant, 4);
        const MesaState<double>* initial = with_initial ? &init : nullptr;
        auto loss = [&] {
          MesaState<double> fin;
          const RowMatrix<double> out = run_forward<double>(q, k, v, opt, initial, &fin);
          double l = (out.array() * w.array()).sum();
          if (with_final) l += (fin.R.array() * wfin.R.array()).sum() + (fin.S.array() * wfin.S.array()).sum();
          return l;
        };
        const Grads g = run_backward(q, k, v, opt, w, initial, with_final ? &wfin : nullptr);
        INFO("gamma " << gamma << ", initial " << with_initial << ", grad_final " << with_final);
        auto check = [](const test::GradCheckResult& r, const std::string& what, bool nontrivial = true) {
          INFO(r.describe(what));
          CHECK(r.error < 1e-6);
          if (nontrivial) CHECK(r.scale > 1e-4);
        };
        check(test::check_gradient(loss, q, g.dq), "dq");
        check(test::check_gradient(loss, k, g.dk), "dk");
        check(test::check_gradient(loss, v, g.dv), "grad_v");
        // lambda enters every token's ridge (1 - gamma)/lambda I, and R_0 = lambda I without a state;
        // with a state at gamma = 1 it is unused and the gradient is exactly 0.
        const double lambda0 = opt.lambda;
        check(test::check_gradient(loss, opt.lambda, g.dlambda), "dlambda", !(with_initial && gamma == 1.0));
        CHECK(opt.lambda == lambda0);
        if (with_initial && gamma == 1.0) CHECK(g.dlambda == 0.0);
        if (gamma < 1.0) check(test::check_gradient(loss, opt.forget, g.dforget), "dforget");
        if (with_initial) {
          check(mesaopt::test::fd_matrix(loss, init.R, g.ginit.R, true), "grad_initial.R");
          check(mesaopt::test::fd_matrix(loss, init.S, g.ginit.S, false), "grad_initial.S");
        }
      }
    }
  }
  // dforget next to gamma = 1 (central differences need gamma + h <= 1).
  RowMatrix<double> q = test::random_matrix<double>(T, d, 1, 0.5), k = test::random_matrix<double>(T, d, 2, 0.5);
  RowMatrix<double> v = test::random_matrix<double>(T, dv, 3);
  const RowMatrix<double> w = test::random_matrix<double>(T, dv, 4);
  MesaOptions<double> opt = options<double>(0.8, 1.0 - 1e-4, MesaRegularizer::constant);
  const Grads g = run_backward(q, k, v, opt, w, nullptr, nullptr);
  auto loss = [&] { return (run_forward<double>(q, k, v, opt).array() * w.array()).sum(); };
  const auto rf = test::check_gradient(loss, opt.forget, g.dforget, 1e-6);
  INFO(rf.describe("dforget at 1 - 1e-4"));
  CHECK(rf.error < 1e-6);
}

TEST_CASE("constant regulariser: backward equals the reference's total-adjoint formulas and ignores the chunk",
          "[numerics][constant][grad]") {
  const long T = 23, d = 13, dv = 10;
  const auto q = test::random_matrix<double>(T, d, 7, 0.5), k = test::random_matrix<double>(T, d, 8, 0.5);
  const auto v = test::random_matrix<double>(T, dv, 9);
  const auto w = test::random_matrix<double>(T, dv, 10);
  const MesaState<double> wfin{test::random_matrix<double>(d, d, 11), test::random_matrix<double>(dv, d, 12)};
  const MesaState<double> init = warm_state(d, dv, MesaRegularizer::constant, 13);
  for (double gamma : {1.0, 0.9}) {
    for (bool with_state : {false, true}) {
      MesaOptions<double> opt = options<double>(1.7, gamma, MesaRegularizer::constant);
      const MesaState<double>* initial = with_state ? &init : nullptr;
      const MesaState<double>* gfin = with_state ? &wfin : nullptr;
      const Grads ref = run_backward(q, k, v, opt, w, initial, gfin);
      RowMatrix<double> dq(T, d), dk(T, d), dvv(T, dv);
      double dforget = 0;
      MesaState<double> ginit;
      const double dlambda = mesaopt::reference::mesa_backward<double>(q, k, v, opt, w, dq, dk, dvv, &dforget, initial,
                                                                       gfin, &ginit);
      INFO("gamma " << gamma << ", state " << with_state);
      CHECK(test::relative_rms(ref.dq, dq) < 1e-10);
      CHECK(test::relative_rms(ref.dk, dk) < 1e-10);
      CHECK(test::relative_rms(ref.dv, dvv) < 1e-10);
      CHECK(std::abs(ref.dlambda - dlambda) <= 1e-9 * std::max(1.0, std::abs(dlambda)));
      CHECK(std::abs(ref.dforget - dforget) <= 1e-9 * std::abs(dforget));
      CHECK(test::relative_rms(ref.ginit.R, ginit.R) < 1e-9);
      CHECK(test::relative_rms(ref.ginit.S, ginit.S) < 1e-10);
      for (long C : {1L, 4L, T, 5 * T}) {
        opt.chunk = C;
        const Grads g = run_backward(q, k, v, opt, w, initial, gfin);
        INFO("chunk " << C);
        // Recomputation from a checkpoint reproduces the forward bitwise: only the
        // grouping of the scalar sums may differ.
        CHECK(test::relative_rms(g.dq, ref.dq) < 1e-13);
        CHECK(test::relative_rms(g.dk, ref.dk) < 1e-13);
        CHECK(test::relative_rms(g.dv, ref.dv) < 1e-13);
        CHECK(std::abs(g.dlambda - ref.dlambda) <= 1e-12 * std::max(1.0, std::abs(ref.dlambda)));
        CHECK(std::abs(g.dforget - ref.dforget) <= 1e-12 * std::abs(ref.dforget));
      }
    }
  }
}

TEST_CASE("constant regulariser: float backward agrees with double", "[numerics][constant][grad]") {
  const long T = 300, d = 19, dv = 12;
  const auto q = unit_rows<double>(T, d, 1), k = unit_rows<double>(T, d, 2);
  const auto v = test::random_matrix<double>(T, dv, 3);
  const auto w = test::random_matrix<double>(T, dv, 4);
  for (double gamma : {1.0, 0.98, 0.9}) {
    const Grads gd = run_backward(q, k, v, options<double>(1.0, gamma, MesaRegularizer::constant), w, nullptr, nullptr);
    const MesaOptions<float> of = options<float>(1.0, gamma, MesaRegularizer::constant);
    MesaCache<float> cache;
    RowMatrix<float> out(T, dv), dq(T, d), dk(T, d), dvv(T, dv);
    mesaopt::mesa_forward<float>(q.cast<float>(), k.cast<float>(), v.cast<float>(), of, out, cache);
    float dforget = 0;
    const float dlambda = mesaopt::mesa_backward<float>(q.cast<float>(), k.cast<float>(), v.cast<float>(), of,
                                                        w.cast<float>(), cache, dq, dk, dvv, &dforget);
    const double eq = test::relative_rms(dq, gd.dq), ek = test::relative_rms(dk, gd.dk), ev = test::relative_rms(dvv, gd.dv);
    const double el = std::abs(dlambda - gd.dlambda) / std::abs(gd.dlambda);
    const double ef = std::abs(dforget - gd.dforget) / std::abs(gd.dforget);
    WARN("constant mode, float vs double gradients, T=" << T << " gamma=" << gamma << ": dq " << eq << ", dk " << ek
                                                        << ", dv " << ev << ", dlambda " << el << ", dforget " << ef);
    CHECK(eq < 1e-4);
    CHECK(ek < 1e-4);
    CHECK(ev < 1e-4);
    CHECK(el < 1e-3);
    CHECK(ef < 1e-3);
  }
}

// ===========================================================================
// (b) The constant regulariser: carried state, splits, steps

TEST_CASE("constant regulariser: a split sequence, a chained backward and token steps equal the whole sequence",
          "[numerics][constant][state]") {
  const long T = 29, d = 6, dv = 4, cut = 11;
  const RowMatrix<double> q = test::random_matrix<double>(T, d, 41, 0.5), k = test::random_matrix<double>(T, d, 42, 0.5);
  const RowMatrix<double> v = test::random_matrix<double>(T, dv, 43), w = test::random_matrix<double>(T, dv, 44);
  const MesaOptions<double> opt = options<double>(0.9, 0.92, MesaRegularizer::constant, 5);
  MesaState<double> whole_fin;
  const RowMatrix<double> whole = run_forward<double>(q, k, v, opt, nullptr, &whole_fin);
  const Grads gw = run_backward(q, k, v, opt, w, nullptr, nullptr);

  // Two pieces, the final state carried (in place: final may alias initial).
  const RowMatrix<double> q1 = q.topRows(cut), k1 = k.topRows(cut), v1 = v.topRows(cut), w1 = w.topRows(cut);
  const RowMatrix<double> q2 = q.bottomRows(T - cut), k2 = k.bottomRows(T - cut), v2 = v.bottomRows(T - cut),
                          w2 = w.bottomRows(T - cut);
  MesaState<double> s;
  MesaCache<double> c1, c2;
  RowMatrix<double> o1(cut, dv), o2(T - cut, dv);
  mesaopt::mesa_forward<double>(q1, k1, v1, opt, o1, c1, nullptr, &s);
  const MesaState<double> s1 = s;
  mesaopt::mesa_forward<double>(q2, k2, v2, opt, o2, c2, &s, &s);
  CHECK(test::relative_rms(o1, whole.topRows(cut)) < 1e-12);
  CHECK(test::relative_rms(o2, whole.bottomRows(T - cut)) < 1e-10);
  CHECK(test::relative_rms(s.R, whole_fin.R) < 1e-10);
  CHECK(test::relative_rms(s.S, whole_fin.S) < 1e-12);

  // Chained backward: the second piece's grad_initial is the first piece's grad_final.
  RowMatrix<double> dq2(T - cut, d), dk2(T - cut, d), dv2(T - cut, dv), dq1(cut, d), dk1(cut, d), dv1(cut, dv);
  double df1 = 0, df2 = 0;
  MesaState<double> g1;
  const double dl2 = mesaopt::mesa_backward<double>(q2, k2, v2, opt, w2, c2, dq2, dk2, dv2, &df2, &s1, nullptr, &g1);
  const double dl1 = mesaopt::mesa_backward<double>(q1, k1, v1, opt, w1, c1, dq1, dk1, dv1, &df1, nullptr, &g1);
  CHECK(dl2 != 0.0);  // lambda enters the second piece's ridge too
  RowMatrix<double> dq(T, d), dk(T, d), dvv(T, dv);
  dq << dq1, dq2;
  dk << dk1, dk2;
  dvv << dv1, dv2;
  CHECK(test::relative_rms(dq, gw.dq) < 1e-9);
  CHECK(test::relative_rms(dk, gw.dk) < 1e-9);
  CHECK(test::relative_rms(dvv, gw.dv) < 1e-9);
  CHECK(std::abs(dl1 + dl2 - gw.dlambda) < 1e-9 * std::abs(gw.dlambda));
  CHECK(std::abs(df1 + df2 - gw.dforget) < 1e-9 * std::abs(gw.dforget));

  // Token by token.
  MesaState<double> st = mesaopt::mesa_initial_state<double>(d, dv, opt);
  RowMatrix<double> stepped(T, dv);
  for (long t = 0; t < T; ++t) {
    Eigen::VectorXd o(dv);
    mesaopt::mesa_step(q.row(t), k.row(t), v.row(t), opt, st, o);
    stepped.row(t) = o.transpose();
  }
  CHECK(test::relative_rms(stepped, whole) < 1e-10);
  CHECK(test::relative_rms(st.R, whole_fin.R) < 1e-10);

  // The backward refuses a cache of the other regulariser, and an initial R the constant mode cannot invert.
  MesaOptions<double> other = opt;
  other.regularizer = MesaRegularizer::decaying;
  CHECK_THROWS_WITH(mesaopt::mesa_backward<double>(q1, k1, v1, other, w1, c1, dq1, dk1, dv1),
                    Contains("cache was made with regularizer = constant but opt has regularizer = decaying"));
  MesaState<double> indefinite = s1;
  indefinite.R = -s1.R;
  CHECK_THROWS_AS(mesaopt::mesa_forward<double>(q2, k2, v2, opt, o2, c2, &indefinite), std::invalid_argument);
  CHECK_THROWS_WITH(mesaopt::mesa_forward<double>(q2, k2, v2, opt, o2, c2, &indefinite),
                    Contains("initial.R is not positive definite"));
  Eigen::VectorXd o(dv);
  CHECK_THROWS_WITH(mesaopt::mesa_step(q.row(0), k.row(0), v.row(0), opt, indefinite, o),
                    Contains("state.R is not positive definite"));
  MesaOptions<double> bad = opt;
  bad.regularizer = static_cast<MesaRegularizer>(7);
  CHECK_THROWS_WITH(run_forward<double>(q, k, v, bad), Contains("opt.regularizer must be MesaRegularizer::decaying"));
}

TEST_CASE("MesaLayer with the constant regulariser: gamma = 1 equals decaying, gradients match finite differences",
          "[numerics][constant][layers]") {
  auto config = [](MesaRegularizer reg, bool learn_forget, double forget) {
    mesaopt::MesaLayerConfig c;
    c.D = 6;
    c.H = 2;
    c.d = 3;
    c.dv = 2;
    c.learn_forget = learn_forget;
    c.forget_init = forget;
    c.regularizer = reg;
    c.chunk = 3;
    return c;
  };
  const long B = 2, T = 7;
  const RowMatrix<double> x = test::random_matrix<double>(B * T, 6, 51);
  {
    mesaopt::MesaLayer<double> dec(config(MesaRegularizer::decaying, false, 1.0));
    mesaopt::MesaLayer<double> con(config(MesaRegularizer::constant, false, 1.0));
    dec.init(9, 0.4);
    con.init(9, 0.4);
    mesaopt::MesaLayerCache<double> c1, c2;
    CHECK(test::relative_rms(con.forward(x, T, c2), dec.forward(x, T, c1)) < 1e-12);
    mesaopt::MesaLayer<double> con9(config(MesaRegularizer::constant, false, 0.9));
    con9.init(9, 0.4);
    CHECK(test::relative_rms(con9.forward(x, T, c2), dec.forward(x, T, c1)) > 1e-6);
  }
  mesaopt::MesaLayer<double> layer(config(MesaRegularizer::constant, true, 0.85));
  layer.init(10, 0.4);
  layer.lambda_raw()(1) = 0.3;
  const RowMatrix<double> wy = test::random_matrix<double>(B * T, 6, 52);
  mesaopt::MesaLayerCache<double> cache;
  RowMatrix<double> xx = x;
  auto loss = [&] { return (layer.forward(xx, T, cache).array() * wy.array()).sum(); };
  std::vector<mesaopt::ParameterView<double>> params;
  layer.parameters(params, "");
  mesaopt::zero_grad(params);
  loss();
  RowMatrix<double> dx(B * T, 6);
  layer.backward(xx, T, wy, cache, dx);
  for (const auto& p : params) {
    const std::vector<double> analytic(p.grad, p.grad + p.size);
    const auto r = test::check_gradient(loss, p.value, analytic.data(), p.size);
    INFO(r.describe(p.name));
    CHECK(r.error < 1e-6);
    CHECK(r.scale > 1e-4);
  }
  const auto r = test::check_gradient(loss, xx, dx);
  INFO(r.describe("x"));
  CHECK(r.error < 1e-6);

  // Steps equal the forward.
  auto state = layer.initial_state(B);
  const RowMatrix<double> y = layer.forward(x, T, cache);
  RowMatrix<double> x_t(B, 6), y_t(B, 6), stepped(B * T, 6);
  for (long t = 0; t < T; ++t) {
    for (long b = 0; b < B; ++b) x_t.row(b) = x.row(b * T + t);
    layer.step(x_t, state, y_t);
    for (long b = 0; b < B; ++b) stepped.row(b * T + t) = y_t.row(b);
  }
  CHECK(test::relative_rms(stepped, y) < 1e-10);
  CHECK_THROWS_WITH(mesaopt::MesaLayer<double>(config(static_cast<MesaRegularizer>(5), false, 1.0)),
                    Contains("config.regularizer"));
}

// ===========================================================================
// (c) The references validate their arguments

TEST_CASE("the mesa references reject mismatched shapes with std::invalid_argument", "[numerics][errors]") {
  const RowMatrix<double> q = test::random_matrix<double>(6, 4, 1), k = test::random_matrix<double>(6, 4, 2);
  const RowMatrix<double> v = test::random_matrix<double>(6, 3, 3);
  const RowMatrix<double> k5 = k.topRows(5), k63 = k.leftCols(3), v5 = v.topRows(5);
  const MesaOptions<double> opt;
  namespace ref = mesaopt::reference;
  // The direct solve.
  CHECK_THROWS_AS(ref::mesa_forward_direct(q, k5, v, 1.0), std::invalid_argument);
  CHECK_THROWS_WITH(ref::mesa_forward_direct(q, k5, v, 1.0),
                    Contains("reference::mesa_forward_direct: k is 5 x 4 but must be 6 x 4"));
  CHECK_THROWS_WITH(ref::mesa_forward_direct(q, k63, v, 1.0), Contains("k is 6 x 3"));
  CHECK_THROWS_WITH(ref::mesa_forward_direct(q, k, v5, 1.0), Contains("v is 5 x 3 but must be 6 x 3"));
  const MesaState<double> bad_state{RowMatrix<double>::Identity(3, 3), RowMatrix<double>::Zero(3, 4)};
  CHECK_THROWS_WITH(ref::mesa_forward_direct(q, k, v, 1.0, 1.0, &bad_state), Contains("initial.R is 3 x 3"));
  CHECK_THROWS_WITH(ref::mesa_forward_direct(q, k, v, 1.0, 1.0, nullptr, static_cast<MesaRegularizer>(3)),
                    Contains("regularizer must be"));
  // The literal recursion.
  RowMatrix<double> out = RowMatrix<double>::Zero(6, 3), out5 = RowMatrix<double>::Zero(5, 3);
  CHECK_THROWS_WITH(ref::mesa_forward<double>(q, k5, v, opt, out), Contains("reference::mesa_forward: k is 5 x 4"));
  CHECK_THROWS_WITH(ref::mesa_forward<double>(q, k, v5, opt, out), Contains("v is 5 x 3"));
  CHECK_THROWS_WITH(ref::mesa_forward<double>(q, k, v, opt, out5), Contains("out is 5 x 3 but must be 6 x 3"));
  CHECK_THROWS_WITH(ref::mesa_forward<double>(q, k, v, opt, out, &bad_state), Contains("initial.R is 3 x 3"));
  // The backward.
  RowMatrix<double> dq(6, 4), dk(6, 4), dv(6, 3), bad(5, 4);
  CHECK_NOTHROW(ref::mesa_backward<double>(q, k, v, opt, out, dq, dk, dv));
  CHECK_THROWS_WITH(ref::mesa_backward<double>(q, k5, v, opt, out, dq, dk, dv),
                    Contains("reference::mesa_backward: k is 5 x 4"));
  CHECK_THROWS_WITH(ref::mesa_backward<double>(q, k, v, opt, out5, dq, dk, dv), Contains("dout is 5 x 3"));
  CHECK_THROWS_WITH(ref::mesa_backward<double>(q, k, v, opt, out, bad, dk, dv), Contains("dq is 5 x 4"));
  CHECK_THROWS_WITH(ref::mesa_backward<double>(q, k, v, opt, out, dq, bad, dv), Contains("dk is 5 x 4"));
  CHECK_THROWS_WITH(ref::mesa_backward<double>(q, k, v, opt, out, dq, dk, out5), Contains("grad_v is 5 x 3"));
  CHECK_THROWS_WITH(ref::mesa_backward<double>(q, k, v, opt, out, dq, dk, dv, nullptr, nullptr, &bad_state),
                    Contains("grad_final.R is 3 x 3"));
}

// ===========================================================================
// (d) Subnormal lambda and forget

namespace {
template <class T>
void check_subnormal_rejected() {
  const T sub = std::numeric_limits<T>::denorm_min() * T(1000);  // subnormal, > 0
  REQUIRE(sub > T(0));
  REQUIRE(sub < std::numeric_limits<T>::min());
  const RowMatrix<T> q = test::random_matrix<T>(6, 4, 1), k = test::random_matrix<T>(6, 4, 2),
                     v = test::random_matrix<T>(6, 3, 3);
  RowMatrix<T> out(6, 3);
  MesaCache<T> cache;
  for (MesaRegularizer reg : {MesaRegularizer::decaying, MesaRegularizer::constant}) {
    MesaOptions<T> lam = options<T>(1.0, 1.0, reg), gam = options<T>(1.0, 1.0, reg);
    lam.lambda = sub;
    gam.forget = sub;
    CHECK_THROWS_AS(mesaopt::mesa_forward<T>(q, k, v, lam, out, cache), std::invalid_argument);
    CHECK_THROWS_WITH(mesaopt::mesa_forward<T>(q, k, v, lam, out, cache),
                      Contains("mesa_forward: opt.lambda = ") && Contains("is subnormal"));
    CHECK_THROWS_WITH(mesaopt::mesa_forward<T>(q, k, v, gam, out, cache),
                      Contains("mesa_forward: opt.forget = ") && Contains("is subnormal"));
    mesaopt::mesa_forward<T>(q, k, v, options<T>(1.0, 1.0, reg), out, cache);
    RowMatrix<T> dq(6, 4), dk(6, 4), dv(6, 3);
    CHECK_THROWS_WITH(mesaopt::mesa_backward<T>(q, k, v, lam, out, cache, dq, dk, dv), Contains("is subnormal"));
    MesaState<T> s = mesaopt::mesa_initial_state<T>(4, 3, options<T>(1.0, 1.0, reg));
    mesaopt::Vector<T> o(3);
    CHECK_THROWS_WITH(mesaopt::mesa_step<T>(q.row(0), k.row(0), v.row(0), lam, s, o), Contains("opt.lambda = "));
    CHECK_THROWS_WITH(mesaopt::mesa_step<T>(q.row(0), k.row(0), v.row(0), gam, s, o), Contains("opt.forget = "));
    CHECK_THROWS_WITH(mesaopt::reference::mesa_forward<T>(q, k, v, lam, out), Contains("is subnormal"));
    CHECK_THROWS_WITH(mesaopt::reference::mesa_backward<T>(q, k, v, gam, out, dq, dk, dv), Contains("is subnormal"));
  }
  CHECK_THROWS_WITH(mesaopt::mesa_initial_state<T>(4, 3, options<T>(double(sub), 1.0, MesaRegularizer::decaying)),
                    Contains("opt.lambda = ") && Contains("is subnormal"));
  // The smallest normal number is accepted.
  CHECK_NOTHROW(mesaopt::mesa_forward<T>(q, k, v, options<T>(double(std::numeric_limits<T>::min()), 1.0,
                                                              MesaRegularizer::decaying), out, cache));
}
}  // namespace

TEST_CASE("subnormal lambda and forget are rejected with std::invalid_argument naming them", "[numerics][errors]") {
  SECTION("float") { check_subnormal_rejected<float>(); }
  SECTION("double") { check_subnormal_rejected<double>(); }
  SECTION("reference::mesa_forward_direct") {
    const RowMatrix<double> q = test::random_matrix<double>(6, 4, 1);
    CHECK_THROWS_WITH(mesaopt::reference::mesa_forward_direct(q, q, q, 1e-310),
                      Contains("lambda = ") && Contains("is subnormal"));
    CHECK_THROWS_WITH(mesaopt::reference::mesa_forward_direct(q, q, q, 1.0, 1e-310),
                      Contains("gamma = ") && Contains("is subnormal"));
  }
  SECTION("the layer: softplus(lambda_raw) or sigmoid(forget_raw) underflowing to a subnormal") {
    mesaopt::MesaLayerConfig c;
    c.D = 6;
    c.H = 2;
    c.d = 3;
    c.dv = 2;
    c.learn_forget = true;
    c.forget_init = 0.9;
    mesaopt::MesaLayer<float> layer(c);
    layer.init(1, 0.3);
    const RowMatrix<float> x = test::random_matrix<float>(8, 6, 2);
    mesaopt::MesaLayerCache<float> cache;
    layer.lambda_raw()(1) = -95.0f;  // softplus = e^-95 = 5.5e-42: a float subnormal
    CHECK(layer.lambda(1) > 0.0f);
    CHECK_THROWS_AS(layer.forward(x, 4, cache), std::invalid_argument);
    CHECK_THROWS_WITH(layer.forward(x, 4, cache), Contains("head 1: lambda = softplus(lambda_raw = -95)") &&
                                                      Contains("is subnormal") && Contains("diverged"));
    CHECK_THROWS_WITH(layer.initial_state(1), Contains("is subnormal"));
    layer.lambda_raw()(1) = 0.5f;
    layer.forget_raw()(0) = -95.0f;
    CHECK_THROWS_WITH(layer.forward(x, 4, cache), Contains("head 0: forget = sigmoid(forget_raw)") &&
                                                      Contains("is subnormal"));
    layer.forget_raw()(0) = 1.0f;
    CHECK_NOTHROW(layer.forward(x, 4, cache));
  }
}

// ===========================================================================
// The measurement behind docs/mesa.md, "Numerical safety" (hidden: run with
//   ./build/tests/tests_ops "[.measure]"
// ). For d = 20, 32, 64, unit-norm random keys and queries, lambda |k|^2 = lambda
// on a grid of 8 points per decade: the worst relative error over all positions
// of the float and double forward against reference::mesa_forward_direct
// (double), and of that double reference against the same solve in long double.

namespace {
RowMatrix<long double> direct_long_double(const RowMatrix<double>& q, const RowMatrix<double>& k,
                                          const RowMatrix<double>& v, double lambda) {
  using Mat = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<long double, Eigen::Dynamic, 1>;
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  Mat H = Mat::Identity(d, d) / static_cast<long double>(lambda), S = Mat::Zero(dv, d);
  RowMatrix<long double> out(n, dv);
  for (long t = 0; t < n; ++t) {
    const Vec kt = k.row(t).transpose().cast<long double>();
    H += kt * kt.transpose();
    S += v.row(t).transpose().cast<long double>() * kt.transpose();
    const Vec x = H.ldlt().solve(Vec(q.row(t).transpose().cast<long double>()));
    out.row(t) = (S * x).transpose();
  }
  return out;
}

template <class T>
std::string measured(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v, double lambda,
                     const RowMatrix<double>& ref, double& err) {
  try {
    const RowMatrix<T> out = run_forward<T>(q.cast<T>(), k.cast<T>(), v.cast<T>(),
                                            options<T>(lambda, 1.0, MesaRegularizer::decaying));
    err = max_row_relative(out, ref);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%9.2e", err);
    return buf;
  } catch (const MesaBreakdownError& e) {
    err = INFINITY;
    return "break@" + std::to_string(e.position());
  }
}
}  // namespace

TEST_CASE("measure the safe range of lambda |k|^2 (prints a table)", "[.measure]") {
  const long T = 256;
  std::printf("T = %ld, unit-norm keys and queries, gamma = 1; max over t of |o_t - ref_t| / |ref_t|\n", T);
  for (long d : {20L, 32L, 64L}) {
    const RowMatrix<double> q = unit_rows<double>(T, d, 1), k = unit_rows<double>(T, d, 2),
                            v = test::random_matrix<double>(T, d, 3);
    double float_ok = 0, double_ok = 0;
    bool float_done = false, double_done = false;
    std::printf("d = %ld\n  lambda|k|^2      float     double  ref(double) vs long double\n", d);
    for (int e = 0; e <= 8 * 17; ++e) {
      const double lambda = std::pow(10.0, e / 8.0);
      const RowMatrix<double> ref = mesaopt::reference::mesa_forward_direct(q, k, v, lambda);
      double ef = 0, ed = 0;
      const std::string sf = measured<float>(q, k, v, lambda, ref, ef);
      const std::string sd = measured<double>(q, k, v, lambda, ref, ed);
      if (!float_done && ef < 1e-3) float_ok = lambda;
      if (!(ef < 1e-3)) float_done = true;
      if (!double_done && ed < 1e-9) double_ok = lambda;
      if (!(ed < 1e-9)) double_done = true;
      if (e % 2 == 0 || (ef > 1e-4 && ef < 1e-2) || (ed > 1e-10 && ed < 1e-8)) {
        const double eref = e % 4 == 0 ? max_row_relative(ref, direct_long_double(q, k, v, lambda)) : NAN;
        std::printf("  %11.3g  %9s  %9s  %9.2e\n", lambda, sf.c_str(), sd.c_str(), eref);
      }
    }
    std::printf("  d = %ld: largest lambda|k|^2 on the grid with float error < 1e-3: %.3g; double < 1e-9: %.3g\n", d,
                float_ok, double_ok);
  }
}

}  // namespace mesaopt_test_mesa_numerics
