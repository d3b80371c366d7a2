// Every CUDA op against the CPU reference backend, in fp32 and bf16, on awkward shapes:
// experts with zero tokens and with one token, sizes that are not multiples of the kernel
// tiles, GQA, document masks, ignored labels. Inputs are drawn at random and rounded to the
// tested dtype, so both backends see the same values; the CPU computes in fp32.
// Outputs on the GPU are poisoned (NaN) first, so an unwritten element fails the test.
// Tolerances (max |gpu - cpu| / max |cpu| per tensor): fp32 1e-4 (summation order, atomics);
// bf16 2e-2 forward and 3e-2 backward (bf16 storage of outputs and intermediates, ~2^-8).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "ops/backend.h"

namespace moetune {
namespace {

float round_to(DType dtype, float value) {
  return dtype == DType::BF16 ? bf16_to_float(float_to_bf16(value)) : value;
}

// One tensor on both backends: the CPU copy in fp32, the GPU copy in `dtype`.
struct Dual {
  Buffer cpu, gpu;
  Tensor c() const { return cpu.tensor(); }
  Tensor g() const { return gpu.tensor(); }
};

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    cpu_ = make_cpu_backend();
    gpu_ = make_cuda_backend(0);
  }
  DType dt() const { return GetParam(); }
  bool bf16() const { return GetParam() == DType::BF16; }
  double fwd_tol() const { return bf16() ? 2e-2 : 1e-4; }
  double bwd_tol() const { return bf16() ? 3e-2 : 1e-4; }

  Dual& make(Shape shape, DType gpu_dtype, const std::vector<float>& values) {
    auto dual = std::make_unique<Dual>();
    dual->cpu = Buffer(DType::F32, shape, Device::CPU);
    dual->gpu = Buffer(gpu_dtype, shape, Device::CUDA);
    for (int64_t i = 0; i < shape.numel(); ++i)
      dual->cpu.ptr<float>()[i] = round_to(gpu_dtype, values[i]);
    if (shape.numel()) gpu_->copy(dual->gpu, dual->cpu);
    keep_.push_back(std::move(dual));
    return *keep_.back();
  }
  // Random values in [-scale, scale), rounded to the GPU dtype.
  Dual& random(Shape shape, float scale = 1.0f, DType gpu_dtype = DType::F32,
               bool use_param = true) {
    std::uniform_real_distribution<float> dist(-scale, scale);
    std::vector<float> values(shape.numel());
    for (auto& v : values) v = dist(rng_);
    return make(shape, use_param ? dt() : gpu_dtype, values);
  }
  Dual& random_f32(Shape shape, float scale = 1.0f) {
    return random(shape, scale, DType::F32, false);
  }
  // An output: zeros on the CPU, NaN on the GPU (so unwritten elements show).
  Dual& output(Shape shape, DType gpu_dtype) {
    Dual& dual = make(shape, gpu_dtype, std::vector<float>(shape.numel(), 0.0f));
    if (shape.numel()) gpu_->fill(dual.g(), std::numeric_limits<float>::quiet_NaN());
    return dual;
  }
  Dual& out(Shape shape) { return output(shape, dt()); }
  Dual& out_f32(Shape shape) { return output(shape, DType::F32); }
  Dual& zeros(Shape shape, DType gpu_dtype) {
    return make(shape, gpu_dtype, std::vector<float>(shape.numel(), 0.0f));
  }
  Dual& ints(Shape shape, const std::vector<int32_t>& values) {
    auto dual = std::make_unique<Dual>();
    dual->cpu = Buffer(DType::I32, shape, Device::CPU);
    dual->gpu = Buffer(DType::I32, shape, Device::CUDA);
    for (int64_t i = 0; i < shape.numel(); ++i) dual->cpu.ptr<int32_t>()[i] = values[i];
    if (shape.numel()) gpu_->copy(dual->gpu, dual->cpu);
    keep_.push_back(std::move(dual));
    return *keep_.back();
  }
  Dual& int_out(Shape shape) { return ints(shape, std::vector<int32_t>(shape.numel(), -7)); }

  std::vector<float> gpu_values(const Dual& dual) {
    Buffer host(DType::F32, dual.gpu.shape(), Device::CPU);
    gpu_->copy(host, dual.gpu);
    return std::vector<float>(host.ptr<float>(), host.ptr<float>() + host.numel());
  }
  // max |gpu - cpu| <= tolerance * max(max |cpu|, scale_floor).
  void expect_close(const Dual& dual, double tolerance, const char* what,
                    double scale_floor = 1e-12) {
    const std::vector<float> actual = gpu_values(dual);
    const float* expected = dual.cpu.ptr<float>();
    double max_diff = 0.0, max_ref = scale_floor;
    for (size_t i = 0; i < actual.size(); ++i) {
      ASSERT_TRUE(std::isfinite(actual[i])) << what << ": element " << i << " is " << actual[i];
      max_diff = std::max(max_diff, std::abs(double(actual[i]) - expected[i]));
      max_ref = std::max(max_ref, std::abs(double(expected[i])));
    }
    EXPECT_LE(max_diff / max_ref, tolerance)
        << what << " (" << dtype_name(dt()) << ", max |ref| " << max_ref << ")";
  }
  // Defined beside the RMSNorm tests that call it.
  void check_rmsnorm(int64_t d, int64_t rows);
  // Defined beside the AdamW tests that call it.
  void check_multi_tensor_adamw(const std::vector<int64_t>& sizes, int64_t step,
                                const std::function<float(size_t)>& decay_of, float grad_scale);
  void expect_ints_equal(const Dual& dual, const char* what) {
    Buffer host(DType::I32, dual.gpu.shape(), Device::CPU);
    gpu_->copy(host, dual.gpu);
    for (int64_t i = 0; i < host.numel(); ++i)
      ASSERT_EQ(host.ptr<int32_t>()[i], dual.cpu.ptr<int32_t>()[i]) << what << " at " << i;
  }

  std::unique_ptr<Backend> cpu_, gpu_;
  std::vector<std::unique_ptr<Dual>> keep_;
  std::mt19937 rng_{1234};
};

TEST_P(CudaOps, Gemm) {
  struct Case {
    int64_t m, n, k;
    bool ta, tb;
    float alpha, beta;
  };
  for (const Case& c : {Case{1, 1, 1, false, false, 1, 0}, Case{37, 53, 29, false, true, 1, 0},
                        Case{37, 53, 29, true, false, 0.5f, 1}, Case{64, 96, 136, true, true, 1, 0},
                        Case{130, 24, 40, false, false, 2, 0.5f}}) {
    Dual& a = c.ta ? random(Shape{c.k, c.m}) : random(Shape{c.m, c.k});
    Dual& b = c.tb ? random(Shape{c.n, c.k}) : random(Shape{c.k, c.n});
    Dual& out = random(Shape{c.m, c.n});
    cpu_->gemm(a.c(), c.ta, b.c(), c.tb, out.c(), c.alpha, c.beta);
    gpu_->gemm(a.g(), c.ta, b.g(), c.tb, out.g(), c.alpha, c.beta);
    expect_close(out, fwd_tol(), "gemm");
  }
}

