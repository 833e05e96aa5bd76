// Tests for the nn building blocks: every backward against central finite
// differences in double (tests/gradcheck.hpp) for every input and parameter,
// forwards against closed forms, the seeded generator, and bad input.
#include <catch2/catch.hpp>

#include <mesaopt/nn.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_nn {

using namespace mesaopt;
using mesaopt::test::check_gradient;
using mesaopt::test::random_matrix;

namespace {

constexpr long kRows = 19;  // awkward sizes: not multiples of any SIMD width
constexpr long kIn = 11;

// Checks d(sum(y .* w))/d(buffer) for one parameter buffer of `size` doubles.
template <class Loss>
void check_buffer(const char* name, Loss&& loss, double* value, const double* grad, std::size_t size) {
  const auto r = check_gradient(loss, value, grad, size);
  INFO(r.describe(name));
  CHECK(r.error < 1e-6);
}

double weighted_sum(const RowMatrix<double>& y, const RowMatrix<double>& w) { return (y.array() * w.array()).sum(); }

}  // namespace

TEST_CASE("SplitMix64 matches the reference sequence and gives standard normals") {
  // Reference values of splitmix64 (Vigna's splitmix64.c) from state 0.
  nn::SplitMix64 g(0);
  CHECK(g.next() == 0xe220a8397b1dcdafULL);
  CHECK(g.next() == 0x6e789e6aa1b965f4ULL);
  CHECK(g.next() == 0x06c45d188009454fULL);

  nn::SplitMix64 a(42), b(42), c(43);
  for (int i = 0; i < 100; ++i) {
    const double x = a.normal();
    CHECK(x == b.normal());  // same seed, same stream
    (void)c;
  }
  nn::SplitMix64 d(42), e(43);
  bool differ = false;
  for (int i = 0; i < 10; ++i) differ |= d.normal() != e.normal();
  CHECK(differ);

  // Moments of 200k draws: mean 0 +- 5 sigma/sqrt(n), variance 1, kurtosis 3.
  nn::SplitMix64 s(7);
  const int n = 200000;
  double m1 = 0, m2 = 0, m4 = 0;
  double u_mean = 0;
  for (int i = 0; i < n; ++i) {
    const double x = s.normal();
    m1 += x;
    m2 += x * x;
    m4 += x * x * x * x;
  }
  for (int i = 0; i < n; ++i) {
    const double u = s.uniform01();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    u_mean += u;
  }
  m1 /= n;
  m2 /= n;
  m4 /= n;
  CHECK(std::abs(m1) < 5.0 / std::sqrt(double(n)));
  CHECK(std::abs(m2 - 1.0) < 5.0 * std::sqrt(2.0 / n));
  CHECK(std::abs(m4 - 3.0) < 0.1);
  CHECK(std::abs(u_mean / n - 0.5) < 5.0 * std::sqrt(1.0 / 12.0 / n));
}

TEST_CASE("Dense forward matches loops, init is seeded, backward passes finite differences") {
  for (bool bias : {true, false}) {
    DYNAMIC_SECTION("bias " << bias) {
      const long out = 7;
      nn::Dense<double> layer({kIn, out, bias});
      nn::SplitMix64 rng(1);
      layer.init(rng, 0.5);
      // init: same seed gives the same weights, and they are not all zero
      nn::Dense<double> again({kIn, out, bias});
      nn::SplitMix64 rng2(1);
      again.init(rng2, 0.5);
      CHECK(layer.weight == again.weight);
      CHECK(layer.weight.norm() > 0);
      if (bias) layer.bias = random_matrix<double>(out, 1, 5);

      RowMatrix<double> x = random_matrix<double>(kRows, kIn, 2);
      const RowMatrix<double> w = random_matrix<double>(kRows, out, 3);
      RowMatrix<double> y(kRows, out);
      nn::DenseCache<double> cache;
      layer.forward(x, y, cache);
      for (long r = 0; r < kRows; ++r)
        for (long j = 0; j < out; ++j) {
          double ref = bias ? layer.bias(j) : 0.0;
          for (long k = 0; k < kIn; ++k) ref += x(r, k) * layer.weight(j, k);
          REQUIRE(y(r, j) == Approx(ref).epsilon(1e-12));
        }

      std::vector<ParameterView<double>> params;
      layer.parameters(params, "embed.");
      REQUIRE(params.size() == (bias ? 2u : 1u));
      CHECK(params[0].name == "embed.weight");
      CHECK(params[0].shape == std::vector<long>{out, kIn});
      zero_grad(params);
      RowMatrix<double> dx(kRows, kIn);
      layer.backward(w, cache, dx);
      auto loss = [&] {
        nn::DenseCache<double> c;
        RowMatrix<double> yy(kRows, out);
        layer.forward(x, yy, c);
        return weighted_sum(yy, w);
      };
      check_buffer("dx", loss, x.data(), dx.data(), x.size());
      for (const auto& p : params) check_buffer(p.name.c_str(), loss, p.value, p.grad, p.size);

      // backward ADDS into the gradients; the params-only overload agrees
      const RowMatrix<double> first = layer.weight_grad;
      layer.backward(w, cache);
      CHECK((layer.weight_grad - 2 * first).norm() < 1e-12 * first.norm());
    }
  }
}

