// metrics.jsonl writer and reader (see metrics.h).
#include "train/metrics.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace moetune {

namespace fs = std::filesystem;

std::vector<nlohmann::json> read_metrics(const fs::path& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  if (!in) fail("cannot read ", path.string());
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    try {
      rows.push_back(nlohmann::json::parse(line));
    } catch (const nlohmann::json::exception& error) {
      // A torn last line (a kill while writing) is dropped; anything else is an error.
      if (in.peek() == std::char_traits<char>::eof()) break;
      fail(path.string(), ":", number, ": malformed JSON: ", error.what());
    }
  }
  return rows;
}

MetricsLog::MetricsLog(const fs::path& path, std::optional<int64_t> resume_step) : path_(path) {
  std::vector<nlohmann::json> kept;
  if (resume_step && fs::exists(path)) {
    for (auto& row : read_metrics(path))
      if (row.value("step", int64_t{0}) <= *resume_step) kept.push_back(std::move(row));
  }
  out_.open(path, std::ios::trunc);
  if (!out_) fail("cannot write ", path.string());
  for (const auto& row : kept) {
    out_ << row.dump() << '\n';
    remember(row);
  }
  out_.flush();
}

void MetricsLog::remember(const nlohmann::json& row) {
  const int64_t step = row.value("step", int64_t{0});
  if (row.value("eval", false)) {
    if (row.contains("eval_loss") && row["eval_loss"].is_number())
      eval_.push_back({step, row["eval_loss"].get<double>()});
  } else if (row.contains("loss") && row["loss"].is_number()) {
    train_.push_back({step, row["loss"].get<double>()});
  }
}

void MetricsLog::append(const nlohmann::json& row) {
  out_ << row.dump() << '\n';
  out_.flush();
  if (!out_) fail("cannot write ", path_.string());
  remember(row);
}

}  // namespace moetune
