// The multi-head layers' carried state (docs/math.md §6, layers/multi_head_attention.hpp):
// - a batch of sequences split in time, with the per-(batch, head) final state
//   of one piece passed as the initial state of the next, gives the whole
//   forward's outputs and final state; so does step() token by token;
// - chaining backward passes over the pieces (grad_initial of a piece as
//   grad_final of the piece before) gives the whole sequence's dx and
//   parameter gradients (double);
// - a cache made by a layer of another head split, and states of the wrong
//   batch, are rejected with std::invalid_argument.
#include <catch2/catch.hpp>
#include <mesaopt/layers.hpp>
#include <mesaopt/nn/model.hpp>

#include "test_util.hpp"

#include <string>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_layer_state {

using mesaopt::ParameterView;
using mesaopt::RowMatrix;
using mesaopt::test::random_matrix;
using mesaopt::test::relative_rms;

namespace {

// Rows [s, s + len) of every sequence of x (B*T, D): (B*len, D), sequence-major.
template <class T>
RowMatrix<T> time_slice(const RowMatrix<T>& x, long seq_len, long s, long len) {
  const long B = x.rows() / seq_len;
  RowMatrix<T> out(B * len, x.cols());
  for (long b = 0; b < B; ++b) out.middleRows(b * len, len) = x.middleRows(b * seq_len + s, len);
  return out;
}

// Writes piece (B*len, D) back into rows [s, s + len) of every sequence of x.
template <class T>
void put_time_slice(RowMatrix<T>& x, long seq_len, long s, long len, const RowMatrix<T>& piece) {
  const long B = x.rows() / seq_len;
  for (long b = 0; b < B; ++b) x.middleRows(b * seq_len + s, len) = piece.middleRows(b * len, len);
}

template <class T>
mesaopt::LinearAttentionLayer<T> make_linear() {
  mesaopt::LinearAttentionLayerConfig c;
  c.D = 11;
  c.H = 2;
  c.d = 5;
  c.dv = 4;
  c.normalize_qk = true;
  mesaopt::LinearAttentionLayer<T> layer(c);
  layer.init(1, 0.3);
  return layer;
}
template <class T>
mesaopt::SoftmaxAttentionLayer<T> make_softmax() {
  mesaopt::SoftmaxAttentionLayerConfig c;
  c.D = 11;
  c.H = 2;
  c.d = 5;
  c.dv = 4;
  mesaopt::SoftmaxAttentionLayer<T> layer(c);
  layer.init(2, 0.3);
  return layer;
}
template <class T>
mesaopt::MesaLayer<T> make_mesa() {
  mesaopt::MesaLayerConfig c;
  c.D = 11;
  c.H = 2;
  c.d = 5;
  c.dv = 4;
  c.learn_forget = true;
  c.forget_init = 0.9;
  c.chunk = 3;
  mesaopt::MesaLayer<T> layer(c);
  layer.init(3, 0.3);
  return layer;
}

template <class Layer>
double state_difference(const typename Layer::State& a, const typename Layer::State& b) {
  REQUIRE(a.items.size() == b.items.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.items.size(); ++i) {
    if constexpr (std::is_same_v<typename Layer::State, mesaopt::MultiHeadState<mesaopt::MesaState<typename Layer::Scalar>>>) {
      worst = std::max({worst, relative_rms(a.items[i].R, b.items[i].R), relative_rms(a.items[i].S, b.items[i].S)});
    } else if constexpr (std::is_same_v<typename Layer::State,
                                        mesaopt::MultiHeadState<mesaopt::LinearAttentionState<typename Layer::Scalar>>>) {
      worst = std::max(worst, relative_rms(a.items[i].S, b.items[i].S));
    } else {
      REQUIRE(a.items[i].length() == b.items[i].length());
      worst = std::max({worst, relative_rms(a.items[i].keys(), b.items[i].keys()),
                        relative_rms(a.items[i].values(), b.items[i].values())});
    }
  }
  return worst;
}

template <class Layer>
void check_layer_split_and_step(Layer layer, double tol) {
  using T = typename Layer::Scalar;
  const long B = 2, n = 20, D = layer.config().D;
  const RowMatrix<T> x = random_matrix<T>(B * n, D, 41, 1.0);
  typename Layer::Cache cache;
  typename Layer::State whole_final;
  const RowMatrix<T> y = layer.forward(x, n, cache, nullptr, &whole_final);
  // Pieces [0, 7), [7, 8), [8, 20), the state carried in place.
  RowMatrix<T> y_pieces(B * n, D);
  typename Layer::State s = layer.initial_state(B);
  for (const auto& [s0, len] : std::vector<std::pair<long, long>>{{0, 7}, {7, 1}, {8, 12}}) {
    typename Layer::Cache c;
    const RowMatrix<T> piece = layer.forward(time_slice(x, n, s0, len), len, c, &s, &s);
    put_time_slice(y_pieces, n, s0, len, piece);
  }
  INFO(Layer::kName);
  CHECK(relative_rms(y_pieces, y) < tol);
  CHECK(state_difference<Layer>(s, whole_final) < tol);
  // Token by token.
  typename Layer::State st = layer.initial_state(B);
  RowMatrix<T> y_steps(B * n, D), y_t(B, D);
  for (long t = 0; t < n; ++t) {
    layer.step(time_slice(x, n, t, 1), st, y_t);
    put_time_slice(y_steps, n, t, 1, y_t);
  }
  CHECK(relative_rms(y_steps, y) < tol);
  CHECK(state_difference<Layer>(st, whole_final) < tol);
  CHECK(y.norm() > 0);
}

// Backward over two pieces, chained through the state's gradient, against the whole.
template <class Layer>
void check_layer_chained_backward(Layer layer, long cut) {
  using T = double;
  const long B = 2, n = 16, D = layer.config().D, n2 = n - cut;
  const RowMatrix<T> x = random_matrix<T>(B * n, D, 51, 1.0);
  const RowMatrix<T> dy = random_matrix<T>(B * n, D, 52, 1.0);
  std::vector<ParameterView<T>> params;
  layer.parameters(params, "");
  auto grads = [&] {
    std::vector<std::vector<T>> g;
    for (const auto& p : params) g.emplace_back(p.grad, p.grad + p.size);
    return g;
  };
  // Whole.
  mesaopt::zero_grad(params);
  typename Layer::Cache c;
  layer.forward(x, n, c);
  RowMatrix<T> dx(B * n, D);
  layer.backward(x, n, dy, c, dx);
  const auto g_whole = grads();
  // Pieces.
  mesaopt::zero_grad(params);
  const RowMatrix<T> x1 = time_slice(x, n, 0, cut), x2 = time_slice(x, n, cut, n2);
  typename Layer::Cache c1, c2;
  typename Layer::State s1, grad_s1;
  layer.forward(x1, cut, c1, nullptr, &s1);
  layer.forward(x2, n2, c2, &s1);
  RowMatrix<T> dx1(B * cut, D), dx2(B * n2, D), dx_pieces(B * n, D);
  layer.backward(x2, n2, time_slice(dy, n, cut, n2), c2, dx2, nullptr, &grad_s1);
  layer.backward(x1, cut, time_slice(dy, n, 0, cut), c1, dx1, &grad_s1);
  put_time_slice(dx_pieces, n, 0, cut, dx1);
  put_time_slice(dx_pieces, n, cut, n2, dx2);
  const auto g_pieces = grads();
  INFO(Layer::kName << " cut " << cut);
  CHECK(relative_rms(dx_pieces, dx) < 1e-11);
  for (std::size_t j = 0; j < params.size(); ++j) {
    INFO(params[j].name);
    const Eigen::Map<const Eigen::VectorXd> a(g_pieces[j].data(), Eigen::Index(g_pieces[j].size()));
    const Eigen::Map<const Eigen::VectorXd> b(g_whole[j].data(), Eigen::Index(g_whole[j].size()));
    CHECK(relative_rms(a, b) < 1e-11);
    CHECK(b.norm() > 0);
  }
}

template <class Layer>
void check_layer_state_errors(Layer layer) {
  using T = typename Layer::Scalar;
  const long B = 2, n = 5, D = layer.config().D;
  const RowMatrix<T> x = random_matrix<T>(B * n, D, 61, 1.0);
  typename Layer::Cache cache;
  RowMatrix<T> y(B * n, D), dx(B * n, D);
  const typename Layer::State three = layer.initial_state(3);
  CHECK_THROWS_WITH(layer.forward(x, n, cache, y, &three), Catch::Contains("initial holds B = 3"));
  RowMatrix<T> y_t(B, D);
  typename Layer::State st = layer.initial_state(3);
  CHECK_THROWS_WITH(layer.step(time_slice(x, n, 0, 1), st, y_t), Catch::Contains("state holds B = 3"));
  layer.forward(x, n, cache, y);
  CHECK_THROWS_WITH(layer.backward(x, n, y, cache, dx, &three), Catch::Contains("grad_final holds B = 3"));
  CHECK_THROWS_AS(layer.initial_state(0), std::invalid_argument);
}

}  // namespace

