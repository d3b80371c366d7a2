// CPU RMSNorm and RoPE: forward against the Transformers formulas written out here,
// backward against central differences; the fused residual add; rope_backward as the
// exact inverse rotation.
#include <cmath>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

TEST(OpsNorm, RmsnormForwardMatchesFormula) {
  auto backend = make_cpu_backend();
  const int64_t rows = 4, width = 7;
  const float eps = 1e-6f;
  HostF32 x = HostF32::random({2, 2, width}, 11, 2.0f);
  HostF32 weight = HostF32::random({width}, 12);
  HostF32 out({2, 2, width}), rstd({rows});
  backend->rmsnorm_forward(x.tensor(), weight.tensor(), eps, out.tensor(), rstd.tensor());
  std::vector<float> expected(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double mean_square = 0.0;
    for (int64_t j = 0; j < width; ++j) mean_square += x[r * width + j] * x[r * width + j];
    mean_square /= width;
    const double inv_rms = 1.0 / std::sqrt(mean_square + eps);
    EXPECT_NEAR(rstd[r], inv_rms, 1e-6 * inv_rms);
    for (int64_t j = 0; j < width; ++j)
      expected[r * width + j] = static_cast<float>(weight[j] * (x[r * width + j] * inv_rms));
  }
  expect_close("rmsnorm out", out.values, expected);
}

TEST(OpsNorm, RmsnormGradients) {
  auto backend = make_cpu_backend();
  const int64_t rows = 3, width = 5;
  const float eps = 1e-5f;
  HostF32 x = HostF32::random({rows, width}, 13, 2.0f);
  HostF32 weight = HostF32::random({width}, 14);
  HostF32 out({rows, width}), rstd({rows}), weights = HostF32::random({rows, width}, 15);
  auto loss = [&] {
    backend->rmsnorm_forward(x.tensor(), weight.tensor(), eps, out.tensor(), rstd.tensor());
    return weighted_sum(out.values, weights.values);
  };
  loss();
  HostF32 dx({rows, width}), dweight({width}, 0.25f);  // dweight accumulates
  backend->rmsnorm_backward(weights.tensor(), x.tensor(), weight.tensor(), rstd.tensor(),
                            dx.tensor(), dweight.tensor(), false);
  expect_gradient("rmsnorm dx", x.values, dx.values, loss);
  std::vector<float> dweight_only = dweight.values;
  for (float& value : dweight_only) value -= 0.25f;
  expect_gradient("rmsnorm dweight", weight.values, dweight_only, loss);

  // accumulate_dx adds to what is there
  HostF32 dx_acc({rows, width}, 1.0f), dweight2({width});
  backend->rmsnorm_backward(weights.tensor(), x.tensor(), weight.tensor(), rstd.tensor(),
                            dx_acc.tensor(), dweight2.tensor(), true);
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_FLOAT_EQ(dx_acc[i], dx[i] + 1.0f);
}

TEST(OpsNorm, AddRmsnormUpdatesResidual) {
  auto backend = make_cpu_backend();
  const int64_t rows = 3, width = 6;
  HostF32 residual = HostF32::random({rows, width}, 16), delta = HostF32::random({rows, width}, 17);
  HostF32 weight = HostF32::random({width}, 18);
  HostF32 sum({rows, width});
  backend->add(sum.tensor(), residual.tensor(), delta.tensor());
  HostF32 expected_out({rows, width}), expected_rstd({rows});
  backend->rmsnorm_forward(sum.tensor(), weight.tensor(), 1e-6f, expected_out.tensor(),
                           expected_rstd.tensor());
  HostF32 out({rows, width}), rstd({rows});
  backend->add_rmsnorm_forward(residual.tensor(), delta.tensor(), weight.tensor(), 1e-6f,
                               out.tensor(), rstd.tensor());
  EXPECT_EQ(residual.values, sum.values);
  EXPECT_EQ(out.values, expected_out.values);
  EXPECT_EQ(rstd.values, expected_rstd.values);
}

TEST(OpsNorm, RmsnormRejectsBadShapes) {
  auto backend = make_cpu_backend();
  HostF32 x({2, 4}), weight({3}), out({2, 4}), rstd({2});
  EXPECT_THROW(
      backend->rmsnorm_forward(x.tensor(), weight.tensor(), 1e-6f, out.tensor(), rstd.tensor()),
      Error);
}

// HF default inv_freq: 1 / base^(2i / D).
HostF32 default_inv_freq(int64_t head_dim, double base = 10000.0) {
  HostF32 inv_freq({head_dim / 2});
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = static_cast<float>(1.0 / std::pow(base, (2.0 * i) / head_dim));
  return inv_freq;
}

TEST(OpsRope, ForwardMatchesRotateHalf) {
  auto backend = make_cpu_backend();
  const int64_t tokens = 4, heads = 3, head_dim = 8, half = head_dim / 2;
  HostF32 x = HostF32::random({tokens, heads, head_dim}, 19);
  const std::vector<float> original = x.values;
  HostI32 positions({tokens}, {0, 3, 17, 1000});
  HostF32 inv_freq = default_inv_freq(head_dim);
  backend->rope_forward(x.tensor(), positions.tensor(), inv_freq.tensor());
  std::vector<float> expected(original.size());
  for (int64_t n = 0; n < tokens; ++n)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const float angle = inv_freq[i] * static_cast<float>(positions[n]);  // fp32, as HF
        const double c = std::cos(angle), s = std::sin(angle);
        const size_t base = (n * heads + h) * head_dim;
        expected[base + i] =
            static_cast<float>(original[base + i] * c - original[base + i + half] * s);
        expected[base + i + half] =
            static_cast<float>(original[base + i + half] * c + original[base + i] * s);
      }
  expect_close("rope", x.values, expected, 1e-6);
  // position 0 is the identity
  for (int64_t j = 0; j < heads * head_dim; ++j) EXPECT_EQ(x[j], original[j]);
}

TEST(OpsRope, BackwardIsTheInverseRotationAndMatchesFiniteDifferences) {
  auto backend = make_cpu_backend();
  const int64_t tokens = 3, heads = 2, head_dim = 6;
  HostF32 x = HostF32::random({tokens, heads, head_dim}, 20);
  HostI32 positions({tokens}, {5, 1, 42});
  HostF32 inv_freq = default_inv_freq(head_dim);
  HostF32 weights = HostF32::random({tokens, heads, head_dim}, 21);

  HostF32 round_trip = x;
  backend->rope_forward(round_trip.tensor(), positions.tensor(), inv_freq.tensor());
  backend->rope_backward(round_trip.tensor(), positions.tensor(), inv_freq.tensor());
  expect_close("rope inverse", round_trip.values, x.values, 1e-6);

  HostF32 dx = weights;  // the gradient of sum(rope(x) * R) is rope_backward(R)
  backend->rope_backward(dx.tensor(), positions.tensor(), inv_freq.tensor());
  expect_gradient("rope dx", x.values, dx.values, [&] {
    HostF32 y = x;
    backend->rope_forward(y.tensor(), positions.tensor(), inv_freq.tensor());
    return weighted_sum(y.values, weights.values);
  });
}

}  // namespace
}  // namespace moetune::testing
