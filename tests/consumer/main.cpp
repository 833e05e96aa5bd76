// Compiles against the installed umbrella header and checks one kernel result,
// so the consumer test fails if the headers install but do not work.
#include <mesaopt/mesaopt.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<float> x{1, 2, 3, 4, 5}, y{5, 4, 3, 2, 1};
  const float d = mesaopt::kernels::dot(x.data(), y.data(), x.size());
  std::printf("mesaopt %s consumer: dot = %g\n", MESAOPT_VERSION_STRING, d);
  return d == 35.0f ? 0 : 1;
}
