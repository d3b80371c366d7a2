// CPU causal attention with GQA and document masks: the plain O(T^2) reference.
// Query head h reads KV head h / (Hq / Hkv) (no repeated K/V). Scores are
// scale * <q, k> in fp32, softmax in fp32 with max subtraction (sum in double); the
// forward saves lse = max + log(sum exp(s - max)) per (b, h, t), which lets the backward
// rebuild the probabilities without storing them:
//   P = exp(S - lse), dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
//   dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
// Document masks: a token attends to the keys of its own row from the start of its
// document (the largest doc_offsets entry <= its flat index, never before its row) up
// to itself.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cpu/cpu_backend.h"

namespace moetune::cpu {

namespace {

struct AttentionShape {
  int64_t batch = 0, seq = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
};

AttentionShape attention_shape(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  if (q.rank() != 4 || k.rank() != 4)
    fail(op, ": q and k must be (B, T, heads, D), got ", q.shape.str(), " and ", k.shape.str());
  AttentionShape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  if (k.size(0) != s.batch || k.size(1) != s.seq || k.size(3) != s.head_dim)
    fail(op, ": k ", k.shape.str(), " does not match q ", q.shape.str());
  expect_shape(v, k.shape, op, "v");
  if (s.kv_heads == 0 || s.q_heads % s.kv_heads != 0)
    fail(op, ": query heads (", s.q_heads, ") must be a multiple of KV heads (", s.kv_heads, ")");
  return s;
}

// For every flat token g = b * T + t: the first key position (within its row) it may see.
std::vector<int64_t> first_visible_keys(const Tensor& doc_offsets, const AttentionShape& s,
                                        const char* op) {
  const int64_t tokens = s.batch * s.seq;
  std::vector<int64_t> first(tokens, 0);  // no document mask: causal from the row start
  if (!doc_offsets.defined()) return first;
  const int32_t* offsets = i32(doc_offsets, op, "doc_offsets");
  const int64_t count = doc_offsets.numel();
  if (doc_offsets.rank() != 1 || count < 1)
    fail(op, ": doc_offsets must be (docs + 1), got ", doc_offsets.shape.str());
  expect_offsets(offsets, count - 1, tokens, op, "doc_offsets");
  int64_t doc = 0;  // index of the last offset <= g
  for (int64_t g = 0; g < tokens; ++g) {
    while (doc + 1 < count && offsets[doc + 1] <= g) ++doc;
    const int64_t row_start = (g / s.seq) * s.seq;
    const int64_t doc_start = offsets[doc] <= g ? offsets[doc] : row_start;
    first[g] = std::max(doc_start, row_start) - row_start;
  }
  return first;
}

}  // namespace

void CpuBackend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                   const Tensor& doc_offsets, const Tensor& out,
                                   const Tensor& lse) {
  const char* op = "attention_forward";
  const float* q_data = f32(q, op, "q");
  const float* k_data = f32(k, op, "k");
  const float* v_data = f32(v, op, "v");
  float* out_data = f32(out, op, "out");
  float* lse_data = f32(lse, op, "lse");
  const AttentionShape s = attention_shape(q, k, v, op);
  expect_shape(out, q.shape, op, "out");
  expect_shape(lse, Shape{s.batch, s.q_heads, s.seq}, op, "lse");
  const std::vector<int64_t> first_key = first_visible_keys(doc_offsets, s, op);
  const int64_t group = s.q_heads / s.kv_heads, dim = s.head_dim;

  std::vector<float> scores(s.seq);  // (T) probabilities of one query row
  std::vector<double> accumulator(dim);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.q_heads; ++h) {
      const int64_t kv_head = h / group;
      for (int64_t t = 0; t < s.seq; ++t) {
        const float* query = q_data + ((b * s.seq + t) * s.q_heads + h) * dim;  // (D)
        const int64_t begin = first_key[b * s.seq + t];
        float max_score = -std::numeric_limits<float>::infinity();
        for (int64_t j = begin; j <= t; ++j) {
          const float* key = k_data + ((b * s.seq + j) * s.kv_heads + kv_head) * dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < dim; ++d) dot += query[d] * key[d];
          scores[j] = dot * scale;
          max_score = std::max(max_score, scores[j]);
        }
        double sum = 0.0;
        for (int64_t j = begin; j <= t; ++j) {
          scores[j] = std::exp(scores[j] - max_score);
          sum += scores[j];
        }
        std::fill(accumulator.begin(), accumulator.end(), 0.0);
        for (int64_t j = begin; j <= t; ++j) {
          const float* value = v_data + ((b * s.seq + j) * s.kv_heads + kv_head) * dim;
          for (int64_t d = 0; d < dim; ++d)
            accumulator[d] += static_cast<double>(scores[j]) * value[d];
        }
        float* output = out_data + ((b * s.seq + t) * s.q_heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) output[d] = static_cast<float>(accumulator[d] / sum);
        lse_data[(b * s.q_heads + h) * s.seq + t] = max_score + static_cast<float>(std::log(sum));
      }
    }
  }
}

