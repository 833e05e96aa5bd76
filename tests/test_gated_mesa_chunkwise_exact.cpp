// Tests of the chunkwise-parallel exact form of the gated mesa op
// (include/mesaopt/ops/gated_mesa_chunkwise_exact.hpp,
// docs/gated_mesa_chunkwise_exact.md, M44-M48): one chunk's output and end
// state against the recurrent gated_mesa_forward from the same state, chunks
// chained against one long run, the chunk backward against gated_mesa_backward
// and against central finite differences for every input and the state, float
// against double, and the breakdown test at the recurrence's position.
#include <catch2/catch.hpp>
#include <mesaopt/ops.hpp>
#include <mesaopt/ops/gated_mesa_chunkwise_exact.hpp>

#include "gated_mesa_inputs.hpp"
#include "gradcheck.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

// Everything of this file lives in its own namespace (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_gated_mesa_chunkwise_exact {

using mesaopt::GatedMesaCache;
using mesaopt::GatedMesaOptions;
using mesaopt::GatedMesaState;
using mesaopt::MesaSolver;
using mesaopt::RowMatrix;
using mesaopt::Vector;
namespace test = mesaopt::test;
using mesaopt::test::gated::Inputs;
using mesaopt::test::gated::make_inputs;
using mesaopt::test::gated::uniform_vector;
namespace detail = mesaopt::detail;

namespace {

// A random state (S, R SPD) or the empty one (S = 0, R = Lambda^{-1}).
GatedMesaState<double> make_state(long d, long dv, std::uint64_t seed, bool empty) {
  GatedMesaState<double> s;
  if (empty) {
    s.S = RowMatrix<double>::Zero(dv, d);
    s.R = uniform_vector(d, seed, 0.5, 1.5).cwiseInverse().asDiagonal();
    return s;
  }
  s.S = test::random_matrix<double>(dv, d, seed);
  const RowMatrix<double> B = test::random_matrix<double>(d, d, seed + 1, 0.4);
  s.R = B * B.transpose() + RowMatrix<double>::Identity(d, d);
  return s;
}

double rel(const RowMatrix<double>& a, const RowMatrix<double>& b) { return test::relative_rms(a, b); }
double rel(const Vector<double>& a, const Vector<double>& b) { return test::relative_rms(a, b); }

double max_row_relative(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  double worst = 0;
  for (long t = 0; t < a.rows(); ++t)
    worst = std::max(worst, (a.row(t) - b.row(t)).norm() / std::max(b.row(t).norm(), 1e-300));
  return worst;
}

GatedMesaOptions<double> exact_options() {
  GatedMesaOptions<double> o;
  o.solver = MesaSolver::exact;
  return o;
}

// The recurrent op from `init`: output and final state.
RowMatrix<double> recurrent_forward(const Inputs& in, const GatedMesaState<double>& init,
                                    GatedMesaState<double>& fin) {
  const long T = in.q.rows(), d = in.q.cols();
  const Vector<double> lam = Vector<double>::Ones(d);  // not used with an initial state (exact)
  GatedMesaCache<double> cache;
  RowMatrix<double> out(T, in.v.cols());
  mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, lam, exact_options(), out, cache, &init, &fin);
  return out;
}

// Chunks of C tokens chained from `init` (the last chunk may be shorter).
template <class T>
RowMatrix<T> chunked_forward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v,
                             const Vector<T>& beta, const Vector<T>& gamma, long C, RowMatrix<T>& S,
                             RowMatrix<T>& R) {
  const long n = q.rows();
  RowMatrix<T> out(n, v.cols());
  for (long t0 = 0; t0 < n; t0 += C) {
    const long c = std::min(C, n - t0);
    detail::gated_exact_chunk_forward<T>(q.middleRows(t0, c), k.middleRows(t0, c), v.middleRows(t0, c),
                                         beta.segment(t0, c), gamma.segment(t0, c), S, R, out.middleRows(t0, c));
  }
  return out;
}

