#pragma once
// train::ShardedStep: the loss and parameter gradients of one batch, computed
// over a fixed number of shards (docs/training.md, "Shards and threads").
//
// The batch of B sequences is cut into S shards of whole sequences, shard s
// holding sequences [s B / S, (s + 1) B / S). Worker threads take shards one
// at a time (WorkerTeam::run) and run the whole model forward, the loss
// and the backward on them: there is no barrier inside the model, one per step
// at the end (the workers are a WorkerTeam, common/worker_team.hpp: threads
// that sleep while they wait, so a busy core elsewhere does not make them
// steal time from each other). Each worker has a replica of the model (the same configuration
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
// Across processes (a train::ProcessGroup, train/process_group.hpp): each rank
// runs an aligned block of the shards, adds its block in the same local tree,
// and the ranks' partial sums go through the rest of the same tree by
// messages; rank 0's result is broadcast. The sum is bit-identical for any
// number of ranks and threads at the same S (docs/distributed.md).
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
#include <mesaopt/common/worker_team.hpp>
#include <mesaopt/nn/model.hpp>
#include <mesaopt/train/loss.hpp>
#include <mesaopt/train/process_group.hpp>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
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
  const char* where = "auto_shard_count";
  detail::check_positive_size(where, "sequences", sequences);
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_positive_size(where, "scalar_bytes", scalar_bytes);
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
  // default, default_num_threads()); it changes no result bit. group: the
  // processes that share the step (nullptr: this process alone); every rank
  // must construct its ShardedStep with the same shards and call compute()
  // with the same batch.
  ShardedStep(nn::Model<T>& model, long shards, int threads, ProcessGroup* group = nullptr)
      : model_(model), shards_(shards), threads_(threads), group_(group) {
    detail::check_positive_size("ShardedStep", "shards", shards);
    if (group_ != nullptr && group_->size() > 1) range_ = rank_shards(shards_, group_->size(), group_->rank());
    else range_ = ShardRange{0, shards_};
    master_ = model_.parameters();
    for (const auto& p : master_) parameter_count_ += p.size;
    grads_.assign(std::size_t(range_.count), std::vector<T>(parameter_count_));
    sums_.resize(std::size_t(range_.count));
    errors_.resize(std::size_t(range_.count));
  }
  ShardedStep(const ShardedStep&) = delete;
  ShardedStep& operator=(const ShardedStep&) = delete;

  long shards() const { return shards_; }
  // The shards this process runs: all of them, or its rank's block.
  ShardRange local_shards() const { return range_; }
  int threads() const { return threads_; }
  void set_threads(int n) { threads_ = n; }

  // inputs (B*T, input_dim), targets (B*T, output_dim), seq_len T; needs
  // B >= shards. Returns the batch's loss and WRITES the master's gradients
  // (no zeroing needed before). If a shard's loss is not finite its backward
  // is not run and the gradients are meaningless: the caller must check the
  // loss first (Trainer does). An exception in a shard (e.g. a mesa layer's
  // MesaBreakdownError) is rethrown after all shards ended, the one of the
  // lowest shard index; the master's gradients are then unspecified. With a
  // group, every rank throws: the rank that ran the failing shard its error,
  // the others std::runtime_error naming the shard and the rank.
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
    const long count = range_.count;
    if (count > 0) {
      const int team = parallel_team_size(count, threads_ > 0 ? threads_ : default_num_threads());
      if (!team_ || team_->size() != team) team_ = std::make_unique<WorkerTeam>(team);
      add_workers(team);
      for (auto& w : workers_) w.has_weights = false;
      team_->run(count, [&](std::ptrdiff_t i, int worker) {
        try {
          run_shard(range_.first + long(i), std::size_t(i), workers_[std::size_t(worker)], inputs, targets, seq_len,
                    sequences);
        } catch (...) {
          errors_[std::size_t(i)] = std::current_exception();
        }
      });
    }
    long failed = shards_;  // the lowest failing shard, shards_ if none
    for (long i = 0; i < count && failed == shards_; ++i)
      if (errors_[std::size_t(i)]) failed = range_.first + i;
    if (group_ != nullptr && group_->size() > 1) failed = group_->min_all(failed);
    if (failed < shards_) {
      if (failed >= range_.first && failed < range_.first + count)
        std::rethrow_exception(errors_[std::size_t(failed - range_.first)]);
      const long owner = failed / shards_per_rank_block(shards_, group_->size());
      throw std::runtime_error(std::string(where) + ": shard " + std::to_string(failed) + " failed on rank " +
                               std::to_string(owner) + " (that rank reports its error)");
    }
    reduce_local();
    if (group_ != nullptr && group_->size() > 1) {
      reduce_across_ranks(seq_len);
    } else {
      result_ = sums_[0];
      write_master(grads_[0].data());
    }
    return mse_loss_normalize(result_);
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

  // Runs global shard s into local slot `slot`.
  void run_shard(long s, std::size_t slot, Worker& w, const ConstMatrixRef<T>& inputs, const ConstMatrixRef<T>& targets, long seq_len,
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
    MseSums& sums = sums_[slot];
    sums = mse_loss_sums<T>(pred, y, seq_len);
    if (!std::isfinite(sums.total)) return;  // the step is rejected; no backward
    RowMatrix<T> dpred(pred.rows(), pred.cols());
    mse_loss_backward_part<T>(pred, y, seq_len, inputs.rows(), dpred);
    w.replica->backward(dpred, w.cache);
    T* g = grads_[slot].data();
    for (const auto& view : p) g = std::copy(view.grad, view.grad + view.size, g);
  }

  // The fixed pairwise tree over this process's shards (local slots; the
  // block starts at a multiple of its size, so the local tree is the global
  // tree's subtree); the result lands in slot 0.
  void reduce_local() {
    const long count = range_.count;
    for (long stride = 1; stride < count; stride *= 2)
      for (long s = 0; s + stride < count; s += 2 * stride) add_into(sums_[std::size_t(s)], grads_[std::size_t(s)].data(),
                                                                     sums_[std::size_t(s + stride)],
                                                                     grads_[std::size_t(s + stride)].data());
  }

  // a += b, in the order of the tree (a is the lower index).
  void add_into(MseSums& a, T* ga, const MseSums& b, const T* gb) const {
    a.total += b.total;
    a.sequences += b.sequences;
    for (std::size_t t = 0; t < a.per_position.size(); ++t) a.per_position[t] += b.per_position[t];
    for (std::size_t i = 0; i < parameter_count_; ++i) ga[i] += gb[i];
  }

  // The rest of the tree over the ranks' partial sums (rank r adds rank
  // r + stride's at each level, as the global tree adds shard blocks), then
  // rank 0's result to every rank, into result_ and the master's gradients.
  // Messages: [total, sequences, per_position (T doubles), gradients].
  void reduce_across_ranks(long seq_len) {
    const int R = group_->size(), r = group_->rank(), active = active_ranks(shards_, R);
    const std::size_t T_ = std::size_t(seq_len);
    const std::size_t head = sizeof(double) + sizeof(long) + T_ * sizeof(double);
    packed_.resize(head + parameter_count_ * sizeof(T));
    received_.resize(packed_.size());
    auto pack = [&](const MseSums& s, const T* g, std::vector<char>& out) {
      char* p = out.data();
      std::memcpy(p, &s.total, sizeof(double));
      std::memcpy(p + sizeof(double), &s.sequences, sizeof(long));
      std::memcpy(p + sizeof(double) + sizeof(long), s.per_position.data(), T_ * sizeof(double));
      std::memcpy(p + head, g, parameter_count_ * sizeof(T));
    };
    auto unpack = [&](const std::vector<char>& in, MseSums& s, std::vector<T>& g) {
      const char* p = in.data();
      s.per_position.resize(T_);
      std::memcpy(&s.total, p, sizeof(double));
      std::memcpy(&s.sequences, p + sizeof(double), sizeof(long));
      std::memcpy(s.per_position.data(), p + sizeof(double) + sizeof(long), T_ * sizeof(double));
      g.resize(parameter_count_);
      std::memcpy(g.data(), p + head, parameter_count_ * sizeof(T));
    };
    if (r < active) {
      for (int stride = 1; stride < active; stride *= 2) {
        if (r % (2 * stride) == 0) {
          if (r + stride < active) {
            group_->receive(r + stride, received_.data(), received_.size());
            unpack(received_, other_sums_, other_grads_);
            add_into(sums_[0], grads_[0].data(), other_sums_, other_grads_.data());
          }
        } else {
          pack(sums_[0], grads_[0].data(), packed_);
          group_->send(r - stride, packed_.data(), packed_.size());
          break;
        }
      }
    }
    if (r == 0) pack(sums_[0], grads_[0].data(), packed_);
    group_->broadcast(packed_.data(), packed_.size(), 0);
    unpack(packed_, result_, other_grads_);
    write_master(other_grads_.data());
  }

  void write_master(const T* g) {
    for (const auto& m : master_) {
      std::copy(g, g + m.size, m.grad);
      g += m.size;
    }
  }

  nn::Model<T>& model_;
  long shards_;
  int threads_;
  ProcessGroup* group_ = nullptr;
  ShardRange range_;
  std::vector<ParameterView<T>> master_;
  std::size_t parameter_count_ = 0;
  std::vector<Worker> workers_;
  std::vector<std::vector<T>> grads_;  // per local shard, the master's parameters in order, flat
  std::vector<MseSums> sums_;          // per local shard
  MseSums result_;                     // the batch's sums after the whole tree
  std::vector<char> packed_, received_;  // messages between ranks
  MseSums other_sums_;
  std::vector<T> other_grads_;
  std::vector<std::exception_ptr> errors_;
  // The threads that run the shards (sleeping between and inside steps; made
  // at the first step, again when the thread count changes).
  std::unique_ptr<WorkerTeam> team_;
};

}  // namespace mesaopt::train
