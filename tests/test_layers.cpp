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

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

using mesaopt::ParameterView;
using mesaopt::RowMatrix;
using mesaopt::test::random_matrix;
using mesaopt::test::relative_rms;

namespace {

// ---------------------------------------------------------------------------
// Naive per-head references (one sequence, one head), written independently
// of the ops: direct sums over i <= t.

// MATH.md M1-M2: o_t = sum_{i<=t} v_i (k_i . q_t).
RowMatrix<double> naive_linear(const RowMatrix<double>& q, const RowMatrix<double>& k, const RowMatrix<double>& v) {
  RowMatrix<double> o = RowMatrix<double>::Zero(q.rows(), v.cols());
  for (long t = 0; t < q.rows(); ++t)
    for (long i = 0; i <= t; ++i) o.row(t) += k.row(i).dot(q.row(t)) * v.row(i);
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
    CHECK(layer.W_q() != layer.W_k());  // tensors draw from different streams
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