TEST_P(CudaOps, ElementwiseAndEmbedding) {
  Dual& a = random(Shape{7, 13});
  Dual& b = random(Shape{7, 13});
  Dual& sum = out(Shape{7, 13});
  cpu_->add(sum.c(), a.c(), b.c());
  gpu_->add(sum.g(), a.g(), b.g());
  expect_close(sum, fwd_tol(), "add");
  Dual& bias = random(Shape{13});
  cpu_->add_bias(a.c(), bias.c());
  gpu_->add_bias(a.g(), bias.g());
  expect_close(a, fwd_tol(), "add_bias");
  Dual& dbias = random(Shape{13});
  cpu_->bias_backward(b.c(), dbias.c());
  gpu_->bias_backward(b.g(), dbias.g());
  expect_close(dbias, fwd_tol(), "bias_backward");

  Dual& ids = ints(Shape{6}, {3, 0, 3, 9, 3, 0});
  Dual& table = random(Shape{10, 24});
  Dual& rows = out(Shape{6, 24});
  cpu_->embedding_forward(ids.c(), table.c(), rows.c());
  gpu_->embedding_forward(ids.g(), table.g(), rows.g());
  expect_close(rows, fwd_tol(), "embedding_forward");
  Dual& drows = random(Shape{6, 24});
  cpu_->embedding_backward(ids.c(), drows.c(), table.c());
  gpu_->embedding_backward(ids.g(), drows.g(), table.g());
  expect_close(table, bwd_tol(), "embedding_backward");
}

// RMSNorm forward, the fused residual add and the backward in every accumulate mode on
// (rows, d): the GPU against the CPU.
void CudaOps::check_rmsnorm(int64_t d, int64_t rows) {
  Dual& x = random(Shape{rows, d}, 2.0f);
  Dual& w = random(Shape{d});
  Dual& y = out(Shape{rows, d});
  Dual& rstd = out_f32(Shape{rows});
  cpu_->rmsnorm_forward(x.c(), w.c(), 1e-6f, y.c(), rstd.c());
  gpu_->rmsnorm_forward(x.g(), w.g(), 1e-6f, y.g(), rstd.g());
  expect_close(y, fwd_tol(), "rmsnorm_forward");
  expect_close(rstd, fwd_tol(), "rmsnorm rstd");

  Dual& delta = random(Shape{rows, d});
  cpu_->add_rmsnorm_forward(x.c(), delta.c(), w.c(), 1e-5f, y.c(), rstd.c());
  gpu_->add_rmsnorm_forward(x.g(), delta.g(), w.g(), 1e-5f, y.g(), rstd.g());
  expect_close(x, fwd_tol(), "add_rmsnorm residual");
  expect_close(y, fwd_tol(), "add_rmsnorm out");
  expect_close(rstd, fwd_tol(), "add_rmsnorm rstd");

  // Width 1: x * rstd is +-1 whatever x, so dx is only the rounding left of a cancellation
  // (~1e-6 against terms of ~1): compared against a floor of 1e-2, as wider rows are.
  const double dx_floor = 1e-2;
  Dual& dy = random(Shape{rows, d});
  Dual& dx = random(Shape{rows, d});
  Dual& dw = random(Shape{d});
  cpu_->rmsnorm_backward(dy.c(), x.c(), w.c(), rstd.c(), dx.c(), dw.c(), true, true);
  gpu_->rmsnorm_backward(dy.g(), x.g(), w.g(), rstd.g(), dx.g(), dw.g(), true, true);
  expect_close(dx, bwd_tol(), "rmsnorm_backward dx (accumulate)", dx_floor);
  expect_close(dw, bwd_tol(), "rmsnorm_backward dweight (accumulate)");
  cpu_->rmsnorm_backward(dy.c(), x.c(), w.c(), rstd.c(), dx.c(), dw.c(), false, false);
  gpu_->rmsnorm_backward(dy.g(), x.g(), w.g(), rstd.g(), dx.g(), dw.g(), false, false);
  expect_close(dx, bwd_tol(), "rmsnorm_backward dx", dx_floor);
  expect_close(dw, bwd_tol(), "rmsnorm_backward dweight (overwrite)");
  cpu_->rmsnorm_backward(dy.c(), x.c(), w.c(), rstd.c(), dx.c(), dw.c(), false, true);
  gpu_->rmsnorm_backward(dy.g(), x.g(), w.g(), rstd.g(), dx.g(), dw.g(), false, true);
  expect_close(dx, bwd_tol(), "rmsnorm_backward dx (dweight accumulating)", dx_floor);
  expect_close(dw, bwd_tol(), "rmsnorm_backward dweight (accumulate, dx overwritten)");
}

TEST_P(CudaOps, RmsNormAndResidual) {
  // (d, rows): tiny rows; d not a multiple of the 16-byte vector (scalar path); Qwen3's q/k
  // norm rows (head_dim 128, more rows than the grid's warps); a hidden-size row; a row wider
  // than 8 warps' dweight rows fit in shared memory.
  const std::pair<int64_t, int64_t> shapes[] = {{40, 5},     {1000, 3},   {130, 77},
                                                {128, 9000}, {2048, 300}, {7168, 4}};
  for (const auto& [d, rows] : shapes) {
    SCOPED_TRACE("d " + std::to_string(d) + " rows " + std::to_string(rows));
    check_rmsnorm(d, rows);
    if (HasFailure()) return;
  }
}

TEST_P(CudaOps, Rope) {
  const int64_t n = 7, heads = 3, d = 16;
  Dual& x = random(Shape{n, heads, d});
  Dual& positions = ints(Shape{n}, {0, 1, 2, 5, 100, 4095, 3});
  std::vector<float> freq(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) freq[i] = std::pow(10000.0f, -2.0f * i / d);
  Dual& inv_freq = make(Shape{d / 2}, DType::F32, freq);
  cpu_->rope_forward(x.c(), positions.c(), inv_freq.c());
  gpu_->rope_forward(x.g(), positions.g(), inv_freq.g());
  expect_close(x, fwd_tol(), "rope_forward");
  Dual& dx = random(Shape{n, heads, d});
  cpu_->rope_backward(dx.c(), positions.c(), inv_freq.c());
  gpu_->rope_backward(dx.g(), positions.g(), inv_freq.g());
  expect_close(dx, bwd_tol(), "rope_backward");
}

