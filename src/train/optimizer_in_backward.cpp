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
    side_ = backend.make_side_stream(sharded ? Backend::SideStreamPriority::Same
                                             : Backend::SideStreamPriority::Low);
  model.set_gradient_side_stream(side_.get());
  model.set_gradient_ready_hook([this](size_t index) { on_group_ready(index); });
}

InBackwardOptimizer::~InBackwardOptimizer() {
  model_.set_gradient_ready_hook({});
  model_.set_gradient_side_stream(nullptr);  // joins and synchronises first
}

void InBackwardOptimizer::begin_step(double lr) {
  if (sharded_)
    sharded_->begin_step();
  else
    single_->begin_step();
  lr_ = lr;
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
    std::vector<Tensor> grads;
    for (size_t i = group.begin; i < group.end; ++i) grads.push_back(model_.parameters()[i].grad);
    backend.grad_norm_squared(grads, norm_squared);
  }
  single_->update(group.begin, group.end, lr_);
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
  backend.synchronize();
  double sum = 0;
  for (float norm : norms) sum += norm;
  return std::sqrt(sum);
}

}  // namespace moetune
