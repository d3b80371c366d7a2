// config.json parsing: every real config in ../shared/data for the supported families parses
// with the values the file states (and Transformers' defaults where it is silent), and bad
// or unsupported configs fail with an Error naming the file and the key.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include "core/error.h"
#include "io/model_config.h"
#include "test_util.h"

namespace moetune {
namespace {

using nlohmann::json;

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// The error message of parse_model_config, or "" when it succeeds.
std::string config_error(const json& config, const std::string& source = "bad/config.json") {
  try {
    parse_model_config(config, source);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

json tiny_qwen3_moe() {
  return {{"model_type", "qwen3_moe"},
          {"vocab_size", 128},
          {"hidden_size", 64},
          {"intermediate_size", 96},
          {"num_hidden_layers", 4},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", 16},
          {"num_experts", 8},
          {"num_experts_per_tok", 2},
          {"moe_intermediate_size", 32},
          {"rope_theta", 1000000.0},
          {"torch_dtype", "bfloat16"}};
}

json tiny_llama() {
  return {{"model_type", "llama"},   {"vocab_size", 128},      {"hidden_size", 64},
          {"intermediate_size", 96}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
          {"num_key_value_heads", 2}};
}

TEST(ModelConfig, AllRealConfigsOfSupportedFamiliesParse) {
  int parsed = 0;
  for (const char* family : {"qwen3", "mixtral", "llama3"}) {
    for (const auto& entry :
         std::filesystem::directory_iterator(testing::shared_data_dir() / family)) {
      std::string name = entry.path().filename().string();
      // model configs are saved as "<org>--<model>_config.json" (not tokenizer_config.json)
      if (name.find("--") == std::string::npos || !name.ends_with("_config.json")) continue;
      if (name.find("FP8") != std::string::npos) continue;  // checked below: refused
      SCOPED_TRACE(name);
      json raw = read_json(entry.path());
      ModelConfig config = load_model_config(entry.path());
      EXPECT_EQ(config.model_type, raw["model_type"]);
      EXPECT_EQ(config.hidden_size, raw["hidden_size"].get<int64_t>());
      EXPECT_EQ(config.num_hidden_layers, raw["num_hidden_layers"].get<int64_t>());
      EXPECT_EQ(config.num_key_value_heads, raw["num_key_value_heads"].get<int64_t>());
      EXPECT_EQ(config.vocab_size, raw["vocab_size"].get<int64_t>());
      EXPECT_EQ(config.rope.theta, raw["rope_theta"].get<double>());
      EXPECT_EQ(config.dtype, raw["torch_dtype"]);
      EXPECT_EQ(config.raw, raw);
      EXPECT_EQ(config.num_attention_heads % config.num_key_value_heads, 0);
      if (raw.contains("head_dim")) {
        EXPECT_EQ(config.head_dim, raw["head_dim"].get<int64_t>());
      } else {
        EXPECT_EQ(config.head_dim, config.hidden_size / config.num_attention_heads);
      }
      EXPECT_EQ(config.is_moe(), raw.contains("num_experts") || raw.contains("num_local_experts"));
      ++parsed;
    }
  }
  EXPECT_GE(parsed, 12);
}

TEST(ModelConfig, Qwen3Moe30B) {
  ModelConfig config =
      load_model_config(testing::shared_data_dir() / "qwen3" / "Qwen--Qwen3-30B-A3B_config.json");
  EXPECT_EQ(config.family, ModelFamily::Qwen3Moe);
  EXPECT_EQ(config.num_experts, 128);
  EXPECT_EQ(config.num_experts_per_tok, 8);
  EXPECT_EQ(config.moe_intermediate_size, 768);
  EXPECT_EQ(config.head_dim, 128);
  EXPECT_TRUE(config.norm_topk_prob);
  EXPECT_TRUE(config.qk_norm);
  EXPECT_FALSE(config.attention_bias);
  EXPECT_DOUBLE_EQ(config.router_aux_loss_coef, 0.001);
  EXPECT_DOUBLE_EQ(config.rms_norm_eps, 1e-6);
  EXPECT_EQ(config.rope.type, "default");
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    EXPECT_TRUE(config.layer_is_moe(layer));
}

TEST(ModelConfig, Mixtral8x7B) {
  ModelConfig config = load_model_config(testing::shared_data_dir() / "mixtral" /
                                         "mistralai--Mixtral-8x7B-v0.1_config.json");
  EXPECT_EQ(config.family, ModelFamily::Mixtral);
  EXPECT_EQ(config.num_experts, 8);  // from num_local_experts
  EXPECT_EQ(config.num_experts_per_tok, 2);
  EXPECT_EQ(config.moe_intermediate_size, 14336);
  EXPECT_EQ(config.head_dim, 128);  // hidden / heads
  EXPECT_TRUE(config.norm_topk_prob);
  EXPECT_FALSE(config.qk_norm);
  EXPECT_DOUBLE_EQ(config.router_aux_loss_coef, 0.02);
  EXPECT_DOUBLE_EQ(config.rms_norm_eps, 1e-5);
}

TEST(ModelConfig, Llama31HasLlama3Rope) {
  ModelConfig config = load_model_config(testing::shared_data_dir() / "llama3" /
                                         "meta-llama--Meta-Llama-3.1-8B_config.json");
  EXPECT_EQ(config.family, ModelFamily::Llama);
  EXPECT_FALSE(config.is_moe());
  EXPECT_FALSE(config.layer_is_moe(0));
  EXPECT_EQ(config.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(config.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(config.rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(config.rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(config.rope.high_freq_factor, 4.0);
  EXPECT_EQ(config.rope.original_max_position_embeddings, 8192);
}

TEST(ModelConfig, Qwen3DenseTiedEmbeddings) {
  ModelConfig config =
      load_model_config(testing::shared_data_dir() / "qwen3" / "Qwen--Qwen3-0.6B_config.json");
  EXPECT_EQ(config.family, ModelFamily::Qwen3);
  EXPECT_TRUE(config.tie_word_embeddings);
  EXPECT_TRUE(config.qk_norm);
  EXPECT_EQ(config.head_dim, 128);  // explicit, not hidden / heads (= 64)
}

TEST(ModelConfig, Fp8CheckpointIsRefused) {
  auto path = testing::shared_data_dir() / "qwen3" / "Qwen--Qwen3-30B-A3B-FP8_config.json";
  try {
    load_model_config(path);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    std::string message = error.what();
    EXPECT_NE(message.find("Qwen3-30B-A3B-FP8_config.json"), std::string::npos) << message;
    EXPECT_NE(message.find("quantization_config (fp8) not supported yet"), std::string::npos)
        << message;
  }
}

TEST(ModelConfig, TransformersDefaultsWhenKeysAreAbsent) {
  ModelConfig moe = parse_model_config(tiny_qwen3_moe(), "tiny");
  EXPECT_FALSE(moe.norm_topk_prob);  // Qwen3MoeConfig default
  EXPECT_EQ(moe.decoder_sparse_step, 1);
  EXPECT_DOUBLE_EQ(moe.router_aux_loss_coef, 0.001);
  EXPECT_EQ(moe.max_position_embeddings, 32768);
  EXPECT_FALSE(moe.tie_word_embeddings);

  ModelConfig llama = parse_model_config(tiny_llama(), "tiny");
  EXPECT_EQ(llama.head_dim, 16);
  EXPECT_DOUBLE_EQ(llama.rope.theta, 10000.0);
  EXPECT_EQ(llama.dtype, "float32");
  EXPECT_EQ(llama.max_position_embeddings, 2048);
  json no_kv_heads = tiny_llama();
  no_kv_heads.erase("num_key_value_heads");
  EXPECT_EQ(parse_model_config(no_kv_heads, "tiny").num_key_value_heads, 4);  // = heads

  json mixtral = tiny_llama();
  mixtral["model_type"] = "mixtral";
  ModelConfig mix = parse_model_config(mixtral, "tiny");
  EXPECT_EQ(mix.num_experts, 8);
  EXPECT_EQ(mix.num_experts_per_tok, 2);
  EXPECT_DOUBLE_EQ(mix.rope.theta, 1e6);  // MixtralConfig.default_theta
  EXPECT_DOUBLE_EQ(mix.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(mix.router_aux_loss_coef, 0.001);

  json qwen3 = tiny_llama();
  qwen3["model_type"] = "qwen3";
  EXPECT_EQ(parse_model_config(qwen3, "tiny").head_dim, 128);  // Qwen3Config default
}

TEST(ModelConfig, NewSpellings) {
  json config = tiny_qwen3_moe();
  config.erase("torch_dtype");
  config.erase("rope_theta");
  config["dtype"] = "float16";
  config["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e5}};
  ModelConfig parsed = parse_model_config(config, "tiny");
  EXPECT_EQ(parsed.dtype, "float16");
  EXPECT_DOUBLE_EQ(parsed.rope.theta, 5e5);

  json llama = tiny_llama();
  llama["rope_parameters"] = {{"rope_type", "llama3"},
                              {"rope_theta", 5e5},
                              {"factor", 32.0},
                              {"low_freq_factor", 1.0},
                              {"high_freq_factor", 4.0}};
  llama["max_position_embeddings"] = 4096;
  ModelConfig rope = parse_model_config(llama, "tiny");
  EXPECT_EQ(rope.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(rope.rope.factor, 32.0);
  EXPECT_EQ(rope.rope.original_max_position_embeddings, 4096);  // defaults to max positions

  json old_type = tiny_llama();
  old_type["rope_scaling"] = {{"type", "llama3"},
                              {"factor", 8.0},
                              {"low_freq_factor", 1.0},
                              {"high_freq_factor", 4.0},
                              {"original_max_position_embeddings", 8192}};
  EXPECT_EQ(parse_model_config(old_type, "tiny").rope.type, "llama3");

  json local_experts = tiny_llama();
  local_experts["model_type"] = "mixtral";
  local_experts["num_experts"] = 4;  // Transformers' attribute_map alias
  EXPECT_EQ(parse_model_config(local_experts, "tiny").num_experts, 4);
}

TEST(ModelConfig, MlpOnlyLayersAndSparseStep) {
  json config = tiny_qwen3_moe();
  config["mlp_only_layers"] = {0};
  config["decoder_sparse_step"] = 2;
  ModelConfig parsed = parse_model_config(config, "tiny");
  EXPECT_FALSE(parsed.layer_is_moe(0));
  EXPECT_TRUE(parsed.layer_is_moe(1));
  EXPECT_FALSE(parsed.layer_is_moe(2));
  EXPECT_TRUE(parsed.layer_is_moe(3));
}

struct BadCase {
  const char* what;
  std::function<void(json&)> edit;
  const char* expected;  // a piece of the message
};

TEST(ModelConfig, BadConfigsNameTheKey) {
  const std::vector<BadCase> cases = {
      {"unknown type", [](json& c) { c["model_type"] = "gpt2"; },
       "model_type 'gpt2' is not supported (supported: qwen3_moe, mixtral, qwen3, llama)"},
      {"no type", [](json& c) { c.erase("model_type"); }, "required key 'model_type' is missing"},
      {"no hidden", [](json& c) { c.erase("hidden_size"); },
       "required key 'hidden_size' is missing"},
      {"no vocab", [](json& c) { c.erase("vocab_size"); }, "required key 'vocab_size' is missing"},
      {"string int", [](json& c) { c["hidden_size"] = "64"; },
       "key 'hidden_size' must be an integer"},
      {"fraction", [](json& c) { c["num_hidden_layers"] = 2.5; },
       "key 'num_hidden_layers' must be an integer"},
      {"zero", [](json& c) { c["num_attention_heads"] = 0; },
       "key 'num_attention_heads' must be positive"},
      {"kv heads", [](json& c) { c["num_key_value_heads"] = 3; },
       "num_attention_heads 4 is not a multiple of num_key_value_heads 3"},
      {"yarn",
       [](json& c) {
         c["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
       },
       "rope type 'yarn' not supported yet"},
      {"dynamic old",
       [](json& c) {
         c["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
       },
       "rope type 'dynamic' not supported yet"},
      {"rope not dict", [](json& c) { c["rope_parameters"] = 3; },
       "key 'rope_parameters' must be an object"},
      {"llama3 incomplete",
       [](json& c) {
         c["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
       },
       "required key 'low_freq_factor' is missing"},
      {"sliding", [](json& c) { c["use_sliding_window"] = true; },
       "use_sliding_window true not supported yet"},
      {"gelu", [](json& c) { c["hidden_act"] = "gelu"; }, "hidden_act 'gelu' not supported yet"},
      {"quantized",
       [](json& c) {
         c["quantization_config"] = {{"quant_method", "gptq"}};
       },
       "quantization_config (gptq) not supported yet"},
      {"dtype", [](json& c) { c["torch_dtype"] = "int8"; }, "dtype 'int8' not supported"},
      {"top-k", [](json& c) { c["num_experts_per_tok"] = 9; },
       "num_experts_per_tok 9 exceeds the 8 experts"},
      {"mlp only", [](json& c) { c["mlp_only_layers"] = {7}; },
       "mlp_only_layers entry 7 is not a layer index"},
      {"sparse step", [](json& c) { c["decoder_sparse_step"] = 0; },
       "key 'decoder_sparse_step' must be positive"},
      {"odd head", [](json& c) { c["head_dim"] = 15; }, "head_dim 15 must be even"},
      {"bool", [](json& c) { c["tie_word_embeddings"] = "yes"; },
       "key 'tie_word_embeddings' must be true or false"},
      {"layer types",
       [](json& c) {
         c["layer_types"] = {"full_attention", "sliding_attention"};
       },
       "layer_types entry \"sliding_attention\" not supported yet"},
  };
  for (const BadCase& bad : cases) {
    json config = tiny_qwen3_moe();
    bad.edit(config);
    std::string message = config_error(config);
    EXPECT_NE(message.find("bad/config.json"), std::string::npos) << bad.what << ": " << message;
    EXPECT_NE(message.find(bad.expected), std::string::npos) << bad.what << ": " << message;
  }

  json mixtral = tiny_llama();
  mixtral["model_type"] = "mixtral";
  mixtral["sliding_window"] = 4096;
  EXPECT_NE(config_error(mixtral).find("sliding_window 4096 not supported yet"), std::string::npos);
  json llama = tiny_llama();
  llama["hidden_size"] = 66;
  EXPECT_NE(config_error(llama).find("hidden_size 66 is not a multiple of num_attention_heads 4"),
            std::string::npos);
  EXPECT_NE(config_error(json::array()).find("must be a JSON object"), std::string::npos);
}

TEST(ModelConfig, LoadReportsFileErrors) {
  testing::TempDir dir;
  auto path = dir / "config.json";
  std::ofstream(path) << "{\"model_type\": \"llama\",";
  try {
    load_model_config(path);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("config.json: not valid JSON"), std::string::npos)
        << error.what();
  }
  EXPECT_THROW(load_model_config(dir / "missing.json"), Error);
  std::ofstream(path) << "{\"model_type\": " << std::string(100000, '[') << std::string(100000, ']')
                      << "}";
  try {
    load_model_config(path);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("config.json: JSON nested deeper than 64 levels"),
              std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace moetune
