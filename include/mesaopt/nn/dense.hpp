#pragma once
// Dense (fully connected) layer: y = x W^T + b, one token per row.
//
// Used as the input embedding of continuous tokens (s_t -> width) and as the
// linear read-out (width -> n). W is (out, in) so that W's row j holds the
// weights of output feature j, as in PyTorch's nn.Linear (a checkpoint tensor
// "....weight" then means the same thing in both).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/kernels/gemm.hpp>
#include <mesaopt/nn/random.hpp>

#include <cstddef>
#include <string>
#include <vector>

namespace mesaopt::nn {

struct DenseConfig {
  long in_features = 0;   // columns of x
  long out_features = 0;  // columns of y
  bool bias = true;       // add b (false: y = x W^T)
};

// What backward needs: the input (dW = dy^T x).
template <class T>
struct DenseCache {
  RowMatrix<T> x;  // (rows, in)
};

template <class T>
class Dense {
 public:
  explicit Dense(const DenseConfig& config) : config_(config) {
    detail::check_positive_size("Dense", "config.in_features", config.in_features);
    detail::check_positive_size("Dense", "config.out_features", config.out_features);
    weight = RowMatrix<T>::Zero(config.out_features, config.in_features);
    weight_grad = RowMatrix<T>::Zero(config.out_features, config.in_features);
    if (config.bias) {
      bias = Vector<T>::Zero(config.out_features);
      bias_grad = Vector<T>::Zero(config.out_features);
    }
  }

  const DenseConfig& config() const { return config_; }

  // W ~ N(0, stddev^2) entry by entry (row-major order), b = 0.
  void init(SplitMix64& rng, double stddev) {
    if (!(std::isfinite(stddev) && stddev >= 0)) detail::fail("Dense::init", "stddev must be finite and >= 0, got ", stddev);
    fill_normal(weight.data(), static_cast<std::size_t>(weight.size()), stddev, rng);
    if (config_.bias) bias.setZero();
  }

  // x is (rows, in), one token per row; y is (rows, out).
  void forward(ConstMatrixRef<T> x, MatrixRef<T> y, DenseCache<T>& cache) const {
    detail::check_size("Dense::forward", "x.cols()", x.cols(), config_.in_features, "config.in_features");
    detail::check_shape("Dense::forward", "y", y, x.rows(), config_.out_features);
    cache.x = x;
    // y = x W^T: kernels::gemm against W^T, transposed once per call.
    const T* w_t = detail::transposed_in_thread_buffer(weight);
    const long in = config_.in_features, out = config_.out_features;
    kernels::gemm<T>(std::size_t(x.rows()), std::size_t(out), std::size_t(in), x.data(), std::size_t(x.outerStride()),
                     w_t, std::size_t(out), y.data(), std::size_t(y.outerStride()), false);
    if (config_.bias) y.rowwise() += bias.transpose();
  }

  // dy is (rows, out) = dL/dy. Adds dW += dy^T x and db += sum_rows dy; writes
  // dx = dy W, (rows, in).
  void backward(ConstMatrixRef<T> dy, const DenseCache<T>& cache, MatrixRef<T> dx) {
    check_backward(dy, cache);
    detail::check_shape("Dense::backward", "dx", dx, cache.x.rows(), config_.in_features);
    accumulate_parameter_grads(dy, cache);
    // forward: y = x W^T   =>   dx = dy W
    kernels::gemm<T>(std::size_t(dy.rows()), std::size_t(config_.in_features), std::size_t(config_.out_features),
                     dy.data(), std::size_t(dy.outerStride()), weight.data(), std::size_t(config_.in_features),
                     dx.data(), std::size_t(dx.outerStride()), false);
  }

  // Parameter gradients only (e.g. the input embedding, whose input needs no gradient).
  void backward(ConstMatrixRef<T> dy, const DenseCache<T>& cache) {
    check_backward(dy, cache);
    accumulate_parameter_grads(dy, cache);
  }

  // Appends prefix + "weight" (out, in) and, with a bias, prefix + "bias" (out).
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    out.push_back({prefix + "weight", weight.data(), weight_grad.data(), static_cast<std::size_t>(weight.size()),
                   {config_.out_features, config_.in_features}});
    if (config_.bias)
      out.push_back({prefix + "bias", bias.data(), bias_grad.data(), static_cast<std::size_t>(bias.size()),
                     {config_.out_features}});
  }

  RowMatrix<T> weight;       // W, (out, in)
  RowMatrix<T> weight_grad;  // dL/dW, (out, in)
  Vector<T> bias;            // b, (out); empty without bias
  Vector<T> bias_grad;       // dL/db, (out); empty without bias

 private:
  void check_backward(ConstMatrixRef<T> dy, const DenseCache<T>& cache) const {
    detail::check_size("Dense::backward", "cache.x.cols()", cache.x.cols(), config_.in_features,
                       "config.in_features (was forward called?)");
    detail::check_shape("Dense::backward", "dy", dy, cache.x.rows(), config_.out_features);
  }
  void accumulate_parameter_grads(ConstMatrixRef<T> dy, const DenseCache<T>& cache) {
    // forward: y = x W^T + b   =>   dW += dy^T x,   db += sum_rows dy
    kernels::gemm_tn<T>(std::size_t(config_.out_features), std::size_t(config_.in_features), std::size_t(dy.rows()),
                        dy.data(), std::size_t(dy.outerStride()), cache.x.data(), std::size_t(config_.in_features),
                        weight_grad.data(), std::size_t(config_.in_features), true);
    if (config_.bias) bias_grad.noalias() += dy.colwise().sum().transpose();
  }

  DenseConfig config_;
};

}  // namespace mesaopt::nn
