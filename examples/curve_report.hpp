#pragma once
// What the example programs share for reporting in-context loss curves: one row
// per method, means over seeds, the table they print, and the tidy CSV files
// (`method,position,loss,stderr,seeds` for examples/plot.py, `model,step,loss,seed`
// for training histories).
#include <mesaopt/learners/compare.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace mesaopt::examples {

// One method's per-position loss curve: curve[t - 1] is the loss at position t.
// Over several seeds (mean_over_seeds): curve is the mean over seeds and
// standard_error[t - 1] its standard error, s / sqrt(seeds) with s the
// sample standard deviation; empty for one seed.
struct CurveRow {
  std::string method, setting;
  std::vector<double> curve;
  std::vector<double> standard_error = {};
  long seeds = 1;
  double average_standard_error = 0;  // of the mean over positions, across seeds (0 for one seed)
};

namespace detail {

// The mean of `values` and its standard error s / sqrt(k), s the sample
// standard deviation of the k >= 2 values.
inline std::pair<double, double> mean_and_standard_error(const std::vector<double>& values) {
  const double k = double(values.size()), mean = learners::mean_of(values);
  double squares = 0;
  for (double v : values) squares += (v - mean) * (v - mean);
  return {mean, std::sqrt(squares / (k - 1) / k)};
}

}  // namespace detail

// Rows averaged position by position over seeds: per_seed[k] holds seed k's
// rows, the same methods in the same order (the setting is seed 0's).
inline std::vector<CurveRow> mean_over_seeds(const std::vector<std::vector<CurveRow>>& per_seed) {
  if (per_seed.empty()) throw std::invalid_argument("mean_over_seeds: no seeds");
  const std::size_t k = per_seed.size();
  std::vector<CurveRow> out = per_seed[0];
  for (std::size_t i = 0; i < out.size(); ++i) {
    CurveRow& r = out[i];
    r.seeds = long(k);
    r.standard_error.clear();
    for (std::size_t s = 1; s < k; ++s)
      if (per_seed[s].size() != out.size() || per_seed[s][i].method != r.method ||
          per_seed[s][i].curve.size() != r.curve.size())
        throw std::invalid_argument("mean_over_seeds: seed " + std::to_string(s) + " has other rows than seed 0");
    if (k == 1) continue;
    std::vector<double> values(k);
    for (std::size_t s = 0; s < k; ++s) values[s] = learners::mean_of(per_seed[s][i].curve);
    r.average_standard_error = detail::mean_and_standard_error(values).second;
    r.standard_error.assign(r.curve.size(), 0.0);
    for (std::size_t t = 0; t < r.curve.size(); ++t) {
      for (std::size_t s = 0; s < k; ++s) values[s] = per_seed[s][i].curve[t];
      std::tie(r.curve[t], r.standard_error[t]) = detail::mean_and_standard_error(values);
    }
  }
  return out;
}

// printf-formats one number, e.g. format_number("eta %.4g", 0.032).
inline std::string format_number(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

// Prints "method setting t=.. ... avg", then one line per row: the loss at the
// positions in `show` (1-based) and the mean over all positions (with its
// standard error across seeds when the rows are means over seeds). The column
// widths are given so that each program keeps its own layout.
inline void print_curve_table(const std::vector<CurveRow>& rows, const std::vector<long>& show, int method_width,
                              int setting_width) {
  std::printf("%-*s %-*s", method_width, "method", setting_width, "setting");
  for (long t : show) std::printf(" %8s", ("t=" + std::to_string(t)).c_str());
  const bool seeds = !rows.empty() && rows.front().seeds > 1;
  std::printf(" %8s%s\n", "avg", seeds ? "   +- s.e." : "");
  for (const CurveRow& r : rows) {
    std::printf("%-*s %-*s", method_width, r.method.c_str(), setting_width, r.setting.c_str());
    for (long t : show) std::printf(" %8.4f", r.curve[std::size_t(t - 1)]);
    std::printf(" %8.4f", learners::mean_of(r.curve));
    if (seeds) std::printf("   %.4f", r.average_standard_error);
    std::printf("\n");
  }
}

namespace detail {

// Opens `path` for writing, or throws naming the option it came from.
inline std::FILE* open_for_writing(const std::string& path, const char* option) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) throw std::runtime_error(std::string("cannot open ") + option + " file " + path);
  return f;
}

inline void close_written(std::FILE* f, const std::string& path, const char* option) {
  if (std::fclose(f) != 0) throw std::runtime_error(std::string("cannot write ") + option + " file " + path);
  std::printf("wrote %s\n", path.c_str());
}

}  // namespace detail