TEMPLATE_TEST_CASE("layers: a split batch and token-by-token steps give the whole forward", "[layers][state]", float,
                   double) {
  const double tol = std::is_same_v<TestType, float> ? 3e-5 : 1e-12;
  check_layer_split_and_step(make_linear<TestType>(), tol);
  check_layer_split_and_step(make_softmax<TestType>(), tol);
  check_layer_split_and_step(make_mesa<TestType>(), tol);
}

TEST_CASE("layers: chained backward over pieces gives the whole sequence's gradients", "[layers][state][grad]") {
  for (long cut : {1L, 6L, 15L}) {
    check_layer_chained_backward(make_linear<double>(), cut);
    check_layer_chained_backward(make_softmax<double>(), cut);
    check_layer_chained_backward(make_mesa<double>(), cut);
  }
}

TEST_CASE("layers: states of another batch are rejected", "[layers][state][errors]") {
  check_layer_state_errors(make_linear<double>());
  check_layer_state_errors(make_softmax<double>());
  check_layer_state_errors(make_mesa<double>());
}

TEST_CASE("layers: a cache from a layer with another head split is rejected, not read out of bounds",
          "[layers][errors]") {
  // Same D, B and T; H x d differs, so the cache's buffers have other widths.
  auto config = [](long H, long d, long dv) {
    mesaopt::MesaLayerConfig c;
    c.D = 12;
    c.H = H;
    c.d = d;
    c.dv = dv;
    return c;
  };
  mesaopt::MesaLayer<double> a(config(2, 3, 3)), b(config(3, 2, 2)), c3(config(2, 3, 4));
  a.init(1, 0.3);
  b.init(2, 0.3);
  c3.init(3, 0.3);
  const RowMatrix<double> x = random_matrix<double>(2 * 6, 12, 7, 1.0);
  RowMatrix<double> dx(12, 12);
  mesaopt::MesaLayerCache<double> cache;
  a.forward(x, 6, cache);
  CHECK_THROWS_WITH(b.backward(x, 6, x, cache, dx), Catch::Contains("cache was made by a layer with H = 2, d = 3"));
  CHECK_THROWS_WITH(c3.backward(x, 6, x, cache, dx), Catch::Contains("dv = 3"));
  CHECK_NOTHROW(a.backward(x, 6, x, cache, dx));

  mesaopt::LinearAttentionLayerConfig lc;
  lc.D = 12;
  lc.H = 2;
  lc.d = 3;
  lc.dv = 3;
  mesaopt::LinearAttentionLayer<double> plain(lc);
  lc.normalize_qk = true;
  mesaopt::LinearAttentionLayer<double> normalized(lc);
  mesaopt::LinearAttentionLayerCache<double> lcache;
  plain.forward(x, 6, lcache);
  CHECK_THROWS_WITH(normalized.backward(x, 6, x, lcache, dx), Catch::Contains("normalize_qk = 0"));
  // A cache whose buffers were changed after the forward.
  lcache.o.resize(12, 2);
  CHECK_THROWS_WITH(plain.backward(x, 6, x, lcache, dx), Catch::Contains("do not match"));
}

