#pragma once
// The gated mesa op (docs/math.md §8, M29-M36; docs/gated_mesa.md), one head,
// one sequence, functional: the mesa layer with per-token input gates
// beta_t in (0, 1], forget gates gamma_t in (0, 1] and a learned diagonal
// regulariser Lambda = diag(lambda_diag) > 0, as in MesaNet (von Oswald et
// al., arXiv 2506.05233):
//
//   S_t = gamma_t S_{t-1} + beta_t v_t k_t^T,        S_0 = 0        (dv x d)  (M29)
//   H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,        H_0 = 0        (d x d)   (M29)
//
// Two objectives, chosen by opt.solver:
//
//   exact: P_t = gamma_t P_{t-1} + beta_t k_t k_t^T, P_0 = Lambda  (the ridge decays with the gates)
//          o_t = S_t P_t^{-1} q_t, by the Sherman-Morrison recursion on R_t = P_t^{-1}         (M30-M31)
//   cg:    o_t = S_t (H_t + Lambda)^{-1} q_t  (MesaNet's objective: Lambda not decayed),
//          the solve by opt.cg_steps conjugate-gradient steps from x = 0                       (M32)
//
// (The issue's G_t is S_t here and its M_t is P_t; G and M name the backward's
// accumulators, as in §3.) Backward: one reverse sweep with the total adjoints
// of S_t and P_t (or H_t), M33-M36; for cg the solve is differentiated as an
// exact linear solve, dq_t = (H_t + Lambda)^{-1} da_t by a second CG run
// (as MesaNet does).
//
// The op contract (docs/streaming.md):
//   gated_mesa_forward (q, k, v, beta, gamma, lambda_diag, opt, out, cache, initial = nullptr, final = nullptr)
//   gated_mesa_backward(q, k, v, beta, gamma, lambda_diag, opt, dout, cache, dq, dk, grad_v,
//                       dbeta, dgamma, dlambda_diag, initial = nullptr, grad_final = nullptr,
//                       grad_initial = nullptr)
//   gated_mesa_step    (q, k, v, beta_t, gamma_t, lambda_diag, opt, state, out)   one token
// q, k : (seq_len, d); v, out, dout : (seq_len, dv); beta, gamma : seq_len; lambda_diag : d.
// The state (GatedMesaState) is S and, for exact, R = P^{-1}; for cg, H. With
// an initial state the exact solver does not use lambda_diag (P_0 = R_0^{-1})
// and returns dlambda_diag = 0 (the gradient goes to grad_initial->R); the cg
// solver uses Lambda at every token.
//
// Two forms (docs/gated_mesa.md, "Chunkwise forms"):
// - opt.chunk = 0: token by token (M29-M36). The forward saves the state every
//   round(sqrt(seq_len)) tokens; the backward recomputes each stretch from its
//   checkpoint.
// - opt.chunk = C > 0: chunkwise, C tokens at a time with GEMMs on C x d and
//   C x C blocks (exact: ops/gated_mesa_chunkwise_exact.hpp, M44-M48; cg:
//   ops/gated_mesa_chunkwise_cg.hpp, M49-M53). The same numbers up to rounding;
//   the cache keeps the state at every chunk start. opt.threads > 1 runs one
//   sequence's chunks on several threads: the state recurrence between chunks
//   chunk after chunk, the chunks' solves in parallel (detail::ordered_pipeline);
//   bit-identical results for any thread count (docs/gated_mesa.md, "Threads").
//
// Precision (docs/gated_mesa.md): double matches the direct weighted ridge
// solve to < 1e-10 (exact), and CG with d steps to < 1e-8 on well-conditioned
// problems; float agrees with double to < 1e-5 relative RMS in the output and
// < 1e-4 in every gradient (T = 200, d = 16; the tested bounds).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>  // ScopedSerialEigen
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/gated_mesa_chunkwise_cg.hpp>
#include <mesaopt/ops/gated_mesa_chunkwise_exact.hpp>
#include <mesaopt/ops/mesa.hpp>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace mesaopt {

// How the gated op solves its ridge problem (docs/math.md §8).
enum class MesaSolver {
  exact,  // decaying regulariser, Sherman-Morrison recursion (M30-M31), O(d^2) per token
  cg,     // MesaNet's constant regulariser, conjugate gradients (M32), O(cg_steps d^2) per token
};

template <class T>
struct GatedMesaOptions {
  MesaSolver solver = MesaSolver::exact;
  long chunk = 0;       // 0: token by token; C > 0: chunkwise, C tokens per chunk (GEMM form)
  int cg_steps = 30;    // cg: the number of CG steps per solve (>= 1)
  T cg_tolerance = 0;   // cg: > 0 stops a solve early once the residual norm is <= cg_tolerance
  int threads = 1;      // chunkwise form: threads for one sequence (>= 1; 1 = serial); the results do not
                        // depend on it (bit-identical); ignored token by token (opt.chunk = 0)
};

// The carried state (docs/math.md §8, M36). S (dv x d) always; R = P^{-1}
// (d x d, symmetric positive definite) for the exact solver, H (d x d,
// symmetric positive semi-definite) for cg; the other one is empty (0 x 0).
// The same type holds the state's gradients.
template <class T>
struct GatedMesaState {
  RowMatrix<T> S;  // (dv, d)
  RowMatrix<T> R;  // exact: (d, d); cg: empty
  RowMatrix<T> H;  // cg: (d, d); exact: empty
};

