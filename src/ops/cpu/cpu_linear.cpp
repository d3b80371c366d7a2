// CPU dense ops: GEMM (OpenBLAS cblas_sgemm, fp32), elementwise add, bias, embedding
// lookup and SwiGLU. SwiGLU follows torch: silu(g) = g / (1 + exp(-g)), out = silu(g) * up.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/cpu_backend.h"

namespace moetune::cpu {

void CpuBackend::gemm(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b,
                      const Tensor& c, float alpha, float beta) {
  const char* op = "gemm";
  const float* a_data = f32(a, op, "a");
  const float* b_data = f32(b, op, "b");
  float* c_data = f32(c, op, "c");
  if (a.rank() != 2 || b.rank() != 2 || c.rank() != 2)
    fail(op, ": expects 2-D tensors, got a ", a.shape.str(), ", b ", b.shape.str(), ", c ",
         c.shape.str());
  const int64_t m = transpose_a ? a.size(1) : a.size(0);
  const int64_t k = transpose_a ? a.size(0) : a.size(1);
  const int64_t k_b = transpose_b ? b.size(1) : b.size(0);
  const int64_t n = transpose_b ? b.size(0) : b.size(1);
  if (k != k_b || c.size(0) != m || c.size(1) != n)
    fail(op, ": shapes do not match: op(a) ", m, "x", k, ", op(b) ", k_b, "x", n, ", c ",
         c.shape.str());
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty sum: c = beta * c (beta 0 overwrites, as BLAS does)
    for (int64_t i = 0; i < m * n; ++i) c_data[i] = beta == 0.0f ? 0.0f : beta * c_data[i];
    return;
  }
  cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
              transpose_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a_data,
              static_cast<blasint>(a.size(1)), b_data, static_cast<blasint>(b.size(1)), beta,
              c_data, static_cast<blasint>(n));
}

void CpuBackend::add(const Tensor& out, const Tensor& a, const Tensor& b) {
  const char* op = "add";
  const float* a_data = f32(a, op, "a");
  const float* b_data = f32(b, op, "b");
  float* out_data = f32(out, op, "out");
  expect_shape(b, a.shape, op, "b");
  expect_shape(out, a.shape, op, "out");
  const int64_t count = a.numel();
  for (int64_t i = 0; i < count; ++i) out_data[i] = a_data[i] + b_data[i];
}

void CpuBackend::add_bias(const Tensor& x, const Tensor& bias) {
  const char* op = "add_bias";
  float* x_data = f32(x, op, "x");
  const float* bias_data = f32(bias, op, "bias");
  const int64_t width = bias.numel();
  if (bias.rank() != 1 || x.rank() < 1 || x.size(-1) != width)
    fail(op, ": bias ", bias.shape.str(), " does not match x ", x.shape.str());
  const int64_t rows = width ? x.numel() / width : 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) x_data[r * width + j] += bias_data[j];
}

void CpuBackend::bias_backward(const Tensor& dy, const Tensor& dbias, bool accumulate) {
  const char* op = "bias_backward";
  const float* dy_data = f32(dy, op, "dy");
  float* dbias_data = f32(dbias, op, "dbias");
  const int64_t width = dbias.numel();
  if (dbias.rank() != 1 || dy.rank() < 1 || dy.size(-1) != width)
    fail(op, ": dbias ", dbias.shape.str(), " does not match dy ", dy.shape.str());
  const int64_t rows = width ? dy.numel() / width : 0;
  std::vector<double> sums(width, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) sums[j] += dy_data[r * width + j];
  for (int64_t j = 0; j < width; ++j)
    dbias_data[j] = static_cast<float>(sums[j]) + (accumulate ? dbias_data[j] : 0.0f);
}

