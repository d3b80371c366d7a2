// Recipe parsing (see recipe.h). Order of work: clone the YAML tree, apply the command-line
// overrides to it, make relative paths absolute, then validate section by section with the
// shared typed getters of core/config_keys.h (which name the key and suggest the closest
// one). The resolved recipe is written back as YAML from the parsed values, so what the
// output folder records is exactly what the run used.
#include "train/recipe.h"

#include <array>
#include <charconv>
#include <cmath>
#include <sstream>
#include <string_view>

#include "core/config_keys.h"
#include "core/error.h"

namespace moetune {

namespace fs = std::filesystem;

namespace {

constexpr std::array<std::string_view, 8> kSections = {
    "model", "data", "training", "optimizer", "scheduler", "checkpoint", "logging", "parallel"};
constexpr std::array<std::string_view, 4> kModelKeys = {"path", "config", "tokenizer", "dtype"};
constexpr std::array<std::string_view, 12> kTrainingKeys = {"max_steps",
                                                            "epochs",
                                                            "global_batch_sequences",
                                                            "global_batch_tokens",
                                                            "micro_batch",
                                                            "seq_len",
                                                            "seed",
                                                            "eval_every",
                                                            "eval_batches",
                                                            "max_bad_steps",
                                                            "recompute",
                                                            "optimizer_in_backward"};
constexpr std::array<std::string_view, 7> kOptimizerKeys = {
    "lr", "betas", "eps", "weight_decay", "no_decay", "grad_clip", "master_weights"};
constexpr std::array<std::string_view, 5> kSchedulerKeys = {"type", "warmup_steps", "warmup_ratio",
                                                            "min_lr", "min_lr_ratio"};
constexpr std::array<std::string_view, 4> kCheckpointKeys = {"every", "keep_last",
                                                             "hf_export_every", "save_final_hf"};
constexpr std::array<std::string_view, 2> kLoggingKeys = {"every", "progress"};
constexpr std::array<std::string_view, 5> kParallelKeys = {
    "device", "data_parallel", "expert_parallel", "zero_stage", "overlap_communication"};
constexpr std::array<std::string_view, 2> kFloatDtypes = {"fp32", "bf16"};

DType float_dtype(const std::string& name) { return name == "bf16" ? DType::BF16 : DType::F32; }
const char* float_dtype_name(DType dtype) { return dtype == DType::BF16 ? "bf16" : "fp32"; }

fs::path absolute_from(const fs::path& base_dir, const std::string& value) {
  fs::path path(value);
  return (path.is_absolute() ? path : base_dir / path).lexically_normal();
}

// data.train / data.eval: a path, a list of paths, or a list of {path: ...} maps.
void absolutize_sources(YAML::Node sources, const fs::path& base_dir) {
  if (!sources) return;
  if (sources.IsScalar()) {
    sources = absolute_from(base_dir, sources.as<std::string>()).string();
    return;
  }
  if (!sources.IsSequence()) return;  // parse_data_config reports the shape error
  for (size_t i = 0; i < sources.size(); ++i) {
    YAML::Node entry = sources[i];
    if (entry.IsScalar()) {
      entry = absolute_from(base_dir, entry.as<std::string>()).string();
    } else if (entry.IsMap() && entry["path"] && entry["path"].IsScalar()) {
      entry["path"] = absolute_from(base_dir, entry["path"].as<std::string>()).string();
    }
  }
}

void absolutize_paths(YAML::Node root, const fs::path& base_dir) {
  YAML::Node model = root["model"];
  if (model && model.IsMap()) {
    for (const char* key : {"path", "config", "tokenizer"}) {
      YAML::Node value = model[key];
      if (value && value.IsScalar())
        value = absolute_from(base_dir, value.as<std::string>()).string();
    }
  }
  YAML::Node data = root["data"];
  if (data && data.IsMap()) {
    absolutize_sources(data["train"], base_dir);
    absolutize_sources(data["eval"], base_dir);
    YAML::Node chat_template = data["chat_template"];
    if (chat_template && chat_template.IsScalar())
      chat_template = absolute_from(base_dir, chat_template.as<std::string>()).string();
  }
}

void apply_override(YAML::Node& root, const RecipeOverride& override_) {
  std::vector<std::string> parts;
  std::stringstream stream(override_.key);
  for (std::string part; std::getline(stream, part, '.');) {
    if (part.empty()) fail("override --", override_.key, ": empty key component");
    parts.push_back(part);
  }
  if (parts.size() < 2)
    fail("override --", override_.key, ": expected section.key=value (e.g. --optimizer.lr=2e-5)");
  YAML::Node value;
  try {
    value = YAML::Load(override_.value);
  } catch (const YAML::Exception& error) {
    fail("override --", override_.key, "=", override_.value, ": not a valid YAML value (",
         error.msg, ")");
  }
  YAML::Node node;
  node.reset(root);
  std::string path;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    path = config_key_path(path, parts[i]);
    YAML::Node child = node[parts[i]];
    if (!child || child.IsNull()) {
      node[parts[i]] = YAML::Node(YAML::NodeType::Map);
      child.reset(node[parts[i]]);
    } else if (!child.IsMap()) {
      fail("override --", override_.key, ": ", path, " is not a section");
    }
    node.reset(child);
  }
  node[parts.back()] = value;
}

std::pair<double, double> get_betas(const YAML::Node& section, const OptimizerRecipe& defaults) {
  const YAML::Node node = section["betas"];
  if (!node || node.IsNull()) return {defaults.beta1, defaults.beta2};
  if (!node.IsSequence() || node.size() != 2)
    fail("optimizer.betas: expected a list of two numbers like [0.9, 0.999], got ",
         describe_node(node));
  double betas[2];
  for (size_t i = 0; i < 2; ++i) {
    try {
      betas[i] = node[i].as<double>();
    } catch (const YAML::Exception&) {
      fail("optimizer.betas: expected a list of two numbers, got ", describe_node(node));
    }
    check_range(betas[i], 0.0, 1.0 - 1e-12, "optimizer.betas");
  }
  return {betas[0], betas[1]};
}

// The shortest text that reads back as the same double ("0.003", not "0.0030000000000000001").
std::string shortest(double value) {
  char text[64];
  const auto result = std::to_chars(text, text + sizeof(text), value);
  return std::string(text, result.ptr);
}
std::string shortest(int64_t value) { return std::to_string(value); }

void emit_optional(YAML::Emitter& out, const char* key, const auto& value) {
  if (value) out << YAML::Key << key << YAML::Value << shortest(*value);
}

}  // namespace