TEST_CASE("softmax layer and Model: a cache of another configuration is rejected, not read out of bounds",
          "[layers][errors][model]") {
  const RowMatrix<double> x = random_matrix<double>(2 * 6, 12, 8, 1.0);
  RowMatrix<double> dx(12, 12);
  mesaopt::SoftmaxAttentionLayerConfig sc;
  sc.D = 12;
  sc.H = 2;
  sc.d = 3;
  sc.dv = 3;
  mesaopt::SoftmaxAttentionLayer<double> a(sc);
  sc.H = 3;
  sc.d = 2;
  sc.dv = 2;
  mesaopt::SoftmaxAttentionLayer<double> b(sc);
  a.init(1, 0.3);
  b.init(2, 0.3);
  mesaopt::SoftmaxAttentionLayerCache<double> cache;
  a.forward(x, 6, cache);
  CHECK_THROWS_WITH(b.backward(x, 6, x, cache, dx), Catch::Contains("cache was made by a layer with H = 2, d = 3"));
  CHECK_NOTHROW(a.backward(x, 6, x, cache, dx));

  // Models with the same width, batch and length whose blocks differ.
  namespace nn = mesaopt::nn;
  auto model_config = [](nn::AttentionKind kind, long heads, long key_size, long mlp_hidden) {
    nn::ModelConfig c;
    c.input_dim = 5;
    c.width = 12;
    c.output_dim = 3;
    nn::BlockConfig blk;
    blk.attention = kind;
    blk.heads = heads;
    blk.key_size = blk.value_size = key_size;
    blk.mlp = true;
    blk.mlp_hidden = mlp_hidden;
    c.blocks = {blk, blk};
    return c;
  };
  const RowMatrix<double> in = random_matrix<double>(2 * 6, 5, 9, 1.0);
  const RowMatrix<double> dpred = random_matrix<double>(2 * 6, 3, 10, 1.0);
  for (auto kind : {nn::AttentionKind::linear, nn::AttentionKind::softmax, nn::AttentionKind::mesa}) {
    nn::Model<double> made(model_config(kind, 2, 3, 8));
    made.init(1, 0.3);
    nn::ModelCache<double> mc;
    made.forward(in, 6, mc);
    const auto other_kind = kind == nn::AttentionKind::mesa ? nn::AttentionKind::linear : nn::AttentionKind::mesa;
    for (const nn::ModelConfig& other :
         {model_config(kind, 3, 2, 8), model_config(kind, 2, 3, 16), model_config(other_kind, 2, 3, 8)}) {
      nn::Model<double> m(other);
      m.init(2, 0.3);
      INFO("made by " << nn::attention_kind_name(kind) << ", used by " << nn::attention_kind_name(other.blocks[0].attention)
                      << " heads " << other.blocks[0].heads << " mlp_hidden " << other.blocks[0].mlp_hidden);
      CHECK_THROWS_AS(m.backward(dpred, mc), std::invalid_argument);
    }
    CHECK_NOTHROW(made.backward(dpred, mc));
  }
}

}  // namespace mesaopt_test_layer_state
