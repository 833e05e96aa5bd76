#pragma once
// What the example programs share for reporting in-context loss curves: one row
// per method, the table they print, and the tidy CSV files (`method,position,loss`
// for examples/plot.py, `model,step,loss` for training histories).
#include <mesaopt/learners/compare.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mesaopt::examples {

// One method's per-position loss curve: curve[t - 1] is the loss at position t.
struct CurveRow {
  std::string method, setting;
  std::vector<double> curve;
};

// printf-formats one number, e.g. format_number("eta %.4g", 0.032).
inline std::string format_number(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

// Prints "method setting t=.. ... avg", then one line per row: the loss at the
// positions in `show` (1-based) and the mean over all positions. The column
// widths are given so that each program keeps its own layout.
inline void print_curve_table(const std::vector<CurveRow>& rows, const std::vector<long>& show, int method_width,
                              int setting_width) {
  std::printf("%-*s %-*s", method_width, "method", setting_width, "setting");
  for (long t : show) std::printf(" %8s", ("t=" + std::to_string(t)).c_str());
  std::printf(" %8s\n", "avg");
  for (const CurveRow& r : rows) {
    std::printf("%-*s %-*s", method_width, r.method.c_str(), setting_width, r.setting.c_str());
    for (long t : show) std::printf(" %8.4f", r.curve[std::size_t(t - 1)]);
    std::printf(" %8.4f\n", learners::mean_of(r.curve));
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

// Tidy CSV `method,position,loss`, positions 1..T, for examples/plot.py.
inline void write_curve_csv(const std::string& path, const std::vector<CurveRow>& rows, long T,
                            const char* option = "--csv") {
  std::FILE* f = detail::open_for_writing(path, option);
  std::fprintf(f, "method,position,loss\n");
  for (const CurveRow& r : rows)
    for (long t = 1; t <= T; ++t) std::fprintf(f, "%s,%ld,%.9g\n", r.method.c_str(), t, r.curve[std::size_t(t - 1)]);
  detail::close_written(f, path, option);
}

// Training histories as CSV `model,step,loss` (step 0 = the first step).
inline void write_history_csv(const std::string& path,
                              const std::vector<std::pair<std::string, std::vector<double>>>& histories,
                              const char* option = "--history") {
  std::FILE* f = detail::open_for_writing(path, option);
  std::fprintf(f, "model,step,loss\n");
  for (const auto& [name, losses] : histories)
    for (std::size_t i = 0; i < losses.size(); ++i) std::fprintf(f, "%s,%zu,%.9g\n", name.c_str(), i, losses[i]);
  detail::close_written(f, path, option);
}

}  // namespace mesaopt::examples
