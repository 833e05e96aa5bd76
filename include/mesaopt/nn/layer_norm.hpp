#pragma once
// LayerNorm over the features of each token (row), with a learnable gain g and
// bias b:
//   mu = mean_j x_j,  var = mean_j (x_j - mu)^2,  rstd = 1 / sqrt(var + eps)
//   xhat_j = (x_j - mu) rstd,   y_j = g_j xhat_j + b_j
// (biased variance, eps inside the square root, as PyTorch and flax).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace mesaopt::nn {

struct LayerNormConfig {
  long features = 0;   // columns of x
  double eps = 1e-5;   // added to the variance
};

// What backward needs: the normalised input and 1/std per row.
template <class T>
struct LayerNormCache {
  RowMatrix<T> xhat;  // (rows, features)
  Vector<T> rstd;     // (rows)
};

template <class T>
class LayerNorm {
 public:
  explicit LayerNorm(const LayerNormConfig& config) : config_(config) {
    detail::check_positive_size("LayerNorm", "config.features", config.features);
    detail::check_positive_finite("LayerNorm", "config.eps", config.eps);
    gain = Vector<T>::Ones(config.features);
    bias = Vector<T>::Zero(config.features);
    gain_grad = Vector<T>::Zero(config.features);
    bias_grad = Vector<T>::Zero(config.features);
  }

  const LayerNormConfig& config() const { return config_; }

  // g = 1, b = 0 (deterministic; no generator needed).
  void init() {
    gain.setOnes();
    bias.setZero();
  }

  // x and y are (rows, features); y may not alias x.
  void forward(ConstMatrixRef<T> x, MatrixRef<T> y, LayerNormCache<T>& cache) const {
    detail::check_size("LayerNorm::forward", "x.cols()", x.cols(), config_.features, "config.features");
    detail::check_shape("LayerNorm::forward", "y", y, x.rows(), config_.features);
    const long rows = x.rows(), n = config_.features;
    cache.xhat.resize(rows, n);
    cache.rstd.resize(rows);
    for (long r = 0; r < rows; ++r) {
      // Two passes (mean, then centred squares): no cancellation for large means.
      const T mu = x.row(r).sum() / T(n);
      auto centred = (x.row(r).array() - mu);
      const T var = centred.square().sum() / T(n);
      const T rstd = T(1) / std::sqrt(var + T(config_.eps));
      cache.rstd(r) = rstd;
      cache.xhat.row(r) = centred * rstd;
      y.row(r) = cache.xhat.row(r).array() * gain.transpose().array() + bias.transpose().array();
    }
  }

  // dy is (rows, features). Adds dg += sum_rows dy*xhat, db += sum_rows dy;
  // writes dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat*xhat)), dxhat = dy*g.
  void backward(ConstMatrixRef<T> dy, const LayerNormCache<T>& cache, MatrixRef<T> dx) {
    const long rows = cache.xhat.rows(), n = config_.features;
    detail::check_size("LayerNorm::backward", "cache.xhat.cols()", cache.xhat.cols(), n,
                       "config.features (was forward called?)");
    detail::check_shape("LayerNorm::backward", "dy", dy, rows, n);
    detail::check_shape("LayerNorm::backward", "dx", dx, rows, n);
    // forward: y = g * xhat + b   =>   dg += dy * xhat,   db += dy
    gain_grad.noalias() += (dy.array() * cache.xhat.array()).colwise().sum().matrix().transpose();
    bias_grad.noalias() += dy.colwise().sum().transpose();
    for (long r = 0; r < rows; ++r) {
      const auto dxhat = (dy.row(r).array() * gain.transpose().array()).eval();
      const T mean_dxhat = dxhat.sum() / T(n);
      const T mean_dxhat_xhat = (dxhat * cache.xhat.row(r).array()).sum() / T(n);
      // forward: xhat = (x - mu) rstd  =>  the projection below (mu and rstd depend on x)
      dx.row(r) = cache.rstd(r) * (dxhat - mean_dxhat - cache.xhat.row(r).array() * mean_dxhat_xhat);
    }
  }

  // Appends prefix + "gain" and prefix + "bias", each (features).
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    out.push_back({prefix + "gain", gain.data(), gain_grad.data(), static_cast<std::size_t>(gain.size()),
                   {config_.features}});
    out.push_back({prefix + "bias", bias.data(), bias_grad.data(), static_cast<std::size_t>(bias.size()),
                   {config_.features}});
  }

  Vector<T> gain, bias;            // g, b: (features)
  Vector<T> gain_grad, bias_grad;  // dL/dg, dL/db: (features)

 private:
  LayerNormConfig config_;
};

}  // namespace mesaopt::nn
