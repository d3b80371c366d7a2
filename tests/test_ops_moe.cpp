// CPU MoE ops: router softmax/top-k (torch.topk tie order, renormalisation) and its
// backward (with the aux-loss term) against central differences, aux statistics, the
// stable counting sort against std::stable_sort, gather/combine gradients, and grouped
// GEMMs (both weight layouts, experts with zero rows) against naive loops and central
// differences.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

// Router logits without near-ties: each row is a shuffled ladder of values 0.7 apart plus
// small noise, so a 1e-3 perturbation never changes the top-k selection.
HostF32 separated_logits(int64_t tokens, int64_t experts, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> noise(-0.05f, 0.05f);
  HostF32 logits({tokens, experts});
  std::vector<int> ladder(experts);
  for (int64_t n = 0; n < tokens; ++n) {
    std::iota(ladder.begin(), ladder.end(), 0);
    std::shuffle(ladder.begin(), ladder.end(), rng);
    for (int64_t e = 0; e < experts; ++e)
      logits[n * experts + e] = 0.7f * ladder[e] - 2.0f + noise(rng);
  }
  return logits;
}

TEST(OpsRouter, ForwardSoftmaxTopkAndTies) {
  auto backend = make_cpu_backend();
  const int64_t tokens = 2, experts = 5;
  const int top_k = 3;
  HostF32 logits({tokens, experts}, {1.0f, 3.0f, 3.0f, 0.0f, 3.0f,  //
                                     -1.0f, 2.0f, 0.5f, 4.0f, 2.5f});
  for (bool normalize : {false, true}) {
    HostF32 probs({tokens, experts}), weights({tokens, top_k});
    HostI32 ids({tokens, top_k});
    backend->router_forward(logits.tensor(), top_k, normalize, probs.tensor(), ids.tensor(),
                            weights.tensor());
    for (int64_t n = 0; n < tokens; ++n) {
      double sum = 0.0;
      for (int64_t e = 0; e < experts; ++e) sum += std::exp(logits[n * experts + e]);
      for (int64_t e = 0; e < experts; ++e)
        EXPECT_NEAR(probs[n * experts + e], std::exp(logits[n * experts + e]) / sum, 1e-6);
    }
    EXPECT_EQ(ids.values, (std::vector<int32_t>{1, 2, 4, 3, 4, 1}));  // ties: lower index first
    for (int64_t n = 0; n < tokens; ++n) {
      double selected = 0.0;
      for (int j = 0; j < top_k; ++j) selected += probs[n * experts + ids[n * top_k + j]];
      for (int j = 0; j < top_k; ++j) {
        const double p = probs[n * experts + ids[n * top_k + j]];
        EXPECT_NEAR(weights[n * top_k + j], normalize ? p / selected : p, 1e-6);
      }
    }
  }
}

TEST(OpsRouter, BackwardMatchesFiniteDifferences) {
  auto backend = make_cpu_backend();
  const int64_t tokens = 4, experts = 6;
  const int top_k = 2;
  for (bool normalize : {false, true}) {
    for (bool with_aux : {false, true}) {
      HostF32 logits = separated_logits(tokens, experts, 41);
      HostF32 probs({tokens, experts}), weights({tokens, top_k});
      HostI32 ids({tokens, top_k});
      HostF32 dweights = HostF32::random({tokens, top_k}, 42);
      HostF32 aux = HostF32::random({experts}, 43);
      auto loss = [&] {
        backend->router_forward(logits.tensor(), top_k, normalize, probs.tensor(), ids.tensor(),
                                weights.tensor());
        double value = weighted_sum(weights.values, dweights.values);
        if (with_aux)
          for (int64_t n = 0; n < tokens; ++n)
            for (int64_t e = 0; e < experts; ++e) value += aux[e] * probs[n * experts + e];
        return value;
      };
      loss();
      HostF32 dlogits({tokens, experts});
      backend->router_backward(dweights.tensor(), probs.tensor(), ids.tensor(), normalize,
                               with_aux ? aux.tensor() : Tensor(), dlogits.tensor());
      SCOPED_TRACE(::testing::Message() << "normalize " << normalize << " aux " << with_aux);
      expect_gradient("router dlogits", logits.values, dlogits.values, loss);
    }
  }
}

TEST(OpsRouter, AuxStatsAccumulate) {
  auto backend = make_cpu_backend();
  HostF32 probs = HostF32::random({3, 4}, 44);
  HostI32 ids({3, 2}, {0, 3, 3, 1, 0, 3});
  HostF32 counts({4}, 1.0f), sums({4}, 0.5f);
  backend->router_aux_stats(probs.tensor(), ids.tensor(), counts.tensor(), sums.tensor());
  EXPECT_EQ(counts.values, (std::vector<float>{3.0f, 2.0f, 1.0f, 4.0f}));
  for (int e = 0; e < 4; ++e)
    EXPECT_NEAR(sums[e], 0.5f + probs[e] + probs[4 + e] + probs[8 + e], 1e-6);
  HostI32 bad({3, 2}, {0, 4, 3, 1, 0, 3});
  EXPECT_THROW(
      backend->router_aux_stats(probs.tensor(), bad.tensor(), counts.tensor(), sums.tensor()),
      Error);
}

