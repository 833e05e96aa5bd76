// Tests of the multi-head layers (include/mesaopt/layers/*.hpp):
// - backward against central finite differences in double for every parameter
//   and the input x (relative error < 1e-6), at sizes that are not multiples
//   of any SIMD width (T = 17, d = 5, dv = 3);
// - forward against a plain composition written here (projections by hand, a
//   naive per-head loop, the output projection);
// - bit-identical results for 1 and 2 threads, forward and backward;
// - bad input throws std::invalid_argument.
#include <catch2/catch.hpp>
#include <mesaopt/layers.hpp>

#include <Eigen/Cholesky>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_layers {

using mesaopt::ParameterView;
using mesaopt::RowMatrix;
using mesaopt::test::random_matrix;
using mesaopt::test::relative_rms;

namespace {

// ---------------------------------------------------------------------------
// Naive per-head references (one sequence, one head), written independently
// of the ops: direct sums over i <= t.

// docs/math.md M1-M2: o_t = sum_{i<=t} v_i (k_i . q_t).
RowMatrix<double> naive_linear(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v) {
  RowMatrix<double> o = RowMatrix<double>::Zero(q.rows(), v.cols());
  for (long t = 0; t < q.rows(); ++t)
    for (long i = 0; i <= t; ++i) o.row(t) += k.row(i).dot(q.row(t)) * v.row(i);
  return o;
}

// docs/math.md M4: o_t = sum_{i<=t} softmax_i(q_t . k_i / sqrt(d)) v_i.
RowMatrix<double> naive_softmax(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v) {
  RowMatrix<double> o = RowMatrix<double>::Zero(q.rows(), v.cols());
  const double scale = 1.0 / std::sqrt(double(q.cols()));
  for (long t = 0; t < q.rows(); ++t) {
    Eigen::VectorXd s(t + 1);
    for (long i = 0; i <= t; ++i) s(i) = scale * k.row(i).dot(q.row(t));
    const Eigen::VectorXd a = (s.array() - s.maxCoeff()).exp();
    for (long i = 0; i <= t; ++i) o.row(t) += a(i) / a.sum() * v.row(i);
  }
  return o;
}

// docs/math.md M5-M6 with forgetting, by a direct solve at every t:
// o_t = S_t A_t^{-1} q_t, A_t = sum_{i<=t} gamma^{t-i} k_i k_i^T + gamma^t I / lambda,
// S_t = sum_{i<=t} gamma^{t-i} v_i k_i^T.
RowMatrix<double> naive_mesa(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v,
                             double lambda, double gamma) {
  const long d = q.cols();
  RowMatrix<double> o(q.rows(), v.cols());
  for (long t = 0; t < q.rows(); ++t) {
    Eigen::MatrixXd A = std::pow(gamma, double(t + 1)) / lambda * Eigen::MatrixXd::Identity(d, d);
    Eigen::MatrixXd S = Eigen::MatrixXd::Zero(v.cols(), d);
    for (long i = 0; i <= t; ++i) {
      const double w = std::pow(gamma, double(t - i));
      A += w * k.row(i).transpose() * k.row(i);
      S += w * v.row(i).transpose() * k.row(i);
    }
    o.row(t) = (S * A.ldlt().solve(q.row(t).transpose())).transpose();
  }
  return o;
}

// Row-wise x / sqrt(|x|^2 + 1e-12), as the layers' key normalisation.
RowMatrix<double> normalize_rows(const RowMatrix<double>& x) {
  RowMatrix<double> y = x;
  for (long t = 0; t < x.rows(); ++t) y.row(t) /= std::sqrt(x.row(t).squaredNorm() + 1e-12);
  return y;
}

// The plain layer: X W^T projections, per-head op `head(q, k, v)`, O W_o^T.
template <class Head>
RowMatrix<double> plain_layer(const RowMatrix<double>& x, long T, long H, long d, long dv,
                              const RowMatrix<double>& Wq, const RowMatrix<double>& Wk, const RowMatrix<double>& Wv,
                              const RowMatrix<double>& Wo, bool normalize, Head head) {
  const long B = x.rows() / T;
  RowMatrix<double> o(x.rows(), H * dv);
  for (long b = 0; b < B; ++b) {
    const RowMatrix<double> xb = x.middleRows(b * T, T);
    for (long h = 0; h < H; ++h) {
      RowMatrix<double> q = xb * Wq.middleRows(h * d, d).transpose();
      RowMatrix<double> k = xb * Wk.middleRows(h * d, d).transpose();
      const RowMatrix<double> v = xb * Wv.middleRows(h * dv, dv).transpose();
      if (normalize) {
        q = normalize_rows(q);
        k = normalize_rows(k);
      }
      o.block(b * T, h * dv, T, dv) = head(q, k, v, h);
    }
  }
  return o * Wo.transpose();
}

// ---------------------------------------------------------------------------
// Generic checks over a layer type.

// Bitwise equality of two matrices of equal shape.
template <class M>
bool same_bits(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * std::size_t(a.size())) == 0;
}