template <class T>
struct ChunkGrads {
  RowMatrix<T> dq, dk, dv, dS, dR;
  Vector<T> dbeta, dgamma;
};

// Chunks of C chained: forward (keeping each chunk's start state), then the
// chunk backwards in reverse with the state adjoints passed between them.
template <class T>
ChunkGrads<T> chunked_backward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v,
                               const Vector<T>& beta, const Vector<T>& gamma, long C, const RowMatrix<T>& S0,
                               const RowMatrix<T>& R0, const RowMatrix<T>& dout, const RowMatrix<T>& dSfin,
                               const RowMatrix<T>& dRfin) {
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  std::vector<RowMatrix<T>> ckS, ckR;
  RowMatrix<T> S = S0, R = R0, out(n, dv);
  for (long t0 = 0; t0 < n; t0 += C) {
    const long c = std::min(C, n - t0);
    ckS.push_back(S), ckR.push_back(R);
    detail::gated_exact_chunk_forward<T>(q.middleRows(t0, c), k.middleRows(t0, c), v.middleRows(t0, c),
                                         beta.segment(t0, c), gamma.segment(t0, c), S, R, out.middleRows(t0, c));
  }
  ChunkGrads<T> g;
  g.dq.resize(n, d), g.dk.resize(n, d), g.dv.resize(n, dv), g.dbeta.resize(n), g.dgamma.resize(n);
  g.dS = dSfin, g.dR = dRfin;
  for (long ck = long(ckS.size()) - 1; ck >= 0; --ck) {
    const long t0 = ck * C, c = std::min(C, n - t0);
    detail::gated_exact_chunk_backward<T>(
        q.middleRows(t0, c), k.middleRows(t0, c), v.middleRows(t0, c), beta.segment(t0, c), gamma.segment(t0, c),
        ckS[std::size_t(ck)], ckR[std::size_t(ck)], dout.middleRows(t0, c), g.dS, g.dR, g.dq.middleRows(t0, c),
        g.dk.middleRows(t0, c), g.dv.middleRows(t0, c), g.dbeta.segment(t0, c), g.dgamma.segment(t0, c));
  }
  return g;
}

}  // namespace

// The blocked inverse against triangular solves with the identity: sizes
// below, at and between the 16-row diagonal blocks and the merge widths
// (16, 32, 64, 128), so ragged last blocks at every level are covered.
TEST_CASE("lower_triangular_inverse equals the triangular solve of the identity", "[gated_mesa][chunkwise]") {
  for (long n : {1L, 2L, 5L, 15L, 16L, 17L, 31L, 32L, 33L, 40L, 48L, 63L, 64L, 65L, 100L, 129L}) {
    INFO("n = " << n);
    const RowMatrix<double> M = test::random_matrix<double>(n, n, std::uint64_t(100 + n), 0.3);
    RowMatrix<double> L = M.triangularView<Eigen::Lower>();
    L.diagonal() = L.diagonal().cwiseAbs().array() + 1.0;
    RowMatrix<double> reference = RowMatrix<double>::Identity(n, n);
    L.triangularView<Eigen::Lower>().solveInPlace(reference);
    RowMatrix<double> Li(3, 7);  // any shape on entry
    detail::lower_triangular_inverse<double>(L, Li);
    REQUIRE(Li.rows() == n);
    REQUIRE(Li.cols() == n);
    CHECK(rel(Li, reference) < 1e-13);
    CHECK(Li.triangularView<Eigen::StrictlyUpper>().toDenseMatrix().cwiseAbs().maxCoeff() == 0.0);
    CHECK((Li * L - RowMatrix<double>::Identity(n, n)).cwiseAbs().maxCoeff() < 1e-12);
  }
}

