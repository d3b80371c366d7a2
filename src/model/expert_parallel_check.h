// A self-check of expert parallelism that any set of ranks can run (the tests on the CPU,
// `moetune dist-selftest --expert-parallel N` on GPUs): each rank of the expert-parallel
// group runs ITS OWN micro-batch through a model whose experts are split over the group,
// and, locally, a one-rank reference model (same weights) that runs every rank's
// micro-batch with gradient accumulation. Expert parallelism is right when
//   - the losses summed over the ranks equal the reference's summed loss,
//   - each rank's aux loss equals the reference's for that micro-batch,
//   - each rank's expert gradients equal the reference's for those experts (the experts
//     saw every rank's tokens),
//   - the other gradients summed over the ranks equal the reference's.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "model/model.h"

namespace moetune {

struct ExpertParallelCheck {
  double loss_error = 0;             // relative, summed loss
  double aux_error = 0;              // relative, this rank's micro-batch
  double expert_grad_error = 0;      // max over this rank's expert tensors (relative per tensor)
  double other_grad_error = 0;       // max over the other tensors (summed over ranks)
  std::string worst_tensor;          // the tensor with the largest error
  double local_expert_grad_sum = 0;  // sum of |grad| over this rank's experts
  double max_error() const;
};

// make_model(options) builds the same weights for every call (options differ only in
// expert_comm). Micro-batch r (B x T tokens, labels with some -100) comes from data_seed + r.
ExpertParallelCheck check_expert_parallel(
    Backend& backend, dist::Communicator& expert_comm,
    const std::function<std::unique_ptr<Model>(const ModelOptions&)>& make_model, int64_t batch,
    int64_t seq, uint64_t data_seed, ModelOptions options = {});

}  // namespace moetune
