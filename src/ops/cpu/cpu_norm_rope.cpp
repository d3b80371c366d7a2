// CPU RMSNorm (plain and fused with the residual add) and rotary position embedding.
// RMSNorm follows Transformers' LlamaRMSNorm/Qwen3RMSNorm in fp32:
//   var = mean(x^2); normed = x * rsqrt(var + eps); out = weight * normed
// (the mean is accumulated in double, then rounded to fp32 like torch's result).
// RoPE follows HF rotate_half: the angle is position * inv_freq in fp32, cos/sin in fp32,
//   out[i] = x[i] cos - x[i + D/2] sin,  out[i + D/2] = x[i + D/2] cos + x[i] sin.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/cpu_backend.h"

namespace moetune::cpu {

namespace {

// Rows and width of an RMSNorm over the last dimension, after checking the shapes.
struct NormShape {
  int64_t rows = 0;
  int64_t width = 0;
};

NormShape norm_shape(const Tensor& x, const Tensor& weight, const Tensor& rstd, const char* op) {
  if (x.rank() < 1 || weight.rank() != 1 || x.size(-1) != weight.size(0))
    fail(op, ": weight ", weight.shape.str(), " does not match the last dimension of x ",
         x.shape.str());
  NormShape shape;
  shape.width = weight.size(0);
  shape.rows = shape.width ? x.numel() / shape.width : 0;
  if (rstd.numel() != shape.rows)
    fail(op, ": rstd ", rstd.shape.str(), " must hold one value per row (", shape.rows, ")");
  return shape;
}

// out = weight * (x * rstd) for each row; rstd saved.
void rmsnorm_rows(const float* x, const float* weight, float eps, NormShape shape, float* out,
                  float* rstd) {
  for (int64_t r = 0; r < shape.rows; ++r) {
    const float* row = x + r * shape.width;  // (D)
    double sum_squares = 0.0;
    for (int64_t j = 0; j < shape.width; ++j) sum_squares += static_cast<double>(row[j]) * row[j];
    const float variance = static_cast<float>(sum_squares / static_cast<double>(shape.width));
    const float inv_rms = 1.0f / std::sqrt(variance + eps);
    rstd[r] = inv_rms;
    for (int64_t j = 0; j < shape.width; ++j) {
      const float normed = row[j] * inv_rms;
      out[r * shape.width + j] = weight[j] * normed;
    }
  }
}

}  // namespace

void CpuBackend::rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps,
                                 const Tensor& out, const Tensor& rstd) {
  const char* op = "rmsnorm_forward";
  const float* x_data = f32(x, op, "x");
  const float* weight_data = f32(weight, op, "weight");
  float* out_data = f32(out, op, "out");
  float* rstd_data = f32(rstd, op, "rstd");
  expect_shape(out, x.shape, op, "out");
  rmsnorm_rows(x_data, weight_data, eps, norm_shape(x, weight, rstd, op), out_data, rstd_data);
}

void CpuBackend::add_rmsnorm_forward(const Tensor& residual, const Tensor& delta,
                                     const Tensor& weight, float eps, const Tensor& out,
                                     const Tensor& rstd) {
  const char* op = "add_rmsnorm_forward";
  float* residual_data = f32(residual, op, "residual");
  const float* delta_data = f32(delta, op, "delta");
  const float* weight_data = f32(weight, op, "weight");
  float* out_data = f32(out, op, "out");
  float* rstd_data = f32(rstd, op, "rstd");
  expect_shape(delta, residual.shape, op, "delta");
  expect_shape(out, residual.shape, op, "out");
  const NormShape shape = norm_shape(residual, weight, rstd, op);
  const int64_t count = residual.numel();
  for (int64_t i = 0; i < count; ++i) residual_data[i] += delta_data[i];
  rmsnorm_rows(residual_data, weight_data, eps, shape, out_data, rstd_data);
}

