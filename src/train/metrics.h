// metrics.jsonl: one JSON object per logged step ({"step", "loss", "lr", "grad_norm", "tokens",
// "tokens_per_s", "elapsed_s", ...}) and per evaluation ({"step", "eval": true, "eval_loss",
// "eval_accuracy"}), flushed line by line so a crash loses nothing already logged. Doubles are
// written with round-trip precision (nlohmann::json), so two runs' values compare exactly.
// On resume the rows after the checkpoint's step are dropped (they are produced again).
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "train/loss_plot.h"

namespace moetune {

class MetricsLog {
 public:
  // Starts a fresh file, or (resume_step set) keeps the existing rows with step <= it.
  MetricsLog(const std::filesystem::path& path, std::optional<int64_t> resume_step);

  void append(const nlohmann::json& row);
  const std::vector<LossPoint>& train_losses() const { return train_; }
  const std::vector<LossPoint>& eval_losses() const { return eval_; }

 private:
  void remember(const nlohmann::json& row);

  std::filesystem::path path_;
  std::ofstream out_;
  std::vector<LossPoint> train_, eval_;
};

// Reads every row of a metrics.jsonl (tests, resume); an Error naming the line when malformed.
std::vector<nlohmann::json> read_metrics(const std::filesystem::path& path);

}  // namespace moetune
