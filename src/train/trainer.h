// The training run behind `moetune train`: recipe in, OUTPUT folder out (metrics.jsonl,
// checkpoints/, hf/, recipe.yaml, loss.svg). trainer.cpp reads top to bottom as the loop.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>

#include "ops/backend.h"
#include "train/recipe.h"

namespace moetune {

struct ParallelContext;

struct TrainOptions {
  std::filesystem::path output_dir;
  // Resume: from this checkpoint folder, or (resume_latest) from the newest complete one
  // under output_dir/checkpoints.
  std::optional<std::filesystem::path> resume_from;
  bool resume_latest = false;
  // Stop (with a checkpoint, as on SIGTERM) once this many optimizer steps are done: for
  // time-limited jobs, and for tests that interrupt a run deterministically.
  std::optional<int64_t> stop_after_steps;
  // Several ranks (started by a launcher; see parallel_context.h), or nullptr for one
  // process. Each rank trains on its own micro-batches; gradients are reduced and the
  // optimizer sharded by DataParallelAdamW (parallel.zero_stage); rank 0 logs and writes.
  ParallelContext* parallel = nullptr;
};

struct TrainSummary {
  int64_t start_step = 0;  // 0, or the checkpoint's step when resumed
  int64_t steps = 0;       // optimizer steps done when the run ended
  int64_t total_steps = 0;
  double first_loss = 0, last_loss = 0;
  std::optional<double> eval_loss, eval_accuracy;
  int64_t skipped_steps = 0;  // non-finite loss or gradient
  bool interrupted = false;   // stopped early by SIGINT/SIGTERM (a checkpoint was written)
};

// `backend` is the device of recipe.parallel.device (the caller makes it with make_backend:
// the backend factory sits above the engine library).
TrainSummary train(const Recipe& recipe, const TrainOptions& options, Backend& backend);

}  // namespace moetune
