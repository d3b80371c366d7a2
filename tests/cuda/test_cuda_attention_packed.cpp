// Document-masked attention (packed rows) on the GPU: bf16 runs cuDNN's variable-length
// (ragged THD) flash attention, fp32 the reference kernels. Checked three ways on awkward
// packings (1-token documents, a document filling its row, a row of many short documents,
// a document count that is not a power of two so empty sequence slots are present):
//  1. against the CPU reference op (forward out and lse, backward dq, dk, dv);
//  2. packed rows against each document run as its own row (no mask) on the GPU;
//  3. timing: packed attention on a 4096-token row must cost about what the unmasked causal
//     attention costs (the O(T^2) fallback is ~100x slower), printed and bounded at 4x.
// Also attention_cached_forward (generation) against the CPU reference.
// Tolerances as test_cuda_ops.cpp: max |gpu - ref| / max |ref|, fp32 1e-4, bf16 2e-2 forward
// and 3e-2 backward.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "ops/backend.h"

namespace moetune {
namespace {

float round_to(DType dtype, float value) {
  return dtype == DType::BF16 ? bf16_to_float(float_to_bf16(value)) : value;
}

class PackedAttention : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    cpu_ = make_cpu_backend();
    gpu_ = make_cuda_backend(0);
  }
  DType dt() const { return GetParam(); }
  double fwd_tol() const { return dt() == DType::BF16 ? 2e-2 : 1e-4; }
  double bwd_tol() const { return dt() == DType::BF16 ? 3e-2 : 1e-4; }

  // Host fp32 values rounded to the GPU dtype.
  std::vector<float> random(int64_t count) {
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    std::vector<float> values(static_cast<size_t>(count));
    for (float& v : values) v = round_to(dt(), dist(rng_));
    return values;
  }
  Buffer upload(const std::vector<float>& values, Shape shape, DType dtype) {
    Buffer buffer(dtype, shape, Device::CUDA);
    gpu_->copy(buffer, Tensor(const_cast<float*>(values.data()), DType::F32, shape));
    return buffer;
  }
  Buffer upload_ints(const std::vector<int32_t>& values) {
    const Shape shape{static_cast<int64_t>(values.size())};
    Buffer buffer(DType::I32, shape, Device::CUDA);
    gpu_->copy(buffer, Tensor(const_cast<int32_t*>(values.data()), DType::I32, shape));
    return buffer;
  }
  Buffer poisoned(Shape shape, DType dtype) {
    Buffer buffer(dtype, shape, Device::CUDA);
    gpu_->fill(buffer, std::numeric_limits<float>::quiet_NaN());
    return buffer;
  }
  std::vector<float> download(const Buffer& buffer) {
    std::vector<float> values(static_cast<size_t>(buffer.numel()));
    gpu_->copy(Tensor(values.data(), DType::F32, buffer.shape()), buffer);
    return values;
  }
  // max |actual - expected| / max(max |expected|, floor) <= tolerance
  static void expect_close(const std::vector<float>& actual, const std::vector<float>& expected,
                           double tolerance, const std::string& what, double floor = 1e-12) {
    ASSERT_EQ(actual.size(), expected.size()) << what;
    double max_diff = 0, max_ref = floor;
    for (size_t i = 0; i < actual.size(); ++i) {
      ASSERT_TRUE(std::isfinite(actual[i])) << what << ": element " << i << " is " << actual[i];
      max_diff = std::max(max_diff, std::abs(double(actual[i]) - expected[i]));
      max_ref = std::max(max_ref, std::abs(double(expected[i])));
    }
    EXPECT_LE(max_diff / max_ref, tolerance) << what << " (max |ref| " << max_ref << ")";
  }

  std::unique_ptr<Backend> cpu_, gpu_;
  std::mt19937 rng_{77};
};

struct PackCase {
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  std::vector<int32_t> doc_lengths;  // row by row; each row's lengths sum to seq
};

// The packings under test (each row's documents sum to the row length).
std::vector<PackCase> pack_cases() {
  return {
      // 1-token documents at both ends, a middle one; a second row filled by one document
      {2, 200, 8, 2, 64, {1, 50, 1, 147, 1, 200}},
      // many short documents (11: 16 sequence slots, 5 of them empty), D = 128, Hq = Hkv
      {1, 96, 4, 4, 128, {3, 9, 1, 17, 8, 8, 2, 20, 12, 15, 1}},
      // three rows, GQA 4:1, awkward row length
      {3, 77, 4, 1, 32, {77, 40, 37, 1, 1, 75}},
  };
}

std::vector<int32_t> offsets_of(const std::vector<int32_t>& lengths) {
  std::vector<int32_t> offsets{0};
  for (int32_t length : lengths) offsets.push_back(offsets.back() + length);
  return offsets;
}

