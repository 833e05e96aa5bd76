// Tests of GatedMesaLayer (include/mesaopt/layers/gated_mesa_layer.hpp,
// docs/math.md M37-M43) and of the gated_mesa block of nn::Model:
// - forward against a composition written here (projections, gates, short
//   convolution, SiLU, L2 norm, RMSNorm by plain Eigen loops around the op);
// - backward against central finite differences in double (relative error
//   < 1e-6) for the input and every parameter, conv on and off, both
//   solvers, several sizes (odd d, T = 1);
// - float against double;
// - an nn::Model with a gated_mesa block and a linear block, FD-checked
//   through Model::backward for every parameter;
// - bad configs and inputs throw std::invalid_argument naming the field;
// - a short training run on the dynamics task lowers the loss.
#include <catch2/catch.hpp>
#include <mesaopt/analysis.hpp>
#include <mesaopt/layers.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace mesaopt_test_gated_mesa_layer {

using mesaopt::GatedMesaLayer;
using mesaopt::GatedMesaLayerConfig;
using mesaopt::MesaSolver;
using mesaopt::ParameterView;
using mesaopt::RowMatrix;
using mesaopt::Vector;
using mesaopt::test::random_matrix;
using mesaopt::test::relative_rms;
using Catch::Matchers::Contains;
namespace nn = mesaopt::nn;