namespace detail {

inline const char* solver_name(MesaSolver s) { return s == MesaSolver::cg ? "cg" : "exact"; }

template <class T>
void check_gated_options(const char* where, const GatedMesaOptions<T>& opt) {
  if (opt.solver != MesaSolver::exact && opt.solver != MesaSolver::cg)
    fail(where, "opt.solver must be MesaSolver::exact or MesaSolver::cg, got ", static_cast<int>(opt.solver));
  if (opt.chunk < 0) fail(where, "opt.chunk must be >= 0 (0 = token by token, C > 0 = chunkwise), got ", opt.chunk);
  if (opt.cg_steps < 1) fail(where, "opt.cg_steps must be at least 1, got ", opt.cg_steps);
  if (opt.threads < 1) fail(where, "opt.threads must be at least 1 (1 = serial), got ", opt.threads);
  if (!(std::isfinite(opt.cg_tolerance) && opt.cg_tolerance >= T(0)))
    fail(where, "opt.cg_tolerance must be finite and >= 0, got ", opt.cg_tolerance);
}

// beta (n) and gamma (n) in (0, 1], gamma normal (1/gamma must not overflow);
// lambda_diag (d) finite, > 0 and normal.
template <class T>
void check_gates(const char* where, const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                 const ConstVectorRef<T>& lambda_diag, long n, long d) {
  if (beta.size() != n) fail(where, "beta has ", beta.size(), " entries but seq_len (rows of q) is ", n);
  if (gamma.size() != n) fail(where, "gamma has ", gamma.size(), " entries but seq_len (rows of q) is ", n);
  if (lambda_diag.size() != d)
    fail(where, "lambda_diag has ", lambda_diag.size(), " entries but d (columns of q) is ", d);
  for (long t = 0; t < n; ++t) {
    if (!(std::isfinite(beta[t]) && beta[t] > T(0) && beta[t] <= T(1)))
      fail(where, "beta[", t, "] must lie in (0, 1], got ", beta[t]);
    if (!(std::isfinite(gamma[t]) && gamma[t] > T(0) && gamma[t] <= T(1)))
      fail(where, "gamma[", t, "] must lie in (0, 1], got ", gamma[t]);
    if (gamma[t] < std::numeric_limits<T>::min())
      fail(where, "gamma[", t, "] = ", gamma[t], " is subnormal: 1/gamma overflows");
  }
  for (long i = 0; i < d; ++i) {
    if (!(std::isfinite(lambda_diag[i]) && lambda_diag[i] > T(0)))
      fail(where, "lambda_diag[", i, "] must be finite and > 0, got ", lambda_diag[i]);
    if (lambda_diag[i] < std::numeric_limits<T>::min())
      fail(where, "lambda_diag[", i, "] = ", lambda_diag[i], " is subnormal: 1/lambda overflows");
  }
}

// Throws unless s is a valid state for the solver: S dv x d, and R (exact) or
// H (cg) d x d, finite and symmetric to relative sqrt(epsilon).
template <class T>
void check_gated_state(const char* where, const char* what, const GatedMesaState<T>& s, MesaSolver solver, long d,
                       long dv, bool check_symmetric) {
  if (s.S.rows() != dv || s.S.cols() != d)
    fail(where, what, ".S is ", s.S.rows(), " x ", s.S.cols(), " but must be dv x d = ", dv, " x ", d);
  if (!s.S.allFinite()) fail(where, what, ".S has a non-finite entry");
  const bool exact = solver == MesaSolver::exact;
  const RowMatrix<T>& X = exact ? s.R : s.H;
  const char* name = exact ? ".R" : ".H";
  if (X.rows() != d || X.cols() != d)
    fail(where, what, name, " is ", X.rows(), " x ", X.cols(), " but must be d x d = ", d, " x ", d,
         " for the ", solver_name(solver), " solver (", exact ? "R = P^-1" : "H = sum of gated k k^T", ")");
  if (!X.allFinite()) fail(where, what, name, " has a non-finite entry");
  if (check_symmetric) {
    const T scale = std::max(T(1), X.cwiseAbs().maxCoeff());
    const T asym = (X - X.transpose()).cwiseAbs().maxCoeff();
    if (asym > std::sqrt(std::numeric_limits<T>::epsilon()) * scale)
      fail(where, what, name, " must be symmetric, but |X - X^T| reaches ", asym);
  }
}

// Conjugate gradients on A = H + diag(lam) (symmetric positive definite):
// x = A^{-1} b approximately, from x = 0, at most `steps` steps, stopping when
// the residual norm is <= tol (tol > 0) or exactly 0. Returns the steps taken.
template <class T>
int gated_cg_solve(const RowMatrix<T>& H, const Vector<T>& lam, const T* b, int steps, T tol, T* x_out, Vector<T>& r,
                   Vector<T>& p, Vector<T>& Ap) {
  const long d = H.rows();
  Eigen::Map<Vector<T>> x(x_out, d);
  x.setZero();
  r = Eigen::Map<const Vector<T>>(b, d);
  p = r;
  T rr = r.squaredNorm();
  int s = 0;
  for (; s < steps; ++s) {
    if (rr == T(0) || (tol > T(0) && std::sqrt(rr) <= tol)) break;
    Ap.noalias() = H * p;
    Ap.array() += lam.array() * p.array();
    const T pAp = p.dot(Ap);
    if (!(pAp > T(0))) break;  // A positive definite: only rounding (or a zero p) gets here
    const T alpha = rr / pAp;
    x += alpha * p;
    r -= alpha * Ap;
    const T rr_new = r.squaredNorm();
    p = r + (rr_new / rr) * p;
    rr = rr_new;
  }
  return s;
}

// The running state of one sequence and the per-token update, shared by the
// forward, the backward's recomputation and the step (M29-M32).
template <class T>
struct GatedMesaRunner {
  MesaSolver solver = MesaSolver::exact;
  int cg_steps = 30;
  T cg_tol = 0;
  RowMatrix<T> S;   // (dv, d)
  RowMatrix<T> R;   // exact: P^{-1}
  RowMatrix<T> P;   // exact: P_t (M30); cg: H_t (M29)
  Vector<T> lam;    // lambda_diag
  Vector<T> u, w, r, p, Ap;

  void init(long d, long dv) {
    u.resize(d), w.resize(d), r.resize(d), p.resize(d), Ap.resize(d);
    (void)dv;
  }

  // One token: (S, R, P) <- their values after (k, v, beta, gamma). Throws
  // MesaBreakdownError when the exact recursion's denominator leaves [gamma/2, inf).
  void advance(const char* where, long t, const T* k, const T* v, T beta, T gamma) {
    const long d = P.rows(), dv = S.rows();
    const Eigen::Map<const Vector<T>> kt(k, d), vt(v, dv);
    if (solver == MesaSolver::exact) {
      // (M31) u = R_{t-1} k_t, den = gamma_t + beta_t k_t.u,  R_t = R_{t-1}/gamma_t - w w^T,
      // w = u sqrt(beta_t / (gamma_t den)); computed entry (i, j) and (j, i) alike: R stays bitwise symmetric.
      u.noalias() = R * kt;
      const T den = gamma + beta * kt.dot(u);
      if (!(den >= gamma / T(2)) || !std::isfinite(den)) {
        std::ostringstream os;
        os << where << ": numerical breakdown at position t = " << t
           << " (0-based, within this call): the Sherman-Morrison denominator gamma_t + beta_t k_t.R_{t-1} k_t = "
           << den << " is below gamma_t/2 = " << gamma / T(2)
           << " (R lost positive definiteness to rounding, or k_t is not finite); use double, a larger "
              "lambda_diag or normalised keys, or MesaSolver::cg";
        throw MesaBreakdownError(os.str(), t);
      }
      w = u * std::sqrt(beta / (gamma * den));
      for (long i = 0; i < d; ++i) {
        for (long j = i; j < d; ++j) {
          const T x = R(i, j) / gamma - w[i] * w[j];
          R(i, j) = x;
          R(j, i) = x;
        }
      }
    }
    // (M29/M30) P_t = gamma_t P_{t-1} + beta_t k_t k_t^T (exact: P_0 = Lambda; cg: H_0 = 0), symmetric
    for (long i = 0; i < d; ++i) {
      const T bki = beta * kt[i];
      for (long j = i; j < d; ++j) {
        const T x = gamma * P(i, j) + bki * kt[j];
        P(i, j) = x;
        P(j, i) = x;
      }
    }
    // (M29) S_t = gamma_t S_{t-1} + beta_t v_t k_t^T
    S *= gamma;
    S.noalias() += (beta * vt) * kt.transpose();
  }

