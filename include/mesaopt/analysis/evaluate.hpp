#pragma once
// Loss of a model on a batch, for comparing a model with its compressed or
// linearised version (docs/analysis.md): the per-position loss of
// docs/paper.md §1 (½ ||y_t - ŷ_t||², averaged over the sequences) and the
// ratio of two models' average losses (the paper's "test-loss ratio").
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/learners/context.hpp>
#include <mesaopt/nn/model.hpp>

#include <vector>

namespace mesaopt::analysis {

// Entry t-1: the mean over sequences of ½ ||y_t - model(x)_t||².
// x (B*T, input_dim), y (B*T, output_dim), sequence-major.
template <class T>
std::vector<double> model_loss_curve(nn::Model<T>& model, ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len) {
  nn::ModelCache<T> cache;
  const RowMatrix<T> pred = model.forward(x, seq_len, cache);
  return learners::loss_curve(pred, y, seq_len);
}

// mean(model_loss_curve(a)) / mean(model_loss_curve(b)).
template <class T>
double loss_ratio(nn::Model<T>& a, nn::Model<T>& b, ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len) {
  const double la = learners::mean_of(model_loss_curve(a, x, y, seq_len));
  const double lb = learners::mean_of(model_loss_curve(b, x, y, seq_len));
  if (!(lb > 0)) detail::fail("loss_ratio", "the reference model's average loss is ", lb, " (must be > 0)");
  return la / lb;
}

}  // namespace mesaopt::analysis