namespace {

double sigm(double z) { return 1.0 / (1.0 + std::exp(-z)); }
double softplus(double z) { return std::log1p(std::exp(z)); }

GatedMesaLayerConfig make_config(long D, long H, long d, long dv, long K, MesaSolver solver) {
  GatedMesaLayerConfig c;
  c.D = D;
  c.H = H;
  c.d = d;
  c.dv = dv;
  c.conv_size = K;
  c.solver = solver;
  c.cg_steps = int(3 * d + 10);  // converged: the backward differentiates the exact solve
  c.forget_bias_init = 2.0;      // gamma about 0.88: the exact solver's R_t ~ gamma^-t stays moderate
  c.beta_bias_init = 0.5;
  c.num_threads = 1;
  return c;
}

// Random values for every parameter (the layer's init plus perturbed biases,
// lambda_raw and norm weights, so that no parameter sits at a special value).
template <class T>
void randomize(GatedMesaLayer<T>& layer, std::uint64_t seed) {
  layer.init(seed, 0.5);
  std::vector<ParameterView<T>> ps;
  layer.parameters(ps, "");
  std::uint64_t s = seed * 100;
  for (auto& p : ps) {
    if (p.name == "b_beta" || p.name == "b_gamma" || p.name == "lambda_raw" || p.name == "norm_weight") {
      const RowMatrix<double> r = random_matrix<double>(1, long(p.size), ++s, 0.3);
      for (std::size_t i = 0; i < p.size; ++i) p.value[i] += static_cast<T>(r(0, long(i)));
    }
  }
}

// The layer's forward composed here from the op and plain loops (M37-M43).
RowMatrix<double> reference_forward(GatedMesaLayer<double>& layer, const RowMatrix<double>& x, long T) {
  const GatedMesaLayerConfig& c = layer.config();
  const long H = c.H, d = c.d, dv = c.dv, K = c.conv_size, B = x.rows() / T;
  const RowMatrix<double> Wq = layer.W_q(), Wk = layer.W_k(), Wv = layer.W_v(), Wo = layer.W_o();
  const RowMatrix<double> Wb = layer.W_beta(), Wg = layer.W_gamma();
  const Vector<double> bb = layer.b_beta(), bg = layer.b_gamma();
  const RowMatrix<double> lraw = layer.lambda_raw();
  RowMatrix<double> cq, ck;
  if (K > 0) cq = layer.conv_q(), ck = layer.conv_k();
  const Vector<double> w = layer.norm_weight();
  RowMatrix<double> U(x.rows(), H * dv);
  for (long b = 0; b < B; ++b)
    for (long h = 0; h < H; ++h) {
      const RowMatrix<double> X = x.middleRows(b * T, T);
      const RowMatrix<double> qt = X * Wq.middleRows(h * d, d).transpose();
      const RowMatrix<double> kt = X * Wk.middleRows(h * d, d).transpose();
      const RowMatrix<double> v = X * Wv.middleRows(h * dv, dv).transpose();
      auto conv_silu_norm = [&](const RowMatrix<double>& raw, const RowMatrix<double>& cw) {
        RowMatrix<double> out(T, d);
        for (long t = 0; t < T; ++t)
          for (long i = 0; i < d; ++i) {
            if (K == 0) {
              out(t, i) = raw(t, i);
              continue;
            }
            double z = 0;
            for (long lag = 0; lag < K; ++lag)  // weight K-1-lag multiplies token t - lag
              if (t - lag >= 0) z += cw(h * d + i, K - 1 - lag) * raw(t - lag, i);
            out(t, i) = z * sigm(z);
          }
        for (long t = 0; t < T; ++t) out.row(t) /= std::sqrt(out.row(t).squaredNorm() + 1e-12);
        return out;
      };
      const RowMatrix<double> q = conv_silu_norm(qt, cq), k = conv_silu_norm(kt, ck);
      Vector<double> beta(T), gamma(T), lam(d);
      for (long t = 0; t < T; ++t) {
        beta[t] = sigm(X.row(t).dot(Wb.row(h)) + bb[h]);
        gamma[t] = sigm(X.row(t).dot(Wg.row(h)) + bg[h]);
      }
      for (long i = 0; i < d; ++i) lam[i] = softplus(lraw(h, i)) + c.lambda_floor;
      RowMatrix<double> o(T, dv);
      mesaopt::GatedMesaCache<double> oc;
      mesaopt::gated_mesa_forward<double>(q, k, v, beta, gamma, lam, layer.options(), o, oc);
      for (long t = 0; t < T; ++t) {
        const double r = 1.0 / std::sqrt(o.row(t).squaredNorm() / double(dv) + c.norm_eps);
        for (long j = 0; j < dv; ++j) U(b * T + t, h * dv + j) = o(t, j) * r * w[j];
      }
    }
  return U * Wo.transpose();
}

// Fourth-order central differences, (-f(+2s) + 8 f(+s) - 8 f(-s) + f(-2s)) / (12 s),
// s = h max(1, |x_i|): the normalisations of q, k and o make the loss strongly
// curved where |q^|, |k^| or |o| is small, and the second-order stencil of
// gradcheck.hpp then has truncation errors near 1e-6 (seen with the exact
// solver's conv weights).
template <class Loss>
std::vector<double> numeric_gradient4(Loss&& loss, double* x, std::size_t n, double h = 3e-5) {
  std::vector<double> g(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double saved = x[i], s = h * std::max(1.0, std::abs(saved));
    auto at = [&](double dx) {
      x[i] = saved + dx;
      return loss();
    };
    const double f2 = at(2 * s), f1 = at(s), m1 = at(-s), m2 = at(-2 * s);
    x[i] = saved;
    g[i] = (-f2 + 8 * f1 - 8 * m1 + m2) / (12 * s);
  }
  return g;
}

// The gradcheck.hpp metric (max |a - n| / max(|a|_inf, |n|_inf)) on the
// fourth-order differences. A gradient that is exactly zero (W_q and W_k when
// d = 1: the normalised q, k are +-1) is checked in absolute terms instead:
// the differences must stay at rounding level.
template <class Loss>
mesaopt::test::GradCheckResult check4(Loss&& loss, double* x, const double* analytic, std::size_t n) {
  const std::vector<double> numeric = numeric_gradient4(loss, x, n);
  double amax = 0;
  for (std::size_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(analytic[i]));
  return mesaopt::test::compare_gradients(analytic, numeric.data(), n, amax < 1e-12 ? 1e-3 : 1e-8);
}

// FD check of every parameter and of x for loss = sum(y .* G).
void check_layer_gradients(const GatedMesaLayerConfig& c, long B, long T, std::uint64_t seed) {
  GatedMesaLayer<double> layer(c);
  randomize(layer, seed);
  RowMatrix<double> x = random_matrix<double>(B * T, c.D, seed + 1);
  const RowMatrix<double> G = random_matrix<double>(B * T, c.D, seed + 2);
  mesaopt::GatedMesaLayerCache<double> cache;
  auto loss = [&] {
    mesaopt::GatedMesaLayerCache<double> lc;
    RowMatrix<double> y = layer.forward(x, T, lc);
    return (y.array() * G.array()).sum();
  };
  std::vector<ParameterView<double>> ps;
  layer.parameters(ps, "");
  mesaopt::zero_grad(ps);
  const RowMatrix<double> y = layer.forward(x, T, cache);
  REQUIRE(y.allFinite());
  RowMatrix<double> dx(B * T, c.D);
  layer.backward(x, T, G, cache, dx);
  const auto rx = check4(loss, x.data(), dx.data(), std::size_t(x.size()));
  INFO(rx.describe("dx"));
  CHECK(rx.error < 1e-6);
  for (const auto& p : ps) {
    const std::vector<double> analytic(p.grad, p.grad + p.size);
    const auto r = check4(loss, p.value, analytic.data(), p.size);
    INFO(r.describe(p.name));
    CHECK(r.error < 1e-6);
  }
}

}  // namespace