// Every parameter's and x's gradient against central differences in double,
// for L = sum(y .* w) with a fixed random w (so dL/dy = w).
template <class Layer>
void check_layer_gradients(Layer& layer, long B, long T, std::uint64_t seed) {
  const long D = layer.config().D;
  RowMatrix<double> x = random_matrix<double>(B * T, D, seed, 1.0);
  const RowMatrix<double> w = random_matrix<double>(B * T, D, seed + 1, 1.0);
  typename Layer::Cache cache;
  auto loss = [&] {
    const RowMatrix<double> y = layer.forward(x, T, cache);
    return (y.array() * w.array()).sum();
  };

  std::vector<ParameterView<double>> params;
  layer.parameters(params, "layer.");
  mesaopt::zero_grad(params);
  loss();
  RowMatrix<double> dx(B * T, D);
  layer.backward(x, T, w, cache, dx);

  // Backward ADDS into the gradient buffers: a second call doubles them.
  std::vector<std::vector<double>> first;
  for (const auto& p : params) first.emplace_back(p.grad, p.grad + p.size);
  layer.backward(x, T, w, cache, dx);
  for (std::size_t j = 0; j < params.size(); ++j) {
    double worst = 0;
    for (std::size_t i = 0; i < params[j].size; ++i)
      worst = std::max(worst, std::abs(params[j].grad[i] - 2 * first[j][i]));
    INFO(params[j].name);
    CHECK(worst == 0.0);
    std::copy(first[j].begin(), first[j].end(), params[j].grad);  // back to one call's gradient
  }

  for (const auto& p : params) {
    const std::vector<double> analytic(p.grad, p.grad + p.size);
    const auto r = mesaopt::test::check_gradient(loss, p.value, analytic.data(), p.size);
    INFO(r.describe(p.name));
    CHECK(r.error < 1e-6);
    CHECK(r.scale > 1e-3);  // a non-trivial gradient: all-zero would pass the metric
  }
  const auto r = mesaopt::test::check_gradient(loss, x, dx);
  INFO(r.describe("x"));
  CHECK(r.error < 1e-6);
  CHECK(r.scale > 1e-3);
}

// Runs forward + backward with `threads` threads; returns y, dx and all grads.
template <class Layer>
struct RunResult {
  RowMatrix<typename Layer::Scalar> y, dx;
  std::vector<std::vector<typename Layer::Scalar>> grads;
};

template <class Layer>
RunResult<Layer> run_with_threads(Layer layer, const RowMatrix<typename Layer::Scalar>& x, long T,
                                  const RowMatrix<typename Layer::Scalar>& dy, int threads) {
  using S = typename Layer::Scalar;
  layer.set_num_threads(threads);
  std::vector<ParameterView<S>> params;
  layer.parameters(params, "");
  mesaopt::zero_grad(params);
  typename Layer::Cache cache;
  RunResult<Layer> r;
  r.y = layer.forward(x, T, cache);
  r.dx.resize(x.rows(), x.cols());
  layer.backward(x, T, dy, cache, r.dx);
  for (const auto& p : params) r.grads.emplace_back(p.grad, p.grad + p.size);
  return r;
}