  // x = P_t^{-1} b (exact: R_t b; cg: CG on H_t + Lambda, M32).
  void solve(const T* b, T* x) {
    const long d = P.rows();
    if (solver == MesaSolver::exact) {
      Eigen::Map<Vector<T>>(x, d).noalias() = R * Eigen::Map<const Vector<T>>(b, d);
    } else {
      gated_cg_solve(P, lam, b, cg_steps, cg_tol, x, r, p, Ap);
    }
  }
};

}  // namespace detail

template <class T>
class GatedMesaCache;

namespace detail {
struct GatedMesaCacheAccess;
}

// What gated_mesa_backward needs from gated_mesa_forward: the checkpoints
// (the state after c*C tokens: S, P and, exact, R) and a copy of the gates and
// lambda_diag the forward used (O(seq_len + d), so a backward with other
// values is rejected). A forward that throws leaves the cache unusable.
template <class T>
class GatedMesaCache {
 public:
  long length() const { return T_; }      // seq_len of the last complete forward, 0 before any
  long key_dim() const { return d_; }     // d
  long value_dim() const { return dv_; }  // dv
  long chunk() const { return C_; }       // the checkpoint interval (the chunk size C of the chunkwise form)
  bool chunkwise() const { return chunkwise_; }  // made by the chunkwise form (opt.chunk > 0)
  long num_checkpoints() const { return T_ > 0 ? (T_ + C_ - 1) / C_ : 0; }
  MesaSolver solver() const { return solver_; }
  bool has_initial_state() const { return has_initial_; }
  // Bytes held by the checkpoints and copies (the backward's chunk buffers are allocated per call).
  std::size_t bytes() const {
    std::size_t n = std::size_t(beta_.size() + gamma_.size() + lam_.size() + cg_x_.size());
    for (const auto* v : {&ck_S_, &ck_R_, &ck_P_})
      for (const auto& m : *v) n += std::size_t(m.size());
    return n * sizeof(T);
  }

 private:
  friend struct detail::GatedMesaCacheAccess;
  long T_ = 0, d_ = 0, dv_ = 0, C_ = 1;
  MesaSolver solver_ = MesaSolver::exact;
  int cg_steps_ = 0;
  T cg_tol_ = 0;
  bool has_initial_ = false;
  bool chunkwise_ = false;
  Vector<T> beta_, gamma_, lam_;
  std::vector<RowMatrix<T>> ck_S_, ck_R_, ck_P_;
  // cg, chunkwise: the forward's solutions, row t = x_t = A_t^{-1} q_t (M50),
  // so that the backward runs one CG solve per chunk instead of two (MesaNet's
  // kernels keep the same q*); empty otherwise.
  RowMatrix<T> cg_x_;
};

namespace detail {

template <class T>
void check_gated_args(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                      const ConstMatrixRef<T>& v, const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                      const ConstVectorRef<T>& lambda_diag, const GatedMesaOptions<T>& opt) {
  check_sequence_inputs<T>(where, q, k, v);
  check_gates<T>(where, beta, gamma, lambda_diag, q.rows(), q.cols());
  check_gated_options(where, opt);
}

// Sets the runner to the initial state: given, or the empty one (S = 0; exact:
// P_0 = Lambda, R_0 = Lambda^{-1}; cg: H_0 = 0). Exact with a given R_0 needs
// P_0 = R_0^{-1} (for the backward's dgamma, M35): by Cholesky, which also
// checks positive definiteness.
template <class T>
void gated_set_initial(const char* where, GatedMesaRunner<T>& run, const GatedMesaState<T>* initial,
                       const ConstVectorRef<T>& lambda_diag, long d, long dv) {
  run.lam = lambda_diag;
  run.init(d, dv);
  const bool exact = run.solver == MesaSolver::exact;
  if (initial == nullptr) {
    run.S = RowMatrix<T>::Zero(dv, d);
    if (exact) {
      run.P = lambda_diag.asDiagonal();
      run.R = lambda_diag.cwiseInverse().asDiagonal();
    } else {
      run.P = RowMatrix<T>::Zero(d, d);
    }
    return;
  }
  run.S = initial->S;
  const RowMatrix<T>& X = exact ? initial->R : initial->H;
  const RowMatrix<T> Xs = (X + X.transpose()) / T(2);
  if (exact) {
    run.R = Xs;
    const Eigen::LLT<RowMatrix<T>> llt(Xs);
    if (llt.info() != Eigen::Success) fail(where, "initial.R is not positive definite (Cholesky failed)");
    RowMatrix<T> P0 = llt.solve(RowMatrix<T>::Identity(d, d));
    run.P = (P0 + P0.transpose()) / T(2);
  } else {
    run.P = Xs;
  }
}

struct GatedMesaCacheAccess {
  template <class T>
  static long checkpoint_interval(const GatedMesaOptions<T>& opt, long n) {
    if (opt.chunk > 0) return std::min(opt.chunk, n);
    return std::clamp(static_cast<long>(std::lround(std::sqrt(double(n)))), 1L, n);
  }

  // A forward that got this far makes the cache usable (T_ = n last).
  template <class T>
  static void complete(GatedMesaCache<T>& c, long n, long d, long dv, long C, bool chunkwise,
                       const GatedMesaOptions<T>& opt, bool has_initial, const ConstVectorRef<T>& beta,
                       const ConstVectorRef<T>& gamma, const ConstVectorRef<T>& lambda_diag) {
    c.d_ = d, c.dv_ = dv, c.C_ = C;
    c.chunkwise_ = chunkwise;
    c.solver_ = opt.solver;
    c.cg_steps_ = opt.cg_steps;
    c.cg_tol_ = opt.cg_tolerance;
    c.has_initial_ = has_initial;
    c.beta_ = beta, c.gamma_ = gamma, c.lam_ = lambda_diag;
    c.T_ = n;
  }

