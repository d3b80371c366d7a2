// Hopper grouped GEMMs (src/ops/cuda/grouped_gemm_sm90.cu) against a float64 host reference
// on awkward routings (experts with 0, 1, 127, 129 rows, rows outside every expert) and
// shapes (N, K multiples of 8 but not of the 128x128x64 tile), with fresh random inputs,
// outputs poisoned before each run, and rows of no expert checked untouched. Skipped on
// devices other than sm_90 (where the launchers decline and the WMMA kernels run).
//
// DISABLED_Qwen3Shapes is the microbenchmark (run with --gtest_also_run_disabled_tests
// --gtest_filter='*Qwen3*'): the Qwen3-30B-A3B expert GEMMs (32768 rows, 128 experts) with
// balanced and skewed routing, sm90 vs the WMMA fallback vs a cuBLAS dense GEMM of the same
// (M, N, K) total, in TFLOP/s (median of event-timed runs).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "gpu_test_util.h"
#include "ops/backend.h"
#include "ops/cuda/device_memory.h"
#include "ops/cuda/grouped_gemm_sm90.h"

namespace moetune {
namespace {

#define CHECK_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// A bf16 device tensor with its host copy (as floats, exactly the bf16 values).
struct DeviceBf16 {
  Buffer device;
  std::vector<float> host;
  Tensor t() const { return device.tensor(); }
};

class GroupedGemmSm90 : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing::hopper_gpu()) GTEST_SKIP() << "not an sm_90 device";
    backend_ = make_cuda_backend(0);  // registers the device allocator
    cuda::set_allocation_stream(
        nullptr);  // no zero-fill on the backend's stream: we sync ourselves
  }

  DeviceBf16 upload(Shape shape, std::vector<float> values) {
    std::vector<uint16_t> bits(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      bits[i] = float_to_bf16(values[i]);
      values[i] = bf16_to_float(bits[i]);
    }
    DeviceBf16 out{Buffer(DType::BF16, shape, Device::CUDA), std::move(values)};
    if (!bits.empty()) {
      EXPECT_EQ(cudaMemcpy(out.device.data(), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice),
                cudaSuccess);
    }
    return out;
  }
  DeviceBf16 random(Shape shape, float scale = 1.0f) {
    std::uniform_real_distribution<float> dist(-scale, scale);
    std::vector<float> values(shape.numel());
    for (auto& v : values) v = dist(rng_);
    return upload(shape, std::move(values));
  }
  Buffer offsets_tensor(const std::vector<int32_t>& offsets) {
    Buffer out(DType::I32, Shape{static_cast<int64_t>(offsets.size())}, Device::CUDA);
    EXPECT_EQ(cudaMemcpy(out.data(), offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
    return out;
  }
  static std::vector<float> download(const Buffer& buffer) {
    std::vector<uint16_t> bits(buffer.numel());
    EXPECT_EQ(cudaMemcpy(bits.data(), buffer.data(), bits.size() * 2, cudaMemcpyDeviceToHost),
              cudaSuccess);
    std::vector<float> out(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_float(bits[i]);
    return out;
  }
  // ||out - ref|| / ||ref|| over the elements where `checked`; elements not checked must equal
  // `untouched` exactly (bitwise via float compare; NaN never passes).
  static void expect_close(const std::vector<float>& out, const std::vector<double>& ref,
                           const std::vector<bool>& checked, const std::vector<float>& untouched,
                           const char* what) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < out.size(); ++i) {
      if (checked[i]) {
        ASSERT_TRUE(std::isfinite(out[i])) << what << ": element " << i << " is " << out[i];
        diff += (out[i] - ref[i]) * (out[i] - ref[i]);
        norm += ref[i] * ref[i];
      } else {
        ASSERT_EQ(out[i], untouched[i])
            << what << ": element " << i << " outside every expert was written";
      }
    }
    const double relative = std::sqrt(diff / std::max(norm, 1e-30));
    EXPECT_LT(relative, 8e-3) << what;
  }

  // Forward (transpose_w) or data grad through the sm90 launcher vs float64 on the host.
  void check_row_grouped(const std::vector<int32_t>& counts, int64_t first_row, int64_t rows,
                         int64_t n, int64_t k, bool transpose_w) {
    const int64_t experts = static_cast<int64_t>(counts.size());
    std::vector<int32_t> offsets(experts + 1, static_cast<int32_t>(first_row));
    for (int64_t e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
    ASSERT_LE(offsets[experts], rows);
    Buffer offsets_device = offsets_tensor(offsets);
    DeviceBf16 a = random(Shape{rows, k});
    DeviceBf16 w =
        transpose_w ? random(Shape{experts, n, k}, 0.2f) : random(Shape{experts, k, n}, 0.2f);
    DeviceBf16 c = upload(Shape{rows, n},
                          std::vector<float>(rows * n, 7.0f));  // poison: 7 outside, checked inside
    ASSERT_TRUE(cuda::launch_grouped_gemm_sm90(a.t(), w.t(), transpose_w, offsets_device.tensor(),
                                               c.t(), nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<double> ref(rows * n, 0.0);
    std::vector<bool> checked(rows * n, false);
    for (int64_t e = 0; e < experts; ++e)
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
        for (int64_t j = 0; j < n; ++j) {
          double sum = 0.0;
          for (int64_t i = 0; i < k; ++i)
            sum += double(a.host[r * k + i]) *
                   (transpose_w ? w.host[(e * n + j) * k + i] : w.host[(e * k + i) * n + j]);
          ref[r * n + j] = sum;
          checked[r * n + j] = true;
        }
    expect_close(download(c.device), ref, checked, c.host, transpose_w ? "forward" : "data grad");
  }

  // dw[e] += dy[R_e]^T @ x[R_e] through the sm90 launcher vs float64 on the host.
  void check_weight_grad(const std::vector<int32_t>& counts, int64_t first_row, int64_t rows,
                         int64_t p, int64_t q) {
    const int64_t experts = static_cast<int64_t>(counts.size());
    std::vector<int32_t> offsets(experts + 1, static_cast<int32_t>(first_row));
    for (int64_t e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
    Buffer offsets_device = offsets_tensor(offsets);
    DeviceBf16 dy = random(Shape{rows, p});
    DeviceBf16 x = random(Shape{rows, q});
    DeviceBf16 dw = random(Shape{experts, p, q}, 4.0f);  // accumulated into
    ASSERT_TRUE(cuda::launch_grouped_gemm_weight_grad_sm90(dy.t(), x.t(), offsets_device.tensor(),
                                                           dw.t(), nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<double> ref(experts * p * q);
    std::vector<bool> checked(ref.size(), true);
    for (int64_t e = 0; e < experts; ++e)
      for (int64_t i = 0; i < p; ++i)
        for (int64_t j = 0; j < q; ++j) {
          double sum = dw.host[(e * p + i) * q + j];
          for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
            sum += double(dy.host[r * p + i]) * x.host[r * q + j];
          ref[(e * p + i) * q + j] = sum;
        }
    expect_close(download(dw.device), ref, checked, dw.host, "weight grad");
  }

  std::unique_ptr<Backend> backend_;
  std::mt19937 rng_{20261121};
};

// Experts with 0 and 1 rows, counts around the 128-row tile, rows before and after the experts.
const std::vector<int32_t> kAwkwardCounts = {300, 0, 1, 129, 128, 77, 0, 127, 256, 3};

TEST_F(GroupedGemmSm90, ForwardAwkwardShapes) {
  check_row_grouped(kAwkwardCounts, 5, 1021 + 5 + 9, 136, 264, true);  // N, K not tile multiples
  check_row_grouped({64, 0, 200}, 0, 264, 256, 128, true);             // tile-multiple N, K
  check_row_grouped({1, 1, 1, 1}, 0, 4, 8, 8, true);                   // smallest aligned dims
}

TEST_F(GroupedGemmSm90, DataGradAwkwardShapes) {
  check_row_grouped(kAwkwardCounts, 5, 1021 + 5 + 9, 264, 136, false);
  check_row_grouped({0, 333, 0}, 0, 333, 72, 520, false);
}

TEST_F(GroupedGemmSm90, WeightGradAwkwardShapes) {
  check_weight_grad(kAwkwardCounts, 5, 1021 + 5 + 9, 136, 264);
  check_weight_grad({0, 1000, 2, 0}, 0, 1002, 200, 72);
  check_weight_grad({0, 0}, 0, 16, 64, 64);  // every expert empty: dw unchanged
}

TEST_F(GroupedGemmSm90, DeclinesWhatItCannotTake) {
  Buffer offsets = offsets_tensor({0, 4});
  DeviceBf16 a = random(Shape{4, 12}), w = random(Shape{1, 16, 12}), c = random(Shape{4, 16});
  EXPECT_FALSE(cuda::launch_grouped_gemm_sm90(a.t(), w.t(), true, offsets.tensor(), c.t(), nullptr))
      << "K = 12 is not a multiple of 8";
  Buffer f32_a(DType::F32, Shape{4, 16}, Device::CUDA),
      f32_w(DType::F32, Shape{1, 16, 16}, Device::CUDA),
      f32_c(DType::F32, Shape{4, 16}, Device::CUDA);
  EXPECT_FALSE(cuda::launch_grouped_gemm_sm90(f32_a, f32_w, true, offsets.tensor(), f32_c, nullptr))
      << "fp32";
}

// ---- microbenchmark ----------------------------------------------------------------------

struct BenchCase {
  const char* name;
  int kind;      // 0 forward (a @ w^T), 1 data grad (a @ w), 2 weight grad
  int64_t n, k;  // output columns and inner dim (weight grad: P, Q)
};

// Event-timed median (ms) of `repeat` runs after `warmup`.
template <class F>
double median_ms(cudaStream_t stream, F&& run, int warmup = 3, int repeat = 15) {
  for (int i = 0; i < warmup; ++i) run();
  std::vector<float> times;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < repeat; ++i) {
    cudaEventRecord(start, stream);
    run();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

std::vector<int32_t> routing_counts(int64_t rows, int experts, bool skewed, std::mt19937& rng) {
  std::vector<double> weight(experts, 1.0);
  if (skewed) {  // log-normal expert popularity (sigma 1): a few hot experts, some near-empty
    std::normal_distribution<double> normal(0.0, 1.0);
    for (auto& v : weight) v = std::exp(normal(rng));
  }
  double total = 0;
  for (double v : weight) total += v;
  std::vector<int32_t> counts(experts);
  int64_t assigned = 0;
  for (int e = 0; e < experts; ++e)
    assigned += counts[e] = static_cast<int32_t>(rows * weight[e] / total);
  for (int64_t i = 0; assigned < rows; ++i, ++assigned) ++counts[i % experts];
  return counts;
}

TEST_F(GroupedGemmSm90, DISABLED_Qwen3Shapes) {
  const int experts = 128;
  const int64_t rows = 32768, hidden = 2048, width = 768;
  const BenchCase cases[] = {
      {"fwd gate_up", 0, 2 * width, hidden},   {"fwd down", 0, hidden, width},
      {"dgrad down", 1, width, hidden},        {"dgrad gate_up", 1, hidden, 2 * width},
      {"wgrad gate_up", 2, 2 * width, hidden}, {"wgrad down", 2, hidden, width},
  };
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t cublas;
  ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
  cublasSetStream(cublas, stream);

  // Random bf16 buffers big enough for every case (filled on the device: no huge uploads).
  auto device_random = [&](int64_t count) {
    Buffer buffer(DType::BF16, Shape{count}, Device::CUDA);
    cuda::fill_normal(buffer.tensor(), 1.0f, rng_());
    return buffer;
  };
  Buffer act = device_random(rows * hidden), act2 = device_random(rows * hidden);
  Buffer out = device_random(rows * hidden), out_ref = device_random(rows * hidden);
  Buffer weights = device_random(experts * 2 * width * hidden);
  Buffer dw = device_random(experts * 2 * width * hidden),
         dw_ref = device_random(experts * 2 * width * hidden);
  CHECK_CUDA(cudaDeviceSynchronize());

  // ||x - y|| / ||y|| over `count` bf16 elements on the device.
  auto relative_difference = [](const void* x, const void* y, int64_t count) {
    std::vector<uint16_t> a(count), b(count);
    cudaMemcpy(a.data(), x, count * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(b.data(), y, count * 2, cudaMemcpyDeviceToHost);
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < count; ++i) {
      const double u = bf16_to_float(a[i]), v = bf16_to_float(b[i]);
      diff += (u - v) * (u - v);
      norm += v * v;
    }
    return std::sqrt(diff / std::max(norm, 1e-30));
  };

  // Dense peak on random data, for reference.
  {
    const int64_t s = 8192;
    Buffer x = device_random(s * s), y = device_random(s * s), z = device_random(s * s);
    const float one = 1.0f, zero = 0.0f;
    const double ms = median_ms(stream, [&] {
      cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, s, s, s, &one, y.data(), CUDA_R_16BF, s,
                   x.data(), CUDA_R_16BF, s, &zero, z.data(), CUDA_R_16BF, s, CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT);
    });
    std::printf("dense cuBLAS bf16 8192^3: %.3f ms, %.0f TFLOP/s\n", ms,
                2.0 * s * s * s / ms / 1e9);
  }

  std::printf("%-14s %-8s %9s %9s %9s %9s %9s %9s %8s\n", "gemm", "routing", "sm90 ms", "TFLOP/s",
              "wmma ms", "TFLOP/s", "dense ms", "TFLOP/s", "rel diff");
  for (bool skewed : {false, true}) {
    const std::vector<int32_t> counts = routing_counts(rows, experts, skewed, rng_);
    std::vector<int32_t> offsets(experts + 1, 0);
    for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
    Buffer offsets_device = offsets_tensor(offsets);
    const Tensor off = offsets_device.tensor();
    for (const BenchCase& c : cases) {
      const double flops = 2.0 * rows * c.n * c.k;
      Tensor a, w, y, y_ref;
      int64_t dense_m = rows, dense_n = c.n, dense_k = c.k, compared = 0;
      if (c.kind < 2) {
        a = Tensor(act.data(), DType::BF16, Shape{rows, c.k}, Device::CUDA);
        w = c.kind == 0
                ? Tensor(weights.data(), DType::BF16, Shape{experts, c.n, c.k}, Device::CUDA)
                : Tensor(weights.data(), DType::BF16, Shape{experts, c.k, c.n}, Device::CUDA);
        y = Tensor(out.data(), DType::BF16, Shape{rows, c.n}, Device::CUDA);
        y_ref = Tensor(out_ref.data(), DType::BF16, Shape{rows, c.n}, Device::CUDA);
        compared = rows * c.n;
      } else {
        a = Tensor(act.data(), DType::BF16, Shape{rows, c.n}, Device::CUDA);   // dy (rows, P)
        w = Tensor(act2.data(), DType::BF16, Shape{rows, c.k}, Device::CUDA);  // x (rows, Q)
        y = Tensor(dw.data(), DType::BF16, Shape{experts, c.n, c.k}, Device::CUDA);
        y_ref = Tensor(dw_ref.data(), DType::BF16, Shape{experts, c.n, c.k}, Device::CUDA);
        dense_m = c.n, dense_n = c.k, dense_k = rows;
        compared = experts * c.n * c.k;
      }
      auto run_sm90 = [&](const Tensor& target) {
        const bool taken =
            c.kind < 2 ? cuda::launch_grouped_gemm_sm90(a, w, c.kind == 0, off, target, stream)
                       : cuda::launch_grouped_gemm_weight_grad_sm90(a, w, off, target, stream);
        ASSERT_TRUE(taken);
      };
      auto run_wmma = [&](const Tensor& target) {
        if (c.kind < 2)
          cuda::launch_grouped_gemm_wmma(a, w, c.kind == 0, off, target, stream);
        else
          cuda::launch_grouped_gemm_weight_grad_wmma(a, w, off, target, stream);
      };
      // Same result from both (weight grads from the same starting dw: zero both first).
      if (c.kind == 2) {
        cudaMemsetAsync(y.data, 0, y.bytes(), stream);
        cudaMemsetAsync(y_ref.data, 0, y_ref.bytes(), stream);
      }
      run_sm90(y);
      run_wmma(y_ref);
      CHECK_CUDA(cudaStreamSynchronize(stream));
      CHECK_CUDA(cudaGetLastError());
      const double difference = relative_difference(y.data, y_ref.data, compared);
      const double sm90_ms = median_ms(stream, [&] { run_sm90(y); });
      const double wmma_ms = median_ms(stream, [&] { run_wmma(y_ref); });
      const float one = 1.0f, zero = 0.0f;
      // Dense row-major C (M, N) = A (M, K) @ B (N, K)^T over the same buffers (values irrelevant).
      const double dense_ms = median_ms(stream, [&] {
        cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, dense_n, dense_m, dense_k, &one,
                     weights.data(), CUDA_R_16BF, dense_k, dense_m == rows ? act.data() : dw.data(),
                     CUDA_R_16BF, dense_k, &zero, out_ref.data(), CUDA_R_16BF, dense_n,
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      });
      CHECK_CUDA(cudaGetLastError());
      std::printf("%-14s %-8s %9.3f %9.0f %9.3f %9.0f %9.3f %9.0f %8.1e\n", c.name,
                  skewed ? "skewed" : "balanced", sm90_ms, flops / sm90_ms / 1e9, wmma_ms,
                  flops / wmma_ms / 1e9, dense_ms, flops / dense_ms / 1e9, difference);
      EXPECT_LT(difference, 1e-2) << c.name;
    }
  }
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace moetune
