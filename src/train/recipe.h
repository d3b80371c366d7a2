// The training recipe: one YAML file with the sections below, validated key by key (an
// unknown key names the closest valid one; a wrong type names the key and the value).
// Command-line overrides `--optimizer.lr=2e-5` are applied to the YAML tree before it is
// validated, so they are typed and checked exactly like the file's own values.
//
//   model:
//     path: HF_FOLDER            # weights + config.json (+ tokenizer files), or instead:
//     config: config.json        # random init from a config (seed: training.seed)
//     tokenizer: FOLDER          # [model.path, or the config's folder]
//     dtype: fp32                # fp32 | bf16: storage of weights and gradients
//   data: ...                    # see data/data_config.h
//   training:
//     max_steps: 200             # optimizer steps; or instead
//     epochs: 1.0                # passes over the training rows
//     global_batch_sequences: 32 # rows per optimizer step; or instead
//     global_batch_tokens: 65536 # tokens per optimizer step (a multiple of seq_len)
//     micro_batch: 8             # rows per forward/backward; accumulation = global / micro
//     seq_len: 2048
//     seed: 42
//     eval_every: 0              # [0: only at the end] optimizer steps between evals
//     eval_batches: 8            # micro-batches per eval (0: the whole held-out split)
//     max_bad_steps: 5           # stop after this many non-finite steps in a row
//     recompute: false           # activation checkpointing per decoder layer (less memory,
//                                # one more forward per layer)
//     optimizer_in_backward: auto # auto | true | false: AdamW updates each gradient group as
//                                # soon as the backward finishes it, and the gradients live
//                                # only per group (memory: ~2 layers of gradients instead of
//                                # all). Needs one micro-batch per step (per rank with several
//                                # ranks) and no clipping; auto:
//                                # on exactly then (true otherwise is an error). The non-finite
//                                # guard then stops the run but cannot skip the update.
//   optimizer:
//     lr: 1e-4
//     betas: [0.9, 0.999]
//     eps: 1e-8
//     weight_decay: 0.0
//     no_decay: [norm, bias]     # substrings of parameter names that are not decayed
//     grad_clip: 1.0             # max global gradient norm (0: no clipping)
//     master_weights: fp32       # fp32 | bf16 (with model.dtype bf16)
//   scheduler:
//     type: cosine               # constant | linear | cosine
//     warmup_steps: 0            # or warmup_ratio: 0.1 (of the total steps)
//     min_lr: 0.0                # or min_lr_ratio: 0.1 (of optimizer.lr)
//   checkpoint:
//     every: 0                   # steps between checkpoints (0: none; the final one and
//                                # the one on SIGINT/SIGTERM are still written)
//     keep_last: 2
//     hf_export_every: 0         # steps between HF exports to hf-step-N/ (0: none)
//     save_final_hf: true        # the HF folder at the end, in OUTPUT/hf/
//   logging:
//     every: 1                   # steps between metrics.jsonl rows / log lines
//     progress: auto             # auto | bar | plain | none
//   parallel:
//     device: cpu                # cpu | cuda | cuda:N
//     expert_parallel: 1         # ranks the experts are split over (must divide the world)
//     data_parallel: 4           # [world / expert_parallel] replicas; if given it must match
//     zero_stage: 1              # with several ranks (docs/MULTI_GPU.md), per rank, for P
//                                # parameters over N data-parallel ranks:
//                                # 0: gradients all-reduced; full AdamW state (8P bytes) and
//                                #    fp32 master weights (4P, bf16 models) on every rank
//                                # 1: gradients all-reduced; state and master sharded (12P/N),
//                                #    each rank updates its shard, weights all-gathered
//                                # 2: as 1, gradients reduce-scattered: each rank keeps only
//                                #    its shard's reduced gradient (half the traffic of 1)
//                                # (expert weights: N = data_parallel, the replicas of an
//                                # expert slice; every other weight: N = the world)
//     overlap_communication: true  # gradient reductions on a communication stream beside
//                                  # the backward (CUDA; false: on the compute stream)
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "data/data_config.h"
#include "train/schedule.h"

