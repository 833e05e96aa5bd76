#pragma once
// mesaopt's version; kept in step with project(VERSION) in CMakeLists.txt.
#define MESAOPT_VERSION_MAJOR 0
#define MESAOPT_VERSION_MINOR 1
#define MESAOPT_VERSION_PATCH 0
#define MESAOPT_VERSION_STRING "0.1.0"