int64_t TrainingRecipe::global_batch_rows() const {
  if (global_batch_sequences) return *global_batch_sequences;
  return *global_batch_tokens / seq_len;
}

bool OptimizerRecipe::decays(const std::string& name) const {
  for (const auto& pattern : no_decay)
    if (name.find(pattern) != std::string::npos) return false;
  return true;
}

LrSchedule SchedulerRecipe::make(double base_lr, int64_t total_steps) const {
  LrSchedule schedule;
  schedule.type = type;
  schedule.base_lr = base_lr;
  schedule.total_steps = total_steps;
  // Transformers' TrainingArguments.get_warmup_steps: ceil(total * ratio).
  if (warmup_steps)
    schedule.warmup_steps = *warmup_steps;
  else if (warmup_ratio)
    schedule.warmup_steps =
        static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * *warmup_ratio));
  if (min_lr_ratio)
    schedule.min_lr_ratio = *min_lr_ratio;
  else if (min_lr)
    schedule.min_lr_ratio = base_lr > 0 ? *min_lr / base_lr : 0.0;
  return schedule;
}

RecipeOverride parse_override(const std::string& argument) {
  std::string_view text(argument);
  while (!text.empty() && text.front() == '-') text.remove_prefix(1);
  const size_t equals = text.find('=');
  if (equals == std::string_view::npos || equals == 0)
    fail("override '", argument, "': expected --section.key=value (e.g. --optimizer.lr=2e-5)");
  return {std::string(text.substr(0, equals)), std::string(text.substr(equals + 1))};
}

