// CPU MoE pipeline: route (fp32 softmax, torch.topk order, optional renormalisation),
// aux-loss statistics, a stable counting sort of the N*k slots by expert, gather into the
// expert-sorted buffer, weighted combine back to token order, the experts' SwiGLU backward
// with the router weights applied at the experts, the expert-parallel token exchange's
// rank and local expert ids, and grouped GEMMs (one cblas_sgemm per expert;
// experts with zero rows are skipped).
// Router backward: with w_j = p[id_j] / S (S = sum_i p[id_i]) when normalising,
//   dp[id_j] = (dw_j - sum_i dw_i w_i) / S   (else dp[id_j] = dw_j),
// plus aux_dprob[e] for every token, then the softmax backward dl = p * (dp - <p, dp>).
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <numeric>
#include <vector>

#include "ops/cpu/cpu_backend.h"

namespace moetune::cpu {

namespace {

// topk_ids (N, k): checks every id is in [0, experts).
void expect_expert_ids(const int32_t* ids, int64_t count, int64_t experts, const char* op) {
  for (int64_t s = 0; s < count; ++s)
    if (ids[s] < 0 || ids[s] >= experts)
      fail(op, ": expert id ", ids[s], " at slot ", s, " is outside [0, ", experts, ")");
}

}  // namespace

void CpuBackend::router_forward(const Tensor& logits, int top_k, bool normalize,
                                const Tensor& probs, const Tensor& topk_ids,
                                const Tensor& topk_weights) {
  const char* op = "router_forward";
  const float* logit_data = f32(logits, op, "logits");
  float* prob_data = f32(probs, op, "probs");
  int32_t* id_data = i32(topk_ids, op, "topk_ids");
  float* weight_data = f32(topk_weights, op, "topk_weights");
  if (logits.rank() != 2) fail(op, ": logits must be (N, E), got ", logits.shape.str());
  const int64_t tokens = logits.size(0), experts = logits.size(1);
  if (top_k < 1 || top_k > experts)
    fail(op, ": top_k ", top_k, " must be in [1, ", experts, "] (the number of experts)");
  expect_shape(probs, logits.shape, op, "probs");
  expect_shape(topk_ids, Shape{tokens, top_k}, op, "topk_ids");
  expect_shape(topk_weights, Shape{tokens, top_k}, op, "topk_weights");

  std::vector<int32_t> order(experts);
  for (int64_t n = 0; n < tokens; ++n) {
    const float* row = logit_data + n * experts;  // (E)
    float* p = prob_data + n * experts;           // (E)
    const float max_logit = *std::max_element(row, row + experts);
    double sum = 0.0;
    for (int64_t e = 0; e < experts; ++e) {
      p[e] = std::exp(row[e] - max_logit);
      sum += p[e];
    }
    const float inverse_sum = 1.0f / static_cast<float>(sum);  // torch multiplies by 1/sum
    for (int64_t e = 0; e < experts; ++e) p[e] *= inverse_sum;

    // torch.topk: descending probability, ties to the lower expert index.
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float weight_sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      id_data[n * top_k + j] = order[j];
      weight_data[n * top_k + j] = p[order[j]];
      weight_sum += p[order[j]];
    }
    if (normalize)
      for (int j = 0; j < top_k; ++j) weight_data[n * top_k + j] /= weight_sum;
  }
}

