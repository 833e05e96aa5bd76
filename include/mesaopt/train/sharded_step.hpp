#pragma once
// train::ShardedStep: the loss and parameter gradients of one batch, computed
// over a fixed number of shards (docs/training.md, "Shards and threads").
//
// The batch of B sequences is cut into S shards of whole sequences, shard s
// holding sequences [s B / S, (s + 1) B / S). Worker threads take shards one
// at a time (parallel_for_dynamic) and run the whole model forward, the loss
// and the backward on them: there is no barrier inside the model, one per step
// at the end. Each worker has a replica of the model (the same configuration
// with its own copy of the weights, gradient buffers and activations, its
// attention layers on one thread); each SHARD has its own gradient buffer, into
// which the worker's replica leaves that shard's gradients. Then the shards'
// loss sums and gradients are added in a fixed pairwise tree over shard indices,
//   S = 4:  (g0 + g1) + (g2 + g3),   S = 3:  (g0 + g1) + g2,
// so the result depends on S but not on the thread count or on which thread
// ran which shard: bit-identical for any number of threads. Each shard's
// gradient is that of the WHOLE batch's loss restricted to its sequences
// (dpred = (pred - target) / (B T), mse_loss_backward_part), so the tree sum
// is the batch gradient; it differs from the unsharded computation (S = 1)
// only by the order of the sums over sequences, i.e. by rounding.
//
// Replicas per worker, not per shard: a shard's activations (all layers, kept
// for the backward) are a few MiB for the paper's models, and S replicas'
// worth of them cycled through the caches every step, where a worker's replica
// reuses the same memory for each of its shards (docs/training.md).
//
// Why: the per-op threading of the layers (one fork/join per op, dozens per
// step) spends a share of a small model's step in the OpenMP runtime and
// collapses when another process takes a core (threads wait at every barrier
// for the one that is descheduled); here a descheduled thread holds up only
// the shard it is running. Measurements: docs/training.md.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/nn/model.hpp>
#include <mesaopt/train/loss.hpp>

#include <algorithm>
#include <cstddef>
#include <exception>
#include <memory>
#include <vector>

