// Expert-parallel token dispatch: the experts of a MoE layer are split over the `ep` ranks
// of an expert-parallel group (rank r holds experts [r*E/ep, (r+1)*E/ep)); each rank routes
// its own tokens and sends every (token, choice) row to the rank holding its expert.
//
// Forward, per MoE layer (all device work through the backend, all transfers through the
// Communicator on the backend's stream):
//   1. counting sort of this rank's N*k slots by global expert, gather x into that order
//      (N*k, H): rows for rank p are one contiguous block, because p's experts are;
//   2. the expert offsets (E + 1) of every rank of the group, by one all_gather on the
//      device, then one device->host copy of them (the layer's only host synchronisation:
//      the host must know the per-peer row counts to size the all_to_all_v);
//   3. all_to_all_v of the rows: M received rows, grouped by source rank, each source's
//      block sorted by expert;
//   4. a second permutation (a gather) regroups them by local expert (expert-major,
//      source-minor) -> the (M, H) input of the grouped GEMMs over E_local experts; the
//      permutation, its inverse and the local expert offsets are built on the device from
//      the gathered offsets (Backend::moe_regroup_by_expert): nothing is uploaded;
//   5. after the experts, the inverse permutation, the reverse all_to_all_v (counts
//      swapped) brings the outputs back in this rank's expert-sorted order, and the
//      weighted combine runs locally as without expert parallelism.
// Backward mirrors it: the combine's backward, the forward-direction exchange of the row
// gradients to the experts, the expert backward (weight gradients for local experts only),
// and the reverse exchange of the input gradients, then the gather's backward. That reverse
// exchange starts as soon as the input gradients are ready (start_dispatch_backward) and,
// when the backend has side streams (CUDA), runs on one while the experts' weight
// gradients compute; dispatch_backward joins it.
// M varies per step and layer: the (M, ...) buffers are sized per call (Buffer; cheap
// with the CUDA caching allocator), never for the worst case ep*N*k. The backward reuses
// the forward's plan (counts on the host, permutations on the device): no exchange of
// counts and no host synchronisation. (A recomputed layer, ModelOptions::recompute_layers,
// dispatches again: one more synchronisation per MoE layer in that mode.)
#pragma once

#include <memory>

#include "dist/communicator.h"
#include "model/moe.h"

namespace moetune {

// `expert_comm` (size ep, ep divides num_experts) must outlive the dispatcher; every rank
// of it must run the same layers in the same order (forward, recompute and backward).
std::unique_ptr<TokenDispatcher> make_expert_parallel_dispatcher(Backend& backend,
                                                                 dist::Communicator& expert_comm,
                                                                 const ModelConfig& config);

}  // namespace moetune
