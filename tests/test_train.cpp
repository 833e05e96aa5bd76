// Tests for the training pieces: the MSE loss (closed form and finite
// differences), Adam/AdamW against hand-computed updates, gradient clipping,
// schedules, safetensors checkpoints (round trip, layout, atomic write,
// corruption) and the progress line.
#include <catch2/catch.hpp>

#include <mesaopt/nn.hpp>
#include <mesaopt/train.hpp>

#include "gradcheck.hpp"
#include "scratch_files.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <dirent.h>
#include <unistd.h>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_train {

using namespace mesaopt;
using mesaopt::test::error_of;
using mesaopt::test::random_matrix;
using mesaopt::test::read_bytes;
using mesaopt::test::ScratchDir;

namespace {

void write_bytes(const std::string& path, const std::vector<char>& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(b.data(), static_cast<std::streamsize>(b.size()));
}


// A small "model": a Dense with bias and a LayerNorm (rank-2 and rank-1 tensors).
template <class T>
struct TinyModel {
  nn::Dense<T> dense{{5, 3, true}};
  nn::LayerNorm<T> ln{{3, 1e-5}};
  std::vector<ParameterView<T>> params;
  explicit TinyModel(std::uint64_t seed) {
    nn::SplitMix64 rng(seed);
    dense.init(rng, 0.7);
    dense.bias = random_matrix<T>(3, 1, seed + 1);
    ln.gain = random_matrix<T>(3, 1, seed + 2);
    ln.bias = random_matrix<T>(3, 1, seed + 3);
    dense.parameters(params, "embed.");
    ln.parameters(params, "ln.");
  }
  void random_grads(std::uint64_t seed) {
    std::mt19937_64 g(seed);
    std::normal_distribution<double> n(0, 1);
    for (auto& p : params)
      for (std::size_t i = 0; i < p.size; ++i) p.grad[i] = static_cast<T>(n(g));
  }
};

template <class T>
bool same_bits(const std::vector<ParameterView<T>>& a, const std::vector<ParameterView<T>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t k = 0; k < a.size(); ++k)
    if (a[k].size != b[k].size || std::memcmp(a[k].value, b[k].value, a[k].size * sizeof(T)) != 0) return false;
  return true;
}

// A safetensors file from a header text and a data buffer (header padded to 8).
std::vector<char> make_file(std::string header, const std::vector<char>& data) {
  while ((8 + header.size()) % 8) header += ' ';
  const std::uint64_t n = header.size();
  std::string out;
  for (int k = 0; k < 8; ++k) out += static_cast<char>((n >> (8 * k)) & 0xFF);
  out += header;
  out.append(data.data(), data.size());
  return std::vector<char>(out.begin(), out.end());
}


}  // namespace

// ---------------------------------------------------------------- loss

TEST_CASE("MSE loss: closed form, per-position curve, finite differences") {
  const long T = 7, B = 3, n = 5;
  RowMatrix<double> pred = random_matrix<double>(B * T, n, 1);
  RowMatrix<double> target = random_matrix<double>(B * T, n, 2);
  const train::MseLoss l = train::mse_loss_forward<double>(pred, target, T);
  REQUIRE(l.per_position.size() == std::size_t(T));
  double total = 0;
  for (long t = 0; t < T; ++t) {
    double pos = 0;
    for (long b = 0; b < B; ++b) pos += 0.5 * (pred.row(b * T + t) - target.row(b * T + t)).squaredNorm();
    CHECK(l.per_position[t] == Approx(pos / B).epsilon(1e-14));
    total += pos;
  }
  CHECK(l.loss == Approx(total / (B * T)).epsilon(1e-14));

  RowMatrix<double> dpred(B * T, n);
  train::mse_loss_backward<double>(pred, target, T, dpred);
  auto loss = [&] { return train::mse_loss_forward<double>(pred, target, T).loss; };
  auto r = test::check_gradient(loss, pred, dpred);
  INFO(r.describe("dpred"));
  CHECK(r.error < 1e-6);
  const RowMatrix<double> dtarget = -dpred;
  r = test::check_gradient(loss, target, dtarget);
  INFO(r.describe("dtarget"));
  CHECK(r.error < 1e-6);

  RowMatrix<double> wrong(B * T, n + 1);
  CHECK_THROWS_AS(train::mse_loss_forward<double>(pred, wrong, T), std::invalid_argument);
  CHECK_THROWS_AS(train::mse_loss_forward<double>(pred, target, 4), std::invalid_argument);  // 21 % 4 != 0
  CHECK_THROWS_AS(train::mse_loss_backward<double>(pred, target, T, wrong), std::invalid_argument);
}

