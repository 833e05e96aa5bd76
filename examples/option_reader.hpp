#pragma once
// The command-line reading the example programs share: each flag in turn, its
// value, integers and numbers checked against a range, and the error for a bad
// option, which names the program, the option and what it got, then exits with
// status 2 (docs/examples.md; the ctests `example_<program>_rejects_bad_option`).
//
//   examples::OptionReader args("probing", argc, argv);
//   while (args.next()) {
//     const std::string& a = args.flag();
//     if (a == "--steps") o.steps = long(args.integer(1, 100000000));
//     else if (a == "--lr") o.lr = args.number(0, 1.0, /*open_low=*/true);
//     else args.fail("unknown option " + a);
//   }
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

namespace mesaopt::examples {

// "<program>: <message> (see --help)" on stderr, exit status 2.
[[noreturn]] inline void option_error(const std::string& program, const std::string& message) {
  std::fprintf(stderr, "%s: %s (see --help)\n", program.c_str(), message.c_str());
  std::exit(2);
}

class OptionReader {
 public:
  OptionReader(std::string program, int argc, char** argv) : program_(std::move(program)), argc_(argc), argv_(argv) {}

  // Moves to the next flag; false after the last argument.
  bool next() {
    if (++i_ >= argc_) return false;
    flag_ = argv_[i_];
    return true;
  }
  const std::string& flag() const { return flag_; }

  [[noreturn]] void fail(const std::string& message) const { option_error(program_, message); }

  // The argument after the flag.
  std::string value() {
    if (i_ + 1 >= argc_) fail(flag_ + " needs a value");
    return argv_[++i_];
  }

  // A finite number in [lo, hi] ((lo, hi] with open_low).
  double number(double lo, double hi = std::numeric_limits<double>::infinity(), bool open_low = false) {
    const std::string v = value();
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (end == v.c_str() || *end != '\0' || !std::isfinite(x) || x < lo || (open_low && x == lo) || x > hi) {
      std::ostringstream m;
      m << flag_ << " needs a number ";
      if (std::isinf(hi))
        m << (open_low ? "> " : ">= ") << lo;
      else
        m << "in " << (open_low ? "(" : "[") << lo << ", " << hi << "]";
      m << ", got '" << v << "'";
      fail(m.str());
    }
    return x;
  }

  // A whole number in [lo, hi], written as an integer or in floating-point
  // notation with a whole value (12, 1e4, 12.0).
  long long integer(long long lo, long long hi) {
    const std::string v = value();
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (end == v.c_str() || *end != '\0' || !std::isfinite(x) || x != std::floor(x) || x < double(lo) ||
        x > double(hi)) {
      std::ostringstream m;
      m << flag_ << " needs a whole number in [" << lo << ", " << hi << "], got '" << v << "'";
      fail(m.str());
    }
    return static_cast<long long>(x);
  }

 private:
  std::string program_;
  int argc_;
  char** argv_;
  int i_ = 0;
  std::string flag_;
};

}  // namespace mesaopt::examples