TEST_P(PackedAttention, MatchesCpuAndSeparateRows) {
  for (const PackCase& c : pack_cases()) {
    SCOPED_TRACE("B " + std::to_string(c.batch) + " T " + std::to_string(c.seq) + " D " +
                 std::to_string(c.head_dim));
    const int64_t B = c.batch, T = c.seq, Hq = c.q_heads, Hkv = c.kv_heads, D = c.head_dim;
    const Shape q_shape{B, T, Hq, D}, kv_shape{B, T, Hkv, D}, lse_shape{B, Hq, T};
    const std::vector<int32_t> offsets = offsets_of(c.doc_lengths);
    ASSERT_EQ(offsets.back(), B * T);
    const float scale = 1.0f / std::sqrt(float(D));
    std::vector<float> q = random(q_shape.numel()), k = random(kv_shape.numel()),
                       v = random(kv_shape.numel()), dout = random(q_shape.numel());

    // GPU, packed
    Buffer gq = upload(q, q_shape, dt()), gk = upload(k, kv_shape, dt()),
           gv = upload(v, kv_shape, dt()), gdout = upload(dout, q_shape, dt());
    Buffer docs = upload_ints(offsets);
    Buffer go = poisoned(q_shape, dt()), glse = poisoned(lse_shape, DType::F32);
    gpu_->attention_forward(gq, gk, gv, scale, docs, go, glse);
    Buffer gdq = poisoned(q_shape, dt()), gdk = poisoned(kv_shape, dt()),
           gdv = poisoned(kv_shape, dt());
    gpu_->attention_backward(gdout, gq, gk, gv, go, glse, scale, docs, gdq, gdk, gdv);
    const std::vector<float> out = download(go), lse = download(glse), dq = download(gdq),
                             dk = download(gdk), dv = download(gdv);

    // 1. the CPU reference (its backward uses the GPU's forward output, as training does)
    std::vector<float> ref_out(q.size()), ref_lse(static_cast<size_t>(lse_shape.numel()));
    std::vector<float> ref_dq(q.size()), ref_dk(k.size()), ref_dv(v.size());
    auto host = [](std::vector<float>& values, Shape shape) {
      return Tensor(values.data(), DType::F32, shape);
    };
    std::vector<int32_t> host_offsets = offsets;
    const Tensor cpu_docs(host_offsets.data(), DType::I32, {int64_t(offsets.size())});
    cpu_->attention_forward(host(q, q_shape), host(k, kv_shape), host(v, kv_shape), scale, cpu_docs,
                            host(ref_out, q_shape), host(ref_lse, lse_shape));
    expect_close(out, ref_out, fwd_tol(), "packed out vs cpu");
    expect_close(lse, ref_lse, fwd_tol(), "packed lse vs cpu");
    std::vector<float> gpu_out = out, gpu_lse = lse;
    cpu_->attention_backward(host(dout, q_shape), host(q, q_shape), host(k, kv_shape),
                             host(v, kv_shape), host(gpu_out, q_shape), host(gpu_lse, lse_shape),
                             scale, cpu_docs, host(ref_dq, q_shape), host(ref_dk, kv_shape),
                             host(ref_dv, kv_shape));
    expect_close(dq, ref_dq, bwd_tol(), "packed dq vs cpu");
    expect_close(dk, ref_dk, bwd_tol(), "packed dk vs cpu");
    expect_close(dv, ref_dv, bwd_tol(), "packed dv vs cpu");

    // 2. each document alone as one row (B = 1, T = its length, no mask) on the GPU. A
    // 1-token document's dq and dk are 0 up to rounding, so errors are relative to the
    // largest element of the whole packed tensor.
    auto largest = [](const std::vector<float>& values) {
      double m = 0;
      for (float x : values) m = std::max(m, double(std::abs(x)));
      return m;
    };
    for (size_t d = 0; d + 1 < offsets.size(); ++d) {
      const int64_t begin = offsets[d], length = offsets[d + 1] - offsets[d];
      const int64_t row = begin / T, t0 = begin % T;
      auto slice = [&](const std::vector<float>& values, int64_t heads) {
        return std::vector<float>(values.begin() + begin * heads * D,
                                  values.begin() + (begin + length) * heads * D);
      };
      const Shape dq_shape{1, length, Hq, D}, dkv_shape{1, length, Hkv, D};
      Buffer sq = upload(slice(q, Hq), dq_shape, dt()), sk = upload(slice(k, Hkv), dkv_shape, dt()),
             sv = upload(slice(v, Hkv), dkv_shape, dt()),
             sdout = upload(slice(dout, Hq), dq_shape, dt());
      Buffer so = poisoned(dq_shape, dt()), slse = poisoned(Shape{1, Hq, length}, DType::F32);
      gpu_->attention_forward(sq, sk, sv, scale, Tensor(), so, slse);
      Buffer sdq = poisoned(dq_shape, dt()), sdk = poisoned(dkv_shape, dt()),
             sdv = poisoned(dkv_shape, dt());
      gpu_->attention_backward(sdout, sq, sk, sv, so, slse, scale, Tensor(), sdq, sdk, sdv);
      const std::string what = "document " + std::to_string(d) + " (length " +
                               std::to_string(length) + ") alone vs packed ";
      expect_close(slice(out, Hq), download(so), fwd_tol(), what + "out");
      std::vector<float> packed_lse;
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t t = 0; t < length; ++t) packed_lse.push_back(lse[(row * Hq + h) * T + t0 + t]);
      expect_close(packed_lse, download(slse), fwd_tol(), what + "lse");
      expect_close(slice(dq, Hq), download(sdq), bwd_tol(), what + "dq", largest(dq));
      expect_close(slice(dk, Hkv), download(sdk), bwd_tol(), what + "dk", largest(dk));
      expect_close(slice(dv, Hkv), download(sdv), bwd_tol(), what + "dv", largest(dv));
    }
  }
}