template <class Layer>
void check_thread_invariance(const Layer& layer, long B, long T) {
  using S = typename Layer::Scalar;
  const long D = layer.config().D;
  const RowMatrix<S> x = random_matrix<S>(B * T, D, 71, 1.0);
  const RowMatrix<S> dy = random_matrix<S>(B * T, D, 72, 1.0);
  const auto one = run_with_threads(layer, x, T, dy, 1);
  const auto two = run_with_threads(layer, x, T, dy, 2);
  CHECK(same_bits(one.y, two.y));
  CHECK(same_bits(one.dx, two.dx));
  REQUIRE(one.grads.size() == two.grads.size());
  for (std::size_t j = 0; j < one.grads.size(); ++j) {
    INFO("parameter " << j);
    CHECK(one.grads[j] == two.grads[j]);
  }
  CHECK(one.y.norm() > 0);  // something was computed
}

template <class Layer>
void check_parameter_views(Layer& layer, const std::vector<std::string>& names) {
  std::vector<ParameterView<typename Layer::Scalar>> params;
  layer.parameters(params, "blk.");
  REQUIRE(params.size() == names.size());
  for (std::size_t j = 0; j < names.size(); ++j) {
    CHECK(params[j].name == "blk." + names[j]);
    long n = 1;
    for (long s : params[j].shape) n *= s;
    CHECK(std::size_t(n) == params[j].size);
  }
  const auto& c = layer.config();
  CHECK(params[0].value == layer.W_q().data());
  CHECK(params[0].shape == std::vector<long>{c.H * c.d, c.D});
  CHECK(params[1].value == layer.W_k().data());
  CHECK(params[1].shape == std::vector<long>{c.H * c.d, c.D});
  CHECK(params[2].value == layer.W_v().data());
  CHECK(params[2].shape == std::vector<long>{c.H * c.dv, c.D});
  CHECK(params[3].value == layer.W_o().data());
  CHECK(params[3].shape == std::vector<long>{c.D, c.H * c.dv});
  CHECK(params[3].grad == layer.grad_W_o().data());
}

// Bad x / T / dy / cache inputs shared by every layer.
template <class Layer>
void check_bad_inputs(Layer& layer) {
  using S = typename Layer::Scalar;
  const long D = layer.config().D;
  typename Layer::Cache cache;
  const RowMatrix<S> x = random_matrix<S>(2 * 5, D, 5, 1.0);
  RowMatrix<S> y(10, D), dx(10, D);
  CHECK_THROWS_AS(layer.forward(x, 0, cache), std::invalid_argument);               // T = 0
  CHECK_THROWS_WITH(layer.forward(x, 3, cache), Catch::Contains("T = 3"));         // 3 does not divide 10
  CHECK_THROWS_AS(layer.forward(x, 3, cache), std::invalid_argument);
  const RowMatrix<S> x_wide = random_matrix<S>(10, D + 1, 5, 1.0);                  // wrong width
  CHECK_THROWS_WITH(layer.forward(x_wide, 5, cache), Catch::Contains("columns"));
  const RowMatrix<S> x_empty(0, D);
  CHECK_THROWS_AS(layer.forward(x_empty, 5, cache), std::invalid_argument);
  RowMatrix<S> y_bad(9, D);
  CHECK_THROWS_WITH(layer.forward(x, 5, cache, y_bad), Catch::Contains("y"));
  // backward before any forward, and against a cache of another shape
  typename Layer::Cache empty;
  CHECK_THROWS_WITH(layer.backward(x, 5, y, empty, dx), Catch::Contains("cache"));
  layer.forward(x, 5, cache, y);
  CHECK_THROWS_WITH(layer.backward(x, 2, y, cache, dx), Catch::Contains("cache"));
  RowMatrix<S> dy_bad(10, D + 1), dx_bad(11, D);
  CHECK_THROWS_WITH(layer.backward(x, 5, dy_bad, cache, dx), Catch::Contains("dy"));
  CHECK_THROWS_WITH(layer.backward(x, 5, y, cache, dx_bad), Catch::Contains("dx"));
  CHECK_THROWS_WITH(layer.init(1, -1.0), Catch::Contains("stddev"));
  CHECK_NOTHROW(layer.backward(x, 5, y, cache, dx));
}

