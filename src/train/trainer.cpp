// The training loop, top to bottom: set up (backend, tokenizer, data, model, optimizer,
// schedule, output folder, resume), then for every optimizer step:
//   1. fetch the step's micro-batches and count their trained tokens first, so every
//      micro-batch's loss is scaled by 1 / (trained tokens of the whole step): Transformers'
//      num_items_in_batch semantics; 4 micro-batches of 1 equal 1 of 4 (fp32 tolerance);
//   2. forward + backward of each micro-batch, gradients accumulating;
//   3. global gradient norm; a non-finite loss or norm skips the step (counted; too many in a
//      row stop the run); clipping as torch's clip_grad_norm_ (coef = max/(norm+1e-6) <= 1);
//   4. AdamW at the schedule's lr;
//   5. log, evaluate, checkpoint, export as the recipe says; SIGINT/SIGTERM stop here.
// Resuming restores weights, AdamW state, the data loader's position, the RNG and the
// logging window, so the losses after a resume are bit-identical to an uninterrupted run.
// Several ranks (options.parallel): every rank fetches all of a step's micro-batches (so
// the loader's position and the step's trained-token count are the same everywhere) and
// trains micro-batch m when m % world == rank; DataParallelAdamW reduces the gradients
// (started per gradient group from the last micro-batch's backward) and updates its shards;
// loss, accuracy and the stop request are summed over the ranks once per step; rank 0 logs
// and writes metrics, loss.svg and hf/; checkpoints gather every rank's optimizer shard.
#include "train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <sstream>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "io/json_file.h"
#include "model/memory_plan.h"
#include "model/model.h"
#include "ops/backend.h"
#include "train/adamw.h"
#include "train/checkpoint.h"
#include "train/dist_checkpoint.h"
#include "train/loss_plot.h"
#include "train/metrics.h"
#include "train/optimizer_in_backward.h"
#include "train/parallel_context.h"
#include "train/progress.h"
#include "train/sharded_adamw.h"

namespace moetune {

namespace fs = std::filesystem;

namespace {

// ---- SIGINT / SIGTERM: finish the step, checkpoint, exit 0 ---------------------------------
// The one piece of process-wide state: a signal handler can only set a flag. A second signal
// gets the default action (so a second Ctrl-C kills at once).
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signal_number) {
  g_stop_signal = signal_number;
  std::signal(signal_number, SIG_DFL);
}

class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    previous_int_ = std::signal(SIGINT, on_stop_signal);
    previous_term_ = std::signal(SIGTERM, on_stop_signal);
  }
  ~StopSignals() {
    std::signal(SIGINT, previous_int_);
    std::signal(SIGTERM, previous_term_);
  }
  bool requested() const { return g_stop_signal != 0; }
  const char* name() const { return g_stop_signal == SIGINT ? "SIGINT" : "SIGTERM"; }

 private:
  void (*previous_int_)(int) = SIG_DFL;
  void (*previous_term_)(int) = SIG_DFL;
};

// ---- small helpers --------------------------------------------------------------------------

BatchView view_of(const Batch& batch) {
  BatchView view;
  view.batch = batch.batch_size;
  view.seq = batch.seq_len;
  view.input_ids = batch.input_ids;
  view.labels = batch.labels;
  view.position_ids = batch.position_ids;
  view.doc_offsets = batch.doc_offsets;
  return view;
}

// The chat template the data needs: data.chat_template, else the tokenizer folder's (if any).
std::unique_ptr<ChatTemplate> load_chat_template(const Recipe& recipe) {
  if (recipe.data.chat_template) {
    std::ifstream in(*recipe.data.chat_template);
    if (!in) fail("data.chat_template: cannot read ", recipe.data.chat_template->string());
    std::stringstream text;
    text << in.rdbuf();
    return std::make_unique<ChatTemplate>(text.str(), recipe.data.chat_template->string());
  }
  const fs::path folder = recipe.model.tokenizer;
  bool has_template = fs::exists(folder / "chat_template.jinja");
  if (!has_template && fs::exists(folder / "tokenizer_config.json")) {
    std::ifstream in(folder / "tokenizer_config.json");
    const auto config = nlohmann::json::parse(in, nullptr, false);
    has_template = config.is_object() && config.contains("chat_template");
  }
  if (!has_template) return nullptr;
  return std::make_unique<ChatTemplate>(ChatTemplate::from_tokenizer_folder(folder));
}

std::string rng_state(const std::mt19937_64& rng) {
  std::ostringstream out;
  out << rng;
  return out.str();
}