TEST_CASE("gated exact chunk forward equals the recurrence (double)", "[gated_mesa][chunkwise]") {
  double worst_out = 0, worst_S = 0, worst_R = 0;
  for (long C : {1L, 2L, 7L, 16L, 33L}) {
    for (long d : {1L, 3L, 8L, 20L}) {
      const long dv = d + 3;
      for (bool empty : {false, true}) {
        const std::uint64_t seed = 1000 + std::uint64_t(100 * C + 10 * d) + (empty ? 1 : 0);
        const Inputs in = make_inputs(C, d, dv, seed);
        const GatedMesaState<double> init = make_state(d, dv, seed + 7, empty);
        GatedMesaState<double> fin;
        const RowMatrix<double> ref = recurrent_forward(in, init, fin);
        RowMatrix<double> S = init.S, R = init.R, out(C, dv);
        detail::gated_exact_chunk_forward<double>(in.q, in.k, in.v, in.beta, in.gamma, S, R, out);
        const double eo = max_row_relative(out, ref), eS = rel(S, fin.S), eR = rel(R, fin.R);
        worst_out = std::max(worst_out, eo), worst_S = std::max(worst_S, eS), worst_R = std::max(worst_R, eR);
        INFO("C=" << C << " d=" << d << " dv=" << dv << (empty ? " empty state" : " random state") << ": out "
                  << eo << ", S_C " << eS << ", R_C " << eR);
        CHECK(eo < 1e-10);
        CHECK(eS < 1e-10);
        CHECK(eR < 1e-10);
        CHECK(R == R.transpose());  // exactly symmetric, as the recurrence keeps it
      }
    }
  }
  INFO("worst: out " << worst_out << ", S_C " << worst_S << ", R_C " << worst_R);
  CHECK(worst_out < 1e-10);
}

TEST_CASE("gated exact chunks chained equal one long recurrent run (double)", "[gated_mesa][chunkwise]") {
  const long T = 100, d = 12, dv = 5;
  for (bool empty : {false, true}) {
    const Inputs in = make_inputs(T, d, dv, 77, 0.9);
    const GatedMesaState<double> init = make_state(d, dv, 78, empty);
    GatedMesaState<double> fin;
    const RowMatrix<double> ref = recurrent_forward(in, init, fin);
    for (long C : {1L, 16L, 33L, 100L}) {
      RowMatrix<double> S = init.S, R = init.R;
      const RowMatrix<double> out = chunked_forward<double>(in.q, in.k, in.v, in.beta, in.gamma, C, S, R);
      INFO("C=" << C << (empty ? " empty state" : " random state") << ": out " << max_row_relative(out, ref)
                << ", S " << rel(S, fin.S) << ", R " << rel(R, fin.R));
      CHECK(max_row_relative(out, ref) < 1e-10);
      CHECK(rel(S, fin.S) < 1e-10);
      CHECK(rel(R, fin.R) < 1e-10);
    }
  }
}