  template <class T>
  static void forward(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                      const ConstMatrixRef<T>& v, const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                      const ConstVectorRef<T>& lambda_diag, const GatedMesaOptions<T>& opt, MatrixRef<T>& out,
                      GatedMesaCache<T>& c, const GatedMesaState<T>* initial, GatedMesaState<T>* final) {
    const long n = q.rows(), d = q.cols(), dv = v.cols();
    const long C = checkpoint_interval(opt, n), nck = (n + C - 1) / C;
    c.T_ = 0;  // unusable until this forward completes
    GatedMesaRunner<T> run;
    run.solver = opt.solver;
    run.cg_steps = opt.cg_steps;
    run.cg_tol = opt.cg_tolerance;
    gated_set_initial<T>(where, run, initial, lambda_diag, d, dv);
    const bool exact = opt.solver == MesaSolver::exact;
    c.ck_S_.resize(std::size_t(nck));
    c.ck_P_.resize(std::size_t(nck));
    c.ck_R_.resize(exact ? std::size_t(nck) : 0);
    c.cg_x_.resize(0, 0);  // the chunkwise form's only
    Vector<T> a(d);
    for (long t = 0; t < n; ++t) {
      if (t % C == 0) {
        const std::size_t ck = std::size_t(t / C);
        c.ck_S_[ck] = run.S;
        c.ck_P_[ck] = run.P;
        if (exact) c.ck_R_[ck] = run.R;
      }
      run.advance(where, t, k.row(t).data(), v.row(t).data(), beta[t], gamma[t]);
      run.solve(q.row(t).data(), a.data());                 // a_t = P_t^{-1} q_t  (M30, M32)
      out.row(t).noalias() = (run.S * a).transpose();       // o_t = S_t a_t
    }
    if (final != nullptr) {
      final->S = run.S;
      if (exact) {
        final->R = run.R;
        final->H.resize(0, 0);
      } else {
        final->H = run.P;
        final->R.resize(0, 0);
      }
    }
    complete<T>(c, n, d, dv, C, false, opt, initial != nullptr, beta, gamma, lambda_diag);
  }

  template <class T>
  static void check_cache(const char* where, const GatedMesaCache<T>& c, const ConstVectorRef<T>& beta,
                          const ConstVectorRef<T>& gamma, const ConstVectorRef<T>& lambda_diag,
                          const GatedMesaOptions<T>& opt, long n, long d, long dv, const GatedMesaState<T>* initial) {
    if (c.T_ != n || c.d_ != d || c.dv_ != dv)
      fail(where, "cache is for seq_len = ", c.T_, ", d = ", c.d_, ", dv = ", c.dv_, " but the inputs have seq_len = ",
           n, ", d = ", d, ", dv = ", dv, " (run gated_mesa_forward on these inputs first)");
    if (c.solver_ != opt.solver || c.cg_steps_ != opt.cg_steps || c.cg_tol_ != opt.cg_tolerance)
      fail(where, "cache was made with solver = ", solver_name(c.solver_), ", cg_steps = ", c.cg_steps_,
           ", cg_tolerance = ", c.cg_tol_, " but opt has solver = ", solver_name(opt.solver),
           ", cg_steps = ", opt.cg_steps, ", cg_tolerance = ", opt.cg_tolerance);
    if (c.chunkwise_ != (opt.chunk > 0) || (opt.chunk > 0 && c.C_ != std::min(opt.chunk, n)))
      fail(where, "cache was made with opt.chunk = ", c.chunkwise_ ? c.C_ : 0L, " (", c.chunkwise_ ? "chunkwise" : "token by token",
           ") but opt.chunk is ", opt.chunk, " (pass the forward's options)");
    if (c.beta_ != beta) fail(where, "beta differs from the beta the forward used");
    if (c.gamma_ != gamma) fail(where, "gamma differs from the gamma the forward used");
    if (c.lam_ != lambda_diag) fail(where, "lambda_diag differs from the lambda_diag the forward used");
    if (c.has_initial_ != (initial != nullptr))
      fail(where, "the forward ran ", c.has_initial_ ? "with" : "without", " an initial state but initial is ",
           initial != nullptr ? "given" : "null");
    if (initial != nullptr) {
      check_gated_state(where, "initial", *initial, opt.solver, d, dv, false);
      const RowMatrix<T>& X = opt.solver == MesaSolver::exact ? initial->R : initial->H;
      const RowMatrix<T> Xs = (X + X.transpose()) / T(2);
      const RowMatrix<T>& used = opt.solver == MesaSolver::exact ? c.ck_R_[0] : c.ck_P_[0];
      if (Xs != used || initial->S != c.ck_S_[0])
        fail(where, "initial differs from the initial state the forward used (pass the same initial)");
    }
  }

