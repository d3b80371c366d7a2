// `moetune data preview RECIPE.yaml [--samples N] [--split train|eval]`: shows what the
// trainer will see. Reads the recipe's model.path / model.tokenizer (the tokenizer folder),
// data section and training.seq_len / training.seed, prints N examples as rendered text with
// the trained tokens marked (green on a terminal, «...» otherwise) and the token statistics.
// Only the data section is validated in full; the other sections belong to the trainer.
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cli/commands.h"
#include "core/config_keys.h"
#include "core/error.h"
#include "data/data_config.h"
#include "data/loader.h"
#include "data/tokenizer.h"

namespace moetune::cli {

namespace {

constexpr int64_t kDefaultSeqLen = 2048;
constexpr int64_t kDefaultSeed = 42;

YAML::Node load_recipe(const std::string& path) {
  try {
    YAML::Node recipe = YAML::LoadFile(path);
    if (!recipe.IsMap()) fail(path, ": a recipe is a YAML map of sections (model, data, ...)");
    return recipe;
  } catch (const YAML::BadFile&) {
    fail(path, ": cannot read the recipe");
  } catch (const YAML::Exception& error) {
    fail(path, ":", error.mark.line + 1, ": ", error.msg);
  }
}

std::filesystem::path tokenizer_folder(const YAML::Node& recipe,
                                       const std::filesystem::path& recipe_dir) {
  const YAML::Node model = recipe["model"];
  require_map(model, "model");
  auto folder = get_optional_string(model, "tokenizer", "model");
  if (!folder) folder = get_optional_string(model, "path", "model");
  if (!folder) fail("model.path: missing (the model folder holding the tokenizer)");
  std::filesystem::path path(*folder);
  if (path.is_relative()) path = recipe_dir / path;
  if (!std::filesystem::is_directory(path))
    fail(model["tokenizer"] ? "model.tokenizer" : "model.path", ": no such folder ", path.string());
  return path;
}

struct Marks {
  std::string trained_begin, trained_end, masked_begin, masked_end;
};

Marks choose_marks(bool color) {
  if (color) return {"\033[1;32m", "\033[0m", "\033[2m", "\033[0m"};
  return {"\xC2\xAB", "\xC2\xBB", "", ""};  // « »
}

// The example's text, decoded run by run of tokens with the same label state.
std::string marked_text(const Tokenizer& tokenizer, std::span<const int32_t> ids,
                        std::span<const uint8_t> trained, const Marks& marks) {
  std::string out;
  size_t begin = 0;
  auto is_target = [&](size_t t) { return t > 0 && trained[t]; };
  while (begin < ids.size()) {
    size_t end = begin + 1;
    while (end < ids.size() && is_target(end) == is_target(begin)) ++end;
    const std::string text = tokenizer.decode(ids.subspan(begin, end - begin), false);
    const bool target = is_target(begin);
    out += (target ? marks.trained_begin : marks.masked_begin) + text +
           (target ? marks.trained_end : marks.masked_end);
    begin = end;
  }
  return out;
}

std::string with_commas(int64_t value) {
  std::string digits = std::to_string(value < 0 ? -value : value), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return value < 0 ? "-" + out : out;
}

int run_preview(const std::string& recipe_path, int64_t samples, const std::string& split_name,
                bool color) {
  const YAML::Node recipe = load_recipe(recipe_path);
  const std::filesystem::path recipe_dir = std::filesystem::absolute(recipe_path).parent_path();
  const std::filesystem::path tokenizer_dir = tokenizer_folder(recipe, recipe_dir);
  const YAML::Node training = recipe["training"];
  const int64_t seq_len = get_int(training, "seq_len", "training", kDefaultSeqLen);
  check_range(seq_len, 2, int64_t{1} << 24, "training.seq_len");
  const int64_t seed = get_int(training, "seed", "training", kDefaultSeed);
  const DataConfig config = parse_data_config(recipe["data"], recipe_dir);

  const Tokenizer tokenizer = Tokenizer::from_folder(tokenizer_dir);
  const std::optional<ChatTemplate> chat_template = load_chat_template(config, tokenizer_dir);
  const Split split = split_name == "eval" ? Split::Eval : Split::Train;
  const DataLoader loader(config, tokenizer, chat_template ? &*chat_template : nullptr, seq_len,
                          static_cast<uint64_t>(seed), split);
  const TokenizedDataset& dataset = loader.dataset();
  const Marks marks = choose_marks(color);

  const int64_t shown = std::min<int64_t>(samples, dataset.examples.size());
  for (int64_t i = 0; i < shown; ++i) {
    const auto ids = dataset.examples.input_ids(i);
    const auto trained = dataset.examples.trained(i);
    std::printf("--- example %lld of %lld (%s): %zu tokens, %lld trained ---\n",
                static_cast<long long>(i + 1), static_cast<long long>(dataset.examples.size()),
                dataset.origin(i).c_str(), ids.size(),
                static_cast<long long>(trained_targets(trained)));
    std::printf("%s\n\n", marked_text(tokenizer, ids, trained, marks).c_str());
  }

  const DatasetStats stats = loader.stats();
  std::printf("=== %s split, seq_len %lld, %s\n", split_name.c_str(),
              static_cast<long long>(seq_len),
              color ? "trained tokens in green" : "trained tokens in «»");
  std::printf("records      %s read, %s skipped as malformed\n", with_commas(stats.records).c_str(),
              with_commas(stats.skipped_lines).c_str());
  std::printf(
      "examples     %s kept; %s truncated, %s dropped as too long, %s without trained "
      "tokens\n",
      with_commas(stats.examples).c_str(), with_commas(stats.truncated).c_str(),
      with_commas(stats.dropped_too_long).c_str(), with_commas(stats.dropped_untrained).c_str());
  const double mean = stats.examples ? static_cast<double>(stats.tokens) / stats.examples : 0.0;
  std::printf("tokens       %s (%.1f per example), %s trained (%.1f%%)\n",
              with_commas(stats.tokens).c_str(), mean, with_commas(stats.trained_tokens).c_str(),
              stats.tokens ? 100.0 * stats.trained_tokens / stats.tokens : 0.0);
  std::printf("rows         %s per epoch (%s), packing efficiency %.1f%%\n",
              with_commas(stats.rows).c_str(), config.packing ? "packed" : "one example per row",
              100.0 * stats.packing_efficiency);
  if (stats.realigned)
    std::printf("note         %s examples had a token crossing a mask boundary (re-aligned)\n",
                with_commas(stats.realigned).c_str());
  for (const std::string& message : stats.bad_line_messages)
    std::printf("skipped      %s\n", message.c_str());
  return 0;
}

}  // namespace

int run_data(int argc, char** argv) {
  CLI::App app{"moetune data: inspect a recipe's dataset", "moetune data"};
  app.require_subcommand(1);
  CLI::App* preview = app.add_subcommand("preview",
                                         "print rendered examples with the trained tokens marked, "
                                         "and the dataset's token statistics");
  std::string recipe_path, split = "train", color = "auto";
  int64_t samples = 3;
  preview->add_option("recipe", recipe_path, "the YAML recipe")->required();
  preview->add_option("--samples,-n", samples, "examples to print")->check(CLI::NonNegativeNumber);
  preview->add_option("--split", split, "train or eval")->check(CLI::IsMember({"train", "eval"}));
  preview->add_option("--color", color, "auto, always or never")
      ->check(CLI::IsMember({"auto", "always", "never"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  const bool use_color =
      color == "always" || (color == "auto" && isatty(fileno(stdout)) && !std::getenv("NO_COLOR"));
  return run_preview(recipe_path, samples, split, use_color);
}

}  // namespace moetune::cli
