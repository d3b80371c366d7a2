// Loading and saving HF model folders (config.json + safetensors, sharded or not).
// Every on-disk tensor is a contiguous slice of one engine parameter (hf_names.h): load
// converts the file's dtype to fp32 on the host and copies into the slice (the backend
// converts to the parameter dtype); save copies each slice out in the requested dtype.
// F32 -> F32 and BF16 -> (any) -> BF16 round trips are bit-exact.
#include <set>
#include <unordered_map>

#include "io/checkpoint.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "model/hf_names.h"
#include "model/model.h"

namespace moetune {

namespace {
// The `shape` elements of `parameter` starting at element `offset`.
Tensor parameter_slice(const Tensor& parameter, int64_t offset, Shape shape) {
  MOETUNE_CHECK(offset + shape.numel() <= parameter.numel(), "slice past the parameter end");
  return Tensor(static_cast<char*>(parameter.data) + offset * dtype_size(parameter.dtype),
                parameter.dtype, shape, parameter.device);
}

// Tensors a checkpoint may hold that the model does not use (ignored, as Transformers does).
bool ignorable(const std::string& name, const ModelConfig& config) {
  if (name.ends_with("rotary_emb.inv_freq")) return true;
  return config.tie_word_embeddings && name == "lm_head.weight";
}

std::string dtype_json_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "float32";
    case DType::BF16:
      return "bfloat16";
    case DType::F16:
      return "float16";
    default:
      fail("cannot save weights as ", dtype_name(dtype), " (F32, BF16 or F16)");
  }
}

const char* const kTokenizerFiles[] = {"tokenizer.json",
                                       "tokenizer_config.json",
                                       "special_tokens_map.json",
                                       "generation_config.json",
                                       "chat_template.jinja",
                                       "chat_template.json",
                                       "vocab.json",
                                       "merges.txt",
                                       "tokenizer.model",
                                       "added_tokens.json"};
}  // namespace

std::unique_ptr<Model> Model::from_hf_folder(const std::filesystem::path& folder, Backend& backend,
                                             ModelOptions options) {
  const ModelConfig config = load_model_config(folder / "config.json");
  std::unique_ptr<Model> model(new Model(config, backend, options));
  const ModelConfig& cfg = model->config();
  CheckpointReader reader(folder);

  const std::vector<HfTensor> expected = hf_checkpoint_tensors(cfg);
  std::set<std::string> expected_names;
  for (const HfTensor& tensor : expected) expected_names.insert(tensor.hf_name);
  std::vector<std::string> unexpected;
  for (const std::string& name : reader.names())
    if (!expected_names.count(name) && !ignorable(name, cfg)) unexpected.push_back(name);
  if (!unexpected.empty()) {
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 8; ++i) list += (i ? ", " : "") + unexpected[i];
    if (unexpected.size() > 8) list += ", ... (" + std::to_string(unexpected.size()) + " in all)";
    fail(folder.string(), ": tensors that a ", cfg.model_type, " model with this config.json ",
         "does not have: ", list);
  }

  for (const HfTensor& tensor : expected) {
    if (!reader.contains(tensor.hf_name))
      fail(folder.string(), ": missing tensor ", tensor.hf_name, " (expected shape ",
           tensor.shape.str(), " from config.json)");
    const TensorInfo& info = reader.info(tensor.hf_name);
    if (info.shape != tensor.shape)
      fail(reader.file_of(tensor.hf_name).path().string(), ": tensor ", tensor.hf_name,
           " has shape ", info.shape.str(), " but config.json implies ", tensor.shape.str());
    const Parameter* parameter = model->weights_->find(tensor.parameter);
    MOETUNE_CHECK(parameter, "no parameter ", tensor.parameter);
    Buffer host(DType::F32, tensor.shape);
    reader.read_into(tensor.hf_name, host.tensor());
    backend.copy(parameter_slice(parameter->value, tensor.offset, tensor.shape), host.tensor());
    backend.synchronize();
  }
  model->zero_grads();
  return model;
}

std::vector<Model::NamedHostTensor> Model::hf_tensors_to_host(bool gradients) const {
  std::vector<NamedHostTensor> out;
  for (const HfTensor& tensor : hf_checkpoint_tensors(config_)) {
    const Parameter* parameter = weights_->find(tensor.parameter);
    MOETUNE_CHECK(parameter, "no parameter ", tensor.parameter);
    NamedHostTensor host{tensor.hf_name, tensor.shape,
                         std::vector<float>(static_cast<size_t>(tensor.shape.numel()))};
    const Tensor& source = gradients ? parameter->grad : parameter->value;
    if (source.data == nullptr)
      fail("gradient of ", tensor.parameter,
           " is not held: per-group gradient storage frees each group after its update");
    backend_.copy(Tensor(host.values.data(), DType::F32, tensor.shape),
                  parameter_slice(source, tensor.offset, tensor.shape));
    out.push_back(std::move(host));
  }
  backend_.synchronize();
  return out;
}

void Model::save_hf_folder(const std::filesystem::path& folder, const SaveOptions& options) const {
  const std::string dtype_string = dtype_json_name(options.dtype);
  std::filesystem::create_directories(folder);

  // Tensors, converted on the device side of backend.copy into host buffers.
  const std::vector<HfTensor> layout = hf_checkpoint_tensors(config_);
  std::vector<Buffer> host_buffers;
  std::vector<NamedTensor> named;
  host_buffers.reserve(layout.size());
  for (const HfTensor& tensor : layout) {
    const Parameter* parameter = weights_->find(tensor.parameter);
    MOETUNE_CHECK(parameter, "no parameter ", tensor.parameter);
    host_buffers.emplace_back(options.dtype, tensor.shape);
    backend_.copy(host_buffers.back().tensor(),
                  parameter_slice(parameter->value, tensor.offset, tensor.shape));
    named.push_back(NamedTensor{tensor.hf_name, host_buffers.back().tensor()});
  }
  backend_.synchronize();
  write_checkpoint(folder, named, static_cast<uint64_t>(options.max_shard_bytes));

  // config.json: the file as read, with the dtype of what we wrote.
  nlohmann::json json = config_.raw.is_object() ? config_.raw : nlohmann::json::object();
  json["dtype"] = dtype_string;
  if (json.contains("torch_dtype")) json["torch_dtype"] = dtype_string;
  write_json_file(folder / "config.json", json);

  if (!options.tokenizer_source.empty()) {
    for (const char* name : kTokenizerFiles) {
      const auto source = options.tokenizer_source / name;
      if (!std::filesystem::exists(source)) continue;
      if (std::filesystem::equivalent(options.tokenizer_source, folder)) continue;
      std::filesystem::copy_file(source, folder / name,
                                 std::filesystem::copy_options::overwrite_existing);
    }
  }
}

}  // namespace moetune
