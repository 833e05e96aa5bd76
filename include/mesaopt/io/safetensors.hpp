#pragma once
// Reading and writing the safetensors format (https://github.com/huggingface/safetensors),
// so checkpoints open in PyTorch / JAX / numpy tools:
//
//   bytes [0, 8)        N, the header length, unsigned 64-bit little-endian
//   bytes [8, 8 + N)    a JSON object (UTF-8), padded with spaces:
//                         {"__metadata__": {"key": "string value", ...},
//                          "<tensor name>": {"dtype": "F32", "shape": [r, c],
//                                            "data_offsets": [begin, end]}, ...}
//   bytes [8 + N, end)  the data buffer; tensor bytes are [begin, end) of it,
//                       row-major, little-endian
//
// write_safetensors is atomic: it writes a temporary file in the target's
// directory, flushes and fsyncs it, renames it over the target and fsyncs the
// directory, so a crash or error at any point leaves either the old file or the
// complete new one, never a torn one (POSIX rename is atomic).
//
// parse_safetensors validates everything, as the reference implementation
// does, and throws std::runtime_error naming the problem: the file holds the
// 8-byte length; N <= 100 MB and N <= file size - 8; the header is well-formed
// UTF-8 JSON whose top level is an object; "__metadata__" (optional) maps
// strings to strings; every tensor entry has exactly dtype (a known
// safetensors dtype), shape (non-negative integers) and data_offsets
// (begin <= end); end - begin = product(shape) * dtype size (overflow-checked);
// sorted by begin, the tensors tile the data buffer exactly: the first starts
// at 0, each starts where the previous ended (no overlap, no gap) and the last
// ends at the end of the file; no key occurs twice (tensor names, metadata
// keys, fields of an entry).
//
// The header is attacker-controlled input, so parsing is linear in its size
// (up to the O(t log t) sorts of the t tensors by name and by offset; sorting,
// not hashing, so no input can provoke a worst case) and its memory is
// proportional to it: two passes of json::Reader, the first checking the
// syntax and counting the entries, the second building only the tensor list,
// the metadata and a sorted name index, never a JSON tree.
#include <mesaopt/common/check.hpp>
#include <mesaopt/io/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace mesaopt::io {

// Bytes per element of a safetensors dtype name, or 0 if unknown.
inline std::size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},   {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4},  {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

// The dtype name of a C++ scalar.
template <class T>
const char* safetensors_dtype();
template <>
inline const char* safetensors_dtype<float>() { return "F32"; }
template <>
inline const char* safetensors_dtype<double>() { return "F64"; }

inline constexpr std::uint64_t kSafetensorsMaxHeader = 100000000;  // as the reference implementation

struct SafetensorsTensor {
  std::string name;
  std::string dtype;                 // e.g. "F32"
  std::vector<std::uint64_t> shape;  // row-major
  std::uint64_t begin = 0, end = 0;  // byte range within the data buffer
};

struct SafetensorsFile {
  std::vector<char> bytes;        // the whole file
  std::uint64_t data_start = 0;   // 8 + N
  std::vector<SafetensorsTensor> tensors;       // in header order
  std::map<std::string, std::string> metadata;  // "__metadata__"
  std::vector<std::size_t> by_name;             // indices into tensors, sorted by name (set by parse_safetensors)

  // The tensor named `name`, or nullptr: a binary search of by_name, or a
  // linear scan when by_name does not index `tensors` (edited by hand).
  const SafetensorsTensor* find(const std::string& name) const {
    if (by_name.size() != tensors.size()) {
      for (const auto& t : tensors)
        if (t.name == name) return &t;
      return nullptr;
    }
    const auto it = std::lower_bound(by_name.begin(), by_name.end(), name,
                                     [&](std::size_t i, const std::string& n) { return tensors[i].name < n; });
    return it != by_name.end() && tensors[*it].name == name ? &tensors[*it] : nullptr;
  }
  // Pointer to the first byte of t's data (little-endian elements).
  const char* data(const SafetensorsTensor& t) const { return bytes.data() + data_start + t.begin; }
};

// One tensor to write: `data` holds product(shape) elements of dtype size in
// host byte order (converted to little-endian on write).
struct SafetensorsTensorRef {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;
  const void* data = nullptr;
};

}  // namespace mesaopt::io