TEST_P(CudaOps, SwiGlu) {
  Dual& gate_up = random(Shape{9, 2 * 21}, 3.0f);
  Dual& y = out(Shape{9, 21});
  cpu_->swiglu_forward(gate_up.c(), y.c());
  gpu_->swiglu_forward(gate_up.g(), y.g());
  expect_close(y, fwd_tol(), "swiglu_forward");
  Dual& dy = random(Shape{9, 21});
  Dual& dgu = out(Shape{9, 2 * 21});
  cpu_->swiglu_backward(dy.c(), gate_up.c(), dgu.c());
  gpu_->swiglu_backward(dy.g(), gate_up.g(), dgu.g());
  expect_close(dgu, bwd_tol(), "swiglu_backward");
}

// The tensor `shape` starting `offset` elements into t's storage: with an odd offset, a view
// whose data is not 16-byte aligned (the kernels' scalar fallbacks).
Tensor at_offset(const Tensor& t, int64_t offset, Shape shape) {
  return Tensor(static_cast<char*>(t.data) + offset * int64_t(dtype_size(t.dtype)), t.dtype, shape,
                t.device);
}

// The experts' SwiGLU backward with router weights, on awkward shapes (no rows, one row,
// widths that are not a multiple of the 16-byte vector, the model's 768) and unaligned views.
TEST_P(CudaOps, MoeSwigluBackward) {
  for (const auto& [rows, width] : {std::pair<int64_t, int64_t>{0, 8},
                                    {1, 1},
                                    {5, 3},
                                    {1000, 768},
                                    {4099, 100},
                                    {37, 1001},
                                    {64, 8}}) {
    SCOPED_TRACE(::testing::Message() << rows << " rows of width " << width);
    Dual& gate_up = random(Shape{rows, 2 * width}, 3.0f);
    Dual& dh = random(Shape{rows, width});
    Dual& row_weights = random_f32(Shape{rows, 1});
    Dual& dgu = out(Shape{rows, 2 * width});
    Dual& hidden = out(Shape{rows, width});
    Dual& drow = out_f32(Shape{rows, 1});
    cpu_->moe_swiglu_backward(dh.c(), gate_up.c(), row_weights.c(), dgu.c(), hidden.c(), drow.c());
    gpu_->moe_swiglu_backward(dh.g(), gate_up.g(), row_weights.g(), dgu.g(), hidden.g(), drow.g());
    expect_close(dgu, bwd_tol(), "moe_swiglu_backward dgate_up");
    expect_close(hidden, fwd_tol(), "moe_swiglu_backward weighted_hidden");
    expect_close(drow, bwd_tol(), "moe_swiglu_backward drow_weights");
  }
  // a view one element into its storage: not 16-byte aligned (the scalar kernel)
  const int64_t rows = 33, width = 64;
  Dual& gate_up = random(Shape{rows * 2 * width + 1}, 3.0f);
  Dual& dh = random(Shape{rows * width + 1});
  Dual& row_weights = random_f32(Shape{rows});
  Dual& dgu = zeros(Shape{rows * 2 * width + 1}, dt());  // the skipped first element: 0 on both
  Dual& hidden = zeros(Shape{rows * width + 1}, dt());
  Dual& drow = out_f32(Shape{rows});
  auto run = [&](Backend& backend, bool on_gpu) {
    auto at = [&](Dual& d, Shape shape) { return at_offset(on_gpu ? d.g() : d.c(), 1, shape); };
    backend.moe_swiglu_backward(at(dh, {rows, width}), at(gate_up, {rows, 2 * width}),
                                on_gpu ? row_weights.g() : row_weights.c(),
                                at(dgu, {rows, 2 * width}), at(hidden, {rows, width}),
                                on_gpu ? drow.g() : drow.c());
  };
  run(*cpu_, false);
  run(*gpu_, true);
  expect_close(dgu, bwd_tol(), "moe_swiglu_backward dgate_up (unaligned)");
  expect_close(hidden, fwd_tol(), "moe_swiglu_backward weighted_hidden (unaligned)");
  expect_close(drow, bwd_tol(), "moe_swiglu_backward drow_weights (unaligned)");
  EXPECT_THROW(gpu_->moe_swiglu_backward(dh.g(), gate_up.g(), row_weights.g(), dgu.g(), hidden.g(),
                                         drow.g()),
               Error);
}

// Every row split of the norm kernels: rows held in registers by 1 to 32 lanes with 4 or 8
// vectors each (forward; the backward: 1 to 256 threads, up to 8 warps, with 2 vectors each),
// 16-byte vectors or, for widths that are not a multiple of them, single elements, and the
// block/warp-per-row kernels past them. Rows beyond one wave of the grid (Qwen3's q-norm:
// 131,072 rows of 128; 4096 hidden-size rows, multi-warp row groups several times over), one
// row, odd row counts, 7168-wide rows.
TEST_P(CudaOps, RmsNormRowSplits) {
  const std::pair<int64_t, int64_t> shapes[] = {
      {128, 131072}, {128, 1},  {8, 33},   {24, 7},    {4, 1000},    {3, 11},   {1, 5},   {136, 45},
      {256, 19},     {1024, 9}, {1536, 5}, {2048, 37}, {2048, 4096}, {2056, 5}, {7168, 3}};
  for (const auto& [d, rows] : shapes) {
    SCOPED_TRACE("d " + std::to_string(d) + " rows " + std::to_string(rows));
    check_rmsnorm(d, rows);
    if (HasFailure()) return;
  }
}

