#pragma once
// The pre-LN residual pattern, and the one block built from it here.
//
// Every block of a model is a residual update of the token stream x, (B*T, D):
//
//     y = x + f(LN(x))                      (pre-LN; f = attention or MLP)
//
// forward:  u = LN.forward(x);  z = f.forward(u);  y = x + z
// backward: dz = dy;  du = f.backward(dz);  dx = dy + LN.backward(du)
//           (the skip path carries dy through unchanged, then the branch's
//            input gradient is added)
// Without LayerNorm (the paper's linear-attention runs, docs/paper.md §2) it is
// y = x + f(x) and dx = dy + f.backward(dy). Activation clipping (nn/clip.hpp)
// then follows the whole block: y <- clip(y, ±c).
//
// The Model composes this pattern around attention layers; PreLnMlp below is
// the MLP instance, y = x + MLP(LN(x)), checked against finite differences.
#include <mesaopt/nn/layer_norm.hpp>
#include <mesaopt/nn/mlp.hpp>

#include <string>
#include <vector>

namespace mesaopt::nn {

struct PreLnMlpConfig {
  long features = 0;     // D
  long hidden = 0;       // MLP inner width
  bool bias = true;      // MLP biases
  double ln_eps = 1e-5;  // LayerNorm eps
};

template <class T>
struct PreLnMlpCache {
  LayerNormCache<T> ln;
  MlpCache<T> mlp;
};

template <class T>
class PreLnMlp {
 public:
  explicit PreLnMlp(const PreLnMlpConfig& config)
      : ln({config.features, config.ln_eps}), mlp({config.features, config.hidden, config.bias}) {}

  // LayerNorm g = 1, b = 0; MLP weights ~ N(0, stddev^2).
  void init(SplitMix64& rng, double stddev) {
    ln.init();
    mlp.init(rng, stddev);
  }

  // x and y are (rows, D); y may not alias x.
  void forward(ConstMatrixRef<T> x, MatrixRef<T> y, PreLnMlpCache<T>& cache) const {
    const long d = ln.config().features;
    detail::check_size("PreLnMlp::forward", "x.cols()", x.cols(), d, "config.features");
    detail::check_shape("PreLnMlp::forward", "y", y, x.rows(), d);
    RowMatrix<T> u(x.rows(), d);
    ln.forward(x, u, cache.ln);
    mlp.forward(u, y, cache.mlp);  // y = z
    y += x;                        // y = x + z
  }

  // dy and dx are (rows, D).
  void backward(ConstMatrixRef<T> dy, const PreLnMlpCache<T>& cache, MatrixRef<T> dx) {
    const long rows = cache.ln.xhat.rows(), d = ln.config().features;
    detail::check_shape("PreLnMlp::backward", "dy", dy, rows, d);
    detail::check_shape("PreLnMlp::backward", "dx", dx, rows, d);
    RowMatrix<T> du(rows, d);
    mlp.backward(dy, cache.mlp, du);  // forward: y = x + f(u)  =>  du = f'(u)^T dy
    ln.backward(du, cache.ln, dx);    //                            dx = LN'(x)^T du + dy
    dx += dy;
  }

  // prefix + "ln.gain", "ln.bias", "mlp.fc1.weight", ...
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    ln.parameters(out, prefix + "ln.");
    mlp.parameters(out, prefix + "mlp.");
  }

  LayerNorm<T> ln;
  Mlp<T> mlp;
};

}  // namespace mesaopt::nn