void CpuBackend::router_backward(const Tensor& dtopk_weights, const Tensor& probs,
                                 const Tensor& topk_ids, bool normalize, const Tensor& aux_dprob,
                                 const Tensor& dlogits) {
  const char* op = "router_backward";
  const float* dweight_data = f32(dtopk_weights, op, "dtopk_weights");
  const float* prob_data = f32(probs, op, "probs");
  const int32_t* id_data = i32(topk_ids, op, "topk_ids");
  float* dlogit_data = f32(dlogits, op, "dlogits");
  if (probs.rank() != 2 || topk_ids.rank() != 2)
    fail(op, ": probs must be (N, E) and topk_ids (N, k), got ", probs.shape.str(), " and ",
         topk_ids.shape.str());
  const int64_t tokens = probs.size(0), experts = probs.size(1), top_k = topk_ids.size(1);
  expect_shape(topk_ids, Shape{tokens, top_k}, op, "topk_ids");
  expect_shape(dtopk_weights, topk_ids.shape, op, "dtopk_weights");
  expect_shape(dlogits, probs.shape, op, "dlogits");
  const float* aux_data = nullptr;
  if (aux_dprob.defined()) {
    aux_data = f32(aux_dprob, op, "aux_dprob");
    expect_shape(aux_dprob, Shape{experts}, op, "aux_dprob");
  }
  expect_expert_ids(id_data, tokens * top_k, experts, op);

  std::vector<double> dprob(experts);
  for (int64_t n = 0; n < tokens; ++n) {
    const float* p = prob_data + n * experts;
    const int32_t* ids = id_data + n * top_k;
    const float* dw = dweight_data + n * top_k;
    for (int64_t e = 0; e < experts; ++e) dprob[e] = aux_data ? aux_data[e] : 0.0;
    if (normalize) {
      double selected_sum = 0.0, weighted_dw = 0.0;  // S and sum_i dw_i p[id_i]
      for (int64_t j = 0; j < top_k; ++j) {
        selected_sum += p[ids[j]];
        weighted_dw += static_cast<double>(dw[j]) * p[ids[j]];
      }
      // dp[id_j] = dw_j / S - sum_i dw_i p[id_i] / S^2
      for (int64_t j = 0; j < top_k; ++j)
        dprob[ids[j]] += dw[j] / selected_sum - weighted_dw / (selected_sum * selected_sum);
    } else {
      for (int64_t j = 0; j < top_k; ++j) dprob[ids[j]] += dw[j];
    }
    double p_dot_dp = 0.0;
    for (int64_t e = 0; e < experts; ++e) p_dot_dp += p[e] * dprob[e];
    for (int64_t e = 0; e < experts; ++e)
      dlogit_data[n * experts + e] = static_cast<float>(p[e] * (dprob[e] - p_dot_dp));
  }
}

void CpuBackend::router_aux_stats(const Tensor& probs, const Tensor& topk_ids,
                                  const Tensor& expert_counts, const Tensor& prob_sums) {
  const char* op = "router_aux_stats";
  const float* prob_data = f32(probs, op, "probs");
  const int32_t* id_data = i32(topk_ids, op, "topk_ids");
  float* count_data = f32(expert_counts, op, "expert_counts");
  float* sum_data = f32(prob_sums, op, "prob_sums");
  if (probs.rank() != 2 || topk_ids.rank() != 2 || topk_ids.size(0) != probs.size(0))
    fail(op, ": probs (N, E) and topk_ids (N, k) do not match: ", probs.shape.str(), " and ",
         topk_ids.shape.str());
  const int64_t tokens = probs.size(0), experts = probs.size(1);
  expect_shape(expert_counts, Shape{experts}, op, "expert_counts");
  expect_shape(prob_sums, Shape{experts}, op, "prob_sums");
  expect_expert_ids(id_data, topk_ids.numel(), experts, op);

  std::vector<int64_t> counts(experts, 0);
  for (int64_t s = 0; s < topk_ids.numel(); ++s) ++counts[id_data[s]];
  std::vector<double> sums(experts, 0.0);
  for (int64_t n = 0; n < tokens; ++n)
    for (int64_t e = 0; e < experts; ++e) sums[e] += prob_data[n * experts + e];
  for (int64_t e = 0; e < experts; ++e) {
    count_data[e] += static_cast<float>(counts[e]);
    sum_data[e] += static_cast<float>(sums[e]);
  }
}

void CpuBackend::moe_sort_by_expert(const Tensor& topk_ids, int num_experts,
                                    const Tensor& expert_offsets, const Tensor& sorted_slots,
                                    const Tensor& slot_rows) {
  const char* op = "moe_sort_by_expert";
  const int32_t* id_data = i32(topk_ids, op, "topk_ids");
  int32_t* offset_data = i32(expert_offsets, op, "expert_offsets");
  int32_t* sorted_data = i32(sorted_slots, op, "sorted_slots");
  int32_t* row_data = i32(slot_rows, op, "slot_rows");
  if (num_experts < 1) fail(op, ": num_experts must be positive, got ", num_experts);
  const int64_t slots = topk_ids.numel();
  expect_shape(expert_offsets, Shape{num_experts + 1}, op, "expert_offsets");
  expect_shape(sorted_slots, Shape{slots}, op, "sorted_slots");
  expect_shape(slot_rows, Shape{slots}, op, "slot_rows");
  expect_expert_ids(id_data, slots, num_experts, op);

  // Counting sort: histogram, exclusive prefix sum, then place slots in increasing order
  // (which makes the sort stable in the slot index).
  std::vector<int32_t> next_row(num_experts + 1, 0);
  for (int64_t s = 0; s < slots; ++s) ++next_row[id_data[s] + 1];
  for (int e = 0; e < num_experts; ++e) next_row[e + 1] += next_row[e];
  std::copy(next_row.begin(), next_row.end(), offset_data);
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t row = next_row[id_data[s]]++;
    sorted_data[row] = static_cast<int32_t>(s);
    row_data[s] = row;
  }
}

