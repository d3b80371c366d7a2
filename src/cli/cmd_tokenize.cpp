// `moetune tokenize`: JSONL in, JSONL out with a Hugging Face tokenizer folder.
//   encode: {"text": "..."} per line -> {"ids": [...]}
//   --decode: {"ids": [...]} per line -> {"text": "..."}
// A malformed line is an error naming file:line. Output is written to a temporary file and
// renamed into place at the end, so a failed run leaves no partial output.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "data/tokenizer.h"

namespace moetune::cli {

int run_tokenize(int argc, char** argv) {
  CLI::App app{
      "Encode {\"text\"} lines to {\"ids\"} (or decode with --decode) with a HF tokenizer"};
  std::string tokenizer_dir, input_path, output_path;
  bool add_special_tokens = false, decode = false, skip_special_tokens = false;
  app.add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json")->required();
  app.add_option("--input", input_path, "input JSONL")->required();
  app.add_option("--output", output_path, "output JSONL")->required();
  app.add_flag("--add-special-tokens", add_special_tokens,
               "apply the post-processor's special tokens");
  app.add_flag("--decode", decode, "decode {\"ids\"} lines to {\"text\"}");
  app.add_flag("--skip-special-tokens", skip_special_tokens, "with --decode: drop special tokens");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }

  const Tokenizer tokenizer = Tokenizer::from_folder(tokenizer_dir);
  std::ifstream in(input_path, std::ios::binary);
  if (!in) fail(input_path, ": cannot open");
  const std::string temp_path = output_path + ".tmp";
  {
    std::ofstream out(temp_path, std::ios::binary);
    if (!out) fail(output_path, ": cannot write");
    std::string line;
    for (size_t line_number = 1; std::getline(in, line); ++line_number) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      const std::string where = input_path + ":" + std::to_string(line_number);
      nlohmann::json row;
      try {
        row = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& error) {
        std::remove(temp_path.c_str());
        fail(where, ": invalid JSON: ", error.what());
      }
      try {
        nlohmann::json result;
        if (decode) {
          if (!row.is_object() || !row.contains("ids") || !row["ids"].is_array())
            fail(where, ": expected an object with an \"ids\" array");
          std::vector<int32_t> ids;
          for (const auto& id : row["ids"]) {
            if (!id.is_number_integer()) fail(where, ": \"ids\" must hold integers");
            ids.push_back(id.get<int32_t>());
          }
          result["text"] = tokenizer.decode(ids, skip_special_tokens);
        } else {
          if (!row.is_object() || !row.contains("text") || !row["text"].is_string())
            fail(where, ": expected an object with a \"text\" string");
          result["ids"] =
              tokenizer.encode(row["text"].get_ref<const std::string&>(), add_special_tokens);
        }
        out << result.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
      } catch (const Error& error) {
        std::remove(temp_path.c_str());
        const std::string message = error.what();
        if (message.rfind(where, 0) == 0) throw;
        fail(where, ": ", message);
      }
    }
    if (!out) fail(output_path, ": write failed");
  }
  std::filesystem::rename(temp_path, output_path);
  return 0;
}

}  // namespace moetune::cli