namespace moetune {

struct ModelRecipe {
  std::optional<std::filesystem::path> path;    // HF folder
  std::optional<std::filesystem::path> config;  // config.json for random init
  std::filesystem::path tokenizer;              // the folder with tokenizer.json
  DType dtype = DType::F32;
};

struct TrainingRecipe {
  std::optional<int64_t> max_steps;
  std::optional<double> epochs;
  std::optional<int64_t> global_batch_sequences;
  std::optional<int64_t> global_batch_tokens;
  int64_t micro_batch = 1;
  int64_t seq_len = 2048;
  uint64_t seed = 42;
  int64_t eval_every = 0;
  int64_t eval_batches = 8;
  int64_t max_bad_steps = 5;
  bool recompute = false;
  std::optional<bool> optimizer_in_backward;  // nullopt: auto

  // Rows per optimizer step (from global_batch_sequences or global_batch_tokens).
  int64_t global_batch_rows() const;
  int64_t grad_accumulation() const { return global_batch_rows() / micro_batch; }
};

struct OptimizerRecipe {
  double lr = 1e-4;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  std::vector<std::string> no_decay = {"norm", "bias"};
  double grad_clip = 1.0;
  DType master_weights = DType::F32;

  // True when the parameter `name` is decayed (no no_decay substring occurs in it).
  bool decays(const std::string& name) const;
};

struct SchedulerRecipe {
  ScheduleType type = ScheduleType::Cosine;
  std::optional<int64_t> warmup_steps;
  std::optional<double> warmup_ratio;
  std::optional<double> min_lr;
  std::optional<double> min_lr_ratio;

  LrSchedule make(double base_lr, int64_t total_steps) const;
};

struct CheckpointRecipe {
  int64_t every = 0;
  int64_t keep_last = 2;
  int64_t hf_export_every = 0;
  bool save_final_hf = true;
};

enum class ProgressStyle { Auto, Bar, Plain, None };

struct LoggingRecipe {
  int64_t every = 1;
  ProgressStyle progress = ProgressStyle::Auto;
};

struct ParallelRecipe {
  std::string device = "cpu";
  int64_t data_parallel = 0;  // 0: not given (world / expert_parallel)
  int64_t expert_parallel = 1;
  int64_t zero_stage = 1;
  bool overlap_communication = true;
};

struct Recipe {
  // training.optimizer_in_backward resolved for a run on `ranks` processes: auto = one
  // micro-batch per rank and step and no clipping; true without one micro-batch per rank
  // fails (naming the keys).
  bool optimizer_in_backward(int ranks = 1) const;

  std::filesystem::path source;  // the recipe file (absolute)
  ModelRecipe model;
  DataConfig data;
  TrainingRecipe training;
  OptimizerRecipe optimizer;
  SchedulerRecipe scheduler;
  CheckpointRecipe checkpoint;
  LoggingRecipe logging;
  ParallelRecipe parallel;
  YAML::Node tree;  // the YAML after overrides, with relative paths made absolute
};

// "--optimizer.lr=2e-5" style overrides: each "section.key[.key...]=value"; the value is
// read as YAML (a number, a string, a [list]).
struct RecipeOverride {
  std::string key;
  std::string value;
};
// Parses "section.key=value" (leading dashes allowed); an Error when there is no '='.
RecipeOverride parse_override(const std::string& argument);

// Reads, overrides and validates a recipe.
Recipe load_recipe(const std::filesystem::path& file,
                   const std::vector<RecipeOverride>& overrides = {});
// From YAML text (tests); relative paths resolve against `base_dir`.
Recipe parse_recipe(const YAML::Node& root, const std::filesystem::path& base_dir,
                    const std::filesystem::path& source,
                    const std::vector<RecipeOverride>& overrides = {});

// The resolved recipe as YAML: every section with its defaults filled in, paths absolute
// (written to OUTPUT/recipe.yaml; loading it again gives the same recipe).
std::string resolved_recipe_yaml(const Recipe& recipe);

}  // namespace moetune