  // The chunkwise forms (opt.chunk = C > 0; docs/math.md §9-§10): the same
  // outputs as the token-by-token sweep up to rounding, computed one chunk of C
  // tokens at a time with GEMMs (exact: M44-M48; cg: M49-M53). The cache keeps
  // the state at every chunk start, as the checkpoints of the sweep.
  template <class T>
  static void forward_chunkwise(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                const ConstMatrixRef<T>& v, const ConstVectorRef<T>& beta,
                                const ConstVectorRef<T>& gamma, const ConstVectorRef<T>& lambda_diag,
                                const GatedMesaOptions<T>& opt, MatrixRef<T>& out, GatedMesaCache<T>& c,
                                const GatedMesaState<T>* initial, GatedMesaState<T>* final) {
    const long n = q.rows(), d = q.cols(), dv = v.cols();
    const long C = checkpoint_interval(opt, n), nck = (n + C - 1) / C;
    const bool exact = opt.solver == MesaSolver::exact;
    // The chunks' GEMMs run on this thread: Eigen would otherwise spread each
    // over OpenMP's default team (and pick its blocking, so its rounding, from
    // the team size); callers parallelise over sequences and heads.
    const ScopedSerialEigen serial;
    c.T_ = 0;  // unusable until this forward completes
    GatedMesaRunner<T> run;  // only for the initial state and its checks
    run.solver = opt.solver;
    gated_set_initial<T>(where, run, initial, lambda_diag, d, dv);
    RowMatrix<T> S = std::move(run.S), X = exact ? std::move(run.R) : std::move(run.P);  // X = R or H
    c.ck_S_.resize(std::size_t(nck));
    c.ck_R_.resize(exact ? std::size_t(nck) : 0);
    c.ck_P_.resize(exact ? 0 : std::size_t(nck));
    if (exact) c.cg_x_.resize(0, 0);
    else c.cg_x_.resize(n, d);
    const auto rethrow_in_chunk = [&](const MesaBreakdownError& e, long t0, long len) {
      throw MesaBreakdownError(std::string(where) + ": in the chunk of positions " + std::to_string(t0) + ".." +
                                   std::to_string(t0 + len - 1) + ": " + e.what(),
                               t0 + e.position());
    };
    if (opt.threads > 1 && nck > 1) {
      // Intra-sequence parallelism (docs/gated_mesa.md, "Threads"): the state
      // recurrence between chunks runs chunk after chunk on one thread (seq),
      // each chunk's outputs, given its start state, on any thread (post).
      // Every chunk computes what the serial loop below computes, so the
      // results do not depend on the thread count.
      const std::ptrdiff_t window = 4 * std::ptrdiff_t(opt.threads);
      std::vector<GatedExactChunk<T>> slots(exact ? std::size_t(window) : 0);  // exact: the factor, seq to post
      ordered_pipeline(
          nck, opt.threads, window, [](std::ptrdiff_t) {},
          [&](std::ptrdiff_t ck) {  // seq: the chunk's start state, then the state after it (M47 / M49)
            const long t0 = ck * C, len = std::min(C, n - t0);
            c.ck_S_[std::size_t(ck)] = S;
            (exact ? c.ck_R_ : c.ck_P_)[std::size_t(ck)] = X;
            if (exact) {
              GatedExactChunk<T>& ch = slots[std::size_t(ck % window)];
              try {
                ch.factor("gated_exact_chunk_forward", k.middleRows(t0, len), beta.segment(t0, len),
                          gamma.segment(t0, len), X);
              } catch (const MesaBreakdownError& e) {
                rethrow_in_chunk(e, t0, len);
              }
              RowMatrix<T> G = ch.Kt;  // the state consumes its copy; the outputs need K R0 too
              gated_exact_chunk_state<T>(ch, k.middleRows(t0, len), v.middleRows(t0, len), G, S, X);
            } else {
              gated_cg_chunk_state<T>(k.middleRows(t0, len), v.middleRows(t0, len), beta.segment(t0, len),
                                      gamma.segment(t0, len), S, X);
            }
          },
          [&](std::ptrdiff_t ck) {  // post: the chunk's outputs from its start state (M46 / M50-M51)
            const ScopedSerialEigen serial_here;
            const long t0 = ck * C, len = std::min(C, n - t0);
            const RowMatrix<T>& S0 = c.ck_S_[std::size_t(ck)];
            if (exact) {
              GatedExactChunk<T>& ch = slots[std::size_t(ck % window)];
              ch.solves(q.middleRows(t0, len), c.ck_R_[std::size_t(ck)], false);
              gated_exact_chunk_output<T>(ch, v.middleRows(t0, len), S0, out.middleRows(t0, len));
            } else {
              RowMatrix<T> Xs;
              gated_cg_chunk_output<T>(q.middleRows(t0, len), k.middleRows(t0, len), v.middleRows(t0, len),
                                       beta.segment(t0, len), gamma.segment(t0, len), lambda_diag, opt.cg_steps,
                                       opt.cg_tolerance, S0, c.ck_P_[std::size_t(ck)], out.middleRows(t0, len), &Xs);
              c.cg_x_.middleRows(t0, len) = Xs;
            }
          });
    } else {
      for (long ck = 0; ck < nck; ++ck) {
        const long t0 = ck * C, len = std::min(C, n - t0);
        c.ck_S_[std::size_t(ck)] = S;
        (exact ? c.ck_R_ : c.ck_P_)[std::size_t(ck)] = X;
        try {
          if (exact)
            gated_exact_chunk_forward<T>(q.middleRows(t0, len), k.middleRows(t0, len), v.middleRows(t0, len),
                                         beta.segment(t0, len), gamma.segment(t0, len), S, X,
                                         out.middleRows(t0, len));
          else {
            RowMatrix<T> Xs;
            gated_cg_chunk_forward<T>(q.middleRows(t0, len), k.middleRows(t0, len), v.middleRows(t0, len),
                                      beta.segment(t0, len), gamma.segment(t0, len), lambda_diag, opt.cg_steps,
                                      opt.cg_tolerance, S, X, out.middleRows(t0, len), &Xs);
            c.cg_x_.middleRows(t0, len) = Xs;
          }
        } catch (const MesaBreakdownError& e) {
          rethrow_in_chunk(e, t0, len);
        }
      }
    }
    if (final != nullptr) {
      final->S = S;
      (exact ? final->R : final->H) = X;
      (exact ? final->H : final->R).resize(0, 0);
    }
    complete<T>(c, n, d, dv, C, true, opt, initial != nullptr, beta, gamma, lambda_diag);
  }

