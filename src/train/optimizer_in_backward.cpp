// The optimizer in the backward (see optimizer_in_backward.h for the overlap rules).
#include "train/optimizer_in_backward.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace moetune {

InBackwardOptimizer::InBackwardOptimizer(Model& model, AdamW& optimizer,
                                         const InBackwardOptions& options)
    : InBackwardOptimizer(model, &optimizer, nullptr, options) {}

InBackwardOptimizer::InBackwardOptimizer(Model& model, DataParallelAdamW& optimizer,
                                         const InBackwardOptions& options)
    : InBackwardOptimizer(model, nullptr, &optimizer, options) {}

InBackwardOptimizer::InBackwardOptimizer(Model& model, AdamW* single, DataParallelAdamW* sharded,
                                         const InBackwardOptions& options)
    : model_(model), single_(single), sharded_(sharded), options_(options) {
  Backend& backend = model.backend();
  const auto groups = static_cast<int64_t>(model.gradient_groups().size());
  group_norms_squared_ = Buffer(DType::F32, {groups}, backend.device());
  if (options.overlap)
    side_ = backend.make_side_stream(
        sharded ? Backend::SideStreamPriority::Same : Backend::SideStreamPriority::Low,
        sharded ? 0 : options.optimizer_sms);
  model.set_gradient_side_stream(side_.get());
  model.set_gradient_ready_hook([this](size_t index) { on_group_ready(index); });
  const std::vector<size_t>& experts = model.expert_weight_parameters();
  if (single && options.fuse_expert_updates && !experts.empty()) {
    fused_slot_.assign(model.parameters().size(), -1);
    for (size_t i = 0; i < experts.size(); ++i) {
      fused_slot_[experts[i]] = static_cast<int64_t>(i);
      single->set_fused(experts[i], true);
    }
    if (options.grad_norm) {
      expert_norms_squared_ =
          Buffer(DType::F32, {static_cast<int64_t>(experts.size()), model.local_experts()},
                 backend.device());
    }
    model.set_expert_weight_update([this](size_t parameter, int64_t expert_begin,
                                          int64_t expert_end, const Tensor& dy, const Tensor& x,
                                          const Tensor& offsets) {
      update_experts(parameter, expert_begin, expert_end, dy, x, offsets);
    });
  }
}

InBackwardOptimizer::~InBackwardOptimizer() {
  model_.set_gradient_ready_hook({});
  if (fuses_expert_updates()) {
    model_.set_expert_weight_update({});
    for (size_t parameter : model_.expert_weight_parameters()) single_->set_fused(parameter, false);
  }
  model_.set_gradient_side_stream(nullptr);  // joins and synchronises first
}

void InBackwardOptimizer::begin_step(double lr) {
  if (sharded_)
    sharded_->begin_step();
  else
    single_->begin_step();
  lr_ = lr;
  // Each chunk overwrites the slot of its first expert; the others must read zero (the
  // chunks may differ from step to step).
  if (expert_norms_squared_.data()) model_.backend().fill(expert_norms_squared_, 0.0f);
}

void InBackwardOptimizer::update_experts(size_t parameter, int64_t expert_begin, int64_t expert_end,
                                         const Tensor& dy, const Tensor& x, const Tensor& offsets) {
  // Inline on the ops' stream: this is part of the backward (see the overlap rules).
  if (expert_begin == expert_end) return;  // a chunk of no experts: nothing to step
  Tensor norm_squared;
  if (expert_norms_squared_.data()) {
    const int64_t slots = expert_norms_squared_.numel();
    const int64_t slot = fused_slot_[parameter] * model_.local_experts() + expert_begin;
    norm_squared =
        expert_norms_squared_.tensor().view({slots, 1}).slice_rows(slot, slot + 1).view({1});
  }
  single_->fused_expert_update(parameter, expert_begin, expert_end, dy, x, offsets, lr_,
                               norm_squared);
}

void InBackwardOptimizer::on_group_ready(size_t index) {
  const GradientGroup& group = model_.gradient_groups()[index];
  Backend& backend = model_.backend();
  SideStreamOps on_side(side_.get());  // null: inline on the ops' stream
  const auto row = static_cast<int64_t>(index);
  const auto groups = static_cast<int64_t>(model_.gradient_groups().size());
  const Tensor norm_squared =
      options_.grad_norm
          ? group_norms_squared_.tensor().view({groups, 1}).slice_rows(row, row + 1).view({1})
          : Tensor();
  if (sharded_) {
    sharded_->update_group(index, lr_, side_ ? side_->handle() : backend.stream(), norm_squared);
    return;
  }
  if (options_.grad_norm) {
    std::vector<Tensor> grads;  // without the fused expert weights (normed in their update)
    for (size_t i = group.begin; i < group.end; ++i)
      if (!single_->fused(i)) grads.push_back(model_.parameters()[i].grad);
    backend.grad_norm_squared(grads, norm_squared);
  }
  single_->update(group.begin, group.end, lr_);  // skips the fused expert weights
}

double InBackwardOptimizer::grad_norm() {
  MOETUNE_CHECK(options_.grad_norm, "InBackwardOptimizer::grad_norm: norms are off");
  Backend& backend = model_.backend();
  if (side_) side_->join();  // forward_backward has joined already; cheap insurance
  if (sharded_)              // each rank's groups hold the norms of its shards: sum over the world
    sharded_->world().all_reduce_sum(group_norms_squared_, group_norms_squared_, backend.stream());
  const size_t groups = model_.gradient_groups().size();
  std::vector<float> norms(groups);
  backend.copy(Tensor(norms.data(), DType::F32, {static_cast<int64_t>(groups)}),
               group_norms_squared_);
  std::vector<float> expert_norms(
      expert_norms_squared_.data() ? static_cast<size_t>(expert_norms_squared_.numel()) : 0);
  if (!expert_norms.empty())
    backend.copy(Tensor(expert_norms.data(), DType::F32, {expert_norms_squared_.numel()}),
                 expert_norms_squared_);
  backend.synchronize();
  double sum = 0;  // in a fixed order: deterministic
  for (float norm : norms) sum += norm;
  for (float norm : expert_norms) sum += norm;
  return std::sqrt(sum);
}

}  // namespace moetune
