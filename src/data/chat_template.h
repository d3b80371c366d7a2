// ChatTemplate: a sandboxed Jinja2 interpreter for Hugging Face chat templates, rendering
// exactly what Transformers' apply_chat_template renders (trim_blocks and lstrip_blocks on,
// tojson with Transformers' options, raise_exception, strftime_now, {% generation %}).
// The interpreter itself lives in data/jinja/ (lexer, parser, values, builtins, interpreter).
#pragma once

#include <cstddef>
#include <ctime>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"

namespace moetune {

// A template that fails to parse or render. what() reads "<source>:<line>: <message>";
// message() is exactly the str() of the exception Jinja/Transformers would raise (for
// raise_exception, the template's own message), type() that exception's class name.
class ChatTemplateError : public Error {
 public:
  ChatTemplateError(std::string type, std::string message, const std::string& source_name,
                    int line);
  const std::string& type() const { return type_; }
  const std::string& message() const { return message_; }
  int line() const { return line_; }

 private:
  std::string type_, message_;
  int line_;
};

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
  // Missing tools/documents are passed as None and add_generation_prompt as false, as
  // apply_chat_template does. Use render_ordered to keep the key order of JSON objects (tojson
  // and printed dicts show keys in insertion order, like Python).
  RenderedChat render(const nlohmann::json& variables) const;
  RenderedChat render_ordered(const nlohmann::ordered_json& variables) const;
  bool has_generation_tags() const;
  const std::string& source() const;

  // strftime_now's clock (local time). Default: now, or MOETUNE_FIXED_DATE ("YYYY-MM-DD" or
  // "YYYY-MM-DD HH:MM:SS") when that environment variable is set (tests).
  void set_clock(std::function<std::tm()> now);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token (strings; also
// model-specific names from a dict-valued extra_special_tokens) from a tokenizer_config.json,
// as Transformers passes them to the template (AddedToken dicts give their "content"; null
// tokens are left out).
nlohmann::json special_token_variables(const nlohmann::json& tokenizer_config);
nlohmann::ordered_json special_token_variables(const nlohmann::ordered_json& tokenizer_config);

}  // namespace moetune