// Forward + backward time of a (1, 4096, 32, 4, 128) row packed as 8 documents vs unmasked.
TEST_P(PackedAttention, PackedCostsAboutUnmasked) {
  if (dt() != DType::BF16) GTEST_SKIP() << "fp32 runs the reference kernels";
  const int64_t T = 4096, Hq = 32, Hkv = 4, D = 128;
  const Shape q_shape{1, T, Hq, D}, kv_shape{1, T, Hkv, D};
  Buffer q = upload(random(q_shape.numel()), q_shape, dt());
  Buffer k = upload(random(kv_shape.numel()), kv_shape, dt());
  Buffer v = upload(random(kv_shape.numel()), kv_shape, dt());
  Buffer dout = upload(random(q_shape.numel()), q_shape, dt());
  Buffer o(dt(), q_shape, Device::CUDA), lse(DType::F32, {1, Hq, T}, Device::CUDA);
  Buffer dq(dt(), q_shape, Device::CUDA), dk(dt(), kv_shape, Device::CUDA),
      dv(dt(), kv_shape, Device::CUDA);
  Buffer docs = upload_ints({0, 300, 1000, 1001, 1800, 2600, 3000, 3900, 4096});
  auto seconds = [&](const Tensor& doc_offsets) {
    for (int warmup = 0; warmup < 2; ++warmup) {
      gpu_->attention_forward(q, k, v, 0.088f, doc_offsets, o, lse);
      gpu_->attention_backward(dout, q, k, v, o, lse, 0.088f, doc_offsets, dq, dk, dv);
    }
    gpu_->synchronize();
    const auto start = std::chrono::steady_clock::now();
    const int runs = 5;
    for (int run = 0; run < runs; ++run) {
      gpu_->attention_forward(q, k, v, 0.088f, doc_offsets, o, lse);
      gpu_->attention_backward(dout, q, k, v, o, lse, 0.088f, doc_offsets, dq, dk, dv);
    }
    gpu_->synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / runs;
  };
  const double unmasked = seconds(Tensor()), packed = seconds(docs);
  std::printf(
      "attention fwd+bwd (1, 4096, 32/4 heads, 128): unmasked %.3f ms, 8 documents %.3f ms\n",
      unmasked * 1e3, packed * 1e3);
  EXPECT_LT(packed, 4 * unmasked) << "packed rows did not take the cuDNN path";
}

// Generation attention: queries at the end of a KV cache, against the CPU reference.
TEST_P(PackedAttention, CachedAttentionMatchesCpu) {
  struct Case {
    int64_t n, past, capacity, q_heads, kv_heads, head_dim;
  };
  for (const Case& c :
       {Case{1, 0, 4, 4, 2, 24}, Case{1, 37, 64, 8, 2, 128}, Case{13, 0, 13, 4, 4, 64},
        Case{5, 200, 300, 16, 4, 256}, Case{3, 1, 9, 6, 1, 40}}) {
    SCOPED_TRACE("n " + std::to_string(c.n) + " past " + std::to_string(c.past));
    const Shape q_shape{c.n, c.q_heads, c.head_dim},
        cache_shape{c.capacity, c.kv_heads, c.head_dim};
    std::vector<float> q = random(q_shape.numel()), k = random(cache_shape.numel()),
                       v = random(cache_shape.numel()), ref(q.size());
    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    cpu_->attention_cached_forward(Tensor(q.data(), DType::F32, q_shape),
                                   Tensor(k.data(), DType::F32, cache_shape),
                                   Tensor(v.data(), DType::F32, cache_shape), c.past, scale,
                                   Tensor(ref.data(), DType::F32, q_shape));
    Buffer gq = upload(q, q_shape, dt()), gk = upload(k, cache_shape, dt()),
           gv = upload(v, cache_shape, dt()), go = poisoned(q_shape, dt());
    gpu_->attention_cached_forward(gq, gk, gv, c.past, scale, go);
    expect_close(download(go), ref, fwd_tol(), "attention_cached_forward");
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, PackedAttention, ::testing::Values(DType::F32, DType::BF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace moetune