TEST_CASE("GatedMesaLayer: parameters, names and initial values", "[gated_mesa_layer]") {
  GatedMesaLayer<double> layer(make_config(5, 2, 3, 2, 4, MesaSolver::cg));
  std::vector<ParameterView<double>> ps;
  layer.parameters(ps, "attn.");
  std::vector<std::string> names;
  for (const auto& p : ps) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"attn.W_q", "attn.W_k", "attn.W_v", "attn.W_o", "attn.W_beta",
                                          "attn.b_beta", "attn.W_gamma", "attn.b_gamma", "attn.lambda_raw",
                                          "attn.conv_q", "attn.conv_k", "attn.norm_weight"});
  CHECK(ps[9].shape == std::vector<long>{6, 4});
  CHECK(ps[8].shape == std::vector<long>{2, 3});
  layer.init(3, 0.1);
  for (long h = 0; h < 2; ++h) CHECK((layer.lambda(h).array() - 1.0).abs().maxCoeff() < 1e-12);  // lambda_init
  CHECK(layer.b_gamma()[0] == 2.0);
  CHECK(layer.norm_weight().isOnes());
  CHECK(layer.conv_q().cwiseAbs().maxCoeff() <= 0.5);  // U(-1/sqrt(4), 1/sqrt(4))
  CHECK(layer.conv_q().cwiseAbs().maxCoeff() > 0.0);

  GatedMesaLayer<double> noconv(make_config(5, 2, 3, 2, 0, MesaSolver::cg));
  std::vector<ParameterView<double>> ps0;
  noconv.parameters(ps0, "");
  CHECK(ps0.size() == 10);
  CHECK(ps0.back().name == "norm_weight");
}

TEST_CASE("GatedMesaLayer: forward equals a composition of the op and plain code", "[gated_mesa_layer]") {
  struct Case {
    long B, T, D, H, d, dv, K;
    MesaSolver solver;
  };
  const Case cases[] = {{2, 7, 5, 2, 3, 2, 4, MesaSolver::cg},    {2, 7, 5, 2, 3, 2, 4, MesaSolver::exact},
                        {1, 1, 4, 1, 3, 3, 4, MesaSolver::cg},    {3, 9, 6, 3, 2, 3, 0, MesaSolver::exact},
                        {1, 12, 7, 2, 5, 4, 2, MesaSolver::cg}};
  std::uint64_t seed = 10;
  for (const Case& cs : cases) {
    INFO("B " << cs.B << " T " << cs.T << " D " << cs.D << " H " << cs.H << " d " << cs.d << " dv " << cs.dv
              << " K " << cs.K << " solver " << mesaopt::detail::solver_name(cs.solver));
    GatedMesaLayer<double> layer(make_config(cs.D, cs.H, cs.d, cs.dv, cs.K, cs.solver));
    randomize(layer, ++seed);
    const RowMatrix<double> x = random_matrix<double>(cs.B * cs.T, cs.D, ++seed);
    mesaopt::GatedMesaLayerCache<double> cache;
    const RowMatrix<double> y = layer.forward(x, cs.T, cache);
    const RowMatrix<double> ref = reference_forward(layer, x, cs.T);
    CHECK(relative_rms(y, ref) < 1e-12);
    // Two threads: bit-identical.
    layer.set_num_threads(2);
    mesaopt::GatedMesaLayerCache<double> cache2;
    const RowMatrix<double> y2 = layer.forward(x, cs.T, cache2);
    CHECK((y2.array() == y.array()).all());
  }
}

TEST_CASE("GatedMesaLayer: backward matches finite differences for x and every parameter",
          "[gated_mesa_layer][gradcheck]") {
  struct Case {
    long B, T, D, H, d, dv, K;
  };
  const Case cases[] = {{2, 6, 5, 2, 3, 2, 4}, {2, 6, 5, 2, 3, 2, 0}, {1, 1, 4, 2, 3, 3, 4},
                        {1, 1, 3, 1, 1, 1, 0}, {2, 9, 6, 3, 2, 3, 2}, {1, 5, 4, 1, 5, 2, 4}};
  std::uint64_t seed = 100;
  for (MesaSolver solver : {MesaSolver::cg, MesaSolver::exact})
    for (const Case& cs : cases) {
      INFO("B " << cs.B << " T " << cs.T << " D " << cs.D << " H " << cs.H << " d " << cs.d << " dv " << cs.dv
                << " K " << cs.K << " solver " << mesaopt::detail::solver_name(solver));
      check_layer_gradients(make_config(cs.D, cs.H, cs.d, cs.dv, cs.K, solver), cs.B, cs.T, seed += 10);
    }
}

