// Expert-parallel token dispatch: the experts of a MoE layer are split over the `ep` ranks
// of an expert-parallel group (rank r holds experts [r*E/ep, (r+1)*E/ep)); each rank routes
// its own tokens and sends every (token, choice) row to the rank holding its expert.
//
// Forward, per MoE layer (all device work through the backend, all transfers through the
// Communicator on the backend's stream):
//   1. counting sort of this rank's N*k slots by global expert, gather x into that order
//      (N*k, H): rows for rank p are one contiguous block, because p's experts are;
//   2. per-(peer, local expert) row counts to the host, exchanged with a fixed-size
//      all_to_all_v (ep x E_local counts): each rank learns how many rows it receives from
//      each peer for each of its experts;
//   3. all_to_all_v of the rows: M received rows, grouped by source rank, each source's
//      block sorted by expert;
//   4. a second permutation (a gather) regroups them by local expert (expert-major,
//      source-minor) -> the (M, H) input of the grouped GEMMs over E_local experts;
//   5. after the experts, the inverse permutation, the reverse all_to_all_v (counts
//      swapped) brings the outputs back in this rank's expert-sorted order, and the
//      weighted combine runs locally as without expert parallelism.
// Backward mirrors it: the combine's backward, the forward-direction exchange of the row
// gradients to the experts, the expert backward (weight gradients for local experts only),
// and the reverse exchange of the input gradients, then the gather's backward.
// M varies per step and layer: the (M, ...) buffers are sized per call (Buffer; cheap
// with the CUDA caching allocator), never for the worst case ep*N*k. The regroup
// permutation and the local expert offsets are computed on the host from the exchanged
// counts (one small host read and one small upload per layer and direction-pair).
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
