// CPU optimizer ops: the gradient norm, and two AdamW steps against the textbook formula
// in double (decoupled weight decay, bias correction, grad_scale), with and without an
// fp32 master copy of a bf16 parameter.
#include <cmath>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

TEST(OpsOptim, GradNormSquared) {
  auto backend = make_cpu_backend();
  HostF32 a = HostF32::random({3, 4}, 71), b = HostF32::random({5}, 72);
  HostF32 out({1}, 123.0f);  // overwritten
  const Tensor grads[] = {a.tensor(), b.tensor()};
  backend->grad_norm_squared(grads, out.tensor());
  double expected = 0.0;
  for (float value : a.values) expected += static_cast<double>(value) * value;
  for (float value : b.values) expected += static_cast<double>(value) * value;
  EXPECT_NEAR(out[0], expected, 1e-6 * expected);
}

// Reference AdamW state for one element, in double.
struct ReferenceAdamW {
  double param, exp_avg = 0.0, exp_avg_sq = 0.0;
  void step(double grad, const AdamWHyper& hyper, double weight_decay) {
    param *= 1.0 - hyper.lr * weight_decay;
    exp_avg = hyper.beta1 * exp_avg + (1.0 - hyper.beta1) * grad;
    exp_avg_sq = hyper.beta2 * exp_avg_sq + (1.0 - hyper.beta2) * grad * grad;
    const double exp_avg_hat = exp_avg / (1.0 - std::pow(hyper.beta1, hyper.step));
    const double exp_avg_sq_hat = exp_avg_sq / (1.0 - std::pow(hyper.beta2, hyper.step));
    param -= hyper.lr * exp_avg_hat / (std::sqrt(exp_avg_sq_hat) + hyper.eps);
  }
};

TEST(OpsOptim, AdamWTwoStepsMatchTheFormula) {
  auto backend = make_cpu_backend();
  const int64_t count = 7;
  HostF32 decayed = HostF32::random({count}, 73), plain = HostF32::random({count}, 74);
  HostF32 decayed_grad = HostF32::random({count}, 75), plain_grad = HostF32::random({count}, 76);
  HostF32 m1({count}), v1({count}), m2({count}), v2({count});
  std::vector<ReferenceAdamW> ref_decayed, ref_plain;
  for (int64_t i = 0; i < count; ++i) {
    ref_decayed.push_back({decayed[i]});
    ref_plain.push_back({plain[i]});
  }
  AdamWParam params[2];
  params[0] = {decayed.tensor(), decayed_grad.tensor(), m1.tensor(), v1.tensor(), Tensor(), 0.1f};
  params[1] = {plain.tensor(), plain_grad.tensor(), m2.tensor(), v2.tensor(), Tensor(), 0.0f};
  AdamWHyper hyper;
  hyper.lr = 0.01;
  hyper.beta1 = 0.8;
  hyper.beta2 = 0.95;
  hyper.eps = 1e-6;
  const float grad_scale = 0.5f;
  for (int64_t step = 1; step <= 2; ++step) {
    hyper.step = step;
    backend->adamw_update(params, hyper, grad_scale);
    for (int64_t i = 0; i < count; ++i) {
      ref_decayed[i].step(decayed_grad[i] * 0.5, hyper, 0.1f);
      ref_plain[i].step(plain_grad[i] * 0.5, hyper, 0.0);
      EXPECT_NEAR(decayed[i], ref_decayed[i].param, 1e-6) << "step " << step << " i " << i;
      EXPECT_NEAR(plain[i], ref_plain[i].param, 1e-6) << "step " << step << " i " << i;
      EXPECT_NEAR(m1[i], ref_decayed[i].exp_avg, 1e-7);
      EXPECT_NEAR(v1[i], ref_decayed[i].exp_avg_sq, 1e-7);
    }
    // new gradients for the second step (in place: params[] points at these vectors)
    const std::vector<float> next_decayed = random_floats(count, 77);
    const std::vector<float> next_plain = random_floats(count, 78);
    std::copy(next_decayed.begin(), next_decayed.end(), decayed_grad.values.begin());
    std::copy(next_plain.begin(), next_plain.end(), plain_grad.values.begin());
  }
}

TEST(OpsOptim, AdamWMasterWeightsRoundIntoBf16Param) {
  auto backend = make_cpu_backend();
  const int64_t count = 5;
  HostF32 master = HostF32::random({count}, 79), grad = HostF32::random({count}, 80);
  HostF32 m({count}), v({count});
  std::vector<uint16_t> param(count);
  Tensor param_tensor(param.data(), DType::BF16, Shape{count});
  backend->copy(param_tensor, master.tensor());
  HostF32 expected = master, m_ref({count}), v_ref({count});  // same update on a plain fp32
  AdamWHyper hyper;
  AdamWParam with_master{param_tensor, grad.tensor(),   m.tensor(),
                         v.tensor(),   master.tensor(), 0.01f};
  AdamWParam plain{expected.tensor(), grad.tensor(), m_ref.tensor(),
                   v_ref.tensor(),    Tensor(),      0.01f};
  backend->adamw_update(std::span(&with_master, 1), hyper, 1.0f);
  backend->adamw_update(std::span(&plain, 1), hyper, 1.0f);
  EXPECT_EQ(master.values, expected.values);
  for (int64_t i = 0; i < count; ++i) EXPECT_EQ(param[i], float_to_bf16(master[i]));

  hyper.step = 0;
  EXPECT_THROW(backend->adamw_update(std::span(&plain, 1), hyper, 1.0f), Error);
}

}  // namespace
}  // namespace moetune::testing