namespace mesaopt::train {

// First sequence of shard s when B sequences are cut into S shards.
inline long shard_begin(long s, long shards, long sequences) { return s * sequences / shards; }

// The shard count TrainerConfig::shards = 0 (automatic) picks for a batch of
// B sequences when nothing is known of the model: min(B, 8) when B >= 2, else
// 1 (one sequence: the layers' per-op threads are the only parallelism there
// is).
inline long auto_shard_count(long sequences) { return sequences >= 2 ? (sequences < 8 ? sequences : 8) : 1; }

// Scalars per token that a model keeps from its forward for the backward, as
// estimated from its configuration: per block the block's input (with the
// positional code), the LayerNorm output, q, k, v, the heads' outputs and the
// block's output, and the MLP's two hidden activations. An estimate for sizing
// shards, not an account of every buffer.
inline long activation_scalars_per_token(const nn::ModelConfig& c) {
  long total = c.embed ? c.input_dim + c.width : c.width;
  for (const nn::BlockConfig& b : c.blocks) {
    total += c.width + b.positional_dim + (b.layer_norm ? c.width : 0);
    total += b.heads * (2 * b.key_size + 2 * b.value_size) + c.width;
    if (b.mlp) total += 2 * b.mlp_hidden + (b.layer_norm ? c.width : 0);
  }
  return total;
}

// Estimated activations of one shard the automatic count aims to stay under.
inline constexpr long kShardActivationBudgetBytes = 3L << 20;

// The shard count TrainerConfig::shards = 0 (automatic) picks for a batch of
// B sequences of seq_len tokens through a model with this configuration and
// scalars of scalar_bytes: shards of at most 8 sequences, and fewer (a power
// of two) when 8 sequences' activations (activation_scalars_per_token) would
// exceed kShardActivationBudgetBytes; never fewer than min(B, 8) shards nor
// more than B. A function of the batch shape and the model alone, never of
// the thread count or the machine, so a run's numbers do not depend on where
// it runs. Why: a worker runs a shard's whole forward and then its backward,
// and once the shard's activations no longer fit in the caches its recurrent
// ops wait on memory (linear-6L at batch 64: 8 shards of 8 sequences ran at
// 0.6-0.9x of 16 shards of 4; docs/training.md, "Shards and threads").
inline long auto_shard_count(long sequences, long seq_len, const nn::ModelConfig& config, long scalar_bytes) {
  if (sequences < 2) return 1;
  const long per_sequence = seq_len * activation_scalars_per_token(config) * scalar_bytes;
  long per_shard = 8;
  while (per_shard > 1 && per_shard * per_sequence > kShardActivationBudgetBytes) per_shard /= 2;
  const long shards = (sequences + per_shard - 1) / per_shard;
  return std::min(sequences, std::max(auto_shard_count(sequences), shards));
}

template <class T>
class ShardedStep {
 public:
  // model: the model whose parameters get the gradients (the master); it must
  // outlive this object. shards >= 1. threads: workers (<= 0: the library
  // default, default_num_threads()); it changes no result bit.
  ShardedStep(nn::Model<T>& model, long shards, int threads) : model_(model), shards_(shards), threads_(threads) {
    detail::check_positive_size("ShardedStep", "shards", shards);
    master_ = model_.parameters();
    for (const auto& p : master_) parameter_count_ += p.size;
    grads_.assign(std::size_t(shards_), std::vector<T>(parameter_count_));
    sums_.resize(std::size_t(shards_));
    errors_.resize(std::size_t(shards_));
  }
  ShardedStep(const ShardedStep&) = delete;
  ShardedStep& operator=(const ShardedStep&) = delete;

  long shards() const { return shards_; }
  int threads() const { return threads_; }
  void set_threads(int n) { threads_ = n; }

  // inputs (B*T, input_dim), targets (B*T, output_dim), seq_len T; needs
  // B >= shards. Returns the batch's loss and WRITES the master's gradients
  // (no zeroing needed before). If a shard's loss is not finite its backward
  // is not run and the gradients are meaningless: the caller must check the
  // loss first (Trainer does). An exception in a shard (e.g. a mesa layer's
  // MesaBreakdownError) is rethrown after all shards ended, the one of the
  // lowest shard index; the master's gradients are then unspecified.
  MseLoss compute(ConstMatrixRef<T> inputs, ConstMatrixRef<T> targets, long seq_len) {
    const char* where = "ShardedStep::compute";
    detail::check_positive_size(where, "seq_len", seq_len);
    detail::check_shape(where, "targets", targets, inputs.rows(), model_.config().output_dim);
    if (inputs.rows() % seq_len != 0)
      detail::fail(where, "inputs have ", inputs.rows(), " rows, not a multiple of seq_len = ", seq_len);
    const long sequences = inputs.rows() / seq_len;
    if (sequences < shards_)
      detail::fail(where, "the batch has ", sequences, " sequences, fewer than shards = ", shards_,
                   " (each shard needs at least one sequence)");
    std::fill(errors_.begin(), errors_.end(), nullptr);
    add_workers(parallel_team_size(shards_, threads_));
    for (auto& w : workers_) w.has_weights = false;
    parallel_for_dynamic(shards_, threads_, [&](std::ptrdiff_t i, int worker) {
      try {
        run_shard(long(i), workers_[std::size_t(worker)], inputs, targets, seq_len, sequences);
      } catch (...) {
        errors_[std::size_t(i)] = std::current_exception();
      }
    });
    for (const auto& e : errors_)
      if (e) std::rethrow_exception(e);
    reduce();
    return mse_loss_normalize(sums_[0]);
  }