// ---------------------------------------------------------------- optimiser

TEST_CASE("AdamW and Adam match hand-computed updates, the decay mask is respected") {
  const double lr = 0.01, wd = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  // Two tensors: a 2x2 matrix (decayed) and a vector (not decayed).
  std::vector<double> w = {0.5, -1.0, 2.0, 0.0}, wg(4), b = {1.0, -0.25, 3.0}, bg(3);
  std::vector<ParameterView<double>> params = {{"w", w.data(), wg.data(), 4, {2, 2}},
                                               {"b", b.data(), bg.data(), 3, {3}}};
  const auto mask = train::default_decay_mask(params);
  REQUIRE(mask == std::vector<bool>{true, false});

  SECTION("first AdamW step: theta - lr (g/(|g|+eps) + wd theta [decayed only])") {
    train::Adam<double> opt(params, train::adamw_config(wd), mask);
    wg = {0.3, -0.2, 0.0, 1e-3};
    bg = {-2.0, 0.0, 0.5};
    const std::vector<double> w0 = w, b0 = b;
    opt.step(lr);
    // step 1: mhat = g, vhat = g^2  =>  update = g / (|g| + eps)
    for (int i = 0; i < 4; ++i)
      CHECK(w[i] == Approx(w0[i] - lr * (wg[i] / (std::abs(wg[i]) + eps) + wd * w0[i])).epsilon(1e-14).margin(1e-16));
    for (int i = 0; i < 3; ++i)
      CHECK(b[i] == Approx(b0[i] - lr * (bg[i] / (std::abs(bg[i]) + eps))).epsilon(1e-14).margin(1e-16));
    // a zero gradient moves a decayed entry only by the decay, an undecayed one not at all
    CHECK(w[2] == Approx(2.0 * (1 - lr * wd)).epsilon(1e-15));
    CHECK(b[1] == -0.25);
    CHECK(opt.step_count() == 1);
  }

  SECTION("first Adam (coupled L2) step: g' = g + wd theta") {
    train::AdamConfig c;
    c.weight_decay = wd;
    c.decoupled_weight_decay = false;
    train::Adam<double> opt(params, c, mask);
    wg = {0.3, -0.2, 0.0, 1e-3};
    bg = {-2.0, 0.0, 0.5};
    const std::vector<double> w0 = w, b0 = b;
    opt.step(lr);
    for (int i = 0; i < 4; ++i) {
      const double g = wg[i] + wd * w0[i];
      CHECK(w[i] == Approx(w0[i] - lr * g / (std::abs(g) + eps)).epsilon(1e-14).margin(1e-16));
    }
    for (int i = 0; i < 3; ++i)
      CHECK(b[i] == Approx(b0[i] - lr * bg[i] / (std::abs(bg[i]) + eps)).epsilon(1e-14).margin(1e-16));
    CHECK(w[2] == Approx(2.0 - lr * 0.2 / (0.2 + eps)).epsilon(1e-14));  // g' = wd*2: nearly a full lr step
  }

  SECTION("five AdamW steps against the formulas in plain doubles") {
    train::Adam<double> opt(params, train::adamw_config(wd), mask);
    double ref_w[4], ref_b[3], mw[4] = {}, vw[4] = {}, mb[3] = {}, vb[3] = {};
    for (int i = 0; i < 4; ++i) ref_w[i] = w[i];
    for (int i = 0; i < 3; ++i) ref_b[i] = b[i];
    for (int t = 1; t <= 5; ++t) {
      for (int i = 0; i < 4; ++i) wg[i] = std::sin(1.0 + i + 2.0 * t);
      for (int i = 0; i < 3; ++i) bg[i] = std::cos(0.5 * i - t);
      const double rate = lr * t;  // a changing lr, as a schedule gives
      opt.step(rate);
      for (int i = 0; i < 4; ++i) {
        mw[i] = b1 * mw[i] + (1 - b1) * wg[i];
        vw[i] = b2 * vw[i] + (1 - b2) * wg[i] * wg[i];
        const double mhat = mw[i] / (1 - std::pow(b1, t)), vhat = vw[i] / (1 - std::pow(b2, t));
        ref_w[i] -= rate * (mhat / (std::sqrt(vhat) + eps) + wd * ref_w[i]);
      }
      for (int i = 0; i < 3; ++i) {
        mb[i] = b1 * mb[i] + (1 - b1) * bg[i];
        vb[i] = b2 * vb[i] + (1 - b2) * bg[i] * bg[i];
        const double mhat = mb[i] / (1 - std::pow(b1, t)), vhat = vb[i] / (1 - std::pow(b2, t));
        ref_b[i] -= rate * mhat / (std::sqrt(vhat) + eps);
      }
    }
    for (int i = 0; i < 4; ++i) CHECK(w[i] == Approx(ref_w[i]).epsilon(1e-13));
    for (int i = 0; i < 3; ++i) CHECK(b[i] == Approx(ref_b[i]).epsilon(1e-13));
    for (int i = 0; i < 4; ++i) CHECK(opt.first_moment(0)[i] == Approx(mw[i]).epsilon(1e-13));
    for (int i = 0; i < 3; ++i) CHECK(opt.second_moment(1)[i] == Approx(vb[i]).epsilon(1e-13));
  }

  SECTION("bad configuration and arguments") {
    train::AdamConfig c;
    c.beta1 = 1.0;
    CHECK_THROWS_AS(train::Adam<double>(params, c), std::invalid_argument);
    CHECK_THROWS_AS(train::Adam<double>(params, train::adamw_config(-1)), std::invalid_argument);
    CHECK_THROWS_AS(train::Adam<double>(params, train::adamw_config(0.1), {true}), std::invalid_argument);
    train::Adam<double> opt(params, train::adamw_config(0.1));
    CHECK_THROWS_AS(opt.step(NAN), std::invalid_argument);
    CHECK_THROWS_AS(opt.step(-1e-3), std::invalid_argument);
  }
}