TEST_CASE("gated exact chunk backward equals the recurrent backward (double)", "[gated_mesa][chunkwise][grad]") {
  struct Case {
    long T, C, d, dv;
  };
  const Case cases[] = {{7, 7, 3, 4}, {16, 16, 8, 5}, {33, 33, 20, 23}, {40, 7, 6, 2}, {50, 16, 1, 3}, {9, 1, 4, 4}};
  for (const Case& c : cases) {
    for (bool empty : {false, true}) {
      const std::uint64_t seed = 500 + std::uint64_t(c.T * 7 + c.d) + (empty ? 3 : 0);
      const Inputs in = make_inputs(c.T, c.d, c.dv, seed);
      const GatedMesaState<double> init = make_state(c.d, c.dv, seed + 9, empty);
      const RowMatrix<double> dout = test::random_matrix<double>(c.T, c.dv, seed + 10);
      GatedMesaState<double> gfin;
      gfin.S = test::random_matrix<double>(c.dv, c.d, seed + 11);
      gfin.R = test::random_matrix<double>(c.d, c.d, seed + 12);  // not symmetric: both use sym(R̄)
      // The recurrent backward.
      const Vector<double> lam = Vector<double>::Ones(c.d);
      GatedMesaCache<double> cache;
      RowMatrix<double> out(c.T, c.dv);
      mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, lam, exact_options(), out, cache, &init);
      RowMatrix<double> dq(c.T, c.d), dk(c.T, c.d), dv(c.T, c.dv);
      Vector<double> dbeta(c.T), dgamma(c.T), dlam(c.d);
      GatedMesaState<double> ginit;
      mesaopt::gated_mesa_backward(in.q, in.k, in.v, in.beta, in.gamma, lam, exact_options(), dout, cache, dq, dk,
                                   dv, dbeta, dgamma, dlam, &init, &gfin, &ginit);
      const ChunkGrads<double> g =
          chunked_backward<double>(in.q, in.k, in.v, in.beta, in.gamma, c.C, init.S, init.R, dout, gfin.S, gfin.R);
      INFO("T=" << c.T << " C=" << c.C << " d=" << c.d << " dv=" << c.dv << (empty ? " empty" : " random")
                << " state: dq " << rel(g.dq, dq) << ", dk " << rel(g.dk, dk) << ", dv " << rel(g.dv, dv)
                << ", dbeta " << rel(g.dbeta, dbeta) << ", dgamma " << rel(g.dgamma, dgamma) << ", dS0 "
                << rel(g.dS, ginit.S) << ", dR0 " << rel(g.dR, ginit.R));
      CHECK(rel(g.dq, dq) < 1e-9);
      CHECK(rel(g.dk, dk) < 1e-9);
      CHECK(rel(g.dv, dv) < 1e-9);
      CHECK(rel(g.dbeta, dbeta) < 1e-9);
      CHECK(rel(g.dgamma, dgamma) < 1e-9);
      CHECK(rel(g.dS, ginit.S) < 1e-9);
      CHECK(rel(g.dR, ginit.R) < 1e-9);
      CHECK(g.dR == g.dR.transpose());
    }
  }
}

TEST_CASE("gated exact chunk backward matches central finite differences (double)",
          "[gated_mesa][chunkwise][grad]") {
  struct Case {
    long C, d, dv;
    double gamma_lo;
  };
  const Case cases[] = {{7, 3, 4, 0.85}, {12, 5, 2, 0.6}, {5, 1, 2, 0.85}, {4, 6, 3, 0.85}};
  for (const Case& c : cases) {
    for (bool empty : {false, true}) {
      const std::uint64_t seed = 900 + std::uint64_t(c.C * 11 + c.d) + (empty ? 5 : 0);
      Inputs in = make_inputs(c.C, c.d, c.dv, seed, c.gamma_lo);
      GatedMesaState<double> init = make_state(c.d, c.dv, seed + 1, empty);
      // L = <Wo, out> + <Ws, S_C> + <Wr, R_C>
      const RowMatrix<double> Wo = test::random_matrix<double>(c.C, c.dv, seed + 2);
      const RowMatrix<double> Ws = test::random_matrix<double>(c.dv, c.d, seed + 3);
      const RowMatrix<double> Wr = test::random_matrix<double>(c.d, c.d, seed + 4);
      auto loss = [&] {
        RowMatrix<double> S = init.S, R = init.R, out(c.C, c.dv);
        detail::gated_exact_chunk_forward<double>(in.q, in.k, in.v, in.beta, in.gamma, S, R, out);
        return Wo.cwiseProduct(out).sum() + Ws.cwiseProduct(S).sum() + Wr.cwiseProduct(R).sum();
      };
      RowMatrix<double> dq(c.C, c.d), dk(c.C, c.d), dv(c.C, c.dv), dS = Ws, dR = Wr;
      Vector<double> dbeta(c.C), dgamma(c.C);
      detail::gated_exact_chunk_backward<double>(in.q, in.k, in.v, in.beta, in.gamma, init.S, init.R, Wo, dS, dR, dq,
                                                 dk, dv, dbeta, dgamma);
      const auto rq = test::check_gradient(loss, in.q, dq);
      const auto rk = test::check_gradient(loss, in.k, dk);
      const auto rv = test::check_gradient(loss, in.v, dv);
      const auto rb = test::check_gradient(loss, in.beta, dbeta);
      const auto rg = test::check_gradient(loss, in.gamma, dgamma);
      const auto rS = test::fd_matrix(loss, init.S, dS, false);
      // R_0 is a symmetric input: perturb (i, j) and (j, i) together; dR is the symmetric gradient.
      const auto rR = test::fd_matrix(loss, init.R, dR, true);
      INFO("C=" << c.C << " d=" << c.d << " dv=" << c.dv << (empty ? " empty" : " random") << " state");
      INFO(rq.describe("dq") << "\n" << rk.describe("dk") << "\n" << rv.describe("dv") << "\n"
                             << rb.describe("dbeta") << "\n" << rg.describe("dgamma") << "\n"
                             << rS.describe("dS0") << "\n" << rR.describe("dR0"));
      CHECK(rq.error < 1e-6);
      CHECK(rk.error < 1e-6);
      CHECK(rv.error < 1e-6);
      CHECK(rb.error < 1e-6);
      CHECK(rg.error < 1e-6);
      CHECK(rS.error < 1e-6);
      CHECK(rR.error < 1e-6);
    }
  }
}

