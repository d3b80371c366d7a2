// The optimizer in the backward (training.optimizer_in_backward, `moetune bench
// --optimizer-in-backward`): AdamW applied to each gradient group of a Model with
// GradientStorage::PerGroup inside its gradient-ready hook, while the group's gradients
// exist, plus each group's squared gradient norm (for the log and the non-finite guard).
// Several ranks: the same with DataParallelAdamW, whose update_group also reduces the group's
// gradients over the ranks first and all-gathers the updated weights after (its norm is of
// this rank's shard; grad_norm() sums the groups' norms over the world).
//
//   InBackwardOptimizer in_backward(*model, adamw, backend, {});
//   each step: in_backward.begin_step(lr); model->zero_grads(); model->forward_backward(...);
//              double norm = in_backward.grad_norm();
//
// Fused expert updates (InBackwardOptions::fuse_expert_updates, one process): the MoE
// backward hands each expert weight's gradient computation to the optimizer
// (Model::set_expert_weight_update), which steps those weights inside it with
// Backend::grouped_gemm_weight_grad_adamw (on CUDA in the GEMM's epilogue: the expert gradients,
// most of a MoE layer's gradient bytes, never exist; the group arenas hold the rest of the
// layer). The group's hook then norms and updates the other parameters (AdamW::set_fused marks
// the experts); grad_norm() adds the experts' norms, one slot per (expert weight, chunk). The
// weights and AdamW state are bit-identical to the unfused path where the backend's fused op
// equals grouped_gemm_weight_grad + adamw_update (the same elementwise update of the same
// gradient: the default composition, which the CUDA kernel is tested against); the norm
// equals it to rounding (summed in other pieces).
//
// Overlap (InBackwardOptions::overlap, on backends with streams: CUDA): the group's norm and
// update run on a side stream, beside the backward of the next layers, instead of between
// them on the ops' stream (low priority for one GPU; the ops' priority with data parallelism,
// so that a peer's collective never waits for this rank's backward to free the SMs). The
// rules that keep it correct:
//  - order: the side stream starts a group's work after every op enqueued so far (the ops
//    that wrote its gradients; SideStreamOps begins with wait_for_ops());
//  - gradients: Model::set_gradient_side_stream makes the model rotate the groups through two
//    arenas and join the fence recorded after a group's update before it binds another group
//    to the same arena (one extra arena of memory, the largest group's gradients);
//  - temporaries of the side ops (AdamW descriptor tables, norm partials) come from the
//    caching allocator in its side-stream mode: a block freed there is reused only once the
//    side stream has passed the free (ops/cuda/caching_allocator.cpp);
//  - weights: a group's update writes only its own weights and AdamW state, which the
//    backward reads no more this step (recompute reruns layer l's forward before layer l's
//    group is finished; the tied lm_head is read by the loss, before every group);
//  - fused expert updates are not side work: they run inline on the ops' stream, inside the
//    MoE backward (they are part of it), after the chunk's data gradients that read those
//    expert weights, so they need no fence; they write only their chunk's experts' weights and
//    state (no other group's update touches them) and their own norm slots;
//  - the end of the step: forward_backward joins the side stream before it returns, so the
//    next forward, grad_norm(), checkpoints and exports see every update.
// SM partition (InBackwardOptions::optimizer_sms, one process): the side stream owns a few
// SMs (a CUDA green context) and the ops' persistent kernels size their grids to the rest,
// so the updates stream on their SMs beside the backward instead of taking turns with its
// kernels; the last kInlineTailGroups groups (layer 0, the embedding) update inline, on every
// SM, as nothing is left to overlap them with.
// The kernels and their order within each group are the same as without overlap, so the
// weights are bit-identical. Without streams (CPU) or overlap off, the work runs inline in
// the hook on the ops' stream.
#pragma once

#include <memory>

#include "core/tensor.h"
#include "model/model.h"
#include "ops/backend.h"
#include "train/adamw.h"
#include "train/sharded_adamw.h"

