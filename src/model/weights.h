// Model parameters in the engine's layout, on the backend's device, each with its gradient.
//
// Layout (H hidden, D head_dim, Hq/Hkv query/KV heads, I dense or expert width, E experts):
//   embed (V, H); per layer: input_norm (H), q (Hq*D, H), k and v (Hkv*D, H), o (H, Hq*D),
//   optional biases, q_norm/k_norm (D) with qk_norm, post_norm (H); a dense MLP as
//   gate_up (2I, H) [gate rows then up rows] and down (H, I); a MoE block as router (E, H),
//   experts_gate_up (E, 2I, H) and experts_down (E, H, I) (E = this rank's experts with
//   expert parallelism); final_norm (H); lm_head (V, H)
//   (the embedding itself when tied: same value and same gradient, listed once).
// Parameter names are Transformers v5's in-memory names (model.named_parameters()), except
// the fused dense MLP ("mlp.gate_up_proj.weight"), which Transformers keeps as two Linears.
// hf_names.h maps them to the on-disk (per-expert) names.
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/model_config.h"

namespace moetune {

struct Parameter {
  std::string name;
  Tensor value;
  Tensor grad;
  bool decay = true;  // false for norms and biases by default; the optimizer decides
  // Expert weights ((E_local, ...) when experts are split by expert parallelism): their
  // gradients are reduced over the replicas of this rank's expert shard (the expert-DP
  // group), every other parameter's over all ranks.
  bool expert = false;
};

struct LayerWeights {
  bool moe = false;
  Tensor input_norm;                      // (H)
  Tensor q, k, v, o;                      // (Hq*D, H), (Hkv*D, H), (Hkv*D, H), (H, Hq*D)
  Tensor q_bias, k_bias, v_bias, o_bias;  // (Hq*D), (Hkv*D), (Hkv*D), (H) with attention_bias
  Tensor q_norm, k_norm;                  // (D) with qk_norm
  Tensor post_norm;                       // (H)
  Tensor mlp_gate_up;                     // (2I, H) dense layers
  Tensor mlp_down;                        // (H, I)
  Tensor router;                          // (E, H) MoE layers
  Tensor experts_gate_up;                 // (E, 2I, H)
  Tensor experts_down;                    // (E, H, I)
};

// The same structure holds the values or the gradients.
struct WeightTensors {
  Tensor embed;  // (V, H)
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // (H)
  Tensor lm_head;     // (V, H), == embed when tied
};

class ModelWeights {
 public:
  // Allocates (zero-filled) values in value_dtype and gradients in grad_dtype on `device`.
  // local_experts: experts held here (expert parallelism; < 0 = all num_experts). Without
  // allocate_grads the gradients are unbound (shape and dtype, no data) until bind_grad gives
  // them memory (per-group gradient storage, model.h).
  ModelWeights(const ModelConfig& config, DType value_dtype, DType grad_dtype, Device device,
               int64_t local_experts = -1, bool allocate_grads = true);
  ModelWeights(const ModelWeights&) = delete;
  ModelWeights& operator=(const ModelWeights&) = delete;

  std::vector<Parameter>& parameters() { return parameters_; }
  const std::vector<Parameter>& parameters() const { return parameters_; }
  const WeightTensors& values() const { return values_; }
  const WeightTensors& grads() const { return grads_; }
  // nullptr when there is no parameter of that name.
  const Parameter* find(const std::string& name) const;
  // Points parameter `index`'s gradient (Parameter::grad and the grads() field, both names
  // of a tied lm_head included) at `grad` (same shape and dtype; no data = unbound).
  void bind_grad(size_t index, void* data);

 private:
  std::vector<Tensor*> grad_fields_;  // per parameter: its tensor in grads_
  bool tied_ = false;                 // grads_.lm_head is grads_.embed
  std::vector<Buffer> storage_;
  std::vector<Parameter> parameters_;
  WeightTensors values_;
  WeightTensors grads_;
};

// True for the parameters that are norms or biases (not decayed by default).
bool is_norm_or_bias(const std::string& name);

}  // namespace moetune
