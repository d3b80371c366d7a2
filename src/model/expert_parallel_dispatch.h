// Expert-parallel token dispatch: the experts of a MoE layer are split over the `ep` ranks
// of an expert-parallel group (rank r holds experts [r*E/ep, (r+1)*E/ep)); each rank routes
// its own tokens and sends every (token, choice) row to the rank holding its expert.
//
// Forward, per MoE layer (all device work through the backend, all transfers through the
// Communicator):
//   1. counting sort of this rank's N*k slots by global expert, gather x into that order
//      (N*k, H): rows for rank p are one contiguous block, because p's experts are;
//   2. the expert offsets (E + 1) of every rank of the group, by one all_gather on the
//      device, then one device->host copy of them (the layer's only host synchronisation:
//      the host must know the per-peer row counts to size the exchanges);
//   3. the local experts are cut into C chunks (2 by default): chunk c's rows and their
//      router weights go to the ranks of its experts by an all-to-all of row blocks
//      (all_to_all_v_blocks, both in one communicator group); each rank receives M_c rows,
//      grouped by source rank, each source's block sorted by expert;
//   4. a permutation (a gather) regroups a chunk's rows by local expert (expert-major,
//      source-minor) -> its part of the (M, H) input of the grouped GEMMs; chunk c's rows
//      follow chunk c-1's, so the whole is expert-major over the E_local experts. The
//      permutations, their inverses and the chunks' expert offsets are built on the device
//      from the gathered offsets (Backend::moe_regroup_by_expert): nothing is uploaded;
//   5. after a chunk's experts, the inverse permutation and the reverse exchange bring its
//      outputs back into this rank's expert-sorted order; once every chunk is home the
//      weighted combine runs locally as without expert parallelism.
// Pipelining (backends with side streams, CUDA): the exchanges run on a side stream, so
// chunk c+1's rows travel while chunk c's experts compute, and chunk c's outputs travel
// back while chunk c+1's compute (fences: the ops wait for chunk 0 at once, for chunk
// c+1 when chunk c is done; the side stream waits for the ops before each exchange).
// Backward mirrors it chunk by chunk: each row's token's output gradient (unweighted: the
// router weights apply at the experts, moe.h) to the experts, per chunk the experts' input
// gradients and router weight gradients, the reverse exchange of both (started before the
// chunk's weight gradients, which compute meanwhile), and after every chunk the gather's
// backward and the weight gradients' scatter to slot order. Results equal C = 1 bit for bit (each
// expert's rows and GEMMs are the same; only the order of independent work changes). M varies per
// step and layer: the (M, ...) buffers are sized per call (Buffer; cheap with the CUDA caching
// allocator), never for the worst case ep*N*k. The backward reuses the forward's plan (row blocks
// on the host, permutations on the device): no exchange of counts and no host synchronisation. (A
// recomputed layer, ModelOptions::recompute_layers, dispatches again: one more synchronisation per
// MoE layer in that mode.)
#pragma once

#include <memory>

#include "dist/communicator.h"
#include "model/moe.h"

namespace moetune {

// `expert_comm` (size ep, ep divides num_experts) must outlive the dispatcher; every rank
// of it must run the same layers in the same order (forward, recompute and backward).
// `chunks` (clamped to [1, E_local]): how many parts of this rank's experts the exchange
// and the expert work are split into (see the file comment).
std::unique_ptr<TokenDispatcher> make_expert_parallel_dispatcher(Backend& backend,
                                                                 dist::Communicator& expert_comm,
                                                                 const ModelConfig& config,
                                                                 int chunks = 2);

}  // namespace moetune
