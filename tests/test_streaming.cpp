// The op contract's carried state (docs/math.md §6) for the three ops:
// - a sequence split anywhere, with the final state of one piece passed as the
//   initial state of the next, gives the whole sequence's outputs and final
//   state (float and double), and so do the one-token step functions;
// - the gradients of the initial state (and those that flow in through
//   grad_final) match central finite differences in double;
// - chaining backward passes across pieces (truncated BPTT) gives the whole
//   sequence's gradients;
// - the fast backward passes with state agree with the references;
// - bad states are rejected by name.
#include <catch2/catch.hpp>
#include <mesaopt/ops.hpp>
#include <mesaopt/reference.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <cmath>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_streaming {

using mesaopt::LinearAttentionState;
using mesaopt::MesaCache;
using mesaopt::MesaOptions;
using mesaopt::MesaState;
using mesaopt::RowMatrix;
using mesaopt::SoftmaxCache;
using mesaopt::SoftmaxKVCache;
using mesaopt::test::random_matrix;
using mesaopt::test::relative_rms;

namespace {

// ---------------------------------------------------------------------------
// Each op behind one interface: forward/backward of a piece with state, a
// token step, the state's "entries" as flat blocks (for comparisons, weights
// and finite differences), and the empty state.

struct LinearOp {
  template <class T>
  using State = LinearAttentionState<T>;
  template <class T>
  struct Cache {};
  static constexpr const char* name = "linear";

  template <class T>
  static State<T> empty(long d, long dv) {
    return mesaopt::linear_attention_initial_state<T>(d, dv);
  }
  template <class T>
  static void forward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, RowMatrix<T>& out,
                      Cache<T>&, const State<T>* init, State<T>* fin) {
    mesaopt::linear_attention_forward<T>(q, k, v, out, init, fin);
  }
  template <class T>
  static double backward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, const RowMatrix<T>& g,
                         Cache<T>&, RowMatrix<T>& dq, RowMatrix<T>& dk, RowMatrix<T>& dv, const State<T>* init,
                         const State<T>* gfin, State<T>* ginit) {
    mesaopt::linear_attention_backward<T>(q, k, v, g, dq, dk, dv, init, gfin, ginit);
    return 0;
  }
  template <class T>
  static void step(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, long t, State<T>& s,
                   RowMatrix<T>& out) {
    mesaopt::linear_attention_step<T>(q.row(t), k.row(t), v.row(t), s, out.row(t));
  }
  template <class T>
  static std::vector<RowMatrix<T>*> blocks(State<T>& s) {
    return {&s.S};
  }
};

struct SoftmaxOp {
  template <class T>
  using State = SoftmaxKVCache<T>;
  template <class T>
  using Cache = SoftmaxCache<T>;
  static constexpr const char* name = "softmax";
  static constexpr mesaopt::SoftmaxAttentionOptions opt{3, 5};  // small tiles: tile edges everywhere

  template <class T>
  static State<T> empty(long d, long dv) {
    return SoftmaxKVCache<T>(d, dv);
  }
  template <class T>
  static void forward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, RowMatrix<T>& out,
                      Cache<T>& c, const State<T>* init, State<T>* fin) {
    mesaopt::softmax_attention_forward<T>(q, k, v, opt, out, c, init, fin);
  }
  template <class T>
  static double backward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, const RowMatrix<T>& g,
                         Cache<T>& c, RowMatrix<T>& dq, RowMatrix<T>& dk, RowMatrix<T>& dv, const State<T>* init,
                         const State<T>* gfin, State<T>* ginit) {
    mesaopt::softmax_attention_backward<T>(q, k, v, opt, g, c, dq, dk, dv, init, gfin, ginit);
    return 0;
  }
  template <class T>
  static void step(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, long t, State<T>& s,
                   RowMatrix<T>& out) {
    mesaopt::softmax_attention_step<T>(q.row(t), k.row(t), v.row(t), s, out.row(t));
  }
  // Keys and values as matrices (copies; written back by set_blocks).
  template <class T>
  static std::vector<RowMatrix<T>> get(const State<T>& s) {
    return {RowMatrix<T>(s.keys()), RowMatrix<T>(s.values())};
  }
};

struct MesaOp {
  template <class T>
  using State = MesaState<T>;
  template <class T>
  using Cache = MesaCache<T>;
  static constexpr const char* name = "mesa";
  static constexpr double lambda = 0.8, gamma = 0.93;

