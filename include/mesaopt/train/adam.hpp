#pragma once
// Adam and AdamW over a model's parameter views (docs/paper.md §3: AdamW 0.9, 0.999,
// eps 1e-8). With g the gradient, t the 1-based step and lr the step's rate:
//   g' = g + wd * theta                       (Adam with coupled L2 decay only)
//   m  = beta1 m + (1 - beta1) g'
//   v  = beta2 v + (1 - beta2) g'^2
//   mhat = m / (1 - beta1^t),  vhat = v / (1 - beta2^t)
//   theta <- theta - lr (mhat / (sqrt(vhat) + eps) + wd * theta)   (AdamW: decoupled decay;
//                                                                     the theta before the update)
// AdamW here equals optax.adamw (decay scaled by lr) and torch.optim.AdamW.
// A per-parameter mask turns decay off (e.g. LayerNorm gains and biases):
// default_decay_mask decays only tensors of rank >= 2 (weight matrices).
//
// The loop over a tensor's entries is kernels::adam_update (double batches).
// State m, v is kept in T, one buffer per parameter, so checkpoints store it in
// the model's dtype ("optim.m.<name>", "optim.v.<name>", train/checkpoint.hpp).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/kernels/adam_update.hpp>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace mesaopt::train {

struct AdamConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;         // wd
  bool decoupled_weight_decay = true;  // true: AdamW; false: Adam with L2 added to the gradient
};

// AdamW with the paper's betas and eps and the given decay.
inline AdamConfig adamw_config(double weight_decay) {
  AdamConfig c;
  c.weight_decay = weight_decay;
  c.decoupled_weight_decay = true;
  return c;
}

// decay[i] = (params[i].shape.size() >= 2): matrices decay, vectors (biases,
// LayerNorm gain/bias) and scalars (e.g. a mesa lambda) do not.
template <class T>
std::vector<bool> default_decay_mask(const std::vector<ParameterView<T>>& params) {
  std::vector<bool> mask;
  mask.reserve(params.size());
  for (const auto& p : params) mask.push_back(p.shape.size() >= 2);
  return mask;
}

template <class T>
class Adam {
 public:
  // params: the views to update (their buffers must outlive the optimiser and
  // not move). decay_mask: one flag per view; empty means "decay everything".
  Adam(std::vector<ParameterView<T>> params, const AdamConfig& config, std::vector<bool> decay_mask = {})
      : params_(std::move(params)), config_(config), decay_(std::move(decay_mask)) {
    const char* where = "Adam";
    if (!(config.beta1 >= 0 && config.beta1 < 1)) detail::fail(where, "config.beta1 must lie in [0, 1), got ", config.beta1);
    if (!(config.beta2 >= 0 && config.beta2 < 1)) detail::fail(where, "config.beta2 must lie in [0, 1), got ", config.beta2);
    detail::check_positive_finite(where, "config.eps", config.eps);
    if (!(std::isfinite(config.weight_decay) && config.weight_decay >= 0))
      detail::fail(where, "config.weight_decay must be finite and >= 0, got ", config.weight_decay);
    if (decay_.empty()) decay_.assign(params_.size(), true);
    if (decay_.size() != params_.size())
      detail::fail(where, "decay_mask has ", decay_.size(), " entries but there are ", params_.size(),
                            " parameters (expected equal, or an empty mask)");
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      if (p.size > 0 && (p.value == nullptr || p.grad == nullptr))
        detail::fail(where, "parameter '", p.name, "' has null value or grad");
      m_.emplace_back(p.size, T(0));
      v_.emplace_back(p.size, T(0));
    }
  }

  // One update with learning rate lr (>= 0, finite) using the current grads.
  void step(double lr) {
    if (!(std::isfinite(lr) && lr >= 0)) detail::fail("Adam::step", "lr must be finite and >= 0, got ", lr);
    ++step_;
    const double b1 = config_.beta1, b2 = config_.beta2;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step_));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step_));
    kernels::AdamCoefficients c;
    c.beta1 = b1;
    c.beta2 = b2;
    c.bias1 = bc1;
    c.bias2 = bc2;
    c.eps = config_.eps;
    c.lr = lr;
    c.decoupled = config_.decoupled_weight_decay;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const auto& p = params_[k];
      c.weight_decay = decay_[k] ? config_.weight_decay : 0.0;
      kernels::adam_update(p.size, p.value, p.grad, m_[k].data(), v_[k].data(), c);
    }
  }

  long step_count() const { return step_; }  // updates applied so far (t)
  void set_step_count(long t) {
    if (t < 0) detail::fail("Adam::set_step_count", "t must be >= 0, got ", t);
    step_ = t;
  }
  const AdamConfig& config() const { return config_; }
  const std::vector<ParameterView<T>>& params() const { return params_; }
  const std::vector<bool>& decay_mask() const { return decay_; }
  // First and second moments of params()[k], params()[k].size entries each.
  std::vector<T>& first_moment(std::size_t k) { return m_.at(k); }
  std::vector<T>& second_moment(std::size_t k) { return v_.at(k); }
  const std::vector<T>& first_moment(std::size_t k) const { return m_.at(k); }
  const std::vector<T>& second_moment(std::size_t k) const { return v_.at(k); }

 private:
  std::vector<ParameterView<T>> params_;
  AdamConfig config_;
  std::vector<bool> decay_;
  std::vector<std::vector<T>> m_, v_;
  long step_ = 0;
};

}  // namespace mesaopt::train
