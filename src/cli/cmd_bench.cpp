// `moetune bench`: training-step throughput of a random-init model of a given config on the
// GPU (forward, backward, AdamW), printed as one JSON line. Random token ids, labels = ids
// (the model shifts them, as Transformers). Weights bf16, gradients bf16, AdamW state bf16:
// the same storage Transformers v5 uses for a bf16 model with torch.optim.AdamW (state
// follows the parameter dtype), so memory is compared like for like. Timing: warm-up steps,
// then the median wall time of --steps synchronised steps; one extra profiled step brackets
// every op with CUDA events for the per-phase times. tflops uses DESIGN.md's formula.
// Several GPUs (started by `moetune launch`, torchrun, mpirun or srun): every rank builds the
// model (--expert-parallel N splits the experts), a step adds the gradient reduction and the
// sharded optimizer of DataParallelAdamW (--zero-stage, AdamW state still in bf16, sharded;
// reductions overlapped with the backward on a communication stream unless --no-overlap-comm),
// and rank 0 prints one line with "gpus", tps per GPU and the largest peak memory of any rank.
// --optimizer-in-backward: AdamW per gradient group inside the gradient-ready hook and
// per-group gradient storage (GradientStorage::PerGroup), as training.optimizer_in_backward
// (InBackwardOptimizer; no gradient norm, as the other paths here), the updates on a
// side stream beside the backward unless --no-overlap-optimizer; with several GPUs each
// group's reduction, sharded update and weight all-gather run there together. On one GPU the
// expert weights are updated inside their gradient GEMMs with --fused-expert-update (their
// gradients never stored; "fused_expert_update" in the JSON line); with --optimizer-sms K the
// overlapped updates own K SMs (a green context) and the backward's persistent kernels the rest
// ("optimizer_sms" in the JSON line: the SMs the partition got, 0 without one).
// grouped_gemm_tflops: the profiled step's expert GEMMs (forward + data grad, weight grad).
// expert_rows: over the profiled step's MoE layers, the busiest expert-parallel rank's expert
// rows and rank 0's, each over the mean per rank (1 and 1 with balanced routing or one GPU).
// The profiled step's time per op (outermost Backend ops by name; side-stream ops apart,
// their time overlaps) goes to stderr as a table and to the JSON line as ops_ms and
// side_ops_ms.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "io/model_config.h"
#include "model/memory_plan.h"
#include "model/model.h"
#include "ops/backend.h"
#include "train/adamw.h"
#include "train/optimizer_in_backward.h"
#include "train/parallel_context.h"
#include "train/sharded_adamw.h"

#if MOETUNE_HAS_CUDA
#include "ops/cuda/cuda_profile.h"
#include "ops/cuda/device_memory.h"
#endif

namespace moetune::cli {

namespace {

// DESIGN.md: 6 x (per layer: attention projections + router + top-k experts' three
// matrices (or the dense MLP), plus the LM head) + 6 x layers x seq x heads x head_dim.
double flops_per_token(const ModelConfig& c, int64_t seq) {
  const double H = double(c.hidden_size),
               D = double(c.head_dim > 0 ? c.head_dim : c.hidden_size / c.num_attention_heads);
  const double q = c.num_attention_heads * D, kv = c.num_key_value_heads * D;
  double matrices = 0;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    matrices += H * q * 2 + H * kv * 2;
    if (c.layer_is_moe(layer))
      matrices += double(c.num_experts) * H +
                  double(c.num_experts_per_tok) * 3 * H * double(c.moe_intermediate_size);
    else
      matrices += 3 * H * double(c.intermediate_size);
  }
  matrices += double(c.vocab_size) * H;
  return 6 * matrices + 6.0 * double(c.num_hidden_layers) * double(seq) * q;
}

}  // namespace