// Sizes of the gradient checks: T >= 17, d and dv not multiples of 8.
constexpr long kB = 2, kT = 17, kD = 13, kH = 2, kd = 5, kdv = 3;

}  // namespace

// ===========================================================================
// LinearAttentionLayer

namespace {
mesaopt::LinearAttentionLayerConfig linear_config(long D, long H, long d, long dv, bool normalize) {
  mesaopt::LinearAttentionLayerConfig c;
  c.D = D;
  c.H = H;
  c.d = d;
  c.dv = dv;
  c.normalize_qk = normalize;
  return c;
}
}  // namespace

TEST_CASE("LinearAttentionLayer: backward matches finite differences", "[layers][linear]") {
  for (bool normalize : {false, true}) {
    DYNAMIC_SECTION("normalize_qk = " << normalize) {
      mesaopt::LinearAttentionLayer<double> layer(linear_config(kD, kH, kd, kdv, normalize));
      layer.init(11, 0.3);
      check_layer_gradients(layer, kB, kT, 100);
    }
  }
}

TEST_CASE("LinearAttentionLayer: forward equals projections + naive causal linear attention", "[layers][linear]") {
  for (bool normalize : {false, true}) {
    DYNAMIC_SECTION("normalize_qk = " << normalize) {
      const long B = 3, T = 70, D = 19, H = 3, d = 33, dv = 34;  // d, dv >= 32, T >= 64: the chunked op path too
      mesaopt::LinearAttentionLayer<double> layer(linear_config(D, H, d, dv, normalize));
      layer.init(5, 0.2);
      const RowMatrix<double> x = random_matrix<double>(B * T, D, 6, 1.0);
      mesaopt::LinearAttentionLayerCache<double> cache;
      const RowMatrix<double> y = layer.forward(x, T, cache);
      const RowMatrix<double> ref =
          plain_layer(x, T, H, d, dv, layer.W_q(), layer.W_k(), layer.W_v(), layer.W_o(), normalize,
                      [](const auto& q, const auto& k, const auto& v, long) { return naive_linear(q, k, v); });
      INFO("relative rms " << relative_rms(y, ref));
      CHECK(relative_rms(y, ref) < 1e-12);
      CHECK(ref.norm() > 0);
    }
  }
}

TEST_CASE("LinearAttentionLayer: parameters, init, thread-count invariance, bad input", "[layers][linear]") {
  mesaopt::LinearAttentionLayer<float> layer(linear_config(40, 2, 32, 24, true));
  layer.init(3, 0.2);
  check_parameter_views(layer, {"W_q", "W_k", "W_v", "W_o"});

  SECTION("init is seeded and has the asked spread") {
    mesaopt::LinearAttentionLayer<float> same(layer.config()), other(layer.config());
    same.init(3, 0.2);
    other.init(4, 0.2);
    CHECK(same.W_q() == layer.W_q());
    CHECK(same.W_o() == layer.W_o());
    CHECK(other.W_q() != layer.W_q());
    const double rms = std::sqrt(layer.W_v().cast<double>().squaredNorm() / double(layer.W_v().size()));
    CHECK(rms == Approx(0.2).epsilon(0.05));
    CHECK(layer.W_q() != layer.W_k());  // consecutive draws
    // init(seed) is init(rng) with a fresh SplitMix64(seed); a shared generator continues.
    mesaopt::SplitMix64 rng(3);
    mesaopt::LinearAttentionLayer<float> first(layer.config()), second(layer.config());
    first.init(rng, 0.2);
    second.init(rng, 0.2);
    CHECK(first.W_q() == layer.W_q());
    CHECK(first.W_o() == layer.W_o());
    CHECK(second.W_q() != layer.W_q());
  }
  SECTION("1 and 2 threads give identical bits (N = 600 tokens: long GEMM reductions)") {
    check_thread_invariance(layer, 3, 200);
    mesaopt::LinearAttentionLayer<double> plain(linear_config(40, 3, 20, 12, false));
    plain.init(8, 0.2);
    check_thread_invariance(plain, 2, 300);
  }
  SECTION("bad input throws") {
    check_bad_inputs(layer);
    CHECK_THROWS_WITH(mesaopt::LinearAttentionLayer<float>(linear_config(0, 2, 3, 3, false)),
                      Catch::Contains("config.D"));
    CHECK_THROWS_WITH(mesaopt::LinearAttentionLayer<float>(linear_config(4, 0, 3, 3, false)),
                      Catch::Contains("config.H"));
    CHECK_THROWS_WITH(mesaopt::LinearAttentionLayer<float>(linear_config(4, 2, 0, 3, false)),
                      Catch::Contains("config.d "));
    CHECK_THROWS_WITH(mesaopt::LinearAttentionLayer<float>(linear_config(4, 2, 3, 0, false)),
                      Catch::Contains("config.dv"));
  }
}

