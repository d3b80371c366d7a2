// Dataset files and formats: splitting a .jsonl/.json file into records (with the line each
// starts on, for error messages), detecting a record's format from its keys, and converting
// a record of any supported format into one normalized Example:
//   - Chat: OpenAI-style messages (+ tools) rendered later through the chat template;
//     OpenAI messages, ShareGPT (LLaMA-Factory's role mapping) and Alpaca (when the tokenizer
//     has a chat template) become this;
//   - PromptCompletion: raw prompt text + completion text (Alpaca without a template too);
//   - Text: plain text for continued pretraining.
// Conversion errors are moetune::Error without a location; the caller prefixes file:line.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "data/data_config.h"

namespace moetune {

// Calls on_record(line, text) for every record of the file, in order: each non-blank line
// of a .jsonl file; each element of a .json array; each top-level value of another .json
// file (one object, or objects one per line). `line` is the 1-based line the record starts
// on. on_record returns false to stop early. A .json file whose structure cannot be split
// into records (unbalanced brackets, unterminated string) is an Error naming file:line.
void read_json_records(const std::filesystem::path& path,
                       const std::function<bool(int64_t line, std::string_view text)>& on_record);

enum class ExampleKind { Chat, PromptCompletion, Text };

// Records keep their keys' order (ordered_json) so that templates print tools, tool-call
// arguments and other objects as Python would (tojson does not sort keys).
using RecordJson = nlohmann::ordered_json;

struct Example {
  ExampleKind kind = ExampleKind::Chat;
  RecordJson messages;               // Chat: [{role, content, ...}, ...]
  RecordJson tools;                  // Chat: list of tools, or null
  size_t first_trained_message = 0;  // Chat: assistant messages before this are context only
  std::string prompt, completion;    // PromptCompletion
  std::string text;                  // Text
};

struct FormatOptions {
  bool has_chat_template = false;            // Alpaca becomes a chat only with a template
  std::optional<std::string> system_prompt;  // prepended to chats without a system message
};

// The format of `record` judged from its keys (through the source's column mapping).
// Throws when no format fits, listing the record's keys.
DataFormat detect_format(const RecordJson& record, const DataSource& source);

// Converts one record (format already resolved, not Auto). Throws Error on a missing key,
// a wrong type or an unknown role.
Example convert_record(const RecordJson& record, DataFormat format, const DataSource& source,
                       const FormatOptions& options);

}  // namespace moetune
