// AdamW state allocation and the step (see adamw.h).
#include "train/adamw.h"

namespace moetune {

AdamW::AdamW(std::span<const Parameter> parameters, Backend& backend, const AdamWConfig& config)
    : backend_(backend), config_(config), parameters_(parameters) {
  const Device device = backend.device();
  storage_.reserve(parameters.size() * 3);
  for (const Parameter& parameter : parameters) {
    AdamWParam entry;
    entry.param = parameter.value;
    entry.grad = parameter.grad;
    storage_.emplace_back(config.state_dtype, parameter.value.shape, device);
    entry.exp_avg = storage_.back().tensor();
    storage_.emplace_back(config.state_dtype, parameter.value.shape, device);
    entry.exp_avg_sq = storage_.back().tensor();
    if (parameter.value.dtype != DType::F32 && config.master_weights) {
      storage_.emplace_back(DType::F32, parameter.value.shape, device);
      entry.master = storage_.back().tensor();
      backend.copy(entry.master, parameter.value);
    }
    entry.weight_decay = parameter.decay ? static_cast<float>(config.weight_decay) : 0.0f;
    names_.push_back(parameter.name);
    params_.push_back(entry);
  }
  fused_.assign(params_.size(), false);
}

void AdamW::step(double lr, float grad_scale) {
  begin_step();
  update(0, params_.size(), lr, grad_scale);
}

void AdamW::begin_step() { ++step_count_; }

AdamWHyper AdamW::hyper(double lr) const {
  AdamWHyper hyper;
  hyper.lr = lr;
  hyper.beta1 = config_.beta1;
  hyper.beta2 = config_.beta2;
  hyper.eps = config_.eps;
  hyper.step = step_count_;
  return hyper;
}

void AdamW::update(size_t begin, size_t end, double lr, float grad_scale) {
  MOETUNE_CHECK(begin <= end && end <= params_.size(), "AdamW::update: bad parameter range");
  for (size_t i = begin; i < end; ++i) params_[i].grad = parameters_[i].grad;
  // The fused parameters were stepped in the backward (fused_expert_update); the others in one
  // call (each parameter's update is elementwise: the same values as over the whole range).
  std::vector<AdamWParam> unfused;
  for (size_t i = begin; i < end; ++i)
    if (!fused_[i]) unfused.push_back(params_[i]);
  if (!unfused.empty()) backend_.adamw_update(unfused, hyper(lr), grad_scale);
}

void AdamW::set_fused(size_t index, bool fused) {
  MOETUNE_CHECK(index < params_.size(), "AdamW::set_fused: no parameter ", index);
  fused_[index] = fused;
}

void AdamW::fused_expert_update(size_t index, int64_t expert_begin, int64_t expert_end,
                                const Tensor& dy, const Tensor& x, const Tensor& offsets, double lr,
                                const Tensor& norm_squared) {
  MOETUNE_CHECK(index < params_.size() && fused_[index], "AdamW::fused_expert_update: parameter ",
                index, " is not a fused one");
  const AdamWParam& whole = params_[index];
  MOETUNE_CHECK(whole.param.rank() == 3 && 0 <= expert_begin && expert_begin <= expert_end &&
                    expert_end <= whole.param.size(0),
                "AdamW::fused_expert_update: experts [", expert_begin, ", ", expert_end, ") of ",
                names_[index], " ", whole.param.shape.str());
  const auto experts = [&](const Tensor& tensor) {
    return tensor.defined() && tensor.data ? tensor.slice_rows(expert_begin, expert_end) : tensor;
  };
  AdamWParam slice = whole;
  slice.param = experts(whole.param);
  slice.exp_avg = experts(whole.exp_avg);
  slice.exp_avg_sq = experts(whole.exp_avg_sq);
  slice.master = experts(whole.master);
  // The gradient is never stored: only its dtype and shape are given (no data).
  const Tensor& grad = parameters_[index].grad;
  slice.grad = Tensor(nullptr, grad.dtype, slice.param.shape, grad.device);
  backend_.grouped_gemm_weight_grad_adamw(dy, x, offsets, slice, hyper(lr), norm_squared);
}

std::vector<AdamW::StateTensor> AdamW::state_tensors() const {
  std::vector<StateTensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.push_back({"exp_avg." + names_[i], params_[i].exp_avg});
    out.push_back({"exp_avg_sq." + names_[i], params_[i].exp_avg_sq});
    if (params_[i].master.defined() && params_[i].master.data)
      out.push_back({"master." + names_[i], params_[i].master});
  }
  return out;
}

}  // namespace moetune
