// Sharded optimizer state in checkpoints (see dist_checkpoint.h). Saved ranges and target
// ranges are intervals of the flattened parameter; a target range is filled from the
// intersections with every saved range, which must cover it exactly once.
#include "train/dist_checkpoint.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"

namespace moetune {

namespace fs = std::filesystem;

namespace {

struct SavedRange {
  int64_t begin = 0, end = 0, numel = 0;
  bool expert = false;
};

// One saved optimizer file and the ranges it holds.
struct Source {
  fs::path file;
  int ep_rank = 0;
  bool whole = false;  // a single-process file: every tensor whole
  std::map<std::string, SavedRange> ranges;
};

std::vector<Source> find_sources(const fs::path& checkpoint) {
  std::vector<Source> sources;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(checkpoint, error)) {
    const fs::path meta = entry.path() / "shards.json";
    if (!entry.is_directory() || entry.path().filename().string().rfind("rank-", 0) != 0 ||
        !fs::is_regular_file(meta))
      continue;
    std::ifstream in(meta);
    nlohmann::json json;
    try {
      json = nlohmann::json::parse(in);
      Source source;
      source.file = entry.path() / "optimizer.safetensors";
      source.ep_rank = json.at("ep_rank").get<int>();
      for (const auto& [name, range] : json.at("params").items())
        source.ranges[name] = {range.at(0).get<int64_t>(), range.at(1).get<int64_t>(),
                               range.at(2).get<int64_t>(), range.at(3).get<bool>()};
      sources.push_back(std::move(source));
    } catch (const nlohmann::json::exception& e) {
      fail(meta.string(), ": malformed shard description: ", e.what());
    }
  }
  if (sources.empty() && fs::is_regular_file(checkpoint / "optimizer.safetensors")) {
    Source whole;
    whole.file = checkpoint / "optimizer.safetensors";
    whole.whole = true;
    sources.push_back(std::move(whole));
  }
  if (sources.empty())
    fail("checkpoint ", checkpoint.string(),
         " has no optimizer state (neither optimizer.safetensors nor rank-*/shards.json)");
  return sources;
}

}  // namespace

bool is_distributed_checkpoint(const fs::path& checkpoint) {
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(checkpoint, error))
    if (entry.path().filename().string().rfind("rank-", 0) == 0 &&
        fs::is_regular_file(entry.path() / "shards.json"))
      return true;
  return false;
}

void write_optimizer_shards(const fs::path& folder, int rank, int ep_rank,
                            std::span<const OptimizerShard> shards, Backend& backend) {
  const fs::path directory = folder / ("rank-" + std::to_string(rank));
  fs::create_directories(directory);
  std::vector<CheckpointTensor> tensors;
  nlohmann::json params = nlohmann::json::object();
  for (const OptimizerShard& shard : shards) {
    params[shard.parameter] = {shard.begin, shard.end, shard.numel, shard.expert};
    for (const auto& [name, tensor] : shard.tensors)
      if (tensor.numel() > 0) tensors.push_back({name, tensor});  // an empty range: no tensor
  }
  write_checkpoint_tensors(directory / "optimizer.safetensors", tensors, backend);
  const nlohmann::json meta = {{"rank", rank}, {"ep_rank", ep_rank}, {"params", params}};
  write_file_atomic(directory / "shards.json", meta.dump(1) + "\n");
  fsync_path(directory);
}

void load_optimizer_shards(const fs::path& checkpoint, std::span<const OptimizerShard> targets,
                           int ep_rank, Backend& backend) {
  std::vector<Source> sources = find_sources(checkpoint);
  std::vector<SafetensorsFile> files;
  files.reserve(sources.size());
  for (const Source& source : sources) files.emplace_back(source.file);

  for (const OptimizerShard& target : targets) {
    const int64_t count = target.end - target.begin;
    for (const auto& [name, tensor] : target.tensors) {
      if (tensor.numel() != count)
        fail("optimizer state ", name, ": ", tensor.numel(), " elements for the range [",
             target.begin, ", ", target.end, ")");
      int64_t covered = 0;
      for (size_t s = 0; s < sources.size(); ++s) {
        const Source& source = sources[s];
        SavedRange range{0, target.numel, target.numel, target.expert};
        if (!source.whole) {
          const auto found = source.ranges.find(target.parameter);
          if (found == source.ranges.end()) continue;
          range = found->second;
          if (range.expert && source.ep_rank != ep_rank) continue;
        }
        const int64_t first = std::max(range.begin, target.begin);
        const int64_t last = std::min(range.end, target.end);
        if (first >= last) continue;
        const SafetensorsFile& file = files[s];
        if (!file.contains(name)) fail(source.file.string(), ": tensor ", name, " is missing");
        const TensorInfo& info = file.info(name);
        if (range.numel != target.numel || info.dtype != tensor.dtype ||
            info.shape.numel() != range.end - range.begin)
          fail(source.file.string(), ": tensor ", name, " is ", dtype_name(info.dtype),
               info.shape.str(), " of a parameter of ", range.numel, " elements; expected ",
               dtype_name(tensor.dtype), " of ", target.numel,
               " (a checkpoint of another model or recipe?)");
        const size_t element = dtype_size(tensor.dtype);
        const std::span<const std::byte> bytes = file.bytes(name);
        Buffer host(tensor.dtype, {last - first}, Device::CPU);
        std::memcpy(host.tensor().data, bytes.data() + (first - range.begin) * element,
                    static_cast<size_t>(last - first) * element);
        backend.copy(tensor.view({count}).slice_rows(first - target.begin, last - target.begin),
                     host.tensor());
        backend.synchronize();
        covered += last - first;
      }
      if (covered != count)
        fail("checkpoint ", checkpoint.string(), ": the saved optimizer state covers ", covered,
             " of the ", count, " elements [", target.begin, ", ", target.end, ") of ", name,
             " that this rank needs (was expert_parallel changed, or a rank's folder lost?)");
    }
  }
}

}  // namespace moetune
