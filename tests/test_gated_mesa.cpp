// Tests of the gated mesa op (include/mesaopt/ops/gated_mesa.hpp, docs/math.md
// §8, docs/gated_mesa.md): forward against the direct weighted ridge solve at
// every position for both objectives, the special cases that are the existing
// mesa op, CG error against the step count, carried state (split, steps,
// chained backward), central finite differences for every input and the state,
// checkpoint-interval invariance, float against double, and bad input.
#include <catch2/catch.hpp>
#include <mesaopt/ops.hpp>
#include <mesaopt/ops/gated_mesa_reference.hpp>
#include <mesaopt/ops/mesa_reference.hpp>

#include "gated_mesa_inputs.hpp"
#include "gradcheck.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_gated_mesa {

using mesaopt::GatedMesaCache;
using mesaopt::GatedMesaOptions;
using mesaopt::GatedMesaState;
using mesaopt::MesaSolver;
using mesaopt::RowMatrix;
using mesaopt::Vector;
namespace test = mesaopt::test;
using mesaopt::test::gated::Cast;
using mesaopt::test::gated::Inputs;
using mesaopt::test::gated::make_inputs;

namespace {

// max_t ||a_t - b_t|| / ||b_t||
double max_row_relative(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  double worst = 0;
  for (long t = 0; t < a.rows(); ++t)
    worst = std::max(worst, (a.row(t) - b.row(t)).norm() / std::max(b.row(t).norm(), 1e-300));
  return worst;
}

template <class T>
RowMatrix<T> forward(const Cast<T>& in, const GatedMesaOptions<T>& opt, GatedMesaCache<T>& cache,
                     const GatedMesaState<mesaopt::identity_t<T>>* init = nullptr,
                     GatedMesaState<mesaopt::identity_t<T>>* fin = nullptr) {
  RowMatrix<T> out(in.q.rows(), in.v.cols());
  mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, opt, out, cache, init, fin);
  return out;
}

template <class T>
struct Grads {
  RowMatrix<T> dq, dk, dv;
  Vector<T> dbeta, dgamma, dlam;
  GatedMesaState<T> ginit;
};

template <class T>
Grads<T> backward(const Cast<T>& in, const GatedMesaOptions<T>& opt, const RowMatrix<T>& dout,
                  const GatedMesaState<mesaopt::identity_t<T>>* init = nullptr,
                  const GatedMesaState<mesaopt::identity_t<T>>* gfin = nullptr) {
  GatedMesaCache<T> cache;
  forward(in, opt, cache, init);
  const long T_ = in.q.rows(), d = in.q.cols(), dv = in.v.cols();
  Grads<T> g;
  g.dq.resize(T_, d), g.dk.resize(T_, d), g.dv.resize(T_, dv);
  g.dbeta.resize(T_), g.dgamma.resize(T_), g.dlam.resize(d);
  mesaopt::gated_mesa_backward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, opt, dout, cache, g.dq, g.dk, g.dv,
                               g.dbeta, g.dgamma, g.dlam, init, gfin, &g.ginit);
  return g;
}

template <class T>
GatedMesaOptions<T> options(MesaSolver solver, int cg_steps = 30, long chunk = 0) {
  GatedMesaOptions<T> o;
  o.solver = solver;
  o.cg_steps = cg_steps;
  o.chunk = chunk;
  return o;
}

// A random state for the solver: S, and R symmetric positive definite (exact) or H positive semi-definite (cg).
GatedMesaState<double> random_state(MesaSolver solver, long d, long dv, std::uint64_t seed) {
  GatedMesaState<double> s;
  s.S = test::random_matrix<double>(dv, d, seed);
  const RowMatrix<double> B = test::random_matrix<double>(d, d, seed + 1, 0.4);
  const RowMatrix<double> X = B * B.transpose();
  if (solver == MesaSolver::exact)
    s.R = X + RowMatrix<double>::Identity(d, d);
  else
    s.H = X;
  return s;
}

}  // namespace

