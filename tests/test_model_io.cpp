// Model folders: load -> save -> load is bit-exact (single file, sharded, bf16), per-expert
// names survive for Qwen3-MoE and Mixtral, and bad folders (missing tensor, wrong shape
// against config.json, unexpected tensors, unknown model_type) fail with a message naming
// the file and tensor, from the library and from the CLI (exit code != 0).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/hf_names.h"
#include "model/model.h"
#include "test_util.h"

namespace moetune {
namespace {

using testing::TempDir;

std::filesystem::path fixture(const std::string& name) {
  return testing::source_dir() / "tests/fixtures/parity" / name;
}

void copy_folder(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::filesystem::create_directories(to);
  for (const auto& entry : std::filesystem::directory_iterator(from))
    std::filesystem::copy_file(entry.path(), to / entry.path().filename(),
                               std::filesystem::copy_options::overwrite_existing);
}

nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream file(path);
  return nlohmann::json::parse(file);
}
void write_json(const std::filesystem::path& path, const nlohmann::json& json) {
  std::ofstream(path) << json.dump(2);
}

// Rewrites model.safetensors keeping the tensors for which keep(name) is true, optionally
// adding one more.
void rewrite_checkpoint(const std::filesystem::path& folder,
                        const std::function<bool(const std::string&)>& keep,
                        const std::string& extra_name = "") {
  std::vector<Buffer> buffers;
  std::vector<NamedTensor> tensors;
  {
    const SafetensorsFile file(folder / "model.safetensors");
    for (const std::string& name : file.names()) {
      if (!keep(name)) continue;
      buffers.emplace_back(DType::F32, file.info(name).shape);
      file.read_into(name, buffers.back().tensor());
      tensors.push_back({name, buffers.back().tensor()});
    }
  }
  if (!extra_name.empty()) {
    buffers.emplace_back(DType::F32, Shape{4});
    tensors.push_back({extra_name, buffers.back().tensor()});
  }
  write_safetensors(folder / "model.safetensors", tensors);
}

void expect_same_tensors(const Model& a, const Model& b) {
  const auto left = a.hf_tensors_to_host(false), right = b.hf_tensors_to_host(false);
  ASSERT_EQ(left.size(), right.size());
  for (size_t i = 0; i < left.size(); ++i) {
    ASSERT_EQ(left[i].name, right[i].name);
    ASSERT_EQ(left[i].values.size(), right[i].values.size());
    EXPECT_EQ(0, std::memcmp(left[i].values.data(), right[i].values.data(),
                             left[i].values.size() * sizeof(float)))
        << left[i].name;
  }
}

class RoundTrip : public ::testing::TestWithParam<std::string> {};

TEST_P(RoundTrip, LoadSaveLoadIsBitExact) {
  auto backend = make_cpu_backend();
  const auto source = fixture(GetParam());
  auto model = Model::from_hf_folder(source, *backend);
  TempDir temp;
  model->save_hf_folder(temp / "single", {DType::F32, 5LL << 30, source});
  auto reloaded = Model::from_hf_folder(temp / "single", *backend);
  expect_same_tensors(*model, *reloaded);

  // Same bytes on disk as Transformers wrote, under the same names.
  const SafetensorsFile original(source / "model.safetensors");
  const SafetensorsFile saved(temp / "single" / "model.safetensors");
  ASSERT_EQ(original.names().size(), saved.names().size());
  for (const std::string& name : original.names()) {
    ASSERT_TRUE(saved.contains(name)) << name;
    const auto a = original.bytes(name), b = saved.bytes(name);
    ASSERT_EQ(a.size(), b.size()) << name;
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size())) << name;
  }
  EXPECT_TRUE(std::filesystem::exists(temp / "single" / "generation_config.json"));

  // Sharded: many small files plus an index, loading back the same values.
  model->save_hf_folder(temp / "sharded", {DType::F32, 20000, {}});
  EXPECT_TRUE(std::filesystem::exists(temp / "sharded" / "model.safetensors.index.json"));
  EXPECT_FALSE(std::filesystem::exists(temp / "sharded" / "model.safetensors"));
  auto from_shards = Model::from_hf_folder(temp / "sharded", *backend);
  expect_same_tensors(*model, *from_shards);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RoundTrip,
                         ::testing::Values("qwen3_moe_aux", "mixtral_top1", "llama3_rope"));