// Sort of `ids` (N, k) over `experts`, checked against std::stable_sort.
struct SortResult {
  HostI32 offsets, sorted_slots, slot_rows;
};

SortResult sort_by_expert(Backend& backend, HostI32& ids, int experts) {
  const int64_t slots = static_cast<int64_t>(ids.size());
  SortResult result{HostI32({experts + 1}), HostI32({slots}), HostI32({slots})};
  backend.moe_sort_by_expert(ids.tensor(), experts, result.offsets.tensor(),
                             result.sorted_slots.tensor(), result.slot_rows.tensor());
  return result;
}

TEST(OpsMoeSort, StableCountingSortWithEmptyExperts) {
  auto backend = make_cpu_backend();
  const int experts = 6;
  HostI32 ids({5, 2}, {4, 0, 0, 3, 5, 4, 3, 0, 0, 5});  // experts 1 and 2 get nothing
  SortResult sorted = sort_by_expert(*backend, ids, experts);
  std::vector<int32_t> expected(ids.size());
  std::iota(expected.begin(), expected.end(), 0);
  std::stable_sort(expected.begin(), expected.end(),
                   [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  EXPECT_EQ(sorted.sorted_slots.values, expected);
  EXPECT_EQ(sorted.offsets.values, (std::vector<int32_t>{0, 4, 4, 4, 6, 8, 10}));
  for (size_t row = 0; row < expected.size(); ++row)
    EXPECT_EQ(sorted.slot_rows[sorted.sorted_slots[row]], static_cast<int32_t>(row));
  HostI32 bad({1, 1}, {6});
  EXPECT_THROW(sort_by_expert(*backend, bad, experts), Error);
}

TEST(OpsMoe, GatherAndCombineGradients) {
  auto backend = make_cpu_backend();
  const int64_t tokens = 4, width = 3;
  const int top_k = 2, experts = 3;
  HostI32 ids({tokens, top_k}, {2, 0, 0, 2, 1, 2, 2, 0});
  SortResult sorted = sort_by_expert(*backend, ids, experts);

  HostF32 x = HostF32::random({tokens, width}, 45);
  HostF32 gathered({tokens * top_k, width});
  backend->moe_gather(x.tensor(), sorted.sorted_slots.tensor(), top_k, gathered.tensor());
  for (int64_t r = 0; r < tokens * top_k; ++r)
    for (int64_t d = 0; d < width; ++d)
      EXPECT_EQ(gathered[r * width + d], x[(sorted.sorted_slots[r] / top_k) * width + d]);
  HostF32 gather_weights = HostF32::random({tokens * top_k, width}, 46);
  HostF32 dx({tokens, width}, 0.0f);
  backend->moe_gather_backward(gather_weights.tensor(), sorted.sorted_slots.tensor(), top_k,
                               dx.tensor());
  expect_gradient("moe_gather dx", x.values, dx.values, [&] {
    backend->moe_gather(x.tensor(), sorted.sorted_slots.tensor(), top_k, gathered.tensor());
    return weighted_sum(gathered.values, gather_weights.values);
  });

  HostF32 y = HostF32::random({tokens * top_k, width}, 47);
  HostF32 weights = HostF32::random({tokens, top_k}, 48);
  HostF32 out({tokens, width});
  backend->moe_combine(y.tensor(), weights.tensor(), sorted.slot_rows.tensor(), out.tensor());
  for (int64_t n = 0; n < tokens; ++n)
    for (int64_t d = 0; d < width; ++d) {
      double expected = 0.0;
      for (int j = 0; j < top_k; ++j)
        expected += weights[n * top_k + j] * y[sorted.slot_rows[n * top_k + j] * width + d];
      EXPECT_NEAR(out[n * width + d], expected, 1e-6);
    }
  // (the combine's backward is checked through the whole block in test_ops_moe_layer.cpp)
}

// moe_swiglu_backward is the gradient of f(gate_up, w) = sum_r w[r] <dh[r], silu(gate) * up>
// (the down projection folded into dh), and weighted_hidden = w * swiglu(gate_up).
TEST(OpsMoe, SwigluBackwardWithRowWeightsMatchesFiniteDifferences) {
  auto backend = make_cpu_backend();
  for (const auto& [rows, width] : {std::pair<int64_t, int64_t>{5, 3}, {1, 1}, {4, 8}}) {
    SCOPED_TRACE(::testing::Message() << rows << " rows of width " << width);
    HostF32 gate_up = HostF32::random({rows, 2 * width}, 61);
    HostF32 row_weights = HostF32::random({rows, 1}, 62);
    HostF32 dh = HostF32::random({rows, width}, 63);
    HostF32 hidden({rows, width});
    auto f = [&] {
      backend->swiglu_forward(gate_up.tensor(), hidden.tensor());
      double sum = 0.0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < width; ++j)
          sum += static_cast<double>(row_weights[r]) * dh[r * width + j] * hidden[r * width + j];
      return sum;
    };
    HostF32 dgate_up({rows, 2 * width}), weighted_hidden({rows, width}), drow_weights({rows, 1});
    backend->moe_swiglu_backward(dh.tensor(), gate_up.tensor(), row_weights.tensor(),
                                 dgate_up.tensor(), weighted_hidden.tensor(),
                                 drow_weights.tensor());
    expect_gradient("moe_swiglu_backward dgate_up", gate_up.values, dgate_up.values, f);
    expect_gradient("moe_swiglu_backward drow_weights", row_weights.values, drow_weights.values, f);
    f();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < width; ++j)
        EXPECT_NEAR(weighted_hidden[r * width + j], row_weights[r] * hidden[r * width + j], 1e-6);
  }
  HostF32 gate_up({2, 6}), bad({2, 4}), weights({2, 1}), dweights({2, 1}), hidden({2, 3});
  EXPECT_THROW(backend->moe_swiglu_backward(bad.tensor(), gate_up.tensor(), weights.tensor(),
                                            gate_up.tensor(), hidden.tensor(), dweights.tensor()),
               Error);
  EXPECT_THROW(backend->moe_swiglu_backward(hidden.tensor(), gate_up.tensor(), bad.tensor(),
                                            gate_up.tensor(), hidden.tensor(), dweights.tensor()),
               Error);
}

