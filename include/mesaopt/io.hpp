#pragma once
// Module header: io — a strict JSON reader (json::Reader pull parser,
// json::parse tree, json::quote) and the safetensors format (parse, read,
// serialize, atomic write). The loaders treat files as untrusted input:
// linear time, memory proportional to the file. See docs/training.md.
#include <mesaopt/io/json.hpp>
#include <mesaopt/io/safetensors.hpp>