TEST_CASE("gated mesa exact forward equals the direct weighted ridge solve (double)", "[gated_mesa]") {
  struct Case {
    long T, d, dv;
    double gamma_lo;
  };
  const Case cases[] = {{40, 11, 7, 0.85}, {33, 1, 1, 0.7}, {50, 8, 8, 0.9}, {64, 17, 16, 0.95}, {30, 33, 5, 0.97}};
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c.T, c.d, c.dv, 100 + std::uint64_t(c.d), c.gamma_lo);
    const Cast<double> x(in);
    for (long chunk : {0L, 7L}) {
      GatedMesaCache<double> cache;
      const RowMatrix<double> out = forward(x, options<double>(MesaSolver::exact, 30, chunk), cache);
      const RowMatrix<double> ref =
          mesaopt::reference::gated_mesa_forward_direct(in.q, in.k, in.v, in.beta, in.gamma, in.lam, MesaSolver::exact);
      const double err = max_row_relative(out, ref);
      INFO("T=" << c.T << " d=" << c.d << " dv=" << c.dv << " chunk=" << chunk << " max relative error " << err);
      CHECK(err < 1e-10);
    }
  }
}

TEST_CASE("gated mesa with beta = 1 is the mesa op (lambda_diag = I / lambda)", "[gated_mesa]") {
  const long T = 37, d = 9, dv = 6;
  Inputs in = make_inputs(T, d, dv, 7);
  const double lambda = 0.7;  // MesaOptions::lambda is the prior variance: R_0 = lambda I, i.e. Lambda = I / lambda
  in.beta.setOnes();
  in.lam = Vector<double>::Constant(d, 1.0 / lambda);
  for (double g : {1.0, 0.9}) {
    in.gamma = Vector<double>::Constant(T, g);
    const Cast<double> x(in);
    mesaopt::MesaOptions<double> mopt;
    mopt.lambda = lambda;
    mopt.forget = g;
    // exact == the decaying regulariser (M5 with gamma)
    GatedMesaCache<double> cache;
    const RowMatrix<double> out = forward(x, options<double>(MesaSolver::exact), cache);
    mesaopt::MesaCache<double> mcache;
    RowMatrix<double> ref(T, dv);
    mesaopt::mesa_forward(in.q, in.k, in.v, mopt, ref, mcache);
    INFO("gamma=" << g);
    CHECK(max_row_relative(out, ref) < 1e-12);
    // cg == the constant regulariser (M20): sum gamma^{t-i} k k^T + I / lambda
    mopt.regularizer = mesaopt::MesaRegularizer::constant;
    const RowMatrix<double> out_cg = forward(x, options<double>(MesaSolver::cg, 2 * d), cache);
    mesaopt::mesa_forward(in.q, in.k, in.v, mopt, ref, mcache);
    CHECK(max_row_relative(out_cg, ref) < 1e-9);
  }
}

TEST_CASE("gated mesa cg: error falls with the step count, < 1e-8 at d steps", "[gated_mesa][cg]") {
  const long T = 24, d = 16, dv = 4;
  const Inputs in = make_inputs(T, d, dv, 55);
  const Cast<double> x(in);
  const RowMatrix<double> ref =
      mesaopt::reference::gated_mesa_forward_direct(in.q, in.k, in.v, in.beta, in.gamma, in.lam, MesaSolver::cg);
  GatedMesaCache<double> cache;
  double prev = INFINITY;
  for (int steps : {1, 2, 4, 8, int(d)}) {
    const double err = max_row_relative(forward(x, options<double>(MesaSolver::cg, steps), cache), ref);
    INFO("cg_steps=" << steps << " max relative error " << err << " (previous " << prev << ")");
    CHECK(err < prev);
    prev = err;
  }
  CHECK(prev < 1e-8);
  // A tolerance stops early and still reaches it.
  GatedMesaOptions<double> opt = options<double>(MesaSolver::cg, 1000);
  opt.cg_tolerance = 1e-13;
  CHECK(max_row_relative(forward(x, opt, cache), ref) < 1e-8);
}