// Views one element into their buffers (not 16-byte aligned), an fp32 delta added to a bf16
// residual, and fp32 weights: the norms' scalar paths; the same results twice in a row.
TEST_P(CudaOps, RmsNormUnalignedViewsAndMixedDtypes) {
  const int64_t d = 128, rows = 37, n = rows * d;
  const Shape shape{rows, d};
  Dual& x = random(Shape{n + 1}, 2.0f);
  Dual& w = random_f32(Shape{d});
  Dual& y = random(Shape{n + 1});
  Dual& rstd = out_f32(Shape{rows});
  cpu_->rmsnorm_forward(at_offset(x.c(), 1, shape), w.c(), 1e-6f, at_offset(y.c(), 1, shape),
                        rstd.c());
  gpu_->rmsnorm_forward(at_offset(x.g(), 1, shape), w.g(), 1e-6f, at_offset(y.g(), 1, shape),
                        rstd.g());
  expect_close(y, fwd_tol(), "rmsnorm_forward (offset view)");
  expect_close(rstd, fwd_tol(), "rmsnorm rstd (offset view)");

  Dual& delta = random_f32(Shape{rows, d});  // fp32 delta into an x of the tested dtype
  cpu_->add_rmsnorm_forward(at_offset(x.c(), 1, shape), delta.c(), w.c(), 1e-5f,
                            at_offset(y.c(), 1, shape), rstd.c());
  gpu_->add_rmsnorm_forward(at_offset(x.g(), 1, shape), delta.g(), w.g(), 1e-5f,
                            at_offset(y.g(), 1, shape), rstd.g());
  expect_close(x, fwd_tol(), "add_rmsnorm residual (offset view, fp32 delta)");
  expect_close(y, fwd_tol(), "add_rmsnorm out (offset view, fp32 delta)");

  Dual& dy = random(Shape{n + 1});
  Dual& dx = random(Shape{n + 1});
  Dual& dw = random_f32(Shape{d});
  cpu_->rmsnorm_backward(at_offset(dy.c(), 1, shape), at_offset(x.c(), 1, shape), w.c(), rstd.c(),
                         at_offset(dx.c(), 1, shape), dw.c(), true, true);
  gpu_->rmsnorm_backward(at_offset(dy.g(), 1, shape), at_offset(x.g(), 1, shape), w.g(), rstd.g(),
                         at_offset(dx.g(), 1, shape), dw.g(), true, true);
  expect_close(dx, bwd_tol(), "rmsnorm_backward dx (offset view)");
  expect_close(dw, bwd_tol(), "rmsnorm_backward dweight (offset view)");

  // Deterministic: the q-norm shape's dweight (summed over many blocks) twice, bit for bit.
  Dual& qx = random(Shape{131072 / 8, 128});
  Dual& qw = random(Shape{128});
  Dual& qy = out(Shape{131072 / 8, 128});
  Dual& qrstd = out_f32(Shape{131072 / 8});
  gpu_->rmsnorm_forward(qx.g(), qw.g(), 1e-6f, qy.g(), qrstd.g());
  Dual& qdx = out(Shape{131072 / 8, 128});
  Dual& qdw1 = out_f32(Shape{128});
  Dual& qdw2 = out_f32(Shape{128});
  gpu_->rmsnorm_backward(qy.g(), qx.g(), qw.g(), qrstd.g(), qdx.g(), qdw1.g(), false, false);
  gpu_->rmsnorm_backward(qy.g(), qx.g(), qw.g(), qrstd.g(), qdx.g(), qdw2.g(), false, false);
  EXPECT_EQ(gpu_values(qdw1), gpu_values(qdw2)) << "rmsnorm_backward dweight is not deterministic";
}

// (tokens, heads, head_dim): Qwen3-like q (4096 tokens: 8 heads per thread; 700: 2 or 4)
// and k (1 head per thread), heads not a multiple of the heads per thread (36, 12), half
// widths that are not a multiple of the 16-byte vector (12: bf16 takes single elements, fp32
// vectors; 5), one token, and an offset view (not 16-byte aligned). Positions up to 32767.
TEST_P(CudaOps, RopeShapes) {
  struct Case {
    int64_t n, heads, d, offset;
  };
  for (const Case& c :
       {Case{512, 32, 128, 0}, Case{512, 4, 128, 0}, Case{9, 12, 128, 0}, Case{1, 1, 128, 0},
        Case{6, 3, 24, 0}, Case{5, 2, 10, 0}, Case{11, 5, 64, 1}}) {
    SCOPED_TRACE("n " + std::to_string(c.n) + " heads " + std::to_string(c.heads) + " d " +
                 std::to_string(c.d) + " offset " + std::to_string(c.offset));
    const Shape shape{c.n, c.heads, c.d};
    std::vector<int32_t> pos(c.n);
    std::uniform_int_distribution<int32_t> pick(0, 32767);
    for (auto& p : pos) p = pick(rng_);
    Dual& positions = ints(Shape{c.n}, pos);
    std::vector<float> freq(c.d / 2);
    for (int64_t i = 0; i < c.d / 2; ++i) freq[i] = std::pow(1000000.0f, -2.0f * i / c.d);
    Dual& inv_freq = make(Shape{c.d / 2}, DType::F32, freq);
    Dual& x = random(Shape{shape.numel() + c.offset});
    cpu_->rope_forward(at_offset(x.c(), c.offset, shape), positions.c(), inv_freq.c());
    gpu_->rope_forward(at_offset(x.g(), c.offset, shape), positions.g(), inv_freq.g());
    expect_close(x, fwd_tol(), "rope_forward");
    cpu_->rope_backward(at_offset(x.c(), c.offset, shape), positions.c(), inv_freq.c());
    gpu_->rope_backward(at_offset(x.g(), c.offset, shape), positions.g(), inv_freq.g());
    expect_close(x, bwd_tol(), "rope_backward");
    if (HasFailure()) return;
  }
}

// (rows, width, offset): the MoE shape (routed tokens x 768), one row, widths that are not a
// multiple of the 16-byte vector, and offset views (not 16-byte aligned).
TEST_P(CudaOps, SwiGluShapes) {
  struct Case {
    int64_t rows, width, offset;
  };
  for (const Case& c : {Case{4099, 768, 0}, Case{1, 768, 0}, Case{7, 8, 0}, Case{5, 12, 0},
                        Case{3, 2, 0}, Case{17, 1000, 0}, Case{33, 768, 1}, Case{9, 21, 3}}) {
    SCOPED_TRACE("rows " + std::to_string(c.rows) + " width " + std::to_string(c.width) +
                 " offset " + std::to_string(c.offset));
    const Shape gu_shape{c.rows, 2 * c.width}, y_shape{c.rows, c.width};
    Dual& gate_up = random(Shape{gu_shape.numel() + c.offset}, 3.0f);
    Dual& y = random(Shape{y_shape.numel() + c.offset});
    cpu_->swiglu_forward(at_offset(gate_up.c(), c.offset, gu_shape),
                         at_offset(y.c(), c.offset, y_shape));
    gpu_->swiglu_forward(at_offset(gate_up.g(), c.offset, gu_shape),
                         at_offset(y.g(), c.offset, y_shape));
    expect_close(y, fwd_tol(), "swiglu_forward");
    Dual& dy = random(Shape{y_shape.numel() + c.offset});
    Dual& dgu = random(Shape{gu_shape.numel() + c.offset});
    cpu_->swiglu_backward(at_offset(dy.c(), c.offset, y_shape),
                          at_offset(gate_up.c(), c.offset, gu_shape),
                          at_offset(dgu.c(), c.offset, gu_shape));
    gpu_->swiglu_backward(at_offset(dy.g(), c.offset, y_shape),
                          at_offset(gate_up.g(), c.offset, gu_shape),
                          at_offset(dgu.g(), c.offset, gu_shape));
    expect_close(dgu, bwd_tol(), "swiglu_backward");
    if (HasFailure()) return;
  }
}

