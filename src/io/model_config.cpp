// config.json -> ModelConfig for qwen3_moe, mixtral, qwen3 and llama.
// Defaults are those of the Transformers v5 config classes (Qwen3MoeConfig, MixtralConfig,
// Qwen3Config, LlamaConfig), so a sparse config.json means what it means in Transformers.
// RoPE follows Transformers' standardize_rope_params: `rope_parameters` (v5) or
// `rope_scaling` (v4) give the type and scaling, `rope_theta` may sit inside that dict or at
// the top level, and `type` is the old spelling of `rope_type`. A JSON null counts as absent.
// Anything the engine cannot honour yet (yarn rope, sliding windows, quantized weights, other
// activations) is refused with an Error naming the key, rather than silently trained wrong.
#include "io/model_config.h"

#include <algorithm>
#include <optional>

#include "core/error.h"
#include "io/json_file.h"

namespace moetune {

namespace {

using nlohmann::json;

// Typed access to one config object; every error names the file and the key.
class ConfigReader {
 public:
  ConfigReader(const json& object, std::string source)
      : object_(object), source_(std::move(source)) {}

  bool has(const std::string& key) const {
    auto it = object_.find(key);
    return it != object_.end() && !it->is_null();
  }
  const json* find(const std::string& key) const {
    auto it = object_.find(key);
    return it != object_.end() && !it->is_null() ? &*it : nullptr;
  }

  int64_t integer(const std::string& key, std::optional<int64_t> fallback = std::nullopt) const {
    const json* value = find(key);
    if (!value) return required(key, fallback);
    if (value->is_number_integer()) return value->get<int64_t>();
    if (value->is_number_float()) {  // 1e5 or 4096.0: accept whole numbers, as Python would
      double number = value->get<double>();
      if (number == static_cast<double>(static_cast<int64_t>(number)))
        return static_cast<int64_t>(number);
    }
    fail(source_, ": key '", key, "' must be an integer, got ", value->dump());
  }
  double number(const std::string& key, std::optional<double> fallback = std::nullopt) const {
    const json* value = find(key);
    if (!value) return required(key, fallback);
    if (!value->is_number())
      fail(source_, ": key '", key, "' must be a number, got ", value->dump());
    return value->get<double>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    const json* value = find(key);
    if (!value) return fallback;
    if (!value->is_boolean())
      fail(source_, ": key '", key, "' must be true or false, got ", value->dump());
    return value->get<bool>();
  }
  std::string string(const std::string& key,
                     std::optional<std::string> fallback = std::nullopt) const {
    const json* value = find(key);
    if (!value) return required(key, fallback);
    if (!value->is_string())
      fail(source_, ": key '", key, "' must be a string, got ", value->dump());
    return value->get<std::string>();
  }

  const std::string& source() const { return source_; }

 private:
  template <typename T>
  T required(const std::string& key, const std::optional<T>& fallback) const {
    if (!fallback) fail(source_, ": required key '", key, "' is missing");
    return *fallback;
  }