TEMPLATE_TEST_CASE("gated mesa: split sequences and token steps give the whole sequence", "[gated_mesa][state]", float,
                   double) {
  using T = TestType;
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  const long n = 23, d = 7, dv = 5;
  const Inputs in = make_inputs(n, d, dv, 9);
  const Cast<T> x(in);
  for (MesaSolver solver : {MesaSolver::exact, MesaSolver::cg}) {
    const GatedMesaOptions<T> opt = options<T>(solver, 2 * d, 3);
    GatedMesaCache<T> cache;
    GatedMesaState<T> whole_final;
    const RowMatrix<T> whole = forward(x, opt, cache, nullptr, &whole_final);
    const RowMatrix<T>& state_whole = solver == MesaSolver::exact ? whole_final.R : whole_final.H;
    for (long s : {1L, 10L, n - 1}) {
      Cast<T> a = x, b = x;
      a.q = x.q.topRows(s), a.k = x.k.topRows(s), a.v = x.v.topRows(s);
      a.beta = x.beta.head(s), a.gamma = x.gamma.head(s);
      b.q = x.q.bottomRows(n - s), b.k = x.k.bottomRows(n - s), b.v = x.v.bottomRows(n - s);
      b.beta = x.beta.tail(n - s), b.gamma = x.gamma.tail(n - s);
      GatedMesaState<T> st;
      GatedMesaCache<T> c1, c2;
      const RowMatrix<T> o1 = forward(a, opt, c1, nullptr, &st);
      const RowMatrix<T> o2 = forward(b, opt, c2, &st, &st);  // advance in place
      INFO(mesaopt::detail::solver_name(solver) << " split at " << s);
      CHECK(test::relative_rms(o1, whole.topRows(s)) < tol);
      CHECK(test::relative_rms(o2, whole.bottomRows(n - s)) < tol);
      CHECK(test::relative_rms(st.S, whole_final.S) < tol);
      CHECK(test::relative_rms(solver == MesaSolver::exact ? st.R : st.H, state_whole) < tol);
    }
    // One token at a time.
    GatedMesaState<T> st = mesaopt::gated_mesa_initial_state<T>(d, dv, x.lam, opt);
    RowMatrix<T> steps(n, dv);
    for (long t = 0; t < n; ++t) {
      Vector<T> o(dv);
      mesaopt::gated_mesa_step<T>(x.q.row(t), x.k.row(t), x.v.row(t), x.beta[t], x.gamma[t], x.lam, opt, st, o);
      steps.row(t) = o.transpose();
    }
    INFO(mesaopt::detail::solver_name(solver) << " token steps");
    CHECK(test::relative_rms(steps, whole) < tol);
    CHECK(test::relative_rms(st.S, whole_final.S) < tol);
  }
}

