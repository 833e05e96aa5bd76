#pragma once
// MLP block: y = Dense2(GELU(Dense1(x))), features -> hidden -> features
// (GELU is the tanh approximation, nn/gelu.hpp).
#include <mesaopt/nn/dense.hpp>
#include <mesaopt/nn/gelu.hpp>

#include <string>
#include <vector>

namespace mesaopt::nn {

struct MlpConfig {
  long features = 0;  // input and output width
  long hidden = 0;    // inner width (often 4 * features)
  bool bias = true;   // biases in both Dense layers
};

template <class T>
struct MlpCache {
  DenseCache<T> fc1;  // x
  GeluCache<T> act;   // h = Dense1(x), (rows, hidden)
  DenseCache<T> fc2;  // a = GELU(h), (rows, hidden)
};

template <class T>
class Mlp {
 public:
  explicit Mlp(const MlpConfig& config)
      : config_(checked(config)),
        fc1({config.features, config.hidden, config.bias}),
        fc2({config.hidden, config.features, config.bias}) {}

  const MlpConfig& config() const { return config_; }

  // Both weight matrices ~ N(0, stddev^2) (fc1 drawn first), biases 0.
  void init(SplitMix64& rng, double stddev) {
    fc1.init(rng, stddev);
    fc2.init(rng, stddev);
  }

  // x and y are (rows, features).
  void forward(ConstMatrixRef<T> x, MatrixRef<T> y, MlpCache<T>& cache) const {
    detail::check_size("Mlp::forward", "x.cols()", x.cols(), config_.features, "config.features");
    detail::check_shape("Mlp::forward", "y", y, x.rows(), config_.features);
    RowMatrix<T> h(x.rows(), config_.hidden), a(x.rows(), config_.hidden);
    fc1.forward(x, h, cache.fc1);
    gelu_forward<T>(h, a, cache.act);
    fc2.forward(a, y, cache.fc2);
  }

  // dy and dx are (rows, features); adds into both layers' gradients.
  void backward(ConstMatrixRef<T> dy, const MlpCache<T>& cache, MatrixRef<T> dx) {
    const long rows = cache.fc1.x.rows();
    detail::check_shape("Mlp::backward", "dy", dy, rows, config_.features);
    detail::check_shape("Mlp::backward", "dx", dx, rows, config_.features);
    RowMatrix<T> da(rows, config_.hidden), dh(rows, config_.hidden);
    fc2.backward(dy, cache.fc2, da);
    gelu_backward<T>(da, cache.act, dh);
    fc1.backward(dh, cache.fc1, dx);
  }

  // prefix + "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias".
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    fc1.parameters(out, prefix + "fc1.");
    fc2.parameters(out, prefix + "fc2.");
  }

 private:
  static MlpConfig checked(const MlpConfig& c) {
    detail::check_positive_size("Mlp", "config.features", c.features);
    detail::check_positive_size("Mlp", "config.hidden", c.hidden);
    return c;
  }
  MlpConfig config_;

 public:
  Dense<T> fc1;  // features -> hidden
  Dense<T> fc2;  // hidden -> features
};

}  // namespace mesaopt::nn