TEST_CASE("gated exact chunks: float agrees with double", "[gated_mesa][chunkwise][precision]") {
  // T = 256 in chunks of 32, d = 16, dv = 8, unit-norm q and k, gamma in [0.9, 0.99] (g_C >= 0.9^32 ~ 0.03).
  const long T = 256, C = 32, d = 16, dv = 8;
  Inputs in = make_inputs(T, d, dv, 4242, 0.9);
  in.q.rowwise().normalize();
  in.k.rowwise().normalize();
  const GatedMesaState<double> init = make_state(d, dv, 4243, true);
  const RowMatrix<double> dout = test::random_matrix<double>(T, dv, 4244);
  const RowMatrix<double> zS = RowMatrix<double>::Zero(dv, d), zR = RowMatrix<double>::Zero(d, d);
  RowMatrix<double> S = init.S, R = init.R;
  const RowMatrix<double> out = chunked_forward<double>(in.q, in.k, in.v, in.beta, in.gamma, C, S, R);
  const ChunkGrads<double> g =
      chunked_backward<double>(in.q, in.k, in.v, in.beta, in.gamma, C, init.S, init.R, dout, zS, zR);
  const RowMatrix<float> qf = in.q.cast<float>(), kf = in.k.cast<float>(), vf = in.v.cast<float>();
  const Vector<float> bf = in.beta.cast<float>(), gf = in.gamma.cast<float>();
  RowMatrix<float> Sf = init.S.cast<float>(), Rf = init.R.cast<float>();
  const RowMatrix<float> outf = chunked_forward<float>(qf, kf, vf, bf, gf, C, Sf, Rf);
  const ChunkGrads<float> gf32 =
      chunked_backward<float>(qf, kf, vf, bf, gf, C, init.S.cast<float>(), init.R.cast<float>(),
                              dout.cast<float>(), zS.cast<float>(), zR.cast<float>());
  const double eo = test::relative_rms(outf, out), eS = test::relative_rms(Sf, S), eR = test::relative_rms(Rf, R);
  const double eq = test::relative_rms(gf32.dq, g.dq), ek = test::relative_rms(gf32.dk, g.dk),
               ev = test::relative_rms(gf32.dv, g.dv), eb = test::relative_rms(gf32.dbeta, g.dbeta),
               eg = test::relative_rms(gf32.dgamma, g.dgamma), eS0 = test::relative_rms(gf32.dS, g.dS),
               eR0 = test::relative_rms(gf32.dR, g.dR);
  INFO("float vs double relative RMS: out " << eo << ", S_T " << eS << ", R_T " << eR << "; dq " << eq << ", dk "
                                            << ek << ", dv " << ev << ", dbeta " << eb << ", dgamma " << eg
                                            << ", dS0 " << eS0 << ", dR0 " << eR0);
  CHECK(eo < 1e-5);
  CHECK(eS < 1e-5);
  CHECK(eR < 1e-5);
  for (double e : {eq, ek, ev, eb, eg, eS0, eR0}) CHECK(e < 1e-4);
}