namespace moetune {

struct InBackwardOptions {
  bool overlap = true;    // norms and updates on a side stream when the backend has streams
  bool grad_norm = true;  // each group's squared gradient norm (grad_norm())
  // One process (the AdamW& constructor): the expert weights' updates fused into their
  // gradient GEMMs (see above); ignored with DataParallelAdamW (its gradients must be
  // reduced over the ranks before any update). Off by default until the fused kernel is
  // measured faster than the separate update on the GPU (docs/BENCHMARKS.md, ninth session).
  bool fuse_expert_updates = false;
  // With overlap, one process: the side stream owns this many SMs (a CUDA green context;
  // Backend::make_side_stream) and the backward's persistent kernels the rest, so the
  // memory-bound updates stream beside the compute-bound backward instead of taking turns
  // with it. 0: the side stream shares every SM (at a lower priority).
  int optimizer_sms = 0;
};

class InBackwardOptimizer {
 public:
  // Installs the gradient-ready hook on `model` (GradientStorage::PerGroup) and, with
  // overlap, the side stream. `model` and `optimizer` (over model.parameters()) must
  // outlive this object.
  InBackwardOptimizer(Model& model, AdamW& optimizer, const InBackwardOptions& options = {});
  // Several ranks: `optimizer` was built over model.parameters() and model.gradient_groups().
  InBackwardOptimizer(Model& model, DataParallelAdamW& optimizer,
                      const InBackwardOptions& options = {});
  ~InBackwardOptimizer();  // removes the hook, the expert weight update and the side stream
  // The SMs the side stream owns (InBackwardOptions::optimizer_sms rounded up by the driver;
  // 0: none, or no partition could be made).
  int optimizer_sms() const { return side_ ? side_->own_sms() : 0; }
  InBackwardOptimizer(const InBackwardOptimizer&) = delete;
  InBackwardOptimizer& operator=(const InBackwardOptimizer&) = delete;

  // Before the step's forward_backward: counts the step (AdamW::begin_step) and sets the lr
  // the groups' updates use.
  void begin_step(double lr);
  // The global gradient norm of the last step: sqrt of the sum of the groups' squared norms
  // (one host read; needs InBackwardOptions::grad_norm). Several ranks: a collective over the
  // world (every rank must call it), the same value on every rank.
  double grad_norm();
  // True when the updates run on a side stream.
  bool overlapping() const { return side_ != nullptr; }
  // True when the expert weights are updated inside their gradient GEMMs (fuse_expert_updates
  // on one process, and the model has MoE layers).
  bool fuses_expert_updates() const { return !fused_slot_.empty(); }

 private:
  // Groups at the end of the backward whose updates stay inline (on every SM) when the side
  // stream owns a few SMs: no backward is left to overlap them with.
  static constexpr size_t kInlineTailGroups = 2;

  InBackwardOptimizer(Model& model, AdamW* single, DataParallelAdamW* sharded,
                      const InBackwardOptions& options);
  void on_group_ready(size_t index);
  // The fused expert weight update Model::set_expert_weight_update calls.
  void update_experts(size_t parameter, int64_t expert_begin, int64_t expert_end, const Tensor& dy,
                      const Tensor& x, const Tensor& offsets);

  Model& model_;
  AdamW* single_ = nullptr;               // one process
  DataParallelAdamW* sharded_ = nullptr;  // several ranks
  InBackwardOptions options_;
  std::unique_ptr<Backend::SideStream> side_;  // null: inline
  Buffer group_norms_squared_;                 // (groups) fp32
  // Fused expert updates: per parameter its row in expert_norms_squared_ (-1: not fused);
  // empty when not fusing. expert_norms_squared_ (fused parameters, local experts) fp32 holds
  // each chunk's squared gradient norm at its first expert (the other slots stay zero).
  std::vector<int64_t> fused_slot_;
  Buffer expert_norms_squared_;
  double lr_ = 0;
};

}  // namespace moetune