TEST_CASE("gated mesa backward matches central finite differences (double)", "[gated_mesa][grad]") {
  struct Case {
    MesaSolver solver;
    long T, d, dv;
    bool with_state;
  };
  const Case cases[] = {{MesaSolver::exact, 12, 5, 4, false}, {MesaSolver::exact, 9, 1, 3, false},
                        {MesaSolver::exact, 10, 4, 3, true},  {MesaSolver::cg, 12, 5, 4, false},
                        {MesaSolver::cg, 9, 1, 3, false},     {MesaSolver::cg, 10, 4, 3, true}};
  for (const Case& c : cases) {
    const Inputs in0 = make_inputs(c.T, c.d, c.dv, 300 + std::uint64_t(c.d), 0.7);
    Cast<double> x(in0);
    const RowMatrix<double> dout = test::random_matrix<double>(c.T, c.dv, 77);
    // cg with 2d steps: the truncated solve is the exact one to rounding, so its
    // derivative is the exact-solve gradient the backward computes.
    const GatedMesaOptions<double> opt = options<double>(c.solver, int(2 * c.d), 4);
    const bool exact = c.solver == MesaSolver::exact;
    GatedMesaState<double> init, wfin;
    if (c.with_state) {
      init = random_state(c.solver, c.d, c.dv, 500);
      wfin = random_state(c.solver, c.d, c.dv, 600);  // L += <wfin, final state>
      (exact ? wfin.R : wfin.H) -= RowMatrix<double>::Identity(c.d, c.d) * 0.3;
    }
    const GatedMesaState<double>* ip = c.with_state ? &init : nullptr;
    const Grads<double> g = backward(x, opt, dout, ip, c.with_state ? &wfin : nullptr);

    GatedMesaCache<double> cache;
    auto loss = [&] {
      GatedMesaState<double> fin;
      const RowMatrix<double> out = forward(x, opt, cache, ip, &fin);
      double L = (out.array() * dout.array()).sum();
      if (c.with_state)
        L += (fin.S.array() * wfin.S.array()).sum() +
             (exact ? (fin.R.array() * wfin.R.array()).sum() : (fin.H.array() * wfin.H.array()).sum());
      return L;
    };
    INFO(mesaopt::detail::solver_name(c.solver) << " T=" << c.T << " d=" << c.d << " dv=" << c.dv
                                                << " with_state=" << c.with_state);
    const auto rq = test::check_gradient(loss, x.q, g.dq);
    const auto rk = test::check_gradient(loss, x.k, g.dk);
    const auto rv = test::check_gradient(loss, x.v, g.dv);
    const auto rb = test::check_gradient(loss, x.beta, g.dbeta);
    const auto rg = test::check_gradient(loss, x.gamma, g.dgamma);
    const auto rl = test::check_gradient(loss, x.lam, g.dlam);
    INFO(rq.describe("dq") << "\n" << rk.describe("dk") << "\n" << rv.describe("dv") << "\n"
                           << rb.describe("dbeta") << "\n" << rg.describe("dgamma") << "\n"
                           << rl.describe("dlambda_diag"));
    CHECK(rq.error < 1e-6);
    CHECK(rk.error < 1e-6);
    CHECK(rv.error < 1e-6);
    CHECK(rb.error < 1e-6);
    CHECK(rg.error < 1e-6);
    CHECK(rl.error < 1e-6);
    if (exact && c.with_state) CHECK(g.dlam.cwiseAbs().maxCoeff() == 0.0);  // R_0 replaces Lambda
    // The initial state's gradient (R, H symmetric: perturbed in pairs).
    const auto rS = test::fd_matrix(loss, init.S, g.ginit.S, false);
    INFO(rS.describe("dS_0"));
    CHECK(rS.error < 1e-6);
    if (c.with_state) {
      const auto rX = exact ? test::fd_matrix(loss, init.R, g.ginit.R, true)
                            : test::fd_matrix(loss, init.H, g.ginit.H, true);
      INFO(rX.describe(exact ? "dR_0" : "dH_0"));
      CHECK(rX.error < 1e-6);
    }
  }
}