TEST_CASE("LayerNorm normalises rows and its backward passes finite differences") {
  nn::LayerNorm<double> ln({kIn, 1e-5});
  RowMatrix<double> x = random_matrix<double>(kRows, kIn, 11, 3.0);
  x.array() += 5.0;  // a large mean must not matter
  RowMatrix<double> y(kRows, kIn);
  nn::LayerNormCache<double> cache;
  ln.forward(x, y, cache);  // g = 1, b = 0
  for (long r = 0; r < kRows; ++r) {
    const double mean = y.row(r).mean();
    const double var = (y.row(r).array() - mean).square().mean();
    CHECK(std::abs(mean) < 1e-12);
    const double xv = (x.row(r).array() - x.row(r).mean()).square().mean();
    CHECK(var == Approx(xv / (xv + 1e-5)).epsilon(1e-12));
  }

  ln.gain = random_matrix<double>(kIn, 1, 12);
  ln.bias = random_matrix<double>(kIn, 1, 13);
  const RowMatrix<double> w = random_matrix<double>(kRows, kIn, 14);
  ln.forward(x, y, cache);
  std::vector<ParameterView<double>> params;
  ln.parameters(params, "ln.");
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "ln.gain");
  zero_grad(params);
  RowMatrix<double> dx(kRows, kIn);
  ln.backward(w, cache, dx);
  auto loss = [&] {
    nn::LayerNormCache<double> c;
    RowMatrix<double> yy(kRows, kIn);
    ln.forward(x, yy, c);
    return weighted_sum(yy, w);
  };
  check_buffer("dx", loss, x.data(), dx.data(), x.size());
  for (const auto& p : params) check_buffer(p.name.c_str(), loss, p.value, p.grad, p.size);
}

TEST_CASE("GELU (tanh approximation) matches known values and finite differences") {
  RowMatrix<double> pts(1, 3);
  pts << 1.0, -1.0, 0.0;
  RowMatrix<double> out(1, 3);
  nn::GeluCache<double> c0;
  nn::gelu_forward<double>(pts, out, c0);
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) at x = 1: 0.8411919906082768
  CHECK(out(0, 0) == Approx(0.8411919906082768).epsilon(1e-14));
  CHECK(out(0, 1) == Approx(-0.15880800939172324).epsilon(1e-14));
  CHECK(out(0, 2) == 0.0);

  RowMatrix<double> x = random_matrix<double>(kRows, kIn, 21, 2.0);
  const RowMatrix<double> w = random_matrix<double>(kRows, kIn, 22);
  RowMatrix<double> y(kRows, kIn), dx(kRows, kIn);
  nn::GeluCache<double> cache;
  nn::gelu_forward<double>(x, y, cache);
  nn::gelu_backward<double>(w, cache, dx);
  auto loss = [&] {
    nn::GeluCache<double> c;
    RowMatrix<double> yy(kRows, kIn);
    nn::gelu_forward<double>(x, yy, c);
    return weighted_sum(yy, w);
  };
  check_buffer("dx", loss, x.data(), dx.data(), x.size());
}

