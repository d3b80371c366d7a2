// Helpers for the CPU op tests (tests/test_ops_*.cpp): host tensors backed by
// std::vector, the weighted-sum loss L = sum(out * R) in double, and a central-difference
// gradient check that perturbs every element of one input.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/tensor.h"
#include "ops/backend.h"
#include "test_util.h"

namespace moetune::testing {

// A host F32 tensor that owns its values.
struct HostF32 {
  Shape shape;
  std::vector<float> values;

  HostF32() = default;
  HostF32(Shape shape_, std::vector<float> values_) : shape(shape_), values(std::move(values_)) {}
  explicit HostF32(Shape shape_, float fill = 0.0f)
      : shape(shape_), values(static_cast<size_t>(shape_.numel()), fill) {}
  static HostF32 random(Shape shape, unsigned seed, float scale = 1.0f) {
    return HostF32(shape, random_floats(static_cast<size_t>(shape.numel()), seed, scale));
  }
  Tensor tensor() { return Tensor(values.data(), DType::F32, shape); }
  float& operator[](size_t i) { return values[i]; }
  float operator[](size_t i) const { return values[i]; }
  size_t size() const { return values.size(); }
};

// A host I32 tensor that owns its values.
struct HostI32 {
  Shape shape;
  std::vector<int32_t> values;

  HostI32() = default;
  HostI32(Shape shape_, std::vector<int32_t> values_) : shape(shape_), values(std::move(values_)) {}
  explicit HostI32(Shape shape_) : shape(shape_), values(static_cast<size_t>(shape_.numel()), 0) {}
  Tensor tensor() { return Tensor(values.data(), DType::I32, shape); }
  int32_t& operator[](size_t i) { return values[i]; }
  size_t size() const { return values.size(); }
};

// sum(out * weights) accumulated in double.
inline double weighted_sum(const std::vector<float>& out, const std::vector<float>& weights) {
  double sum = 0.0;
  for (size_t i = 0; i < out.size(); ++i) sum += static_cast<double>(out[i]) * weights[i];
  return sum;
}

// Central differences of `loss` with respect to every element of `input` (restored after),
// compared with `analytic` by the per-tensor relative error (max abs diff / max abs).
inline void expect_gradient(const char* what, std::vector<float>& input,
                            const std::vector<float>& analytic, const std::function<double()>& loss,
                            float eps = 1e-3f, double tolerance = 1e-2) {
  ASSERT_EQ(input.size(), analytic.size()) << what;
  std::vector<float> numeric(input.size());
  for (size_t i = 0; i < input.size(); ++i) {
    const float saved = input[i];
    input[i] = saved + eps;
    const double plus = loss();
    input[i] = saved - eps;
    const double minus = loss();
    input[i] = saved;
    numeric[i] = static_cast<float>((plus - minus) / (2.0 * static_cast<double>(eps)));
  }
  const double error = relative_error(analytic.data(), numeric.data(), analytic.size());
  EXPECT_LT(error, tolerance) << what << ": analytic vs central-difference gradient";
  double largest = 0.0;
  for (float value : numeric) largest = std::max(largest, static_cast<double>(std::abs(value)));
  EXPECT_GT(largest, 0.0) << what << ": the gradient is zero everywhere (test is vacuous)";
}

// Element-wise closeness with a tolerance relative to the largest magnitude of expected.
inline void expect_close(const char* what, const std::vector<float>& actual,
                         const std::vector<float>& expected, double tolerance = 1e-5) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  EXPECT_LT(relative_error(actual.data(), expected.data(), actual.size()), tolerance) << what;
}

}  // namespace moetune::testing
