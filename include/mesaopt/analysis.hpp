#pragma once
// Module header: analysis, the paper's tools for looking inside trained models
// (docs/analysis.md): activation capture, linear probes and their targets,
// compressed algorithms (Proposition 1, CompressedAlg-K) and linearisation.
// Knows models (nn) but not training.
#include <mesaopt/analysis/parameters.hpp>
#include <mesaopt/analysis/capture.hpp>
#include <mesaopt/analysis/probe.hpp>
#include <mesaopt/analysis/probe_targets.hpp>
#include <mesaopt/analysis/compress.hpp>
#include <mesaopt/analysis/linearize.hpp>
#include <mesaopt/analysis/evaluate.hpp>
