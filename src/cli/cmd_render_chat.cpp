// `moetune render-chat`: renders each conversation of a JSONL file with a tokenizer folder's chat
// template, as Transformers' apply_chat_template(tokenize=False) would. Each input line is a JSON
// object (messages, optional tools, add_generation_prompt and any other template variables);
// each output line is {"text": ...} or {"error": ..., "error_type": ..., "template_line": N},
// with "generation_spans" (byte ranges) added when asked for.
#include <CLI/CLI.hpp>
#include <fstream>
#include <iostream>

#include "cli/commands.h"
#include "core/error.h"
#include "data/chat_template.h"

namespace moetune::cli {

int run_render_chat(int argc, char** argv) {
  CLI::App app{"Render chat conversations (JSONL) with a tokenizer's chat template"};
  std::string tokenizer_dir, input_path, output_path, template_path;
  bool with_spans = false;
  app.add_option("--tokenizer", tokenizer_dir,
                 "tokenizer folder (tokenizer_config.json, chat_template.jinja)")
      ->required();
  app.add_option("--input", input_path,
                 "input JSONL: one object with messages (+ tools, ...) per line")
      ->required();
  app.add_option("--output", output_path,
                 "output JSONL: {\"text\": ...} or {\"error\": ...} per line")
      ->required();
  app.add_option("--template", template_path,
                 "use this .jinja file instead of the folder's template");
  app.add_flag("--generation-spans", with_spans, "add the byte ranges of {% generation %} blocks");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  const std::filesystem::path dir(tokenizer_dir);
  nlohmann::ordered_json special = nlohmann::ordered_json::object();
  if (const auto config_path = dir / "tokenizer_config.json";
      std::filesystem::exists(config_path)) {
    std::ifstream in(config_path);
    try {
      special = special_token_variables(nlohmann::ordered_json::parse(in));
    } catch (const nlohmann::json::exception& e) {
      fail(config_path.string(), ": invalid JSON: ", e.what());
    }
  }
  auto load_template = [&]() -> ChatTemplate {
    if (template_path.empty()) return ChatTemplate::from_tokenizer_folder(dir);
    std::ifstream in(template_path, std::ios::binary);
    if (!in) fail("cannot read ", template_path);
    std::string source((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return ChatTemplate(source, template_path);
  };
  const ChatTemplate tmpl = load_template();

  std::ifstream input(input_path);
  if (!input) fail("cannot read ", input_path);
  std::ofstream output(output_path, std::ios::binary);
  if (!output) fail("cannot write ", output_path);
  std::string line;
  size_t line_number = 0, rendered = 0, errors = 0;
  while (std::getline(input, line)) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::ordered_json result;
    try {
      const auto record = nlohmann::ordered_json::parse(line);
      if (!record.is_object()) fail(input_path, ":", line_number, ": expected a JSON object");
      nlohmann::ordered_json variables = special;
      for (auto it = record.begin(); it != record.end(); ++it) variables[it.key()] = it.value();
      RenderedChat chat = tmpl.render_ordered(variables);
      result["text"] = std::move(chat.text);
      if (with_spans) {
        result["generation_spans"] = nlohmann::ordered_json::array();
        for (const auto& [b, e] : chat.generation_spans)
          result["generation_spans"].push_back({b, e});
      }
      ++rendered;
    } catch (const ChatTemplateError& e) {
      result = {{"error", e.message()}, {"error_type", e.type()}, {"template_line", e.line()}};
      ++errors;
    } catch (const nlohmann::json::exception& e) {
      result = {{"error",
                 input_path + ":" + std::to_string(line_number) + ": invalid JSON: " + e.what()}};
      ++errors;
    } catch (const Error& e) {
      result = {{"error", std::string(e.what())}};
      ++errors;
    }
    output << result.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
  }
  std::fprintf(stderr, "render-chat: %zu rendered, %zu errors -> %s\n", rendered, errors,
               output_path.c_str());
  return 0;
}

}  // namespace moetune::cli
