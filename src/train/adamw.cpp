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
}

void AdamW::step(double lr, float grad_scale) {
  begin_step();
  update(0, params_.size(), lr, grad_scale);
}

void AdamW::begin_step() { ++step_count_; }

void AdamW::update(size_t begin, size_t end, double lr, float grad_scale) {
  MOETUNE_CHECK(begin <= end && end <= params_.size(), "AdamW::update: bad parameter range");
  for (size_t i = begin; i < end; ++i) params_[i].grad = parameters_[i].grad;
  AdamWHyper hyper;
  hyper.lr = lr;
  hyper.beta1 = config_.beta1;
  hyper.beta2 = config_.beta2;
  hyper.eps = config_.eps;
  hyper.step = step_count_;
  backend_.adamw_update(std::span<const AdamWParam>(params_).subspan(begin, end - begin), hyper,
                        grad_scale);
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