TEST_CASE("GatedMesaLayer: gradients accumulate and 1 vs 2 threads agree bit for bit", "[gated_mesa_layer]") {
  GatedMesaLayer<double> layer(make_config(5, 2, 3, 2, 4, MesaSolver::cg));
  randomize(layer, 7);
  const RowMatrix<double> x = random_matrix<double>(3 * 6, 5, 8), G = random_matrix<double>(3 * 6, 5, 9);
  std::vector<ParameterView<double>> ps;
  layer.parameters(ps, "");
  auto grads = [&](int threads) {
    layer.set_num_threads(threads);
    mesaopt::zero_grad(ps);
    mesaopt::GatedMesaLayerCache<double> cache;
    layer.forward(x, 6, cache);
    RowMatrix<double> dx(x.rows(), x.cols());
    layer.backward(x, 6, G, cache, dx);
    std::vector<double> out(dx.data(), dx.data() + dx.size());
    for (const auto& p : ps) out.insert(out.end(), p.grad, p.grad + p.size);
    // A second backward on the same cache adds the same gradients again.
    std::vector<double> once;
    for (const auto& p : ps) once.insert(once.end(), p.grad, p.grad + p.size);
    layer.backward(x, 6, G, cache, dx);
    std::vector<double> twice;
    for (const auto& p : ps) twice.insert(twice.end(), p.grad, p.grad + p.size);
    for (std::size_t i = 0; i < once.size(); ++i) CHECK(twice[i] == Approx(2 * once[i]).margin(1e-14));
    return out;
  };
  const auto one = grads(1), two = grads(2);
  CHECK(one == two);
}

TEST_CASE("GatedMesaLayer: float agrees with double", "[gated_mesa_layer]") {
  for (MesaSolver solver : {MesaSolver::cg, MesaSolver::exact}) {
    INFO("solver " << mesaopt::detail::solver_name(solver));
    const GatedMesaLayerConfig c = make_config(8, 2, 4, 3, 4, solver);
    GatedMesaLayer<double> ld(c);
    GatedMesaLayer<float> lf(c);
    randomize(ld, 21);
    std::vector<ParameterView<double>> pd;
    std::vector<ParameterView<float>> pf;
    ld.parameters(pd, "");
    lf.parameters(pf, "");
    REQUIRE(pd.size() == pf.size());
    for (std::size_t i = 0; i < pd.size(); ++i)
      for (std::size_t j = 0; j < pd[i].size; ++j) pf[i].value[j] = float(pd[i].value[j]);
    const long B = 2, T = 20;
    const RowMatrix<double> x = random_matrix<double>(B * T, 8, 22), G = random_matrix<double>(B * T, 8, 23);
    const RowMatrix<float> xf = x.cast<float>(), Gf = G.cast<float>();
    mesaopt::zero_grad(pd);
    mesaopt::zero_grad(pf);
    mesaopt::GatedMesaLayerCache<double> cd;
    mesaopt::GatedMesaLayerCache<float> cf;
    const RowMatrix<double> yd = ld.forward(x, T, cd);
    const RowMatrix<float> yf = lf.forward(xf, T, cf);
    CHECK(relative_rms(yf, yd) < 1e-4);
    RowMatrix<double> dxd(B * T, 8);
    RowMatrix<float> dxf(B * T, 8);
    ld.backward(x, T, G, cd, dxd);
    lf.backward(xf, T, Gf, cf, dxf);
    CHECK(relative_rms(dxf, dxd) < 1e-3);
    for (std::size_t i = 0; i < pd.size(); ++i) {
      const Eigen::Map<const Eigen::VectorXd> gd(pd[i].grad, long(pd[i].size));
      const Eigen::Map<const Eigen::VectorXf> gf(pf[i].grad, long(pf[i].size));
      INFO(pd[i].name);
      CHECK(relative_rms(gf, gd) < 1e-3);
    }
  }
}