namespace {

// Checks sorted_slots (N*k) against x (N, H) / out (N*k, H) and returns H.
int64_t gather_width(const Tensor& tokens_tensor, const Tensor& sorted_slots, int top_k,
                     const Tensor& rows_tensor, const char* op, const char* tokens_name,
                     const char* rows_name) {
  if (top_k < 1) fail(op, ": top_k must be positive, got ", top_k);
  if (tokens_tensor.rank() != 2)
    fail(op, ": ", tokens_name, " must be (N, H), got ", tokens_tensor.shape.str());
  const int64_t tokens = tokens_tensor.size(0), width = tokens_tensor.size(1);
  const int64_t rows = sorted_slots.numel();
  if (sorted_slots.rank() != 1 || rows > tokens * top_k)
    fail(op, ": sorted_slots must be (R) with R <= ", tokens * top_k, ", got ",
         sorted_slots.shape.str());
  expect_shape(rows_tensor, Shape{rows, width}, op, rows_name);
  const int32_t* slots = sorted_slots.ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r)
    if (slots[r] < 0 || slots[r] >= tokens * top_k)
      fail(op, ": sorted_slots[", r, "] = ", slots[r], " is outside [0, ", tokens * top_k, ")");
  return width;
}

}  // namespace

void CpuBackend::moe_gather(const Tensor& x, const Tensor& sorted_slots, int top_k,
                            const Tensor& out) {
  const char* op = "moe_gather";
  const float* x_data = f32(x, op, "x");
  const int32_t* slot_data = i32(sorted_slots, op, "sorted_slots");
  float* out_data = f32(out, op, "out");
  const int64_t width = gather_width(x, sorted_slots, top_k, out, op, "x", "out");
  for (int64_t r = 0; r < out.size(0); ++r) {
    const float* source = x_data + (slot_data[r] / top_k) * width;
    std::copy(source, source + width, out_data + r * width);
  }
}

void CpuBackend::moe_gather_backward(const Tensor& dout, const Tensor& sorted_slots, int top_k,
                                     const Tensor& dx) {
  const char* op = "moe_gather_backward";
  const float* dout_data = f32(dout, op, "dout");
  const int32_t* slot_data = i32(sorted_slots, op, "sorted_slots");
  float* dx_data = f32(dx, op, "dx");
  const int64_t width = gather_width(dx, sorted_slots, top_k, dout, op, "dx", "dout");
  // Walk slots in token order (slot s = n * k + j) so each dx row sums in j order; slots
  // past the prefix (-1) add nothing.
  std::vector<int32_t> slot_to_row(dx.size(0) * top_k, -1);
  for (int64_t r = 0; r < dout.size(0); ++r) slot_to_row[slot_data[r]] = static_cast<int32_t>(r);
  for (int64_t s = 0; s < static_cast<int64_t>(slot_to_row.size()); ++s) {
    if (slot_to_row[s] < 0) continue;
    const float* source = dout_data + slot_to_row[s] * width;
    float* target = dx_data + (s / top_k) * width;
    for (int64_t j = 0; j < width; ++j) target[j] += source[j];
  }
}

namespace {

// Checks the combine arguments: y (N*k, H), weights (N, k), slot_rows (N*k), out (N, H).
void expect_combine(const Tensor& y, const Tensor& weights, const Tensor& slot_rows,
                    const Tensor& out, const char* op, const char* out_name) {
  if (weights.rank() != 2 || out.rank() != 2)
    fail(op, ": weights must be (N, k) and ", out_name, " (N, H), got ", weights.shape.str(),
         " and ", out.shape.str());
  const int64_t tokens = weights.size(0), top_k = weights.size(1), width = out.size(1);
  expect_shape(out, Shape{tokens, width}, op, out_name);
  if (y.rank() != 2 || y.size(1) != width || y.size(0) > tokens * top_k)
    fail(op, ": y must be (R, ", width, ") with R <= ", tokens * top_k, ", got ", y.shape.str());
  expect_shape(slot_rows, Shape{tokens * top_k}, op, "slot_rows");
  const int32_t* rows = slot_rows.ptr<int32_t>();
  for (int64_t s = 0; s < tokens * top_k; ++s)
    if (rows[s] < 0 || rows[s] >= tokens * top_k)
      fail(op, ": slot_rows[", s, "] = ", rows[s], " is outside [0, ", tokens * top_k, ")");
}

}  // namespace