// B, T, Hq, Hkv, D, with or without document masks. bf16 with D % 8 == 0 and no masks runs
// cuDNN's flash attention; the rest the reference kernels.
TEST_P(CudaOps, Attention) {
  struct Case {
    int64_t b, t, hq, hkv, d;
    bool docs;
  };
  for (const Case& c :
       {Case{2, 37, 4, 2, 16, false}, Case{1, 1, 2, 1, 8, false}, Case{2, 20, 4, 4, 12, true},
        Case{2, 130, 8, 2, 64, false}, Case{1, 96, 4, 1, 128, false}}) {
    Dual& q = random(Shape{c.b, c.t, c.hq, c.d});
    Dual& k = random(Shape{c.b, c.t, c.hkv, c.d});
    Dual& v = random(Shape{c.b, c.t, c.hkv, c.d});
    Dual& o = out(Shape{c.b, c.t, c.hq, c.d});
    Dual& lse = out_f32(Shape{c.b, c.hq, c.t});
    Dual& doc_dual = ints(Shape{5}, {0, 7, 20, 21, 40});
    struct {
      Tensor cpu, gpu;
      Tensor c() const { return cpu; }
      Tensor g() const { return gpu; }
    } docs;
    if (c.docs) docs = {doc_dual.c(), doc_dual.g()};
    const float scale = 1.0f / std::sqrt(float(c.d));
    cpu_->attention_forward(q.c(), k.c(), v.c(), scale, docs.c(), o.c(), lse.c());
    gpu_->attention_forward(q.g(), k.g(), v.g(), scale, docs.g(), o.g(), lse.g());
    expect_close(o, fwd_tol(), "attention_forward out");
    expect_close(lse, fwd_tol(), "attention_forward lse");
    Dual& dout = random(Shape{c.b, c.t, c.hq, c.d});
    Dual& dq = out(q.cpu.shape());
    Dual& dk = out(k.cpu.shape());
    Dual& dv = out(v.cpu.shape());
    // Both backward passes use the GPU's forward output (bf16-rounded), as training does.
    gpu_->copy(o.cpu, o.gpu);
    gpu_->copy(lse.cpu, lse.gpu);
    cpu_->attention_backward(dout.c(), q.c(), k.c(), v.c(), o.c(), lse.c(), scale, docs.c(), dq.c(),
                             dk.c(), dv.c());
    gpu_->attention_backward(dout.g(), q.g(), k.g(), v.g(), o.g(), lse.g(), scale, docs.g(), dq.g(),
                             dk.g(), dv.g());
    expect_close(dq, bwd_tol(), "attention_backward dq");
    expect_close(dk, bwd_tol(), "attention_backward dk");
    expect_close(dv, bwd_tol(), "attention_backward dv");
  }
}

TEST_P(CudaOps, Router) {
  for (bool normalize : {true, false}) {
    const int64_t n = 33, e = 10, k = 3;
    Dual& logits = random(Shape{n, e}, 3.0f);
    Dual& probs = out_f32(Shape{n, e});
    Dual& ids = int_out(Shape{n, k});
    Dual& weights = out_f32(Shape{n, k});
    cpu_->router_forward(logits.c(), int(k), normalize, probs.c(), ids.c(), weights.c());
    gpu_->router_forward(logits.g(), int(k), normalize, probs.g(), ids.g(), weights.g());
    expect_close(probs, 1e-5, "router probs");
    expect_ints_equal(ids, "router topk_ids");
    expect_close(weights, 1e-5, "router topk_weights");
    Dual& dweights = random_f32(Shape{n, k});
    Dual& aux = random_f32(Shape{e});
    Dual& dlogits = out(Shape{n, e});
    cpu_->router_backward(dweights.c(), probs.c(), ids.c(), normalize, aux.c(), dlogits.c());
    gpu_->router_backward(dweights.g(), probs.g(), ids.g(), normalize, aux.g(), dlogits.g());
    expect_close(dlogits, bwd_tol(), "router_backward");
    Dual& counts = random_f32(Shape{e});
    Dual& sums = random_f32(Shape{e});
    cpu_->router_aux_stats(probs.c(), ids.c(), counts.c(), sums.c());
    gpu_->router_aux_stats(probs.g(), ids.g(), counts.g(), sums.g());
    expect_close(counts, 1e-6, "router_aux_stats counts");
    expect_close(sums, 1e-5, "router_aux_stats prob_sums");
  }
}

