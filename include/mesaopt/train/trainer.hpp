#pragma once
// train::Trainer: the training loop of an nn::Model on next-token MSE.
// Per step s: batch = source(s); pred = model(batch.inputs); L = mse(pred,
// targets); grads = dL/dtheta; clip_grad_norm; AdamW step with lr = schedule(s).
//
// Exact resume: the batch of step s depends only on s (the source must be a
// pure function of the step, e.g. make_dynamics_batch(cfg, B, seed, s * B)),
// and a checkpoint holds the parameters, Adam's moments and step count, the
// trainer's step and its loss history (17 significant digits, exact for
// doubles). So N steps straight equal N/2 + save + load + N/2, bit for bit.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/nn/model.hpp>
#include <mesaopt/train/adam.hpp>
#include <mesaopt/train/checkpoint.hpp>
#include <mesaopt/train/grad_clip.hpp>
#include <mesaopt/train/loss.hpp>
#include <mesaopt/train/progress.hpp>
#include <mesaopt/train/schedule.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mesaopt::train {

template <class T>
struct TrainBatch {
  RowMatrix<T> inputs;   // (B*T, input_dim), sequence-major
  RowMatrix<T> targets;  // (B*T, output_dim)
  long seq_len = 0;      // T
};

template <class T>
using BatchSource = std::function<TrainBatch<T>(long step)>;

struct TrainerConfig {
  long steps = 0;                   // total steps S (run() stops there)
  AdamConfig adam;                  // AdamW by default (decoupled weight decay)
  LrSchedule schedule;              // lr of step s = schedule(s)
  double clip_norm = 0.0;           // global gradient-norm clip; 0 = off
  std::string checkpoint_path;      // empty: no checkpoints
  long checkpoint_every = 0;        // save every this many steps (and at the end of run()); 0: only at the end
  bool progress = true;             // ProgressLine on progress_stream (only drawn on a terminal)
  std::FILE* progress_stream = stderr;
};

struct TrainResult {
  std::vector<double> losses;      // the whole history: losses[s] is the loss of step s (before its update)
  std::vector<double> grad_norms;  // pre-clip global gradient norm of the steps run by this call
  long first_step = 0;             // the step this call started at
  long steps_run = 0;              // steps run by this call
  double seconds = 0;              // wall time of this call's steps
  double tokens_per_second = 0;    // steps_run * B*T / seconds (0 if nothing ran)
};

template <class T>
class Trainer {
 public:
  Trainer(nn::Model<T>& model, BatchSource<T> source, const TrainerConfig& config)
      : model_(model), source_(std::move(source)), config_(checked(config)) {
    if (!source_) detail::fail("Trainer", "source (the batch source) is empty");
    params_ = model_.parameters();
    optimizer_ = std::make_unique<Adam<T>>(params_, config_.adam, default_decay_mask(params_));
  }

  long step() const { return step_; }
  const std::vector<double>& loss_history() const { return losses_; }
  Adam<T>& optimizer() { return *optimizer_; }
  const std::vector<ParameterView<T>>& parameters() const { return params_; }

  // Runs steps step() .. min(until, config.steps) - 1 (until < 0: config.steps).
  TrainResult run(long until = -1) {
    const char* where = "Trainer::run";
    const long end = until < 0 ? config_.steps : (until < config_.steps ? until : config_.steps);
    TrainResult result;
    result.first_step = step_;
    std::unique_ptr<ProgressLine> progress;
    long tokens = 0;
    typename nn::Model<T>::Cache cache;
    const auto start = std::chrono::steady_clock::now();
    while (step_ < end) {
      TrainBatch<T> batch = source_(step_);
      if (batch.seq_len <= 0 || batch.inputs.rows() == 0)
        detail::fail(where, "batch source returned an empty batch or seq_len <= 0 at step ", step_);
      if (!progress && config_.progress && config_.progress_stream != nullptr)
        progress = std::make_unique<ProgressLine>(config_.steps, static_cast<long>(batch.inputs.rows()),
                                                  config_.progress_stream);
      zero_grad(params_);
      const RowMatrix<T> pred = model_.forward(batch.inputs, batch.seq_len, cache);
      const MseLoss loss = mse_loss_forward<T>(pred, batch.targets, batch.seq_len);
      RowMatrix<T> dpred(pred.rows(), pred.cols());
      mse_loss_backward<T>(pred, batch.targets, batch.seq_len, dpred);
      model_.backward(dpred, cache);
      const double norm =
          config_.clip_norm > 0 ? clip_grad_norm(params_, config_.clip_norm) : global_grad_norm(params_);
      const double lr = config_.schedule(step_);
      optimizer_->step(lr);
      losses_.push_back(loss.loss);
      result.grad_norms.push_back(norm);
      tokens += static_cast<long>(batch.inputs.rows());
      ++result.steps_run;
      ++step_;
      if (progress) progress->update(step_, loss.loss, lr);
      if (!config_.checkpoint_path.empty() && config_.checkpoint_every > 0 && step_ % config_.checkpoint_every == 0 &&
          step_ < end)
        save(config_.checkpoint_path);
    }
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress->finish();
    if (!config_.checkpoint_path.empty() && result.steps_run > 0) save(config_.checkpoint_path);
    result.tokens_per_second = result.seconds > 0 ? static_cast<double>(tokens) / result.seconds : 0.0;
    result.losses = losses_;
    return result;
  }

  // Model parameters + Adam state + step + loss history, written atomically.
  void save(const std::string& path) const {
    std::ostringstream os;
    os.precision(17);
    for (std::size_t i = 0; i < losses_.size(); ++i) os << (i ? "," : "") << losses_[i];
    save_checkpoint<T>(path, params_, optimizer_.get(), step_, {{"trainer.loss_history", os.str()}});
  }

  // Restores what save() wrote into this trainer's model and optimiser.
  void resume(const std::string& path) {
    const CheckpointInfo info = load_checkpoint<T>(path, params_, optimizer_.get());
    step_ = info.step;
    losses_.clear();
    const auto it = info.metadata.find("trainer.loss_history");
    if (it == info.metadata.end())
      throw std::runtime_error("checkpoint '" + path + "': metadata has no \"trainer.loss_history\" entry");
    std::istringstream is(it->second);
    std::string item;
    while (std::getline(is, item, ',')) {
      char* end = nullptr;
      const double v = std::strtod(item.c_str(), &end);
      if (end == item.c_str() || *end != '\0')
        throw std::runtime_error("checkpoint '" + path + "': bad loss history entry \"" + item + "\"");
      losses_.push_back(v);
    }
    if (static_cast<long>(losses_.size()) != step_)
      throw std::runtime_error("checkpoint '" + path + "': loss history has " + std::to_string(losses_.size()) +
                               " entries but step is " + std::to_string(step_));
  }

 private:
  static const TrainerConfig& checked(const TrainerConfig& c) {
    const char* where = "Trainer";
    detail::check_positive_size(where, "config.steps", c.steps);
    if (!(std::isfinite(c.clip_norm) && c.clip_norm >= 0))
      detail::fail(where, "config.clip_norm must be finite and >= 0 (0 = off), got ", c.clip_norm);
    if (c.checkpoint_every < 0)
      detail::fail(where, "config.checkpoint_every must be >= 0, got ", c.checkpoint_every);
    return c;
  }

  nn::Model<T>& model_;
  BatchSource<T> source_;
  TrainerConfig config_;
  std::vector<ParameterView<T>> params_;
  std::unique_ptr<Adam<T>> optimizer_;
  long step_ = 0;
  std::vector<double> losses_;
};

}  // namespace mesaopt::train
