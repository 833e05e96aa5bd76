#pragma once
// Named access to a model's parameters for the analysis tools (docs/analysis.md):
// a model's ParameterViews by name, one view as a matrix, and copying values
// between models by name. Shared by capture, compression and linearisation,
// which all build new nn::Models from an existing one (nn::Model is not
// copyable; its parameters are reachable only through Model::parameters()).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/nn/model.hpp>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace mesaopt::analysis {

// The model's parameter views keyed by name ("block0.attn.W_q", ...).
template <class T>
std::map<std::string, ParameterView<T>> parameters_by_name(nn::Model<T>& model) {
  std::map<std::string, ParameterView<T>> m;
  for (const ParameterView<T>& v : model.parameters()) m.emplace(v.name, v);
  return m;
}

}  // namespace mesaopt::analysis

namespace mesaopt::detail {

// The view called `name`; throws std::invalid_argument naming it if absent.
template <class T>
const ParameterView<T>& parameter_named(const char* where, const std::map<std::string, ParameterView<T>>& params,
                                        const std::string& name) {
  const auto it = params.find(name);
  if (it == params.end()) fail(where, "the model has no parameter named \"", name, "\"");
  return it->second;
}

// A 2-D parameter as a (rows, cols) double matrix (shape checked).
template <class T>
RowMatrix<double> parameter_matrix(const char* where, const std::map<std::string, ParameterView<T>>& params,
                                   const std::string& name, long rows, long cols) {
  const ParameterView<T>& v = parameter_named(where, params, name);
  if (v.size != std::size_t(rows * cols))
    fail(where, "parameter \"", name, "\" has ", v.size, " values but ", rows, " x ", cols, " were expected");
  return Eigen::Map<const RowMatrix<T>>(v.value, rows, cols).template cast<double>();
}

// Copies src's values into dst (sizes must match).
template <class T>
void copy_parameter_values(const char* where, const ParameterView<T>& src, const ParameterView<T>& dst) {
  if (src.size != dst.size || src.shape != dst.shape)
    fail(where, "cannot copy parameter \"", src.name, "\" (", src.size, " values) into \"", dst.name, "\" (",
         dst.size, " values): shapes differ");
  std::copy(src.value, src.value + src.size, dst.value);
}

}  // namespace mesaopt::detail

namespace mesaopt::analysis {

// Copies into `to` every parameter of `from` whose name, after replacing the
// prefix `from_prefix` by `to_prefix`, is a parameter of `to` (only names that
// start with from_prefix are considered; "" = all). Throws std::invalid_argument
// if a matching pair differs in shape. Returns the number of views copied.
template <class T>
std::size_t copy_parameters_by_name(nn::Model<T>& from, nn::Model<T>& to, const std::string& from_prefix = "",
                                    const std::string& to_prefix = "") {
  const char* where = "copy_parameters_by_name";
  const auto dst = parameters_by_name(to);
  std::size_t copied = 0;
  for (const ParameterView<T>& v : from.parameters()) {
    if (v.name.compare(0, from_prefix.size(), from_prefix) != 0) continue;
    const auto it = dst.find(to_prefix + v.name.substr(from_prefix.size()));
    if (it == dst.end()) continue;
    detail::copy_parameter_values(where, v, it->second);
    ++copied;
  }
  return copied;
}

}  // namespace mesaopt::analysis
