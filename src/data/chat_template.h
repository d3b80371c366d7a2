// ChatTemplate: a sandboxed Jinja2 interpreter for Hugging Face chat templates, rendering
// exactly what Transformers' apply_chat_template renders (trim_blocks and lstrip_blocks on,
// tojson with Transformers' options, raise_exception, strftime_now, {% generation %}).
#pragma once

#include <cstddef>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace moetune {

struct RenderedChat {
  std::string text;
  // Byte ranges [begin, end) of text produced inside {% generation %} ... {% endgeneration %}.
  std::vector<std::pair<size_t, size_t>> generation_spans;
};

struct ChatTemplateLimits {
  size_t max_loop_iterations = 1'000'000;
  size_t max_recursion_depth = 200;
  size_t max_output_bytes = 64u << 20;
};

class ChatTemplate {
 public:
  // Parses a template; a syntax error is an Error naming `source_name` and the line.
  ChatTemplate(const std::string& source, const std::string& source_name,
               ChatTemplateLimits limits = {});
  // The template of a tokenizer folder: chat_template.jinja beside tokenizer_config.json,
  // else tokenizer_config.json's "chat_template" (string, or the entry named "default").
  static ChatTemplate from_tokenizer_folder(const std::filesystem::path& dir);
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // variables: messages, tools, add_generation_prompt, bos_token, ... (as
  // apply_chat_template's keyword arguments). Errors name the template line.
  RenderedChat render(const nlohmann::json& variables) const;
  bool has_generation_tags() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// bos_token, eos_token, pad_token, unk_token (strings) from a tokenizer_config.json, as
// Transformers passes them to the template.
nlohmann::json special_token_variables(const nlohmann::json& tokenizer_config);

}  // namespace moetune