namespace mesaopt::detail {

inline bool host_is_little_endian() {
  const std::uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// Reverses each `size`-byte element of [p, p + n) in place (host <-> little-endian on big-endian hosts).
inline void swap_elements(char* p, std::size_t n, std::size_t size) {
  if (size <= 1) return;
  for (std::size_t i = 0; i + size <= n; i += size) std::reverse(p + i, p + i + size);
}

// Test hook: when set, called before each stage of write_safetensors ("open",
// "header", "tensor <name>", "fsync", "close", "rename"); a throw from it is
// treated like an I/O failure at that point (the temp file is removed, the
// target left untouched). Not thread-safe; for tests only.
inline std::function<void(const std::string& stage)>& write_fault_hook() {
  static std::function<void(const std::string&)> hook;
  return hook;
}

[[noreturn]] inline void io_fail(const std::string& what, const std::string& path, int err) {
  throw std::runtime_error(what + " '" + path + "': " + std::strerror(err));
}

// Multiplies with overflow detection; throws runtime_error naming `what`.
inline std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const std::string& what) {
  if (a != 0 && b > UINT64_MAX / a) throw std::runtime_error(what + ": size overflows 64 bits");
  return a * b;
}

}  // namespace mesaopt::detail

namespace mesaopt::io {

// Validates and indexes a safetensors file held in memory. `source` names it in errors.
inline SafetensorsFile parse_safetensors(std::vector<char> bytes, const std::string& source = "<memory>") {
  const std::string where = "safetensors '" + source + "': ";
  SafetensorsFile f;
  f.bytes = std::move(bytes);
  const std::uint64_t size = f.bytes.size();
  if (size < 8) throw std::runtime_error(where + "file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(f.bytes[static_cast<std::size_t>(k)]);
  if (n > kSafetensorsMaxHeader)
    throw std::runtime_error(where + "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kSafetensorsMaxHeader));
  if (n > size - 8)
    throw std::runtime_error(where + "header length " + std::to_string(n) + " exceeds the " + std::to_string(size - 8) +
                             " bytes after the length field (truncated file?)");
  if (n < 2 || f.bytes[8] != '{') throw std::runtime_error(where + "header does not start with '{'");
  f.data_start = 8 + n;
  const std::uint64_t data_size = size - f.data_start;
  const char* text = f.bytes.data() + 8;
  const std::size_t text_size = static_cast<std::size_t>(n);
  using Kind = json::Value::Kind;

  try {
    // Pass 1: the syntax of the whole header (so a syntax error is reported
    // as such wherever it is), and the number of top-level entries.
    std::size_t entries = 0;
    {
      json::Reader r(text, text_size);
      if (r.peek() != Kind::object) throw std::runtime_error(where + "header is not a JSON object");
      r.begin_object();
      std::string key;
      while (r.next_member(key)) {
        r.skip_value();
        ++entries;
      }
      r.finish();
    }
    f.tensors.reserve(entries);

    // Pass 2: the entries, straight into f.tensors and f.metadata.
    json::Reader r(text, text_size, /*utf8_checked=*/true);
    r.begin_object();
    std::string name;
    bool seen_metadata = false;
    while (r.next_member(name)) {
      if (name == "__metadata__") {
        if (seen_metadata) throw std::runtime_error(where + "duplicate key \"__metadata__\"");
        seen_metadata = true;
        if (r.peek() != Kind::object) throw std::runtime_error(where + "__metadata__ is not an object");
        r.begin_object();
        std::string key;
        while (r.next_member(key)) {
          const Kind k = r.peek();
          if (k != Kind::string)
            throw std::runtime_error(where + "__metadata__ value for " + json::quote(key) + " is a " +
                                     json::kind_name(k) + ", not a string");
          std::string value = r.read_string();
          if (!f.metadata.emplace(key, std::move(value)).second)
            throw std::runtime_error(where + "__metadata__ has a duplicate key " + json::quote(key));
        }
        continue;
      }
      // Error messages are built only on failure: no per-entry cost that grows with the name.
      auto tensor_error = [&](const std::string& what) {
        return std::runtime_error(where + "tensor " + json::quote(name) + ": " + what);
      };
      auto index = [&](std::string_view lexeme, const char* what) {
        try {
          return json::to_index(lexeme, what);
        } catch (const std::runtime_error& e) {
          throw tensor_error(e.what());
        }
      };
      auto times = [&](std::uint64_t a, std::uint64_t b) {
        if (a != 0 && b > UINT64_MAX / a) throw tensor_error("shape: size overflows 64 bits");
        return a * b;
      };
      if (r.peek() != Kind::object) throw tensor_error("entry is not an object");
      SafetensorsTensor t;
      t.name = name;
      bool has_dtype = false, has_shape = false, has_offsets = false;
      Kind dtype_kind = Kind::null, shape_kind = Kind::null, offsets_kind = Kind::null;
      std::size_t offsets_count = 0;
      std::string field;
      r.begin_object();
      while (r.next_member(field)) {
        bool* seen = field == "dtype" ? &has_dtype : field == "shape" ? &has_shape
                                                   : field == "data_offsets" ? &has_offsets : nullptr;
        if (seen == nullptr) throw tensor_error("unknown field " + json::quote(field));
        if (*seen) throw tensor_error("duplicate field " + json::quote(field));
        *seen = true;
        const Kind k = r.peek();
        if (field == "dtype") {
          dtype_kind = k;
          if (k == Kind::string) t.dtype = r.read_string();
          else r.skip_value();
        } else if (field == "shape") {
          shape_kind = k;
          if (k != Kind::array) {
            r.skip_value();
            continue;
          }
          r.begin_array();
          while (r.next_item()) {
            const Kind e = r.peek();
            if (e != Kind::number)
              throw tensor_error(std::string("shape entry must be a number, got ") + json::kind_name(e));
            t.shape.push_back(index(r.read_number(), "shape entry"));
          }
        } else {
          offsets_kind = k;
          if (k != Kind::array) {
            r.skip_value();
            continue;
          }
          r.begin_array();
          std::uint64_t* const dest[2] = {&t.begin, &t.end};
          while (r.next_item()) {
            if (offsets_count >= 2) throw tensor_error("data_offsets is not an array of two integers");
            const Kind e = r.peek();
            const char* what = offsets_count == 0 ? "data_offsets[0]" : "data_offsets[1]";
            if (e != Kind::number)
              throw tensor_error(std::string(what) + " must be a number, got " + json::kind_name(e));
            *dest[offsets_count++] = index(r.read_number(), what);
          }
        }
      }
      if (!has_dtype || !has_shape || !has_offsets) throw tensor_error("needs dtype, shape and data_offsets");
      if (dtype_kind != Kind::string) throw tensor_error("dtype is not a string");
      const std::size_t elem = safetensors_dtype_size(t.dtype);
      if (elem == 0) throw tensor_error("unknown dtype " + json::quote(t.dtype));
      if (shape_kind != Kind::array) throw tensor_error("shape is not an array");
      if (offsets_kind != Kind::array || offsets_count != 2)
        throw tensor_error("data_offsets is not an array of two integers");
      std::uint64_t count = 1;
      for (std::uint64_t d : t.shape) count = times(count, d);
      if (t.end < t.begin)
        throw tensor_error("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] are reversed");
      if (t.end > data_size)
        throw tensor_error("data_offsets end " + std::to_string(t.end) + " is beyond the " + std::to_string(data_size) +
                           "-byte data buffer");
      const std::uint64_t bytes_needed = times(count, elem);
      if (t.end - t.begin != bytes_needed)
        throw tensor_error("data_offsets span " + std::to_string(t.end - t.begin) + " bytes but dtype " + t.dtype +
                           " and its shape need " + std::to_string(bytes_needed));
      f.tensors.push_back(std::move(t));
    }
    r.finish();
  } catch (const json::ParseError& e) {
    throw std::runtime_error(where + "header is not valid JSON: " + e.what());
  }

  // Names are unique (the name index, sorted, has no equal neighbours).
  f.by_name.resize(f.tensors.size());
  for (std::size_t i = 0; i < f.by_name.size(); ++i) f.by_name[i] = i;
  std::sort(f.by_name.begin(), f.by_name.end(),
            [&](std::size_t a, std::size_t b) { return f.tensors[a].name < f.tensors[b].name; });
  for (std::size_t i = 1; i < f.by_name.size(); ++i)
    if (f.tensors[f.by_name[i - 1]].name == f.tensors[f.by_name[i]].name)
      throw std::runtime_error(where + "duplicate tensor name " + json::quote(f.tensors[f.by_name[i]].name));

  // The tensors must tile [0, data_size) exactly.
  std::vector<const SafetensorsTensor*> order;
  order.reserve(f.tensors.size());
  for (const auto& t : f.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const SafetensorsTensor* a, const SafetensorsTensor* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t cursor = 0;
  for (const SafetensorsTensor* t : order) {
    if (t->begin != cursor)
      throw std::runtime_error(where + "tensor " + json::quote(t->name) + " starts at byte " + std::to_string(t->begin) +
                               " but the previous tensor ends at " + std::to_string(cursor) +
                               (t->begin < cursor ? " (overlapping data)" : " (gap in data)"));
    cursor = t->end;
  }
  if (cursor != data_size)
    throw std::runtime_error(where + "tensors cover " + std::to_string(cursor) + " bytes but the data buffer has " +
                             std::to_string(data_size) + " (trailing bytes or truncated file)");
  return f;
}

// Reads and validates the file at `path`.
inline SafetensorsFile read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::io_fail("cannot open", path, errno);
  in.seekg(0, std::ios::end);
  const std::streamoff len = in.tellg();
  if (len < 0) throw std::runtime_error("cannot determine the size of '" + path + "'");
  in.seekg(0, std::ios::beg);
  std::vector<char> bytes(static_cast<std::size_t>(len));
  if (len > 0 && !in.read(bytes.data(), len)) throw std::runtime_error("cannot read '" + path + "'");
  return parse_safetensors(std::move(bytes), path);
}

// The complete file contents for `tensors` and `metadata` (header padded with
// spaces so the data starts at a multiple of 8). Throws std::invalid_argument
// on duplicate or reserved names, unknown dtypes or null data.
inline std::vector<char> serialize_safetensors(const std::vector<SafetensorsTensorRef>& tensors,
                                               const std::map<std::string, std::string>& metadata) {
  const char* where = "serialize_safetensors";
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (const auto& [k, v] : metadata) {
      if (!first) header += ",";
      first = false;
      header += json::quote(k) + ":" + json::quote(v);
    }
    header += "}";
  }
  std::vector<const std::string*> names;
  names.reserve(tensors.size());
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") detail::fail(where, "tensor name '__metadata__' is reserved");
    names.push_back(&t.name);
  }
  if (const std::string* dup = detail::find_duplicate_string(std::move(names)))
    detail::fail(where, "duplicate tensor name '", *dup, "'");
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    const std::size_t elem = safetensors_dtype_size(t.dtype);
    if (elem == 0) detail::fail(where, "tensor '", t.name, "' has unknown dtype '", t.dtype, "'");
    std::uint64_t count = 1;
    for (auto d : t.shape) count = detail::checked_mul(count, d, "tensor '" + t.name + "'");
    if (count > 0 && t.data == nullptr) detail::fail(where, "tensor '", t.name, "' has null data");
    const std::uint64_t nbytes = count * elem;
    if (!metadata.empty() || &t != &tensors.front()) header += ",";
    header += json::quote(t.name) + ":{\"dtype\":" + json::quote(t.dtype) + ",\"shape\":[";
    for (std::size_t i = 0; i < t.shape.size(); ++i) header += (i ? "," : "") + std::to_string(t.shape[i]);
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
  }
  header += "}";
  while ((8 + header.size()) % 8 != 0) header += ' ';