// ===========================================================================
// SoftmaxAttentionLayer

namespace {
mesaopt::SoftmaxAttentionLayerConfig softmax_config(long D, long H, long d, long dv) {
  mesaopt::SoftmaxAttentionLayerConfig c;
  c.D = D;
  c.H = H;
  c.d = d;
  c.dv = dv;
  return c;
}
}  // namespace

TEST_CASE("SoftmaxAttentionLayer: backward matches finite differences", "[layers][softmax]") {
  mesaopt::SoftmaxAttentionLayer<double> layer(softmax_config(kD, kH, kd, kdv));
  layer.init(12, 0.4);
  check_layer_gradients(layer, kB, kT, 200);
}

TEST_CASE("SoftmaxAttentionLayer: forward equals projections + naive causal softmax attention",
          "[layers][softmax]") {
  const long B = 2, T = 150, D = 21, H = 3, d = 7, dv = 9;  // T > 2 tiles of 64
  mesaopt::SoftmaxAttentionLayer<double> layer(softmax_config(D, H, d, dv));
  layer.init(5, 0.5);
  const RowMatrix<double> x = random_matrix<double>(B * T, D, 7, 1.0);
  mesaopt::SoftmaxAttentionLayerCache<double> cache;
  const RowMatrix<double> y = layer.forward(x, T, cache);
  const RowMatrix<double> ref =
      plain_layer(x, T, H, d, dv, layer.W_q(), layer.W_k(), layer.W_v(), layer.W_o(), false,
                  [](const auto& q, const auto& k, const auto& v, long) { return naive_softmax(q, k, v); });
  INFO("relative rms " << relative_rms(y, ref));
  CHECK(relative_rms(y, ref) < 1e-13);
  CHECK(ref.norm() > 0);
}

TEST_CASE("SoftmaxAttentionLayer: parameters, thread-count invariance, bad input", "[layers][softmax]") {
  mesaopt::SoftmaxAttentionLayer<float> layer(softmax_config(40, 2, 32, 24));
  layer.init(3, 0.2);
  check_parameter_views(layer, {"W_q", "W_k", "W_v", "W_o"});
  SECTION("1 and 2 threads give identical bits") { check_thread_invariance(layer, 3, 200); }
  SECTION("bad input throws") {
    check_bad_inputs(layer);
    CHECK_THROWS_WITH(mesaopt::SoftmaxAttentionLayer<float>(softmax_config(4, 2, 3, 0)), Catch::Contains("config.dv"));
    CHECK_THROWS_WITH(mesaopt::SoftmaxAttentionLayer<float>(softmax_config(4, -1, 3, 2)), Catch::Contains("config.H"));
  }
}

// ===========================================================================
// MesaLayer

namespace {
mesaopt::MesaLayerConfig mesa_config(long D, long H, long d, long dv, bool normalize, bool learn_forget,
                                     double forget_init = 1.0) {
  mesaopt::MesaLayerConfig c;
  c.D = D;
  c.H = H;
  c.d = d;
  c.dv = dv;
  c.normalize_qk = normalize;
  c.learn_forget = learn_forget;
  c.forget_init = forget_init;
  return c;
}
}  // namespace