  const json& object_;
  std::string source_;
};

// Transformers' per-model defaults for the keys whose default differs between families.
struct FamilyDefaults {
  ModelFamily family;
  const char* model_type;
  std::optional<int64_t> num_key_value_heads;  // nullopt: num_attention_heads
  std::optional<int64_t> head_dim;             // nullopt: hidden_size / num_attention_heads
  int64_t max_position_embeddings;
  double rms_norm_eps;
  double rope_theta;
  bool qk_norm;
};

constexpr FamilyDefaults kFamilies[] = {
    {ModelFamily::Qwen3Moe, "qwen3_moe", 4, std::nullopt, 32768, 1e-6, 10000.0, true},
    {ModelFamily::Mixtral, "mixtral", 8, std::nullopt, 4096 * 32, 1e-5, 1000000.0, false},
    {ModelFamily::Qwen3, "qwen3", 32, 128, 32768, 1e-6, 10000.0, true},
    {ModelFamily::Llama, "llama", std::nullopt, std::nullopt, 2048, 1e-6, 10000.0, false},
};

const FamilyDefaults& family_defaults(const std::string& model_type, const std::string& source) {
  for (const auto& family : kFamilies)
    if (model_type == family.model_type) return family;
  std::string supported;
  for (const auto& family : kFamilies)
    supported += std::string(supported.empty() ? "" : ", ") + family.model_type;
  fail(source, ": model_type '", model_type, "' is not supported (supported: ", supported, ")");
}

void check_positive(const ConfigReader& reader, const char* key, int64_t value) {
  if (value <= 0) fail(reader.source(), ": key '", key, "' must be positive, got ", value);
}

// Options that change the math in ways the engine does not implement yet.
void reject_unsupported(const json& object, const ConfigReader& reader, ModelFamily family) {
  if (const json* quantization = reader.find("quantization_config")) {
    std::string method = "unknown method";
    if (quantization->is_object() && quantization->contains("quant_method") &&
        (*quantization)["quant_method"].is_string())
      method = (*quantization)["quant_method"].get<std::string>();
    fail(reader.source(), ": quantization_config (", method,
         ") not supported yet: use the unquantized (bf16) checkpoint");
  }
  std::string activation = reader.string("hidden_act", "silu");
  if (activation != "silu")
    fail(reader.source(), ": hidden_act '", activation, "' not supported yet (only silu)");
  if (family == ModelFamily::Qwen3 || family == ModelFamily::Qwen3Moe) {
    if (reader.boolean("use_sliding_window", false))
      fail(reader.source(),
           ": use_sliding_window true not supported yet (sliding window attention)");
    if (const json* layer_types = reader.find("layer_types")) {
      if (!layer_types->is_array())
        fail(reader.source(), ": key 'layer_types' must be a list, got ", layer_types->dump());
      for (const auto& type : *layer_types)
        if (type != "full_attention")
          fail(reader.source(), ": layer_types entry ", type.dump(),
               " not supported yet (only full_attention)");
    }
  }
  if (family == ModelFamily::Mixtral && reader.has("sliding_window"))
    fail(reader.source(), ": sliding_window ", object["sliding_window"].dump(),
         " not supported yet (sliding window attention); set it to null");
  if (family == ModelFamily::Mixtral && reader.number("router_jitter_noise", 0.0) != 0.0)
    fail(reader.source(), ": router_jitter_noise ", reader.number("router_jitter_noise"),
         " not supported yet (must be 0)");
  if (family == ModelFamily::Llama && reader.boolean("mlp_bias", false))
    fail(reader.source(), ": mlp_bias true not supported yet");
  if (reader.has("partial_rotary_factor") && reader.number("partial_rotary_factor") != 1.0)
    fail(reader.source(), ": partial_rotary_factor ", reader.number("partial_rotary_factor"),
         " not supported yet (must be 1)");
}

// rope_parameters (v5) or rope_scaling (v4), with rope_theta inside or at the top level.
RopeConfig parse_rope(const json& object, const ConfigReader& reader, const FamilyDefaults& family,
                      int64_t max_position_embeddings) {
  RopeConfig rope;
  const char* dict_key = reader.has("rope_scaling") ? "rope_scaling" : "rope_parameters";
  const json* dict = reader.find(dict_key);
  if (dict && !dict->is_object())
    fail(reader.source(), ": key '", dict_key, "' must be an object or null, got ", dict->dump());
  json params = dict ? *dict : json::object();
  std::string source = reader.source() + " (" + dict_key + ")";
  ConfigReader rope_reader(params, source);

  rope.theta = rope_reader.has("rope_theta") ? rope_reader.number("rope_theta")
                                             : reader.number("rope_theta", family.rope_theta);
  if (!(rope.theta > 0)) fail(reader.source(), ": rope_theta must be positive, got ", rope.theta);
  rope.type = rope_reader.has("rope_type") ? rope_reader.string("rope_type")
                                           : rope_reader.string("type", "default");
  if (rope_reader.has("partial_rotary_factor") &&
      rope_reader.number("partial_rotary_factor") != 1.0)
    fail(source, ": partial_rotary_factor ", rope_reader.number("partial_rotary_factor"),
         " not supported yet (must be 1)");
  if (rope.type == "default") return rope;
  if (rope.type != "llama3")
    fail(source, ": rope type '", rope.type, "' not supported yet (supported: default, llama3)");
  rope.factor = rope_reader.number("factor");
  rope.low_freq_factor = rope_reader.number("low_freq_factor");
  rope.high_freq_factor = rope_reader.number("high_freq_factor");
  rope.original_max_position_embeddings = rope_reader.integer(
      "original_max_position_embeddings",
      reader.integer("original_max_position_embeddings", max_position_embeddings));
  if (!(rope.factor > 0) || !(rope.low_freq_factor > 0) ||
      !(rope.high_freq_factor > rope.low_freq_factor))
    fail(source, ": llama3 rope needs factor > 0 and high_freq_factor > low_freq_factor > 0");
  if (rope.original_max_position_embeddings <= 0)
    fail(source, ": original_max_position_embeddings must be positive");
  return rope;
}

std::string parse_dtype(const ConfigReader& reader) {
  std::string dtype =
      reader.has("dtype") ? reader.string("dtype") : reader.string("torch_dtype", "float32");
  if (dtype.rfind("torch.", 0) == 0) dtype = dtype.substr(6);
  if (dtype != "float32" && dtype != "bfloat16" && dtype != "float16")
    fail(reader.source(), ": dtype '", dtype, "' not supported (float32, bfloat16, float16)");
  return dtype;
}

void parse_moe(const ConfigReader& reader, ModelConfig& config) {
  if (config.family == ModelFamily::Qwen3Moe) {
    // Transformers 5 save_pretrained writes qwen3_moe's expert count as num_local_experts.
    config.num_experts = reader.has("num_local_experts") ? reader.integer("num_local_experts")
                                                         : reader.integer("num_experts", 128);
    config.num_experts_per_tok = reader.integer("num_experts_per_tok", 8);
    config.moe_intermediate_size = reader.integer("moe_intermediate_size", 768);
    config.norm_topk_prob = reader.boolean("norm_topk_prob", false);
    config.decoder_sparse_step = reader.integer("decoder_sparse_step", 1);
    config.router_aux_loss_coef = reader.number("router_aux_loss_coef", 0.001);
    if (const json* layers = reader.find("mlp_only_layers")) {
      if (!layers->is_array())
        fail(reader.source(), ": key 'mlp_only_layers' must be a list, got ", layers->dump());
      for (const auto& layer : *layers) {
        if (!layer.is_number_integer() || layer.get<int64_t>() < 0 ||
            layer.get<int64_t>() >= config.num_hidden_layers)
          fail(reader.source(), ": mlp_only_layers entry ", layer.dump(),
               " is not a layer index in [0, ", config.num_hidden_layers, ")");
        config.mlp_only_layers.push_back(layer.get<int64_t>());
      }
    }
  } else {  // Mixtral: every layer is sparse, experts as wide as intermediate_size
    config.num_experts = reader.has("num_local_experts") ? reader.integer("num_local_experts")
                                                         : reader.integer("num_experts", 8);
    config.num_experts_per_tok = reader.integer("num_experts_per_tok", 2);
    config.moe_intermediate_size = config.intermediate_size;
    config.norm_topk_prob = true;
    config.decoder_sparse_step = 1;
    config.router_aux_loss_coef = reader.number("router_aux_loss_coef", 0.001);
  }
  config.output_router_logits = reader.boolean("output_router_logits", false);
  check_positive(reader,
                 config.family == ModelFamily::Mixtral ? "num_local_experts" : "num_experts",
                 config.num_experts);
  check_positive(reader, "num_experts_per_tok", config.num_experts_per_tok);
  check_positive(reader, "moe_intermediate_size", config.moe_intermediate_size);
  check_positive(reader, "decoder_sparse_step", config.decoder_sparse_step);
  if (config.num_experts_per_tok > config.num_experts)
    fail(reader.source(), ": num_experts_per_tok ", config.num_experts_per_tok, " exceeds the ",
         config.num_experts, " experts");
}

}  // namespace

bool ModelConfig::layer_is_moe(int64_t layer) const {
  if (num_experts == 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
    return false;
  return (layer + 1) % decoder_sparse_step == 0;
}

ModelConfig parse_model_config(const nlohmann::json& json, const std::string& source) {
  if (!json.is_object()) fail(source, ": config must be a JSON object");
  ConfigReader reader(json, source);
  ModelConfig config;
  config.model_type = reader.string("model_type");
  const FamilyDefaults& family = family_defaults(config.model_type, source);
  config.family = family.family;
  reject_unsupported(json, reader, config.family);

  config.vocab_size = reader.integer("vocab_size");
  config.hidden_size = reader.integer("hidden_size");
  // Qwen3-MoE only uses the dense width in mlp_only_layers; Transformers defaults it.
  config.intermediate_size = config.family == ModelFamily::Qwen3Moe
                                 ? reader.integer("intermediate_size", 6144)
                                 : reader.integer("intermediate_size");
  config.num_hidden_layers = reader.integer("num_hidden_layers");
  config.num_attention_heads = reader.integer("num_attention_heads");
  for (auto [key, value] : {std::pair{"vocab_size", config.vocab_size},
                            {"hidden_size", config.hidden_size},
                            {"intermediate_size", config.intermediate_size},
                            {"num_hidden_layers", config.num_hidden_layers},
                            {"num_attention_heads", config.num_attention_heads}})
    check_positive(reader, key, value);

  config.num_key_value_heads = reader.integer(
      "num_key_value_heads", family.num_key_value_heads.value_or(config.num_attention_heads));
  check_positive(reader, "num_key_value_heads", config.num_key_value_heads);
  if (config.num_attention_heads % config.num_key_value_heads != 0)
    fail(source, ": num_attention_heads ", config.num_attention_heads,
         " is not a multiple of num_key_value_heads ", config.num_key_value_heads);
  if (reader.has("head_dim")) {
    config.head_dim = reader.integer("head_dim");
  } else if (family.head_dim) {
    config.head_dim = *family.head_dim;
  } else {
    if (config.hidden_size % config.num_attention_heads != 0)
      fail(source, ": hidden_size ", config.hidden_size,
           " is not a multiple of num_attention_heads ", config.num_attention_heads,
           " (and no head_dim is given)");
    config.head_dim = config.hidden_size / config.num_attention_heads;
  }
  check_positive(reader, "head_dim", config.head_dim);
  if (config.head_dim % 2 != 0)
    fail(source, ": head_dim ", config.head_dim, " must be even for RoPE");

  config.max_position_embeddings =
      reader.integer("max_position_embeddings", family.max_position_embeddings);
  check_positive(reader, "max_position_embeddings", config.max_position_embeddings);
  config.rms_norm_eps = reader.number("rms_norm_eps", family.rms_norm_eps);
  if (!(config.rms_norm_eps > 0)) fail(source, ": rms_norm_eps must be positive");
  config.rope = parse_rope(json, reader, family, config.max_position_embeddings);
  config.attention_bias =
      config.family == ModelFamily::Mixtral ? false : reader.boolean("attention_bias", false);
  config.qk_norm = family.qk_norm;
  config.tie_word_embeddings = reader.boolean("tie_word_embeddings", false);
  config.initializer_range = reader.number("initializer_range", 0.02);
  config.dtype = parse_dtype(reader);

  if (config.family == ModelFamily::Qwen3Moe || config.family == ModelFamily::Mixtral) {
    parse_moe(reader, config);
  } else {
    config.norm_topk_prob = false;
    config.router_aux_loss_coef = 0.0;
  }
  config.raw = json;
  return config;
}

ModelConfig load_model_config(const std::filesystem::path& config_json) {
  return parse_model_config(read_json_file(config_json), config_json.string());
}

}  // namespace moetune