TEST_CASE("Gradient clipping by global norm") {
  std::vector<float> a = {3, 4}, ag(2), b = {0}, bg(1);
  std::vector<ParameterView<float>> params = {{"a", a.data(), ag.data(), 2, {2}}, {"b", b.data(), bg.data(), 1, {1}}};
  ag = {3, 4};
  bg = {12};  // global norm sqrt(9 + 16 + 144) = 13
  CHECK(train::clip_grad_norm(params, 100.0) == Approx(13.0));
  CHECK(ag == std::vector<float>{3, 4});  // below the threshold: unchanged
  CHECK(train::clip_grad_norm(params, 1.0) == Approx(13.0));
  CHECK(ag[0] == Approx(3.0 / 13));
  CHECK(ag[1] == Approx(4.0 / 13));
  CHECK(bg[0] == Approx(12.0 / 13));
  CHECK(train::global_grad_norm(params) == Approx(1.0));
  CHECK_THROWS_AS(train::clip_grad_norm(params, 0.0), std::invalid_argument);
}

TEST_CASE("Gradient clipping element-wise") {
  std::vector<double> a = {0, 0, 0}, ag(3), b = {0}, bg(1);
  std::vector<ParameterView<double>> params = {{"a", a.data(), ag.data(), 3, {3}}, {"b", b.data(), bg.data(), 1, {1}}};
  ag = {-3.0, 0.25, 1.0};
  bg = {2.5};
  train::clip_grad_value(params, 1.0);
  CHECK(ag == std::vector<double>{-1.0, 0.25, 1.0});  // inside the range: unchanged, bit for bit
  CHECK(bg[0] == 1.0);
  train::clip_grad_value(params, 0.5);
  CHECK(ag == std::vector<double>{-0.5, 0.25, 0.5});
  ag = {std::nan(""), -INFINITY, INFINITY};
  train::clip_grad_value(params, 1.0);
  CHECK(std::isnan(ag[0]));  // NaN stays NaN for the trainer's check
  CHECK(ag[1] == -1.0);
  CHECK(ag[2] == 1.0);
  CHECK_THROWS_AS(train::clip_grad_value(params, 0.0), std::invalid_argument);
  CHECK_THROWS_AS(train::clip_grad_value(params, std::nan("")), std::invalid_argument);
}

