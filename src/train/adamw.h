// AdamW over a model's parameters: torch.optim.AdamW semantics (decoupled weight decay,
// bias correction), one Backend::adamw_update call per step for all parameters, or (optimizer
// in the backward) one per gradient group: begin_step(), then update(begin, end) for each
// group inside the model's gradient-ready hook; the result is bit-identical (AdamW is
// elementwise). Fused parameters (set_fused: the optimizer in the backward fused into the
// expert weight gradients) are stepped by fused_expert_update() from inside the backward,
// where their gradient is computed, instead of by update().
// State: exp_avg and exp_avg_sq (fp32, or AdamWConfig::state_dtype) per parameter, the step
// counter, and fp32 master weights for parameters stored in a lower precision (unless
// AdamWConfig::master_weights is off). The state tensors are exposed by name for checkpointing
// ("exp_avg.NAME", "exp_avg_sq.NAME", "master.NAME").
#pragma once

#include <span>
#include <string>
#include <vector>

#include "model/weights.h"
#include "ops/backend.h"

namespace moetune {

struct AdamWConfig {
  double lr = 1e-3;  // double, as Python floats in torch (see AdamWHyper)
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // applied to parameters with decay == true
  // Storage of exp_avg / exp_avg_sq (F32; BF16 as torch keeps it for bf16 parameters, used
  // by `moetune bench` for a like-for-like comparison) and whether non-F32 parameters get
  // fp32 master weights (without: updated in place in their own dtype).
  DType state_dtype = DType::F32;
  bool master_weights = true;
};

class AdamW {
 public:
  // Parameters must outlive the optimizer. Master fp32 copies are made for non-F32 params.
  AdamW(std::span<const Parameter> parameters, Backend& backend, const AdamWConfig& config);

  // One update of every parameter from its gradient times grad_scale (clipping); lr may be
  // overridden per step (schedules).
  void step(double lr, float grad_scale = 1.0f);
  void step() { step(config_.lr); }
  // The same step in pieces: begin_step() counts it, then update() applies it to parameters
  // [begin, end) (indices of the span given to the constructor), reading each parameter's
  // gradient from its Parameter::grad at that moment (per-group gradients move).
  void begin_step();
  void update(size_t begin, size_t end, double lr, float grad_scale = 1.0f);

  // Parameters whose step is fused into the computation of their gradient (expert weights
  // under the optimizer in the backward: InBackwardOptimizer with fused expert updates). step()
  // and update() skip them (their Parameter::grad has no data), fused_expert_update() steps
  // them; their state stays where it is (checkpoints are unchanged).
  void set_fused(size_t index, bool fused);
  bool fused(size_t index) const { return fused_[index]; }
  // The current step (after begin_step(), at `lr`, no gradient scaling: the optimizer in the
  // backward does not clip) of experts [expert_begin, expert_end) of the expert weight
  // parameter `index` (E, P, Q), a fused one, from the gradient
  // grouped_gemm_weight_grad(dy, x, offsets, ...) would give them (in the parameter's gradient
  // dtype; never stored): Backend::grouped_gemm_weight_grad_adamw on that slice of the weight and
  // its state. norm_squared (1) fp32, optional, is overwritten with the gradient's squared norm.
  // Bit-identical to update() of a gradient computed by grouped_gemm_weight_grad (AdamW is
  // elementwise), so the experts may be stepped in any number of slices.
  void fused_expert_update(size_t index, int64_t expert_begin, int64_t expert_end, const Tensor& dy,
                           const Tensor& x, const Tensor& offsets, double lr,
                           const Tensor& norm_squared = Tensor());

  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t steps) { step_count_ = steps; }
  const AdamWConfig& config() const { return config_; }

  struct StateTensor {
    std::string name;
    Tensor tensor;  // on the backend's device
  };
  std::vector<StateTensor> state_tensors() const;

 private:
  AdamWHyper hyper(double lr) const;  // the current step's hyper-parameters

  Backend& backend_;
  AdamWConfig config_;
  int64_t step_count_ = 0;
  std::vector<std::string> names_;
  std::vector<Buffer> storage_;
  std::vector<AdamWParam> params_;
  std::span<const Parameter> parameters_;
  std::vector<bool> fused_;  // per parameter: stepped by fused_expert_update(), not update()
};

}  // namespace moetune
