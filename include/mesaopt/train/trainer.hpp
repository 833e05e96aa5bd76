#pragma once
// train::Trainer: the training loop of an nn::Model on next-token MSE.
// Per step s: batch = source(s); pred = model(batch.inputs); L = mse(pred,
// targets); grads = dL/dtheta; N = global gradient norm (clip_grad_norm);
// AdamW step with lr = schedule(s).
//
// Non-finite steps (docs/training.md, "Failures and what they produce"): L and
// the pre-clip N are checked every step. N covers every gradient entry (a NaN
// or Inf anywhere makes the sum of squares non-finite), so the check costs two
// isfinite calls per step, nothing per parameter. A non-finite L or N means
// the update is NOT applied: weights, Adam moments and Adam's step count stay
// as they were. Then, by TrainerConfig::non_finite,
//   stop (default): run() throws NonFiniteError naming the step and the value;
//                   step() stays at that step and no checkpoint is written;
//   skip:           the step still advances step() (so batch s stays a pure
//                   function of s and resume stays exact), its number goes to
//                   skipped_steps(), its loss entry keeps the non-finite value
//                   (NaN canonicalised), and more than max_consecutive_skips
//                   such steps in a row stop as above.
// save() refuses (std::runtime_error, file untouched) to write a checkpoint
// holding a non-finite weight or Adam moment.
//
// Exact resume: the batch of step s depends only on s (the source must be a
// pure function of the step, e.g. make_dynamics_batch(cfg, B, seed, s * B)),
// and a checkpoint holds the parameters, Adam's moments and step count, the
// trainer's step, its loss history (17 significant digits, exact for doubles)
// and its skipped steps. So N steps straight equal N/2 + save + load + N/2,
// bit for bit. The checkpoint also records what shapes cannot: the model's
// configuration ("model.*"), Adam's ("optim.*") and the trainer settings that
// change the trajectory ("trainer.clip_norm", "trainer.schedule.*"); resume()
// refuses a file whose values differ from this trainer's (another head split
// or normalize_qk has the same tensor shapes but computes something else),
// and validates everything before it changes anything.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/io/safetensors.hpp>
#include <mesaopt/nn/model.hpp>
#include <mesaopt/train/adam.hpp>
#include <mesaopt/train/checkpoint.hpp>
#include <mesaopt/train/grad_clip.hpp>
#include <mesaopt/train/loss.hpp>
#include <mesaopt/train/progress.hpp>
#include <mesaopt/train/schedule.hpp>
#include <mesaopt/train/sharded_step.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
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

// What run() does at a step whose loss or gradient norm is not finite (the
// update is never applied either way).
enum class NonFinitePolicy {
  stop,  // throw NonFiniteError; the trainer stays as before the step
  skip,  // count the step as skipped and go on with the next batch
};

// The parameters weight decay applies to (TrainerConfig::decay).
enum class DecayScope {
  matrices,  // tensors of rank >= 2 (default_decay_mask)
  all,       // every parameter, vectors and scalars included (the paper's code)
};

inline const char* decay_scope_name(DecayScope d) {
  switch (d) {
    case DecayScope::matrices: return "matrices";
    case DecayScope::all: return "all";
  }
  return "?";
}