  template <class T>
  static void backward_chunkwise(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                 const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                 const ConstVectorRef<T>& lambda_diag, const GatedMesaOptions<T>& opt,
                                 const ConstMatrixRef<T>& dout, const GatedMesaCache<T>& c, MatrixRef<T>& dq,
                                 MatrixRef<T>& dk, MatrixRef<T>& grad_v, VectorRef<T>& dbeta, VectorRef<T>& dgamma,
                                 VectorRef<T>& dlambda, const GatedMesaState<T>* grad_final,
                                 GatedMesaState<T>* grad_initial) {
    const long n = q.rows(), d = q.cols(), dv = v.cols(), C = c.C_, nck = (n + C - 1) / C;
    const bool exact = opt.solver == MesaSolver::exact;
    const ScopedSerialEigen serial;  // as in forward_chunkwise
    // dS, dX: the adjoints of the state after the current chunk (X = R or H), symmetric for X.
    RowMatrix<T> dS = RowMatrix<T>::Zero(dv, d), dX = RowMatrix<T>::Zero(d, d);
    if (grad_final != nullptr) {
      dS = grad_final->S;
      const RowMatrix<T>& g = exact ? grad_final->R : grad_final->H;
      dX = (g + g.transpose()) / T(2);
    }
    dlambda.setZero();
    if (opt.threads > 1 && nck > 1) {
      // Intra-sequence parallelism (docs/gated_mesa.md, "Threads"), the chunks
      // from the last one: pre, on any thread, the work that needs only the
      // chunk's start state and dout (exact: the recomputed forward and F; cg:
      // the CG solve for U, the forward's X being in the cache); seq, chunk
      // after chunk, the state adjoints (exact:
      // the rest of M48; cg: M53's dS_0, dH_0 and dlambda's share); post (cg),
      // on any thread, the inputs' gradients given the state adjoints. The same
      // expressions as the serial loop below: the results do not depend on the
      // thread count.
      const std::ptrdiff_t window = 4 * std::ptrdiff_t(opt.threads);
      struct Slot {
        GatedExactChunk<T> ch;  // exact
        RowMatrix<T> F;         // exact
        RowMatrix<T> U;         // cg: the solve
        RowMatrix<T> dS, dX;    // cg: the adjoints of the state after the chunk
      };
      std::vector<Slot> slots(static_cast<std::size_t>(window));
      const auto chunk_of = [&](std::ptrdiff_t i) { return nck - 1 - long(i); };
      ordered_pipeline(
          nck, opt.threads, window,
          [&](std::ptrdiff_t i) {  // pre
            const ScopedSerialEigen serial_here;
            const long ck = chunk_of(i), t0 = ck * C, len = std::min(C, n - t0);
            Slot& sl = slots[std::size_t(i % window)];
            const RowMatrix<T>& X0 = (exact ? c.ck_R_ : c.ck_P_)[std::size_t(ck)];
            if (exact)
              gated_exact_chunk_backward_prepare<T>(q.middleRows(t0, len), k.middleRows(t0, len),
                                                    beta.segment(t0, len), gamma.segment(t0, len), X0, sl.ch, sl.F);
            else
              gated_cg_chunk_backward_solve_u<T>(k.middleRows(t0, len), v.middleRows(t0, len),
                                                 beta.segment(t0, len), gamma.segment(t0, len), lambda_diag,
                                                 opt.cg_steps, opt.cg_tolerance, c.ck_S_[std::size_t(ck)], X0,
                                                 dout.middleRows(t0, len), sl.U);
          },
          [&](std::ptrdiff_t i) {  // seq: dS, dX from after the chunk to before it
            const long ck = chunk_of(i), t0 = ck * C, len = std::min(C, n - t0);
            Slot& sl = slots[std::size_t(i % window)];
            if (exact) {
              gated_exact_chunk_backward_sweep<T>(
                  sl.ch, sl.F, q.middleRows(t0, len), k.middleRows(t0, len), v.middleRows(t0, len),
                  beta.segment(t0, len), gamma.segment(t0, len), c.ck_S_[std::size_t(ck)],
                  c.ck_R_[std::size_t(ck)], dout.middleRows(t0, len), dS, dX, dq.middleRows(t0, len),
                  dk.middleRows(t0, len), grad_v.middleRows(t0, len), dbeta.segment(t0, len),
                  dgamma.segment(t0, len));
            } else {
              sl.dS = dS;
              sl.dX = dX;
              gated_cg_chunk_backward_state<T>(beta.segment(t0, len), gamma.segment(t0, len),
                                               dout.middleRows(t0, len), c.cg_x_.middleRows(t0, len), sl.U, dS, dX,
                                               dlambda);
            }
          },
          [&](std::ptrdiff_t i) {  // post (cg): the inputs' gradients
            if (exact) return;
            const ScopedSerialEigen serial_here;
            const long ck = chunk_of(i), t0 = ck * C, len = std::min(C, n - t0);
            Slot& sl = slots[std::size_t(i % window)];
            gated_cg_chunk_backward_grads<T>(k.middleRows(t0, len), v.middleRows(t0, len), beta.segment(t0, len),
                                             gamma.segment(t0, len), c.ck_S_[std::size_t(ck)],
                                             c.ck_P_[std::size_t(ck)], dout.middleRows(t0, len),
                                             c.cg_x_.middleRows(t0, len), sl.U, sl.dS,
                                             sl.dX, dq.middleRows(t0, len), dk.middleRows(t0, len),
                                             grad_v.middleRows(t0, len), dbeta.segment(t0, len),
                                             dgamma.segment(t0, len));
          });
    } else {
      for (long ck = nck - 1; ck >= 0; --ck) {
        const long t0 = ck * C, len = std::min(C, n - t0);
        const RowMatrix<T>& S0 = c.ck_S_[std::size_t(ck)];
        const RowMatrix<T>& X0 = (exact ? c.ck_R_ : c.ck_P_)[std::size_t(ck)];
        if (exact)
          gated_exact_chunk_backward<T>(q.middleRows(t0, len), k.middleRows(t0, len), v.middleRows(t0, len),
                                        beta.segment(t0, len), gamma.segment(t0, len), S0, X0,
                                        dout.middleRows(t0, len), dS, dX, dq.middleRows(t0, len),
                                        dk.middleRows(t0, len), grad_v.middleRows(t0, len), dbeta.segment(t0, len),
                                        dgamma.segment(t0, len));
        else
          gated_cg_chunk_backward_given_solutions<T>(
              k.middleRows(t0, len), v.middleRows(t0, len), beta.segment(t0, len), gamma.segment(t0, len),
              lambda_diag, opt.cg_steps, opt.cg_tolerance, S0, X0, dout.middleRows(t0, len),
              c.cg_x_.middleRows(t0, len), dS, dX, dq.middleRows(t0, len), dk.middleRows(t0, len),
              grad_v.middleRows(t0, len), dbeta.segment(t0, len), dgamma.segment(t0, len), dlambda);
        // dX is now the adjoint of the chunk's start state, symmetric as both chunk backwards return it.
      }
    }
    // exact without an initial state: R_0 = Lambda^{-1}, so dLambda_j = -dR_0(j, j) / Lambda_j^2 (M36).
    if (exact && !c.has_initial_) dlambda = -dX.diagonal().cwiseQuotient(lambda_diag.cwiseAbs2());
    if (grad_initial != nullptr) {
      grad_initial->S = dS;
      (exact ? grad_initial->R : grad_initial->H) = dX;
      (exact ? grad_initial->H : grad_initial->R).resize(0, 0);
    }
  }

