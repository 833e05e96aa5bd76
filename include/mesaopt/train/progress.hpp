#pragma once
// A one-line training progress display, rewritten in place with '\r':
//   step 1200/5000  loss 0.81234  lr 1.00e-04  52.3k tok/s  ETA 3m12s
// It prints only when its stream is a terminal (isatty), so logs and pipes
// stay clean; finish() ends the line. Updates are throttled to ~10 per second.
#include <mesaopt/common/check.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

#include <unistd.h>

namespace mesaopt::train {

// The text of one progress line (no '\r'), from measured rates.
inline std::string format_progress(long step, long total_steps, double loss, double lr, double tokens_per_second,
                                   double eta_seconds) {
  char rate[32];
  if (!(tokens_per_second >= 0) || !std::isfinite(tokens_per_second)) std::snprintf(rate, sizeof rate, "-");
  else if (tokens_per_second >= 1e6) std::snprintf(rate, sizeof rate, "%.2fM", tokens_per_second / 1e6);
  else if (tokens_per_second >= 1e3) std::snprintf(rate, sizeof rate, "%.1fk", tokens_per_second / 1e3);
  else std::snprintf(rate, sizeof rate, "%.0f", tokens_per_second);
  char eta[32];
  if (!(eta_seconds >= 0) || !std::isfinite(eta_seconds)) {
    std::snprintf(eta, sizeof eta, "-");
  } else {
    const long s = static_cast<long>(std::lround(eta_seconds));
    if (s >= 3600) std::snprintf(eta, sizeof eta, "%ldh%02ldm", s / 3600, (s / 60) % 60);
    else if (s >= 60) std::snprintf(eta, sizeof eta, "%ldm%02lds", s / 60, s % 60);
    else std::snprintf(eta, sizeof eta, "%lds", s);
  }
  char line[160];
  std::snprintf(line, sizeof line, "step %ld/%ld  loss %.5g  lr %.2e  %s tok/s  ETA %s", step, total_steps, loss, lr,
                rate, eta);
  return line;
}

class ProgressLine {
 public:
  // tokens_per_step: tokens processed per step (B*T), for the rate.
  // Enabled iff `stream` is a terminal.
  ProgressLine(long total_steps, long tokens_per_step, std::FILE* stream = stderr)
      : ProgressLine(total_steps, tokens_per_step, stream, stream != nullptr && ::isatty(::fileno(stream)) == 1) {}
  // Explicitly enabled or disabled (e.g. a --progress flag).
  ProgressLine(long total_steps, long tokens_per_step, std::FILE* stream, bool enabled)
      : total_(total_steps), tokens_per_step_(tokens_per_step), stream_(stream), enabled_(enabled && stream != nullptr),
        start_(Clock::now()), last_(start_) {
    detail::check_positive_size("ProgressLine", "total_steps", total_steps);
    detail::check_positive_size("ProgressLine", "tokens_per_step", tokens_per_step);
  }

  bool enabled() const { return enabled_; }

  // Call after step `step` (1-based count of completed steps).
  void update(long step, double loss, double lr) {
    if (!enabled_) return;
    const auto now = Clock::now();
    if (step < total_ && printed_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    printed_ = true;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double rate = elapsed > 0 ? static_cast<double>(step) * static_cast<double>(tokens_per_step_) / elapsed : -1;
    const double eta = step > 0 ? elapsed / static_cast<double>(step) * static_cast<double>(total_ - step) : -1;
    const std::string line = format_progress(step, total_, loss, lr, rate, eta);
    // Pad over a longer previous line, then return the cursor.
    std::fprintf(stream_, "\r%s%*s", line.c_str(), width_ > line.size() ? static_cast<int>(width_ - line.size()) : 0, "");
    width_ = line.size();
    std::fflush(stream_);
  }

  // Ends the line (if anything was printed).
  void finish() {
    if (enabled_ && printed_) {
      std::fputc('\n', stream_);
      std::fflush(stream_);
    }
    printed_ = false;
  }

 private:
  using Clock = std::chrono::steady_clock;
  long total_, tokens_per_step_;
  std::FILE* stream_;
  bool enabled_;
  Clock::time_point start_, last_;
  bool printed_ = false;
  std::size_t width_ = 0;
};

}  // namespace mesaopt::train
