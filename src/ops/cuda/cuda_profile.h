// Per-phase timing of the CUDA backend, for `moetune bench`: while profiling is on, every
// op is bracketed by CUDA events and its time added to the phase it belongs to. Phases
// are decided by the op: attention (the attention kernels), router+dispatch (router, sort,
// gather, combine), experts (grouped GEMMs, SwiGLU), loss (fused LM head + cross-entropy),
// optimizer (AdamW, gradient norm), dense GEMMs (projections), other ops (norms, RoPE,
// embedding, adds, copies). Host gaps are what the step's wall time has beyond their sum.
// The grouped GEMMs are also timed on their own, with their FLOPs (2 * rows * in * out), so
// that the bench reports their TFLOP/s: forward + data grad, and weight grad.
// Per op: time and calls of each outermost op by its Backend member's name (an op another
// op calls inside counts under the caller). Ops on side streams (optimizer updates beside
// the backward) are summed apart: their time overlaps the ops' stream's.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>

#include "ops/backend.h"

namespace moetune::cuda {

enum class Phase : int {
  Attention,
  RouterDispatch,
  Experts,
  Loss,
  Optimizer,
  DenseGemm,
  OtherOps,
  Count
};
inline constexpr std::array<const char*, static_cast<int>(Phase::Count)> kPhaseNames = {
    "attention", "router_dispatch", "experts", "loss", "optimizer", "dense_gemm", "other_ops"};

struct OpTime {
  double seconds = 0;
  int64_t calls = 0;
};

struct PhaseTimes {
  std::array<double, static_cast<int>(Phase::Count)> seconds{};       // the ops' stream
  std::array<double, static_cast<int>(Phase::Count)> side_seconds{};  // side streams
  std::map<std::string, OpTime> ops, side_ops;                        // by op name
  double grouped_gemm_s = 0, grouped_gemm_flops = 0;  // forward and data-grad grouped GEMMs
  double weight_grad_s = 0, weight_grad_flops = 0;    // weight-grad grouped GEMMs
  double tflops(double flops, double s) const { return s > 0 ? flops / s / 1e12 : 0.0; }
};

// backend must be a CUDA backend (fails otherwise).
void begin_phase_profile(Backend& backend);
PhaseTimes end_phase_profile(Backend& backend);  // synchronises

}  // namespace moetune::cuda