  template <class T>
  static MesaOptions<T> options() {
    MesaOptions<T> o;
    o.lambda = T(lambda);
    o.forget = T(gamma);
    o.chunk = 4;  // several checkpoints per piece
    return o;
  }
  template <class T>
  static State<T> empty(long d, long dv) {
    return mesaopt::mesa_initial_state<T>(d, dv, options<T>());
  }
  template <class T>
  static void forward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, RowMatrix<T>& out,
                      Cache<T>& c, const State<T>* init, State<T>* fin) {
    mesaopt::mesa_forward<T>(q, k, v, options<T>(), out, c, init, fin);
  }
  template <class T>
  static double backward(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, const RowMatrix<T>& g,
                         Cache<T>& c, RowMatrix<T>& dq, RowMatrix<T>& dk, RowMatrix<T>& dv, const State<T>* init,
                         const State<T>* gfin, State<T>* ginit, T* dforget = nullptr) {
    return mesaopt::mesa_backward<T>(q, k, v, options<T>(), g, c, dq, dk, dv, dforget, init, gfin, ginit);
  }
  template <class T>
  static void step(const RowMatrix<T>& q, const RowMatrix<T>& k, const RowMatrix<T>& v, long t, State<T>& s,
                   RowMatrix<T>& out) {
    mesaopt::mesa_step<T>(q.row(t), k.row(t), v.row(t), options<T>(), s, out.row(t));
  }
  template <class T>
  static std::vector<RowMatrix<T>*> blocks(State<T>& s) {
    return {&s.R, &s.S};
  }
};

// Flat list of a state's matrices, uniformly for the three ops.
template <class T>
std::vector<RowMatrix<T>> state_matrices(const LinearAttentionState<T>& s) {
  return {s.S};
}
template <class T>
std::vector<RowMatrix<T>> state_matrices(const MesaState<T>& s) {
  return {s.R, s.S};
}
template <class T>
std::vector<RowMatrix<T>> state_matrices(const SoftmaxKVCache<T>& s) {
  return {RowMatrix<T>(s.keys()), RowMatrix<T>(s.values())};
}

template <class T>
double state_difference(const std::vector<RowMatrix<T>>& a, const std::vector<RowMatrix<T>>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    REQUIRE(a[i].rows() == b[i].rows());
    REQUIRE(a[i].cols() == b[i].cols());
    worst = std::max(worst, relative_rms(a[i], b[i]));
  }
  return worst;
}

// Inputs of one test sequence; keys scaled so the mesa recursion is well conditioned.
template <class T>
struct Inputs {
  RowMatrix<T> q, k, v;
  Inputs(long n, long d, long dv, std::uint64_t seed)
      : q(random_matrix<T>(n, d, seed, 1.0 / std::sqrt(double(d)))),
        k(random_matrix<T>(n, d, seed + 1, 1.0 / std::sqrt(double(d)))),
        v(random_matrix<T>(n, dv, seed + 2)) {}
};

// A non-trivial initial state: the final state after a random warm-up sequence.
template <class Op, class T>
typename Op::template State<T> warm_state(long d, long dv, long n, std::uint64_t seed) {
  const Inputs<T> in(n, d, dv, seed);
  RowMatrix<T> out(n, dv);
  typename Op::template Cache<T> c;
  auto s = Op::template empty<T>(d, dv);
  Op::template forward<T>(in.q, in.k, in.v, out, c, &s, &s);
  return s;
}

// Runs [0, n) in pieces at the given boundaries, carrying the state; returns
// the outputs and the final state.
template <class Op, class T>
RowMatrix<T> run_in_pieces(const Inputs<T>& in, const std::vector<long>& cuts,
                           const typename Op::template State<T>* initial, typename Op::template State<T>& final) {
  const long n = in.q.rows(), dv = in.v.cols();
  RowMatrix<T> out(n, dv);
  std::vector<long> bounds = {0};
  for (long c : cuts) bounds.push_back(c);
  bounds.push_back(n);
  bool first = true;
  for (std::size_t p = 0; p + 1 < bounds.size(); ++p) {
    const long s = bounds[p], len = bounds[p + 1] - s;
    const RowMatrix<T> q = in.q.middleRows(s, len), k = in.k.middleRows(s, len), v = in.v.middleRows(s, len);
    RowMatrix<T> o(len, dv);
    typename Op::template Cache<T> c;
    const auto* init = first ? initial : &final;
    Op::template forward<T>(q, k, v, o, c, init, &final);  // final may alias init: allowed by the contract
    out.middleRows(s, len) = o;
    first = false;
  }
  return out;
}

