#pragma once
// train::ShardedStep: the loss and parameter gradients of one batch, computed
// over a fixed number of shards (docs/training.md, "Shards and threads").
//
// The batch of B sequences is cut into S shards of whole sequences, shard s
// holding sequences [s B / S, (s + 1) B / S). Every shard has a replica of the
// model: the same configuration with its own copy of the weights, its own
// gradient buffers and activations, and its attention layers on one thread.
// Worker threads take shards one at a time (parallel_for_dynamic) and run the
// whole model forward, the loss and the backward on them: there is no barrier
// inside the model, one per step at the end. Then the shards' loss sums and
// gradients are added in a fixed pairwise tree over shard indices,
//   S = 4:  (g0 + g1) + (g2 + g3),   S = 3:  (g0 + g1) + g2,
// so the result depends on S but not on the thread count or on which thread
// ran which shard: bit-identical for any number of threads. Each shard's
// gradient is that of the WHOLE batch's loss restricted to its sequences
// (dpred = (pred - target) / (B T), mse_loss_backward_part), so the tree sum
// is the batch gradient; it differs from the unsharded computation (S = 1)
// only by the order of the sums over sequences, i.e. by rounding.
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
// B sequences: min(B, 8) when B >= 2, else 1 (one sequence: the layers'
// per-op threads are the only parallelism there is). A function of B alone,
// never of the thread count, so a run's numbers do not depend on the machine.
// Why 8: on the paper's models it was the fastest count or within noise of it
// (docs/training.md, "Shards and threads").
inline long auto_shard_count(long sequences) { return sequences >= 2 ? (sequences < 8 ? sequences : 8) : 1; }

template <class T>
class ShardedStep {
 public:
  // model: the model whose parameters get the gradients (the master); it must
  // outlive this object. shards >= 1. threads: workers (<= 0: the library
  // default, default_num_threads()); it changes no result bit.
  ShardedStep(nn::Model<T>& model, long shards, int threads) : model_(model), shards_(shards), threads_(threads) {
    const char* where = "ShardedStep";
    detail::check_positive_size(where, "shards", shards);
    master_ = model_.parameters();
    nn::ModelConfig rc = model_.config();
    rc.num_threads = 1;  // the shards are the parallelism
    for (long s = 0; s < shards_; ++s) {
      replicas_.push_back(std::make_unique<nn::Model<T>>(rc));
      params_.push_back(replicas_.back()->parameters());
      const auto& p = params_.back();
      if (p.size() != master_.size()) detail::fail(where, "replica has another parameter list than the model");
      for (std::size_t k = 0; k < p.size(); ++k)
        if (p[k].name != master_[k].name || p[k].size != master_[k].size)
          detail::fail(where, "replica parameter '", p[k].name, "' does not match the model's '", master_[k].name, "'");
    }
    caches_.resize(std::size_t(shards_));
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
    parallel_for_dynamic(shards_, threads_, [&](std::ptrdiff_t i) {
      try {
        run_shard(long(i), inputs, targets, seq_len, sequences);
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
  void run_shard(long s, const ConstMatrixRef<T>& inputs, const ConstMatrixRef<T>& targets, long seq_len,
                 long sequences) {
    nn::Model<T>& replica = *replicas_[std::size_t(s)];
    const auto& p = params_[std::size_t(s)];
    for (std::size_t k = 0; k < p.size(); ++k) {
      std::copy(master_[k].value, master_[k].value + p[k].size, p[k].value);
      std::fill(p[k].grad, p[k].grad + p[k].size, T(0));
    }
    const long b0 = shard_begin(s, shards_, sequences), b1 = shard_begin(s + 1, shards_, sequences);
    const long r0 = b0 * seq_len, rows = (b1 - b0) * seq_len;
    const auto x = inputs.middleRows(r0, rows);
    const auto y = targets.middleRows(r0, rows);
    typename nn::Model<T>::Cache& cache = caches_[std::size_t(s)];
    const RowMatrix<T> pred = replica.forward(x, seq_len, cache);
    MseSums& sums = sums_[std::size_t(s)];
    sums = mse_loss_sums<T>(pred, y, seq_len);
    if (!std::isfinite(sums.total)) return;  // the step is rejected; no backward
    RowMatrix<T> dpred(pred.rows(), pred.cols());
    mse_loss_backward_part<T>(pred, y, seq_len, inputs.rows(), dpred);
    replica.backward(dpred, cache);
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
        const auto& pa = params_[std::size_t(s)];
        const auto& pb = params_[std::size_t(s + stride)];
        for (std::size_t k = 0; k < pa.size(); ++k) {
          T* ga = pa[k].grad;
          const T* gb = pb[k].grad;
          for (std::size_t i = 0; i < pa[k].size; ++i) ga[i] += gb[i];
        }
      }
    }
    const auto& p0 = params_[0];
    for (std::size_t k = 0; k < p0.size(); ++k) std::copy(p0[k].grad, p0[k].grad + p0[k].size, master_[k].grad);
  }

  nn::Model<T>& model_;
  long shards_;
  int threads_;
  std::vector<ParameterView<T>> master_;
  std::vector<std::unique_ptr<nn::Model<T>>> replicas_;
  std::vector<std::vector<ParameterView<T>>> params_;  // per replica, in the master's order
  std::vector<typename nn::Model<T>::Cache> caches_;
  std::vector<MseSums> sums_;
  std::vector<std::exception_ptr> errors_;
};

}  // namespace mesaopt::train