  // The reverse sweep (M33-M36).
  template <class T>
  static void backward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                       const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                       const ConstVectorRef<T>& lambda_diag, const GatedMesaOptions<T>& opt,
                       const ConstMatrixRef<T>& dout, const GatedMesaCache<T>& c, MatrixRef<T>& dq, MatrixRef<T>& dk,
                       MatrixRef<T>& grad_v, VectorRef<T>& dbeta, VectorRef<T>& dgamma, VectorRef<T>& dlambda,
                       const GatedMesaState<T>* grad_final, GatedMesaState<T>* grad_initial) {
    const char* where = "gated_mesa_backward";
    const long n = q.rows(), d = q.cols(), dv = v.cols(), C = c.C_, nck = (n + C - 1) / C;
    const bool exact = opt.solver == MesaSolver::exact;
    GatedMesaRunner<T> run;
    run.solver = opt.solver;
    run.cg_steps = opt.cg_steps;
    run.cg_tol = opt.cg_tolerance;
    run.lam = lambda_diag;
    run.init(d, dv);
    // Per chunk: S_{t-1}, P_{t-1} (for dgamma, M35), a_t and dq_t.
    std::vector<RowMatrix<T>> Sprev(static_cast<std::size_t>(C)), Pprev(static_cast<std::size_t>(C));
    RowMatrix<T> A(C, d), DQ(C, d);
    Vector<T> da(d), Gk(d), Mk(d), Gv(d);
    RowMatrix<T> G = RowMatrix<T>::Zero(dv, d), M = RowMatrix<T>::Zero(d, d);  // total adjoints (M33)
    dlambda.setZero();
    for (long ck = nck - 1; ck >= 0; --ck) {
      const long t0 = ck * C, t1 = std::min(n, t0 + C);
      run.S = c.ck_S_[std::size_t(ck)];
      run.P = c.ck_P_[std::size_t(ck)];
      if (exact) run.R = c.ck_R_[std::size_t(ck)];
      for (long t = t0; t < t1; ++t) {
        const std::size_t j = std::size_t(t - t0);
        Sprev[j] = run.S;
        Pprev[j] = run.P;
        run.advance(where, t, k.row(t).data(), v.row(t).data(), beta[t], gamma[t]);
        run.solve(q.row(t).data(), A.row(t - t0).data());       // a_t
        da.noalias() = run.S.transpose() * dout.row(t).transpose();  // o_t = S_t a_t => da_t = S_t^T g_t
        run.solve(da.data(), DQ.row(t - t0).data());            // a_t = A_t^{-1} q_t => dq_t = A_t^{-1} da_t (M33)
        dq.row(t) = DQ.row(t - t0);
      }
      if (ck == nck - 1 && grad_final != nullptr) {
        // (M36) seeds: G_T gets Sbar; M_T gets 2 R_T sym(Rbar) R_T (exact) or -2 sym(Hbar) (cg).
        G = grad_final->S;
        if (exact) {
          const RowMatrix<T> Rbar = (grad_final->R + grad_final->R.transpose()) / T(2);
          const RowMatrix<T> X = T(2) * run.R * Rbar * run.R;
          M = (X + X.transpose()) / T(2);
        } else {
          M = -(grad_final->H + grad_final->H.transpose());
        }
      }
      for (long t = t1 - 1; t >= t0; --t) {
        const std::size_t j = std::size_t(t - t0);
        const auto a = A.row(t - t0).transpose();
        const auto dqt = DQ.row(t - t0).transpose();
        const auto kt = k.row(t).transpose();
        const auto vt = v.row(t).transpose();
        if (t + 1 < n) {  // G_t = g_t a_t^T + gamma_{t+1} G_{t+1},  M_t = dq a^T + a dq^T + gamma_{t+1} M_{t+1}
          G *= gamma[t + 1];
          M *= gamma[t + 1];
        }
        G.noalias() += dout.row(t).transpose() * a.transpose();
        M.noalias() += dqt * a.transpose();
        M.noalias() += a * dqt.transpose();
        Gk.noalias() = G * kt;
        Gv.noalias() = G.transpose() * vt;
        Mk.noalias() = M * kt;
        // (M34) dv_t = beta_t G_t k_t, dk_t = beta_t (G_t^T v_t - M_t k_t), dbeta_t = v_t.G_t k_t - k_t.M_t k_t / 2
        grad_v.row(t) = (beta[t] * Gk).transpose();
        dk.row(t) = (beta[t] * (Gv - Mk)).transpose();
        dbeta[t] = vt.dot(Gk) - kt.dot(Mk) / T(2);
        // (M35) dgamma_t = <G_t, S_{t-1}> - <M_t, P_{t-1}> / 2
        dgamma[t] = G.cwiseProduct(Sprev[j]).sum() - M.cwiseProduct(Pprev[j]).sum() / T(2);
        // (M35) cg: Lambda enters A_t = H_t + Lambda directly: dLambda -= diag(dq_t a_t^T)
        if (!exact) dlambda -= dqt.cwiseProduct(a);
      }
    }
    // G, M are now G_1, M_1. P_1 = gamma_1 P_0 + ..., S_1 = gamma_1 S_0 + ... (M36)
    const T g1 = gamma[0];
    if (exact && !c.has_initial_) dlambda = (-g1 / T(2)) * M.diagonal();  // P_0 = Lambda
    if (grad_initial != nullptr) {
      grad_initial->S = g1 * G;
      if (exact) {
        const RowMatrix<T>& P0 = c.ck_P_[0];
        const RowMatrix<T> X = (g1 / T(2)) * P0 * M * P0;  // R_0 = P_0^{-1}: adjoint -P_0 (-g1 M_1/2) P_0
        grad_initial->R = (X + X.transpose()) / T(2);
        grad_initial->H.resize(0, 0);
      } else {
        grad_initial->H = (-g1 / T(2)) * M;
        grad_initial->R.resize(0, 0);
      }
    }
  }
};

}  // namespace detail

// The empty state: S = 0 and, exact, R = Lambda^{-1}; cg, H = 0.
template <class T>
GatedMesaState<T> gated_mesa_initial_state(long d, long dv, ConstVectorRef<T> lambda_diag,
                                           const GatedMesaOptions<T>& opt) {
  const char* where = "gated_mesa_initial_state";
  detail::check_positive_size(where, "d", d);
  detail::check_positive_size(where, "dv", dv);
  detail::check_gated_options(where, opt);
  const Vector<T> one = Vector<T>::Ones(1);
  detail::check_gates<T>(where, one, one, lambda_diag, 1, d);
  GatedMesaState<T> s;
  s.S = RowMatrix<T>::Zero(dv, d);
  if (opt.solver == MesaSolver::exact)
    s.R = lambda_diag.cwiseInverse().asDiagonal();
  else
    s.H = RowMatrix<T>::Zero(d, d);
  return s;
}