TEST_CASE("Learning-rate schedules at chosen steps") {
  const auto c = train::constant_schedule(1e-4);
  CHECK(c(0) == 1e-4);
  CHECK(c(123456) == 1e-4);
  // docs/paper.md §3: warm-up 1000 steps to 8e-4, cosine to 1e-5 at 10000
  const double peak = 8e-4, floor = 1e-5;
  const auto s = train::warmup_cosine_schedule(peak, 1000, 10000, floor);
  CHECK(s(0) == 0.0);
  CHECK(s(250) == Approx(2e-4).epsilon(1e-14));
  CHECK(s(500) == Approx(4e-4).epsilon(1e-14));
  CHECK(s(1000) == Approx(peak).epsilon(1e-14));
  CHECK(s(4000) == Approx(floor + 0.75 * (peak - floor)).epsilon(1e-13));  // cos(pi/3) = 1/2
  CHECK(s(5500) == Approx(floor + 0.5 * (peak - floor)).epsilon(1e-13));
  CHECK(s(10000) == Approx(floor).epsilon(1e-14));
  CHECK(s(20000) == Approx(floor).epsilon(1e-14));
  const auto s2 = train::warmup_cosine_schedule(1.0, 4, 8, 0.0, 0.2);
  CHECK(s2(1) == Approx(0.4));  // 0.2 + 0.8 * 1/4
  CHECK(s2(6) == Approx(0.5));
  CHECK_THROWS_AS(train::warmup_cosine_schedule(1.0, 10, 5, 0.0), std::invalid_argument);
  CHECK_THROWS_AS(s(-1), std::invalid_argument);
}

// ---------------------------------------------------------------- JSON

TEST_CASE("The header JSON parser accepts valid JSON and rejects invalid JSON") {
  const auto v = io::json::parse(R"( {"a": [1, -2.5e3, true, null], "b\u00e9\"": "x\n\ud83d\ude00", "c": {}} )");
  REQUIRE(v.kind == io::json::Value::Kind::object);
  REQUIRE(v.members.size() == 3);
  CHECK(v.find("a")->items.size() == 4);
  CHECK(v.find("a")->items[1].text == "-2.5e3");
  CHECK(v.find("b\xc3\xa9\"") != nullptr);
  CHECK(v.find("b\xc3\xa9\"")->text == "x\n\xf0\x9f\x98\x80");
  CHECK(io::json::parse(io::json::quote("a\"b\\c\x01")).text == "a\"b\\c\x01");
  for (const char* bad : {"", "{", "{\"a\":1,}", "[1,]", "{\"a\":1}x", "{\"a\":01}", "{\"a\":1,\"a\":2}", "{'a':1}",
                          "{\"a\":tru}", "\"\x01\"", "\"\\ud800\"", "\"\\x\"", "{\"a\" 1}", "\"\xff\"", "-", "1."}) {
    INFO(bad);
    CHECK_THROWS_AS(io::json::parse(bad), std::runtime_error);
  }
  std::string deep(100, '[');
  deep += std::string(100, ']');
  CHECK_THROWS_WITH(io::json::parse(deep), Catch::Contains("nesting"));
}

// ---------------------------------------------------------------- checkpoints