TEST_CASE("GatedMesaLayer: stepping token by token gives the forward's outputs", "[gated_mesa_layer][step]") {
  struct Case {
    long B, T, D, H, d, dv, K;
  };
  // K = 4 with T > K and T < K - 1 (a window never full), K = 2 (one-slot
  // window), K = 1 (no window), K = 0 (no convolution); odd sizes.
  const Case cases[] = {{2, 9, 5, 2, 3, 2, 4}, {1, 2, 4, 1, 3, 3, 4}, {3, 6, 6, 3, 2, 3, 2},
                        {2, 5, 4, 2, 3, 2, 1}, {2, 7, 5, 2, 3, 4, 0}};
  std::uint64_t seed = 300;
  for (MesaSolver solver : {MesaSolver::cg, MesaSolver::exact})
    for (const Case& cs : cases)
      for (long chunk : {0L, 3L}) {  // the layer's forward chunkwise or not; step runs token by token
        INFO("B " << cs.B << " T " << cs.T << " D " << cs.D << " H " << cs.H << " d " << cs.d << " dv " << cs.dv
                  << " K " << cs.K << " solver " << mesaopt::detail::solver_name(solver) << " chunk " << chunk);
        GatedMesaLayerConfig c = make_config(cs.D, cs.H, cs.d, cs.dv, cs.K, solver);
        c.chunk = chunk;
        GatedMesaLayer<double> layer(c);
        randomize(layer, seed += 3);
        const RowMatrix<double> x = random_matrix<double>(cs.B * cs.T, cs.D, seed + 1);
        mesaopt::GatedMesaLayerCache<double> cache;
        const RowMatrix<double> y = layer.forward(x, cs.T, cache);
        for (int threads : {1, 2}) {
          layer.set_num_threads(threads);
          auto state = layer.initial_state(cs.B);
          RowMatrix<double> x_t(cs.B, cs.D), y_t(cs.B, cs.D), stepped(cs.B * cs.T, cs.D);
          for (long t = 0; t < cs.T; ++t) {
            for (long b = 0; b < cs.B; ++b) x_t.row(b) = x.row(b * cs.T + t);
            layer.step(x_t, state, y_t);
            for (long b = 0; b < cs.B; ++b) stepped.row(b * cs.T + t) = y_t.row(b);
          }
          CHECK(state.tokens == cs.T);
          CHECK(relative_rms(stepped, y) < 1e-12);
          for (long r = 0; r < y.rows(); ++r) CHECK((stepped.row(r) - y.row(r)).norm() <= 1e-11 * (1 + y.row(r).norm()));
        }
        // The step's state is the op's: its S equals the op's final state of the whole sequence.
        auto state = layer.initial_state(cs.B);
        RowMatrix<double> x_t(cs.B, cs.D), y_t(cs.B, cs.D);
        for (long t = 0; t < cs.T; ++t) {
          for (long b = 0; b < cs.B; ++b) x_t.row(b) = x.row(b * cs.T + t);
          layer.step(x_t, state, y_t);
        }
        CHECK(state.heads.size() == std::size_t(cs.B * cs.H));
        for (const auto& st : state.heads) CHECK(st.S.allFinite());
      }
}

TEST_CASE("GatedMesaLayer: float steps agree with the double forward", "[gated_mesa_layer][step]") {
  const GatedMesaLayerConfig c = make_config(6, 2, 4, 3, 4, MesaSolver::cg);
  GatedMesaLayer<double> ld(c);
  GatedMesaLayer<float> lf(c);
  randomize(ld, 41);
  std::vector<ParameterView<double>> pd;
  std::vector<ParameterView<float>> pf;
  ld.parameters(pd, "");
  lf.parameters(pf, "");
  for (std::size_t i = 0; i < pd.size(); ++i)
    for (std::size_t j = 0; j < pd[i].size; ++j) pf[i].value[j] = float(pd[i].value[j]);
  const long B = 2, T = 8;
  const RowMatrix<double> x = random_matrix<double>(B * T, 6, 42);
  mesaopt::GatedMesaLayerCache<double> cache;
  const RowMatrix<double> y = ld.forward(x, T, cache);
  auto state = lf.initial_state(B);
  RowMatrix<float> x_t(B, 6), y_t(B, 6);
  RowMatrix<double> stepped(B * T, 6);
  for (long t = 0; t < T; ++t) {
    for (long b = 0; b < B; ++b) x_t.row(b) = x.row(b * T + t).cast<float>();
    lf.step(x_t, state, y_t);
    for (long b = 0; b < B; ++b) stepped.row(b * T + t) = y_t.row(b).cast<double>();
  }
  CHECK(relative_rms(stepped, y) < 1e-4);
}