struct TrainerConfig {
  long steps = 0;                   // total steps S (run() stops there)
  AdamConfig adam;                  // AdamW by default (decoupled weight decay)
  LrSchedule schedule;              // lr of step s = schedule(s)
  double clip_norm = 0.0;           // global gradient-norm clip; 0 = off
  // Element-wise gradient clip to [-clip_value, clip_value] (the paper's
  // code: 1); 0 = off. Applied before the global-norm clip when both are on;
  // the gradient norm the trainer reports and checks is taken before either.
  double clip_value = 0.0;
  std::string checkpoint_path;      // empty: no checkpoints
  long checkpoint_every = 0;        // save every this many steps (and at the end of run()); 0: only at the end
  bool progress = true;             // ProgressLine on progress_stream (only drawn on a terminal)
  std::FILE* progress_stream = stderr;
  NonFinitePolicy non_finite = NonFinitePolicy::stop;  // non-finite loss or gradient norm: stop or skip
  // With skip: a non-finite step that would make more than this many skipped
  // steps in a row stops as with `stop` (a run of bad steps means the model or
  // the data is broken, not one batch). 0 = no cap.
  long max_consecutive_skips = 10;
  // Shards (docs/training.md, "Shards and threads"): with shards > 1 every
  // step cuts its batch into this many fixed shards of whole sequences, runs
  // them on `threads` workers (train::ShardedStep) and adds their gradients
  // in a fixed tree: the trajectory depends on shards (it is recorded in
  // checkpoints) but never on threads. shards = 1: the whole batch goes
  // through the model at once, and the model's layers spread each op over
  // their own threads (ModelConfig::num_threads), the path for a few long
  // sequences. shards = 0 (default): auto_shard_count(B, T, model config,
  // sizeof(T)) of the first batch: shards of at most 8 sequences, fewer for
  // a model with many activations per token, or 1 for a single sequence. The
  // batch must hold at least `shards` sequences.
  long shards = 0;
  // Which parameters AdamW's weight decay shrinks: matrices only
  // (default_decay_mask: weight matrices, not biases, gains or the mesa
  // lambda), or every parameter, as the paper's code does (docs/paper.md §3).
  DecayScope decay = DecayScope::matrices;
  int threads = 0;  // workers of the sharded step; <= 0: the library default (default_num_threads())
  // Processes that train this model together, data-parallel (docs/distributed.md;
  // distributed::MpiProcessGroup); nullptr: this process alone. Every rank runs
  // the same Trainer on the same batches; each runs its block of the shards and
  // the gradients are summed in the same fixed tree, so losses and parameters
  // are bit-identical for any rank count at the same shard count (not recorded
  // in checkpoints: it changes no result bit). Only rank 0 writes checkpoints
  // and draws the progress line; every rank can resume from rank 0's file.
  ProcessGroup* process_group = nullptr;
};

struct TrainResult {
  std::vector<double> losses;      // the whole history: losses[s] is the loss of step s (before its update);
                                   // a skipped step keeps its non-finite (or finite, if N was the bad value) loss
  std::vector<double> grad_norms;  // pre-clip global gradient norm of the steps run by this call
                                   // (NaN for a step skipped for its loss: no backward was run)
  std::vector<long> skipped_steps; // the whole history: numbers of the steps skipped (policy skip), ascending
  long first_step = 0;             // the step this call started at
  long steps_run = 0;              // steps run by this call, skipped ones included
  long skipped = 0;                // steps skipped by this call
  double seconds = 0;              // wall time of this call's steps
  double tokens_per_second = 0;    // steps_run * B*T / seconds (0 if nothing ran)
};

// Thrown by Trainer::run for a non-finite loss or gradient norm under policy
// stop (or past max_consecutive_skips). The trainer is as before `step()`:
// no update applied, step() == this step, no checkpoint written.
class NonFiniteError : public std::runtime_error {
 public:
  NonFiniteError(const std::string& message, long step, std::string quantity, double value)
      : std::runtime_error(message), step_(step), quantity_(std::move(quantity)), value_(value) {}
  long step() const { return step_; }                         // the step whose batch produced it
  const std::string& quantity() const { return quantity_; }  // "loss", "gradient norm" or "mesa breakdown"
  double value() const { return value_; }                     // the non-finite value

 private:
  long step_;
  std::string quantity_;
  double value_;
};

}  // namespace mesaopt::train