  std::vector<char> out(8 + header.size() + offset);
  const std::uint64_t n = header.size();
  for (int k = 0; k < 8; ++k) out[static_cast<std::size_t>(k)] = static_cast<char>((n >> (8 * k)) & 0xFF);
  std::memcpy(out.data() + 8, header.data(), header.size());
  char* p = out.data() + 8 + header.size();
  for (const auto& t : tensors) {
    const std::size_t elem = safetensors_dtype_size(t.dtype);
    std::uint64_t count = 1;
    for (auto d : t.shape) count *= d;
    const std::size_t nbytes = static_cast<std::size_t>(count * elem);
    if (nbytes) std::memcpy(p, t.data, nbytes);
    if (!detail::host_is_little_endian()) detail::swap_elements(p, nbytes, elem);
    p += nbytes;
  }
  return out;
}

// Writes `bytes` to `path` atomically (temp file in the same directory, write,
// fsync, rename over `path`, fsync the directory). On any failure the temp
// file is removed, `path` is left as it was, and std::runtime_error is thrown.
inline void write_file_atomically(const std::string& path, const std::vector<char>& bytes,
                                  const std::vector<std::pair<std::string, std::size_t>>& stages = {}) {
  auto& hook = detail::write_fault_hook();
  const std::size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty()) detail::fail("write_file_atomically", "path '", path, "' names a directory");
  std::string tmp = (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) + "." + base + ".tmp-XXXXXX";
  std::vector<char> name(tmp.begin(), tmp.end());
  name.push_back('\0');
  int fd = -1;
  bool created = false;
  try {
    if (hook) hook("open");
    fd = ::mkstemp(name.data());
    if (fd < 0) detail::io_fail("cannot create a temporary file next to", path, errno);
    created = true;
    tmp.assign(name.data());
    ::fchmod(fd, 0644);  // mkstemp creates 0600; a checkpoint is an ordinary file
    // Stages split the write so tests can fail it in the middle.
    std::vector<std::pair<std::string, std::size_t>> parts = stages;
    if (parts.empty()) parts.push_back({"data", bytes.size()});
    std::size_t pos = 0;
    for (const auto& [stage, len] : parts) {
      if (hook) hook(stage);
      std::size_t done = 0;
      while (done < len) {
        const ssize_t w = ::write(fd, bytes.data() + pos + done, len - done);
        if (w < 0) {
          if (errno == EINTR) continue;
          detail::io_fail("cannot write", tmp, errno);
        }
        done += static_cast<std::size_t>(w);
      }
      pos += len;
    }
    if (pos != bytes.size()) throw std::logic_error("write_file_atomically: stages do not cover the data");
    if (hook) hook("fsync");
    if (::fsync(fd) != 0) detail::io_fail("cannot fsync", tmp, errno);
    if (hook) hook("close");
    const int fd_closing = fd;
    fd = -1;
    if (::close(fd_closing) != 0) detail::io_fail("cannot close", tmp, errno);
    if (hook) hook("rename");
    if (::rename(tmp.c_str(), path.c_str()) != 0) detail::io_fail("cannot rename the temporary file over", path, errno);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    if (created) ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable (best effort: some file systems refuse fsync on directories).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

// serialize_safetensors + write_file_atomically (the fault hook sees stages
// "open", "header", "tensor <name>" for each tensor, "fsync", "close", "rename").
inline void write_safetensors(const std::string& path, const std::vector<SafetensorsTensorRef>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  const std::vector<char> bytes = serialize_safetensors(tensors, metadata);
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(k)]);
  std::vector<std::pair<std::string, std::size_t>> stages{{"header", static_cast<std::size_t>(8 + n)}};
  for (const auto& t : tensors) {
    std::uint64_t count = 1;
    for (auto d : t.shape) count *= d;
    stages.push_back({"tensor " + t.name, static_cast<std::size_t>(count * safetensors_dtype_size(t.dtype))});
  }
  write_file_atomically(path, bytes, stages);
}

}  // namespace mesaopt::io
