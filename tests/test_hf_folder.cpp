// HF folders: checkpoints written whole or sharded read back bit-exactly through
// CheckpointReader, the index is validated against the shards, stale shards of an earlier save
// are removed, config.json and tokenizer files are written/copied, and (when torch is
// installed) Transformers loads a folder we wrote with the exact weights.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/hf_folder.h"
#include "io/json_file.h"
#include "io/model_config.h"
#include "test_util.h"

namespace moetune {
namespace {

using nlohmann::json;

// Tensors with owned storage, filled with distinct random values.
struct TensorSet {
  std::vector<std::vector<float>> storage;
  std::vector<NamedTensor> tensors;
  void add(const std::string& name, Shape shape) {
    storage.push_back(
        testing::random_floats(static_cast<size_t>(shape.numel()), storage.size() + 7));
    tensors.push_back({name, Tensor(storage.back().data(), DType::F32, shape)});
  }
};

TensorSet five_tensors() {
  TensorSet set;
  set.storage.reserve(5);
  set.add("model.embed_tokens.weight", {8, 4});  // 128 bytes
  set.add("model.layers.0.weight", {4, 4});      // 64
  set.add("model.layers.1.weight", {4, 4});      // 64
  set.add("model.big", {64});                    // 256: more than a shard
  set.add("model.norm.weight", {4});             // 16
  return set;
}

void expect_same(const CheckpointReader& reader, const TensorSet& set) {
  ASSERT_EQ(reader.names().size(), set.tensors.size());
  for (const NamedTensor& named : set.tensors) {
    SCOPED_TRACE(named.name);
    ASSERT_TRUE(reader.contains(named.name));
    EXPECT_EQ(reader.info(named.name).shape, named.tensor.shape);
    Tensor view = reader.tensor(named.name);
    ASSERT_EQ(view.bytes(), named.tensor.bytes());
    EXPECT_EQ(std::memcmp(view.data, named.tensor.data, view.bytes()), 0);
  }
}

std::string reader_error(const std::filesystem::path& location) {
  try {
    CheckpointReader reader(location);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(Checkpoint, SingleFileWhenItFits) {
  testing::TempDir dir;
  TensorSet set = five_tensors();
  auto written = write_checkpoint(dir.path(), set.tensors, parse_byte_size("5GB"));
  EXPECT_EQ(written, std::vector<std::string>{"model.safetensors"});
  EXPECT_FALSE(std::filesystem::exists(dir / kSafetensorsIndexName));
  CheckpointReader reader(dir.path());
  EXPECT_FALSE(reader.sharded());
  expect_same(reader, set);
  // Names come back in the order written.
  for (size_t i = 0; i < set.tensors.size(); ++i) EXPECT_EQ(reader.names()[i], set.tensors[i].name);
  // A .safetensors path works too.
  expect_same(CheckpointReader(dir / "model.safetensors"), set);
}

TEST(Checkpoint, ShardedWriteReadsBack) {
  testing::TempDir dir;
  TensorSet set = five_tensors();
  auto written = write_checkpoint(dir.path(), set.tensors, /*max_shard_bytes=*/200);
  // 128+64 | 64 | 256 (alone: too big) | 16
  EXPECT_EQ(written, (std::vector<std::string>{
                         "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                         "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                         kSafetensorsIndexName}));
  json index = read_json_file(dir / kSafetensorsIndexName);
  EXPECT_EQ(index["metadata"]["total_size"], 128 + 64 + 64 + 256 + 16);
  EXPECT_EQ(index["metadata"]["total_parameters"], (128 + 64 + 64 + 256 + 16) / 4);
  EXPECT_EQ(index["weight_map"]["model.embed_tokens.weight"], "model-00001-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["model.layers.0.weight"], "model-00001-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["model.layers.1.weight"], "model-00002-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["model.big"], "model-00003-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["model.norm.weight"], "model-00004-of-00004.safetensors");

  CheckpointReader reader(dir.path());
  EXPECT_TRUE(reader.sharded());
  EXPECT_EQ(reader.shards().size(), 4u);
  expect_same(reader, set);
  EXPECT_EQ(reader.file_of("model.big").path().filename(), "model-00003-of-00004.safetensors");
  std::vector<float> norm(4);
  reader.read_as_f32("model.norm.weight", norm);
  EXPECT_EQ(norm, set.storage[4]);

  try {
    reader.info("model.missing");
    FAIL() << "expected an error";
  } catch (const Error& error) {
    std::string message = error.what();
    EXPECT_NE(message.find(dir.path().string() + ": checkpoint has no tensor 'model.missing'"),
              std::string::npos)
        << message;
  }

  // Saving again unsharded removes the shards and the index of the earlier save.
  std::ofstream(dir / "notes.txt") << "kept";
  write_checkpoint(dir.path(), set.tensors, 1 << 20);
  std::vector<std::string> left;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path()))
    left.push_back(entry.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"model.safetensors", "notes.txt"}));
  expect_same(CheckpointReader(dir.path()), set);
}