TEMPLATE_TEST_CASE("Checkpoint round trip is bit-exact, with optimiser state and step", "", float, double) {
  using T = TestType;
  ScratchDir dir;
  const std::string path = dir.path + "/ckpt.safetensors";
  TinyModel<T> model(10);
  train::Adam<T> opt(model.params, train::adamw_config(0.05), train::default_decay_mask(model.params));
  for (int s = 0; s < 3; ++s) {
    model.random_grads(100 + s);
    opt.step(1e-2);
  }
  train::save_checkpoint(path, model.params, &opt, 3, {{"run", "unit test"}});

  TinyModel<T> restored(99);  // different weights
  train::Adam<T> opt2(restored.params, train::adamw_config(0.05), train::default_decay_mask(restored.params));
  REQUIRE_FALSE(same_bits(model.params, restored.params));
  const train::CheckpointInfo info = train::load_checkpoint(path, restored.params, &opt2);
  CHECK(info.step == 3);
  CHECK(info.metadata.at("run") == "unit test");
  CHECK(info.metadata.at("dtype") == io::safetensors_dtype<T>());
  CHECK(info.metadata.at("optim.type") == "adamw");
  CHECK(same_bits(model.params, restored.params));
  CHECK(opt2.step_count() == 3);
  for (std::size_t k = 0; k < model.params.size(); ++k) {
    CHECK(opt.first_moment(k) == opt2.first_moment(k));
    CHECK(opt.second_moment(k) == opt2.second_moment(k));
  }
  // The restored optimiser continues exactly as the original.
  model.random_grads(7);
  restored.random_grads(7);
  opt.step(1e-2);
  opt2.step(1e-2);
  CHECK(same_bits(model.params, restored.params));

  // Weights only: optimiser tensors in the file are skipped.
  TinyModel<T> weights_only(5);
  CHECK(train::load_checkpoint(path, weights_only.params).step == 3);
  const auto f = io::read_safetensors(path);
  for (const auto& p : weights_only.params)
    CHECK(std::memcmp(f.data(*f.find(p.name)), p.value, p.size * sizeof(T)) == 0);

  // A user key may not shadow a reserved one.
  CHECK_THROWS_AS(train::save_checkpoint(path, model.params, &opt, 4, {{"step", "9"}}), std::invalid_argument);
}

TEST_CASE("A checkpoint is a valid safetensors file (header bytes and JSON layout)") {
  ScratchDir dir;
  const std::string path = dir.path + "/layout.safetensors";
  std::vector<float> w = {1.5f, -2.0f, 0.25f, 3.0f, 4.0f, 5.0f}, wg(6), b = {7.0f, 8.0f}, bg(2);
  std::vector<ParameterView<float>> params = {{"layer.weight", w.data(), wg.data(), 6, {2, 3}},
                                              {"layer.bias", b.data(), bg.data(), 2, {2}}};
  train::save_checkpoint(path, params, static_cast<const train::Adam<float>*>(nullptr), 42);
  const std::vector<char> bytes = read_bytes(path);
  REQUIRE(bytes.size() >= 8);
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(bytes[k]);
  REQUIRE(8 + n <= bytes.size());
  CHECK((8 + n) % 8 == 0);  // data aligned to 8
  const std::string header(bytes.data() + 8, n);
  CHECK(header.front() == '{');
  // The exact layout a safetensors reader expects (written out by hand here).
  CHECK(header.find(R"("layer.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})") != std::string::npos);
  CHECK(header.find(R"("layer.bias":{"dtype":"F32","shape":[2],"data_offsets":[24,32]})") != std::string::npos);
  CHECK(header.find(R"("__metadata__":{)") != std::string::npos);
  CHECK(header.find(R"("step":"42")") != std::string::npos);
  CHECK(bytes.size() == 8 + n + 32);
  // Data: little-endian IEEE floats; 1.5f = 0x3FC00000.
  const unsigned char* data = reinterpret_cast<const unsigned char*>(bytes.data() + 8 + n);
  CHECK(data[0] == 0x00);
  CHECK(data[1] == 0x00);
  CHECK(data[2] == 0xC0);
  CHECK(data[3] == 0x3F);

  // A file assembled by hand (as another tool would write it) loads.
  std::vector<char> raw(16);
  const double vals[2] = {0.5, -3.25};
  std::memcpy(raw.data(), vals, 16);
  const std::string hand = dir.path + "/hand.safetensors";
  write_bytes(hand, make_file(R"({"x":{"shape":[2],"dtype":"F64","data_offsets":[0,16]},"__metadata__":{"step":"7"}})", raw));
  std::vector<double> x(2), xg(2);
  std::vector<ParameterView<double>> xp = {{"x", x.data(), xg.data(), 2, {2}}};
  CHECK(train::load_checkpoint(hand, xp).step == 7);
  CHECK(x == std::vector<double>{0.5, -3.25});

  // Best effort: an independent reader (Python's struct + json, no packages) agrees.
  if (std::system("python3 -c 'import json, struct' > /dev/null 2>&1") == 0) {
    const std::string script =
        "import json, struct, sys\n"
        "b = open(sys.argv[1], 'rb').read()\n"
        "n = struct.unpack('<Q', b[:8])[0]\n"
        "h = json.loads(b[8:8 + n])\n"
        "t = h['layer.weight']; s, e = t['data_offsets']\n"
        "v = struct.unpack('<6f', b[8 + n + s:8 + n + e])\n"
        "assert t['dtype'] == 'F32' and t['shape'] == [2, 3], t\n"
        "assert v == (1.5, -2.0, 0.25, 3.0, 4.0, 5.0), v\n"
        "assert h['__metadata__']['step'] == '42'\n";
    write_bytes(dir.path + "/check.py", std::vector<char>(script.begin(), script.end()));
    CHECK(std::system(("python3 " + dir.path + "/check.py " + path).c_str()) == 0);
  } else {
    WARN("python3 not available: skipped the independent reader check");
  }
}