 private:
  // A worker's model replica, its parameter views (in the master's order) and
  // activations.
  struct Worker {
    std::unique_ptr<nn::Model<T>> replica;
    std::vector<ParameterView<T>> params;
    typename nn::Model<T>::Cache cache;
    bool has_weights = false;  // the master's weights copied in this step
  };

  void add_workers(int count) {
    const char* where = "ShardedStep";
    nn::ModelConfig rc = model_.config();
    rc.num_threads = 1;  // the shards are the parallelism
    while (long(workers_.size()) < count) {
      Worker w;
      w.replica = std::make_unique<nn::Model<T>>(rc);
      w.params = w.replica->parameters();
      if (w.params.size() != master_.size()) detail::fail(where, "replica has another parameter list than the model");
      for (std::size_t k = 0; k < w.params.size(); ++k)
        if (w.params[k].name != master_[k].name || w.params[k].size != master_[k].size)
          detail::fail(where, "replica parameter '", w.params[k].name, "' does not match the model's '",
                       master_[k].name, "'");
      workers_.push_back(std::move(w));
    }
  }

  void run_shard(long s, Worker& w, const ConstMatrixRef<T>& inputs, const ConstMatrixRef<T>& targets, long seq_len,
                 long sequences) {
    const auto& p = w.params;
    for (std::size_t k = 0; k < p.size(); ++k) {
      if (!w.has_weights) std::copy(master_[k].value, master_[k].value + p[k].size, p[k].value);
      std::fill(p[k].grad, p[k].grad + p[k].size, T(0));
    }
    w.has_weights = true;
    const long b0 = shard_begin(s, shards_, sequences), b1 = shard_begin(s + 1, shards_, sequences);
    const long r0 = b0 * seq_len, rows = (b1 - b0) * seq_len;
    const auto x = inputs.middleRows(r0, rows);
    const auto y = targets.middleRows(r0, rows);
    const RowMatrix<T> pred = w.replica->forward(x, seq_len, w.cache);
    MseSums& sums = sums_[std::size_t(s)];
    sums = mse_loss_sums<T>(pred, y, seq_len);
    if (!std::isfinite(sums.total)) return;  // the step is rejected; no backward
    RowMatrix<T> dpred(pred.rows(), pred.cols());
    mse_loss_backward_part<T>(pred, y, seq_len, inputs.rows(), dpred);
    w.replica->backward(dpred, w.cache);
    T* g = grads_[std::size_t(s)].data();
    for (const auto& view : p) g = std::copy(view.grad, view.grad + view.size, g);
  }

  // The fixed pairwise tree over shard indices; the result lands in shard 0's
  // sums and gradients, which are then copied to the master.
  void reduce() {
    for (long stride = 1; stride < shards_; stride *= 2) {
      for (long s = 0; s + stride < shards_; s += 2 * stride) {
        MseSums& a = sums_[std::size_t(s)];
        const MseSums& b = sums_[std::size_t(s + stride)];
        a.total += b.total;
        a.sequences += b.sequences;
        for (std::size_t t = 0; t < a.per_position.size(); ++t) a.per_position[t] += b.per_position[t];
        T* ga = grads_[std::size_t(s)].data();
        const T* gb = grads_[std::size_t(s + stride)].data();
        for (std::size_t i = 0; i < parameter_count_; ++i) ga[i] += gb[i];
      }
    }
    const T* g = grads_[0].data();
    for (const auto& m : master_) {
      std::copy(g, g + m.size, m.grad);
      g += m.size;
    }
  }

  nn::Model<T>& model_;
  long shards_;
  int threads_;
  std::vector<ParameterView<T>> master_;
  std::size_t parameter_count_ = 0;
  std::vector<Worker> workers_;
  std::vector<std::vector<T>> grads_;  // per shard, the master's parameters in order, flat
  std::vector<MseSums> sums_;
  std::vector<std::exception_ptr> errors_;
};

}  // namespace mesaopt::train