double host_scalar(Backend& backend, const Buffer& device_value) {
  float value = 0;
  backend.copy(Tensor(&value, DType::F32, {1}), device_value.tensor());
  backend.synchronize();
  return value;
}

std::string format_bytes(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return text;
}

// The HF folder (config, weights, tokenizer files, generation_config.json), written into
// FOLDER.tmp and renamed, so a kill never leaves half a folder under the real name.
// With expert parallelism (`expert_group` of size > 1) every rank of the group calls this:
// each writes its experts' shard files into the same folder (save_hf_folder), the group's
// rank 0 the rest, then renames the finished folder.
void export_hf(const Model& model, const Recipe& recipe, const fs::path& folder,
               dist::Communicator* expert_group) {
  const fs::path temporary = folder.string() + ".tmp";
  const bool lead = !expert_group || expert_group->rank() == 0;
  if (lead) fs::remove_all(temporary);
  if (expert_group) expert_group->barrier(model.backend().stream());
  SaveOptions save;
  save.dtype = recipe.model.dtype;
  save.tokenizer_source = recipe.model.tokenizer;
  model.save_hf_folder(temporary, save);  // with expert parallelism: returns after the group's
  if (!lead) return;
  if (!fs::exists(temporary / "generation_config.json")) {
    const fs::path source =
        recipe.model.path ? *recipe.model.path : recipe.model.config->parent_path();
    if (fs::exists(source / "generation_config.json")) {
      fs::copy_file(source / "generation_config.json", temporary / "generation_config.json");
    } else {
      nlohmann::json generation = {{"_from_model_config", true}};
      for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id"})
        if (model.config().raw.contains(key)) generation[key] = model.config().raw[key];
      write_file_atomic(temporary / "generation_config.json", generation.dump(2) + "\n");
    }
  }
  fs::remove_all(folder);
  fs::rename(temporary, folder);
}

struct EvalResult {
  double loss = 0, accuracy = 0;
  int64_t tokens = 0;
};

// Loss and token accuracy on the held-out split, from its start every time.
// Several ranks: rank r evaluates batches b % world == r; the sums are all-reduced.
// With expert parallelism every rank of an EP group must run the same number of forwards
// (each one exchanges tokens): a rank without a batch in the last round evaluates that
// round's first batch again and discards the result.
EvalResult evaluate(Model& model, DataLoader& loader, const nlohmann::json& start_state,
                    const TrainingRecipe& t, ParallelContext* parallel) {
  const int rank = parallel ? parallel->rank() : 0, world = parallel ? parallel->world() : 1;
  loader.restore(start_state);
  const int64_t rows = loader.rows_per_epoch();
  const int64_t batches =
      t.eval_batches > 0 ? t.eval_batches : (rows + t.micro_batch - 1) / t.micro_batch;
  const bool lockstep = parallel && parallel->layout().expert_parallel > 1;
  double loss_sum = 0, correct = 0;
  int64_t tokens = 0, rows_done = 0, b = 0;
  std::optional<Batch> round_first;
  bool evaluated_in_round = false;
  for (; b < batches && rows_done < rows; ++b) {
    const int64_t size = std::min(t.micro_batch, rows - rows_done);
    Batch batch = loader.next(size);
    rows_done += size;
    if (b % world == 0) round_first = batch, evaluated_in_round = false;
    if (b % world != rank) continue;
    const StepResult result = model.evaluate(view_of(batch));
    evaluated_in_round = true;
    loss_sum += result.loss_sum;
    correct += result.correct;
    tokens += result.trained_tokens;
  }
  if (lockstep && b % world != 0 && !evaluated_in_round && round_first)
    model.evaluate(view_of(*round_first));  // keeps the EP group's all-to-alls paired
  if (parallel) {
    double sums[3] = {loss_sum, correct, static_cast<double>(tokens)};
    all_reduce_host(*parallel->groups.world, model.backend(), sums);
    loss_sum = sums[0];
    correct = sums[1];
    tokens = static_cast<int64_t>(sums[2]);
  }
  EvalResult out;
  out.tokens = tokens;
  out.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : NAN;
  out.accuracy = tokens > 0 ? correct / static_cast<double>(tokens) : NAN;
  return out;
}

ProgressMode progress_mode(ProgressStyle style) {
  switch (style) {
    case ProgressStyle::Bar:
      return ProgressMode::Bar;
    case ProgressStyle::Plain:
      return ProgressMode::Plain;
    case ProgressStyle::None:
      return ProgressMode::None;
    case ProgressStyle::Auto:
      break;
  }
  return ::isatty(STDOUT_FILENO) ? ProgressMode::Bar : ProgressMode::Plain;
}

}  // namespace