TEST_CASE("gated mesa: chained backward passes over pieces give the whole sequence's gradients",
          "[gated_mesa][state][grad]") {
  const long n = 19, d = 6, dv = 4, s = 8;
  const Inputs in = make_inputs(n, d, dv, 21);
  const Cast<double> x(in);
  const RowMatrix<double> dout = test::random_matrix<double>(n, dv, 22);
  for (MesaSolver solver : {MesaSolver::exact, MesaSolver::cg}) {
    const GatedMesaOptions<double> opt = options<double>(solver, int(2 * d), 3);
    const Grads<double> whole = backward(x, opt, dout);
    Cast<double> a = x, b = x;
    a.q = x.q.topRows(s), a.k = x.k.topRows(s), a.v = x.v.topRows(s);
    a.beta = x.beta.head(s), a.gamma = x.gamma.head(s);
    b.q = x.q.bottomRows(n - s), b.k = x.k.bottomRows(n - s), b.v = x.v.bottomRows(n - s);
    b.beta = x.beta.tail(n - s), b.gamma = x.gamma.tail(n - s);
    GatedMesaState<double> st;
    GatedMesaCache<double> c1;
    forward(a, opt, c1, nullptr, &st);
    const Grads<double> g2 = backward(b, opt, RowMatrix<double>(dout.bottomRows(n - s)), &st);
    const Grads<double> g1 = backward(a, opt, RowMatrix<double>(dout.topRows(s)), nullptr, &g2.ginit);
    INFO(mesaopt::detail::solver_name(solver));
    CHECK(test::relative_rms(g1.dq, whole.dq.topRows(s)) < 1e-11);
    CHECK(test::relative_rms(g2.dq, whole.dq.bottomRows(n - s)) < 1e-11);
    CHECK(test::relative_rms(g1.dk, whole.dk.topRows(s)) < 1e-11);
    CHECK(test::relative_rms(g2.dk, whole.dk.bottomRows(n - s)) < 1e-11);
    CHECK(test::relative_rms(g1.dv, whole.dv.topRows(s)) < 1e-11);
    CHECK(test::relative_rms(g2.dv, whole.dv.bottomRows(n - s)) < 1e-11);
    CHECK(test::relative_rms(g1.dbeta, whole.dbeta.head(s)) < 1e-11);
    CHECK(test::relative_rms(g2.dbeta, whole.dbeta.tail(n - s)) < 1e-11);
    CHECK(test::relative_rms(g1.dgamma, whole.dgamma.head(s)) < 1e-11);
    CHECK(test::relative_rms(g2.dgamma, whole.dgamma.tail(n - s)) < 1e-11);
    // exact: Lambda enters only the first piece (P_0); cg: every token's solve.
    const Vector<double> dlam = solver == MesaSolver::exact ? g1.dlam : Vector<double>(g1.dlam + g2.dlam);
    CHECK(test::relative_rms(dlam, whole.dlam) < 1e-11);
  }
}

// opt.chunk = C > 0 selects the chunkwise forms (docs/math.md §9-§10): the
// same numbers as token by token up to rounding, for C from 1 to beyond seq_len.
TEST_CASE("gated mesa chunkwise forms give the token-by-token gradients", "[gated_mesa][grad]") {
  const long n = 17, d = 5, dv = 3;
  const Inputs in = make_inputs(n, d, dv, 31);
  const Cast<double> x(in);
  const RowMatrix<double> dout = test::random_matrix<double>(n, dv, 32);
  for (MesaSolver solver : {MesaSolver::exact, MesaSolver::cg}) {
    const Grads<double> ref = backward(x, options<double>(solver, 10, 0), dout);
    for (long C : {1L, 3L, n, 4 * n}) {
      const Grads<double> g = backward(x, options<double>(solver, 10, C), dout);
      INFO(mesaopt::detail::solver_name(solver) << " chunk=" << C);
      CHECK(test::relative_rms(g.dq, ref.dq) < 1e-13);
      CHECK(test::relative_rms(g.dk, ref.dk) < 1e-13);
      CHECK(test::relative_rms(g.dv, ref.dv) < 1e-13);
      CHECK(test::relative_rms(g.dbeta, ref.dbeta) < 1e-13);
      CHECK(test::relative_rms(g.dgamma, ref.dgamma) < 1e-13);
      CHECK(test::relative_rms(g.dlam, ref.dlam) < 1e-13);
    }
  }
}

