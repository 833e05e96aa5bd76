#pragma once
// Shared helpers of the mesaopt._core extension: array access without copies,
// the per-(batch, head) thread pool with the GIL released, and error mapping.
//
// Division of labour: the Python layer (python/mesaopt/__init__.py) validates
// every argument and allocates every output; the functions here re-check the
// shapes they index with (so a direct call of _core with bad arrays raises
// ValueError instead of reading out of bounds) and run the C++ ops, one call
// per (batch, head) slice, writing straight into the NumPy buffers.
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/ops/mesa.hpp>  // MesaBreakdownError

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstddef>
#include <exception>
#include <initializer_list>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace mesaopt_py {

namespace nb = nanobind;

// A C-contiguous CPU array of T (any ndim; checked by `view`).
template <class T>
using Array = nb::ndarray<T, nb::c_contig, nb::device::cpu>;

[[noreturn]] inline void bad(const std::string& msg) { throw std::invalid_argument(msg); }

// A checked view of a C-contiguous array of scalar T with the given shape.
// `h` must be a NumPy array (no implicit conversion: a converted temporary
// would silently drop the writes to an output).
template <class T>
struct View {
  T* ptr = nullptr;
  std::vector<long> shape;
  bool present = false;

  // Elements per (batch, head) slice: product of the dimensions after the first two.
  long slice_size() const {
    long n = 1;
    for (std::size_t i = 2; i < shape.size(); ++i) n *= shape[i];
    return n;
  }
  T* slice(long i) const { return ptr + i * slice_size(); }
};

// Inputs are read through nb::ndarray<const T> (read-only arrays are fine);
// outputs (`writable`) through nb::ndarray<T>, which refuses read-only arrays.
template <class T>
View<T> view(const char* where, const char* name, nb::handle h, std::initializer_list<long> expected,
             bool optional = false, bool writable = false) {
  View<T> v;
  if (h.is_none()) {
    if (optional) return v;
    bad(std::string(where) + ": " + name + " must be an array, got None");
  }
  std::vector<long> shape;
  bool ok;
  if (writable) {
    Array<T> a;
    ok = nb::try_cast<Array<T>>(h, a, false);
    if (ok) {
      v.ptr = a.data();
      for (std::size_t j = 0; j < a.ndim(); ++j) shape.push_back(long(a.shape(j)));
    }
  } else {
    Array<const T> a;
    ok = nb::try_cast<Array<const T>>(h, a, false);
    if (ok) {
      v.ptr = const_cast<T*>(a.data());  // an input: never written
      for (std::size_t j = 0; j < a.ndim(); ++j) shape.push_back(long(a.shape(j)));
    }
  }
  if (!ok) {
    std::ostringstream os;
    os << where << ": " << name << " must be a " << (writable ? "writable " : "") << "C-contiguous "
       << (sizeof(T) == 4 ? "float32" : "float64") << " NumPy array on the CPU";
    throw nb::type_error(os.str().c_str());
  }
  const std::vector<long> want(expected.begin(), expected.end());
  if (shape != want) {
    std::ostringstream os;
    os << where << ": " << name << " has shape (";
    for (std::size_t j = 0; j < shape.size(); ++j) os << (j ? ", " : "") << shape[j];
    os << "), expected (";
    for (std::size_t j = 0; j < want.size(); ++j) os << (j ? ", " : "") << want[j];
    os << ")";
    bad(os.str());
  }
  v.shape = want;
  v.present = true;
  return v;
}

// An output: a writable C-contiguous array of T with the given shape.
template <class T>
View<T> view_out(const char* where, const char* name, nb::handle h, std::initializer_list<long> expected,
                 bool optional = false) {
  return view<T>(where, name, h, expected, optional, true);
}

template <class T>
using Map = Eigen::Map<mesaopt::RowMatrix<T>>;
template <class T>
using CMap = Eigen::Map<const mesaopt::RowMatrix<T>>;
template <class T>
using VMap = Eigen::Map<mesaopt::Vector<T>>;
template <class T>
using CVMap = Eigen::Map<const mesaopt::Vector<T>>;

// "(batch b, head h) " prefix for errors raised inside one slice.
inline std::string slice_prefix(const char* where, long i, long H) {
  std::ostringstream os;
  os << where << " (batch b = " << i / H << ", head h = " << i % H << "): ";
  return os.str();
}

// The op's message without its own "where: " prefix (the slice prefix repeats it).
inline std::string strip_where(const char* where, const std::string& msg) {
  const std::string p = std::string(where) + ": ";
  return msg.compare(0, p.size(), p) == 0 ? msg.substr(p.size()) : msg;
}

