// Parsing of the recipe's `data` section (schema in data_config.h). Every key goes through
// core/config_keys so typos and wrong types are errors naming the dotted key.
#include "data/data_config.h"

#include <array>
#include <string_view>

#include "core/config_keys.h"
#include "core/error.h"

namespace moetune {

namespace {

constexpr std::array<std::string_view, 14> kDataKeys = {
    "train",         "eval",          "eval_fraction", "train_on",       "truncation",
    "packing",       "shuffle",       "seed",          "skip_bad_lines", "max_bad_lines",
    "chat_template", "system_prompt", "add_eos",       "format"};
constexpr std::array<std::string_view, 4> kSourceKeys = {"path", "format", "columns",
                                                         "max_samples"};
constexpr std::array<std::string_view, 10> kColumnNames = {
    "messages", "tools",   "system", "instruction", "input",
    "output",   "history", "prompt", "completion",  "text"};
constexpr std::array<std::string_view, 6> kFormatNames = {"auto",   "messages",          "sharegpt",
                                                          "alpaca", "prompt_completion", "text"};

DataFormat parse_format(const std::string& name) {
  if (name == "messages") return DataFormat::Messages;
  if (name == "sharegpt") return DataFormat::ShareGPT;
  if (name == "alpaca") return DataFormat::Alpaca;
  if (name == "prompt_completion") return DataFormat::PromptCompletion;
  if (name == "text") return DataFormat::Text;
  return DataFormat::Auto;
}

std::filesystem::path resolve_existing(const std::string& path_text,
                                       const std::filesystem::path& recipe_dir,
                                       const std::string& key_path) {
  if (path_text.empty()) fail(key_path, ": the path is empty");
  std::filesystem::path path(path_text);
  if (path.is_relative()) path = recipe_dir / path;
  path = path.lexically_normal();
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error))
    fail(key_path, ": no such file ", path.string());
  return path;
}

DataSource parse_source(const YAML::Node& node, const std::string& context,
                        const std::filesystem::path& recipe_dir, DataFormat default_format) {
  DataSource source;
  source.context = context;
  source.format = default_format;
  if (node.IsScalar()) {
    source.path = resolve_existing(node.Scalar(), recipe_dir, context);
    return source;
  }
  if (!node.IsMap())
    fail(context, ": expected a path or a map with path:, got ", describe_node(node));
  check_known_keys(node, kSourceKeys, context);
  const auto path = get_optional_string(node, "path", context);
  if (!path) fail(config_key_path(context, "path"), ": missing (the data file)");
  source.path = resolve_existing(*path, recipe_dir, config_key_path(context, "path"));
  const std::string format_name = get_choice(node, "format", context, kFormatNames, "");
  if (!format_name.empty()) source.format = parse_format(format_name);
  const YAML::Node columns = node["columns"];
  const std::string columns_context = config_key_path(context, "columns");
  check_known_keys(columns, kColumnNames, columns_context);
  if (columns.IsDefined() && columns.IsMap()) {
    for (const auto& entry : columns) {
      const std::string name = entry.first.Scalar();
      source.columns[name] = get_string(columns, name, columns_context, name);
    }
  }
  source.max_samples = get_optional_int(node, "max_samples", context);
  if (source.max_samples)
    check_range(*source.max_samples, 1, INT64_MAX, config_key_path(context, "max_samples"));
  return source;
}

// A path, a list of paths/sources, or one source map.
std::vector<DataSource> parse_sources(const YAML::Node& node, const std::string& context,
                                      const std::filesystem::path& recipe_dir,
                                      DataFormat default_format) {
  std::vector<DataSource> sources;
  if (!node.IsDefined() || node.IsNull()) return sources;
  if (node.IsSequence()) {
    if (node.size() == 0) fail(context, ": the list of data files is empty");
    for (size_t i = 0; i < node.size(); ++i)
      sources.push_back(parse_source(node[i], context + "[" + std::to_string(i) + "]", recipe_dir,
                                     default_format));
  } else {
    sources.push_back(parse_source(node, context, recipe_dir, default_format));
  }
  return sources;
}

}  // namespace

const char* data_format_name(DataFormat format) {
  switch (format) {
    case DataFormat::Auto:
      return "auto";
    case DataFormat::Messages:
      return "messages";
    case DataFormat::ShareGPT:
      return "sharegpt";
    case DataFormat::Alpaca:
      return "alpaca";
    case DataFormat::PromptCompletion:
      return "prompt_completion";
    case DataFormat::Text:
      return "text";
  }
  return "?";
}

std::string DataSource::column(const std::string& name) const {
  const auto found = columns.find(name);
  return found == columns.end() ? name : found->second;
}

DataConfig parse_data_config(const YAML::Node& data, const std::filesystem::path& recipe_dir) {
  const std::string context = "data";
  if (!data.IsDefined() || data.IsNull()) fail("data: missing (the recipe needs data.train)");
  check_known_keys(data, kDataKeys, context);

  DataConfig config;
  // data.format: a default format for every source that does not name its own.
  const std::string default_format_name = get_choice(data, "format", context, kFormatNames, "auto");
  const DataFormat default_format = parse_format(default_format_name);

  config.train = parse_sources(data["train"], "data.train", recipe_dir, default_format);
  if (config.train.empty()) fail("data.train: missing (the training data files)");
  config.eval = parse_sources(data["eval"], "data.eval", recipe_dir, default_format);
  config.eval_fraction = get_double(data, "eval_fraction", context, 0.0);
  if (data["eval_fraction"].IsDefined()) {
    if (!(config.eval_fraction > 0.0 && config.eval_fraction < 1.0))
      fail("data.eval_fraction: expected a fraction in (0, 1), got ", config.eval_fraction);
    if (!config.eval.empty())
      fail("data.eval_fraction: give either data.eval or data.eval_fraction, not both");
  }

  constexpr std::array<std::string_view, 4> train_on_names = {"auto", "assistant", "completion",
                                                              "all"};
  const std::string train_on = get_choice(data, "train_on", context, train_on_names, "auto");
  config.train_on = train_on == "all"    ? TrainOn::All
                    : train_on == "auto" ? TrainOn::Auto
                                         : TrainOn::Responses;

  constexpr std::array<std::string_view, 3> truncation_names = {"right", "left", "drop"};
  const std::string truncation = get_choice(data, "truncation", context, truncation_names, "right");
  config.truncation = truncation == "left"   ? Truncation::Left
                      : truncation == "drop" ? Truncation::Drop
                                             : Truncation::Right;

  config.packing = get_bool(data, "packing", context, true);
  config.shuffle = get_bool(data, "shuffle", context, true);
  if (const auto seed = get_optional_int(data, "seed", context)) {
    check_range(*seed, 0, INT64_MAX, "data.seed");
    config.seed = static_cast<uint64_t>(*seed);
  }
  const bool skip_bad_lines = get_bool(data, "skip_bad_lines", context, false);
  config.max_bad_lines = skip_bad_lines ? -1 : 0;
  if (const auto max_bad = get_optional_int(data, "max_bad_lines", context)) {
    check_range(*max_bad, 0, INT64_MAX, "data.max_bad_lines");
    config.max_bad_lines = *max_bad;
  }
  if (const auto template_path = get_optional_string(data, "chat_template", context))
    config.chat_template = resolve_existing(*template_path, recipe_dir, "data.chat_template");
  config.system_prompt = get_optional_string(data, "system_prompt", context);
  config.add_eos = get_bool(data, "add_eos", context, true);
  return config;
}

}  // namespace moetune