// opt.threads > 1 splits one sequence's chunkwise form over threads (the
// chunk-start states one after another, the chunks' solves in parallel;
// docs/gated_mesa.md, "Threads"): every output, the final state and every
// gradient must be bit-identical to one thread, for both solvers, with a
// partial last chunk, with and without an initial state and a final-state
// gradient, with fewer chunks than threads, and with a CG tolerance (solves of
// uneven length).
TEMPLATE_TEST_CASE("gated mesa chunkwise: threads give bit-identical results", "[gated_mesa][threads]", float,
                   double) {
  using T = TestType;
  const auto cast_state = [](const GatedMesaState<double>& s) {
    GatedMesaState<T> r;
    r.S = s.S.cast<T>(), r.R = s.R.cast<T>(), r.H = s.H.cast<T>();
    return r;
  };
  struct Case {
    long n, d, dv, C;
    T tol;
  };
  for (const Case cs : {Case{203, 16, 8, 32, T(0)}, Case{50, 5, 7, 7, T(0)}, Case{40, 6, 3, 32, T(0)},
                        Case{130, 12, 12, 16, T(1e-3)}}) {
    const Inputs in = make_inputs(cs.n, cs.d, cs.dv, 71 + std::uint64_t(cs.n));
    const Cast<T> x(in);
    const RowMatrix<T> dout = test::random_matrix<double>(cs.n, cs.dv, 72).template cast<T>();
    for (MesaSolver solver : {MesaSolver::exact, MesaSolver::cg}) {
      for (bool with_state : {false, true}) {
        const GatedMesaState<T> init = cast_state(random_state(solver, cs.d, cs.dv, 73));
        GatedMesaState<double> gf = random_state(solver, cs.d, cs.dv, 75);
        if (solver == MesaSolver::exact) gf.R *= 0.01;
        const GatedMesaState<T> gfin = cast_state(gf);
        const GatedMesaState<T>* ip = with_state ? &init : nullptr;
        const GatedMesaState<T>* gp = with_state ? &gfin : nullptr;
        GatedMesaOptions<T> opt = options<T>(solver, 12, cs.C);
        opt.cg_tolerance = cs.tol;
        GatedMesaCache<T> cache1;
        GatedMesaState<T> fin1;
        const RowMatrix<T> out1 = forward(x, opt, cache1, ip, &fin1);
        const Grads<T> g1 = backward(x, opt, dout, ip, gp);
        for (int threads : {2, 3}) {
          INFO(mesaopt::detail::solver_name(solver) << " n=" << cs.n << " C=" << cs.C << " state=" << with_state
                                                    << " threads=" << threads);
          opt.threads = threads;
          GatedMesaCache<T> cache;
          GatedMesaState<T> fin;
          const RowMatrix<T> out = forward(x, opt, cache, ip, &fin);
          CHECK(out == out1);
          CHECK(fin.S == fin1.S);
          CHECK(fin.R == fin1.R);
          CHECK(fin.H == fin1.H);
          CHECK(cache.bytes() == cache1.bytes());
          const Grads<T> g = backward(x, opt, dout, ip, gp);
          CHECK(g.dq == g1.dq);
          CHECK(g.dk == g1.dk);
          CHECK(g.dv == g1.dv);
          CHECK(g.dbeta == g1.dbeta);
          CHECK(g.dgamma == g1.dgamma);
          CHECK(g.dlam == g1.dlam);
          CHECK(g.ginit.S == g1.ginit.S);
          CHECK(g.ginit.R == g1.ginit.R);
          CHECK(g.ginit.H == g1.ginit.H);
          // The thread count is not part of the cache: a backward with other threads than its forward.
          RowMatrix<T> dq(cs.n, cs.d), dk(cs.n, cs.d), dv(cs.n, cs.dv);
          Vector<T> db(cs.n), dg(cs.n), dl(cs.d);
          GatedMesaOptions<T> opt1 = opt;
          opt1.threads = 1;
          mesaopt::gated_mesa_backward(x.q, x.k, x.v, x.beta, x.gamma, x.lam, opt1, dout, cache, dq, dk, dv, db, dg,
                                       dl, ip, gp);
          CHECK(dq == g1.dq);
          CHECK(dg == g1.dgamma);
        }
      }
    }
  }
}