TEST_CASE("GatedMesaLayer: bad step arguments throw std::invalid_argument naming them", "[gated_mesa_layer][step][errors]") {
  GatedMesaLayer<double> layer(make_config(5, 2, 3, 2, 4, MesaSolver::cg));
  GatedMesaLayer<double> other(make_config(5, 3, 3, 2, 4, MesaSolver::cg));
  auto state = layer.initial_state(2);
  RowMatrix<double> x_t = random_matrix<double>(2, 5, 1), y_t(2, 5);
  CHECK_THROWS_WITH(layer.initial_state(0), Contains("B"));
  CHECK_THROWS_WITH(layer.step(random_matrix<double>(3, 5, 2), state, y_t), Contains("x_t"));
  CHECK_THROWS_WITH(layer.step(random_matrix<double>(2, 4, 2), state, y_t), Contains("x_t"));
  RowMatrix<double> bad_y(2, 4);
  CHECK_THROWS_WITH(layer.step(x_t, state, bad_y), Contains("y_t"));
  auto foreign = other.initial_state(2);
  CHECK_THROWS_AS(layer.step(x_t, foreign, y_t), std::invalid_argument);
  CHECK_THROWS_WITH(layer.step(x_t, foreign, y_t), Contains("initial_state"));
  mesaopt::GatedMesaLayerState<double> empty;
  CHECK_THROWS_WITH(layer.step(x_t, empty, y_t), Contains("state"));
  x_t(1, 2) = NAN;
  CHECK_THROWS_WITH(layer.step(x_t, state, y_t), Contains("x_t has a non-finite entry"));
  CHECK(state.tokens == 0);  // nothing advanced
}

TEST_CASE("GatedMesaLayer: bad configs and inputs throw std::invalid_argument naming the field",
          "[gated_mesa_layer][errors]") {
  const GatedMesaLayerConfig good = make_config(5, 2, 3, 2, 4, MesaSolver::cg);
  auto expect = [&](auto edit, const char* field) {
    GatedMesaLayerConfig c = good;
    edit(c);
    INFO(field);
    CHECK_THROWS_AS(GatedMesaLayer<double>(c), std::invalid_argument);
    CHECK_THROWS_WITH(GatedMesaLayer<double>(c), Contains(field));
  };
  expect([](auto& c) { c.D = 0; }, "config.D");
  expect([](auto& c) { c.H = 0; }, "config.H");
  expect([](auto& c) { c.d = -1; }, "config.d");
  expect([](auto& c) { c.dv = 0; }, "config.dv");
  expect([](auto& c) { c.conv_size = -1; }, "config.conv_size");
  expect([](auto& c) { c.lambda_floor = 0; }, "config.lambda_floor");
  expect([](auto& c) { c.lambda_floor = NAN; }, "config.lambda_floor");
  expect([](auto& c) { c.lambda_init = 0.25; }, "config.lambda_init");
  expect([](auto& c) { c.beta_bias_init = INFINITY; }, "config.beta_bias_init");
  expect([](auto& c) { c.forget_bias_init = NAN; }, "config.forget_bias_init");
  expect([](auto& c) { c.norm_eps = 0; }, "config.norm_eps");
  expect([](auto& c) { c.solver = static_cast<MesaSolver>(7); }, "config.solver");
  expect([](auto& c) { c.cg_steps = 0; }, "config.cg_steps");
  expect([](auto& c) { c.cg_tolerance = -1; }, "config.cg_tolerance");
  expect([](auto& c) { c.chunk = -2; }, "config.chunk");

  GatedMesaLayer<double> layer(good);
  layer.init(1, 0.3);
  mesaopt::GatedMesaLayerCache<double> cache;
  RowMatrix<double> x = random_matrix<double>(12, 5, 1), y(12, 5);
  CHECK_THROWS_WITH(layer.forward(RowMatrix<double>(12, 4), 6, cache, y), Contains("config.D"));
  CHECK_THROWS_WITH(layer.forward(x, 5, cache, y), Contains("multiple of T"));
  CHECK_THROWS_WITH(layer.forward(x, 0, cache, y), Contains("T (sequence length)"));
  RowMatrix<double> ybad(12, 4);
  CHECK_THROWS_WITH(layer.forward(x, 6, cache, ybad), Contains("y is"));
  RowMatrix<double> dx(12, 5);
  CHECK_THROWS_WITH(layer.backward(x, 6, y, cache, dx), Contains("cache holds B = 0"));
  layer.forward(x, 6, cache, y);
  CHECK_THROWS_WITH(layer.backward(x, 4, y, cache, dx), Contains("cache holds B = 2, T = 6"));
  GatedMesaLayer<double> other(make_config(5, 2, 3, 2, 2, MesaSolver::cg));
  CHECK_THROWS_WITH(other.backward(x, 6, y, cache, dx), Contains("conv_size"));
  layer.lambda_raw()(1, 2) = NAN;
  CHECK_THROWS_WITH(layer.forward(x, 6, cache, y), Contains("lambda_raw(1, 2)"));
  layer.init(1, 0.3);
  layer.b_gamma()[1] = -1e4;  // gamma underflows to 0: the op rejects it, the layer names b and h
  CHECK_THROWS_AS(layer.forward(x, 6, cache, y), std::invalid_argument);
  CHECK_THROWS_WITH(layer.forward(x, 6, cache, y), Contains("head h = 1") && Contains("gamma"));
  CHECK_THROWS_WITH(layer.lambda(2), Contains("head h = 2"));
}