int run_bench(int argc, char** argv) {
  CLI::App app{"Training-step benchmark of a random-init model on the GPU (one JSON line)"};
  app.name("moetune bench");
  std::string config_path, routing = "real", device = "cuda";
  int64_t layers = 0, seq = 4096, micro_batch = 1, steps = 5, warmup = 2;
  bool recompute = false, optimizer_in_backward = false;
  int64_t expert_parallel = 1, zero_stage = 1;
  bool overlap_comm = true, overlap_optimizer = true, fused_expert_update = false;
  int optimizer_sms = 0;
  app.add_option("--config", config_path, "HF config.json of the model shape")->required();
  app.add_option("--layers", layers, "keep the first N decoder layers (default: all)");
  app.add_option("--seq", seq, "tokens per row");
  app.add_option("--micro-batch", micro_batch, "rows per step");
  app.add_option("--steps", steps, "timed steps (median reported)");
  app.add_option("--warmup", warmup, "untimed steps first");
  app.add_flag("--recompute", recompute, "activation checkpointing per layer");
  app.add_flag("--optimizer-in-backward", optimizer_in_backward,
               "AdamW per gradient group during the backward, gradients held per group");
  app.add_option("--routing", routing, "real (the random-init router) or balanced")
      ->check(CLI::IsMember({"real", "balanced"}));
  app.add_option("--device", device, "cuda or cuda:N (several ranks: cuda, the local rank's GPU)");
  app.add_option("--expert-parallel", expert_parallel,
                 "several GPUs: ranks the experts are split over (divides the world)");
  app.add_option("--zero-stage", zero_stage,
                 "several GPUs: 0 (replicated AdamW state), 1 (sharded state), 2 (and "
                 "reduce-scattered gradients)")
      ->check(CLI::Range(0, 2));
  app.add_flag("--overlap-comm,!--no-overlap-comm", overlap_comm,
               "several GPUs: gradient reductions on a communication stream beside the "
               "backward (default) or on the compute stream");
  app.add_flag("--overlap-optimizer,!--no-overlap-optimizer", overlap_optimizer,
               "with --optimizer-in-backward: each group's update on a low-priority side stream "
               "beside the backward (default) or between the layers on the compute stream");
  app.add_flag("--fused-expert-update,!--no-fused-expert-update", fused_expert_update,
               "with --optimizer-in-backward on one GPU: the expert weights' AdamW step fused "
               "into their gradient GEMMs, the expert gradients never stored, or (default) "
               "computed into the group's gradients and updated with the group");
  app.add_option("--optimizer-sms", optimizer_sms,
                 "with --optimizer-in-backward and the overlap on one GPU: SMs the updates own "
                 "(the backward's persistent kernels keep the rest); 0 (default): they share all")
      ->check(CLI::Range(0, 1024));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
#if !MOETUNE_HAS_CUDA
  fail("bench needs the CUDA backend; this build has none (rebuild with -DMOETUNE_CUDA=ON)");
#else
  if (seq < 2 || micro_batch < 1 || steps < 1 || warmup < 0)
    fail("bench: --seq >= 2, --micro-batch >= 1, --steps >= 1");
  ModelConfig config = load_model_config(config_path);
  if (layers > 0) {
    if (layers > config.num_hidden_layers)
      fail("--layers ", layers, " > the config's ", config.num_hidden_layers);
    config.num_hidden_layers = layers;
  }
  if (config.head_dim <= 0) config.head_dim = config.hidden_size / config.num_attention_heads;

  const std::unique_ptr<ParallelContext> parallel =
      start_parallel(device, expert_parallel, 0, config.num_experts,
                     LayoutKeys{"--expert-parallel", "--data-parallel", "--device"});
  const int world = parallel ? parallel->world() : 1;
  auto backend = make_backend(parallel ? parallel->device : device);
  ModelOptions options;
  options.param_dtype = DType::BF16;
  options.grad_dtype = DType::BF16;
  options.recompute_layers = recompute;
  options.balanced_routing = routing == "balanced";
  if (parallel) options.expert_comm = parallel->groups.expert.get();  // size 1: all experts
  if (optimizer_in_backward) options.grad_storage = GradientStorage::PerGroup;
  auto model = Model::uninitialized(config, *backend, options);
  uint64_t seed = 1;
  for (const Parameter& parameter : model->parameters()) {
    if (parameter.name.ends_with("norm.weight"))
      backend->fill(parameter.value, 1.0f);
    else if (!parameter.name.ends_with(".bias"))
      cuda::fill_normal(parameter.value, static_cast<float>(config.initializer_range), seed++);
  }
  // AdamW state in the parameter dtype (bf16), as torch.optim.AdamW keeps it for bf16 params.
  // Several ranks: the same bf16 state, sharded by the data-parallel optimizer (never
  // allocated whole, so peak memory is the sharded one); the gradient reductions start from
  // the backward's gradient-ready hook.
  std::unique_ptr<DataParallelAdamW> dp_optimizer;
  if (parallel) {
    AdamWConfig adamw_config;
    adamw_config.lr = 1e-5;
    adamw_config.weight_decay = 0.01;
    DataParallelOptions dp_options;
    dp_options.zero_stage = static_cast<int>(zero_stage);
    dp_options.state_dtype = DType::BF16;
    dp_options.master_weights = false;
    // In the backward, the reductions run where the updates run (InBackwardOptimizer).
    dp_options.overlap_communication = overlap_comm && !optimizer_in_backward;
    dp_optimizer = std::make_unique<DataParallelAdamW>(
        model->parameters(), model->gradient_groups(), *backend, adamw_config,
        *parallel->groups.world, *parallel->groups.expert_dp, dp_options);
    if (!optimizer_in_backward)
      model->set_gradient_ready_hook([&](size_t group) { dp_optimizer->reduce_group(group); });
  }
  // One GPU: AdamW (state in bf16, no master weights) per step, or per group in the backward.
  constexpr double kLr = 1e-5;
  std::unique_ptr<AdamW> adamw;
  std::unique_ptr<InBackwardOptimizer> in_backward;
  InBackwardOptions in_backward_options;
  in_backward_options.overlap = overlap_optimizer;
  in_backward_options.grad_norm = false;
  in_backward_options.fuse_expert_updates = fused_expert_update;  // one GPU only
  in_backward_options.optimizer_sms = optimizer_sms;              // one GPU only
  if (dp_optimizer && optimizer_in_backward)
    in_backward = std::make_unique<InBackwardOptimizer>(*model, *dp_optimizer, in_backward_options);
  if (!dp_optimizer) {
    AdamWConfig adamw_config;
    adamw_config.lr = kLr;
    adamw_config.weight_decay = 0.01;
    adamw_config.state_dtype = DType::BF16;
    adamw_config.master_weights = false;
    adamw = std::make_unique<AdamW>(model->parameters(), *backend, adamw_config);
    if (optimizer_in_backward)
      in_backward = std::make_unique<InBackwardOptimizer>(*model, *adamw, in_backward_options);
  }

  const int64_t tokens = micro_batch * seq;
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  std::mt19937 rng(1234 + (parallel ? parallel->rank() : 0));  // each rank its own tokens
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(config.vocab_size - 1));
  for (auto& id : ids) id = token(rng);
  BatchView batch;
  batch.batch = micro_batch;
  batch.seq = seq;
  batch.input_ids = ids;
  batch.labels = ids;
  const float loss_scale = 1.0f / static_cast<float>(micro_batch * (seq - 1));

  double last_loss = 0;
  auto train_step = [&]() {
    model->zero_grads();
    if (in_backward) in_backward->begin_step(kLr);
    const StepResult result = model->forward_backward(batch, loss_scale);
    if (!in_backward && dp_optimizer)  // (in_backward: updated in the backward)
      dp_optimizer->step(kLr, 1.0f);
    else if (!in_backward)
      adamw->step(kLr);
    backend->synchronize();
    last_loss = result.trained_tokens ? result.loss_sum / double(result.trained_tokens) : 0.0;
  };
  auto now = [] { return std::chrono::steady_clock::now(); };
  for (int64_t i = 0; i < warmup; ++i) train_step();
  std::vector<double> times;
  for (int64_t i = 0; i < steps; ++i) {
    const auto start = now();
    train_step();
    times.push_back(std::chrono::duration<double>(now() - start).count());
  }
  std::sort(times.begin(), times.end());
  const double step_s = times[times.size() / 2];

  model->take_expert_load();  // from here: the profiled step's layers
  cuda::begin_phase_profile(*backend);
  const auto profile_start = now();
  train_step();
  const double profiled_s = std::chrono::duration<double>(now() - profile_start).count();
  const cuda::PhaseTimes phases = cuda::end_phase_profile(*backend);
  const ExpertLoad load = model->take_expert_load();
  const double mean_rows = std::max(load.mean_rows, 1.0);

  const cuda::DeviceMemoryStats memory = cuda::device_memory_stats();
  // The memory plan's prediction for this run (per rank): AdamW state in the parameter dtype
  // without master weights, the experts split and the state sharded as this run does, the
  // backend's LM-head logits chunk; balanced routing assumed (see memory_plan.h).
  MemoryPlanOptions plan_options{DType::BF16,
                                 DType::BF16,
                                 micro_batch,
                                 seq,
                                 recompute,
                                 optimizer_in_backward,
                                 model->gradient_arenas()};
  plan_options.state_dtype = DType::BF16;
  plan_options.master_weights = false;
  const bool fused_experts = in_backward && in_backward->fuses_expert_updates();
  plan_options.fused_expert_updates = fused_experts;
  if (parallel) {
    plan_options.expert_parallel = parallel->layout().expert_parallel;
    plan_options.data_parallel = parallel->layout().data_parallel;
    plan_options.zero_stage = static_cast<int>(zero_stage);
  }
  plan_options.logits_chunk_limit = int64_t(640) << 20;
  const double plan_bytes = double(plan_memory(config, plan_options).total());
  // Several ranks: every rank's step time and peak (rank 0 reports the slowest and the
  // largest); all ranks take part in the sum, only rank 0 prints.
  // peak_gib: reserved from the driver (as torch's max_memory_reserved); peak_alloc_gib: in
  // use by tensors (max_memory_allocated).
  double step_s_all = step_s, peak_bytes = double(memory.peak_reserved),
         peak_in_use = double(memory.peak_in_use);
  if (parallel) {
    std::vector<double> per_rank(3 * static_cast<size_t>(world), 0.0);
    per_rank[3 * parallel->rank()] = step_s;
    per_rank[3 * parallel->rank() + 1] = peak_bytes;
    per_rank[3 * parallel->rank() + 2] = peak_in_use;
    all_reduce_host(*parallel->groups.world, *backend, per_rank);
    for (int r = 0; r < world; ++r) {
      step_s_all = std::max(step_s_all, per_rank[3 * r]);
      peak_bytes = std::max(peak_bytes, per_rank[3 * r + 1]);
      peak_in_use = std::max(peak_in_use, per_rank[3 * r + 2]);
    }
    if (parallel->rank() != 0) return 0;
  }
  // Per op: a table on stderr, sorted by time (side-stream ops marked, their time overlaps),
  // and two JSON objects in ms.
  struct OpRow {
    std::string name;
    cuda::OpTime time;
    bool side;
  };
  std::vector<OpRow> op_rows;
  for (const auto& [name, time] : phases.ops) op_rows.push_back({name, time, false});
  for (const auto& [name, time] : phases.side_ops) op_rows.push_back({name, time, true});
  std::sort(op_rows.begin(), op_rows.end(),
            [](const OpRow& a, const OpRow& b) { return a.time.seconds > b.time.seconds; });
  std::fprintf(stderr, "%-34s %8s %10s %8s\n", "op (profiled step)", "calls", "total ms", "% step");
  for (const OpRow& row : op_rows)
    std::fprintf(stderr, "%-34s %8lld %10.3f %7.1f%%\n",
                 ((row.side ? "side: " : "") + row.name).c_str(), (long long)row.time.calls,
                 row.time.seconds * 1e3, 100.0 * row.time.seconds / profiled_s);
  const auto ops_json = [](const std::map<std::string, cuda::OpTime>& ops) {
    std::string json = "{";
    for (const auto& [name, time] : ops) {
      char entry[160];
      std::snprintf(entry, sizeof(entry), "%s\"%s\": %.3f", json.size() > 1 ? ", " : "",
                    name.c_str(), time.seconds * 1e3);
      json += entry;
    }
    return json + "}";
  };
  double side_s = 0;
  for (double s : phases.side_seconds) side_s += s;

  const double tps = double(tokens) / step_s_all;  // per GPU: each rank trains `tokens`
  const double tflops = tps * flops_per_token(config, seq) / 1e12;
  const auto seconds = [&](cuda::Phase phase) { return phases.seconds[static_cast<int>(phase)]; };
  double measured = 0;
  for (double s : phases.seconds) measured += s;
  std::printf(
      "{\"engine\": \"moetune\", \"gpu\": \"%s\", \"gpus\": %d, \"expert_parallel\": %lld, "
      "\"zero_stage\": %lld, \"overlap_comm\": %s, \"layers\": %lld, \"seq\": %lld, "
      "\"micro_batch\": %lld, "
      "\"routing\": \"%s\", \"recompute\": %s, \"optimizer_in_backward\": %s, "
      "\"fused_expert_update\": %s, "
      "\"tokens_per_step\": %lld, \"tps\": %.1f, "
      "\"tflops\": %.1f, "
      "\"peak_gib\": %.2f, \"peak_alloc_gib\": %.2f, \"plan_gib\": %.2f, \"step_s\": %.4f, "
      "\"loss\": %.4f, \"phases_s\": "
      "{\"attention\": %.4f, "
      "\"router_dispatch\": %.4f, \"experts\": %.4f, \"loss\": %.4f, \"optimizer\": %.4f, "
      "\"dense_gemm\": %.4f, "
      "\"other_ops\": %.4f, \"host_gaps\": %.4f}, \"profiled_step_s\": %.4f, "
      "\"grouped_gemm_tflops\": {\"fwd_dgrad\": %.1f, \"wgrad\": %.1f}, "
      "\"overlap_optimizer\": %s, \"optimizer_sms\": %d, \"grad_arena_gib\": %.3f, "
      "\"side_stream_s\": %.4f, "
      "\"expert_rows\": {\"busiest_over_mean\": %.3f, \"rank0_over_mean\": %.3f}, "
      "\"ops_ms\": %s, \"side_ops_ms\": %s}\n",
      cuda::device_name(), world, (long long)(parallel ? expert_parallel : 1),
      (long long)(parallel ? zero_stage : 0),
      dp_optimizer && dp_optimizer->overlapping() ? "true" : "false",
      (long long)config.num_hidden_layers, (long long)seq, (long long)micro_batch, routing.c_str(),
      recompute ? "true" : "false", optimizer_in_backward ? "true" : "false",
      fused_experts ? "true" : "false", (long long)tokens, tps, tflops,
      peak_bytes / double(1ull << 30), peak_in_use / double(1ull << 30),
      plan_bytes / double(1ull << 30), step_s_all, last_loss, seconds(cuda::Phase::Attention),
      seconds(cuda::Phase::RouterDispatch), seconds(cuda::Phase::Experts),
      seconds(cuda::Phase::Loss), seconds(cuda::Phase::Optimizer), seconds(cuda::Phase::DenseGemm),
      seconds(cuda::Phase::OtherOps), std::max(0.0, profiled_s - measured), profiled_s,
      phases.tflops(phases.grouped_gemm_flops, phases.grouped_gemm_s),
      phases.tflops(phases.weight_grad_flops, phases.weight_grad_s),
      in_backward && in_backward->overlapping() ? "true" : "false",
      in_backward ? in_backward->optimizer_sms() : 0,
      optimizer_in_backward ? double(model->gradient_arena_bytes()) / double(1ull << 30) : 0.0,
      side_s, load.max_rows / mean_rows, load.rows_here / mean_rows, ops_json(phases.ops).c_str(),
      ops_json(phases.side_ops).c_str());
  return 0;
#endif
}

}  // namespace moetune::cli
