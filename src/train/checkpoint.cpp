// Training checkpoints (see checkpoint.h): write into step-N.tmp, fsync, rename.
#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"

namespace moetune {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStateFile = "trainer_state.json";

std::optional<int64_t> step_of(const fs::path& folder) {
  const std::string name = folder.filename().string();
  if (name.rfind("step-", 0) != 0 || name.size() <= 5) return std::nullopt;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    step = step * 10 + (name[i] - '0');
    if (step > (int64_t{1} << 50)) return std::nullopt;
  }
  return step;
}

// Host copies of device tensors (kept alive while the file is written).
void write_tensors(const fs::path& file, std::span<const CheckpointTensor> tensors,
                   Backend& backend) {
  std::vector<Buffer> host;
  std::vector<NamedTensor> named;
  host.reserve(tensors.size());
  named.reserve(tensors.size());
  for (const auto& t : tensors) {
    if (t.tensor.device == Device::CPU) {
      named.push_back({t.name, t.tensor});
      continue;
    }
    host.emplace_back(t.tensor.dtype, t.tensor.shape, Device::CPU);
    backend.copy(host.back().tensor(), t.tensor);
    named.push_back({t.name, host.back().tensor()});
  }
  backend.synchronize();
  write_safetensors(file, named);
}

}  // namespace

void fsync_path(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("cannot open ", path.string(), " to fsync: ", std::strerror(errno));
  const int result = ::fsync(fd);
  ::close(fd);
  if (result != 0) fail("fsync of ", path.string(), " failed: ", std::strerror(errno));
}

fs::path checkpoint_path(const fs::path& checkpoints_dir, int64_t step) {
  return checkpoints_dir / ("step-" + std::to_string(step));
}

fs::path checkpoint_temporary_path(const fs::path& checkpoints_dir, int64_t step) {
  return checkpoint_path(checkpoints_dir, step).string() + ".tmp";
}

void write_checkpoint_tensors(const fs::path& file, std::span<const CheckpointTensor> tensors,
                              Backend& backend) {
  write_tensors(file, tensors, backend);
}

fs::path write_training_checkpoint(const fs::path& checkpoints_dir,
                                   const CheckpointContents& contents, Backend& backend) {
  fs::create_directories(checkpoints_dir);
  const fs::path final_path = checkpoint_path(checkpoints_dir, contents.step);
  const fs::path temporary = checkpoint_temporary_path(checkpoints_dir, contents.step);
  fs::remove_all(temporary);
  fs::create_directories(temporary);

  if (contents.add_parts) contents.add_parts(temporary);
  write_tensors(temporary / "model.safetensors", contents.model, backend);
  if (const char* hook = std::getenv("MOETUNE_TEST_ABORT_IN_CHECKPOINT")) {
    if (std::to_string(contents.step) == hook) std::abort();  // a kill in the middle of the write
  }
  if (!contents.optimizer.empty() || !contents.add_parts)
    write_tensors(temporary / "optimizer.safetensors", contents.optimizer, backend);
  write_file_atomic(temporary / kStateFile, contents.trainer_state.dump(1) + "\n");
  fsync_path(temporary);

  // The same step written again (a resumed run stopping where it started): keep the old one.
  if (fs::exists(final_path)) {
    fs::remove_all(temporary);
    return final_path;
  }
  fs::rename(temporary, final_path);
  fsync_path(checkpoints_dir);
  return final_path;
}

std::vector<fs::path> list_checkpoints(const fs::path& checkpoints_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code error;
  if (!fs::is_directory(checkpoints_dir, error)) return {};
  for (const auto& entry : fs::directory_iterator(checkpoints_dir)) {
    if (!entry.is_directory()) continue;
    const auto step = step_of(entry.path());
    if (step && fs::is_regular_file(entry.path() / kStateFile))
      found.emplace_back(*step, entry.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> paths;
  for (auto& [step, path] : found) paths.push_back(path);
  return paths;
}

std::optional<fs::path> latest_checkpoint(const fs::path& checkpoints_dir) {
  auto all = list_checkpoints(checkpoints_dir);
  if (all.empty()) return std::nullopt;
  return all.back();
}

void remove_stale_temporaries(const fs::path& checkpoints_dir) {
  std::error_code error;
  if (!fs::is_directory(checkpoints_dir, error)) return;
  std::vector<fs::path> stale;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir))
    if (entry.path().extension() == ".tmp") stale.push_back(entry.path());
  for (const auto& path : stale) fs::remove_all(path);
}

void prune_checkpoints(const fs::path& checkpoints_dir, int64_t keep_last) {
  remove_stale_temporaries(checkpoints_dir);
  const auto all = list_checkpoints(checkpoints_dir);
  const int64_t excess = static_cast<int64_t>(all.size()) - keep_last;
  for (int64_t i = 0; i < excess; ++i) fs::remove_all(all[static_cast<size_t>(i)]);
}

nlohmann::json read_trainer_state(const fs::path& checkpoint) {
  const fs::path file = checkpoint / kStateFile;
  std::ifstream in(file);
  if (!in)
    fail("checkpoint ", checkpoint.string(), " is incomplete or not a checkpoint (no ", kStateFile,
         ")");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& error) {
    fail(file.string(), ": malformed JSON: ", error.what());
  }
}

void load_checkpoint_tensors(const fs::path& file, std::span<const CheckpointTensor> targets,
                             Backend& backend) {
  const SafetensorsFile tensors(file);
  for (const auto& target : targets) {
    if (!tensors.contains(target.name))
      fail(file.string(), ": tensor ", target.name, " is missing");
    const TensorInfo& info = tensors.info(target.name);
    if (info.shape != target.tensor.shape || info.dtype != target.tensor.dtype)
      fail(file.string(), ": tensor ", target.name, " is ", dtype_name(info.dtype),
           info.shape.str(), ", expected ", dtype_name(target.tensor.dtype),
           target.tensor.shape.str(), " (a checkpoint of another model or recipe?)");
    if (target.tensor.device == Device::CPU) {
      tensors.read_into(target.name, target.tensor);
    } else {
      Buffer host(target.tensor.dtype, target.tensor.shape, Device::CPU);
      tensors.read_into(target.name, host.tensor());
      backend.copy(target.tensor, host.tensor());
      backend.synchronize();
    }
  }
  if (tensors.names().size() != targets.size())
    fail(file.string(), ": holds ", tensors.names().size(), " tensors, expected ", targets.size());
}

}  // namespace moetune
