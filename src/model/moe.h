// Sparse MoE block as a pipeline of stages:
//   route    router logits = x W_r^T (N, E) -> fp32 softmax, top-k, (renormalised) weights
//   dispatch counting sort of the N*k (token, choice) slots by expert, gather rows
//   experts  grouped GEMM gate_up (E, 2I, H) -> SwiGLU -> grouped GEMM down (E, H, I)
//   combine  out[n] = sum_j weight[n, j] * expert_out[row of (n, j)]
// Dispatch and combine sit behind TokenDispatcher so that expert parallelism (all-to-all
// across GPUs) can replace the local implementation without touching routing or experts.
// The load-balancing aux loss is computed over all MoE layers at once (model.cpp); each
// layer's backward receives its gradient w.r.t. the router probabilities (aux_dprob).
#pragma once

#include <memory>

#include "core/tensor.h"
#include "io/model_config.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace moetune {

// Where each (token, choice) slot went: expert-sorted rows.
struct MoeRouting {
  Tensor expert_offsets;  // (E + 1) I32
  Tensor sorted_slots;    // (N*k) I32: slot held by each row
  Tensor slot_rows;       // (N*k) I32: row of each slot
};

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  // Plans the permutation from topk_ids (N, k) and gathers x (N, H) into rows (N*k, H).
  virtual void dispatch(const Tensor& x, const Tensor& topk_ids, const MoeRouting& routing,
                        const Tensor& rows) = 0;
  // dx (N, H) += gradient of dispatch given drows (N*k, H).
  virtual void dispatch_backward(const Tensor& drows, const MoeRouting& routing,
                                 const Tensor& dx) = 0;
  // out (N, H) = weighted sum of each token's expert outputs (N*k, H).
  virtual void combine(const Tensor& expert_out, const Tensor& weights, const MoeRouting& routing,
                       const Tensor& out) = 0;
  virtual void combine_backward(const Tensor& dout, const Tensor& expert_out, const Tensor& weights,
                                const MoeRouting& routing, const Tensor& dexpert_out,
                                const Tensor& dweights) = 0;
};

// All experts on this device.
std::unique_ptr<TokenDispatcher> make_local_dispatcher(Backend& backend, int64_t num_experts,
                                                       int64_t top_k);

struct MoeSaved {
  Buffer probs;           // (N, E) fp32 softmax
  Buffer topk_ids;        // (N, k) I32
  Buffer topk_weights;    // (N, k) fp32
  Buffer expert_offsets;  // (E + 1) I32
  Buffer sorted_slots;    // (N*k) I32
  Buffer slot_rows;       // (N*k) I32
  Buffer rows;            // (N*k, H) gathered inputs
  Buffer gate_up;         // (N*k, 2I)
  Buffer hidden;          // (N*k, I)
  Buffer expert_out;      // (N*k, H)
  MoeRouting routing() const {
    return {expert_offsets.tensor(), sorted_slots.tensor(), slot_rows.tensor()};
  }
};
struct MoeScratch {
  Buffer router_logits;   // (N, E)
  Buffer dexpert_out;     // (N*k, H)
  Buffer dhidden;         // (N*k, I)
  Buffer dgate_up;        // (N*k, 2I)
  Buffer drows;           // (N*k, H)
  Buffer dtopk_weights;   // (N, k) fp32
  Buffer drouter_logits;  // (N, E)
  Buffer balanced_ids;    // (N, k) I32, optional: dispatch by these ids instead of the top-k
};

void allocate_moe(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                  MoeSaved& saved);
void allocate_moe_scratch(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                          MoeScratch& scratch);

void moe_forward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                 const LayerWeights& w, const Tensor& x, MoeSaved& saved, MoeScratch& scratch,
                 const Tensor& out);
// aux_dprob (E) fp32: d(total loss)/d(probs[n, e]) of the aux loss, or undefined.
// dx (N, H) overwritten; gradients accumulated into g (overwritten with accumulate_grads
// false, experts without rows included).
void moe_backward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                  const LayerWeights& w, const LayerWeights& g, const Tensor& x,
                  const MoeSaved& saved, const Tensor& aux_dprob, const Tensor& dout,
                  MoeScratch& scratch, const Tensor& dx, bool accumulate_grads);

}  // namespace moetune