// ---------------------------------------------------------------------------
// nn::Model with a gated_mesa block.

namespace {

nn::ModelConfig hybrid_gated_config(MesaSolver solver, long conv) {
  nn::ModelConfig c;
  c.input_dim = 3;
  c.width = 6;
  c.output_dim = 2;
  nn::BlockConfig g;
  g.attention = nn::AttentionKind::gated_mesa;
  g.heads = 2;
  g.key_size = 3;
  g.value_size = 2;
  g.layer_norm = true;
  g.mlp = true;
  g.mlp_hidden = 5;
  g.positional_dim = 2;
  g.gated_conv_size = conv;
  g.gated_solver = solver;
  g.gated_cg_steps = 20;
  g.gated_forget_bias_init = 2.0;
  nn::BlockConfig l;
  l.attention = nn::AttentionKind::linear;
  l.heads = 1;
  l.key_size = 3;
  l.value_size = 3;
  c.blocks = {g, l};
  c.num_threads = 1;
  return c;
}

}  // namespace

TEST_CASE("nn::Model: a gated_mesa block is built, named and FD-checked through Model::backward",
          "[gated_mesa_layer][model][gradcheck]") {
  CHECK(std::string(nn::attention_kind_name(nn::AttentionKind::gated_mesa)) == "gated_mesa");
  for (MesaSolver solver : {MesaSolver::cg, MesaSolver::exact})
    for (long conv : {4L, 0L}) {
      INFO("solver " << mesaopt::detail::solver_name(solver) << " conv " << conv);
      nn::Model<double> model(hybrid_gated_config(solver, conv));
      model.init(5, 0.4);
      auto ps = model.parameters();
      std::vector<std::string> names;
      for (const auto& p : ps) names.push_back(p.name);
      auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
      CHECK(has("block0.attn.W_q"));
      CHECK(has("block0.attn.W_beta"));
      CHECK(has("block0.attn.b_gamma"));
      CHECK(has("block0.attn.lambda_raw"));
      CHECK(has("block0.attn.norm_weight"));
      CHECK(has("block0.attn.conv_q") == (conv > 0));
      CHECK(has("block1.attn.W_o"));
      const long B = 2, T = 5;
      RowMatrix<double> x = random_matrix<double>(B * T, 3, 31);
      const RowMatrix<double> G = random_matrix<double>(B * T, 2, 32);
      auto loss = [&] {
        nn::ModelCache<double> c;
        return (model.forward(x, T, c).array() * G.array()).sum();
      };
      mesaopt::zero_grad(ps);
      nn::ModelCache<double> cache;
      model.forward(x, T, cache);
      CHECK(std::holds_alternative<mesaopt::GatedMesaLayerCache<double>>(cache.blocks[0].attn));
      RowMatrix<double> dx(B * T, 3);
      model.backward(G, cache, dx);
      const auto rx = check4(loss, x.data(), dx.data(), std::size_t(x.size()));
      INFO(rx.describe("dx"));
      CHECK(rx.error < 1e-6);
      for (const auto& p : ps) {
        const std::vector<double> analytic(p.grad, p.grad + p.size);
        const auto r = check4(loss, p.value, analytic.data(), p.size);
        INFO(r.describe(p.name));
        CHECK(r.error < 1e-6);
      }
    }
}

TEST_CASE("nn::Model: bad gated_mesa block fields throw naming the field", "[gated_mesa_layer][model][errors]") {
  const nn::ModelConfig good = hybrid_gated_config(MesaSolver::cg, 4);
  auto expect = [&](auto edit, const char* field) {
    nn::ModelConfig c = good;
    edit(c.blocks[0]);
    INFO(field);
    CHECK_THROWS_AS(nn::Model<double>(c), std::invalid_argument);
    CHECK_THROWS_WITH(nn::Model<double>(c), Contains(std::string("config.blocks[0].") + field));
  };
  expect([](auto& b) { b.gated_conv_size = -1; }, "gated_conv_size");
  expect([](auto& b) { b.gated_lambda_floor = 0; }, "gated_lambda_floor");
  expect([](auto& b) { b.gated_lambda_init = 0.2; }, "gated_lambda_init");
  expect([](auto& b) { b.gated_beta_bias_init = NAN; }, "gated_beta_bias_init");
  expect([](auto& b) { b.gated_forget_bias_init = INFINITY; }, "gated_forget_bias_init");
  expect([](auto& b) { b.gated_norm_eps = -1; }, "gated_norm_eps");
  expect([](auto& b) { b.gated_solver = static_cast<MesaSolver>(3); }, "gated_solver");
  expect([](auto& b) { b.gated_cg_steps = 0; }, "gated_cg_steps");
  expect([](auto& b) { b.gated_cg_tolerance = -0.5; }, "gated_cg_tolerance");
  expect([](auto& b) { b.mesa_chunk = -1; }, "mesa_chunk");
  expect([](auto& b) { b.normalize_qk = true; }, "normalize_qk");
  expect([](auto& b) { b.attention = static_cast<nn::AttentionKind>(9); }, "attention");
  // Analysis: a gated_mesa block is named in the messages of the linear-only tools.
  nn::Model<double> model(good);
  CHECK_THROWS_WITH(mesaopt::analysis::head_products(model, 0), Contains("gated_mesa"));
}