TEST_CASE("Atomic write: a failed save leaves the previous checkpoint intact") {
  ScratchDir dir;
  const std::string path = dir.path + "/ckpt.safetensors";
  TinyModel<double> model(1);
  train::save_checkpoint(path, model.params, static_cast<const train::Adam<double>*>(nullptr), 1);
  const std::vector<char> good = read_bytes(path);
  TinyModel<double> changed(2);

  for (const std::string stage : {"open", "header", "tensor embed.bias", "fsync", "close", "rename"}) {
    DYNAMIC_SECTION("failure at " << stage) {
      bool fired = false;
      mesaopt::detail::write_fault_hook() = [&](const std::string& s) {
        if (s == stage) {
          fired = true;
          throw std::runtime_error("injected failure at " + s);
        }
      };
      CHECK_THROWS_WITH(train::save_checkpoint(path, changed.params, static_cast<const train::Adam<double>*>(nullptr), 2),
                        Catch::Contains("injected"));
      mesaopt::detail::write_fault_hook() = nullptr;
      CHECK(fired);
      CHECK(read_bytes(path) == good);                             // old file untouched
      CHECK(dir.files() == std::vector<std::string>{"ckpt.safetensors"});  // no temp file left
      TinyModel<double> check(3);
      CHECK(train::load_checkpoint(path, check.params).step == 1);
      CHECK(same_bits(check.params, model.params));
    }
  }
  mesaopt::detail::write_fault_hook() = nullptr;
  // A successful save replaces it.
  train::save_checkpoint(path, changed.params, static_cast<const train::Adam<double>*>(nullptr), 2);
  CHECK(read_bytes(path) != good);
  CHECK(dir.files().size() == 1);
  // Unwritable location: a clear error.
  CHECK_THROWS_AS(train::save_checkpoint(dir.path + "/no/such/dir/x.safetensors", model.params,
                                         static_cast<const train::Adam<double>*>(nullptr), 1),
                  std::runtime_error);
}

