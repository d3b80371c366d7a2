// CPU backend dense ops: gemm in all transpose combinations against a naive triple loop,
// add/bias/embedding/SwiGLU forward against formulas and backward against central
// differences, copy's dtype conversions, and the clear errors for bad inputs.
#include <cmath>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

TEST(OpsDense, GemmMatchesNaiveInAllTransposes) {
  auto backend = make_cpu_backend();
  const int64_t m = 5, k = 7, n = 3;
  for (bool transpose_a : {false, true}) {
    for (bool transpose_b : {false, true}) {
      HostF32 a = HostF32::random(transpose_a ? Shape{k, m} : Shape{m, k}, 1);
      HostF32 b = HostF32::random(transpose_b ? Shape{n, k} : Shape{k, n}, 2);
      HostF32 c = HostF32::random({m, n}, 3);
      const std::vector<float> c_before = c.values;
      const float alpha = 0.5f, beta = -2.0f;
      backend->gemm(a.tensor(), transpose_a, b.tensor(), transpose_b, c.tensor(), alpha, beta);
      std::vector<float> expected(m * n);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double sum = 0.0;
          for (int64_t p = 0; p < k; ++p) {
            const float a_ip = transpose_a ? a[p * m + i] : a[i * k + p];
            const float b_pj = transpose_b ? b[j * k + p] : b[p * n + j];
            sum += static_cast<double>(a_ip) * b_pj;
          }
          expected[i * n + j] = static_cast<float>(alpha * sum + beta * c_before[i * n + j]);
        }
      expect_close("gemm", c.values, expected);
    }
  }
}

TEST(OpsDense, GemmRejectsMismatchedShapesAndBf16) {
  auto backend = make_cpu_backend();
  HostF32 a({2, 3}), b({4, 2}), c({2, 2});
  EXPECT_THROW(backend->gemm(a.tensor(), false, b.tensor(), false, c.tensor()), Error);
  std::vector<uint16_t> bf16(6);
  Tensor a_bf16(bf16.data(), DType::BF16, Shape{2, 3});
  HostF32 b_ok({3, 2});
  try {
    backend->gemm(a_bf16, false, b_ok.tensor(), false, c.tensor());
    FAIL() << "bf16 input accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("'a'"), std::string::npos) << error.what();
  }
}

TEST(OpsDense, AddAndBias) {
  auto backend = make_cpu_backend();
  HostF32 a = HostF32::random({3, 4}, 4), b = HostF32::random({3, 4}, 5), out({3, 4});
  backend->add(out.tensor(), a.tensor(), b.tensor());
  for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i], a[i] + b[i]);

  HostF32 x = a, bias = HostF32::random({4}, 6);
  backend->add_bias(x.tensor(), bias.tensor());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(x[i], a[i] + bias[i % 4]);

  HostF32 dbias({4}, 1.0f);  // accumulates
  backend->bias_backward(b.tensor(), dbias.tensor());
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(dbias[j], 1.0f + b[j] + b[4 + j] + b[8 + j], 1e-6f);
}

TEST(OpsDense, EmbeddingForwardBackward) {
  auto backend = make_cpu_backend();
  HostF32 table = HostF32::random({6, 3}, 7);
  HostI32 ids({5}, {4, 0, 4, 5, 1});
  HostF32 out({5, 3});
  backend->embedding_forward(ids.tensor(), table.tensor(), out.tensor());
  for (int n = 0; n < 5; ++n)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(out[n * 3 + j], table[ids[n] * 3 + j]);

  HostF32 weights = HostF32::random({5, 3}, 8);
  HostF32 dtable({6, 3});
  backend->embedding_backward(ids.tensor(), weights.tensor(), dtable.tensor());
  expect_gradient("embedding dtable", table.values, dtable.values, [&] {
    backend->embedding_forward(ids.tensor(), table.tensor(), out.tensor());
    return weighted_sum(out.values, weights.values);
  });

  HostI32 bad({1}, {6});
  HostF32 one({1, 3});
  EXPECT_THROW(backend->embedding_forward(bad.tensor(), table.tensor(), one.tensor()), Error);
}

TEST(OpsDense, SwigluForwardAndGradient) {
  auto backend = make_cpu_backend();
  const int64_t rows = 3, width = 5;
  HostF32 gate_up = HostF32::random({rows, 2 * width}, 9, 3.0f), out({rows, width});
  backend->swiglu_forward(gate_up.tensor(), out.tensor());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) {
      const double g = gate_up[r * 2 * width + j], u = gate_up[r * 2 * width + width + j];
      EXPECT_NEAR(out[r * width + j], g / (1.0 + std::exp(-g)) * u, 1e-6);
    }
  HostF32 weights = HostF32::random({rows, width}, 10);
  HostF32 dgate_up({rows, 2 * width});
  backend->swiglu_backward(weights.tensor(), gate_up.tensor(), dgate_up.tensor());
  expect_gradient("swiglu dgate_up", gate_up.values, dgate_up.values, [&] {
    backend->swiglu_forward(gate_up.tensor(), out.tensor());
    return weighted_sum(out.values, weights.values);
  });
}

TEST(OpsDense, CopyConvertsFloatTypes) {
  auto backend = make_cpu_backend();
  HostF32 source({4}, std::vector<float>{1.0f, -2.5f, 1.0f + std::ldexp(1.0f, -8), 3.0f});
  std::vector<uint16_t> bf16(4), f16(4);
  Tensor bf16_tensor(bf16.data(), DType::BF16, Shape{2, 2});  // shapes may differ, counts not
  Tensor f16_tensor(f16.data(), DType::F16, Shape{4});
  backend->copy(bf16_tensor, source.tensor());
  backend->copy(f16_tensor, bf16_tensor);  // bf16 -> f16 through fp32
  for (int i = 0; i < 4; ++i) EXPECT_EQ(bf16[i], float_to_bf16(source[i]));
  HostF32 back({4});
  backend->copy(back.tensor(), f16_tensor);
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], -2.5f);
  EXPECT_EQ(back[2], 1.0f);  // the bf16 tie rounded to even
  EXPECT_EQ(back[3], 3.0f);
}

TEST(OpsDense, CopyAndFillErrors) {
  auto backend = make_cpu_backend();
  HostF32 a({3}), b({4});
  EXPECT_THROW(backend->copy(a.tensor(), b.tensor()), Error);
  HostI32 ids({3});
  EXPECT_THROW(backend->copy(ids.tensor(), a.tensor()), Error);
  backend->fill(a.tensor(), 2.5f);
  for (float value : a.values) EXPECT_EQ(value, 2.5f);
  backend->fill(ids.tensor(), 7.0f);
  for (int32_t value : ids.values) EXPECT_EQ(value, 7);
}

}  // namespace
}  // namespace moetune::testing
