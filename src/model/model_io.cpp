// Loading and saving HF model folders (config.json + safetensors, sharded or not).
// Every on-disk tensor is a contiguous slice of one engine parameter (hf_names.h): load
// converts the file's dtype to fp32 on the host and copies into the slice (the backend
// converts to the parameter dtype); save copies each slice out in the requested dtype.
// F32 -> F32 and BF16 -> (any) -> BF16 round trips are bit-exact.
// With expert parallelism a rank reads only its experts' tensors (and all the others), and
// saving is spread over the EP group: the shard plan (which tensors go to which file) is
// computed from the config alone, identically on every rank (each EP rank's tensors in
// state-dict order, split by max_shard_bytes; EP rank 0 owns the non-expert tensors), so
// no rank needs another's data and the index can be written by EP rank 0 alone.
#include <set>
#include <unordered_map>

#include "dist/communicator.h"
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

// The tensors this rank holds: all, or with expert parallelism only its experts'.
std::vector<HfTensor> tensors_held(const ModelConfig& config, int64_t first_expert,
                                   int64_t local_experts) {
  if (local_experts >= config.num_experts) return hf_checkpoint_tensors(config);
  return hf_checkpoint_tensors(config, first_expert, local_experts);
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
  }
  // Read what this rank holds (with expert parallelism, not the other ranks' experts).
  for (const HfTensor& tensor : tensors_held(cfg, model->first_expert_, model->local_experts_)) {
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
  for (const HfTensor& tensor : tensors_held(config_, first_expert_, local_experts_)) {
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

namespace {

// One shard file of an expert-parallel save: the tensors of one EP rank.
struct PlannedShard {
  int owner = 0;  // EP rank that writes it
  std::vector<HfTensor> tensors;
};

// Every EP rank's tensors (rank 0: the non-expert ones and its experts; the others: their
// experts), in state-dict order, split like write_checkpoint (a new shard when the next
// tensor would pass max_bytes). Depends only on the config: the same on every rank.
std::vector<PlannedShard> plan_expert_parallel_shards(const ModelConfig& config, int ep,
                                                      DType dtype, uint64_t max_bytes) {
  if (max_bytes == 0) fail("max shard size must be positive");
  const int64_t local_experts = config.num_experts / ep;
  std::vector<PlannedShard> shards;
  for (int owner = 0; owner < ep; ++owner) {
    uint64_t bytes = 0;
    bool open = false;
    for (const HfTensor& tensor :
         hf_checkpoint_tensors(config, owner * local_experts, local_experts)) {
      if (owner > 0 && !tensor.expert) continue;
      const uint64_t size = static_cast<uint64_t>(tensor.shape.numel()) * dtype_size(dtype);
      if (!open || (bytes > 0 && bytes + size > max_bytes)) {
        shards.push_back(PlannedShard{owner, {}});
        bytes = 0;
        open = true;
      }
      shards.back().tensors.push_back(tensor);
      bytes += size;
    }
  }
  return shards;
}

}  // namespace

void Model::save_hf_folder(const std::filesystem::path& folder, const SaveOptions& options) const {
  const std::string dtype_string = dtype_json_name(options.dtype);
  std::filesystem::create_directories(folder);
  const bool expert_parallel = local_experts_ < config_.num_experts;
  const int ep_rank = expert_parallel ? options_.expert_comm->rank() : 0;

  // Tensors, converted on the device side of backend.copy into host buffers.
  std::vector<Buffer> host_buffers;
  auto to_host = [&](const std::vector<HfTensor>& tensors) {
    std::vector<NamedTensor> named;
    for (const HfTensor& tensor : tensors) {
      const Parameter* parameter = weights_->find(tensor.parameter);
      MOETUNE_CHECK(parameter, "no parameter ", tensor.parameter);
      host_buffers.emplace_back(options.dtype, tensor.shape);
      backend_.copy(host_buffers.back().tensor(),
                    parameter_slice(parameter->value, tensor.offset, tensor.shape));
      named.push_back(NamedTensor{tensor.hf_name, host_buffers.back().tensor()});
    }
    backend_.synchronize();
    return named;
  };
  if (!expert_parallel) {
    write_checkpoint(folder, to_host(hf_checkpoint_tensors(config_)),
                     static_cast<uint64_t>(options.max_shard_bytes));
  } else {
    // Everyone enters before anyone writes (EP rank 0 may have cleared the folder first).
    options_.expert_comm->barrier(backend_.stream());
    const int ep = options_.expert_comm->size();
    const std::vector<PlannedShard> shards = plan_expert_parallel_shards(
        config_, ep, options.dtype, static_cast<uint64_t>(options.max_shard_bytes));
    std::set<std::string> planned_files;
    for (size_t i = 0; i < shards.size(); ++i)
      planned_files.insert(shard_file_name(i, shards.size()));
    planned_files.insert(kSafetensorsIndexName);
    if (ep_rank == 0) {  // weight files of an earlier save that this one does not replace
      std::error_code error;
      for (const auto& entry : std::filesystem::directory_iterator(folder, error)) {
        const std::string name = entry.path().filename().string();
        if (entry.is_regular_file() && is_weight_file_name(name) && !planned_files.count(name))
          std::filesystem::remove(entry.path(), error);
      }
    }
    nlohmann::json weight_map = nlohmann::json::object();
    uint64_t total_bytes = 0, total_parameters = 0;
    for (size_t i = 0; i < shards.size(); ++i) {
      const std::string file = shard_file_name(i, shards.size());
      for (const HfTensor& tensor : shards[i].tensors) {
        weight_map[tensor.hf_name] = file;
        total_bytes += static_cast<uint64_t>(tensor.shape.numel()) * dtype_size(options.dtype);
        total_parameters += static_cast<uint64_t>(tensor.shape.numel());
      }
      if (shards[i].owner != ep_rank) continue;
      host_buffers.clear();
      write_safetensors(folder / file, to_host(shards[i].tensors));
    }
    if (ep_rank == 0) {
      const nlohmann::json index = {
          {"metadata", {{"total_size", total_bytes}, {"total_parameters", total_parameters}}},
          {"weight_map", weight_map}};
      write_json_file(folder / kSafetensorsIndexName, index);
    }
  }
  if (ep_rank == 0) write_config_and_tokenizer(folder, options, dtype_string);
  if (expert_parallel) options_.expert_comm->barrier(backend_.stream());
}

void Model::write_config_and_tokenizer(const std::filesystem::path& folder,
                                       const SaveOptions& options,
                                       const std::string& dtype_string) const {
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