// Sort, gather, grouped GEMMs (both layouts, weight gradient), SwiGLU, combine: one MoE
// pass with an expert of zero tokens, one of a single token, and a large one (> 1 tile).
TEST_P(CudaOps, MoePipeline) {
  struct Case {
    int64_t n, hidden, width;
  };
  // hidden 16 and 20 take the thread-per-element gathers (rows narrower than a warp), 2056
  // and 40 the 16-byte vector path.
  for (const Case& c : {Case{150, 40, 24}, Case{9, 20, 12}, Case{1, 16, 8}, Case{64, 2056, 16}}) {
    const int64_t e = 5, k = 2;
    std::vector<int32_t> ids(c.n * k);
    for (int64_t t = 0; t < c.n; ++t) {
      ids[t * k] = 2;                                      // expert 2: every token
      ids[t * k + 1] = t == 0 ? 1 : (t % 3 == 0 ? 3 : 4);  // 1: one token; 0: none
    }
    Dual& topk_ids = ints(Shape{c.n, k}, ids);
    Dual& offsets = int_out(Shape{e + 1});
    Dual& sorted = int_out(Shape{c.n * k});
    Dual& slot_rows = int_out(Shape{c.n * k});
    cpu_->moe_sort_by_expert(topk_ids.c(), int(e), offsets.c(), sorted.c(), slot_rows.c());
    gpu_->moe_sort_by_expert(topk_ids.g(), int(e), offsets.g(), sorted.g(), slot_rows.g());
    expect_ints_equal(offsets, "expert_offsets");
    expect_ints_equal(sorted, "sorted_slots");
    expect_ints_equal(slot_rows, "slot_rows");

    const int64_t rows = c.n * k;
    Dual& x = random(Shape{c.n, c.hidden});
    Dual& xs = out(Shape{rows, c.hidden});
    cpu_->moe_gather(x.c(), sorted.c(), int(k), xs.c());
    gpu_->moe_gather(x.g(), sorted.g(), int(k), xs.g());
    expect_close(xs, fwd_tol(), "moe_gather");

    Dual& gate_up_w = random(Shape{e, 2 * c.width, c.hidden}, 0.3f);
    Dual& down_w = random(Shape{e, c.hidden, c.width}, 0.3f);
    Dual& gu = out(Shape{rows, 2 * c.width});
    cpu_->grouped_gemm(xs.c(), gate_up_w.c(), true, offsets.c(), gu.c());
    gpu_->grouped_gemm(xs.g(), gate_up_w.g(), true, offsets.g(), gu.g());
    expect_close(gu, fwd_tol(), "grouped_gemm (transpose_w)");
    Dual& act = out(Shape{rows, c.width});
    gpu_->copy(gu.cpu, gu.gpu);  // same rounded input for both
    cpu_->swiglu_forward(gu.c(), act.c());
    gpu_->swiglu_forward(gu.g(), act.g());
    Dual& y = out(Shape{rows, c.hidden});
    gpu_->copy(act.cpu, act.gpu);
    cpu_->grouped_gemm(act.c(), down_w.c(), true, offsets.c(), y.c());
    gpu_->grouped_gemm(act.g(), down_w.g(), true, offsets.g(), y.g());
    expect_close(y, fwd_tol(), "grouped_gemm down");

    Dual& weights = random_f32(Shape{c.n, k});
    Dual& combined = out(Shape{c.n, c.hidden});
    gpu_->copy(y.cpu, y.gpu);
    cpu_->moe_combine(y.c(), weights.c(), slot_rows.c(), combined.c());
    gpu_->moe_combine(y.g(), weights.g(), slot_rows.g(), combined.g());
    expect_close(combined, fwd_tol(), "moe_combine");

    // the combine's backward as moe.cpp runs it: each row gets its token's gradient
    // (unweighted) and its router weight; the weights apply in moe_swiglu_backward
    Dual& dcombined = random(Shape{c.n, c.hidden});
    Dual& dy = out(Shape{rows, c.hidden});
    cpu_->moe_gather(dcombined.c(), sorted.c(), int(k), dy.c());
    gpu_->moe_gather(dcombined.g(), sorted.g(), int(k), dy.g());
    expect_close(dy, fwd_tol(), "moe_gather of the output gradient");
    Dual& row_weights = out_f32(Shape{rows, 1});
    cpu_->moe_gather(weights.c().view(Shape{c.n * k, 1}), sorted.c(), 1, row_weights.c());
    gpu_->moe_gather(weights.g().view(Shape{c.n * k, 1}), sorted.g(), 1, row_weights.g());
    expect_close(row_weights, fwd_tol(), "moe_gather of the router weights");

    // data gradient through down (non-transposed layout), the weighted SwiGLU backward and
    // the weight gradients
    gpu_->copy(dy.cpu, dy.gpu);
    Dual& dact = out(Shape{rows, c.width});
    cpu_->grouped_gemm(dy.c(), down_w.c(), false, offsets.c(), dact.c());
    gpu_->grouped_gemm(dy.g(), down_w.g(), false, offsets.g(), dact.g());
    expect_close(dact, bwd_tol(), "grouped_gemm (no transpose)");
    gpu_->copy(dact.cpu, dact.gpu);
    Dual& dgu = out(Shape{rows, 2 * c.width});
    Dual& weighted_act = out(Shape{rows, c.width});
    Dual& drow_weights = out_f32(Shape{rows, 1});
    cpu_->moe_swiglu_backward(dact.c(), gu.c(), row_weights.c(), dgu.c(), weighted_act.c(),
                              drow_weights.c());
    gpu_->moe_swiglu_backward(dact.g(), gu.g(), row_weights.g(), dgu.g(), weighted_act.g(),
                              drow_weights.g());
    expect_close(dgu, bwd_tol(), "moe_swiglu_backward dgate_up");
    expect_close(weighted_act, fwd_tol(), "moe_swiglu_backward weighted_hidden");
    expect_close(drow_weights, bwd_tol(), "moe_swiglu_backward drow_weights");
    gpu_->copy(weighted_act.cpu, weighted_act.gpu);
    Dual& ddown = random(Shape{e, c.hidden, c.width});
    cpu_->grouped_gemm_weight_grad(dy.c(), weighted_act.c(), offsets.c(), ddown.c());
    gpu_->grouped_gemm_weight_grad(dy.g(), weighted_act.g(), offsets.g(), ddown.g());
    expect_close(ddown, bwd_tol(), "grouped_gemm_weight_grad");
    Dual& dweights = out_f32(Shape{c.n, k});
    cpu_->fill(dweights.c(), 0.0f);
    gpu_->fill(dweights.g(), 0.0f);
    gpu_->copy(drow_weights.cpu, drow_weights.gpu);
    cpu_->moe_gather_backward(drow_weights.c(), sorted.c(), 1, dweights.c().view(Shape{rows, 1}));
    gpu_->moe_gather_backward(drow_weights.g(), sorted.g(), 1, dweights.g().view(Shape{rows, 1}));
    expect_close(dweights, bwd_tol(), "router weight gradients back in slot order");

    Dual& dx = random(Shape{c.n, c.hidden});
    cpu_->moe_gather_backward(xs.c(), sorted.c(), int(k), dx.c());
    gpu_->moe_gather_backward(xs.g(), sorted.g(), int(k), dx.g());
    expect_close(dx, bwd_tol(), "moe_gather_backward");
  }
}

// A large grouped GEMM through the tiled tensor-core kernel (many tiles per expert, ragged).
TEST_P(CudaOps, GroupedGemmLarge) {
  if (!bf16()) GTEST_SKIP() << "the tiled kernel is the bf16 path";
  const int64_t e = 6, hidden = 264, width = 136;
  const std::vector<int32_t> counts = {300, 0, 1, 129, 128, 77};
  std::vector<int32_t> off(e + 1, 0);
  for (int64_t i = 0; i < e; ++i) off[i + 1] = off[i] + counts[i];
  const int64_t rows = off[e];
  Dual& offsets = ints(Shape{e + 1}, off);
  Dual& a = random(Shape{rows, hidden});
  Dual& w = random(Shape{e, width, hidden}, 0.2f);
  Dual& c = out(Shape{rows, width});
  cpu_->grouped_gemm(a.c(), w.c(), true, offsets.c(), c.c());
  gpu_->grouped_gemm(a.g(), w.g(), true, offsets.g(), c.g());
  expect_close(c, fwd_tol(), "grouped_gemm large (transpose_w)");
  Dual& dc = random(Shape{rows, width});
  Dual& da = out(Shape{rows, hidden});
  cpu_->grouped_gemm(dc.c(), w.c(), false, offsets.c(), da.c());
  gpu_->grouped_gemm(dc.g(), w.g(), false, offsets.g(), da.g());
  expect_close(da, bwd_tol(), "grouped_gemm large (no transpose)");
  Dual& dw = zeros(Shape{e, width, hidden}, dt());
  cpu_->grouped_gemm_weight_grad(dc.c(), a.c(), offsets.c(), dw.c());
  gpu_->grouped_gemm_weight_grad(dc.g(), a.g(), offsets.g(), dw.g());
  expect_close(dw, bwd_tol(), "grouped_gemm_weight_grad large");
}