// Forward pass (M29-M32). q, k : (seq_len, d); v : (seq_len, dv); beta, gamma :
// seq_len entries in (0, 1]; lambda_diag : d entries > 0; out : (seq_len, dv),
// pre-sized, written. initial / final: the carried state (may be the same
// object). Throws std::invalid_argument naming the argument on bad shapes,
// gates or lambda_diag out of range, bad options or an invalid initial state;
// MesaBreakdownError when the exact recursion loses positive definiteness.
template <class T>
void gated_mesa_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, ConstVectorRef<T> beta,
                        ConstVectorRef<T> gamma, ConstVectorRef<T> lambda_diag, const GatedMesaOptions<T>& opt,
                        MatrixRef<T> out, GatedMesaCache<T>& cache,
                        const GatedMesaState<identity_t<T>>* initial = nullptr,
                        GatedMesaState<identity_t<T>>* final = nullptr) {
  constexpr const char* where = "gated_mesa_forward";
  detail::check_gated_args<T>(where, q, k, v, beta, gamma, lambda_diag, opt);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  if (initial != nullptr) detail::check_gated_state(where, "initial", *initial, opt.solver, q.cols(), v.cols(), true);
  if (opt.chunk > 0)
    detail::GatedMesaCacheAccess::forward_chunkwise<T>(where, q, k, v, beta, gamma, lambda_diag, opt, out, cache, initial,
                                                       final);
  else
    detail::GatedMesaCacheAccess::forward<T>(where, q, k, v, beta, gamma, lambda_diag, opt, out, cache, initial, final);
}

// Backward pass (M33-M36), given dout = dL/dout and the cache of
// gated_mesa_forward on the same inputs, options and initial state. Writes
// (does not accumulate) dq, dk (seq_len, d), grad_v (seq_len, dv), dbeta,
// dgamma (seq_len), dlambda_diag (d). grad_final (optional): dL/d(final
// state); grad_initial (optional) receives dL/d(initial state), with R (exact)
// or H (cg) symmetric. The cache is only read: backward may run repeatedly.
template <class T>
void gated_mesa_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, ConstVectorRef<T> beta,
                         ConstVectorRef<T> gamma, ConstVectorRef<T> lambda_diag, const GatedMesaOptions<T>& opt,
                         ConstMatrixRef<T> dout, const GatedMesaCache<T>& cache, MatrixRef<T> dq, MatrixRef<T> dk,
                         MatrixRef<T> grad_v, VectorRef<T> dbeta, VectorRef<T> dgamma, VectorRef<T> dlambda_diag,
                         const GatedMesaState<identity_t<T>>* initial = nullptr,
                         const GatedMesaState<identity_t<T>>* grad_final = nullptr,
                         GatedMesaState<identity_t<T>>* grad_initial = nullptr) {
  constexpr const char* where = "gated_mesa_backward";
  detail::check_gated_args<T>(where, q, k, v, beta, gamma, lambda_diag, opt);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_gradient_shapes<T>(where, n, d, dv, dout, dq, dk, grad_v);
  detail::check_gradients_distinct<T>(where, q, k, v, dout, dq, dk, grad_v);
  if (dbeta.size() != n) detail::fail(where, "dbeta has ", dbeta.size(), " entries but seq_len is ", n);
  if (dgamma.size() != n) detail::fail(where, "dgamma has ", dgamma.size(), " entries but seq_len is ", n);
  if (dlambda_diag.size() != d) detail::fail(where, "dlambda_diag has ", dlambda_diag.size(), " entries but d is ", d);
  detail::GatedMesaCacheAccess::check_cache<T>(where, cache, beta, gamma, lambda_diag, opt, n, d, dv, initial);
  if (grad_final != nullptr) detail::check_gated_state(where, "grad_final", *grad_final, opt.solver, d, dv, false);
  if (cache.chunkwise())
    detail::GatedMesaCacheAccess::backward_chunkwise<T>(q, k, v, beta, gamma, lambda_diag, opt, dout, cache, dq, dk,
                                                        grad_v, dbeta, dgamma, dlambda_diag, grad_final, grad_initial);
  else
    detail::GatedMesaCacheAccess::backward<T>(q, k, v, beta, gamma, lambda_diag, opt, dout, cache, dq, dk, grad_v, dbeta,
                                              dgamma, dlambda_diag, grad_final, grad_initial);
}

// One decoding step (M29-M32 for one token): the state advances by
// (k, v, beta, gamma) and out = S P^{-1} q. The state starts as
// gated_mesa_initial_state(d, dv, lambda_diag, opt) or any state a forward with
// the same solver returned. Throws MesaBreakdownError (position 0) if the
// exact update breaks down, leaving the state unchanged.
template <class T>
void gated_mesa_step(ConstVectorRef<T> q, ConstVectorRef<T> k, ConstVectorRef<T> v, identity_t<T> beta,
                     identity_t<T> gamma, ConstVectorRef<T> lambda_diag, const GatedMesaOptions<T>& opt,
                     GatedMesaState<identity_t<T>>& state, VectorRef<T> out) {
  const char* where = "gated_mesa_step";
  detail::check_gated_options(where, opt);
  const long d = state.S.cols(), dv = state.S.rows();
  detail::check_positive_size(where, "state.S columns (d)", d);
  detail::check_positive_size(where, "state.S rows (dv)", dv);
  detail::check_gated_state(where, "state", state, opt.solver, d, dv, false);
  detail::check_token_inputs(where, q, k, v, out, d, dv);
  detail::check_token_output_distinct(where, q, k, v, out);
  const Vector<T> b = Vector<T>::Constant(1, beta), g = Vector<T>::Constant(1, gamma);
  detail::check_gates<T>(where, b, g, lambda_diag, 1, d);
  detail::GatedMesaRunner<T> run;
  run.solver = opt.solver;
  run.cg_steps = opt.cg_steps;
  run.cg_tol = opt.cg_tolerance;
  run.lam = lambda_diag;
  run.init(d, dv);
  run.S = state.S;
  if (opt.solver == MesaSolver::exact) {
    run.R = state.R;
    run.P = RowMatrix<T>::Zero(d, d);  // P is not needed for the output; the step does not carry it
  } else {
    run.P = state.H;
  }
  run.advance(where, 0, k.data(), v.data(), beta, gamma);
  Vector<T> a(d);
  run.solve(q.data(), a.data());
  out.noalias() = run.S * a;
  state.S = run.S;
  if (opt.solver == MesaSolver::exact)
    state.R = run.R;
  else
    state.H = run.P;
}

}  // namespace mesaopt