TEST(ModelIo, Bf16SaveLoadSaveIsBitExact) {
  auto backend = make_cpu_backend();
  auto model = Model::from_hf_folder(fixture("qwen3_moe_top3"), *backend);
  TempDir temp;
  model->save_hf_folder(temp / "a", {DType::BF16, 5LL << 30, {}});
  EXPECT_EQ(read_json(temp / "a" / "config.json")["dtype"], "bfloat16");
  auto bf16 = Model::from_hf_folder(temp / "a", *backend);
  bf16->save_hf_folder(temp / "b", {DType::BF16, 5LL << 30, {}});
  const SafetensorsFile a(temp / "a" / "model.safetensors"), b(temp / "b" / "model.safetensors");
  for (const std::string& name : a.names()) {
    EXPECT_EQ(a.info(name).dtype, DType::BF16);
    const auto x = a.bytes(name), y = b.bytes(name);
    ASSERT_EQ(x.size(), y.size());
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size())) << name;
  }
}

TEST(ModelIo, HfNamesCoverEveryParameterOnce) {
  for (const char* name : {"qwen3_moe_aux", "qwen3_moe_top3", "mixtral_top2", "qwen3_dense"}) {
    auto backend = make_cpu_backend();
    auto model = Model::from_hf_folder(fixture(name), *backend);
    std::map<std::string, int64_t> covered;
    for (const HfTensor& tensor : hf_checkpoint_tensors(model->config()))
      covered[tensor.parameter] += tensor.shape.numel();
    for (const Parameter& parameter : model->parameters())
      EXPECT_EQ(covered[parameter.name], parameter.value.numel()) << name << " " << parameter.name;
    EXPECT_EQ(covered.size(), model->parameters().size()) << name;
  }
}

TEST(ModelIo, MissingTensorIsNamed) {
  TempDir temp;
  copy_folder(fixture("mixtral_top2"), temp.path());
  const std::string missing = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
  rewrite_checkpoint(temp.path(), [&](const std::string& name) { return name != missing; });
  auto backend = make_cpu_backend();
  try {
    Model::from_hf_folder(temp.path(), *backend);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(missing), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("missing"), std::string::npos) << error.what();
  }
}

TEST(ModelIo, WrongShapeNamesBothShapes) {
  TempDir temp;
  copy_folder(fixture("qwen3_dense"), temp.path());
  nlohmann::json config = read_json(temp / "config.json");
  config["intermediate_size"] = 40;  // the file has 48
  write_json(temp / "config.json", config);
  auto backend = make_cpu_backend();
  try {
    Model::from_hf_folder(temp.path(), *backend);
    FAIL() << "no error";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("model.layers.0.mlp.gate_proj.weight"), std::string::npos) << message;
    EXPECT_NE(message.find("[48, 32]"), std::string::npos) << message;
    EXPECT_NE(message.find("[40, 32]"), std::string::npos) << message;
    EXPECT_NE(message.find("model.safetensors"), std::string::npos) << message;
  }
}

TEST(ModelIo, UnexpectedTensorsAreNamed) {
  TempDir temp;
  copy_folder(fixture("qwen3_dense"), temp.path());
  rewrite_checkpoint(
      temp.path(), [](const std::string&) { return true; }, "model.mystery.weight");
  auto backend = make_cpu_backend();
  try {
    Model::from_hf_folder(temp.path(), *backend);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("model.mystery.weight"), std::string::npos)
        << error.what();
  }
}