void CpuBackend::attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor& out, const Tensor& lse,
                                    float scale, const Tensor& doc_offsets, const Tensor& dq,
                                    const Tensor& dk, const Tensor& dv) {
  const char* op = "attention_backward";
  const float* dout_data = f32(dout, op, "dout");
  const float* q_data = f32(q, op, "q");
  const float* k_data = f32(k, op, "k");
  const float* v_data = f32(v, op, "v");
  const float* out_data = f32(out, op, "out");
  const float* lse_data = f32(lse, op, "lse");
  float* dq_data = f32(dq, op, "dq");
  float* dk_data = f32(dk, op, "dk");
  float* dv_data = f32(dv, op, "dv");
  const AttentionShape s = attention_shape(q, k, v, op);
  expect_shape(dout, q.shape, op, "dout");
  expect_shape(out, q.shape, op, "out");
  expect_shape(lse, Shape{s.batch, s.q_heads, s.seq}, op, "lse");
  expect_shape(dq, q.shape, op, "dq");
  expect_shape(dk, k.shape, op, "dk");
  expect_shape(dv, k.shape, op, "dv");
  const std::vector<int64_t> first_key = first_visible_keys(doc_offsets, s, op);
  const int64_t group = s.q_heads / s.kv_heads, dim = s.head_dim;

  // dk and dv sum over the query heads of a group and over queries: accumulate in double.
  std::vector<double> dk_sum(k.numel(), 0.0), dv_sum(k.numel(), 0.0);
  std::vector<double> dq_row(dim);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.q_heads; ++h) {
      const int64_t kv_head = h / group;
      for (int64_t t = 0; t < s.seq; ++t) {
        const int64_t q_index = ((b * s.seq + t) * s.q_heads + h) * dim;
        const float* query = q_data + q_index;
        const float* d_output = dout_data + q_index;
        const float* output = out_data + q_index;
        const float row_lse = lse_data[(b * s.q_heads + h) * s.seq + t];
        double delta = 0.0;  // rowsum(dO * O) = sum_j P_j dP_j
        for (int64_t d = 0; d < dim; ++d) delta += static_cast<double>(d_output[d]) * output[d];
        std::fill(dq_row.begin(), dq_row.end(), 0.0);
        for (int64_t j = first_key[b * s.seq + t]; j <= t; ++j) {
          const int64_t kv_index = ((b * s.seq + j) * s.kv_heads + kv_head) * dim;
          const float* key = k_data + kv_index;
          const float* value = v_data + kv_index;
          float dot = 0.0f;
          for (int64_t d = 0; d < dim; ++d) dot += query[d] * key[d];
          const double prob = std::exp(static_cast<double>(dot * scale) - row_lse);
          double dprob = 0.0;
          for (int64_t d = 0; d < dim; ++d) dprob += static_cast<double>(d_output[d]) * value[d];
          const double dscore = prob * (dprob - delta) * scale;
          for (int64_t d = 0; d < dim; ++d) {
            dq_row[d] += dscore * key[d];
            dk_sum[kv_index + d] += dscore * query[d];
            dv_sum[kv_index + d] += prob * d_output[d];
          }
        }
        for (int64_t d = 0; d < dim; ++d) dq_data[q_index + d] = static_cast<float>(dq_row[d]);
      }
    }
  }
  for (int64_t i = 0; i < k.numel(); ++i) {
    dk_data[i] = static_cast<float>(dk_sum[i]);
    dv_data[i] = static_cast<float>(dv_sum[i]);
  }
}

// Queries at the end of a KV cache (generation): query i sees cache rows [0, past + i].
void CpuBackend::attention_cached_forward(const Tensor& q, const Tensor& k_cache,
                                          const Tensor& v_cache, int64_t past, float scale,
                                          const Tensor& out) {
  const char* op = "attention_cached_forward";
  const float* q_data = f32(q, op, "q");
  const float* k_data = f32(k_cache, op, "k_cache");
  const float* v_data = f32(v_cache, op, "v_cache");
  float* out_data = f32(out, op, "out");
  if (q.rank() != 3 || k_cache.rank() != 3 || k_cache.size(2) != q.size(2))
    fail(op, ": q ", q.shape.str(), " and k_cache ", k_cache.shape.str(),
         " must be (n, Hq, D) and (L, Hkv, D)");
  expect_shape(v_cache, k_cache.shape, op, "v_cache");
  expect_shape(out, q.shape, op, "out");
  const int64_t n = q.size(0), q_heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1);
  if (kv_heads == 0 || q_heads % kv_heads != 0)
    fail(op, ": query heads (", q_heads, ") must be a multiple of KV heads (", kv_heads, ")");
  if (past < 0 || past + n > k_cache.size(0))
    fail(op, ": positions [", past, ", ", past + n, ") do not fit a cache of ", k_cache.size(0));
  const int64_t group = q_heads / kv_heads;
  std::vector<float> scores(static_cast<size_t>(past + n));
  std::vector<double> accumulator(static_cast<size_t>(dim));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t visible = past + i + 1;
    for (int64_t h = 0; h < q_heads; ++h) {
      const float* query = q_data + (i * q_heads + h) * dim;  // (D)
      const int64_t kv_head = h / group;
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        const float* key = k_data + (j * kv_heads + kv_head) * dim;
        float dot = 0.0f;
        for (int64_t d = 0; d < dim; ++d) dot += query[d] * key[d];
        scores[j] = dot * scale;
        max_score = std::max(max_score, scores[j]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j < visible; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        sum += scores[j];
      }
      std::fill(accumulator.begin(), accumulator.end(), 0.0);
      for (int64_t j = 0; j < visible; ++j) {
        const float* value = v_data + (j * kv_heads + kv_head) * dim;
        for (int64_t d = 0; d < dim; ++d)
          accumulator[d] += static_cast<double>(scores[j]) * value[d];
      }
      float* output = out_data + (i * q_heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) output[d] = static_cast<float>(accumulator[d] / sum);
    }
  }
}

}  // namespace moetune::cpu