void CpuBackend::moe_combine(const Tensor& y, const Tensor& weights, const Tensor& slot_rows,
                             const Tensor& out) {
  const char* op = "moe_combine";
  const float* y_data = f32(y, op, "y");
  const float* weight_data = f32(weights, op, "weights");
  const int32_t* row_data = i32(slot_rows, op, "slot_rows");
  float* out_data = f32(out, op, "out");
  expect_combine(y, weights, slot_rows, out, op, "out");
  const int64_t tokens = weights.size(0), top_k = weights.size(1), width = out.size(1);
  for (int64_t n = 0; n < tokens; ++n) {
    float* target = out_data + n * width;  // (H)
    std::fill(target, target + width, 0.0f);
    for (int64_t j = 0; j < top_k; ++j) {
      if (row_data[n * top_k + j] >= y.size(0)) continue;  // not processed here
      const float weight = weight_data[n * top_k + j];
      const float* source = y_data + row_data[n * top_k + j] * width;
      for (int64_t d = 0; d < width; ++d) target[d] += weight * source[d];
    }
  }
}

void CpuBackend::moe_rank_ids(const Tensor& topk_ids, int64_t experts_per_rank,
                              const Tensor& rank_ids) {
  const char* op = "moe_rank_ids";
  const int32_t* id_data = i32(topk_ids, op, "topk_ids");
  int32_t* rank_data = i32(rank_ids, op, "rank_ids");
  if (topk_ids.rank() != 2 || rank_ids.rank() != 2 || rank_ids.size(0) != topk_ids.size(0) ||
      experts_per_rank < 1)
    fail(op, ": topk_ids ", topk_ids.shape.str(), " and rank_ids ", rank_ids.shape.str(),
         " must be (N, k) and (N, P), experts_per_rank ", experts_per_rank, " positive");
  const int64_t tokens = topk_ids.size(0), top_k = topk_ids.size(1), ranks = rank_ids.size(1);
  expect_expert_ids(id_data, topk_ids.numel(), ranks * experts_per_rank, op);
  for (int64_t n = 0; n < tokens; ++n) {
    int32_t* row = rank_data + n * ranks;
    std::fill(row, row + ranks, static_cast<int32_t>(ranks));
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t p = id_data[n * top_k + j] / experts_per_rank;
      row[p] = static_cast<int32_t>(p);
    }
  }
}

void CpuBackend::moe_local_ids(const Tensor& topk_ids, int64_t first_expert, int64_t local_experts,
                               const Tensor& local_ids) {
  const char* op = "moe_local_ids";
  const int32_t* id_data = i32(topk_ids, op, "topk_ids");
  int32_t* local_data = i32(local_ids, op, "local_ids");
  expect_shape(local_ids, topk_ids.shape, op, "local_ids");
  if (first_expert < 0 || local_experts < 1)
    fail(op, ": first_expert ", first_expert, " and local_experts ", local_experts);
  for (int64_t s = 0; s < topk_ids.numel(); ++s) {
    const int64_t local = int64_t{id_data[s]} - first_expert;
    local_data[s] =
        static_cast<int32_t>(local >= 0 && local < local_experts ? local : local_experts);
  }
}

void CpuBackend::moe_swiglu_backward(const Tensor& dh, const Tensor& gate_up,
                                     const Tensor& row_weights, const Tensor& dgate_up,
                                     const Tensor& weighted_hidden, const Tensor& drow_weights) {
  const char* op = "moe_swiglu_backward";
  const float* dh_data = f32(dh, op, "dh");
  const float* gate_up_data = f32(gate_up, op, "gate_up");
  const float* weight_data = f32(row_weights, op, "row_weights");
  float* dgate_up_data = f32(dgate_up, op, "dgate_up");
  float* hidden_data = f32(weighted_hidden, op, "weighted_hidden");
  float* dweight_data = f32(drow_weights, op, "drow_weights");
  if (gate_up.rank() != 2 || gate_up.size(1) % 2 != 0)
    fail(op, ": gate_up must be (M, 2I), got ", gate_up.shape.str());
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  expect_shape(dh, Shape{rows, width}, op, "dh");
  expect_shape(dgate_up, gate_up.shape, op, "dgate_up");
  expect_shape(weighted_hidden, Shape{rows, width}, op, "weighted_hidden");
  if (row_weights.numel() != rows || drow_weights.numel() != rows)
    fail(op, ": row_weights ", row_weights.shape.str(), " and drow_weights ",
         drow_weights.shape.str(), " need one value per row of gate_up ", gate_up.shape.str());
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up_data + r * 2 * width;  // (I)
    const float* up = gate + width;                    // (I)
    const float* d = dh_data + r * width;              // (I)
    float* dgate = dgate_up_data + r * 2 * width;
    float* dup = dgate + width;
    const float w = weight_data[r];
    double dot = 0.0;
    for (int64_t j = 0; j < width; ++j) {
      const float sigmoid = 1.0f / (1.0f + std::exp(-gate[j]));
      const float silu = gate[j] * sigmoid;
      const float h = silu * up[j];
      dot += static_cast<double>(d[j]) * h;
      hidden_data[r * width + j] = w * h;
      // d silu / dgate = sigmoid * (1 + gate * (1 - sigmoid))
      dgate[j] = w * d[j] * up[j] * sigmoid * (1.0f + gate[j] * (1.0f - sigmoid));
      dup[j] = w * d[j] * silu;
    }
    dweight_data[r] = static_cast<float>(dot);
  }
}