// c[R_e] = a[R_e] @ op(w[e]) in double.
std::vector<float> naive_grouped_gemm(const HostF32& a, const HostF32& w, bool transpose_w,
                                      const std::vector<int32_t>& offsets) {
  const int64_t p = w.shape[1], q = w.shape[2];
  const int64_t in = transpose_w ? q : p, out = transpose_w ? p : q;
  std::vector<float> c(a.shape[0] * out, 0.0f);
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
      for (int64_t j = 0; j < out; ++j) {
        double sum = 0.0;
        for (int64_t i = 0; i < in; ++i) {
          const float w_ij = transpose_w ? w[(e * p + j) * q + i] : w[(e * p + i) * q + j];
          sum += static_cast<double>(a[r * in + i]) * w_ij;
        }
        c[r * out + j] = static_cast<float>(sum);
      }
  return c;
}

TEST(OpsGroupedGemm, ForwardAndGradientsWithEmptyExperts) {
  auto backend = make_cpu_backend();
  const int64_t experts = 4, p = 3, q = 5, rows = 6;
  HostI32 offsets({experts + 1}, {0, 0, 4, 4, 6});  // experts 0 and 2 have zero rows
  HostF32 w = HostF32::random({experts, p, q}, 51);
  for (bool transpose_w : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "transpose_w " << transpose_w);
    const int64_t in = transpose_w ? q : p, out = transpose_w ? p : q;
    HostF32 a = HostF32::random({rows, in}, 52);
    HostF32 c({rows, out}), c_weights = HostF32::random({rows, out}, 53);
    backend->grouped_gemm(a.tensor(), w.tensor(), transpose_w, offsets.tensor(), c.tensor());
    expect_close("grouped_gemm", c.values, naive_grouped_gemm(a, w, transpose_w, offsets.values));

    auto loss = [&] {
      backend->grouped_gemm(a.tensor(), w.tensor(), transpose_w, offsets.tensor(), c.tensor());
      return weighted_sum(c.values, c_weights.values);
    };
    // da = dc @ op(w)^T: the grouped GEMM with the other layout.
    HostF32 da({rows, in});
    backend->grouped_gemm(c_weights.tensor(), w.tensor(), !transpose_w, offsets.tensor(),
                          da.tensor());
    expect_gradient("grouped_gemm da", a.values, da.values, loss);
    // dw[e] += dc^T a (c = a w^T) or a^T dc (c = a w).
    HostF32 dw({experts, p, q}, 0.0f);
    if (transpose_w)
      backend->grouped_gemm_weight_grad(c_weights.tensor(), a.tensor(), offsets.tensor(),
                                        dw.tensor());
    else
      backend->grouped_gemm_weight_grad(a.tensor(), c_weights.tensor(), offsets.tensor(),
                                        dw.tensor());
    for (int64_t i = 0; i < p * q; ++i) EXPECT_EQ(dw[i], 0.0f) << "expert 0 has no rows";
    expect_gradient("grouped_gemm dw", w.values, dw.values, loss);
  }
  HostI32 bad_offsets({experts + 1}, {0, 3, 2, 4, 6});
  HostF32 a({rows, q}), c({rows, p});
  EXPECT_THROW(
      backend->grouped_gemm(a.tensor(), w.tensor(), true, bad_offsets.tensor(), c.tensor()), Error);
}

}  // namespace
}  // namespace moetune::testing