TEST_CASE("gated exact chunk: breakdown at the recurrence's position", "[gated_mesa][chunkwise][errors]") {
  // R0 = diag(1, 1, -0.5) is not positive definite; keys 0-2 lie in the (e1, e2) plane, so R keeps its
  // -0.5 / g entry on e3 and key 3 = 2 e3 drives the denominator gamma + beta k.R k below gamma / 2.
  const long C = 6, d = 3, dv = 2;
  Inputs in = make_inputs(C, d, dv, 31);
  for (long t = 0; t < 3; ++t) in.k(t, 2) = 0;
  in.k.row(3) << 0, 0, 2;
  RowMatrix<double> R0 = RowMatrix<double>::Identity(d, d);
  R0(2, 2) = -0.5;
  const RowMatrix<double> S0 = test::random_matrix<double>(dv, d, 32);
  // The recurrence's runner (gated_mesa_forward rejects such an R_0 before it starts).
  detail::GatedMesaRunner<double> run;
  run.init(d, dv);
  run.S = S0, run.R = R0, run.P = RowMatrix<double>::Identity(d, d);
  long recurrent_position = -1;
  try {
    for (long t = 0; t < C; ++t) run.advance("recurrence", t, in.k.row(t).data(), in.v.row(t).data(), in.beta[t],
                                             in.gamma[t]);
  } catch (const mesaopt::MesaBreakdownError& e) {
    recurrent_position = e.position();
  }
  CHECK(recurrent_position == 3);
  RowMatrix<double> S = S0, R = R0, out(C, dv);
  long chunk_position = -1;
  std::string message;
  try {
    detail::gated_exact_chunk_forward<double>(in.q, in.k, in.v, in.beta, in.gamma, S, R, out);
  } catch (const mesaopt::MesaBreakdownError& e) {
    chunk_position = e.position();
    message = e.what();
  }
  CHECK(chunk_position == recurrent_position);
  CHECK(message.find("position t = 3") != std::string::npos);
  CHECK(message.find("Cholesky") != std::string::npos);
  // The backward recomputes the chunk and fails alike.
  RowMatrix<double> dS = RowMatrix<double>::Zero(dv, d), dR = RowMatrix<double>::Zero(d, d);
  RowMatrix<double> dq(C, d), dk(C, d), dv_(C, dv);
  Vector<double> db(C), dg(C);
  CHECK_THROWS_AS(detail::gated_exact_chunk_backward<double>(in.q, in.k, in.v, in.beta, in.gamma, S0, R0, out, dS,
                                                             dR, dq, dk, dv_, db, dg),
                  mesaopt::MesaBreakdownError);
  // A non-finite key.
  in.k(1, 0) = NAN;
  S = S0, R = RowMatrix<double>::Identity(d, d);
  CHECK_THROWS_AS(detail::gated_exact_chunk_forward<double>(in.q, in.k, in.v, in.beta, in.gamma, S, R, out),
                  mesaopt::MesaBreakdownError);
}