Recipe parse_recipe(const YAML::Node& input, const fs::path& base_dir, const fs::path& source,
                    const std::vector<RecipeOverride>& overrides) {
  Recipe recipe;
  recipe.source = source;
  YAML::Node root = input && !input.IsNull() ? YAML::Clone(input) : YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap())
    fail(source.string(), ": a recipe is a YAML map of sections (model, data, training, ...)");
  for (const auto& override_ : overrides) apply_override(root, override_);
  absolutize_paths(root, base_dir);
  check_known_keys(root, kSections, "");
  recipe.tree = root;

  // ---- model ----
  const YAML::Node model = root["model"];
  if (!model || model.IsNull())
    fail("model: the recipe needs a model section (model.path or model.config)");
  check_known_keys(model, kModelKeys, "model");
  if (auto path = get_optional_string(model, "path", "model")) recipe.model.path = *path;
  if (auto config = get_optional_string(model, "config", "model")) recipe.model.config = *config;
  if (recipe.model.path.has_value() == recipe.model.config.has_value())
    fail(
        "model: set exactly one of model.path (an HF folder) and model.config (a config.json for "
        "random init)");
  if (recipe.model.path && !fs::is_directory(*recipe.model.path))
    fail("model.path: ", recipe.model.path->string(), " is not a folder");
  if (recipe.model.config && !fs::is_regular_file(*recipe.model.config))
    fail("model.config: ", recipe.model.config->string(), " does not exist");
  const fs::path default_tokenizer =
      recipe.model.path ? *recipe.model.path : recipe.model.config->parent_path();
  recipe.model.tokenizer = get_string(model, "tokenizer", "model", default_tokenizer.string());
  if (!fs::is_regular_file(recipe.model.tokenizer / "tokenizer.json"))
    fail("model.tokenizer: no tokenizer.json in ", recipe.model.tokenizer.string());
  recipe.model.dtype = float_dtype(get_choice(model, "dtype", "model", kFloatDtypes, "fp32"));

  // ---- training ----
  const YAML::Node training = root["training"];
  check_known_keys(training, kTrainingKeys, "training");
  auto& t = recipe.training;
  t.max_steps = get_optional_int(training, "max_steps", "training");
  t.epochs = get_optional_double(training, "epochs", "training");
  if (t.max_steps.has_value() == t.epochs.has_value())
    fail("training: set exactly one of training.max_steps and training.epochs");
  if (t.max_steps) check_range(*t.max_steps, int64_t{1}, int64_t{1} << 40, "training.max_steps");
  if (t.epochs) check_range(*t.epochs, 1e-9, 1e9, "training.epochs");
  t.seq_len = get_int(training, "seq_len", "training", t.seq_len);
  check_range(t.seq_len, int64_t{2}, int64_t{1} << 24, "training.seq_len");
  t.micro_batch = get_int(training, "micro_batch", "training", t.micro_batch);
  check_range(t.micro_batch, int64_t{1}, int64_t{1} << 20, "training.micro_batch");
  t.global_batch_sequences = get_optional_int(training, "global_batch_sequences", "training");
  t.global_batch_tokens = get_optional_int(training, "global_batch_tokens", "training");
  if (t.global_batch_sequences && t.global_batch_tokens)
    fail(
        "training: set only one of training.global_batch_sequences and "
        "training.global_batch_tokens");
  if (!t.global_batch_sequences && !t.global_batch_tokens) t.global_batch_sequences = t.micro_batch;
  if (t.global_batch_tokens) {
    check_range(*t.global_batch_tokens, t.seq_len, int64_t{1} << 40,
                "training.global_batch_tokens");
    if (*t.global_batch_tokens % t.seq_len != 0)
      fail("training.global_batch_tokens (", *t.global_batch_tokens,
           ") is not a multiple of training.seq_len (", t.seq_len, ")");
  } else {
    check_range(*t.global_batch_sequences, int64_t{1}, int64_t{1} << 30,
                "training.global_batch_sequences");
  }
  if (t.global_batch_rows() % t.micro_batch != 0)
    fail("training: the global batch (", t.global_batch_rows(),
         " sequences) is not a multiple of training.micro_batch (", t.micro_batch,
         "), so the gradient accumulation would not be a whole number");
  t.seed =
      static_cast<uint64_t>(get_int(training, "seed", "training", static_cast<int64_t>(t.seed)));
  t.eval_every = get_int(training, "eval_every", "training", t.eval_every);
  check_range(t.eval_every, int64_t{0}, int64_t{1} << 40, "training.eval_every");
  t.eval_batches = get_int(training, "eval_batches", "training", t.eval_batches);
  check_range(t.eval_batches, int64_t{0}, int64_t{1} << 30, "training.eval_batches");
  t.max_bad_steps = get_int(training, "max_bad_steps", "training", t.max_bad_steps);
  check_range(t.max_bad_steps, int64_t{1}, int64_t{1} << 30, "training.max_bad_steps");
  t.recompute = get_bool(training, "recompute", "training", t.recompute);
  {
    constexpr std::array<std::string_view, 3> choices = {"auto", "true", "false"};
    const std::string choice =
        get_choice(training, "optimizer_in_backward", "training", choices, "auto");
    t.optimizer_in_backward =
        choice == "auto" ? std::nullopt : std::optional<bool>(choice == "true");
  }

  // ---- data (its own schema) ----
  const YAML::Node data = root["data"];
  if (!data || data.IsNull()) fail("data: the recipe needs a data section (data.train at least)");
  recipe.data = parse_data_config(data, base_dir);

  // ---- optimizer ----
  const YAML::Node optimizer = root["optimizer"];
  check_known_keys(optimizer, kOptimizerKeys, "optimizer");
  auto& o = recipe.optimizer;
  o.lr = get_double(optimizer, "lr", "optimizer", o.lr);
  check_range(o.lr, 0.0, 1e32, "optimizer.lr");
  std::tie(o.beta1, o.beta2) = get_betas(optimizer, o);
  o.eps = get_double(optimizer, "eps", "optimizer", o.eps);
  check_range(o.eps, 0.0, 1.0, "optimizer.eps");
  o.weight_decay = get_double(optimizer, "weight_decay", "optimizer", o.weight_decay);
  check_range(o.weight_decay, 0.0, 1e3, "optimizer.weight_decay");
  if (optimizer && optimizer["no_decay"])
    o.no_decay = get_string_list(optimizer, "no_decay", "optimizer");
  o.grad_clip = get_double(optimizer, "grad_clip", "optimizer", o.grad_clip);
  check_range(o.grad_clip, 0.0, 1e12, "optimizer.grad_clip");
  o.master_weights =
      float_dtype(get_choice(optimizer, "master_weights", "optimizer", kFloatDtypes, "fp32"));
  // The micro-batches per rank are checked by the trainer (it knows the ranks).
  if (t.optimizer_in_backward.value_or(false) && o.grad_clip != 0)
    fail("training.optimizer_in_backward: true needs optimizer.grad_clip: 0 (it is ", o.grad_clip,
         "): each gradient group is applied as soon as the backward finishes it, before the "
         "global norm is known; set it to auto or false");
  if (o.master_weights == DType::BF16 && recipe.model.dtype != DType::BF16)
    fail(
        "optimizer.master_weights: bf16 master weights need model.dtype: bf16 (the weights are "
        "fp32)");

  // ---- scheduler ----
  const YAML::Node scheduler = root["scheduler"];
  check_known_keys(scheduler, kSchedulerKeys, "scheduler");
  auto& s = recipe.scheduler;
  s.type = parse_schedule_type(get_string(scheduler, "type", "scheduler", "cosine"));
  s.warmup_steps = get_optional_int(scheduler, "warmup_steps", "scheduler");
  s.warmup_ratio = get_optional_double(scheduler, "warmup_ratio", "scheduler");
  if (s.warmup_steps && s.warmup_ratio)
    fail("scheduler: set only one of scheduler.warmup_steps and scheduler.warmup_ratio");
  if (s.warmup_steps)
    check_range(*s.warmup_steps, int64_t{0}, int64_t{1} << 40, "scheduler.warmup_steps");
  if (s.warmup_ratio) check_range(*s.warmup_ratio, 0.0, 1.0, "scheduler.warmup_ratio");
  s.min_lr = get_optional_double(scheduler, "min_lr", "scheduler");
  s.min_lr_ratio = get_optional_double(scheduler, "min_lr_ratio", "scheduler");
  if (s.min_lr && s.min_lr_ratio)
    fail("scheduler: set only one of scheduler.min_lr and scheduler.min_lr_ratio");
  if (s.min_lr) check_range(*s.min_lr, 0.0, o.lr, "scheduler.min_lr");
  if (s.min_lr_ratio) check_range(*s.min_lr_ratio, 0.0, 1.0, "scheduler.min_lr_ratio");

  // ---- checkpoint ----
  const YAML::Node checkpoint = root["checkpoint"];
  check_known_keys(checkpoint, kCheckpointKeys, "checkpoint");
  auto& c = recipe.checkpoint;
  c.every = get_int(checkpoint, "every", "checkpoint", c.every);
  check_range(c.every, int64_t{0}, int64_t{1} << 40, "checkpoint.every");
  c.keep_last = get_int(checkpoint, "keep_last", "checkpoint", c.keep_last);
  check_range(c.keep_last, int64_t{1}, int64_t{1} << 20, "checkpoint.keep_last");
  c.hf_export_every = get_int(checkpoint, "hf_export_every", "checkpoint", c.hf_export_every);
  check_range(c.hf_export_every, int64_t{0}, int64_t{1} << 40, "checkpoint.hf_export_every");
  c.save_final_hf = get_bool(checkpoint, "save_final_hf", "checkpoint", c.save_final_hf);

  // ---- logging ----
  const YAML::Node logging = root["logging"];
  check_known_keys(logging, kLoggingKeys, "logging");
  recipe.logging.every = get_int(logging, "every", "logging", recipe.logging.every);
  check_range(recipe.logging.every, int64_t{1}, int64_t{1} << 40, "logging.every");
  constexpr std::array<std::string_view, 4> kProgress = {"auto", "bar", "plain", "none"};
  const std::string progress = get_choice(logging, "progress", "logging", kProgress, "auto");
  recipe.logging.progress = progress == "bar"     ? ProgressStyle::Bar
                            : progress == "plain" ? ProgressStyle::Plain
                            : progress == "none"  ? ProgressStyle::None
                                                  : ProgressStyle::Auto;

  // ---- parallel ----
  const YAML::Node parallel = root["parallel"];
  check_known_keys(parallel, kParallelKeys, "parallel");
  auto& p = recipe.parallel;
  p.device = get_string(parallel, "device", "parallel", p.device);
  if (p.device != "cpu" && p.device != "cuda" && p.device.rfind("cuda:", 0) != 0)
    fail("parallel.device: expected cpu, cuda or cuda:N, got '", p.device, "'");
  p.data_parallel = get_int(parallel, "data_parallel", "parallel", 0);
  if (parallel && parallel["data_parallel"] && p.data_parallel < 1)
    fail("parallel.data_parallel: expected a positive number, got ", p.data_parallel);
  p.expert_parallel = get_int(parallel, "expert_parallel", "parallel", 1);
  if (p.expert_parallel < 1)
    fail("parallel.expert_parallel: expected a positive number, got ", p.expert_parallel);
  p.zero_stage = get_int(parallel, "zero_stage", "parallel", p.zero_stage);
  if (p.zero_stage < 0 || p.zero_stage > 2)
    fail("parallel.zero_stage: expected 0, 1 or 2, got ", p.zero_stage);
  p.overlap_communication =
      get_bool(parallel, "overlap_communication", "parallel", p.overlap_communication);
  // How data_parallel x expert_parallel fits the job's ranks is checked when the run starts
  // (resolve_layout in train/parallel_context.h): the world size is known only then.
  return recipe;
}