TEST(ModelIo, CliRejectsUnknownModelType) {
  TempDir temp;
  copy_folder(fixture("qwen3_dense"), temp / "model");
  nlohmann::json config = read_json(temp / "model" / "config.json");
  config["model_type"] = "gpt_bigcode";
  write_json(temp / "model" / "config.json", config);
  const auto batch = fixture("qwen3_dense") / "batch.safetensors";
  const auto result =
      testing::run_command(testing::moetune_binary().string() + " forward-backward --model " +
                           (temp / "model").string() + " --batch " + batch.string() + " --out " +
                           (temp / "out.safetensors").string());
  EXPECT_NE(result.exit_code, 0);
  EXPECT_NE(result.output.find("gpt_bigcode"), std::string::npos) << result.output;
  EXPECT_EQ(result.output.find("internal error"), std::string::npos) << result.output;
}

TEST(ModelIo, CliRejectsOutOfVocabularyIds) {
  TempDir temp;
  Buffer ids(DType::I64, {1, 4}), labels(DType::I64, {1, 4});
  for (int i = 0; i < 4; ++i) ids.ptr<int64_t>()[i] = labels.ptr<int64_t>()[i] = 3;
  ids.ptr<int64_t>()[2] = 100000;
  const NamedTensor tensors[] = {{"input_ids", ids.tensor()}, {"labels", labels.tensor()}};
  write_safetensors(temp / "batch.safetensors", tensors);
  const auto result = testing::run_command(
      testing::moetune_binary().string() + " forward-backward --model " +
      fixture("qwen3_dense").string() + " --batch " + (temp / "batch.safetensors").string() +
      " --out " + (temp / "out.safetensors").string());
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.output.find("input_ids[2] = 100000"), std::string::npos) << result.output;
}

TEST(ModelIo, InitThenInspect) {
  TempDir temp;
  const std::string binary = testing::moetune_binary().string();
  auto result = testing::run_command(
      binary + " init --config " + (fixture("qwen3_moe_aux") / "config.json").string() + " --out " +
      (temp / "init").string() + " --seed 7 --dtype bf16");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_EQ(read_json(temp / "init" / "config.json")["dtype"], "bfloat16");
  auto backend = make_cpu_backend();
  auto model = Model::from_hf_folder(temp / "init", *backend);
  // Norms are 1, linear weights have the configured spread.
  for (const auto& tensor : model->hf_tensors_to_host(false)) {
    if (tensor.name.ends_with("norm.weight")) {
      for (float value : tensor.values) ASSERT_EQ(value, 1.0f) << tensor.name;
    } else if (tensor.values.size() > 200) {
      double sum_squares = 0;
      for (float value : tensor.values) sum_squares += double(value) * value;
      const double std_dev = std::sqrt(sum_squares / tensor.values.size());
      EXPECT_NEAR(std_dev, model->config().initializer_range,
                  0.2 * model->config().initializer_range)
          << tensor.name;
    }
  }
  result = testing::run_command(binary + " inspect " + (temp / "init").string());
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("qwen3_moe"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("active per token"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("BF16"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("AdamW"), std::string::npos) << result.output;
}

TEST(ModelIo, ParameterCounts) {
  auto backend = make_cpu_backend();
  auto model = Model::from_hf_folder(fixture("qwen3_moe_top3"), *backend);
  int64_t total = 0;
  for (const Parameter& parameter : model->parameters()) total += parameter.value.numel();
  EXPECT_EQ(model->num_parameters(false), total);
  // 6 experts, top-3: half of the expert weights are active per token.
  const ModelConfig& config = model->config();
  const int64_t expert_params = config.num_hidden_layers * config.num_experts * 3 *
                                config.hidden_size * config.moe_intermediate_size;
  EXPECT_EQ(model->num_parameters(true), total - expert_params / 2);
}

}  // namespace
}  // namespace moetune
