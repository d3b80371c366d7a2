// Expert-parallel token dispatch: the experts of a MoE layer are split over the `ep` ranks
// of an expert-parallel group (rank r holds experts [r*E/ep, (r+1)*E/ep)). Each token travels
// once to each rank that holds at least one of its k experts (not once per expert: with
// top-8 of 128 experts on 4 ranks, 3.6 ranks per token instead of 8 rows), and each rank
// sends back one partial result per token.
//
// Forward, per MoE layer (device work through the backend, transfers through the
// Communicator):
//   1. this rank's N*k slots sorted by global expert (moe_sort_by_expert: the counts), and
//      its (token, rank) pairs sorted by destination rank (moe_rank_ids, then the same sort
//      with ep + 1 buckets, the last one "no expert there");
//   2. every rank's expert offsets and rank offsets by one all_gather on the device, then
//      one device->host copy (the layer's only host synchronisation: NCCL needs the per-peer
//      row counts on the host);
//   3. each (token, rank) pair's row of x, its k expert ids and k router weights go to the
//      rank (all_to_all_v_blocks, one communicator group); each rank receives its tokens
//      grouped by source rank;
//   4. the receiver turns the ids into local ones (moe_local_ids: the others into a "none"
//      bucket) and sorts the received (token, choice) slots by local expert: the first M
//      are its expert rows, gathered into the grouped GEMMs' input (and their weights);
//   5. after the experts, moe_combine sums each received token's weighted expert outputs (the
//      slots sorted past M add nothing), the partial sums go home, and home adds the ranks'
//      partial sums per token (moe_gather_backward over the rank-sorted pairs, rank order).
// Backward mirrors it: each token's output gradient (unweighted: the router weights apply at
// the experts, moe.h) once to each of its ranks and from there to its expert rows; the
// experts' input gradients and router weight gradients are summed per received token and
// sent home on a side stream while the weight gradients compute; home sums them per token.
// The backward reuses the forward's plan: no exchange of counts, no host synchronisation. (A
// recomputed layer, ModelOptions::recompute_layers, dispatches again: one more
// synchronisation per MoE layer in that mode.) M and the token counts vary per step and layer:
// the buffers keep their capacity (ensure_capacity), never sized for the worst case.
// Numerics: a token's output is the sum over ranks of each rank's sum over its experts (fp32
// accumulation, rounded to the activation dtype once per rank); with one rank it is the
// local dispatcher's sum, bit for bit.
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