Recipe load_recipe(const fs::path& file, const std::vector<RecipeOverride>& overrides) {
  if (!fs::is_regular_file(file)) fail("recipe ", file.string(), " does not exist");
  YAML::Node root;
  try {
    root = YAML::LoadFile(file.string());
  } catch (const YAML::Exception& error) {
    fail(file.string(), ":", error.mark.line + 1, ": YAML syntax error: ", error.msg);
  }
  const fs::path absolute = fs::absolute(file).lexically_normal();
  return parse_recipe(root, absolute.parent_path(), absolute, overrides);
}

std::string resolved_recipe_yaml(const Recipe& recipe) {
  YAML::Emitter out;
  out << YAML::Comment("moetune recipe as resolved from " + recipe.source.string() +
                       " (defaults filled in, overrides applied, paths absolute)");
  out << YAML::BeginMap;
  out << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  if (recipe.model.path) out << YAML::Key << "path" << YAML::Value << recipe.model.path->string();
  if (recipe.model.config)
    out << YAML::Key << "config" << YAML::Value << recipe.model.config->string();
  out << YAML::Key << "tokenizer" << YAML::Value << recipe.model.tokenizer.string();
  out << YAML::Key << "dtype" << YAML::Value << float_dtype_name(recipe.model.dtype);
  out << YAML::EndMap;

  out << YAML::Key << "data" << YAML::Value << recipe.tree["data"];

  const auto& t = recipe.training;
  out << YAML::Key << "training" << YAML::Value << YAML::BeginMap;
  emit_optional(out, "max_steps", t.max_steps);
  emit_optional(out, "epochs", t.epochs);
  emit_optional(out, "global_batch_sequences", t.global_batch_sequences);
  emit_optional(out, "global_batch_tokens", t.global_batch_tokens);
  out << YAML::Key << "micro_batch" << YAML::Value << t.micro_batch;
  out << YAML::Key << "seq_len" << YAML::Value << t.seq_len;
  out << YAML::Key << "seed" << YAML::Value << t.seed;
  out << YAML::Key << "eval_every" << YAML::Value << t.eval_every;
  out << YAML::Key << "eval_batches" << YAML::Value << t.eval_batches;
  out << YAML::Key << "max_bad_steps" << YAML::Value << t.max_bad_steps;
  out << YAML::Key << "recompute" << YAML::Value << t.recompute;
  out << YAML::Key << "optimizer_in_backward" << YAML::Value
      << (t.optimizer_in_backward ? (*t.optimizer_in_backward ? "true" : "false") : "auto");
  out << YAML::EndMap;

  const auto& o = recipe.optimizer;
  out << YAML::Key << "optimizer" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "lr" << YAML::Value << shortest(o.lr);
  out << YAML::Key << "betas" << YAML::Value << YAML::Flow << YAML::BeginSeq << shortest(o.beta1)
      << shortest(o.beta2) << YAML::EndSeq;
  out << YAML::Key << "eps" << YAML::Value << shortest(o.eps);
  out << YAML::Key << "weight_decay" << YAML::Value << shortest(o.weight_decay);
  out << YAML::Key << "no_decay" << YAML::Value << YAML::Flow << o.no_decay;
  out << YAML::Key << "grad_clip" << YAML::Value << shortest(o.grad_clip);
  out << YAML::Key << "master_weights" << YAML::Value << float_dtype_name(o.master_weights);
  out << YAML::EndMap;

  const auto& s = recipe.scheduler;
  out << YAML::Key << "scheduler" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "type" << YAML::Value << schedule_type_name(s.type);
  emit_optional(out, "warmup_steps", s.warmup_steps);
  emit_optional(out, "warmup_ratio", s.warmup_ratio);
  emit_optional(out, "min_lr", s.min_lr);
  emit_optional(out, "min_lr_ratio", s.min_lr_ratio);
  out << YAML::EndMap;

  const auto& c = recipe.checkpoint;
  out << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "every" << YAML::Value << c.every;
  out << YAML::Key << "keep_last" << YAML::Value << c.keep_last;
  out << YAML::Key << "hf_export_every" << YAML::Value << c.hf_export_every;
  out << YAML::Key << "save_final_hf" << YAML::Value << c.save_final_hf;
  out << YAML::EndMap;

  static constexpr const char* kProgressNames[] = {"auto", "bar", "plain", "none"};
  out << YAML::Key << "logging" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "every" << YAML::Value << recipe.logging.every;
  out << YAML::Key << "progress" << YAML::Value
      << kProgressNames[static_cast<int>(recipe.logging.progress)];
  out << YAML::EndMap;

  out << YAML::Key << "parallel" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "device" << YAML::Value << recipe.parallel.device;
  if (recipe.parallel.data_parallel > 0)
    out << YAML::Key << "data_parallel" << YAML::Value << recipe.parallel.data_parallel;
  out << YAML::Key << "expert_parallel" << YAML::Value << recipe.parallel.expert_parallel;
  out << YAML::Key << "zero_stage" << YAML::Value << recipe.parallel.zero_stage;
  out << YAML::Key << "overlap_communication" << YAML::Value
      << recipe.parallel.overlap_communication;
  out << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

bool Recipe::optimizer_in_backward(int ranks) const {
  const bool one_micro_batch = training.grad_accumulation() == ranks;
  if (training.optimizer_in_backward.value_or(false) && !one_micro_batch)
    fail("training.optimizer_in_backward: true needs one micro-batch per rank and optimizer step: ",
         training.grad_accumulation(), " micro-batches of ", training.micro_batch, " rows on ",
         ranks,
         " rank(s) (training.global_batch_sequences or global_batch_tokens); set it to auto or "
         "false");
  if (training.optimizer_in_backward) return *training.optimizer_in_backward;
  return one_micro_batch && optimizer.grad_clip == 0;
}

}  // namespace moetune
