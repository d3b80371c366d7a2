// CPU attention: the output and lse against a naive softmax(Q K^T * scale + mask) V in
// double with an explicit causal/document mask, and dq/dk/dv against central differences,
// with GQA (4 query heads over 2 KV heads) and packed documents.
#include <algorithm>
#include <cmath>
#include <limits>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

struct AttentionCase {
  int64_t batch = 2, seq = 5, q_heads = 4, kv_heads = 2, head_dim = 3;
  float scale = 0.6f;
  std::vector<int32_t> doc_offsets;  // empty: plain causal
};

// Document of flat token g: the last offset <= g (or -1 when there are no documents).
int64_t document_of(const std::vector<int32_t>& offsets, int64_t g) {
  if (offsets.empty()) return -1;
  return std::upper_bound(offsets.begin(), offsets.end(), static_cast<int32_t>(g)) -
         offsets.begin() - 1;
}

void naive_attention(const AttentionCase& c, const HostF32& q, const HostF32& k, const HostF32& v,
                     std::vector<float>& out, std::vector<float>& lse) {
  const int64_t group = c.q_heads / c.kv_heads, dim = c.head_dim;
  out.assign(q.size(), 0.0f);
  lse.assign(c.batch * c.q_heads * c.seq, 0.0f);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t h = 0; h < c.q_heads; ++h)
      for (int64_t t = 0; t < c.seq; ++t) {
        std::vector<double> scores(c.seq, -std::numeric_limits<double>::infinity());
        for (int64_t j = 0; j < c.seq; ++j) {
          const bool visible = j <= t && document_of(c.doc_offsets, b * c.seq + j) ==
                                             document_of(c.doc_offsets, b * c.seq + t);
          if (!visible) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < dim; ++d)
            dot += static_cast<double>(q[((b * c.seq + t) * c.q_heads + h) * dim + d]) *
                   k[((b * c.seq + j) * c.kv_heads + h / group) * dim + d];
          scores[j] = dot * c.scale;
        }
        const double max_score = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        for (double& s : scores) sum += (s = std::exp(s - max_score));
        for (int64_t d = 0; d < dim; ++d) {
          double acc = 0.0;
          for (int64_t j = 0; j < c.seq; ++j)
            acc += scores[j] * v[((b * c.seq + j) * c.kv_heads + h / group) * dim + d];
          out[((b * c.seq + t) * c.q_heads + h) * dim + d] = static_cast<float>(acc / sum);
        }
        lse[(b * c.q_heads + h) * c.seq + t] = static_cast<float>(max_score + std::log(sum));
      }
}

std::vector<AttentionCase> cases() {
  AttentionCase causal;
  AttentionCase packed;
  packed.doc_offsets = {0, 2, 5, 6, 10};  // row 0: [0,2) [2,5); row 1: [5,6) [6,10)
  AttentionCase mha;
  mha.batch = 1, mha.seq = 7, mha.q_heads = 2, mha.kv_heads = 2, mha.head_dim = 4;
  mha.doc_offsets = {0, 3, 7};
  return {causal, packed, mha};
}

TEST(OpsAttention, ForwardMatchesNaiveSoftmax) {
  auto backend = make_cpu_backend();
  for (const AttentionCase& c : cases()) {
    HostF32 q = HostF32::random({c.batch, c.seq, c.q_heads, c.head_dim}, 31, 2.0f);
    HostF32 k = HostF32::random({c.batch, c.seq, c.kv_heads, c.head_dim}, 32, 2.0f);
    HostF32 v = HostF32::random({c.batch, c.seq, c.kv_heads, c.head_dim}, 33);
    HostF32 out(q.shape), lse({c.batch, c.q_heads, c.seq});
    HostI32 offsets({static_cast<int64_t>(c.doc_offsets.size())}, c.doc_offsets);
    backend->attention_forward(q.tensor(), k.tensor(), v.tensor(), c.scale,
                               c.doc_offsets.empty() ? Tensor() : offsets.tensor(), out.tensor(),
                               lse.tensor());
    std::vector<float> expected_out, expected_lse;
    naive_attention(c, q, k, v, expected_out, expected_lse);
    expect_close("attention out", out.values, expected_out);
    expect_close("attention lse", lse.values, expected_lse);
  }
}

TEST(OpsAttention, GradientsMatchFiniteDifferences) {
  auto backend = make_cpu_backend();
  for (const AttentionCase& c : cases()) {
    HostF32 q = HostF32::random({c.batch, c.seq, c.q_heads, c.head_dim}, 34, 1.5f);
    HostF32 k = HostF32::random({c.batch, c.seq, c.kv_heads, c.head_dim}, 35, 1.5f);
    HostF32 v = HostF32::random({c.batch, c.seq, c.kv_heads, c.head_dim}, 36);
    HostF32 weights = HostF32::random(q.shape, 37);
    HostF32 out(q.shape), lse({c.batch, c.q_heads, c.seq});
    HostI32 offsets({static_cast<int64_t>(c.doc_offsets.size())}, c.doc_offsets);
    const Tensor doc_offsets = c.doc_offsets.empty() ? Tensor() : offsets.tensor();
    auto loss = [&] {
      backend->attention_forward(q.tensor(), k.tensor(), v.tensor(), c.scale, doc_offsets,
                                 out.tensor(), lse.tensor());
      return weighted_sum(out.values, weights.values);
    };
    loss();
    HostF32 dq(q.shape, 9.0f), dk(k.shape, 9.0f), dv(v.shape, 9.0f);  // overwritten
    backend->attention_backward(weights.tensor(), q.tensor(), k.tensor(), v.tensor(), out.tensor(),
                                lse.tensor(), c.scale, doc_offsets, dq.tensor(), dk.tensor(),
                                dv.tensor());
    expect_gradient("attention dq", q.values, dq.values, loss);
    expect_gradient("attention dk", k.values, dk.values, loss);
    expect_gradient("attention dv", v.values, dv.values, loss);
  }
}

TEST(OpsAttention, RejectsBadHeadsAndOffsets) {
  auto backend = make_cpu_backend();
  HostF32 q({1, 4, 3, 2}), k({1, 4, 2, 2}), v({1, 4, 2, 2}), out({1, 4, 3, 2}), lse({1, 3, 4});
  EXPECT_THROW(backend->attention_forward(q.tensor(), k.tensor(), v.tensor(), 1.0f, Tensor(),
                                          out.tensor(), lse.tensor()),
               Error);  // 3 query heads over 2 KV heads
  HostF32 q2({1, 4, 2, 2}), out2({1, 4, 2, 2}), lse2({1, 2, 4});
  HostI32 decreasing({3}, {0, 3, 2});
  EXPECT_THROW(backend->attention_forward(q2.tensor(), k.tensor(), v.tensor(), 1.0f,
                                          decreasing.tensor(), out2.tensor(), lse2.tensor()),
               Error);
  HostI32 too_far({2}, {0, 5});
  EXPECT_THROW(backend->attention_forward(q2.tensor(), k.tensor(), v.tensor(), 1.0f,
                                          too_far.tensor(), out2.tensor(), lse2.tensor()),
               Error);
}

}  // namespace
}  // namespace moetune::testing