TEST_CASE("MesaLayer: backward matches finite differences", "[layers][mesa]") {
  for (bool normalize : {false, true}) {
    for (bool learn_forget : {false, true}) {
      DYNAMIC_SECTION("normalize_qk = " << normalize << ", learn_forget = " << learn_forget) {
        mesaopt::MesaLayer<double> layer(mesa_config(kD, kH, kd, kdv, normalize, learn_forget, learn_forget ? 0.8 : 1.0));
        layer.init(13, 0.3);
        // Distinct regularisers per head, so a head mix-up would show.
        layer.lambda_raw()(1) = 0.3;
        if (learn_forget) layer.forget_raw()(0) = 2.5;
        std::vector<ParameterView<double>> params;
        layer.parameters(params, "");
        CHECK(params.size() == (learn_forget ? 6u : 5u));
        check_layer_gradients(layer, kB, kT, 300);
      }
    }
  }
  SECTION("lambda used raw (R_0 = lambda_raw I, the paper's code), with a learnable forget factor") {
    auto c = mesa_config(kD, kH, kd, kdv, false, true, 0.8);
    c.lambda_parametrization = mesaopt::LambdaParametrization::raw;
    mesaopt::MesaLayer<double> layer(c);
    layer.init(15, 0.3);
    layer.lambda_raw()(1) = 0.3;  // lambda of head 1 is 0.3 itself
    check_layer_gradients(layer, kB, kT, 500);
  }
  SECTION("fixed forget factor 0.9 (not learnable), checkpoint interval 4") {
    auto c = mesa_config(kD, kH, kd, kdv, false, false, 0.9);
    c.chunk = 4;
    mesaopt::MesaLayer<double> layer(c);
    layer.init(14, 0.3);
    check_layer_gradients(layer, kB, kT, 400);
  }
}

TEST_CASE("MesaLayer: forward equals projections + a direct ridge solve per position", "[layers][mesa]") {
  for (bool normalize : {false, true}) {
    for (bool learn_forget : {false, true}) {
      DYNAMIC_SECTION("normalize_qk = " << normalize << ", learn_forget = " << learn_forget) {
        const long B = 2, T = 40, D = 11, H = 3, d = 6, dv = 5;
        mesaopt::MesaLayer<double> layer(mesa_config(D, H, d, dv, normalize, learn_forget, learn_forget ? 0.9 : 1.0));
        layer.init(5, 0.4);
        layer.lambda_raw() << -0.5, 0.5, 2.0;
        if (learn_forget) layer.forget_raw() << 1.0, 3.0, 6.0;
        const RowMatrix<double> x = random_matrix<double>(B * T, D, 8, 1.0);
        mesaopt::MesaLayerCache<double> cache;
        const RowMatrix<double> y = layer.forward(x, T, cache);
        const auto softplus = [](double r) { return std::log1p(std::exp(r)); };
        const auto sigmoid = [](double r) { return 1.0 / (1.0 + std::exp(-r)); };
        const RowMatrix<double> ref = plain_layer(
            x, T, H, d, dv, layer.W_q(), layer.W_k(), layer.W_v(), layer.W_o(), normalize,
            [&](const auto& q, const auto& k, const auto& v, long h) {
              return naive_mesa(q, k, v, softplus(layer.lambda_raw()(h)),
                                learn_forget ? sigmoid(layer.forget_raw()(h)) : 1.0);
            });
        INFO("relative rms " << relative_rms(y, ref));
        CHECK(relative_rms(y, ref) < 1e-11);
        CHECK(ref.norm() > 0);
      }
    }
  }
}