TEST(Checkpoint, BadIndexesNameTheProblem) {
  testing::TempDir dir;
  TensorSet set = five_tensors();
  write_checkpoint(dir.path(), set.tensors, 200);
  auto index_path = dir / kSafetensorsIndexName;
  json good = read_json_file(index_path);

  struct Case {
    const char* what;
    std::function<void(json&)> edit;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"missing shard",
       [](json& i) { i["weight_map"]["model.big"] = "model-00009-of-00009.safetensors"; },
       "shard 'model-00009-of-00009.safetensors' (listed for tensor 'model.big') does not exist"},
      {"wrong shard",
       [](json& i) { i["weight_map"]["model.big"] = "model-00001-of-00004.safetensors"; },
       "the index puts tensor 'model.big' in shard 'model-00001-of-00004.safetensors', which does "
       "not hold it"},
      {"unknown tensor",
       [](json& i) { i["weight_map"]["ghost"] = "model-00001-of-00004.safetensors"; },
       "the index puts tensor 'ghost' in shard"},
      {"escape",
       [](json& i) { i["weight_map"]["model.big"] = "../model-00003-of-00004.safetensors"; },
       "is not a plain file name in the folder"},
      {"not a name", [](json& i) { i["weight_map"]["model.big"] = 3; },
       "weight_map entry of tensor 'model.big' must be a file name"},
      {"no weight map", [](json& i) { i.erase("weight_map"); },
       "must be an object with a \"weight_map\" object"},
      {"empty", [](json& i) { i["weight_map"] = json::object(); }, "weight_map is empty"},
  };
  for (const Case& bad : cases) {
    json index = good;
    bad.edit(index);
    write_json_file(index_path, index);
    std::string message = reader_error(dir.path());
    EXPECT_NE(message.find(kSafetensorsIndexName), std::string::npos)
        << bad.what << ": " << message;
    EXPECT_NE(message.find(bad.expected), std::string::npos) << bad.what << ": " << message;
  }

  std::ofstream(index_path) << "{\"weight_map\": ";
  EXPECT_NE(reader_error(dir.path()).find("model.safetensors.index.json: not valid JSON"),
            std::string::npos)
      << reader_error(dir.path());

  // The same tensor in two shards.
  write_json_file(index_path, good);
  std::vector<NamedTensor> duplicate = {set.tensors[3], set.tensors[4]};
  write_safetensors(dir / "model-00003-of-00004.safetensors", duplicate);
  EXPECT_NE(reader_error(dir.path()).find("tensor 'model.norm.weight' is in two shards"),
            std::string::npos)
      << reader_error(dir.path());

  // A corrupt shard is reported with its own name.
  std::ofstream(dir / "model-00002-of-00004.safetensors") << "junk";
  EXPECT_NE(reader_error(dir.path()).find("model-00002-of-00004.safetensors: file is 4 bytes"),
            std::string::npos)
      << reader_error(dir.path());
}

TEST(Checkpoint, MissingFolderOrWeights) {
  testing::TempDir dir;
  EXPECT_NE(reader_error(dir / "nope").find("no such checkpoint folder"), std::string::npos);
  EXPECT_NE(reader_error(dir.path())
                .find("holds neither model.safetensors nor model.safetensors.index.json"),
            std::string::npos);
  std::ofstream(dir / "pytorch_model.bin") << "x";
  EXPECT_NE(reader_error(dir.path()).find("pytorch_model.bin checkpoints are not supported"),
            std::string::npos);
}