// Tidy CSV `method,position,loss,stderr,seeds`, positions 1..T, for
// examples/plot.py: loss is the mean over `seeds` seeds and stderr its
// standard error (nan for a single seed, where it is not defined).
inline void write_curve_csv(const std::string& path, const std::vector<CurveRow>& rows, long T,
                            const char* option = "--csv") {
  std::FILE* f = detail::open_for_writing(path, option);
  std::fprintf(f, "method,position,loss,stderr,seeds\n");
  for (const CurveRow& r : rows)
    for (long t = 1; t <= T; ++t) {
      const auto i = std::size_t(t - 1);
      const double se = r.standard_error.empty() ? std::nan("") : r.standard_error[i];
      std::fprintf(f, "%s,%ld,%.9g,%.9g,%ld\n", r.method.c_str(), t, r.curve[i], se, r.seeds);
    }
  detail::close_written(f, path, option);
}

// One training run's loss per step.
struct TrainingHistory {
  std::string model;
  unsigned long long seed = 0;
  std::vector<double> losses;
};

// Training histories as CSV `model,step,loss,seed` (step 0 = the first step).
inline void write_history_csv(const std::string& path, const std::vector<TrainingHistory>& histories,
                              const char* option = "--history") {
  std::FILE* f = detail::open_for_writing(path, option);
  std::fprintf(f, "model,step,loss,seed\n");
  for (const TrainingHistory& h : histories)
    for (std::size_t i = 0; i < h.losses.size(); ++i)
      std::fprintf(f, "%s,%zu,%.9g,%llu\n", h.model.c_str(), i, h.losses[i], h.seed);
  detail::close_written(f, path, option);
}

// Results as bytes, to move them between the ranks of an MPI run (ranks.hpp,
// train::gather_strings): numbers keep every bit (raw bytes; the ranks of one
// job share the byte order), strings their length.
class Encoder {
 public:
  void put(double x) { raw(&x, sizeof x); }
  void put(long x) { raw(&x, sizeof x); }
  void put(unsigned long long x) { raw(&x, sizeof x); }
  void put(const std::string& s) {
    put(long(s.size()));
    bytes_ += s;
  }
  void put(const std::vector<double>& v) {
    put(long(v.size()));
    raw(v.data(), v.size() * sizeof(double));
  }
  void put(const std::vector<CurveRow>& rows) {  // method, setting, curve (one seed's rows)
    put(long(rows.size()));
    for (const CurveRow& r : rows) {
      put(r.method);
      put(r.setting);
      put(r.curve);
    }
  }
  void put(const std::vector<TrainingHistory>& histories) {
    put(long(histories.size()));
    for (const TrainingHistory& h : histories) {
      put(h.model);
      put(h.seed);
      put(h.losses);
    }
  }
  const std::string& bytes() const { return bytes_; }

 private:
  void raw(const void* p, std::size_t n) { bytes_.append(static_cast<const char*>(p), n); }
  std::string bytes_;
};

class Decoder {
 public:
  explicit Decoder(const std::string& bytes) : bytes_(bytes) {}
  double real() { double x; raw(&x, sizeof x); return x; }
  long integer() { long x; raw(&x, sizeof x); return x; }
  unsigned long long seed() { unsigned long long x; raw(&x, sizeof x); return x; }
  std::string text() {
    std::string s(count(), '\0');
    if (!s.empty()) raw(&s[0], s.size());
    return s;
  }
  std::vector<double> reals() {
    std::vector<double> v(count());
    if (!v.empty()) raw(v.data(), v.size() * sizeof(double));
    return v;
  }
  std::vector<CurveRow> rows() {
    std::vector<CurveRow> out(count());
    for (CurveRow& r : out) {
      r.method = text();
      r.setting = text();
      r.curve = reals();
    }
    return out;
  }
  std::vector<TrainingHistory> histories() {
    std::vector<TrainingHistory> out(count());
    for (TrainingHistory& h : out) {
      h.model = text();
      h.seed = seed();
      h.losses = reals();
    }
    return out;
  }
  bool done() const { return at_ == bytes_.size(); }

 private:
  void raw(void* p, std::size_t n) {
    if (n > bytes_.size() - at_) throw std::runtime_error("Decoder: the message ends early");
    std::memcpy(p, bytes_.data() + at_, n);
    at_ += n;
  }
  std::size_t count() {
    const long n = integer();
    if (n < 0 || std::size_t(n) > bytes_.size()) throw std::runtime_error("Decoder: bad length");
    return std::size_t(n);
  }
  const std::string& bytes_;
  std::size_t at_ = 0;
};

}  // namespace mesaopt::examples
