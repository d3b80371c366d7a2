// Sparse MoE block forward and backward, and the local token dispatcher (see moe.h).
#include "model/moe.h"

namespace moetune {

namespace {
class LocalDispatcher final : public TokenDispatcher {
 public:
  LocalDispatcher(Backend& backend, int64_t num_experts, int64_t top_k)
      : backend_(backend),
        num_experts_(static_cast<int>(num_experts)),
        top_k_(static_cast<int>(top_k)) {}

  void dispatch(const Tensor& x, const Tensor& topk_ids, const MoeRouting& routing,
                const Tensor& rows) override {
    backend_.moe_sort_by_expert(topk_ids, num_experts_, routing.expert_offsets,
                                routing.sorted_slots, routing.slot_rows);
    backend_.moe_gather(x, routing.sorted_slots, top_k_, rows);
  }
  void dispatch_backward(const Tensor& drows, const MoeRouting& routing,
                         const Tensor& dx) override {
    backend_.moe_gather_backward(drows, routing.sorted_slots, top_k_, dx);
  }
  void combine(const Tensor& expert_out, const Tensor& weights, const MoeRouting& routing,
               const Tensor& out) override {
    backend_.moe_combine(expert_out, weights, routing.slot_rows, out);
  }
  void combine_backward(const Tensor& dout, const Tensor& expert_out, const Tensor& weights,
                        const MoeRouting& routing, const Tensor& dexpert_out,
                        const Tensor& dweights) override {
    backend_.moe_combine_backward(dout, expert_out, weights, routing.slot_rows, dexpert_out,
                                  dweights);
  }

 private:
  Backend& backend_;
  int num_experts_;
  int top_k_;
};
}  // namespace

std::unique_ptr<TokenDispatcher> make_local_dispatcher(Backend& backend, int64_t num_experts,
                                                       int64_t top_k) {
  return std::make_unique<LocalDispatcher>(backend, num_experts, top_k);
}

void allocate_moe(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                  MoeSaved& saved) {
  const int64_t E = config.num_experts, k = config.num_experts_per_tok;
  const int64_t H = config.hidden_size, I = config.moe_intermediate_size, slots = tokens * k;
  saved.probs = Buffer(DType::F32, {tokens, E}, device);
  saved.topk_ids = Buffer(DType::I32, {tokens, k}, device);
  saved.topk_weights = Buffer(DType::F32, {tokens, k}, device);
  saved.expert_offsets = Buffer(DType::I32, {E + 1}, device);
  saved.sorted_slots = Buffer(DType::I32, {slots}, device);
  saved.slot_rows = Buffer(DType::I32, {slots}, device);
  saved.rows = Buffer(dtype, {slots, H}, device);
  saved.gate_up = Buffer(dtype, {slots, 2 * I}, device);
  saved.hidden = Buffer(dtype, {slots, I}, device);
  saved.expert_out = Buffer(dtype, {slots, H}, device);
}

void allocate_moe_scratch(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                          MoeScratch& scratch) {
  const int64_t E = config.num_experts, k = config.num_experts_per_tok;
  const int64_t H = config.hidden_size, I = config.moe_intermediate_size, slots = tokens * k;
  scratch.router_logits = Buffer(dtype, {tokens, E}, device);
  scratch.dexpert_out = Buffer(dtype, {slots, H}, device);
  scratch.dhidden = Buffer(dtype, {slots, I}, device);
  scratch.dgate_up = Buffer(dtype, {slots, 2 * I}, device);
  scratch.drows = Buffer(dtype, {slots, H}, device);
  scratch.dtopk_weights = Buffer(DType::F32, {tokens, k}, device);
  scratch.drouter_logits = Buffer(dtype, {tokens, E}, device);
}

void moe_forward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                 const LayerWeights& w, const Tensor& x, MoeSaved& saved, MoeScratch& scratch,
                 const Tensor& out) {
  // route
  backend.gemm(x, false, w.router, true, scratch.router_logits);  // (N, E)
  backend.router_forward(scratch.router_logits, static_cast<int>(config.num_experts_per_tok),
                         config.norm_topk_prob, saved.probs, saved.topk_ids, saved.topk_weights);
  // dispatch
  const MoeRouting routing = saved.routing();
  // (ModelOptions::balanced_routing: fixed ids; the weights and their gradient stay the
  // router's, as in Transformers with its top-k indices replaced)
  const Tensor dispatch_ids = scratch.balanced_ids.data() != nullptr ? scratch.balanced_ids.tensor()
                                                                     : saved.topk_ids.tensor();
  dispatcher.dispatch(x, dispatch_ids, routing, saved.rows);  // (N*k, H)
  // experts
  backend.grouped_gemm(saved.rows, w.experts_gate_up, true, routing.expert_offsets,
                       saved.gate_up);                  // (N*k, 2I)
  backend.swiglu_forward(saved.gate_up, saved.hidden);  // (N*k, I)
  backend.grouped_gemm(saved.hidden, w.experts_down, true, routing.expert_offsets,
                       saved.expert_out);  // (N*k, H)
  // combine
  dispatcher.combine(saved.expert_out, saved.topk_weights, routing, out);  // (N, H)
}

void moe_backward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                  const LayerWeights& w, const LayerWeights& g, const Tensor& x,
                  const MoeSaved& saved, const Tensor& aux_dprob, const Tensor& dout,
                  MoeScratch& scratch, const Tensor& dx, bool accumulate_grads) {
  const MoeRouting routing = saved.routing();
  // combine
  dispatcher.combine_backward(dout, saved.expert_out, saved.topk_weights, routing,
                              scratch.dexpert_out, scratch.dtopk_weights);
  // experts: down then SwiGLU then gate_up
  backend.grouped_gemm(scratch.dexpert_out, w.experts_down, false, routing.expert_offsets,
                       scratch.dhidden);  // (N*k, I)
  backend.grouped_gemm_weight_grad(scratch.dexpert_out, saved.hidden, routing.expert_offsets,
                                   g.experts_down, accumulate_grads);         // (E, H, I)
  backend.swiglu_backward(scratch.dhidden, saved.gate_up, scratch.dgate_up);  // (N*k, 2I)
  backend.grouped_gemm(scratch.dgate_up, w.experts_gate_up, false, routing.expert_offsets,
                       scratch.drows);  // (N*k, H)
  backend.grouped_gemm_weight_grad(scratch.dgate_up, saved.rows, routing.expert_offsets,
                                   g.experts_gate_up, accumulate_grads);  // (E, 2I, H)
  // dispatch
  backend.fill(dx, 0.0f);
  dispatcher.dispatch_backward(scratch.drows, routing, dx);
  // route: the weights' gradient plus the aux loss' gradient through the softmax
  backend.router_backward(scratch.dtopk_weights, saved.probs, saved.topk_ids, config.norm_topk_prob,
                          aux_dprob, scratch.drouter_logits);
  backend.gemm(scratch.drouter_logits, false, w.router, false, dx, 1, 1);  // (N, H)
  backend.gemm(scratch.drouter_logits, true, x, false, g.router, 1,
               accumulate_grads ? 1.0f : 0.0f);  // (E, H)
}

}  // namespace moetune
