// build_dataset: files -> records -> Examples -> (split) -> encoded, truncated examples.
// Records are converted before the split so the held-out choice depends only on the data
// and the seed; only the chosen split is tokenized.
#include "data/dataset.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "data/dataset_encode.h"
#include "data/dataset_formats.h"

namespace moetune {

using json = RecordJson;

namespace {

constexpr size_t kKeptBadLineMessages = 5;
constexpr uint64_t kEvalSplitStream = 0xE7A1;

struct PendingExample {
  Example example;
  ExampleOrigin origin;
};

// Applies data.skip_bad_lines / max_bad_lines to one malformed record.
class BadLinePolicy {
 public:
  BadLinePolicy(int64_t max_bad_lines, DatasetStats& stats) : max_(max_bad_lines), stats_(stats) {}
  void report(const std::string& where, const std::string& message) {
    const std::string full = where + ": " + message;
    if (max_ == 0) fail(full, " (data.skip_bad_lines: true skips such records)");
    ++stats_.skipped_lines;
    if (max_ > 0 && stats_.skipped_lines > max_)
      fail("more than data.max_bad_lines = ", max_, " malformed records; the last: ", full);
    if (stats_.bad_line_messages.size() < kKeptBadLineMessages)
      stats_.bad_line_messages.push_back(full);
  }

 private:
  int64_t max_;
  DatasetStats& stats_;
};

std::vector<PendingExample> read_sources(const std::vector<DataSource>& sources,
                                         const FormatOptions& options, BadLinePolicy& bad_lines) {
  std::vector<PendingExample> pending;
  for (size_t s = 0; s < sources.size(); ++s) {
    const DataSource& source = sources[s];
    DataFormat format = source.format;
    int64_t converted = 0;
    read_json_records(source.path, [&](int64_t line, std::string_view text) {
      const std::string where = source.path.string() + ":" + std::to_string(line);
      const json record = json::parse(text, nullptr, false);
      if (record.is_discarded()) {
        bad_lines.report(where, "malformed JSON");
        return true;
      }
      try {
        if (format == DataFormat::Auto) format = detect_format(record, source);
        pending.push_back(
            {convert_record(record, format, source, options), {static_cast<int32_t>(s), line}});
      } catch (const Error& error) {
        bad_lines.report(where, error.what());
        return true;
      }
      ++converted;
      return !source.max_samples || converted < *source.max_samples;
    });
  }
  return pending;
}

// Indices (sorted) of the records held out for eval.
std::vector<uint8_t> eval_membership(size_t records, double fraction, uint64_t seed) {
  std::vector<uint8_t> is_eval(records, 0);
  if (records < 2) fail("data.eval_fraction: needs at least 2 records, the data has ", records);
  auto count = static_cast<int64_t>(static_cast<double>(records) * fraction + 0.5);
  count = std::clamp<int64_t>(count, 1, static_cast<int64_t>(records) - 1);
  const std::vector<int64_t> order =
      shuffled_indices(static_cast<int64_t>(records), mix_seed(seed, kEvalSplitStream));
  for (int64_t i = 0; i < count; ++i) is_eval[order[i]] = 1;
  return is_eval;
}

bool has_template_in_folder(const std::filesystem::path& dir) {
  if (dir.empty()) return false;
  if (std::filesystem::exists(dir / "chat_template.jinja")) return true;
  std::ifstream file(dir / "tokenizer_config.json");
  if (!file) return false;
  const json config = json::parse(file, nullptr, false);
  return !config.is_discarded() && config.is_object() && config.contains("chat_template") &&
         !config["chat_template"].is_null();
}

}  // namespace

std::string TokenizedDataset::origin(int64_t example) const {
  const ExampleOrigin& where = origins.at(example);
  return files.at(where.source).string() + ":" + std::to_string(where.line);
}

std::optional<ChatTemplate> load_chat_template(const DataConfig& config,
                                               const std::filesystem::path& tokenizer_dir) {
  if (config.chat_template) {
    std::ifstream file(*config.chat_template, std::ios::binary);
    if (!file) fail("data.chat_template: cannot read ", config.chat_template->string());
    std::ostringstream source;
    source << file.rdbuf();
    return ChatTemplate(source.str(), config.chat_template->string());
  }
  if (!has_template_in_folder(tokenizer_dir)) return std::nullopt;
  return ChatTemplate::from_tokenizer_folder(tokenizer_dir);
}

TokenizedDataset build_dataset(const DataConfig& config, const Tokenizer& tokenizer,
                               const ChatTemplate* chat_template, int64_t seq_len, uint64_t seed,
                               Split split) {
  if (seq_len < 2) fail("training.seq_len: must be at least 2, got ", seq_len);
  if (split == Split::Eval && !config.has_eval())
    fail("the recipe has no eval data (set data.eval or data.eval_fraction)");
  const uint64_t data_seed = config.seed.value_or(seed);
  const bool from_eval_files = split == Split::Eval && !config.eval.empty();
  const std::vector<DataSource>& sources = from_eval_files ? config.eval : config.train;

  TokenizedDataset dataset;
  for (const DataSource& source : sources) dataset.files.push_back(source.path);
  DatasetStats& stats = dataset.stats;
  BadLinePolicy bad_lines(config.max_bad_lines, stats);
  FormatOptions options;
  options.has_chat_template = chat_template != nullptr;
  options.system_prompt = config.system_prompt;
  std::vector<PendingExample> pending = read_sources(sources, options, bad_lines);

  if (!from_eval_files && config.eval_fraction > 0.0) {
    const std::vector<uint8_t> is_eval =
        eval_membership(pending.size(), config.eval_fraction, data_seed);
    const uint8_t keep = split == Split::Eval ? 1 : 0;
    std::vector<PendingExample> chosen;
    for (size_t i = 0; i < pending.size(); ++i)
      if (is_eval[i] == keep) chosen.push_back(std::move(pending[i]));
    pending = std::move(chosen);
  }
  stats.records = static_cast<int64_t>(pending.size());

  const ExampleEncoder encoder(tokenizer, chat_template, config.train_on, config.add_eos);
  for (PendingExample& item : pending) {
    EncodedExample encoded;
    try {
      encoded = encoder.encode(item.example);
    } catch (const Error& error) {
      bad_lines.report(
          dataset.files[item.origin.source].string() + ":" + std::to_string(item.origin.line),
          error.what());
      continue;
    }
    item.example = Example();  // free the JSON as we go
    stats.realigned += encoded.realigned ? 1 : 0;
    bool truncated = false;
    const bool kept = truncate_example(encoded, seq_len, config.truncation, truncated);
    stats.truncated += truncated ? 1 : 0;
    if (!kept) {
      ++stats.dropped_too_long;
      continue;
    }
    const int64_t targets = trained_targets(encoded.trained);
    if (targets == 0) {
      ++stats.dropped_untrained;
      continue;
    }
    dataset.examples.add(encoded.input_ids, encoded.trained);
    dataset.origins.push_back(item.origin);
    stats.tokens += static_cast<int64_t>(encoded.input_ids.size());
    stats.trained_tokens += targets;
  }
  stats.examples = dataset.examples.size();
  if (stats.examples == 0)
    fail("data: no usable examples in the ", split == Split::Eval ? "eval" : "train", " split (",
         stats.records, " records, ", stats.skipped_lines, " skipped, ", stats.dropped_too_long,
         " too long, ", stats.dropped_untrained, " without trained tokens)");
  return dataset;
}

}  // namespace moetune