void CpuBackend::grouped_gemm(const Tensor& a, const Tensor& w, bool transpose_w,
                              const Tensor& offsets, const Tensor& c) {
  const char* op = "grouped_gemm";
  const float* a_data = f32(a, op, "a");
  const float* w_data = f32(w, op, "w");
  const int32_t* offset_data = i32(offsets, op, "offsets");
  float* c_data = f32(c, op, "c");
  if (w.rank() != 3 || a.rank() != 2 || c.rank() != 2)
    fail(op, ": expects a (M, K), w (E, P, Q), c (M, N); got ", a.shape.str(), ", ", w.shape.str(),
         ", ", c.shape.str());
  const int64_t experts = w.size(0), p = w.size(1), q = w.size(2), rows = a.size(0);
  const int64_t in_width = transpose_w ? q : p, out_width = transpose_w ? p : q;
  expect_shape(a, Shape{rows, in_width}, op, "a");
  expect_shape(c, Shape{rows, out_width}, op, "c");
  expect_shape(offsets, Shape{experts + 1}, op, "offsets");
  expect_offsets(offset_data, experts, rows, op, "offsets");
  if (in_width == 0) {  // empty inner dimension: every grouped row is zero
    std::fill(c_data + int64_t{offset_data[0]} * out_width,
              c_data + int64_t{offset_data[experts]} * out_width, 0.0f);
    return;
  }
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t begin = offset_data[e], count = offset_data[e + 1] - begin;
    if (count == 0 || out_width == 0) continue;
    // c[R_e] (count, out) = a[R_e] (count, in) @ op(w[e])
    cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_w ? CblasTrans : CblasNoTrans,
                static_cast<blasint>(count), static_cast<blasint>(out_width),
                static_cast<blasint>(in_width), 1.0f, a_data + begin * in_width,
                static_cast<blasint>(in_width), w_data + e * p * q, static_cast<blasint>(q), 0.0f,
                c_data + begin * out_width, static_cast<blasint>(out_width));
  }
}

void CpuBackend::grouped_gemm_weight_grad(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                          const Tensor& dw, bool accumulate) {
  const char* op = "grouped_gemm_weight_grad";
  const float* dy_data = f32(dy, op, "dy");
  const float* x_data = f32(x, op, "x");
  const int32_t* offset_data = i32(offsets, op, "offsets");
  float* dw_data = f32(dw, op, "dw");
  if (dw.rank() != 3 || dy.rank() != 2 || x.rank() != 2)
    fail(op, ": expects dy (M, P), x (M, Q), dw (E, P, Q); got ", dy.shape.str(), ", ",
         x.shape.str(), ", ", dw.shape.str());
  const int64_t experts = dw.size(0), p = dw.size(1), q = dw.size(2), rows = dy.size(0);
  expect_shape(dy, Shape{rows, p}, op, "dy");
  expect_shape(x, Shape{rows, q}, op, "x");
  expect_shape(offsets, Shape{experts + 1}, op, "offsets");
  expect_offsets(offset_data, experts, rows, op, "offsets");
  // Overwriting = zeroing first (experts without rows end with zero gradients), then +=.
  if (!accumulate) std::fill(dw_data, dw_data + dw.numel(), 0.0f);
  if (p == 0 || q == 0) return;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t begin = offset_data[e], count = offset_data[e + 1] - begin;
    if (count == 0) continue;
    // dw[e] (P, Q) += dy[R_e]^T (P, count) @ x[R_e] (count, Q)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(p),
                static_cast<blasint>(q), static_cast<blasint>(count), 1.0f, dy_data + begin * p,
                static_cast<blasint>(p), x_data + begin * q, static_cast<blasint>(q), 1.0f,
                dw_data + e * p * q, static_cast<blasint>(q));
  }
}

}  // namespace moetune::cpu