TEST_CASE("Corrupt or mismatched checkpoints give clear errors") {
  ScratchDir dir;
  const std::string path = dir.path + "/ckpt.safetensors";
  const std::string bad = dir.path + "/bad.safetensors";
  TinyModel<float> model(1);
  train::Adam<float> opt(model.params, train::adamw_config(0.1));
  model.random_grads(3);
  opt.step(1e-3);
  train::save_checkpoint(path, model.params, &opt, 1);
  const std::vector<char> good = read_bytes(path);
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(good[k]);

  TinyModel<float> target(2);
  train::Adam<float> target_opt(target.params, train::adamw_config(0.1));
  TinyModel<float> pristine(2);
  auto load_bad = [&] { return error_of([&] { train::load_checkpoint(bad, target.params, &target_opt); }); };

  SECTION("truncated files") {
    for (std::size_t len : {std::size_t(0), std::size_t(4), std::size_t(8), std::size_t(20), std::size_t(8 + n),
                            good.size() - 1}) {
      write_bytes(bad, std::vector<char>(good.begin(), good.begin() + static_cast<long>(len)));
      const std::string e = load_bad();
      INFO(len << ": " << e);
      CHECK(e != "<no exception>");
      CHECK(e.find(bad) != std::string::npos);  // names the file
    }
  }
  SECTION("header length larger than the file") {
    std::vector<char> b = good;
    const std::uint64_t big = good.size();
    for (int k = 0; k < 8; ++k) b[k] = static_cast<char>((big >> (8 * k)) & 0xFF);
    write_bytes(bad, b);
    CHECK_THAT(load_bad(), Catch::Contains("header length"));
    for (int k = 0; k < 8; ++k) b[k] = static_cast<char>(0xFF);
    write_bytes(bad, b);
    CHECK_THAT(load_bad(), Catch::Contains("header length"));
  }
  SECTION("garbage JSON") {
    std::vector<char> b = good;
    const char* junk = "{\"oops\": [1, 2";
    std::memcpy(b.data() + 8, junk, std::strlen(junk));
    write_bytes(bad, b);
    CHECK_THAT(load_bad(), Catch::Contains("not valid JSON"));
  }
  SECTION("wrong dtype") {
    TinyModel<double> dmodel(1);
    CHECK_THAT(error_of([&] { train::load_checkpoint(path, dmodel.params); }),
               Catch::Contains("dtype F32") && Catch::Contains("F64"));
  }
  SECTION("wrong shape") {
    std::vector<float> w(15), wg(15), bb(3), bg(3), g(3), gg(3), lb(3), lbg(3);
    std::vector<ParameterView<float>> p = {{"embed.weight", w.data(), wg.data(), 15, {5, 3}},
                                           {"embed.bias", bb.data(), bg.data(), 3, {3}},
                                           {"ln.gain", g.data(), gg.data(), 3, {3}},
                                           {"ln.bias", lb.data(), lbg.data(), 3, {3}}};
    CHECK_THAT(error_of([&] { train::load_checkpoint(path, p); }),
               Catch::Contains("embed.weight") && Catch::Contains("shape [3, 5]") && Catch::Contains("[5, 3]"));
  }
  SECTION("missing and unexpected tensors") {
    std::vector<float> extra(2), extrag(2);
    auto more = target.params;
    more.push_back({"head.bias", extra.data(), extrag.data(), 2, {2}});
    CHECK_THAT(error_of([&] { train::load_checkpoint(path, more); }), Catch::Contains("\"head.bias\" is missing"));
    auto fewer = target.params;
    fewer.pop_back();
    CHECK_THAT(error_of([&] { train::load_checkpoint(path, fewer); }), Catch::Contains("unexpected tensor \"ln.bias\""));
    // optimiser state requested from a weights-only file
    train::save_checkpoint(bad, model.params, static_cast<const train::Adam<float>*>(nullptr), 1);
    CHECK_THAT(load_bad(), Catch::Contains("optim.step"));
  }
  SECTION("bad offsets: out of range, overlapping, gaps, wrong size; bad metadata") {
    const std::vector<char> data(32, 0);  // try_header takes a prefix
    std::vector<float> x(2), xg(2), y(2), yg(2);
    std::vector<ParameterView<float>> p = {{"x", x.data(), xg.data(), 2, {2}}, {"y", y.data(), yg.data(), 2, {2}}};
    auto try_header = [&](const std::string& h, std::size_t data_len = 16) {
      write_bytes(bad, make_file(h, std::vector<char>(data.begin(), data.begin() + static_cast<long>(data_len))));
      return error_of([&] { train::load_checkpoint(bad, p); });
    };
    const std::string meta = R"("__metadata__":{"step":"1"})";
    CHECK(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})") ==
          "<no exception>");  // the control: valid
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})"),
               Catch::Contains("beyond"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})"),
               Catch::Contains("overlapping"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
               Catch::Contains("overlapping"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 20),
               Catch::Contains("trailing"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("need 12"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[8,0]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("reversed"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"Q7","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("unknown dtype"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("non-negative integer"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("overflow"));
    CHECK_THAT(try_header("{" + meta + R"(,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,99999999999999999999999]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("too large"));
    CHECK_THAT(try_header(R"({"__metadata__":{"step":"-1"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("step"));
    CHECK_THAT(try_header(R"({"__metadata__":{"step":3},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("not a string"));
    CHECK_THAT(try_header(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
               Catch::Contains("\"step\""));
  }
  SECTION("random byte flips: each load either succeeds or throws, never crashes") {
    std::mt19937_64 rng(2024);
    const int trials = test::kSanitized ? 1500 : 4000;
    int loaded = 0, rejected = 0;
    for (int i = 0; i < trials; ++i) {
      std::vector<char> b = good;
      const int flips = 1 + static_cast<int>(rng() % 3);
      for (int f = 0; f < flips; ++f) {
        // Half the flips land in the length field or header, where parsing happens.
        const std::size_t pos = (rng() % 2) ? rng() % (8 + n) : rng() % b.size();
        b[pos] = static_cast<char>(b[pos] ^ static_cast<char>(1u << (rng() % 8)));
      }
      try {
        const auto f = io::parse_safetensors(b, "flipped");
        (void)f;
        write_bytes(bad, b);
        train::load_checkpoint(bad, target.params, &target_opt);
        ++loaded;
        for (const auto& p : target.params) REQUIRE(p.size > 0);  // shapes are the model's
      } catch (const std::runtime_error&) {
        ++rejected;
      } catch (const std::invalid_argument&) {
        ++rejected;
      }
    }
    CHECK(loaded > 0);
    CHECK(rejected > 0);
  }
  SECTION("a failed load leaves model and optimiser untouched") {
    std::vector<char> b = good;
    b[b.size() - 1] ^= 0;  // same data,
    b.pop_back();          // one byte short
    write_bytes(bad, b);
    CHECK(load_bad() != "<no exception>");
    CHECK(same_bits(target.params, pristine.params));
    CHECK(target_opt.step_count() == 0);
    CHECK(target_opt.first_moment(0) == std::vector<float>(target_opt.first_moment(0).size(), 0.0f));
  }
}

// ---------------------------------------------------------------- progress

TEST_CASE("Progress line: format, and quiet when the stream is not a terminal") {
  CHECK(train::format_progress(1200, 5000, 0.81234, 1e-4, 52300, 192) ==
        "step 1200/5000  loss 0.81234  lr 1.00e-04  52.3k tok/s  ETA 3m12s");
  CHECK(train::format_progress(1, 10, 1.5, 8e-4, 950, 7200) ==
        "step 1/10  loss 1.5  lr 8.00e-04  950 tok/s  ETA 2h00m");

  std::FILE* f = std::tmpfile();
  REQUIRE(f != nullptr);
  {
    train::ProgressLine quiet(10, 256, f);  // a file is not a terminal
    CHECK_FALSE(quiet.enabled());
    for (long s = 1; s <= 10; ++s) quiet.update(s, 1.0, 1e-3);
    quiet.finish();
  }
  CHECK(std::ftell(f) == 0);
  {
    train::ProgressLine forced(10, 256, f, true);
    for (long s = 1; s <= 10; ++s) forced.update(s, 0.5, 1e-3);
    forced.finish();
  }
  std::rewind(f);
  char buf[512] = {};
  const std::size_t got = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  const std::string out(buf, got);
  CHECK(out.rfind("\rstep 1/10", 0) == 0);                // first update printed with '\r'
  CHECK(out.find("\rstep 10/10") != std::string::npos);    // the last step always printed
  CHECK(out.back() == '\n');
  CHECK_THROWS_AS(train::ProgressLine(0, 1, f, false), std::invalid_argument);
}

}  // namespace mesaopt_test_train