TEST_CASE("gated exact chunk: float breaks down where the gates outrun its precision",
          "[gated_mesa][chunkwise][errors]") {
  // float, C = 16 > d = 2, gamma = 0.3 (g_C = 4e-9): A = D^{-1} + K R0 K^T is rank 2 plus a diagonal that
  // falls to 1e-8, so the later pivots drown in rounding. Whether one of them turns negative depends on
  // the rounding (GCC -O3 with FMA contraction: yes, at token 15; clang -O1: no), so the float part
  // checks only what holds either way: a breakdown, if any, comes after the first d tokens, and
  // without one the outputs are finite (docs/gated_mesa_chunkwise_exact.md, "Precision and limits":
  // such chunks can be wrong without an exception).
  const long C = 16, d = 2, dv = 3;
  const Inputs in = make_inputs(C, d, dv, 71);
  const RowMatrix<float> q = in.q.cast<float>(), k = in.k.cast<float>(), v = in.v.cast<float>();
  const Vector<float> beta = in.beta.cast<float>(), gamma = Vector<float>::Constant(C, 0.3f);
  RowMatrix<float> S = RowMatrix<float>::Zero(dv, d), R = RowMatrix<float>::Identity(d, d), out(C, dv);
  std::string message;
  long position = -1;
  try {
    detail::gated_exact_chunk_forward<float>(q, k, v, beta, gamma, S, R, out);
  } catch (const mesaopt::MesaBreakdownError& e) {
    position = e.position();
    message = e.what();
  }
  INFO(message);
  if (position >= 0)
    CHECK(position >= d);  // the first d pivots see a full-rank block
  else
    CHECK(out.allFinite());
  // In double the same chunk is well within range and agrees with the recurrence.
  GatedMesaState<double> init, fin;
  init.S = RowMatrix<double>::Zero(dv, d), init.R = RowMatrix<double>::Identity(d, d);
  Inputs ind = in;
  ind.gamma = Vector<double>::Constant(C, double(0.3f));
  const RowMatrix<double> ref = recurrent_forward(ind, init, fin);
  RowMatrix<double> Sd = init.S, Rd = init.R, outd(C, dv);
  detail::gated_exact_chunk_forward<double>(ind.q, ind.k, ind.v, ind.beta, ind.gamma, Sd, Rd, outd);
  INFO("double: out " << max_row_relative(outd, ref) << ", R_C " << rel(Rd, fin.R));
  CHECK(max_row_relative(outd, ref) < 1e-6);
}

TEST_CASE("gated exact chunk: an underflowing gate product is a breakdown", "[gated_mesa][chunkwise][errors]") {
  // float, gamma = 1e-3: g_t = 1e-3^(t+1) drops below FLT_MIN (1.2e-38) at t = 12.
  const long C = 16, d = 4, dv = 3;
  const Inputs in = make_inputs(C, d, dv, 61);
  const RowMatrix<float> q = in.q.cast<float>(), k = in.k.cast<float>(), v = in.v.cast<float>();
  const Vector<float> beta = in.beta.cast<float>(), gamma = Vector<float>::Constant(C, 1e-3f);
  RowMatrix<float> S = RowMatrix<float>::Zero(dv, d), R = RowMatrix<float>::Identity(d, d), out(C, dv);
  long position = -1;
  try {
    detail::gated_exact_chunk_forward<float>(q, k, v, beta, gamma, S, R, out);
  } catch (const mesaopt::MesaBreakdownError& e) {
    position = e.position();
    INFO(e.what());
  }
  // Checked before the factorisation, so it is this test and not a pivot (M45) that stops it.
  CHECK(position == 12);
  // A product just above the smallest normal number still runs and stays finite.
  const Vector<float> gamma_ok = Vector<float>::Constant(C, 0.01f);  // g_15 = 1e-32
  S.setZero(), R.setIdentity();
  try {
    detail::gated_exact_chunk_forward<float>(q, k, v, beta, gamma_ok, S, R, out);
    CHECK(out.allFinite());
  } catch (const mesaopt::MesaBreakdownError& e) {
    // C = 16 > d = 4 with g_C = 1e-32: kappa far beyond float's range, so the pivot test may throw instead.
    CHECK(e.position() > 0);
  }
}

}  // namespace mesaopt_test_gated_mesa_chunkwise_exact
