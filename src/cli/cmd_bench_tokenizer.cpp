// `moetune bench-tokenizer`: single-threaded encode throughput on a JSONL file of
// {"text": ...} lines (bench/tokenizer_bench_hf.py writes the file and measures HF
// tokenizers on the same texts). Reports the best of --repeat timed passes over all texts,
// after one untimed warm-up pass, as texts/s, MB/s and tokens/s.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "data/tokenizer.h"

namespace moetune::cli {

int run_bench_tokenizer(int argc, char** argv) {
  CLI::App app{"Measure single-threaded tokenizer encode speed on {\"text\"} JSONL lines"};
  std::string tokenizer_dir, input_path;
  int repeat = 3;
  bool add_special_tokens = false;
  app.add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json")->required();
  app.add_option("--input", input_path, "JSONL with {\"text\": ...} lines")->required();
  app.add_option("--repeat", repeat, "timed passes (the best is reported)");
  app.add_flag("--add-special-tokens", add_special_tokens, "apply the post-processor");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  std::vector<std::string> texts;
  size_t bytes = 0;
  std::ifstream in(input_path);
  if (!in) fail(input_path, ": cannot open");
  std::string line;
  for (size_t number = 1; std::getline(in, line); ++number) {
    try {
      texts.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
    } catch (const nlohmann::json::exception& error) {
      fail(input_path, ":", number, ": ", error.what());
    }
    bytes += texts.back().size();
  }
  const auto load_start = std::chrono::steady_clock::now();
  const Tokenizer tokenizer = Tokenizer::from_folder(tokenizer_dir);
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
  size_t tokens = 0;
  for (const auto& text : texts) tokens += tokenizer.encode(text, add_special_tokens).size();
  double best = 1e30;
  for (int pass = 0; pass < std::max(repeat, 1); ++pass) {
    const auto start = std::chrono::steady_clock::now();
    size_t check = 0;
    for (const auto& text : texts) check += tokenizer.encode(text, add_special_tokens).size();
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (check != tokens) fail("non-deterministic token count");
  }
  std::printf(
      "{\"impl\": \"moetune\", \"texts\": %zu, \"bytes\": %zu, \"tokens\": %zu, \"load_s\": %.3f, "
      "\"encode_s\": %.4f, \"MB_per_s\": %.2f, \"tokens_per_s\": %.0f}\n",
      texts.size(), bytes, tokens, load_seconds, best, bytes / best / 1e6, tokens / best);
  return 0;
}

}  // namespace moetune::cli
