// A whole MoE expert block chained from the CPU ops the way model code uses them, with
// the fused HF layouts gate_up (E, 2I, H) and down (E, H, I):
//   route -> sort -> gather -> grouped_gemm(gate_up^T) -> SwiGLU -> grouped_gemm(down^T)
//   -> weighted combine,
// and its backward chained from the backward ops as moe.cpp chains them (router weights
// applied at the experts: gather of the unweighted output gradient, moe_swiglu_backward,
// the weights' gradients scattered back to slot order), checked against central differences
// for x, the router logits and both expert weights (top-2 of 5 experts, 7 tokens, so some
// experts get few or no rows).
#include <algorithm>
#include <numeric>
#include <random>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

struct MoeBlock {
  int64_t tokens = 7, hidden = 4, inter = 3, experts = 5;
  int top_k = 2;
  bool normalize = true;
  HostF32 x, router_logits, gate_up, down;
  // forward intermediates
  HostF32 probs, topk_weights, gathered, gate_up_out, activated, expert_out, out;
  HostI32 topk_ids, offsets, sorted_slots, slot_rows;

  MoeBlock() {
    x = HostF32::random({tokens, hidden}, 91);
    gate_up = HostF32::random({experts, 2 * inter, hidden}, 92);
    down = HostF32::random({experts, hidden, inter}, 93);
    // router logits with well separated values (no top-k flips under perturbation)
    router_logits = HostF32({tokens, experts});
    std::mt19937 rng(94);
    std::vector<int> ladder(experts);
    for (int64_t n = 0; n < tokens; ++n) {
      std::iota(ladder.begin(), ladder.end(), 0);
      std::shuffle(ladder.begin(), ladder.end(), rng);
      for (int64_t e = 0; e < experts; ++e)
        router_logits[n * experts + e] = 0.6f * ladder[e] + 0.01f * static_cast<float>(n);
    }
    const int64_t rows = tokens * top_k;
    probs = HostF32({tokens, experts});
    topk_weights = HostF32({tokens, top_k});
    topk_ids = HostI32({tokens, top_k});
    offsets = HostI32({experts + 1});
    sorted_slots = HostI32({rows});
    slot_rows = HostI32({rows});
    gathered = HostF32({rows, hidden});
    gate_up_out = HostF32({rows, 2 * inter});
    activated = HostF32({rows, inter});
    expert_out = HostF32({rows, hidden});
    out = HostF32({tokens, hidden});
  }

  void forward(Backend& backend) {
    backend.router_forward(router_logits.tensor(), top_k, normalize, probs.tensor(),
                           topk_ids.tensor(), topk_weights.tensor());
    backend.moe_sort_by_expert(topk_ids.tensor(), static_cast<int>(experts), offsets.tensor(),
                               sorted_slots.tensor(), slot_rows.tensor());
    backend.moe_gather(x.tensor(), sorted_slots.tensor(), top_k, gathered.tensor());
    backend.grouped_gemm(gathered.tensor(), gate_up.tensor(), true, offsets.tensor(),
                         gate_up_out.tensor());
    backend.swiglu_forward(gate_up_out.tensor(), activated.tensor());
    backend.grouped_gemm(activated.tensor(), down.tensor(), true, offsets.tensor(),
                         expert_out.tensor());
    backend.moe_combine(expert_out.tensor(), topk_weights.tensor(), slot_rows.tensor(),
                        out.tensor());
  }
};

TEST(OpsMoeLayer, ChainedBackwardMatchesFiniteDifferences) {
  auto backend = make_cpu_backend();
  MoeBlock block;
  HostF32 dout = HostF32::random({block.tokens, block.hidden}, 95);
  auto loss = [&] {
    block.forward(*backend);
    return weighted_sum(block.out.values, dout.values);
  };
  loss();
  const int64_t rows = block.tokens * block.top_k;
  // each row's token's output gradient, unweighted, and the row's router weight
  HostF32 dexpert_out({rows, block.hidden}), row_weights({rows, 1});
  backend->moe_gather(dout.tensor(), block.sorted_slots.tensor(), block.top_k,
                      dexpert_out.tensor());
  backend->moe_gather(block.topk_weights.tensor().view(Shape{rows, 1}), block.sorted_slots.tensor(),
                      1, row_weights.tensor());
  HostF32 dactivated({rows, block.inter}), ddown({block.experts, block.hidden, block.inter});
  backend->grouped_gemm(dexpert_out.tensor(), block.down.tensor(), false, block.offsets.tensor(),
                        dactivated.tensor());
  HostF32 dgate_up_out({rows, 2 * block.inter}), weighted_hidden({rows, block.inter});
  HostF32 drow_weights({rows, 1});
  backend->moe_swiglu_backward(dactivated.tensor(), block.gate_up_out.tensor(),
                               row_weights.tensor(), dgate_up_out.tensor(),
                               weighted_hidden.tensor(), drow_weights.tensor());
  backend->grouped_gemm_weight_grad(dexpert_out.tensor(), weighted_hidden.tensor(),
                                    block.offsets.tensor(), ddown.tensor());
  HostF32 dtopk_weights({block.tokens, block.top_k}, 0.0f);
  backend->moe_gather_backward(drow_weights.tensor(), block.sorted_slots.tensor(), 1,
                               dtopk_weights.tensor().view(Shape{rows, 1}));
  HostF32 dgathered({rows, block.hidden}), dgate_up({block.experts, 2 * block.inter, block.hidden});
  backend->grouped_gemm(dgate_up_out.tensor(), block.gate_up.tensor(), false,
                        block.offsets.tensor(), dgathered.tensor());
  backend->grouped_gemm_weight_grad(dgate_up_out.tensor(), block.gathered.tensor(),
                                    block.offsets.tensor(), dgate_up.tensor());
  HostF32 dx({block.tokens, block.hidden});
  backend->moe_gather_backward(dgathered.tensor(), block.sorted_slots.tensor(), block.top_k,
                               dx.tensor());
  HostF32 drouter_logits({block.tokens, block.experts});
  backend->router_backward(dtopk_weights.tensor(), block.probs.tensor(), block.topk_ids.tensor(),
                           block.normalize, Tensor(), drouter_logits.tensor());

  expect_gradient("moe block dx", block.x.values, dx.values, loss);
  expect_gradient("moe block drouter_logits", block.router_logits.values, drouter_logits.values,
                  loss);
  expect_gradient("moe block dgate_up", block.gate_up.values, dgate_up.values, loss);
  expect_gradient("moe block ddown", block.down.values, ddown.values, loss);
}

}  // namespace
}  // namespace moetune::testing