// Overwritten parameter gradients (accumulate false: the first micro-batch of a step, no
// zeroing pass): the old gradient (NaN on the GPU here) is never read, and experts without
// rows end at zero (sm90: zero_empty_experts_kernel; WMMA: the empty expert's blocks; run
// again with MOETUNE_GROUPED_GEMM=wmma for the fallback).
TEST_P(CudaOps, GradientsOverwritten) {
  const int64_t e = 6, hidden = 264, width = 136;
  const std::vector<int32_t> counts = {300, 0, 1, 129, 0, 77};
  std::vector<int32_t> off(e + 1, 0);
  for (int64_t i = 0; i < e; ++i) off[i + 1] = off[i] + counts[i];
  const int64_t rows = off[e];
  Dual& offsets = ints(Shape{e + 1}, off);
  Dual& a = random(Shape{rows, hidden});
  Dual& dc = random(Shape{rows, width});
  Dual& dw = out(Shape{e, width, hidden});
  cpu_->grouped_gemm_weight_grad(dc.c(), a.c(), offsets.c(), dw.c(), false);
  gpu_->grouped_gemm_weight_grad(dc.g(), a.g(), offsets.g(), dw.g(), false);
  expect_close(dw, bwd_tol(), "grouped_gemm_weight_grad (overwrite)");
  cpu_->grouped_gemm_weight_grad(dc.c(), a.c(), offsets.c(), dw.c(), true);  // then +=
  gpu_->grouped_gemm_weight_grad(dc.g(), a.g(), offsets.g(), dw.g(), true);
  expect_close(dw, bwd_tol(), "grouped_gemm_weight_grad (overwrite, then accumulate)");

  Dual& dy = random(Shape{7, 13});
  Dual& dbias = out(Shape{13});
  cpu_->bias_backward(dy.c(), dbias.c(), false);
  gpu_->bias_backward(dy.g(), dbias.g(), false);
  expect_close(dbias, fwd_tol(), "bias_backward (overwrite)");

  const int64_t d = 40, norm_rows = 5;
  Dual& x = random(Shape{norm_rows, d}, 2.0f);
  Dual& w = random(Shape{d});
  Dual& y = out(Shape{norm_rows, d});
  Dual& rstd = out_f32(Shape{norm_rows});
  cpu_->rmsnorm_forward(x.c(), w.c(), 1e-6f, y.c(), rstd.c());
  gpu_->rmsnorm_forward(x.g(), w.g(), 1e-6f, y.g(), rstd.g());
  Dual& dnorm = random(Shape{norm_rows, d});
  Dual& dx = out(Shape{norm_rows, d});
  Dual& dweight = out(Shape{d});
  cpu_->rmsnorm_backward(dnorm.c(), x.c(), w.c(), rstd.c(), dx.c(), dweight.c(), false, false);
  gpu_->rmsnorm_backward(dnorm.g(), x.g(), w.g(), rstd.g(), dx.g(), dweight.g(), false, false);
  expect_close(dweight, bwd_tol(), "rmsnorm_backward dweight (overwrite)");

  const int64_t n = 9, h = 32, v = 300;
  Dual& hid = random(Shape{n, h});
  Dual& head = random(Shape{v, h}, 0.5f);
  Dual& labels = ints(Shape{n}, {5, -100, 299, 0, 17, 17, -100, 250, 1});
  Dual& loss = zeros(Shape{1}, DType::F32);
  Dual& dhidden = out(Shape{n, h});
  Dual& dhead = out(Shape{v, h});
  for (Backend* backend : {cpu_.get(), gpu_.get()}) {
    const bool on_gpu = backend == gpu_.get();
    auto pick = [&](Dual& dual) { return on_gpu ? dual.g() : dual.c(); };
    LinearCrossEntropyArgs args;
    args.hidden = pick(hid);
    args.weight = pick(head);
    args.labels = pick(labels);
    args.loss_sum = pick(loss);
    args.grad_scale = 1.0f / 7.0f;
    args.grad_hidden = pick(dhidden);
    args.grad_weight = pick(dhead);
    args.accumulate_grad_weight = false;
    backend->linear_cross_entropy(args);
  }
  expect_close(dhead, bwd_tol(), "linear_cross_entropy grad_weight (overwrite)");
}

TEST_P(CudaOps, LinearCrossEntropy) {
  const int64_t n = 9, h = 32, v = 300;
  Dual& hidden = random(Shape{n, h});
  Dual& weight = random(Shape{v, h}, 0.5f);
  Dual& labels = ints(Shape{n}, {5, -100, 299, 0, 17, 17, -100, 250, 1});
  Dual& loss = zeros(Shape{1}, DType::F32);
  Dual& correct = zeros(Shape{1}, DType::F32);
  Dual& dhidden = out(Shape{n, h});
  Dual& dweight = random(Shape{v, h});
  Dual& logits = out_f32(Shape{n, v});
  for (Backend* backend : {cpu_.get(), gpu_.get()}) {
    const bool on_gpu = backend == gpu_.get();
    auto pick = [&](Dual& d) { return on_gpu ? d.g() : d.c(); };
    LinearCrossEntropyArgs args;
    args.hidden = pick(hidden);
    args.weight = pick(weight);
    args.labels = pick(labels);
    args.loss_sum = pick(loss);
    args.correct = pick(correct);
    args.grad_scale = 1.0f / 7.0f;
    args.grad_hidden = pick(dhidden);
    args.grad_weight = pick(dweight);
    args.logits = pick(logits);
    backend->linear_cross_entropy(args);
  }
  expect_close(logits, fwd_tol(), "logits");
  expect_close(loss, fwd_tol(), "loss_sum");
  expect_close(correct, bf16() ? 1.0 : 0.0, "correct");  // bf16 logits may flip a near-tie
  expect_close(dhidden, bwd_tol(), "grad_hidden");
  expect_close(dweight, bwd_tol(), "grad_weight");
}

TEST_P(CudaOps, AdamWAndGradNorm) {
  // Parameters in the tested dtype; fp32 state; one with an fp32 master copy.
  Dual& p1 = random(Shape{5, 7});
  Dual& g1 = random(Shape{5, 7});
  Dual& m1 = random_f32(Shape{5, 7}, 0.1f);
  Dual& v1 = make(Shape{5, 7}, DType::F32, std::vector<float>(35, 0.01f));
  Dual& p2 = random(Shape{1});
  Dual& g2 = random(Shape{1});
  Dual& m2 = zeros(Shape{1}, DType::F32);
  Dual& v2 = zeros(Shape{1}, DType::F32);
  Dual& norm = out_f32(Shape{1});
  std::vector<Tensor> cpu_grads = {g1.c(), g2.c()}, gpu_grads = {g1.g(), g2.g()};
  cpu_->grad_norm_squared(cpu_grads, norm.c());
  gpu_->grad_norm_squared(gpu_grads, norm.g());
  expect_close(norm, 1e-5, "grad_norm_squared");
  AdamWHyper hyper;
  hyper.lr = 1e-2;
  hyper.step = 3;
  Dual& master = make(Shape{5, 7}, DType::F32,
                      std::vector<float>(p1.cpu.ptr<float>(), p1.cpu.ptr<float>() + 35));
  std::vector<AdamWParam> cpu_params(2), gpu_params(2);
  cpu_params[0] = {p1.c(), g1.c(), m1.c(), v1.c(), bf16() ? master.c() : Tensor(), 0.1f};
  gpu_params[0] = {p1.g(), g1.g(), m1.g(), v1.g(), bf16() ? master.g() : Tensor(), 0.1f};
  cpu_params[1] = {p2.c(), g2.c(), m2.c(), v2.c(), Tensor(), 0.0f};
  gpu_params[1] = {p2.g(), g2.g(), m2.g(), v2.g(), Tensor(), 0.0f};
  if (bf16()) {  // the CPU reference is fp32 only: it updates the master, params get rounded copies
    cpu_params[0].param = master.c();
    cpu_params[0].master = Tensor();
  }
  cpu_->adamw_update(cpu_params, hyper, 0.5f);
  gpu_->adamw_update(gpu_params, hyper, 0.5f);
  expect_close(m1, 1e-5, "adamw exp_avg");
  expect_close(v1, 1e-5, "adamw exp_avg_sq");
  expect_close(bf16() ? master : p1, 1e-5, "adamw param / master");
  expect_close(p2, bf16() ? 1e-2 : 1e-5, "adamw param (no decay)");
}

