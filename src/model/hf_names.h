// The mapping between engine parameters and the tensors of an HF checkpoint on disk.
//
// Most parameters are one on-disk tensor under the same name. Fused ones are several:
// a dense MLP's gate_up (2I, H) is mlp.gate_proj (rows [0, I)) and mlp.up_proj (rows
// [I, 2I)); MoE experts (E, 2I, H) / (E, H, I) are per-expert tensors, Qwen3-MoE
// `mlp.experts.{e}.{gate,up,down}_proj.weight`, Mixtral
// `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` (w1 = gate, w3 = up, w2 = down), and the
// Mixtral router is `block_sparse_moe.gate.weight`. Every piece is a contiguous range of
// its parameter (row-major), so loading and saving copy slices and never transpose.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/model_config.h"

namespace moetune {

struct HfTensor {
  std::string hf_name;    // name in the safetensors file
  Shape shape;            // its shape on disk
  std::string parameter;  // the engine parameter holding it
  int64_t offset = 0;     // first element inside that parameter
  bool expert = false;    // one expert's weight (a piece of experts_gate_up / experts_down)
};

// Every tensor of the model's HF checkpoint, in Transformers' state-dict order.
// lm_head.weight is absent when the embeddings are tied.
// With expert parallelism (expert_count >= 0): only experts [first_expert, first_expert +
// expert_count) are listed (under their global names), at offsets inside the local
// parameters (E_local, ...).
std::vector<HfTensor> hf_checkpoint_tensors(const ModelConfig& config, int64_t first_expert = 0,
                                            int64_t expert_count = -1);

}  // namespace moetune