TEST_CASE("MesaLayer: the raw lambda parametrisation is lambda_raw itself", "[layers][mesa]") {
  const long B = 2, T = 30, D = 9, H = 2, d = 5, dv = 4;
  auto c = mesa_config(D, H, d, dv, false, false);
  c.lambda_parametrization = mesaopt::LambdaParametrization::raw;
  c.lambda_init = 1.5;
  mesaopt::MesaLayer<double> raw(c);
  raw.init(21, 0.4);
  CHECK(raw.lambda_raw()(0) == 1.5);
  CHECK(raw.lambda(1) == 1.5);
  raw.lambda_raw() << 0.7, 2.5;
  // The same layer with softplus(lambda_raw) set to the same lambdas computes the same output.
  c.lambda_parametrization = mesaopt::LambdaParametrization::softplus;
  mesaopt::MesaLayer<double> soft(c);
  soft.init(21, 0.4);
  soft.lambda_raw() << mesaopt::detail::softplus_inverse(0.7), mesaopt::detail::softplus_inverse(2.5);
  CHECK(soft.lambda(0) == Approx(0.7).epsilon(1e-14));
  const RowMatrix<double> x = random_matrix<double>(B * T, D, 22, 1.0);
  mesaopt::MesaLayerCache<double> c1, c2;
  const RowMatrix<double> y_raw = raw.forward(x, T, c1);
  const RowMatrix<double> y_soft = soft.forward(x, T, c2);
  CHECK(relative_rms(y_raw, y_soft) < 1e-13);
  // And against the direct ridge solve with lambda = lambda_raw.
  const RowMatrix<double> ref = plain_layer(
      x, T, H, d, dv, raw.W_q(), raw.W_k(), raw.W_v(), raw.W_o(), false,
      [&](const auto& q, const auto& k, const auto& v, long h) { return naive_mesa(q, k, v, raw.lambda_raw()(h), 1.0); });
  CHECK(relative_rms(y_raw, ref) < 1e-11);
  // A lambda driven to <= 0 (nothing keeps it positive) stops the forward with a named error.
  raw.lambda_raw()(1) = -0.25;
  CHECK_THROWS_WITH(raw.forward(x, T, c1), Catch::Contains("head 1: lambda = lambda_raw = -0.25") &&
                                               Catch::Contains("raw parametrisation"));
  raw.lambda_raw()(1) = 0.0;
  CHECK_THROWS_AS(raw.forward(x, T, c1), std::invalid_argument);
  auto bad = c;
  bad.lambda_parametrization = static_cast<mesaopt::LambdaParametrization>(7);
  CHECK_THROWS_WITH(mesaopt::MesaLayer<double>(bad), Catch::Contains("config.lambda_parametrization"));
}

TEST_CASE("MesaLayer: parametrisation, parameters, thread-count invariance, bad input", "[layers][mesa]") {
  mesaopt::MesaLayer<float> layer(mesa_config(40, 2, 32, 24, true, true, 0.95));
  layer.init(3, 0.2);
  check_parameter_views(layer, {"W_q", "W_k", "W_v", "W_o", "lambda_raw", "forget_raw"});

  SECTION("initial lambda = 1 (softplus), gamma = forget_init (sigmoid)") {
    for (long h = 0; h < 2; ++h) {
      CHECK(layer.lambda(h) == Approx(1.0f).epsilon(1e-6));
      CHECK(layer.forget(h) == Approx(0.95f).epsilon(1e-6));
    }
    CHECK(layer.lambda_raw()(0) == Approx(std::log(std::exp(1.0) - 1.0)));
    mesaopt::MesaLayer<double> fixed(mesa_config(5, 1, 2, 2, false, false, 0.5));
    CHECK(fixed.forget(0) == 0.5);
    std::vector<ParameterView<double>> params;
    fixed.parameters(params, "");
    CHECK(params.size() == 5);  // no forget_raw when the forget factor is fixed
    auto c = mesa_config(5, 1, 2, 2, false, false);
    c.lambda_init = 3.5;
    CHECK(mesaopt::MesaLayer<double>(c).lambda(0) == Approx(3.5).epsilon(1e-14));
  }
  SECTION("1 and 2 threads give identical bits") {
    check_thread_invariance(layer, 3, 200);
    mesaopt::MesaLayer<double> plain(mesa_config(40, 3, 20, 12, false, false));
    plain.init(8, 0.2);
    check_thread_invariance(plain, 2, 300);
  }
  SECTION("bad input throws") {
    check_bad_inputs(layer);
    auto bad = [](auto edit) {
      auto c = mesa_config(6, 2, 3, 3, false, false);
      edit(c);
      return mesaopt::MesaLayer<double>(c);
    };
    CHECK_THROWS_WITH(bad([](auto& c) { c.lambda_init = 0; }), Catch::Contains("config.lambda_init"));
    CHECK_THROWS_WITH(bad([](auto& c) { c.lambda_init = -2; }), Catch::Contains("config.lambda_init"));
    CHECK_THROWS_WITH(bad([](auto& c) { c.lambda_init = NAN; }), Catch::Contains("config.lambda_init"));
    CHECK_THROWS_WITH(bad([](auto& c) { c.forget_init = 0; }), Catch::Contains("config.forget_init"));
    CHECK_THROWS_WITH(bad([](auto& c) { c.forget_init = 1.5; }), Catch::Contains("config.forget_init"));
    CHECK_THROWS_WITH(bad([](auto& c) { c.learn_forget = true; }), Catch::Contains("config.forget_init"));  // 1
    CHECK_THROWS_WITH(bad([](auto& c) { c.chunk = -1; }), Catch::Contains("config.chunk"));
    CHECK_THROWS_WITH(bad([](auto& c) { c.d = 0; }), Catch::Contains("config.d "));
    CHECK_NOTHROW(bad([](auto& c) { c.forget_init = 1.0; }));
    // A regulariser driven out of range (e.g. by a diverged update) is caught
    // before the parallel region.
    const RowMatrix<float> x = random_matrix<float>(10, 40, 9, 1.0);
    mesaopt::MesaLayerCache<float> cache;
    layer.lambda_raw()(1) = -1000.0f;  // softplus underflows to 0
    CHECK_THROWS_WITH(layer.forward(x, 5, cache), Catch::Contains("lambda"));
    layer.lambda_raw()(1) = 0.5f;
    layer.forget_raw()(0) = -1000.0f;  // sigmoid underflows to 0
    CHECK_THROWS_WITH(layer.forward(x, 5, cache), Catch::Contains("forget"));
  }
}