TEST_CASE("MLP and the pre-LN residual MLP block pass finite differences") {
  const long hidden = 13;
  SECTION("Mlp") {
    nn::Mlp<double> mlp({kIn, hidden, true});
    nn::SplitMix64 rng(31);
    mlp.init(rng, 0.4);
    mlp.fc1.bias = random_matrix<double>(hidden, 1, 32, 0.3);
    mlp.fc2.bias = random_matrix<double>(kIn, 1, 33, 0.3);
    RowMatrix<double> x = random_matrix<double>(kRows, kIn, 34);
    const RowMatrix<double> w = random_matrix<double>(kRows, kIn, 35);
    RowMatrix<double> y(kRows, kIn), dx(kRows, kIn);
    nn::MlpCache<double> cache;
    mlp.forward(x, y, cache);
    // closed form: fc2(gelu(fc1(x)))
    RowMatrix<double> h = (x * mlp.fc1.weight.transpose()).rowwise() + mlp.fc1.bias.transpose();
    for (long i = 0; i < h.size(); ++i) {
      const double v = h.data()[i];
      h.data()[i] = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    }
    const RowMatrix<double> ref = (h * mlp.fc2.weight.transpose()).rowwise() + mlp.fc2.bias.transpose();
    CHECK(test::relative_rms(y, ref) < 1e-14);

    std::vector<ParameterView<double>> params;
    mlp.parameters(params, "mlp.");
    REQUIRE(params.size() == 4);
    CHECK(params[2].name == "mlp.fc2.weight");
    zero_grad(params);
    mlp.backward(w, cache, dx);
    auto loss = [&] {
      nn::MlpCache<double> c;
      RowMatrix<double> yy(kRows, kIn);
      mlp.forward(x, yy, c);
      return weighted_sum(yy, w);
    };
    check_buffer("dx", loss, x.data(), dx.data(), x.size());
    for (const auto& p : params) check_buffer(p.name.c_str(), loss, p.value, p.grad, p.size);
  }
  SECTION("PreLnMlp: y = x + MLP(LN(x))") {
    nn::PreLnMlp<double> block({kIn, hidden, true, 1e-5});
    nn::SplitMix64 rng(41);
    block.init(rng, 0.4);
    block.ln.gain = random_matrix<double>(kIn, 1, 42);
    block.ln.bias = random_matrix<double>(kIn, 1, 43);
    block.mlp.fc1.bias = random_matrix<double>(hidden, 1, 44, 0.3);
    RowMatrix<double> x = random_matrix<double>(kRows, kIn, 45);
    const RowMatrix<double> w = random_matrix<double>(kRows, kIn, 46);
    RowMatrix<double> y(kRows, kIn), dx(kRows, kIn), u(kRows, kIn), z(kRows, kIn);
    nn::PreLnMlpCache<double> cache;
    block.forward(x, y, cache);
    nn::LayerNormCache<double> lc;
    nn::MlpCache<double> mc;
    block.ln.forward(x, u, lc);
    block.mlp.forward(u, z, mc);
    CHECK(test::relative_rms(y, RowMatrix<double>(x + z)) < 1e-15);

    std::vector<ParameterView<double>> params;
    block.parameters(params, "block0.");
    REQUIRE(params.size() == 6);
    CHECK(params[0].name == "block0.ln.gain");
    CHECK(params[5].name == "block0.mlp.fc2.bias");
    zero_grad(params);
    block.backward(w, cache, dx);
    auto loss = [&] {
      nn::PreLnMlpCache<double> c;
      RowMatrix<double> yy(kRows, kIn);
      block.forward(x, yy, c);
      return weighted_sum(yy, w);
    };
    check_buffer("dx", loss, x.data(), dx.data(), x.size());
    for (const auto& p : params) check_buffer(p.name.c_str(), loss, p.value, p.grad, p.size);
  }
}