TEST(Checkpoint, ParseByteSize) {
  EXPECT_EQ(parse_byte_size("5GB"), 5'000'000'000u);
  EXPECT_EQ(parse_byte_size("2GiB"), 2ull << 30);
  EXPECT_EQ(parse_byte_size("500 mb"), 500'000'000u);
  EXPECT_EQ(parse_byte_size("100KiB"), 102400u);
  EXPECT_EQ(parse_byte_size("1.5GB"), 1'500'000'000u);
  EXPECT_EQ(parse_byte_size("123"), 123u);
  EXPECT_EQ(parse_byte_size("64B"), 64u);
  for (const char* bad : {"", "GB", "5XB", "-1GB", "1.2.3MB", "0", "1e9"}) {
    try {
      parse_byte_size(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find(std::string("size '") + bad + "'"),
                std::string::npos);
    }
  }
}

TEST(HfFolder, ConfigJsonWithNewDtype) {
  testing::TempDir dir;
  auto source = testing::shared_data_dir() / "qwen3" / "Qwen--Qwen3-30B-A3B_config.json";
  json raw = read_json_file(source);
  write_config_json(dir / "out", raw, "float32");
  json saved = read_json_file(dir / "out" / "config.json");
  EXPECT_EQ(saved["dtype"], "float32");
  EXPECT_EQ(saved["torch_dtype"], "float32");
  saved.erase("dtype");
  saved["torch_dtype"] = raw["torch_dtype"];
  EXPECT_EQ(saved, raw);  // nothing else changed
  EXPECT_EQ(load_model_config(dir / "out" / "config.json").dtype, "float32");

  write_config_json(dir / "same", raw);
  EXPECT_EQ(read_json_file(dir / "same" / "config.json"), raw);
}

TEST(HfFolder, CopiesTokenizerFiles) {
  testing::TempDir dir;
  auto source = dir / "src";
  std::filesystem::create_directories(source / kChatTemplatesFolder);
  std::ofstream(source / "tokenizer.json") << "{\"model\": {}}";
  std::ofstream(source / "tokenizer_config.json") << "{}";
  std::ofstream(source / "generation_config.json") << "{\"do_sample\": true}";
  std::ofstream(source / kChatTemplatesFolder / "tool_use.jinja") << "{{ x }}";
  std::ofstream(source / "model.safetensors") << "not copied";
  auto copied = copy_tokenizer_files(source, dir / "dst");
  EXPECT_EQ(copied, (std::vector<std::string>{"tokenizer.json", "tokenizer_config.json",
                                              "generation_config.json",
                                              "additional_chat_templates/tool_use.jinja"}));
  std::ifstream in(dir / "dst" / "tokenizer.json");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "{\"model\": {}}");
  EXPECT_FALSE(std::filesystem::exists(dir / "dst" / "model.safetensors"));
  EXPECT_TRUE(copy_tokenizer_files(source, source).empty());
  EXPECT_THROW(copy_tokenizer_files(dir / "missing", dir / "dst"), Error);
}

// A tiny Llama folder written by moetune (bf16, sharded) loads in Transformers with our bytes.
TEST(HfFolder, TransformersLoadsWhatWeWrite) {
  if (testing::run_command("python3 -c 'import torch, transformers'").exit_code != 0)
    GTEST_SKIP() << "torch/transformers not installed";
  testing::TempDir dir;
  json config = {{"model_type", "llama"},    {"architectures", {"LlamaForCausalLM"}},
                 {"vocab_size", 32},         {"hidden_size", 16},
                 {"intermediate_size", 24},  {"num_hidden_layers", 1},
                 {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                 {"torch_dtype", "float32"}, {"tie_word_embeddings", false}};
  ModelConfig parsed = parse_model_config(config, "tiny");
  const int64_t hidden = parsed.hidden_size, kv = parsed.num_key_value_heads * parsed.head_dim;
  std::vector<std::pair<std::string, Shape>> shapes = {
      {"model.embed_tokens.weight", {32, hidden}},
      {"model.layers.0.self_attn.q_proj.weight", {hidden, hidden}},
      {"model.layers.0.self_attn.k_proj.weight", {kv, hidden}},
      {"model.layers.0.self_attn.v_proj.weight", {kv, hidden}},
      {"model.layers.0.self_attn.o_proj.weight", {hidden, hidden}},
      {"model.layers.0.mlp.gate_proj.weight", {24, hidden}},
      {"model.layers.0.mlp.up_proj.weight", {24, hidden}},
      {"model.layers.0.mlp.down_proj.weight", {hidden, 24}},
      {"model.layers.0.input_layernorm.weight", {hidden}},
      {"model.layers.0.post_attention_layernorm.weight", {hidden}},
      {"model.norm.weight", {hidden}},
      {"lm_head.weight", {32, hidden}}};
  std::vector<std::vector<uint16_t>> storage;
  std::vector<NamedTensor> tensors;
  storage.reserve(shapes.size());
  for (const auto& [name, shape] : shapes) {
    auto values = testing::random_floats(static_cast<size_t>(shape.numel()), storage.size() + 1);
    std::vector<uint16_t> bf16(values.size());
    for (size_t i = 0; i < values.size(); ++i) bf16[i] = float_to_bf16(values[i]);
    storage.push_back(std::move(bf16));
    tensors.push_back({name, Tensor(storage.back().data(), DType::BF16, shape)});
  }
  write_checkpoint(dir.path(), tensors, /*max_shard_bytes=*/1500);
  write_config_json(dir.path(), config, "bfloat16");
  ASSERT_TRUE(std::filesystem::exists(dir / kSafetensorsIndexName));

  // Transformers prints, per tensor, the sum of its float64 values; we compare with ours.
  std::string script =
      "import torch, transformers; "
      "m = transformers.AutoModelForCausalLM.from_pretrained('" +
      dir.path().string() +
      "'); "
      "assert m.dtype == torch.bfloat16, m.dtype; "
      "[print(n, repr(p.double().sum().item())) for n, p in m.state_dict().items()]";
  auto result = testing::run_command("python3 -c \"" + script + "\"");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  for (size_t t = 0; t < tensors.size(); ++t) {
    double sum = 0;
    for (uint16_t bits : storage[t]) sum += bf16_to_float(bits);
    std::ostringstream expected;
    expected << tensors[t].name << " ";
    auto line_start = result.output.find(expected.str());
    ASSERT_NE(line_start, std::string::npos) << tensors[t].name << "\n" << result.output;
    double loaded = std::stod(result.output.substr(line_start + expected.str().size()));
    EXPECT_NEAR(loaded, sum, 1e-9 * (1 + std::abs(sum))) << tensors[t].name;
  }
}

}  // namespace
}  // namespace moetune