void CpuBackend::rmsnorm_backward(const Tensor& dout, const Tensor& x, const Tensor& weight,
                                  const Tensor& rstd, const Tensor& dx, const Tensor& dweight,
                                  bool accumulate_dx, bool accumulate_dweight) {
  const char* op = "rmsnorm_backward";
  const float* dout_data = f32(dout, op, "dout");
  const float* x_data = f32(x, op, "x");
  const float* weight_data = f32(weight, op, "weight");
  const float* rstd_data = f32(rstd, op, "rstd");
  float* dx_data = f32(dx, op, "dx");
  float* dweight_data = f32(dweight, op, "dweight");
  expect_shape(dout, x.shape, op, "dout");
  expect_shape(dx, x.shape, op, "dx");
  expect_shape(dweight, weight.shape, op, "dweight");
  const NormShape shape = norm_shape(x, weight, rstd, op);
  const int64_t width = shape.width;

  // y = w * x * r with r = (mean(x^2) + eps)^-1/2:
  //   dweight += (or =) sum_rows dy * x * r
  //   dx = r * (dy*w - x * r^2 * mean(dy*w*x))
  std::vector<double> dweight_sums(width, 0.0);
  for (int64_t r = 0; r < shape.rows; ++r) {
    const float* dy = dout_data + r * width;
    const float* row = x_data + r * width;
    const float inv_rms = rstd_data[r];
    double dot = 0.0;  // sum_j dy_j * w_j * x_j
    for (int64_t j = 0; j < width; ++j) {
      dot += static_cast<double>(dy[j]) * weight_data[j] * row[j];
      dweight_sums[j] += static_cast<double>(dy[j]) * row[j] * inv_rms;
    }
    const float correction =
        static_cast<float>(dot / static_cast<double>(width)) * inv_rms * inv_rms;
    float* d_row = dx_data + r * width;
    for (int64_t j = 0; j < width; ++j) {
      const float grad = inv_rms * (dy[j] * weight_data[j] - row[j] * correction);
      d_row[j] = accumulate_dx ? d_row[j] + grad : grad;
    }
  }
  for (int64_t j = 0; j < width; ++j)
    dweight_data[j] =
        static_cast<float>(dweight_sums[j]) + (accumulate_dweight ? dweight_data[j] : 0.0f);
}

namespace {

// Applies the rotation by angle sign * (position * inv_freq) to x (N, heads, D) in place.
// sign = -1 is the inverse rotation (the transpose), which is the backward pass.
void rotate(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, float sign,
            const char* op) {
  float* x_data = f32(x, op, "x");
  const int32_t* position_data = i32(positions, op, "positions");
  const float* inv_freq_data = f32(inv_freq, op, "inv_freq");
  if (x.rank() != 3 || x.size(2) % 2 != 0)
    fail(op, ": x must be (N, heads, D) with D even, got ", x.shape.str());
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), half = head_dim / 2;
  expect_shape(positions, Shape{tokens}, op, "positions");
  expect_shape(inv_freq, Shape{half}, op, "inv_freq");

  std::vector<float> cos_values(half), sin_values(half);
  for (int64_t n = 0; n < tokens; ++n) {
    const float position = static_cast<float>(position_data[n]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = inv_freq_data[i] * position;  // fp32, as HF's freqs
      cos_values[i] = std::cos(angle);
      sin_values[i] = sign * std::sin(angle);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* head = x_data + (n * heads + h) * head_dim;  // (D)
      for (int64_t i = 0; i < half; ++i) {
        const float first = head[i], second = head[i + half];
        head[i] = first * cos_values[i] - second * sin_values[i];
        head[i + half] = second * cos_values[i] + first * sin_values[i];
      }
    }
  }
}

}  // namespace

void CpuBackend::rope_forward(const Tensor& x, const Tensor& positions, const Tensor& inv_freq) {
  rotate(x, positions, inv_freq, 1.0f, "rope_forward");
}

void CpuBackend::rope_backward(const Tensor& dx, const Tensor& positions, const Tensor& inv_freq) {
  rotate(dx, positions, inv_freq, -1.0f, "rope_backward");
}

}  // namespace moetune::cpu