void CpuBackend::embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) {
  const char* op = "embedding_forward";
  const int32_t* id_data = i32(ids, op, "ids");
  const float* table_data = f32(table, op, "table");
  float* out_data = f32(out, op, "out");
  if (table.rank() != 2) fail(op, ": table must be (V, H), got ", table.shape.str());
  const int64_t vocab = table.size(0), hidden = table.size(1), tokens = ids.numel();
  expect_shape(out, Shape{tokens, hidden}, op, "out");
  for (int64_t n = 0; n < tokens; ++n) {
    const int32_t id = id_data[n];
    if (id < 0 || id >= vocab)
      fail(op, ": token id ", id, " at position ", n, " is outside the vocabulary [0, ", vocab,
           ")");
    for (int64_t j = 0; j < hidden; ++j) out_data[n * hidden + j] = table_data[id * hidden + j];
  }
}

void CpuBackend::embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  const char* op = "embedding_backward";
  const int32_t* id_data = i32(ids, op, "ids");
  const float* dout_data = f32(dout, op, "dout");
  float* dtable_data = f32(dtable, op, "dtable");
  if (dtable.rank() != 2) fail(op, ": dtable must be (V, H), got ", dtable.shape.str());
  const int64_t vocab = dtable.size(0), hidden = dtable.size(1), tokens = ids.numel();
  expect_shape(dout, Shape{tokens, hidden}, op, "dout");
  for (int64_t n = 0; n < tokens; ++n) {
    const int32_t id = id_data[n];
    if (id < 0 || id >= vocab)
      fail(op, ": token id ", id, " at position ", n, " is outside the vocabulary [0, ", vocab,
           ")");
    for (int64_t j = 0; j < hidden; ++j) dtable_data[id * hidden + j] += dout_data[n * hidden + j];
  }
}

// gate_up (M, 2I) -> out (M, I); returns I after checking the shapes.
static int64_t swiglu_width(const Tensor& gate_up, const Tensor& out, const char* op,
                            const char* out_name) {
  if (gate_up.rank() != 2 || gate_up.size(1) % 2 != 0)
    fail(op, ": gate_up must be (M, 2I), got ", gate_up.shape.str());
  const int64_t width = gate_up.size(1) / 2;
  expect_shape(out, Shape{gate_up.size(0), width}, op, out_name);
  return width;
}

void CpuBackend::swiglu_forward(const Tensor& gate_up, const Tensor& out) {
  const char* op = "swiglu_forward";
  const float* gate_up_data = f32(gate_up, op, "gate_up");
  float* out_data = f32(out, op, "out");
  const int64_t width = swiglu_width(gate_up, out, op, "out");
  const int64_t rows = gate_up.size(0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up_data + r * 2 * width;  // (I)
    const float* up = gate + width;                    // (I)
    for (int64_t j = 0; j < width; ++j) {
      const float silu = gate[j] / (1.0f + std::exp(-gate[j]));
      out_data[r * width + j] = silu * up[j];
    }
  }
}

void CpuBackend::swiglu_backward(const Tensor& dout, const Tensor& gate_up,
                                 const Tensor& dgate_up) {
  const char* op = "swiglu_backward";
  const float* dout_data = f32(dout, op, "dout");
  const float* gate_up_data = f32(gate_up, op, "gate_up");
  float* dgate_up_data = f32(dgate_up, op, "dgate_up");
  const int64_t width = swiglu_width(gate_up, dout, op, "dout");
  expect_shape(dgate_up, gate_up.shape, op, "dgate_up");
  const int64_t rows = gate_up.size(0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up_data + r * 2 * width;
    const float* up = gate + width;
    float* dgate = dgate_up_data + r * 2 * width;
    float* dup = dgate + width;
    for (int64_t j = 0; j < width; ++j) {
      const float g = gate[j], u = up[j], d = dout_data[r * width + j];
      const float sigmoid = 1.0f / (1.0f + std::exp(-g));
      const float silu = g * sigmoid;
      // d silu / dg = sigmoid * (1 + g * (1 - sigmoid))
      dgate[j] = d * u * sigmoid * (1.0f + g * (1.0f - sigmoid));
      dup[j] = d * silu;
    }
  }
}

}  // namespace moetune::cpu