// ===========================================================================
// Precision: the float layers against the same layers in double (weights cast
// from float, so both compute the same function), T = 512.

namespace {
template <class LayerF, class LayerD>
double float_vs_double(LayerF& lf, LayerD& ld, long B, long T) {
  std::vector<ParameterView<float>> pf;
  std::vector<ParameterView<double>> pd;
  lf.parameters(pf, "");
  ld.parameters(pd, "");
  REQUIRE(pf.size() == pd.size());
  for (std::size_t j = 0; j < pf.size(); ++j)
    for (std::size_t i = 0; i < pf[j].size; ++i) pd[j].value[i] = double(pf[j].value[i]);
  const RowMatrix<float> x = random_matrix<float>(B * T, lf.config().D, 21, 1.0);
  const RowMatrix<double> xd = x.cast<double>();
  typename LayerF::Cache cf;
  typename LayerD::Cache cd;
  const RowMatrix<float> yf = lf.forward(x, T, cf);
  const RowMatrix<double> yd = ld.forward(xd, T, cd);
  return relative_rms(yf, yd);
}
}  // namespace

TEST_CASE("Layers in float agree with double to the documented precision", "[layers][precision]") {
  const long B = 2, T = 512, D = 32, H = 2, d = 16, dv = 16;
  SECTION("linear, normalised q/k") {
    mesaopt::LinearAttentionLayer<float> lf(linear_config(D, H, d, dv, true));
    mesaopt::LinearAttentionLayer<double> ld(linear_config(D, H, d, dv, true));
    lf.init(1, 0.2);
    const double err = float_vs_double(lf, ld, B, T);
    INFO("relative rms " << err);
    CHECK(err < 1e-5);
  }
  SECTION("softmax") {
    mesaopt::SoftmaxAttentionLayer<float> lf(softmax_config(D, H, d, dv));
    mesaopt::SoftmaxAttentionLayer<double> ld(softmax_config(D, H, d, dv));
    lf.init(1, 0.2);
    const double err = float_vs_double(lf, ld, B, T);
    INFO("relative rms " << err);
    CHECK(err < 1e-5);
  }
  for (bool normalize : {false, true}) {
    DYNAMIC_SECTION("mesa, normalize_qk = " << normalize) {
      mesaopt::MesaLayer<float> lf(mesa_config(D, H, d, dv, normalize, false));
      mesaopt::MesaLayer<double> ld(mesa_config(D, H, d, dv, normalize, false));
      lf.init(1, 0.2);
      const double err = float_vs_double(lf, ld, B, T);
      INFO("relative rms " << err);
      CHECK(err < 1e-4);
    }
  }
}

}  // namespace mesaopt_test_layers