TEST_CASE("gated mesa float agrees with double", "[gated_mesa][precision]") {
  const long n = 200, d = 16, dv = 8;
  Inputs in = make_inputs(n, d, dv, 41, 0.9);
  for (long t = 0; t < n; ++t) in.k.row(t).normalize(), in.q.row(t).normalize();
  const Cast<double> xd(in);
  const Cast<float> xf(in);
  const RowMatrix<double> dout = test::random_matrix<double>(n, dv, 42);
  for (MesaSolver solver : {MesaSolver::exact, MesaSolver::cg}) {
    GatedMesaCache<double> cd;
    GatedMesaCache<float> cf;
    const GatedMesaOptions<double> od = options<double>(solver, d);
    const GatedMesaOptions<float> of = options<float>(solver, d);
    const double ef = test::relative_rms(forward(xf, of, cf), forward(xd, od, cd));
    const Grads<double> gd = backward(xd, od, dout);
    const Grads<float> gf = backward(xf, of, RowMatrix<float>(dout.cast<float>()));
    const double eq = test::relative_rms(gf.dq, gd.dq), ek = test::relative_rms(gf.dk, gd.dk),
                 ev = test::relative_rms(gf.dv, gd.dv), eb = test::relative_rms(gf.dbeta, gd.dbeta),
                 eg = test::relative_rms(gf.dgamma, gd.dgamma), el = test::relative_rms(gf.dlam, gd.dlam);
    INFO(mesaopt::detail::solver_name(solver) << ": out " << ef << ", dq " << eq << ", dk " << ek << ", dv " << ev
                                              << ", dbeta " << eb << ", dgamma " << eg << ", dlambda " << el);
    CHECK(ef < 1e-5);
    CHECK(std::max({eq, ek, ev, eb, eg, el}) < 1e-4);
  }
}