TrainSummary train(const Recipe& recipe, const TrainOptions& options, Backend& device_backend) {
  using Clock = std::chrono::steady_clock;
  const TrainingRecipe& t = recipe.training;
  const fs::path out_dir = options.output_dir;
  const fs::path checkpoints_dir = out_dir / "checkpoints";
  ParallelContext* parallel = options.parallel;
  const int rank = parallel ? parallel->rank() : 0;
  const int world = parallel ? parallel->world() : 1;
  const bool main_rank = rank == 0;  // logs and writes the shared files
  fs::create_directories(out_dir);
  if (main_rank) remove_stale_temporaries(checkpoints_dir);

  // ---- which checkpoint to resume from -------------------------------------------------------
  std::optional<fs::path> resume_path = options.resume_from;
  if (!resume_path && options.resume_latest) {
    resume_path = latest_checkpoint(checkpoints_dir);
    if (!resume_path)
      std::printf("resume: no complete checkpoint in %s, starting from step 0\n",
                  checkpoints_dir.c_str());
  }
  nlohmann::json resumed;
  if (resume_path) resumed = read_trainer_state(*resume_path);

  // ---- backend, tokenizer, data -------------------------------------------------------------
  Backend* backend = &device_backend;
  const Tokenizer tokenizer = Tokenizer::from_folder(recipe.model.tokenizer);
  const std::unique_ptr<ChatTemplate> chat_template = load_chat_template(recipe);
  DataLoader train_loader(recipe.data, tokenizer, chat_template.get(), t.seq_len, t.seed,
                          Split::Train);
  std::unique_ptr<DataLoader> eval_loader;
  nlohmann::json eval_start;
  if (recipe.data.has_eval()) {
    eval_loader = std::make_unique<DataLoader>(recipe.data, tokenizer, chat_template.get(),
                                               t.seq_len, t.seed, Split::Eval);
    eval_start = eval_loader->state();
  }
  if (train_loader.rows_per_epoch() == 0)
    fail("data.train: no training example survived tokenization");

  const int64_t global_rows = t.global_batch_rows();
  const int64_t accumulation = t.grad_accumulation();
  const int64_t total_steps =
      t.max_steps ? *t.max_steps
                  : std::max<int64_t>(
                        1, static_cast<int64_t>(std::ceil(
                               *t.epochs * static_cast<double>(train_loader.rows_per_epoch()) /
                               static_cast<double>(global_rows))));
  if (accumulation % world != 0)
    fail("training.global_batch_sequences (or global_batch_tokens): a step of ", global_rows,
         " rows is ", accumulation, " micro-batches of ", t.micro_batch, ", not a multiple of the ",
         world, " ranks (each rank trains its own micro-batches)");

  // ---- model and optimizer ------------------------------------------------------------------
  ModelOptions model_options;
  model_options.param_dtype = recipe.model.dtype;
  model_options.grad_dtype = DType::F32;
  model_options.recompute_layers = t.recompute;
  if (parallel) model_options.expert_comm = parallel->groups.expert.get();  // size 1: all experts
  // Optimizer in the backward: AdamW per gradient group inside the gradient-ready hook (with
  // several ranks after the group's reduction), the gradients held per group only (the hook
  // is installed below). Each rank must train one micro-batch per step.
  const bool optimizer_in_backward = recipe.optimizer_in_backward(world);
  if (optimizer_in_backward) model_options.grad_storage = GradientStorage::PerGroup;
  std::unique_ptr<Model> model =
      recipe.model.path ? Model::from_hf_folder(*recipe.model.path, *backend, model_options)
                        : Model::random_init(load_model_config(*recipe.model.config), t.seed,
                                             *backend, model_options);
  if (model->config().vocab_size < tokenizer.vocab_size())
    fail("model: the tokenizer has ", tokenizer.vocab_size(),
         " tokens but the model's vocab_size is ", model->config().vocab_size);
  for (Parameter& parameter : model->parameters())
    parameter.decay = recipe.optimizer.decays(parameter.name);
  if (recipe.optimizer.master_weights == DType::BF16)
    fail(
        "optimizer.master_weights: bf16 (updating bf16 weights without an fp32 copy) is not "
        "implemented yet; use fp32");
  AdamWConfig adamw_config;
  adamw_config.lr = static_cast<float>(recipe.optimizer.lr);
  adamw_config.beta1 = static_cast<float>(recipe.optimizer.beta1);
  adamw_config.beta2 = static_cast<float>(recipe.optimizer.beta2);
  adamw_config.eps = static_cast<float>(recipe.optimizer.eps);
  adamw_config.weight_decay = static_cast<float>(recipe.optimizer.weight_decay);
  // One process: AdamW over whole tensors. Several: the data-parallel optimizer, its
  // gradient reductions started per group from the backward of a step's last micro-batch.
  std::unique_ptr<AdamW> single_optimizer;
  std::unique_ptr<DataParallelAdamW> dp_optimizer;
  bool reduce_in_backward = false;
  if (parallel) {
    DataParallelOptions dp_options;
    dp_options.zero_stage = static_cast<int>(recipe.parallel.zero_stage);
    dp_options.overlap_communication = recipe.parallel.overlap_communication;
    dp_optimizer = std::make_unique<DataParallelAdamW>(
        model->parameters(), model->gradient_groups(), *backend, adamw_config,
        *parallel->groups.world, *parallel->groups.expert_dp, dp_options);
    model->set_gradient_ready_hook([&](size_t group) {
      if (reduce_in_backward) dp_optimizer->reduce_group(group);
    });
  } else {
    single_optimizer = std::make_unique<AdamW>(model->parameters(), *backend, adamw_config);
  }
  auto optimizer_steps = [&] {
    return dp_optimizer ? dp_optimizer->step_count() : single_optimizer->step_count();
  };
  const int ep_rank = parallel ? parallel->layout().ep_rank(rank) : 0;
  const bool split_experts = parallel && parallel->layout().expert_parallel > 1;
  const LrSchedule schedule = recipe.scheduler.make(recipe.optimizer.lr, total_steps);

  std::vector<Tensor> grads;
  for (const Parameter& parameter : model->parameters()) grads.push_back(parameter.grad);
  Buffer grad_norm_squared(DType::F32, {1}, backend->device());
  // Optimizer in the backward: each group's squared norm (for the log and the non-finite
  // guard, which can then only stop the run) and its update, while its gradients exist; on
  // a side stream beside the rest of the backward where the backend has streams (CUDA). One
  // process, with InBackwardOptions::fuse_expert_updates (off by default), the expert weights
  // would be updated inside their gradient GEMMs, their gradients never stored.
  std::unique_ptr<InBackwardOptimizer> in_backward;
  if (optimizer_in_backward && dp_optimizer) {
    model->set_gradient_ready_hook({});  // InBackwardOptimizer's hook reduces and updates
    in_backward = std::make_unique<InBackwardOptimizer>(*model, *dp_optimizer, InBackwardOptions{});
  } else if (optimizer_in_backward) {
    in_backward =
        std::make_unique<InBackwardOptimizer>(*model, *single_optimizer, InBackwardOptions{});
  }

  // What a checkpoint holds, by name (the tensors stay where they live). With experts split
  // over EP ranks, expert weights go to rank-R/experts.safetensors instead.
  auto model_tensors = [&](bool experts) {
    std::vector<CheckpointTensor> list;
    for (const Parameter& parameter : model->parameters())
      if ((parameter.expert && split_experts) == experts)
        list.push_back({parameter.name, parameter.value});
    return list;
  };
  auto optimizer_tensors = [&] {
    std::vector<CheckpointTensor> list;
    for (const auto& state : single_optimizer->state_tensors())
      list.push_back({state.name, state.tensor});
    return list;
  };
  // The single-process AdamW state as whole-tensor "shards" (to load a distributed checkpoint).
  auto whole_optimizer_shards = [&] {
    std::vector<OptimizerShard> shards;
    const auto states = single_optimizer->state_tensors();
    for (const Parameter& parameter : model->parameters()) {
      OptimizerShard shard{parameter.name,          parameter.value.numel(), 0,
                           parameter.value.numel(), parameter.expert,        {}};
      for (const auto& state : states)
        if (state.name.substr(state.name.find('.') + 1) == parameter.name)
          shard.tensors.emplace_back(state.name, state.tensor);
      shards.push_back(std::move(shard));
    }
    return shards;
  };

  // ---- the run's state (what a checkpoint saves besides tensors)
  // ---------------------------------
  int64_t step = 0;         // optimizer steps done
  int64_t tokens_seen = 0;  // input tokens of all steps done
  int64_t bad_in_row = 0, bad_total = 0;
  double elapsed_before = 0;    // seconds spent in earlier (resumed) processes
  std::mt19937_64 rng(t.seed);  // for anything random in the loop (none yet beyond the data)
  double window_loss = 0, window_time = 0;  // the logging window: steps since the last log row
  int64_t window_steps = 0, window_tokens = 0;

  if (resume_path) {
    step = resumed.at("step").get<int64_t>();
    tokens_seen = resumed.at("tokens_seen").get<int64_t>();
    bad_in_row = resumed.at("bad_steps_in_row").get<int64_t>();
    bad_total = resumed.at("bad_steps_total").get<int64_t>();
    elapsed_before = resumed.at("elapsed_s").get<double>();
    train_loader.restore(resumed.at("train_loader"));
    std::istringstream(resumed.at("rng").get<std::string>()) >> rng;
    const auto& window = resumed.at("log_window");
    window_loss = window.at("loss_sum").get<double>();
    window_steps = window.at("steps").get<int64_t>();
    window_tokens = window.at("tokens").get<int64_t>();
    window_time = window.at("seconds").get<double>();
    const int64_t saved_ep =
        resumed.value("parallel", nlohmann::json::object()).value("expert_parallel", int64_t{1});
    const int64_t ep = parallel ? parallel->layout().expert_parallel : 1;
    if (saved_ep != ep)
      fail("resume: the checkpoint ", resume_path->string(), " was written with expert_parallel ",
           saved_ep, ", this run has ", ep, " (the expert slices differ; not supported)");
    load_checkpoint_tensors(*resume_path / "model.safetensors", model_tensors(false), *backend);
    if (split_experts)
      load_checkpoint_tensors(
          *resume_path / ("rank-" + std::to_string(ep_rank)) / "experts.safetensors",
          model_tensors(true), *backend);
    // Any data-parallel size and zero stage: the saved element ranges are cut again.
    if (dp_optimizer) {
      const auto shards = dp_optimizer->state_shards();
      load_optimizer_shards(*resume_path, shards, ep_rank, *backend);
      dp_optimizer->set_step_count(resumed.at("optimizer_steps").get<int64_t>());
    } else {
      if (is_distributed_checkpoint(*resume_path)) {
        const auto shards = whole_optimizer_shards();
        load_optimizer_shards(*resume_path, shards, 0, *backend);
      } else {
        load_checkpoint_tensors(*resume_path / "optimizer.safetensors", optimizer_tensors(),
                                *backend);
      }
      single_optimizer->set_step_count(resumed.at("optimizer_steps").get<int64_t>());
    }
    if (resumed.value("total_steps", total_steps) != total_steps)
      std::printf(
          "resume: note: the recipe now gives %lld total steps (the checkpoint's run had %lld)\n",
          static_cast<long long>(total_steps),
          static_cast<long long>(resumed.value("total_steps", int64_t{0})));
  }

  // Only rank 0 writes the shared files (recipe.yaml, metrics.jsonl, loss.svg).
  if (main_rank) write_file_atomic(out_dir / "recipe.yaml", resolved_recipe_yaml(recipe));
  std::optional<MetricsLog> metrics_log;
  if (main_rank)
    metrics_log.emplace(out_dir / "metrics.jsonl",
                        resume_path ? std::optional<int64_t>(step) : std::nullopt);
  auto log_metrics = [&](const nlohmann::json& row) {
    if (metrics_log) metrics_log->append(row);
  };
  auto plot_losses = [&] {
    if (metrics_log)
      write_loss_svg(out_dir / "loss.svg", metrics_log->train_losses(), metrics_log->eval_losses(),
                     "moetune: training loss");
  };

  // ---- say what is about to happen ------------------------------------------------------------
  if (main_rank) {
    MemoryPlanOptions plan_options;
    plan_options.param_dtype = recipe.model.dtype;
    plan_options.grad_dtype = DType::F32;
    plan_options.batch = t.micro_batch;
    plan_options.seq = t.seq_len;
    plan_options.per_group_grads = optimizer_in_backward;
    plan_options.gradient_arenas = model->gradient_arenas();
    plan_options.fused_expert_updates = in_backward && in_backward->fuses_expert_updates();
    if (parallel) {
      plan_options.expert_parallel = parallel->layout().expert_parallel;
      plan_options.data_parallel = parallel->layout().data_parallel;
      plan_options.zero_stage = static_cast<int>(recipe.parallel.zero_stage);
    }
    const MemoryPlan plan = plan_memory(model->config(), plan_options);
    std::printf("moetune train: %s (%s, %.2fM parameters) on %s\n",
                model->config().model_type.c_str(),
                recipe.model.path ? "from HF weights" : "random init",
                static_cast<double>(model->num_parameters(false)) / 1e6, backend->name().c_str());
    std::printf(
        "  data: %lld train rows of %lld tokens%s; %lld steps of %lld rows (%lld micro-batches of "
        "%lld)\n",
        static_cast<long long>(train_loader.rows_per_epoch()), static_cast<long long>(t.seq_len),
        eval_loader ? ", held-out split for eval" : "", static_cast<long long>(total_steps),
        static_cast<long long>(global_rows), static_cast<long long>(accumulation),
        static_cast<long long>(t.micro_batch));
    std::printf("  memory plan: %s (weights %s, grads %s, optimizer %s, activations %s)\n",
                format_bytes(plan.total()).c_str(), format_bytes(plan.weights).c_str(),
                format_bytes(plan.grads).c_str(),
                format_bytes(plan.optimizer_state + plan.master_weights).c_str(),
                format_bytes(plan.activations + plan.scratch).c_str());
    if (optimizer_in_backward)
      std::printf(
          "  optimizer in the backward: each gradient group is %supdated as soon as the backward "
          "finishes it%s (training.optimizer_in_backward)\n",
          parallel ? "reduced over the ranks and " : "",
          plan_options.fused_expert_updates ? ", the expert weights inside their gradient GEMMs"
                                            : "");
    if (parallel)
      std::printf(
          "  parallel: %d ranks (data_parallel %d x expert_parallel %d), zero_stage %lld, %s; "
          "optimizer state + gradient shards %s per rank\n",
          world, parallel->layout().data_parallel, parallel->layout().expert_parallel,
          static_cast<long long>(recipe.parallel.zero_stage),
          parallel->groups.world->name().c_str(),
          format_bytes(dp_optimizer->state_bytes()).c_str());
    std::printf("  output: %s%s\n", out_dir.c_str(),
                resume_path ? (" (resumed from " + resume_path->string() + ")").c_str() : "");
    std::fflush(stdout);
  }

  TrainSummary summary;
  summary.start_step = step;
  summary.total_steps = total_steps;
  Progress progress(main_rank ? progress_mode(recipe.logging.progress) : ProgressMode::None,
                    total_steps, step);
  StopSignals stop;
  const auto run_started = Clock::now();
  auto elapsed = [&] {
    return elapsed_before + std::chrono::duration<double>(Clock::now() - run_started).count();
  };

  auto save_checkpoint = [&] {
    CheckpointContents contents;
    contents.step = step;
    if (main_rank) contents.model = model_tensors(false);
    if (!parallel) contents.optimizer = optimizer_tensors();
    contents.trainer_state = {
        {"step", step},
        {"total_steps", total_steps},
        {"tokens_seen", tokens_seen},
        {"optimizer_steps", optimizer_steps()},
        {"bad_steps_in_row", bad_in_row},
        {"bad_steps_total", bad_total},
        {"elapsed_s", elapsed()},
        {"lr_next", schedule.lr(step)},
        {"train_loader", train_loader.state()},
        {"rng", rng_state(rng)},
        {"log_window",
         {{"loss_sum", window_loss},
          {"steps", window_steps},
          {"tokens", window_tokens},
          {"seconds", window_time}}},
        {"recipe", resolved_recipe_yaml(recipe)},
        {"parallel",
         {{"world", world},
          {"expert_parallel", parallel ? parallel->layout().expert_parallel : 1},
          {"zero_stage", parallel ? recipe.parallel.zero_stage : 0}}},
    };
    // Several ranks: rank 0 opens step-N.tmp, every rank writes its rank-R/ part into it,
    // rank 0 renames it once all parts are there.
    auto write_rank_part = [&](const fs::path& temporary) {
      parallel->barrier("checkpoint-open");
      write_optimizer_shards(temporary, rank, ep_rank, dp_optimizer->state_shards(), *backend);
      if (split_experts && parallel->layout().dp_rank(rank) == 0)
        write_checkpoint_tensors(
            temporary / ("rank-" + std::to_string(rank)) / "experts.safetensors",
            model_tensors(true), *backend);
      parallel->barrier("checkpoint-parts");
    };
    if (parallel) contents.add_parts = write_rank_part;
    if (main_rank) {
      const fs::path path = write_training_checkpoint(checkpoints_dir, contents, *backend);
      prune_checkpoints(checkpoints_dir, recipe.checkpoint.keep_last);
      plot_losses();
      progress.message("checkpoint: " + path.string());
    } else {
      write_rank_part(checkpoint_temporary_path(checkpoints_dir, step));
    }
    // No barrier after: the other ranks go on and wait in the next collective while rank 0
    // writes the model (which can take longer than the store's timeout for a large model).
  };
  // The HF folder: the first data-parallel replica's ranks (rank 0 alone without expert
  // parallelism, else its EP group, each rank its experts); the others go on to the next
  // collective, no barrier (see save_checkpoint).
  auto export_hf_folder = [&](const fs::path& folder) {
    if (!parallel) return export_hf(*model, recipe, folder, nullptr);
    if (parallel->layout().dp_rank(rank) != 0) return;  // the first replica writes
    dist::Communicator* experts = parallel->groups.expert.get();
    export_hf(*model, recipe, folder, experts->size() > 1 ? experts : nullptr);
  };
  auto run_eval = [&] {
    if (!eval_loader) return;
    const EvalResult result = evaluate(*model, *eval_loader, eval_start, t, parallel);
    log_metrics({{"step", step},
                 {"eval", true},
                 {"eval_loss", result.loss},
                 {"eval_accuracy", result.accuracy},
                 {"eval_tokens", result.tokens},
                 {"elapsed_s", elapsed()}});
    summary.eval_loss = result.loss;
    summary.eval_accuracy = result.accuracy;
    char line[160];
    std::snprintf(line, sizeof(line),
                  "eval at step %lld: loss %.4f, token accuracy %.2f%% (%lld tokens)",
                  static_cast<long long>(step), result.loss, 100.0 * result.accuracy,
                  static_cast<long long>(result.tokens));
    progress.message(line);
  };

  // ---- the loop ---------------------------------------------------------------------------------
  bool have_first_loss = false;
  bool stop_agreed = false;  // several ranks: some rank had a stop signal at the last step
  auto stop_requested = [&] {
    return (parallel ? stop_agreed : stop.requested()) ||
           (options.stop_after_steps && step >= *options.stop_after_steps);
  };
  while (step < total_steps && !stop_requested()) {
    const auto step_started = Clock::now();

    // 1. The step's micro-batches, and the trained tokens they hold together.
    std::vector<Batch> micro_batches;
    int64_t step_trained_tokens = 0, step_tokens = 0;
    for (int64_t m = 0; m < accumulation; ++m) {
      micro_batches.push_back(train_loader.next(t.micro_batch));
      step_trained_tokens += micro_batches.back().trained_tokens();
      step_tokens += micro_batches.back().batch_size * micro_batches.back().seq_len;
    }
    const float loss_scale =
        step_trained_tokens > 0 ? 1.0f / static_cast<float>(step_trained_tokens) : 0.0f;

    // 2. Forward and backward, gradients accumulating over the micro-batches (this rank's:
    //    m % world == rank); several ranks: the last one's backward starts the reductions.
    model->zero_grads();
    if (in_backward)
      in_backward->begin_step(static_cast<float>(schedule.lr(step)));  // as optimizer.step gets it
    double loss_sum = 0, aux_loss = 0;
    bool has_aux = false;
    for (int64_t m = rank; m < accumulation; m += world) {
      reduce_in_backward = m + world >= accumulation;
      const StepResult result =
          model->forward_backward(view_of(micro_batches[static_cast<size_t>(m)]), loss_scale);
      loss_sum += result.loss_sum;
      aux_loss += result.aux_loss;
      has_aux = has_aux || result.has_aux_loss;
    }
    reduce_in_backward = false;
    if (parallel) {
      if (!in_backward) dp_optimizer->finish_reduction();
      double sums[4] = {loss_sum, aux_loss, has_aux ? 1.0 : 0.0, stop.requested() ? 1.0 : 0.0};
      all_reduce_host(*parallel->groups.world, *backend, sums);
      loss_sum = sums[0];
      aux_loss = sums[1];
      has_aux = sums[2] > 0;
      stop_agreed = sums[3] > 0;
    }
    const double loss =
        step_trained_tokens > 0 ? loss_sum / static_cast<double>(step_trained_tokens) : NAN;

    // 3. Global gradient norm, the non-finite guard, clipping.
    double grad_norm = 0;
    if (in_backward) {
      grad_norm = in_backward->grad_norm();
    } else if (dp_optimizer) {
      grad_norm = std::sqrt(dp_optimizer->grad_norm_squared());
    } else {
      backend->grad_norm_squared(grads, grad_norm_squared);
      grad_norm = std::sqrt(host_scalar(*backend, grad_norm_squared));
    }
    const double lr = schedule.lr(step);
    const bool finite = std::isfinite(loss) && std::isfinite(grad_norm);
    if (!finite) {
      if (dp_optimizer) dp_optimizer->discard();
      ++bad_in_row;
      ++bad_total;
      progress.message("step " + std::to_string(step + 1) + ": " +
                       (step_trained_tokens == 0 ? std::string("no trained tokens")
                                                 : "non-finite loss or gradient") +
                       ", update skipped (" + std::to_string(bad_in_row) + " in a row)");
      if (bad_in_row >= t.max_bad_steps)
        fail("stopping: ", bad_in_row,
             " steps in a row had a non-finite loss or gradient (last at step ", step + 1,
             "); lower optimizer.lr, set optimizer.grad_clip, or check the data "
             "(training.max_bad_steps = ",
             t.max_bad_steps, ")");
    } else {
      bad_in_row = 0;
      const double max_norm = recipe.optimizer.grad_clip;
      const double clip = max_norm > 0 ? std::min(1.0, max_norm / (grad_norm + 1e-6)) : 1.0;
      // 4. AdamW at the schedule's lr (done in the backward with optimizer_in_backward).
      if (!optimizer_in_backward && dp_optimizer)
        dp_optimizer->step(static_cast<float>(lr), static_cast<float>(clip));
      else if (!optimizer_in_backward)
        single_optimizer->step(static_cast<float>(lr), static_cast<float>(clip));
    }
    ++step;
    tokens_seen += step_tokens;
    backend->synchronize();
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_started).count();

    // 5. Log, evaluate, checkpoint, export.
    if (finite) {
      if (!have_first_loss) summary.first_loss = loss;
      have_first_loss = true;
      summary.last_loss = loss;
      window_loss += loss;
      ++window_steps;
    }
    window_tokens += step_tokens;
    window_time += step_seconds;
    if (step % recipe.logging.every == 0 || step == total_steps) {
      const double window_mean =
          window_steps > 0 ? window_loss / static_cast<double>(window_steps) : NAN;
      const double tokens_per_s =
          window_time > 0 ? static_cast<double>(window_tokens) / window_time : 0.0;
      nlohmann::json row = {{"step", step},
                            {"loss", window_mean},
                            {"lr", lr},
                            {"grad_norm", grad_norm},
                            {"tokens", tokens_seen},
                            {"trained_tokens", step_trained_tokens},
                            {"tokens_per_s", tokens_per_s},
                            {"elapsed_s", elapsed()}};
      if (has_aux) row["aux_loss"] = aux_loss / static_cast<double>(accumulation);
      log_metrics(row);
      progress.update({step, window_mean, lr, grad_norm, tokens_per_s, elapsed()});
      window_loss = window_time = 0;
      window_steps = window_tokens = 0;
    }
    if (t.eval_every > 0 && step % t.eval_every == 0 && step < total_steps) run_eval();
    const bool stopping = stop_requested() && step < total_steps;
    if (stopping ||
        (recipe.checkpoint.every > 0 && step % recipe.checkpoint.every == 0 && step < total_steps))
      save_checkpoint();
    if (recipe.checkpoint.hf_export_every > 0 && step % recipe.checkpoint.hf_export_every == 0 &&
        step < total_steps)
      export_hf_folder(out_dir / ("hf-step-" + std::to_string(step)));
  }

  // ---- the end: final eval, checkpoint, HF folder, plot
  // ------------------------------------------
  summary.steps = step;
  summary.skipped_steps = bad_total;
  if (stop_requested() && step < total_steps) {
    progress.finish();
    summary.interrupted = true;
    if (step == summary.start_step) save_checkpoint();  // stopped before the first step
    if (main_rank)
      std::printf(
          "%s: stopped after step %lld of %lld; checkpoint written. Continue with --resume.\n",
          stop.requested() ? (std::string(stop.name()) + " received").c_str()
                           : "--stop-after-steps",
          static_cast<long long>(step), static_cast<long long>(total_steps));
    return summary;
  }
  run_eval();
  progress.finish();
  save_checkpoint();
  if (recipe.checkpoint.save_final_hf) {
    export_hf_folder(out_dir / "hf");
    if (main_rank) std::printf("HF folder: %s\n", (out_dir / "hf").c_str());
  }
  plot_losses();
  if (main_rank)
    std::printf(
        "done: %lld steps in %s; loss %.4f -> %.4f%s\n", static_cast<long long>(step),
        format_duration(elapsed()).c_str(), summary.first_loss, summary.last_loss,
        bad_total > 0 ? (" (" + std::to_string(bad_total) + " steps skipped)").c_str() : "");
  std::fflush(stdout);
  return summary;
}

}  // namespace moetune
