// Distributed parts of a training checkpoint (several ranks): besides model.safetensors and
// trainer_state.json (rank 0), each rank writes
//   step-N/rank-R/optimizer.safetensors  its optimizer shard: for every parameter the state
//                                        tensors (exp_avg.NAME, ...) over an element range
//                                        of the flattened parameter
//   step-N/rank-R/shards.json            {rank, ep_rank, params: {NAME: [begin, end, numel,
//                                        expert]}}
//   step-N/rank-R/experts.safetensors    expert weights of EP rank R (expert_parallel > 1,
//                                        written by the first replica of each EP rank)
// Loading cuts the saved ranges again for any target layout: the same data-parallel size
// (bit-identical resume), another one (each target range gathers the overlapping saved
// ranges), or a single process (whole tensors). A single-process checkpoint (one
// optimizer.safetensors of whole tensors) loads into a sharded run the same way. Expert
// state is only read from ranks of the same EP rank (expert_parallel must not change).
#pragma once

#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "ops/backend.h"
#include "train/sharded_adamw.h"

namespace moetune {

using OptimizerShard = DataParallelAdamW::StateShard;

// Writes FOLDER/rank-R/{optimizer.safetensors, shards.json}.
void write_optimizer_shards(const std::filesystem::path& folder, int rank, int ep_rank,
                            std::span<const OptimizerShard> shards, Backend& backend);

// Fills every target's tensors (their ranges) from the checkpoint's optimizer state (rank-*/
// shards, or a single optimizer.safetensors). An Error names the checkpoint and the tensor
// when a range is not covered or shapes/dtypes differ.
void load_optimizer_shards(const std::filesystem::path& checkpoint,
                           std::span<const OptimizerShard> targets, int ep_rank, Backend& backend);

// True when the checkpoint was written by several ranks (has rank-*/shards.json).
bool is_distributed_checkpoint(const std::filesystem::path& checkpoint);

}  // namespace moetune