TEST_CASE("nn::Model: capture_activations and replace_attention_kind handle gated_mesa",
          "[gated_mesa_layer][model][analysis]") {
  nn::Model<double> model(hybrid_gated_config(MesaSolver::cg, 4));
  model.init(9, 0.3);
  const RowMatrix<double> x = random_matrix<double>(2 * 4, 3, 41);
  const auto acts = mesaopt::analysis::capture_activations(model, x, 4);
  nn::ModelCache<double> cache;
  const RowMatrix<double> pred = model.forward(x, 4, cache);
  CHECK((acts.predictions.array() == pred.array()).all());
  REQUIRE(acts.attention_output.size() == 2);
  CHECK(acts.attention_output[0].allFinite());
  // linear block 1 -> gated_mesa: the model builds and runs.
  auto gated = mesaopt::analysis::replace_attention_kind(model, 1, nn::AttentionKind::gated_mesa);
  CHECK(gated->config().blocks[1].attention == nn::AttentionKind::gated_mesa);
  nn::ModelCache<double> c2;
  CHECK(gated->forward(x, 4, c2).allFinite());
}

TEST_CASE("Trainer: a 2-layer model with a gated_mesa block learns the dynamics task", "[gated_mesa_layer][train]") {
  const long n = 2, T = 8, B = 8, steps = 150;
  mesaopt::tasks::DynamicsConfig dc;
  dc.state_dim = n;
  dc.seq_len = T;
  mesaopt::train::BatchSource<double> source = [dc](long step) {
    const auto batch = mesaopt::tasks::make_dynamics_batch<double>(dc, B, 11, step * B, 1);
    mesaopt::train::TrainBatch<double> tb;
    tb.inputs = mesaopt::tasks::constructed_tokens<double>(batch);
    tb.targets = batch.targets;
    tb.seq_len = batch.seq_len;
    return tb;
  };
  nn::ModelConfig mc;
  mc.input_dim = mc.width = 4 * n;
  mc.output_dim = n;
  mc.embed = false;
  mc.readout_slice = true;
  nn::BlockConfig g;
  g.attention = nn::AttentionKind::gated_mesa;
  g.heads = 1;
  g.key_size = 4 * n;
  g.value_size = 4 * n;
  g.gated_cg_steps = 10;
  g.gated_forget_bias_init = 3.0;  // gamma about 0.95: remember the sequence at the start
  nn::BlockConfig l;
  l.attention = nn::AttentionKind::linear;
  l.heads = 1;
  l.key_size = 4 * n;
  l.value_size = 4 * n;
  mc.blocks = {g, l};
  mc.num_threads = 1;
  nn::Model<double> model(mc);
  model.init(1, 0.1);
  mesaopt::train::TrainerConfig tc;
  tc.steps = steps;
  tc.adam = mesaopt::train::adamw_config(0.0);
  tc.schedule = mesaopt::train::constant_schedule(2e-2);
  tc.clip_norm = 1.0;
  tc.progress = false;
  const auto t0 = std::chrono::steady_clock::now();
  mesaopt::train::Trainer<double> trainer(model, source, tc);
  const auto r = trainer.run();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto mean = [&](long from, long to) {
    double s = 0;
    for (long i = from; i < to; ++i) s += r.losses[std::size_t(i)];
    return s / double(to - from);
  };
  const double initial = mean(0, 5), final = mean(steps - 5, steps);
  std::printf("[train] gated_mesa + linear: loss %.4g -> %.4g (ratio %.3f) in %.2f s\n", initial, final,
              final / initial, secs);
  CHECK(std::isfinite(final));
  CHECK(final / initial < 0.6);
}

}  // namespace mesaopt_test_gated_mesa_layer