// Rethrows the exception of slice i with the slice named in the message.
[[noreturn]] inline void rethrow_for_slice(const char* where, long i, long H, std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const mesaopt::MesaBreakdownError& x) {
    throw mesaopt::MesaBreakdownError(slice_prefix(where, i, H) + strip_where(where, x.what()), x.position(), i / H,
                                      i % H);
  } catch (const std::invalid_argument& x) {
    throw std::invalid_argument(slice_prefix(where, i, H) + strip_where(where, x.what()));
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& x) {
    throw std::runtime_error(slice_prefix(where, i, H) + strip_where(where, x.what()));
  }
}

// Runs body(i, worker) for every slice i in [0, n) on min(threads, n) threads
// (the calling thread is worker 0). Items are handed out in index order
// (dynamic), and each item writes only its own outputs, so results are
// bit-identical for any thread count. If items fail, the error of the lowest
// failing index is rethrown (every lower index was already claimed and runs to
// completion, so that index does not depend on timing). Does not touch the
// GIL: run_slices below releases it; the XLA FFI handlers run without it.
template <class Body>
void for_slices(const char* where, long n, long H, int threads, Body&& body) {
  if (threads < 1) bad(std::string(where) + ": threads must be >= 1, got " + std::to_string(threads));
  const int team = int(std::max<long>(1, std::min<long>(threads, n)));
  std::atomic<long> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  long err_index = LONG_MAX;
  std::exception_ptr err;
  auto work = [&](int worker) {
    for (;;) {
      if (stop.load(std::memory_order_relaxed)) return;
      const long i = next.fetch_add(1);
      if (i >= n) return;
      try {
        body(i, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (i < err_index) {
          err_index = i;
          err = std::current_exception();
        }
        stop.store(true);
      }
    }
  };
  {
    std::vector<std::thread> pool;
    try {
      for (int w = 1; w < team; ++w) pool.emplace_back(work, w);
    } catch (...) {
      // Could not start another thread (std::system_error, bad_alloc): the threads
      // running (this one included) take all items; every started thread is joined.
    }
    work(0);
    for (auto& t : pool) t.join();
  }
  if (err) rethrow_for_slice(where, err_index, H, err);
}

// for_slices with the GIL released (the NumPy bindings, called from Python).
template <class Body>
void run_slices(const char* where, long n, long H, int threads, Body&& body) {
  nb::gil_scoped_release release;
  for_slices(where, n, H, threads, std::forward<Body>(body));
}

// The mesa regulariser from the code the Python layer passes (0 decaying, 1 constant).
inline mesaopt::MesaRegularizer regularizer_of(const char* where, long r) {
  if (r == 0) return mesaopt::MesaRegularizer::decaying;
  if (r == 1) return mesaopt::MesaRegularizer::constant;
  bad(std::string(where) + ": regularizer must be 0 (decaying) or 1 (constant), got " + std::to_string(r));
}

// The mesa op's options for head h: lam and forget hold one value per head.
template <class T>
mesaopt::MesaOptions<T> mesa_options(const T* lam, const T* forget, long h, mesaopt::MesaRegularizer reg, long chunk) {
  mesaopt::MesaOptions<T> opt;
  opt.lambda = lam[h];
  opt.forget = forget[h];
  opt.chunk = chunk;
  opt.regularizer = reg;
  return opt;
}

// q, k (B, H, T, d), v (B, H, T, dv): the sizes of a call, read from q and v.
struct Dims {
  long B, H, T, d, dv;
};

template <class T>
Dims dims(const char* where, nb::handle q, nb::handle v) {
  Array<const T> a, b;
  if (!nb::try_cast<Array<const T>>(q, a, false) || !nb::try_cast<Array<const T>>(v, b, false))
    throw nb::type_error((std::string(where) + ": q and v must be C-contiguous arrays of one float type").c_str());
  if (a.ndim() != 4 || b.ndim() != 4) bad(std::string(where) + ": q and v must have ndim 4 (B, H, T, d)");
  return {long(a.shape(0)), long(a.shape(1)), long(a.shape(2)), long(a.shape(3)), long(b.shape(3))};
}

// The batch cache an earlier forward returned (return_cache=True), or nullptr
// for None; anything else is a TypeError naming what was expected.
template <class Cache>
Cache* get_cache(const char* where, nb::handle h, const char* expected) {
  if (h.is_none()) return nullptr;
  Cache* c = nullptr;
  if (!nb::try_cast<Cache*>(h, c, false) || c == nullptr)
    throw nb::type_error((std::string(where) + ": cache must be " + expected).c_str());
  return c;
}

}  // namespace mesaopt_py