template <class Op, class T>
void check_split_and_step(long n, long d, long dv, double tol) {
  const Inputs<T> in(n, d, dv, 100 + std::uint64_t(d));
  for (bool with_initial : {false, true}) {
    const auto init = warm_state<Op, T>(d, dv, 9, 7);
    const auto* initial = with_initial ? &init : nullptr;
    // The whole sequence in one call.
    RowMatrix<T> whole(n, dv);
    typename Op::template Cache<T> c;
    auto whole_final = Op::template empty<T>(d, dv);
    Op::template forward<T>(in.q, in.k, in.v, whole, c, initial, &whole_final);
    for (const std::vector<long>& cuts :
         {std::vector<long>{1}, std::vector<long>{n / 2}, std::vector<long>{n - 1}, std::vector<long>{3, 11, n - 2}}) {
      auto fin = Op::template empty<T>(d, dv);
      const RowMatrix<T> pieces = run_in_pieces<Op, T>(in, cuts, initial, fin);
      INFO(Op::name << " n " << n << " d " << d << " dv " << dv << " initial " << with_initial << " first cut "
                    << cuts[0] << " pieces " << cuts.size() + 1);
      CHECK(relative_rms(pieces, whole) < tol);
      CHECK(state_difference(state_matrices(fin), state_matrices(whole_final)) < tol);
    }
    // Token by token with the step function.
    auto s = with_initial ? init : Op::template empty<T>(d, dv);
    RowMatrix<T> stepped(n, dv);
    for (long t = 0; t < n; ++t) Op::template step<T>(in.q, in.k, in.v, t, s, stepped);
    INFO(Op::name << " step, n " << n << " d " << d << " initial " << with_initial);
    CHECK(relative_rms(stepped, whole) < tol);
    CHECK(state_difference(state_matrices(s), state_matrices(whole_final)) < tol);
    CHECK(whole.norm() > 0);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("a split sequence and token-by-token steps give the whole sequence's outputs and state", "[state]",
                   float, double) {
  const double tol = std::is_same_v<TestType, float> ? 2e-5 : 1e-12;
  for (long d : {1L, 5L, 20L}) {
    check_split_and_step<LinearOp, TestType>(37, d, 3, tol);
    check_split_and_step<SoftmaxOp, TestType>(37, d, 7, tol);
    check_split_and_step<MesaOp, TestType>(37, d, 4, tol);
  }
}

TEMPLATE_TEST_CASE("linear attention: the chunked and recurrent forms carry the state alike", "[state]", float,
                   double) {
  using T = TestType;
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  const long n = 41, d = 6, dv = 5;
  const Inputs<T> in(n, d, dv, 3);
  const auto init = warm_state<LinearOp, T>(d, dv, 8, 4);
  RowMatrix<T> o_rec(n, dv), o_chk(n, dv), o_ref(n, dv);
  LinearAttentionState<T> f_rec, f_chk;
  mesaopt::linear_attention_forward_recurrent<T>(in.q, in.k, in.v, o_rec, &init, &f_rec);
  mesaopt::linear_attention_forward_chunked<T>(in.q, in.k, in.v, o_chk, 4, &init, &f_chk);
  mesaopt::reference::linear_attention_forward<T>(in.q, in.k, in.v, o_ref, &init);
  CHECK(relative_rms(o_rec, o_ref) < tol);
  CHECK(relative_rms(o_chk, o_ref) < tol);
  CHECK(relative_rms(f_chk.S, f_rec.S) < tol);
  const RowMatrix<T> g = random_matrix<T>(n, dv, 9);
  const LinearAttentionState<T> gfin{random_matrix<T>(dv, d, 10)};
  RowMatrix<T> dq[3], dk[3], dv_[3];
  LinearAttentionState<T> gi[3];
  for (int f = 0; f < 3; ++f) {
    dq[f].resize(n, d);
    dk[f].resize(n, d);
    dv_[f].resize(n, dv);
  }
  mesaopt::linear_attention_backward_recurrent<T>(in.q, in.k, in.v, g, dq[0], dk[0], dv_[0], &init, &gfin, &gi[0]);
  mesaopt::linear_attention_backward_chunked<T>(in.q, in.k, in.v, g, dq[1], dk[1], dv_[1], 4, &init, &gfin, &gi[1]);
  mesaopt::reference::linear_attention_backward<T>(in.q, in.k, in.v, g, dq[2], dk[2], dv_[2], &init, &gfin, &gi[2]);
  for (int f = 0; f < 2; ++f) {
    INFO("form " << f);
    CHECK(relative_rms(dq[f], dq[2]) < tol);
    CHECK(relative_rms(dk[f], dk[2]) < tol);
    CHECK(relative_rms(dv_[f], dv_[2]) < tol);
    CHECK(relative_rms(gi[f].S, gi[2].S) < tol);
  }
}

// ---------------------------------------------------------------------------
// Finite differences of the initial-state gradients (double). The loss is
//   L = sum(out .* W) + sum over the final state's matrices of (X .* Wf_X),
// so grad_final = Wf and every input, including the initial state, is checked.

namespace {

template <class Op>
struct FdSetup {
  using S = typename Op::template State<double>;
  long n, d, dv;
  Inputs<double> in;
  S init;
  RowMatrix<double> w;
  S wfin;  // weights on the final state = grad_final
  FdSetup(long n_, long d_, long dv_, long warm)
      : n(n_), d(d_), dv(dv_), in(n_, d_, dv_, 31), init(warm_state<Op, double>(d_, dv_, warm, 32)),
        w(random_matrix<double>(n_, dv_, 33)), wfin(warm_state<Op, double>(d_, dv_, warm, 34)) {
    // Final-state weights of the right shape: a random state of the final length.
    if constexpr (std::is_same_v<Op, SoftmaxOp>) {
      wfin = SoftmaxKVCache<double>(random_matrix<double>(init.length() + n, d, 35),
                                    random_matrix<double>(init.length() + n, dv, 36));
    } else {
      for (RowMatrix<double>* m : Op::template blocks<double>(wfin)) *m = random_matrix<double>(m->rows(), m->cols(), 37);
    }
  }
  double loss(const S& initial) {
    RowMatrix<double> out(n, dv);
    typename Op::template Cache<double> c;
    S fin = Op::template empty<double>(d, dv);
    Op::template forward<double>(in.q, in.k, in.v, out, c, &initial, &fin);
    double l = (out.array() * w.array()).sum();
    const auto a = state_matrices(fin), b = state_matrices(wfin);
    for (std::size_t i = 0; i < a.size(); ++i) l += (a[i].array() * b[i].array()).sum();
    return l;
  }
};


template <class Op>
void check_state_gradients(long n, long d, long dv, long warm) {
  FdSetup<Op> s(n, d, dv, warm);
  RowMatrix<double> dq(n, d), dk(n, d), dv_(n, dv), out(n, dv);
  typename Op::template Cache<double> c;
  typename Op::template State<double> fin = Op::template empty<double>(d, dv), ginit;
  Op::template forward<double>(s.in.q, s.in.k, s.in.v, out, c, &s.init, &fin);
  Op::template backward<double>(s.in.q, s.in.k, s.in.v, s.w, c, dq, dk, dv_, &s.init, &s.wfin, &ginit);
  auto loss = [&] { return s.loss(s.init); };
  auto check = [](const mesaopt::test::GradCheckResult& r, const std::string& what) {
    INFO(r.describe(what));
    CHECK(r.error < 1e-6);
    CHECK(r.scale > 1e-4);
  };
  check(mesaopt::test::check_gradient(loss, s.in.q, dq), std::string(Op::name) + " dq");
  check(mesaopt::test::check_gradient(loss, s.in.k, dk), std::string(Op::name) + " dk");
  check(mesaopt::test::check_gradient(loss, s.in.v, dv_), std::string(Op::name) + " grad_v");
  if constexpr (std::is_same_v<Op, SoftmaxOp>) {
    RowMatrix<double> keys = s.init.keys(), values = s.init.values();
    auto loss_kv = [&] { return s.loss(SoftmaxKVCache<double>(keys, values)); };
    check(mesaopt::test::fd_matrix(loss_kv, keys, RowMatrix<double>(ginit.keys()), false), "softmax grad_initial keys");
    check(mesaopt::test::fd_matrix(loss_kv, values, RowMatrix<double>(ginit.values()), false), "softmax grad_initial values");
  } else {
    auto ga = Op::template blocks<double>(ginit);
    auto xa = Op::template blocks<double>(s.init);
    for (std::size_t i = 0; i < xa.size(); ++i) {
      const bool is_R = std::is_same_v<Op, MesaOp> && i == 0;
      check(mesaopt::test::fd_matrix(loss, *xa[i], *ga[i], is_R), std::string(Op::name) + " grad_initial block " + std::to_string(i));
    }
  }
}

}  // namespace

TEST_CASE("initial-state gradients match central finite differences (double)", "[state][grad]") {
  check_state_gradients<LinearOp>(13, 5, 3, 6);
  check_state_gradients<SoftmaxOp>(13, 5, 3, 6);
  check_state_gradients<MesaOp>(13, 5, 3, 6);
}

TEST_CASE("mesa: dlambda and dforget with carried state match finite differences (double)", "[state][grad]") {
  const long n = 15, d = 5, dv = 3;
  const Inputs<double> in(n, d, dv, 51);
  const RowMatrix<double> w = random_matrix<double>(n, dv, 52);
  MesaState<double> wfin{random_matrix<double>(d, d, 53), random_matrix<double>(dv, d, 54)};
  for (bool with_initial : {false, true}) {
    const MesaState<double> init = warm_state<MesaOp, double>(d, dv, 7, 55);
    const MesaState<double>* initial = with_initial ? &init : nullptr;
    MesaOptions<double> opt = MesaOp::options<double>();
    auto loss = [&] {
      RowMatrix<double> out(n, dv);
      MesaCache<double> c;
      MesaState<double> fin;
      mesaopt::mesa_forward<double>(in.q, in.k, in.v, opt, out, c, initial, &fin);
      return (out.array() * w.array()).sum() + (fin.R.array() * wfin.R.array()).sum() +
             (fin.S.array() * wfin.S.array()).sum();
    };
    RowMatrix<double> out(n, dv), dq(n, d), dk(n, d), dv_(n, dv);
    MesaCache<double> c;
    mesaopt::mesa_forward<double>(in.q, in.k, in.v, opt, out, c, initial);
    double dforget = 0;
    const double dlambda = mesaopt::mesa_backward<double>(in.q, in.k, in.v, opt, w, c, dq, dk, dv_, &dforget, initial,
                                                          &wfin);
    const auto rf = mesaopt::test::check_gradient(loss, opt.forget, dforget);
    INFO("initial " << with_initial << ": " << rf.describe("dforget"));
    CHECK(rf.error < 1e-6);
    if (with_initial) {
      CHECK(dlambda == 0.0);  // lambda is not used when the state is given
    } else {
      const auto rl = mesaopt::test::check_gradient(loss, opt.lambda, dlambda);
      INFO(rl.describe("dlambda"));
      CHECK(rl.error < 1e-6);
    }
  }
}

// ---------------------------------------------------------------------------
// Truncated backprop through time made exact: backward over pieces, each
// piece's grad_initial passed as the previous piece's grad_final.

namespace {

template <class Op>
void check_chained_backward(long n, long d, long dv, long cut) {
  using T = double;
  using S = typename Op::template State<T>;
  const Inputs<T> in(n, d, dv, 61);
  const RowMatrix<T> g = random_matrix<T>(n, dv, 62);
  // Whole sequence.
  RowMatrix<T> out(n, dv), dq(n, d), dk(n, d), dv_(n, dv);
  typename Op::template Cache<T> c;
  Op::template forward<T>(in.q, in.k, in.v, out, c, nullptr, nullptr);
  T whole_forget = 0;
  double whole_lambda = 0;
  if constexpr (std::is_same_v<Op, MesaOp>)
    whole_lambda = Op::template backward<T>(in.q, in.k, in.v, g, c, dq, dk, dv_, nullptr, nullptr, nullptr, &whole_forget);
  else
    Op::template backward<T>(in.q, in.k, in.v, g, c, dq, dk, dv_, nullptr, nullptr, nullptr);
  // Two pieces.
  const long n2 = n - cut;
  const RowMatrix<T> q1 = in.q.topRows(cut), k1 = in.k.topRows(cut), v1 = in.v.topRows(cut), g1 = g.topRows(cut);
  const RowMatrix<T> q2 = in.q.bottomRows(n2), k2 = in.k.bottomRows(n2), v2 = in.v.bottomRows(n2),
                     g2 = g.bottomRows(n2);
  RowMatrix<T> o1(cut, dv), o2(n2, dv);
  typename Op::template Cache<T> c1, c2;
  S s1 = Op::template empty<T>(d, dv), grad_s1;
  Op::template forward<T>(q1, k1, v1, o1, c1, nullptr, &s1);
  Op::template forward<T>(q2, k2, v2, o2, c2, &s1, nullptr);
  RowMatrix<T> dq1(cut, d), dk1(cut, d), dv1(cut, dv), dq2(n2, d), dk2(n2, d), dv2(n2, dv);
  T f1 = 0, f2 = 0;
  double l1 = 0, l2 = 0;
  if constexpr (std::is_same_v<Op, MesaOp>) {
    l2 = Op::template backward<T>(q2, k2, v2, g2, c2, dq2, dk2, dv2, &s1, nullptr, &grad_s1, &f2);
    l1 = Op::template backward<T>(q1, k1, v1, g1, c1, dq1, dk1, dv1, nullptr, &grad_s1, nullptr, &f1);
  } else {
    Op::template backward<T>(q2, k2, v2, g2, c2, dq2, dk2, dv2, &s1, nullptr, &grad_s1);
    Op::template backward<T>(q1, k1, v1, g1, c1, dq1, dk1, dv1, nullptr, &grad_s1, nullptr);
  }
  RowMatrix<T> dq_c(n, d), dk_c(n, d), dv_c(n, dv);
  dq_c << dq1, dq2;
  dk_c << dk1, dk2;
  dv_c << dv1, dv2;
  INFO(Op::name << " cut at " << cut);
  CHECK(relative_rms(dq_c, dq) < 1e-11);
  CHECK(relative_rms(dk_c, dk) < 1e-11);
  CHECK(relative_rms(dv_c, dv_) < 1e-11);
  if constexpr (std::is_same_v<Op, MesaOp>) {
    CHECK(l2 == 0.0);
    CHECK(l1 == Approx(whole_lambda).epsilon(1e-10));
    CHECK(f1 + f2 == Approx(whole_forget).epsilon(1e-10));
  }
}

}  // namespace

TEST_CASE("chained backward passes over pieces give the whole sequence's gradients", "[state][grad]") {
  for (long cut : {1L, 9L, 22L}) {
    check_chained_backward<LinearOp>(23, 6, 4, cut);
    check_chained_backward<SoftmaxOp>(23, 6, 4, cut);
    check_chained_backward<MesaOp>(23, 6, 4, cut);
  }
}

// ---------------------------------------------------------------------------
// Fast backward with state against the references.

TEST_CASE("fast backward passes with state agree with the references (double)", "[state][reference]") {
  const long n = 29, d = 7, dv = 5;
  const Inputs<double> in(n, d, dv, 71);
  const RowMatrix<double> g = random_matrix<double>(n, dv, 72);
  SECTION("softmax") {
    const auto init = warm_state<SoftmaxOp, double>(d, dv, 6, 73);
    const SoftmaxKVCache<double> gfin(random_matrix<double>(6 + n, d, 74), random_matrix<double>(6 + n, dv, 75));
    RowMatrix<double> out(n, dv), o_ref(n, dv), dq(n, d), dk(n, d), dv_(n, dv), rq(n, d), rk(n, d), rv(n, dv);
    SoftmaxCache<double> c;
    SoftmaxKVCache<double> gi, gi_ref;
    mesaopt::softmax_attention_forward<double>(in.q, in.k, in.v, SoftmaxOp::opt, out, c, &init);
    mesaopt::reference::softmax_attention_forward<double>(in.q, in.k, in.v, o_ref, &init);
    mesaopt::softmax_attention_backward<double>(in.q, in.k, in.v, SoftmaxOp::opt, g, c, dq, dk, dv_, &init, &gfin, &gi);
    mesaopt::reference::softmax_attention_backward<double>(in.q, in.k, in.v, g, rq, rk, rv, &init, &gfin, &gi_ref);
    CHECK(relative_rms(out, o_ref) < 1e-12);
    CHECK(relative_rms(dq, rq) < 1e-11);
    CHECK(relative_rms(dk, rk) < 1e-11);
    CHECK(relative_rms(dv_, rv) < 1e-11);
    CHECK(state_difference(state_matrices(gi), state_matrices(gi_ref)) < 1e-11);
  }
  SECTION("mesa") {
    const auto init = warm_state<MesaOp, double>(d, dv, 6, 76);
    const MesaState<double> gfin{random_matrix<double>(d, d, 77), random_matrix<double>(dv, d, 78)};
    const auto opt = MesaOp::options<double>();
    RowMatrix<double> out(n, dv), o_ref(n, dv), dq(n, d), dk(n, d), dv_(n, dv), rq(n, d), rk(n, d), rv(n, dv);
    for (bool with_initial : {false, true}) {
      const MesaState<double>* initial = with_initial ? &init : nullptr;
      MesaCache<double> c;
      MesaState<double> gi, gi_ref, fin, fin_ref;
      mesaopt::mesa_forward<double>(in.q, in.k, in.v, opt, out, c, initial, &fin);
      mesaopt::reference::mesa_forward<double>(in.q, in.k, in.v, opt, o_ref, initial, &fin_ref);
      const RowMatrix<double> direct =
          mesaopt::reference::mesa_forward_direct(in.q, in.k, in.v, opt.lambda, opt.forget, initial);
      double df = 0, df_ref = 0;
      const double dl = mesaopt::mesa_backward<double>(in.q, in.k, in.v, opt, g, c, dq, dk, dv_, &df, initial, &gfin, &gi);
      const double dl_ref =
          mesaopt::reference::mesa_backward<double>(in.q, in.k, in.v, opt, g, rq, rk, rv, &df_ref, initial, &gfin, &gi_ref);
      INFO("initial " << with_initial);
      CHECK(relative_rms(out, o_ref) < 1e-12);
      CHECK(relative_rms(out, direct) < 1e-10);
      CHECK(state_difference(state_matrices(fin), state_matrices(fin_ref)) < 1e-12);
      CHECK(relative_rms(dq, rq) < 1e-11);
      CHECK(relative_rms(dk, rk) < 1e-11);
      CHECK(relative_rms(dv_, rv) < 1e-11);
      CHECK(state_difference(state_matrices(gi), state_matrices(gi_ref)) < 1e-10);
      CHECK(dl == Approx(dl_ref).epsilon(1e-10).margin(1e-14));
      CHECK(df == Approx(df_ref).epsilon(1e-10));
    }
  }
}

// ---------------------------------------------------------------------------
// Bad states are rejected with a message naming them.

TEST_CASE("bad states are rejected by name", "[state][errors]") {
  using Catch::Matchers::Contains;
  using M = RowMatrix<double>;
  const long n = 6, d = 4, dv = 3;
  const Inputs<double> in(n, d, dv, 81);
  M out(n, dv), dq(n, d), dk(n, d), dv_(n, dv);
  const M g = M::Ones(n, dv);
  SECTION("linear") {
    const LinearAttentionState<double> wrong{M::Zero(d, dv)};
    CHECK_THROWS_WITH(mesaopt::linear_attention_forward(in.q, in.k, in.v, out, &wrong),
                      Contains("initial.S is 4 x 3 but must be dv x d = 3 x 4"));
    CHECK_THROWS_WITH(mesaopt::linear_attention_backward(in.q, in.k, in.v, g, dq, dk, dv_, nullptr, &wrong),
                      Contains("grad_final.S is 4 x 3"));
    LinearAttentionState<double> nan_state{M::Zero(dv, d)};
    nan_state.S(1, 2) = NAN;
    CHECK_THROWS_WITH(mesaopt::linear_attention_forward(in.q, in.k, in.v, out, &nan_state), Contains("non-finite"));
    auto s = mesaopt::linear_attention_initial_state<double>(d, dv);
    Eigen::VectorXd q5(5), o3(dv);
    CHECK_THROWS_WITH(mesaopt::linear_attention_step(q5, in.k.row(0), in.v.row(0), s, o3),
                      Contains("q has 5 entries but the state has d = 4"));
  }
  SECTION("mesa") {
    const auto opt = MesaOp::options<double>();
    MesaCache<double> c;
    MesaState<double> bad{M::Identity(d, d), M::Zero(dv, d)};
    bad.R(0, 1) = 0.5;  // not symmetric
    CHECK_THROWS_WITH(mesaopt::mesa_forward(in.q, in.k, in.v, opt, out, c, &bad), Contains("initial.R must be symmetric"));
    const MesaState<double> wrong{M::Identity(d + 1, d + 1), M::Zero(dv, d)};
    CHECK_THROWS_WITH(mesaopt::mesa_forward(in.q, in.k, in.v, opt, out, c, &wrong),
                      Contains("initial.R is 5 x 5 but must be d x d = 4 x 4"));
    // The backward must get the initial state the forward used.
    const auto init = mesaopt::mesa_initial_state<double>(d, dv, opt);
    mesaopt::mesa_forward(in.q, in.k, in.v, opt, out, c, &init);
    CHECK_THROWS_WITH(mesaopt::mesa_backward(in.q, in.k, in.v, opt, g, c, dq, dk, dv_),
                      Contains("the forward ran with an initial state but backward got none"));
    MesaState<double> other = init;
    other.S(0, 0) = 1;
    CHECK_THROWS_WITH(mesaopt::mesa_backward(in.q, in.k, in.v, opt, g, c, dq, dk, dv_, nullptr, &other),
                      Contains("initial.S differs"));
    CHECK_NOTHROW(mesaopt::mesa_backward(in.q, in.k, in.v, opt, g, c, dq, dk, dv_, nullptr, &init));
    // An indefinite initial R: the first denominator gamma + k.R k is negative, and the
    // forward stops with a breakdown error (docs/mesa.md, "Numerical safety") instead of
    // producing outputs; the cache is then unusable, so a backward is rejected.
    MesaState<double> indefinite{-M::Identity(d, d), M::Zero(dv, d)};
    CHECK_THROWS_AS(mesaopt::mesa_forward(in.q, in.k, in.v, opt, out, c, &indefinite), mesaopt::MesaBreakdownError);
    CHECK(c.length() == 0);
    MesaState<double> gi;
    CHECK_THROWS_AS(mesaopt::mesa_backward(in.q, in.k, in.v, opt, g, c, dq, dk, dv_, nullptr, &indefinite, nullptr, &gi),
                    std::invalid_argument);
    auto s = mesaopt::mesa_initial_state<double>(d, dv, opt);
    Eigen::VectorXd o2(2);
    CHECK_THROWS_WITH(mesaopt::mesa_step(in.q.row(0), in.k.row(0), in.v.row(0), opt, s, o2),
                      Contains("out has 2 entries but the state has dv = 3"));
    CHECK_THROWS_WITH(mesaopt::mesa_initial_state<double>(0, dv, opt), Contains("d must be at least 1"));
  }
  SECTION("softmax") {
    SoftmaxCache<double> c;
    const SoftmaxKVCache<double> wrong(d + 1, dv);
    CHECK_THROWS_WITH(mesaopt::softmax_attention_forward<double>(in.q, in.k, in.v, {}, out, c, &wrong),
                      Contains("initial holds keys of width 5"));
    const SoftmaxKVCache<double> init(in.q.topRows(2), in.v.topRows(2));
    mesaopt::softmax_attention_forward<double>(in.q, in.k, in.v, {}, out, c, &init);
    CHECK_THROWS_WITH(mesaopt::softmax_attention_backward<double>(in.q, in.k, in.v, {}, g, c, dq, dk, dv_),
                      Contains("prefix = 2"));
    const SoftmaxKVCache<double> short_grad(in.q, in.v);  // 6 tokens, the final cache has 8
    CHECK_THROWS_WITH(
        mesaopt::softmax_attention_backward<double>(in.q, in.k, in.v, {}, g, c, dq, dk, dv_, &init, &short_grad),
        Contains("grad_final.length() is 6 but the final cache's length"));
    SoftmaxKVCache<double> kv(d, dv);
    Eigen::VectorXd q3(3), o(dv);
    CHECK_THROWS_WITH(mesaopt::softmax_attention_step(q3, in.k.row(0), in.v.row(0), kv, o),
                      Contains("q has 3 entries"));
    CHECK(kv.length() == 0);  // nothing appended on error
    CHECK_THROWS_WITH(kv.append(M::Ones(2, d + 1), M::Ones(2, dv)), Contains("columns of keys"));
  }
}

}  // namespace mesaopt_test_streaming