TEST_CASE("Sinusoidal encoding matches its formula, concat and split are exact") {
  const long T = 7, B = 3, D = kIn, p = 6;
  const RowMatrix<double> pe = nn::sinusoidal_encoding<double>(T, p);
  for (long t = 0; t < T; ++t)
    for (long i = 0; i < p / 2; ++i) {
      const double angle = t / std::pow(10000.0, 2.0 * i / p);
      CHECK(pe(t, 2 * i) == Approx(std::sin(angle)).epsilon(1e-15).margin(1e-15));
      CHECK(pe(t, 2 * i + 1) == Approx(std::cos(angle)).epsilon(1e-15).margin(1e-15));
    }
  // odd width: last column is a sine
  const RowMatrix<double> pe5 = nn::sinusoidal_encoding<double>(T, 5);
  CHECK(pe5(3, 4) == Approx(std::sin(3 / std::pow(10000.0, 4.0 / 5))).epsilon(1e-15));

  RowMatrix<double> x = random_matrix<double>(B * T, D, 51);
  RowMatrix<double> out(B * T, D + p);
  nn::positional_concat_forward<double>(x, pe, out);
  for (long b = 0; b < B; ++b)
    for (long t = 0; t < T; ++t) {
      CHECK(out.row(b * T + t).head(D) == x.row(b * T + t));
      CHECK(out.row(b * T + t).tail(p) == pe.row(t));
    }
  const RowMatrix<double> w = random_matrix<double>(B * T, D + p, 52);
  RowMatrix<double> dx(B * T, D);
  nn::positional_concat_backward<double>(w, dx);
  auto loss = [&] {
    RowMatrix<double> o(B * T, D + p);
    nn::positional_concat_forward<double>(x, pe, o);
    return weighted_sum(o, w);
  };
  check_buffer("dx", loss, x.data(), dx.data(), x.size());

  RowMatrix<double> bad(B * T + 1, D), badout(B * T + 1, D + p);
  CHECK_THROWS_AS(nn::positional_concat_forward<double>(bad, pe, badout), std::invalid_argument);
  CHECK_THROWS_AS(nn::sinusoidal_encoding<double>(0, 4), std::invalid_argument);
}

TEST_CASE("Activation clipping to +-c and its backward") {
  const double c = 1.5;
  RowMatrix<double> x = random_matrix<double>(kRows, kIn, 61, 2.0);
  // keep finite differences away from the kinks at +-c
  for (long i = 0; i < x.size(); ++i)
    if (std::abs(std::abs(x.data()[i]) - c) < 1e-3) x.data()[i] += 0.01;
  const RowMatrix<double> w = random_matrix<double>(kRows, kIn, 62);
  RowMatrix<double> y(kRows, kIn), dx(kRows, kIn);
  nn::ClipCache<double> cache;
  nn::clip_forward<double>(x, c, y, cache);
  long clipped = 0;
  for (long i = 0; i < x.size(); ++i) {
    const double v = x.data()[i];
    CHECK(y.data()[i] == std::min(std::max(v, -c), c));
    clipped += std::abs(v) > c;
  }
  CHECK(clipped > 10);                 // the test exercises both sides
  CHECK(clipped < x.size() - 10);
  nn::clip_backward<double>(w, cache, dx);
  for (long i = 0; i < x.size(); ++i) CHECK(dx.data()[i] == (std::abs(x.data()[i]) > c ? 0.0 : w.data()[i]));
  auto loss = [&] {
    nn::ClipCache<double> cc;
    RowMatrix<double> yy(kRows, kIn);
    nn::clip_forward<double>(x, c, yy, cc);
    return weighted_sum(yy, w);
  };
  check_buffer("dx", loss, x.data(), dx.data(), x.size());
  // The backward in place (dy and dx one matrix, as the model calls it).
  RowMatrix<double> g_in_place = w;
  nn::clip_backward<double>(g_in_place, cache, g_in_place);
  CHECK(g_in_place == dx);

  // in place and float
  RowMatrix<float> xf = x.cast<float>();
  nn::ClipCache<float> cf;
  nn::clip_forward<float>(xf, 4.0, xf, cf);
  CHECK(xf.maxCoeff() <= 4.0f);
  CHECK_THROWS_AS(nn::clip_forward<double>(x, 0.0, y, cache), std::invalid_argument);

  // NaN stays NaN and passes no gradient; row strides past the row (column
  // blocks of wider matrices), entries outside the blocks untouched.
  RowMatrix<double> wide = RowMatrix<double>::Constant(3, 7, 0.5);
  wide(0, 1) = std::numeric_limits<double>::quiet_NaN();
  wide(1, 2) = 9.0;
  wide(2, 3) = -9.0;
  RowMatrix<double> out = RowMatrix<double>::Constant(3, 9, 7.0);
  nn::ClipCache<double> cn;
  nn::clip_forward<double>(wide.middleCols(1, 4), c, out.middleCols(2, 4), cn);
  CHECK(std::isnan(out(0, 2)));
  CHECK(out(1, 3) == c);
  CHECK(out(2, 4) == -c);
  CHECK(out(0, 3) == 0.5);
  CHECK(out(2, 5) == 0.5);
  for (long r = 0; r < 3; ++r)
    for (long j : {0L, 1L, 6L, 7L, 8L}) CHECK(out(r, j) == 7.0);
  const RowMatrix<double> g = RowMatrix<double>::Constant(3, 6, 1.0);
  RowMatrix<double> dxn = RowMatrix<double>::Constant(3, 8, 5.0);
  nn::clip_backward<double>(g.middleCols(1, 4), cn, dxn.middleCols(2, 4));
  CHECK(dxn(0, 2) == 0.0);
  CHECK(dxn(1, 3) == 0.0);
  CHECK(dxn(2, 4) == 0.0);
  CHECK(dxn(0, 3) == 1.0);
  CHECK(dxn(2, 5) == 1.0);
  for (long r = 0; r < 3; ++r)
    for (long j : {0L, 1L, 6L, 7L}) CHECK(dxn(r, j) == 5.0);
}

