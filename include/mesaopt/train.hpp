#pragma once
// Module header: train — the next-token MSE loss, Adam/AdamW, gradient
// clipping by global norm, learning-rate schedules, the sharded step, safetensors checkpoints
// (the format itself is in mesaopt/io.hpp) and a terminal progress line.
// See docs/training.md.
#include <mesaopt/io.hpp>
#include <mesaopt/train/adam.hpp>
#include <mesaopt/train/checkpoint.hpp>
#include <mesaopt/train/grad_clip.hpp>
#include <mesaopt/train/loss.hpp>
#include <mesaopt/train/process_group.hpp>
#include <mesaopt/train/progress.hpp>
#include <mesaopt/train/schedule.hpp>
#include <mesaopt/train/sharded_step.hpp>
#include <mesaopt/train/trainer.hpp>
