// Memory needed to train a model, from its config and the micro-batch shape: weights,
// gradients, AdamW state (and fp32 master weights when the weights are stored in bf16),
// and the activations one micro-batch saves for its backward (plus the shared scratch).
// The numbers follow the buffers model.cpp allocates, so `inspect` and the trainer's plan
// say what the run will really hold (allocator overhead and the CUDA context excluded).
// Several ranks: the plan is per rank (experts split over the expert-parallel ranks, AdamW
// state sharded by ZeRO), with balanced routing assumed: a rank whose experts the router
// favours receives more rows than it sends, and holds more expert activations.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "io/model_config.h"

namespace moetune {

struct MemoryPlanOptions {
  DType param_dtype = DType::F32;
  DType grad_dtype = DType::F32;
  int64_t batch = 1;  // micro-batch rows
  int64_t seq = 2048;
  bool recompute_layers = false;  // ModelOptions::recompute_layers
  // GradientStorage::PerGroup (optimizer in the backward): gradients are held per gradient
  // group, so the plan counts the largest group plus a tied embedding's gradient.
  bool per_group_grads = false;
  // With per_group_grads: the arenas the groups rotate through (Model::gradient_arenas():
  // 1, or 2 when the updates run on a side stream beside the backward).
  int64_t gradient_arenas = 1;
  // With per_group_grads: the expert weights' updates are fused into their gradient GEMMs
  // (InBackwardOptions::fuse_expert_updates, one process; Model::set_expert_weight_update),
  // so the groups hold no routed-expert gradients (the CPU backend's default fused op keeps
  // one expert weight's gradient as a temporary, not counted: the CUDA one stores none).
  bool fused_expert_updates = false;
  // AdamW state storage and fp32 master copies of non-fp32 weights (the trainer: fp32 state
  // and master weights; `moetune bench`: state in the weights' dtype, no master copies).
  DType state_dtype = DType::F32;
  bool master_weights = true;
  // Several ranks (world = data_parallel x expert_parallel): each rank holds 1/expert_parallel
  // of every MoE layer's routed experts and all other parameters. zero_stage >= 1 shards the
  // AdamW state and master weights over the ranks holding the same parameters (the world for
  // non-expert parameters, the data_parallel replicas for experts); stage 2 adds the reduced
  // gradients' shards (1/ranks of the gradients). The expert exchange adds its send/receive
  // buffers to the scratch.
  int64_t expert_parallel = 1, data_parallel = 1;
  int zero_stage = 0;
  // The fused LM head + loss's logits chunk (the CUDA backend computes at most 640 MiB of
  // logit rows at a time: cuda_backend.cpp); 0: none counted.
  int64_t logits_chunk_limit = 0;
};

struct MemoryPlan {
  int64_t weights = 0;
  int64_t grads = 0;            // all of them, or the per-group peak with per_group_grads
  int64_t master_weights = 0;   // fp32 copies when param_dtype is not F32
  int64_t optimizer_state = 0;  // exp_avg + exp_avg_sq (of this rank's shard)
  int64_t activations = 0;      // saved by one micro-batch, all layers
  int64_t scratch = 0;          // per-layer backward buffers shared by all layers, the logits chunk
  int64_t total() const {
    return weights + grads + master_weights + optimizer_state + activations + scratch;
  }
};

MemoryPlan plan_memory(const ModelConfig& config, const MemoryPlanOptions& options);

// Parameters of the routed experts of all MoE layers (Parameter::expert; split by expert
// parallelism).
int64_t count_expert_parameters(const ModelConfig& config);

}  // namespace moetune