// bf16 parameters with bf16 state (the vectorised path the benchmark uses, as Transformers
// keeps AdamW state in the parameter dtype) against the fp32 reference on the same values.
TEST_P(CudaOps, AdamWBf16State) {
  if (!bf16()) GTEST_SKIP() << "bf16 state path";
  Dual& p = random(Shape{3, 40});
  Dual& g = random(Shape{3, 40});
  Dual& m = random(Shape{3, 40}, 0.1f);
  Dual& v = make(Shape{3, 40}, DType::BF16, std::vector<float>(120, 0.02f));
  Dual& q = random(Shape{16});
  Dual& gq = random(Shape{16});
  Dual& mq = zeros(Shape{16}, DType::BF16);
  Dual& vq = zeros(Shape{16}, DType::BF16);
  AdamWHyper hyper;
  hyper.lr = 1e-2;
  hyper.step = 2;
  std::vector<AdamWParam> cpu_params = {{p.c(), g.c(), m.c(), v.c(), Tensor(), 0.1f},
                                        {q.c(), gq.c(), mq.c(), vq.c(), Tensor(), 0.0f}};
  std::vector<AdamWParam> gpu_params = {{p.g(), g.g(), m.g(), v.g(), Tensor(), 0.1f},
                                        {q.g(), gq.g(), mq.g(), vq.g(), Tensor(), 0.0f}};
  cpu_->adamw_update(cpu_params, hyper, 0.7f);
  gpu_->adamw_update(gpu_params, hyper, 0.7f);
  expect_close(p, 1e-2, "adamw bf16 param");
  expect_close(m, 1e-2, "adamw bf16 exp_avg");
  expect_close(v, 1e-2, "adamw bf16 exp_avg_sq");
  expect_close(q, 1e-2, "adamw bf16 param (no decay)");
}

// The multi-tensor AdamW and grad-norm paths on tensors of `sizes` (fp32 state, + an fp32
// master in bf16 mode) against the CPU reference: the deterministic grad-norm reduction over
// the gradients, then one AdamW step (lr 1e-2) with `decay_of(i)` as tensor i's weight decay.
void CudaOps::check_multi_tensor_adamw(const std::vector<int64_t>& sizes, int64_t step,
                                       const std::function<float(size_t)>& decay_of,
                                       float grad_scale) {
  std::vector<Dual*> p, g, m, v, master;
  for (int64_t n : sizes) {
    p.push_back(&random(Shape{n}));
    g.push_back(&random(Shape{n}));
    m.push_back(&random_f32(Shape{n}, 0.1f));
    v.push_back(&make(Shape{n}, DType::F32, std::vector<float>(size_t(n), 0.03f)));
    master.push_back(
        &make(Shape{n}, DType::F32,
              std::vector<float>(p.back()->cpu.ptr<float>(), p.back()->cpu.ptr<float>() + n)));
  }
  Dual& norm = out_f32(Shape{1});
  std::vector<Tensor> cpu_grads, gpu_grads;
  for (Dual* grad : g) cpu_grads.push_back(grad->c()), gpu_grads.push_back(grad->g());
  cpu_->grad_norm_squared(cpu_grads, norm.c());
  gpu_->grad_norm_squared(gpu_grads, norm.g());
  expect_close(norm, 1e-5, "grad_norm_squared");
  AdamWHyper hyper;
  hyper.lr = 1e-2;
  hyper.step = step;
  std::vector<AdamWParam> cpu_params, gpu_params;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const float decay = decay_of(i);
    cpu_params.push_back(
        {bf16() ? master[i]->c() : p[i]->c(), g[i]->c(), m[i]->c(), v[i]->c(), Tensor(), decay});
    gpu_params.push_back(
        {p[i]->g(), g[i]->g(), m[i]->g(), v[i]->g(), bf16() ? master[i]->g() : Tensor(), decay});
  }
  cpu_->adamw_update(cpu_params, hyper, grad_scale);
  gpu_->adamw_update(gpu_params, hyper, grad_scale);
  for (size_t i = 0; i < sizes.size(); ++i) {
    SCOPED_TRACE("tensor " + std::to_string(i) + " of " + std::to_string(sizes[i]));
    expect_close(*m[i], 1e-5, "adamw exp_avg");
    expect_close(*v[i], 1e-5, "adamw exp_avg_sq");
    expect_close(bf16() ? *master[i] : *p[i], 1e-5, "adamw param / master");
    if (HasFailure()) return;
  }
}

// The vectorised multi-tensor path on tensors spanning several 4096-element chunks (a
// partial last chunk, tiny tensors between big ones); decay on every other tensor.
TEST_P(CudaOps, AdamWVectorisedChunks) {
  check_multi_tensor_adamw(
      {2 * 4096 + 8, 16, 4096, 5 * 4096 - 24, 8}, /*step=*/4,
      [](size_t i) { return i % 2 ? 0.0f : 0.1f; }, /*grad_scale=*/0.25f);
}

// More tensors than one launch's descriptor table holds (the CUDA backend splits AdamW and
// the grad norm into several launches): 1000 small tensors of awkward sizes, once all
// multiples of 8 (the vectorised path, with a few multi-chunk tensors) and once with odd
// sizes (the scalar path), each against the CPU reference; decay on two tensors in three.
TEST_P(CudaOps, AdamWManyTensorsSplitLaunches) {
  std::mt19937 size_rng(77);
  for (const bool vectorised : {true, false}) {
    SCOPED_TRACE(vectorised ? "vectorised" : "scalar");
    std::vector<int64_t> sizes;
    for (int i = 0; i < 1000; ++i) {
      const int64_t r = int64_t(size_rng() % 97);
      if (i % 97 == 13)  // spans several 4096-element chunks, a partial last one
        sizes.push_back(vectorised ? 2 * 4096 + 8 * (r % 5 + 1) : 2 * 4096 + 2 * r + 1);
      else
        sizes.push_back(vectorised ? 8 * (r + 1) : r + 1);
    }
    check_multi_tensor_adamw(
        sizes, /*step=*/5, [](size_t i) { return i % 3 ? 0.05f : 0.0f; },
        /*grad_scale=*/0.5f);
    if (HasFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::F32, DType::BF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace moetune
