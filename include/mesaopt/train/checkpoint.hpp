#pragma once
// Training checkpoints as safetensors files (io/safetensors.hpp): a model's
// weights, the Adam/AdamW state and the step, readable by PyTorch / JAX tools
// (safetensors.torch.load_file, safetensors.numpy.load_file).
//
// Tensors (all in the model's dtype, F32 or F64, with the parameter's shape):
//   "<name>"           every parameter, named as in parameters(out, prefix)
//   "optim.m.<name>"   Adam first moment of that parameter   (with an optimiser)
//   "optim.v.<name>"   Adam second moment                      (with an optimiser)
// "__metadata__" (all values strings):
//   "format": "mesaopt.checkpoint", "format_version": "1", "dtype": "F32"|"F64",
//   "step": training step, and with an optimiser "optim.step" (Adam's t),
//   "optim.type" ("adamw"|"adam"), "optim.beta1", "optim.beta2", "optim.eps",
//   "optim.weight_decay"; plus the caller's own keys (which may not reuse these).
//
// Saving is atomic (io::write_file_atomically). Loading validates the whole file
// first (io::parse_safetensors), then that "step" (and "optim.step" when restoring
// an optimiser) is a non-negative integer, that every expected tensor is
// present with the model's dtype and the parameter's shape, and that the file
// holds no unexpected tensor (optimiser tensors are skipped when no optimiser
// is restored); only then are values copied, so a failed load leaves the model
// and optimiser untouched. Errors are std::runtime_error naming the file and
// the tensor or key. restore_checkpoint does the same from a file already
// parsed in memory (load_checkpoint = io::read_safetensors + restore_checkpoint).
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/train/adam.hpp>
#include <mesaopt/io/safetensors.hpp>

#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace mesaopt::train {

struct CheckpointInfo {
  long step = 0;                                // "step" from the metadata
  std::map<std::string, std::string> metadata;  // all of "__metadata__"
};

}  // namespace mesaopt::train

namespace mesaopt::detail {

inline std::string format_double(double x) {
  std::ostringstream os;
  os.precision(17);
  os << x;
  return os.str();
}

template <class T>
std::vector<std::uint64_t> checked_shape(const char* where, const ParameterView<T>& p) {
  std::vector<std::uint64_t> shape;
  std::size_t count = 1;
  for (long d : p.shape) {
    if (d < 0) fail(where, "parameter '", p.name, "' has a negative dimension ", d);
    shape.push_back(static_cast<std::uint64_t>(d));
    count *= static_cast<std::size_t>(d);
  }
  if (count != p.size)
    fail(where, "parameter '", p.name, "' has size ", p.size, " but its shape holds ", count);
  if (p.size > 0 && p.value == nullptr) fail(where, "parameter '", p.name, "' has null value");
  return shape;
}

inline long metadata_integer(const io::SafetensorsFile& f, const std::string& key, const std::string& path) {
  const auto it = f.metadata.find(key);
  if (it == f.metadata.end())
    throw std::runtime_error("checkpoint '" + path + "': metadata has no \"" + key + "\" entry");
  if (it->second.empty()) throw std::runtime_error("checkpoint '" + path + "': metadata \"" + key + "\" is empty");
  return static_cast<long>(io::json::to_index(it->second, "checkpoint '" + path + "': metadata \"" + key + "\"",
                                              static_cast<std::uint64_t>(std::numeric_limits<long>::max())));
}

}  // namespace mesaopt::detail