TEST_CASE("float blocks agree with double") {
  const long hidden = 9;
  nn::PreLnMlp<double> bd({kIn, hidden, true, 1e-5});
  nn::PreLnMlp<float> bf({kIn, hidden, true, 1e-5});
  nn::SplitMix64 r1(5), r2(5);
  bd.init(r1, 0.3);
  bf.init(r2, 0.3);
  CHECK(bf.mlp.fc1.weight == bd.mlp.fc1.weight.cast<float>());  // same draws, rounded
  const RowMatrix<double> x = random_matrix<double>(kRows, kIn, 71);
  const RowMatrix<double> w = random_matrix<double>(kRows, kIn, 72);
  RowMatrix<double> yd(kRows, kIn), dxd(kRows, kIn);
  RowMatrix<float> yf(kRows, kIn), dxf(kRows, kIn);
  nn::PreLnMlpCache<double> cd;
  nn::PreLnMlpCache<float> cf;
  bd.forward(x, yd, cd);
  bf.forward(x.cast<float>(), yf, cf);
  bd.backward(w, cd, dxd);
  bf.backward(w.cast<float>(), cf, dxf);
  CHECK(test::relative_rms(yf, yd) < 1e-5);
  CHECK(test::relative_rms(dxf, dxd) < 1e-5);
  CHECK(test::relative_rms(bf.mlp.fc1.weight_grad, bd.mlp.fc1.weight_grad) < 1e-5);
}

TEST_CASE("nn entry points reject bad shapes and sizes") {
  CHECK_THROWS_AS(nn::Dense<double>({0, 3, true}), std::invalid_argument);
  CHECK_THROWS_AS(nn::LayerNorm<double>({4, 0.0}), std::invalid_argument);
  CHECK_THROWS_AS(nn::Mlp<double>({4, 0, true}), std::invalid_argument);
  nn::Dense<double> d({4, 3, true});
  nn::DenseCache<double> c;
  RowMatrix<double> x(5, 4), y(5, 3), wrong(5, 2);
  x.setOnes();
  try {
    d.forward(RowMatrix<double>(5, 6), y, c);
    FAIL("no throw");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("x.cols()") != std::string::npos);
  }
  CHECK_THROWS_AS(d.forward(x, wrong, c), std::invalid_argument);
  d.forward(x, y, c);
  RowMatrix<double> dx(5, 4);
  CHECK_THROWS_AS(d.backward(wrong, c, dx), std::invalid_argument);
  RowMatrix<double> dx_wrong(4, 4);
  CHECK_THROWS_AS(d.backward(y, c, dx_wrong), std::invalid_argument);
  nn::DenseCache<double> empty;
  CHECK_THROWS_AS(d.backward(y, empty, dx), std::invalid_argument);
  nn::SplitMix64 rng(1);
  CHECK_THROWS_AS(d.init(rng, -1.0), std::invalid_argument);
  nn::LayerNorm<double> ln({4, 1e-5});
  nn::LayerNormCache<double> lc;
  CHECK_THROWS_AS(ln.forward(y, y, lc), std::invalid_argument);
  nn::GeluCache<double> gc;
  CHECK_THROWS_AS(nn::gelu_forward<double>(x, y, gc), std::invalid_argument);
}

}  // namespace mesaopt_test_nn
