// Training checkpoints: OUTPUT/checkpoints/step-N/ holds everything needed to continue a
// run bit-identically:
//   model.safetensors      parameters under their engine names, in their storage dtype
//   optimizer.safetensors  AdamW state (exp_avg.*, exp_avg_sq.*, master.*)
//   trainer_state.json     step, schedule, data loader position, RNG, counters, log window
// Crash safety: a checkpoint is written into step-N.tmp/, every file fsynced, the folder
// fsynced, then renamed to step-N/ (a rename is atomic), and the parent fsynced. A folder
// named step-N is therefore always complete; leftovers *.tmp are removed at the next start.
// Testing hook: MOETUNE_TEST_ABORT_IN_CHECKPOINT=N aborts the process in the middle of
// writing checkpoint step-N (after the weights, before the optimizer state).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/backend.h"

namespace moetune {

struct CheckpointTensor {
  std::string name;
  Tensor tensor;  // on the backend's device
};

struct CheckpointContents {
  int64_t step = 0;
  std::vector<CheckpointTensor> model;
  std::vector<CheckpointTensor> optimizer;
  nlohmann::json trainer_state;
  // Several ranks (dist_checkpoint.h): called on rank 0 with the temporary folder as soon
  // as it exists (before the model is written), while the other ranks write their rank-R/
  // parts into it; the folder is renamed to step-N only after this returns. An empty `optimizer`
  // writes no optimizer.safetensors (the state is in the ranks' parts).
  std::function<void(const std::filesystem::path& temporary)> add_parts;
};

std::filesystem::path checkpoint_path(const std::filesystem::path& checkpoints_dir, int64_t step);
// Where step-N is assembled before the rename (step-N.tmp).
std::filesystem::path checkpoint_temporary_path(const std::filesystem::path& checkpoints_dir,
                                                int64_t step);

// Writes tensors (on the host or the backend's device) to one safetensors file.
void write_checkpoint_tensors(const std::filesystem::path& file,
                              std::span<const CheckpointTensor> tensors, Backend& backend);

// Writes checkpoints_dir/step-N atomically (see above); returns its path. Device tensors
// are copied to the host through `backend`.
std::filesystem::path write_training_checkpoint(const std::filesystem::path& checkpoints_dir,
                                                const CheckpointContents& contents,
                                                Backend& backend);

// The complete checkpoints (step-N folders with a trainer_state.json), by increasing step.
std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& checkpoints_dir);
std::optional<std::filesystem::path> latest_checkpoint(
    const std::filesystem::path& checkpoints_dir);

// Removes all but the newest `keep_last` checkpoints, and any *.tmp leftovers.
void prune_checkpoints(const std::filesystem::path& checkpoints_dir, int64_t keep_last);
void remove_stale_temporaries(const std::filesystem::path& checkpoints_dir);

// Reads trainer_state.json of a checkpoint (an Error naming the file when it is missing or
// malformed).
nlohmann::json read_trainer_state(const std::filesystem::path& checkpoint);

// Copies the tensors of checkpoint/FILE (model.safetensors or optimizer.safetensors) into
// `targets` by name: every target must be present with the same shape and dtype.
void load_checkpoint_tensors(const std::filesystem::path& file,
                             std::span<const CheckpointTensor> targets, Backend& backend);

// fsync helpers (the rename dance above); errors name the path.
void fsync_path(const std::filesystem::path& path);

}  // namespace moetune