namespace mesaopt::detail {

inline const char* non_finite_policy_name(train::NonFinitePolicy p) {
  switch (p) {
    case train::NonFinitePolicy::stop: return "stop";
    case train::NonFinitePolicy::skip: return "skip";
  }
  return "?";
}

inline const char* schedule_kind_name(train::LrSchedule::Kind k) {
  switch (k) {
    case train::LrSchedule::Kind::constant: return "constant";
    case train::LrSchedule::Kind::warmup_cosine: return "warmup_cosine";
  }
  return "?";
}

// The loss history as text: 17 significant digits (exact for doubles), and
// "nan", "inf", "-inf" for the non-finite losses of skipped steps (strtod
// reads all of them back; NaN is stored canonical, so the round trip is exact).
inline std::string format_loss(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  return format_double(x);
}

// (key, value) pairs of everything in a model configuration that changes what
// the model computes, in a fixed order (the kind of a block before its sizes,
// so a mismatch is reported by its cause). Not recorded: num_threads and
// mesa_chunk, which change no result bit (docs/layers.md, docs/mesa.md).
inline void append_model_config(std::vector<std::pair<std::string, std::string>>& out, const nn::ModelConfig& c) {
  auto b = [](bool v) { return std::string(v ? "true" : "false"); };
  out.push_back({"model.input_dim", std::to_string(c.input_dim)});
  out.push_back({"model.width", std::to_string(c.width)});
  out.push_back({"model.output_dim", std::to_string(c.output_dim)});
  out.push_back({"model.embed", b(c.embed)});
  out.push_back({"model.readout_slice", b(c.readout_slice)});
  out.push_back({"model.clip", format_double(c.clip)});
  out.push_back({"model.ln_eps", format_double(c.ln_eps)});
  out.push_back({"model.blocks", std::to_string(c.blocks.size())});
  for (std::size_t i = 0; i < c.blocks.size(); ++i) {
    const nn::BlockConfig& k = c.blocks[i];
    const std::string p = "model.blocks[" + std::to_string(i) + "].";
    out.push_back({p + "attention", nn::attention_kind_name(k.attention)});
    out.push_back({p + "heads", std::to_string(k.heads)});
    out.push_back({p + "key_size", std::to_string(k.key_size)});
    out.push_back({p + "value_size", std::to_string(k.value_size)});
    out.push_back({p + "layer_norm", b(k.layer_norm)});
    out.push_back({p + "mlp", b(k.mlp)});
    out.push_back({p + "mlp_hidden", std::to_string(k.mlp_hidden)});
    out.push_back({p + "positional_dim", std::to_string(k.positional_dim)});
    out.push_back({p + "normalize_qk", b(k.normalize_qk)});
    out.push_back({p + "lambda_init", format_double(k.lambda_init)});
    out.push_back({p + "lambda_parametrization", lambda_parametrization_name(k.lambda_parametrization)});
    out.push_back({p + "learn_forget", b(k.learn_forget)});
    out.push_back({p + "forget_init", format_double(k.forget_init)});
    if (k.attention == nn::AttentionKind::gated_mesa) {  // only for gated blocks: older checkpoints stay valid
      out.push_back({p + "gated_conv_size", std::to_string(k.gated_conv_size)});
      out.push_back({p + "gated_lambda_floor", format_double(k.gated_lambda_floor)});
      out.push_back({p + "gated_lambda_init", format_double(k.gated_lambda_init)});
      out.push_back({p + "gated_beta_bias_init", format_double(k.gated_beta_bias_init)});
      out.push_back({p + "gated_forget_bias_init", format_double(k.gated_forget_bias_init)});
      out.push_back({p + "gated_norm_eps", format_double(k.gated_norm_eps)});
      out.push_back({p + "gated_solver", solver_name(k.gated_solver)});
      out.push_back({p + "gated_cg_steps", std::to_string(k.gated_cg_steps)});
      out.push_back({p + "gated_cg_tolerance", format_double(k.gated_cg_tolerance)});
    }
  }
}

// The optimiser entries save_checkpoint writes, as it formats them.
inline void append_adam_config(std::vector<std::pair<std::string, std::string>>& out, const train::AdamConfig& c) {
  out.push_back({"optim.type", c.decoupled_weight_decay ? "adamw" : "adam"});
  out.push_back({"optim.beta1", format_double(c.beta1)});
  out.push_back({"optim.beta2", format_double(c.beta2)});
  out.push_back({"optim.eps", format_double(c.eps)});
  out.push_back({"optim.weight_decay", format_double(c.weight_decay)});
}

// The trainer settings that change the trajectory (shards: the order of the
// gradient sums; a file without the entry was written with one shard). Not
// recorded: threads (no result bit changes), steps (a
// resumed run may go further), checkpoint and progress settings, and the
// non-finite policy (it changes nothing on a run without non-finite steps).
inline void append_trainer_config(std::vector<std::pair<std::string, std::string>>& out,
                                  const train::TrainerConfig& c) {
  out.push_back({"trainer.clip_norm", format_double(c.clip_norm)});
  out.push_back({"trainer.clip_value", format_double(c.clip_value)});
  out.push_back({"trainer.decay", train::decay_scope_name(c.decay)});
  out.push_back({"trainer.shards", std::to_string(c.shards)});
  out.push_back({"trainer.schedule.kind", schedule_kind_name(c.schedule.kind)});
  out.push_back({"trainer.schedule.peak", format_double(c.schedule.peak)});
  out.push_back({"trainer.schedule.init", format_double(c.schedule.init)});
  out.push_back({"trainer.schedule.floor", format_double(c.schedule.floor)});
  out.push_back({"trainer.schedule.warmup_steps", std::to_string(c.schedule.warmup_steps)});
  out.push_back({"trainer.schedule.total_steps", std::to_string(c.schedule.total_steps)});
}

// For a configuration entry that checkpoints started recording later: the
// value every file written before then was trained with, so that such a file
// still resumes into a trainer with that value; "" for the other entries.
inline std::string value_before_recorded(const std::string& key) {
  static const std::pair<const char*, const char*> kAddedLater[] = {
      {"trainer.shards", "1"},          // before sharded steps, every step was one shard
      {"trainer.clip_value", "0"},      // before element-wise clipping, none was done
      {"trainer.decay", "matrices"},    // before the decay scope, only matrices decayed
  };
  for (const auto& [k, v] : kAddedLater)
    if (key == k) return v;
  // model.blocks[i].lambda_parametrization: lambda was always softplus(lambda_raw) before.
  const std::string block_suffix = "].lambda_parametrization";
  if (key.rfind("model.blocks[", 0) == 0 && key.size() > block_suffix.size() &&
      key.compare(key.size() - block_suffix.size(), block_suffix.size(), block_suffix) == 0)
    return "softplus";
  return "";
}

// Index of the first non-finite entry of p[0..n), or n.
template <class T>
std::size_t first_non_finite(const T* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return i;
  return n;
}

}  // namespace mesaopt::detail

