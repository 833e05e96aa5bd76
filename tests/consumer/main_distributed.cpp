// A downstream program on the installed mesaopt::distributed target: includes
// mesaopt/distributed.hpp, starts MPI (a singleton without mpirun) and checks
// that the group it gets is this one process.
#include <mesaopt/distributed.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  mesaopt::distributed::Mpi mpi(argc, argv);
  mesaopt::distributed::MpiProcessGroup group;
  std::printf("mesaopt::distributed consumer: rank %d of %d\n", group.rank(), group.size());
  return group.size() >= 1 && group.rank() == 0 ? 0 : 1;
}