namespace mesaopt::train {

// Writes `params` (and, when `optimizer` is not null, its moments and step) to
// `path` atomically. `metadata` adds the caller's own string entries.
// Throws std::invalid_argument on bad arguments, std::runtime_error on I/O errors.
template <class T>
void save_checkpoint(const std::string& path, const std::vector<ParameterView<T>>& params, const Adam<T>* optimizer,
                     long step, const std::map<std::string, std::string>& metadata = {}) {
  const char* where = "save_checkpoint";
  if (step < 0) detail::fail(where, "step must be >= 0, got ", step);
  const std::string dtype = io::safetensors_dtype<T>();
  std::map<std::string, std::string> meta = {{"format", "mesaopt.checkpoint"},
                                             {"format_version", "1"},
                                             {"dtype", dtype},
                                             {"step", std::to_string(step)}};
  std::vector<io::SafetensorsTensorRef> tensors;
  for (const auto& p : params) tensors.push_back({p.name, dtype, detail::checked_shape(where, p), p.value});
  if (optimizer != nullptr) {
    const AdamConfig& c = optimizer->config();
    meta["optim.step"] = std::to_string(optimizer->step_count());
    meta["optim.type"] = c.decoupled_weight_decay ? "adamw" : "adam";
    meta["optim.beta1"] = detail::format_double(c.beta1);
    meta["optim.beta2"] = detail::format_double(c.beta2);
    meta["optim.eps"] = detail::format_double(c.eps);
    meta["optim.weight_decay"] = detail::format_double(c.weight_decay);
    const auto& op = optimizer->params();
    for (std::size_t k = 0; k < op.size(); ++k) {
      const auto shape = detail::checked_shape(where, op[k]);
      tensors.push_back({"optim.m." + op[k].name, dtype, shape, optimizer->first_moment(k).data()});
      tensors.push_back({"optim.v." + op[k].name, dtype, shape, optimizer->second_moment(k).data()});
    }
  }
  for (const auto& [k, v] : metadata) {
    if (meta.count(k)) detail::fail(where, "metadata key '", k, "' is reserved by the checkpoint format");
    meta[k] = v;
  }
  io::write_safetensors(path, tensors, meta);  // rejects duplicate names
}

// Restores `params` (and the optimiser's moments and step when `optimizer` is
// not null) from the parsed file `f`, named `path` in errors; returns the step
// and metadata. See the header comment for what is validated; on any error
// nothing is modified.
template <class T>
CheckpointInfo restore_checkpoint(const io::SafetensorsFile& f, const std::string& path,
                                  const std::vector<ParameterView<T>>& params, Adam<T>* optimizer = nullptr) {
  const char* where = "load_checkpoint";
  const std::string dtype = io::safetensors_dtype<T>();
  const std::string fw = "checkpoint '" + path + "': ";

  CheckpointInfo info;
  info.step = detail::metadata_integer(f, "step", path);
  info.metadata = f.metadata;
  long optim_step = 0;
  if (optimizer != nullptr) optim_step = detail::metadata_integer(f, "optim.step", path);

  // Every destination with the tensor name it reads from.
  struct Target {
    std::string name;
    std::vector<std::uint64_t> shape;
    T* dest;
    const io::SafetensorsTensor* src = nullptr;
  };
  std::vector<Target> targets;
  for (const auto& p : params) targets.push_back({p.name, detail::checked_shape(where, p), p.value});
  if (optimizer != nullptr) {
    const auto& op = optimizer->params();
    for (std::size_t k = 0; k < op.size(); ++k) {
      const auto shape = detail::checked_shape(where, op[k]);
      targets.push_back({"optim.m." + op[k].name, shape, optimizer->first_moment(k).data()});
      targets.push_back({"optim.v." + op[k].name, shape, optimizer->second_moment(k).data()});
    }
  }
  std::set<std::string> expected;
  for (auto& t : targets) {
    if (!expected.insert(t.name).second) detail::fail(where, "duplicate parameter name '", t.name, "'");
    t.src = f.find(t.name);
    if (t.src == nullptr) throw std::runtime_error(fw + "tensor \"" + t.name + "\" is missing");
    if (t.src->dtype != dtype)
      throw std::runtime_error(fw + "tensor \"" + t.name + "\" has dtype " + t.src->dtype + " but the model is " + dtype);
    if (t.src->shape != t.shape) {
      auto show = [](const std::vector<std::uint64_t>& s) {
        std::string out = "[";
        for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
        return out + "]";
      };
      throw std::runtime_error(fw + "tensor \"" + t.name + "\" has shape " + show(t.src->shape) +
                               " but the model expects " + show(t.shape));
    }
  }
  for (const auto& t : f.tensors) {
    if (expected.count(t.name)) continue;
    if (optimizer == nullptr && t.name.rfind("optim.", 0) == 0) continue;
    throw std::runtime_error(fw + "unexpected tensor \"" + t.name + "\" (not a parameter of this model)");
  }

  // Everything checked: copy (little-endian file -> host order).
  for (const auto& t : targets) {
    const std::size_t nbytes = static_cast<std::size_t>(t.src->end - t.src->begin);
    if (nbytes == 0) continue;
    std::memcpy(t.dest, f.data(*t.src), nbytes);
    if (!detail::host_is_little_endian()) detail::swap_elements(reinterpret_cast<char*>(t.dest), nbytes, sizeof(T));
  }
  if (optimizer != nullptr) optimizer->set_step_count(optim_step);
  return info;
}

// io::read_safetensors(path) + restore_checkpoint.
template <class T>
CheckpointInfo load_checkpoint(const std::string& path, const std::vector<ParameterView<T>>& params,
                               Adam<T>* optimizer = nullptr) {
  return restore_checkpoint(io::read_safetensors(path), path, params, optimizer);
}

}  // namespace mesaopt::train