TEST_CASE("gated mesa rejects bad input by name", "[gated_mesa][errors]") {
  const long n = 6, d = 3, dv = 2;
  const Inputs in = make_inputs(n, d, dv, 61);
  const GatedMesaOptions<double> opt;
  GatedMesaCache<double> cache;
  RowMatrix<double> out(n, dv);
  auto fwd = [&](const Vector<double>& beta, const Vector<double>& gamma, const Vector<double>& lam,
                 const GatedMesaOptions<double>& o) {
    return test::error_of(
        [&] { mesaopt::gated_mesa_forward(in.q, in.k, in.v, beta, gamma, lam, o, out, cache); });
  };
  auto with = [](Vector<double> x, long i, double value) {
    x[i] = value;
    return x;
  };
  const auto has = [](const std::string& msg, const std::string& part) {
    INFO(msg);
    CHECK(msg.find(part) != std::string::npos);
  };
  has(fwd(with(in.beta, 2, 0.0), in.gamma, in.lam, opt), "beta[2] must lie in (0, 1]");
  has(fwd(with(in.beta, 0, 1.5), in.gamma, in.lam, opt), "beta[0] must lie in (0, 1]");
  has(fwd(in.beta, with(in.gamma, 3, 0.0), in.lam, opt), "gamma[3] must lie in (0, 1]");
  has(fwd(in.beta, with(in.gamma, 1, 1.0001), in.lam, opt), "gamma[1] must lie in (0, 1]");
  has(fwd(in.beta, with(in.gamma, 1, NAN), in.lam, opt), "gamma[1]");
  has(fwd(in.beta, in.gamma, with(in.lam, 1, -0.5), opt), "lambda_diag[1] must be finite and > 0");
  has(fwd(in.beta, in.gamma, with(in.lam, 0, 0.0), opt), "lambda_diag[0]");
  has(fwd(in.beta.head(n - 1), in.gamma, in.lam, opt), "beta has 5 entries");
  has(fwd(in.beta, in.gamma.head(2), in.lam, opt), "gamma has 2 entries");
  has(fwd(in.beta, in.gamma, in.lam.head(2), opt), "lambda_diag has 2 entries");
  GatedMesaOptions<double> bad = opt;
  bad.cg_steps = 0;
  has(fwd(in.beta, in.gamma, in.lam, bad), "opt.cg_steps");
  bad = opt;
  bad.cg_tolerance = -1;
  has(fwd(in.beta, in.gamma, in.lam, bad), "opt.cg_tolerance");
  bad = opt;
  bad.chunk = -1;
  has(fwd(in.beta, in.gamma, in.lam, bad), "opt.chunk");
  bad = opt;
  bad.chunk = 2;
  bad.threads = 0;
  has(fwd(in.beta, in.gamma, in.lam, bad), "opt.threads must be at least 1 (1 = serial), got 0");
  bad.threads = -3;
  has(fwd(in.beta, in.gamma, in.lam, bad), "opt.threads must be at least 1 (1 = serial), got -3");
  bad.chunk = 0;  // checked token by token too, where it is otherwise ignored
  has(fwd(in.beta, in.gamma, in.lam, bad), "opt.threads");
  bad = opt;
  bad.solver = static_cast<MesaSolver>(7);
  has(fwd(in.beta, in.gamma, in.lam, bad), "opt.solver");
  // Shapes, output aliasing, states.
  RowMatrix<double> small(n - 1, dv);
  has(test::error_of([&] {
        mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, opt, small, cache);
      }),
      "out");
  has(test::error_of([&] {
        mesaopt::gated_mesa_forward(in.q, RowMatrix<double>(in.k.leftCols(2)), in.v, in.beta, in.gamma, in.lam, opt,
                                    out, cache);
      }),
      "k is");
  GatedMesaState<double> cg_state = random_state(MesaSolver::cg, d, dv, 1);
  has(test::error_of([&] {
        mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, opt, out, cache, &cg_state);
      }),
      "initial.R is 0 x 0");
  GatedMesaState<double> not_pd = random_state(MesaSolver::exact, d, dv, 2);
  not_pd.R = -not_pd.R;
  has(test::error_of([&] {
        mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, opt, out, cache, &not_pd);
      }),
      "initial.R is not positive definite");
  // Backward: a cache from other gates or another solver.
  mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, opt, out, cache);
  RowMatrix<double> dq(n, d), dk(n, d), dv_(n, dv);
  Vector<double> db(n), dg(n), dl(d);
  auto bwd = [&](const Vector<double>& beta, const GatedMesaOptions<double>& o) {
    return test::error_of([&] {
      mesaopt::gated_mesa_backward(in.q, in.k, in.v, beta, in.gamma, in.lam, o, out, cache, dq, dk, dv_, db, dg, dl);
    });
  };
  CHECK(bwd(in.beta, opt) == "<no exception>");
  has(bwd(with(in.beta, 0, 0.5), opt), "beta differs");
  has(bwd(in.beta, options<double>(MesaSolver::cg)), "cache was made with solver = exact");
  // a token-by-token cache with chunkwise options, and a chunkwise cache with another chunk size
  has(bwd(in.beta, options<double>(MesaSolver::exact, 30, 2)), "cache was made with opt.chunk = 0 (token by token)");
  mesaopt::gated_mesa_forward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, options<double>(MesaSolver::exact, 30, 2),
                              out, cache);
  CHECK(bwd(in.beta, options<double>(MesaSolver::exact, 30, 2)) == "<no exception>");
  has(bwd(in.beta, options<double>(MesaSolver::exact, 30, 3)), "cache was made with opt.chunk = 2 (chunkwise)");
  has(bwd(in.beta, opt), "but opt.chunk is 0");
  Vector<double> db_short(n - 1);
  has(test::error_of([&] {
        mesaopt::gated_mesa_backward(in.q, in.k, in.v, in.beta, in.gamma, in.lam, opt, out, cache, dq, dk, dv_,
                                     db_short, dg, dl);
      }),
      "dbeta has 5 entries");
}

}  // namespace mesaopt_test_gated_mesa
