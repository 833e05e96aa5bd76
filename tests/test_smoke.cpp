#include <catch2/catch.hpp>
#include <mesaopt/mesaopt.hpp>
TEST_CASE("umbrella header compiles and dot works") {
  float x[3] = {1, 2, 3};
  CHECK(mesaopt::kernels::dot(x, x, 3) == 14.0f);
}