namespace mesaopt::train {

template <class T>
class Trainer {
 public:
  Trainer(nn::Model<T>& model, BatchSource<T> source, const TrainerConfig& config)
      : model_(model), source_(std::move(source)), config_(checked(config)) {
    if (!source_) detail::fail("Trainer", "source (the batch source) is empty");
    params_ = model_.parameters();
    optimizer_ = std::make_unique<Adam<T>>(
        params_, config_.adam,
        config_.decay == DecayScope::all ? std::vector<bool>(params_.size(), true) : default_decay_mask(params_));
  }

  // The shard count of the steps: config.shards, or with 0 (automatic) the
  // count chosen at the first batch (0 until then).
  long shards() const { return config_.shards > 0 ? config_.shards : resolved_shards_; }

  long step() const { return step_; }
  const std::vector<double>& loss_history() const { return losses_; }
  // Steps skipped for a non-finite loss or gradient norm (policy skip), ascending.
  const std::vector<long>& skipped_steps() const { return skipped_; }
  Adam<T>& optimizer() { return *optimizer_; }
  const Adam<T>& optimizer() const { return *optimizer_; }
  const std::vector<ParameterView<T>>& parameters() const { return params_; }

  // Runs steps step() .. min(until, config.steps) - 1 (until < 0: config.steps).
  // Throws NonFiniteError as described in the header comment.
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
      if (!progress && config_.progress && config_.progress_stream != nullptr && is_root())
        progress = std::make_unique<ProgressLine>(config_.steps, static_cast<long>(batch.inputs.rows()),
                                                  config_.progress_stream);
      // A mesa layer stops with MesaBreakdownError where its recursion meets a
      // non-finite key or loses positive definiteness (docs/mesa.md): for the
      // trainer that is a bad step like a non-finite loss, named "mesa breakdown".
      MseLoss loss;
      loss.loss = std::numeric_limits<double>::quiet_NaN();
      double norm = std::numeric_limits<double>::quiet_NaN();
      const char* bad = nullptr;
      double bad_value = 0;
      std::string breakdown;
      try {
        prepare_shards(batch.inputs.rows() / batch.seq_len, batch.seq_len);
        if (sharded_) {
          // Forward, loss and backward of every shard; the gradients are written.
          loss = sharded_->compute(batch.inputs, batch.targets, batch.seq_len);
        } else {
          zero_grad(params_);
          const RowMatrix<T> pred = model_.forward(batch.inputs, batch.seq_len, cache);
          loss = mse_loss_forward<T>(pred, batch.targets, batch.seq_len);
          // A non-finite loss makes every gradient non-finite too: no backward then.
          if (std::isfinite(loss.loss)) {
            RowMatrix<T> dpred(pred.rows(), pred.cols());
            mse_loss_backward<T>(pred, batch.targets, batch.seq_len, dpred);
            model_.backward(dpred, cache);
          }
        }
        if (!std::isfinite(loss.loss)) {
          bad = "loss";
          bad_value = loss.loss;
        } else {
          // The norm before any clipping; clip_grad_norm leaves the gradients
          // alone when it is not finite.
          if (config_.clip_value > 0) {
            norm = global_grad_norm(params_);
            if (std::isfinite(norm)) clip_grad_value(params_, config_.clip_value);
            if (std::isfinite(norm) && config_.clip_norm > 0) clip_grad_norm(params_, config_.clip_norm);
          } else {
            norm = config_.clip_norm > 0 ? clip_grad_norm(params_, config_.clip_norm) : global_grad_norm(params_);
          }
          if (!std::isfinite(norm)) {
            bad = "gradient norm";
            bad_value = norm;
          }
        }
      } catch (const MesaBreakdownError& e) {
        bad = "mesa breakdown";
        bad_value = std::numeric_limits<double>::quiet_NaN();
        breakdown = e.what();
      }
      const double lr = config_.schedule(step_);
      if (bad != nullptr) {
        const bool skip = config_.non_finite == NonFinitePolicy::skip;
        const bool capped =
            skip && config_.max_consecutive_skips > 0 && consecutive_skips_ >= config_.max_consecutive_skips;
        if (!skip || capped) {
          if (progress) progress->finish();
          throw_non_finite(bad, bad_value, capped, breakdown);
        }
        skipped_.push_back(step_);
        ++consecutive_skips_;
        ++result.skipped;
        // One NaN bit pattern, so the history round-trips through a checkpoint exactly.
        losses_.push_back(std::isnan(loss.loss) ? std::numeric_limits<double>::quiet_NaN() : loss.loss);
      } else {
        optimizer_->step(lr);
        consecutive_skips_ = 0;
        losses_.push_back(loss.loss);
      }
      result.grad_norms.push_back(norm);
      tokens += static_cast<long>(batch.inputs.rows());
      ++result.steps_run;
      ++step_;
      if (progress) progress->update(step_, loss.loss, lr);
      if (!config_.checkpoint_path.empty() && config_.checkpoint_every > 0 && step_ % config_.checkpoint_every == 0 &&
          step_ < end && is_root())
        save(config_.checkpoint_path);
    }
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress->finish();
    if (!config_.checkpoint_path.empty() && result.steps_run > 0 && is_root()) save(config_.checkpoint_path);
    result.tokens_per_second = result.seconds > 0 ? static_cast<double>(tokens) / result.seconds : 0.0;
    result.losses = losses_;
    result.skipped_steps = skipped_;
    return result;
  }

  // Model parameters + Adam state + step + loss history + skipped steps + the
  // configuration entries resume() compares, written atomically. Throws
  // std::runtime_error without touching `path` if a weight or Adam moment is
  // not finite (such a checkpoint could only poison the run that resumes it).
  void save(const std::string& path) const {
    check_finite_state(path);
    std::map<std::string, std::string> meta;
    for (auto& [k, v] : own_config_entries()) meta[k] = v;
    meta["trainer.loss_history"] = join(losses_, [](double x) { return detail::format_loss(x); });
    meta["trainer.skipped_steps"] = join(skipped_, [](long s) { return std::to_string(s); });
    save_checkpoint<T>(path, params_, optimizer_.get(), step_, meta);
  }

  // Restores what save() wrote into this trainer's model and optimiser.
  // All or nothing: the file, its configuration entries, the loss history and
  // skipped steps, and every tensor's presence, dtype and shape are validated
  // before anything is changed; on any error this trainer is untouched.
  // A configuration entry that differs from this trainer's throws
  // std::invalid_argument naming the entry and both values; a file without
  // configuration entries (written before they were recorded), a damaged loss
  // history or an unreadable file throw std::runtime_error.
  void resume(const std::string& path) {
    const io::SafetensorsFile f = io::read_safetensors(path);
    const std::string fw = "checkpoint '" + path + "': ";
    check_config(f, path);

    const long step = detail::metadata_integer(f, "step", path);
    const long optim_step = detail::metadata_integer(f, "optim.step", path);

    std::vector<long> skipped;
    for (const std::string& item : split(entry(f, "trainer.skipped_steps", path))) {
      char* end = nullptr;
      const long s = std::strtol(item.c_str(), &end, 10);
      if (item.empty() || end == item.c_str() || *end != '\0' || s < 0 || s >= step ||
          (!skipped.empty() && s <= skipped.back()))
        throw std::runtime_error(fw + "bad skipped step \"" + item + "\" (expected ascending step numbers in [0, " +
                                 std::to_string(step) + "))");
      skipped.push_back(s);
    }
    std::vector<double> losses;
    for (const std::string& item : split(entry(f, "trainer.loss_history", path))) {
      char* end = nullptr;
      const double v = std::strtod(item.c_str(), &end);
      if (item.empty() || end == item.c_str() || *end != '\0')
        throw std::runtime_error(fw + "bad loss history entry \"" + item + "\"");
      losses.push_back(std::isnan(v) ? std::numeric_limits<double>::quiet_NaN() : v);
    }
    if (static_cast<long>(losses.size()) != step)
      throw std::runtime_error(fw + "loss history has " + std::to_string(losses.size()) + " entries but step is " +
                               std::to_string(step));
    {
      std::size_t next = 0;  // the next skipped step
      for (long s = 0; s < step; ++s) {
        const bool was_skipped = next < skipped.size() && skipped[next] == s;
        if (was_skipped) ++next;
        else if (!std::isfinite(losses[static_cast<std::size_t>(s)]))
          throw std::runtime_error(fw + "loss history entry " + std::to_string(s) + " is " +
                                   detail::format_loss(losses[static_cast<std::size_t>(s)]) +
                                   " but step " + std::to_string(s) + " is not a skipped step");
      }
    }
    // Adam counts applied updates: every step but the skipped ones.
    if (optim_step != step - static_cast<long>(skipped.size()))
      throw std::runtime_error(fw + "optim.step is " + std::to_string(optim_step) + " but step " +
                               std::to_string(step) + " minus " + std::to_string(skipped.size()) +
                               " skipped steps is " + std::to_string(step - static_cast<long>(skipped.size())));

    // Validates every tensor, then copies; nothing after this line can throw.
    restore_checkpoint<T>(f, path, params_, optimizer_.get());
    step_ = step;
    losses_ = std::move(losses);
    skipped_ = std::move(skipped);
    consecutive_skips_ = 0;
    for (long s = step_ - 1, k = static_cast<long>(skipped_.size()) - 1; k >= 0 && skipped_[std::size_t(k)] == s;
         --s, --k)
      ++consecutive_skips_;
  }

 private:
  // Resolves the shard count at the first batch (automatic mode; a later
  // batch keeps it) and builds the sharded step when it is > 1.
  void prepare_shards(long sequences, long seq_len) {
    const long s = shards() > 0 ? shards() : auto_shard_count(sequences, seq_len, model_.config(), long(sizeof(T)));
    resolved_shards_ = s;
    if (s > 1 && !sharded_) sharded_ = std::make_unique<ShardedStep<T>>(model_, s, config_.threads, config_.process_group);
  }

  // The process that writes checkpoints and draws progress: rank 0 of the group, or the only one.
  bool is_root() const { return config_.process_group == nullptr || config_.process_group->rank() == 0; }

  static const TrainerConfig& checked(const TrainerConfig& c) {
    const char* where = "Trainer";
    detail::check_positive_size(where, "config.steps", c.steps);
    if (!(std::isfinite(c.clip_norm) && c.clip_norm >= 0))
      detail::fail(where, "config.clip_norm must be finite and >= 0 (0 = off), got ", c.clip_norm);
    if (!(std::isfinite(c.clip_value) && c.clip_value >= 0))
      detail::fail(where, "config.clip_value must be finite and >= 0 (0 = off), got ", c.clip_value);
    if (c.checkpoint_every < 0)
      detail::fail(where, "config.checkpoint_every must be >= 0, got ", c.checkpoint_every);
    if (c.non_finite != NonFinitePolicy::stop && c.non_finite != NonFinitePolicy::skip)
      detail::fail(where, "config.non_finite is not stop or skip (value ", int(c.non_finite), ")");
    if (c.shards < 0) detail::fail(where, "config.shards must be >= 0 (0 = automatic), got ", c.shards);
    if (c.decay != DecayScope::matrices && c.decay != DecayScope::all)
      detail::fail(where, "config.decay is not matrices or all (value ", int(c.decay), ")");
    if (c.max_consecutive_skips < 0)
      detail::fail(where, "config.max_consecutive_skips must be >= 0 (0 = no cap), got ", c.max_consecutive_skips);
    return c;
  }

  [[noreturn]] void throw_non_finite(const char* what, double value, bool capped, const std::string& breakdown) const {
    std::ostringstream os;
    if (breakdown.empty())
      os << "Trainer::run: non-finite " << what << " (" << detail::format_loss(value) << ") at step " << step_;
    else
      os << "Trainer::run: mesa breakdown at step " << step_ << " (" << breakdown << ")";
    if (capped)
      os << ", after " << consecutive_skips_ << " skipped steps in a row (config.max_consecutive_skips = "
         << config_.max_consecutive_skips << ")";
    os << "; the update was not applied: weights, Adam state and step() = " << step_
       << " are as before this step, and no checkpoint was written";
    if (!capped) os << " (config.non_finite = skip would skip this batch)";
    throw NonFiniteError(os.str(), step_, what, value);
  }

  // Throws std::runtime_error if a weight or Adam moment is not finite.
  void check_finite_state(const std::string& path) const {
    auto refuse = [&](const std::string& what, const std::string& name, std::size_t i, double v) {
      throw std::runtime_error("Trainer::save: " + what + " '" + name + "' holds " + detail::format_loss(v) +
                               " at index " + std::to_string(i) + "; refusing to write checkpoint '" + path +
                               "' (the file is untouched)");
    };
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const ParameterView<T>& p = params_[k];
      const std::size_t i = detail::first_non_finite(p.value, p.size);
      if (i < p.size) refuse("parameter", p.name, i, static_cast<double>(p.value[i]));
    }
    const auto& op = optimizer_->params();
    for (std::size_t k = 0; k < op.size(); ++k) {
      const std::vector<T>& m = optimizer_->first_moment(k);
      const std::vector<T>& v = optimizer_->second_moment(k);
      std::size_t i = detail::first_non_finite(m.data(), m.size());
      if (i < m.size()) refuse("Adam first moment of", op[k].name, i, static_cast<double>(m[i]));
      i = detail::first_non_finite(v.data(), v.size());
      if (i < v.size()) refuse("Adam second moment of", op[k].name, i, static_cast<double>(v[i]));
    }
  }

  // The model and trainer entries save() writes (the optimiser's are written
  // by save_checkpoint itself).
  std::vector<std::pair<std::string, std::string>> own_config_entries() const {
    std::vector<std::pair<std::string, std::string>> out;
    detail::append_model_config(out, model_.config());
    detail::append_trainer_config(out, config_);
    return out;
  }

  // Throws unless every configuration entry of this trainer is in f with the
  // same value (see resume()).
  void check_config(const io::SafetensorsFile& f, const std::string& path) const {
    std::vector<std::pair<std::string, std::string>> expected;
    detail::append_model_config(expected, model_.config());
    detail::append_adam_config(expected, optimizer_->config());
    detail::append_trainer_config(expected, config_);
    if (f.metadata.count("model.width") == 0 && f.metadata.count("trainer.clip_norm") == 0)
      throw std::runtime_error("checkpoint '" + path +
                               "': no model or trainer configuration in its metadata (written before mesaopt "
                               "recorded them?); Trainer::resume cannot check it matches and refuses it (its tensors "
                               "can still be read with train::load_checkpoint)");
    for (const auto& [key, value] : expected) {
      const auto it = f.metadata.find(key);
      if (it == f.metadata.end() && value == detail::value_before_recorded(key)) continue;
      if (it == f.metadata.end())
        detail::fail("Trainer::resume", "checkpoint '", path, "' has no \"", key, "\" entry but this trainer has ",
                     key, " = ", value, "; refusing to resume (nothing was changed)");
      if (it->second != value)
        detail::fail("Trainer::resume", "checkpoint '", path, "' was written with ", key, " = ", it->second,
                     " but this trainer has ", key, " = ", value, "; refusing to resume (nothing was changed)");
    }
  }

  static const std::string& entry(const io::SafetensorsFile& f, const std::string& key, const std::string& path) {
    const auto it = f.metadata.find(key);
    if (it == f.metadata.end())
      throw std::runtime_error("checkpoint '" + path + "': metadata has no \"" + key + "\" entry");
    return it->second;
  }

  // "a,b,c" -> {a, b, c}; "" -> {} (an empty history).
  static std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out;
    if (s.empty()) return out;
    std::size_t from = 0;
    for (;;) {
      const std::size_t comma = s.find(',', from);
      out.push_back(s.substr(from, comma == std::string::npos ? std::string::npos : comma - from));
      if (comma == std::string::npos) return out;
      from = comma + 1;
    }
  }

  template <class V, class F>
  static std::string join(const std::vector<V>& v, F format) {
    std::string out;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i) out += ',';
      out += format(v[i]);
    }
    return out;
  }

  nn::Model<T>& model_;
  BatchSource<T> source_;
  TrainerConfig config_;
  std::vector<ParameterView<T>> params_;
  std::unique_ptr<Adam<T>> optimizer_;
  std::unique_ptr<ShardedStep<T>> sharded_;  // when the shard count is > 1
  long resolved_shards_ = 0;                 // the automatic count, once chosen
  long step_ = 0;
  std::vector<double> losses_;
  std::vector<long> skipped_;   // steps skipped for a non-finite loss or gradient norm, ascending
  long consecutive_skips_ = 0;  // skipped steps immediately before step_
};

}  // namespace mesaopt::train
