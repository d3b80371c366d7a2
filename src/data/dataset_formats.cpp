// Record splitting and format conversion (see dataset_formats.h). The .json splitter is a
// small bracket/string scanner that finds where each top-level value ends, so every record
// is parsed on its own: one bad record does not hide the others, and each knows its line.
// ShareGPT roles follow LLaMA-Factory: human/user -> user, gpt/assistant -> assistant,
// system -> system, function_call -> an assistant tool call, observation/tool -> tool.
#include "data/dataset_formats.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moetune {

using json = RecordJson;

namespace {

std::string read_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) fail(path.string(), ": cannot open the data file");
  std::ostringstream content;
  content << file.rdbuf();
  return content.str();
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Tracks the 1-based line of a byte position, moving forward only.
struct LineCounter {
  std::string_view text;
  size_t position = 0;
  int64_t line = 1;
  int64_t line_at(size_t target) {
    for (; position < target && position < text.size(); ++position)
      if (text[position] == '\n') ++line;
    return line;
  }
};

// The end (one past) of the JSON value starting at `begin`, or npos when it never ends.
// Only structure is checked here (brackets, strings); the JSON parser checks the rest.
size_t scan_value_end(std::string_view text, size_t begin) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = begin; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"') {
        in_string = false;
        if (depth == 0) return i + 1;
      }
      continue;
    }
    if (c == '"')
      in_string = true;
    else if (c == '{' || c == '[')
      ++depth;
    else if (c == '}' || c == ']') {
      if (--depth < 0) return i;  // a scalar ended by the enclosing bracket
      if (depth == 0) return i + 1;
    } else if (depth == 0 && (c == ',' || is_space(c))) {
      return i;  // end of a bare scalar
    }
  }
  return depth == 0 && !in_string ? text.size() : std::string_view::npos;
}

void read_lines(const std::filesystem::path& path, std::string_view text,
                const std::function<bool(int64_t, std::string_view)>& on_record) {
  int64_t line = 0;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string_view::npos) end = text.size();
    ++line;
    std::string_view record = text.substr(begin, end - begin);
    while (!record.empty() && is_space(record.back())) record.remove_suffix(1);
    while (!record.empty() && is_space(record.front())) record.remove_prefix(1);
    if (!record.empty() && !on_record(line, record)) return;
    begin = end + 1;
  }
}

void read_json_values(const std::filesystem::path& path, std::string_view text,
                      const std::function<bool(int64_t, std::string_view)>& on_record) {
  LineCounter lines{text};
  size_t position = 0;
  auto skip_space = [&] {
    while (position < text.size() && is_space(text[position])) ++position;
  };
  auto broken = [&](size_t at, const char* what) {
    fail(path.string(), ":", lines.line_at(at), ": ", what);
  };
  skip_space();
  const bool is_array = position < text.size() && text[position] == '[';
  if (is_array) ++position;
  while (true) {
    skip_space();
    if (position >= text.size()) {
      if (is_array) broken(position, "the JSON array is not closed with ]");
      return;
    }
    if (is_array && text[position] == ']') {
      ++position;
      skip_space();
      if (position < text.size()) broken(position, "unexpected text after the JSON array");
      return;
    }
    const size_t end = scan_value_end(text, position);
    if (end == std::string_view::npos || end == position)
      broken(position, "malformed JSON (unbalanced brackets or an unterminated string)");
    if (!on_record(lines.line_at(position), text.substr(position, end - position))) return;
    position = end;
    skip_space();
    if (is_array) {
      if (position < text.size() && text[position] == ',')
        ++position;
      else if (position < text.size() && text[position] != ']')
        broken(position, "expected , or ] between the array's records");
    } else if (position < text.size() && text[position] == ',') {
      ++position;  // tolerate "{...},\n{...}"
    }
  }
}

// ---- conversion helpers ---------------------------------------------------------------

std::string keys_of(const json& record) {
  std::string keys;
  for (const auto& item : record.items()) keys += (keys.empty() ? "" : ", ") + item.key();
  return "[" + keys + "]";
}

const json* find_field(const json& record, const std::string& key) {
  const auto found = record.find(key);
  if (found == record.end() || found->is_null()) return nullptr;
  return &*found;
}

const json& require_field(const json& record, const std::string& key) {
  const json* value = find_field(record, key);
  if (!value) fail("missing key \"", key, "\" (the record has keys ", keys_of(record), ")");
  return *value;
}

std::string require_string(const json& value, const std::string& what) {
  if (!value.is_string()) fail(what, ": expected a string, got ", value.type_name());
  return value.get<std::string>();
}

std::string optional_string(const json& record, const std::string& key) {
  const json* value = find_field(record, key);
  return value ? require_string(*value, "\"" + key + "\"") : std::string();
}

// {name, arguments} (object or JSON string) -> an OpenAI tool call.
json make_tool_call(const json& call, const std::string& what) {
  if (!call.is_object() || !call.contains("name") || !call["name"].is_string())
    fail(what, ": a tool call needs {\"name\": ..., \"arguments\": ...}");
  json arguments = call.contains("arguments") ? call["arguments"] : json::object();
  if (arguments.is_string()) {
    // Keep the template's view uniform: arguments as an object when the string is JSON.
    json parsed = json::parse(arguments.get<std::string>(), nullptr, false);
    if (!parsed.is_discarded() && parsed.is_object()) arguments = std::move(parsed);
  }
  return json{{"type", "function"},
              {"function", {{"name", call["name"]}, {"arguments", std::move(arguments)}}}};
}

json tool_calls_from_text(const std::string& text, const std::string& what) {
  const json parsed = json::parse(text, nullptr, false);
  if (parsed.is_discarded()) fail(what, ": the tool call is not valid JSON");
  json calls = json::array();
  if (parsed.is_array())
    for (const json& call : parsed) calls.push_back(make_tool_call(call, what));
  else
    calls.push_back(make_tool_call(parsed, what));
  return calls;
}

// tools: a list (or a JSON string of one); bare function schemas get the OpenAI wrapper.
json normalize_tools(const json& tools) {
  json list = tools;
  if (tools.is_string()) {
    const std::string text = tools.get<std::string>();
    if (text.empty()) return nullptr;
    list = json::parse(text, nullptr, false);
    if (list.is_discarded()) fail("\"tools\": the string is not valid JSON");
  }
  if (list.is_object()) list = json::array({list});
  if (!list.is_array()) fail("\"tools\": expected a list of tools, got ", list.type_name());
  if (list.empty()) return nullptr;
  for (json& tool : list) {
    if (!tool.is_object()) fail("\"tools\": each tool must be an object");
    if (!tool.contains("type") && tool.contains("name"))
      tool = json{{"type", "function"}, {"function", tool}};
  }
  return list;
}

// LLaMA-Factory's v1 content parts [{type: text|reasoning|tool_call, value}] -> OpenAI fields.
bool is_value_parts(const json& content) {
  if (!content.is_array() || content.empty()) return false;
  for (const json& part : content)
    if (!part.is_object() || !part.contains("type") || !part.contains("value")) return false;
  return true;
}

void convert_value_parts(json& message, const std::string& what) {
  std::string text, reasoning;
  json tool_calls = json::array();
  for (const json& part : message["content"]) {
    const std::string type = require_string(part["type"], what + " content part type");
    const std::string value = require_string(part["value"], what + " content part value");
    if (type == "text")
      text += value;
    else if (type == "reasoning")
      reasoning += value;
    else if (type == "tool_call") {
      for (json& call : tool_calls_from_text(value, what)) tool_calls.push_back(std::move(call));
    } else {
      fail(what, ": unsupported content part type '", type, "'");
    }
  }
  message["content"] = text;
  if (!reasoning.empty()) message["reasoning_content"] = reasoning;
  if (!tool_calls.empty()) message["tool_calls"] = tool_calls;
}

bool is_known_role(const std::string& role) {
  return role == "system" || role == "developer" || role == "user" || role == "assistant" ||
         role == "tool";
}

void add_system_prompt(json& messages, const std::optional<std::string>& system_prompt) {
  if (!system_prompt) return;
  if (!messages.empty() && (messages[0]["role"] == "system" || messages[0]["role"] == "developer"))
    return;
  messages.insert(messages.begin(), json{{"role", "system"}, {"content", *system_prompt}});
}

json convert_openai_messages(const json& list, const std::string& key) {
  if (!list.is_array()) fail("\"", key, "\": expected a list of messages, got ", list.type_name());
  if (list.empty()) fail("\"", key, "\": the conversation is empty");
  json messages = json::array();
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string what = key + "[" + std::to_string(i) + "]";
    json message = list[i];
    if (!message.is_object()) fail(what, ": expected a message object, got ", message.type_name());
    if (!message.contains("role")) fail(what, ": missing \"role\"");
    const std::string role = require_string(message["role"], what + ".role");
    if (!is_known_role(role))
      fail(what, ": unknown role '", role, "' (expected system, user, assistant or tool)");
    const bool has_tool_calls = message.contains("tool_calls") && !message["tool_calls"].is_null();
    if (!message.contains("content") || message["content"].is_null()) {
      if (!has_tool_calls) fail(what, ": missing \"content\"");
      message["content"] = "";
    } else if (is_value_parts(message["content"])) {
      convert_value_parts(message, what);
    } else if (!message["content"].is_string() && !message["content"].is_array()) {
      fail(what, ".content: expected a string or a list of parts, got ",
           message["content"].type_name());
    }
    if (has_tool_calls && !message["tool_calls"].is_array())
      fail(what, ".tool_calls: expected a list");
    messages.push_back(std::move(message));
  }
  return messages;
}

json convert_sharegpt(const json& record, const DataSource& source) {
  std::string key = source.column("messages");
  if (!source.columns.count("messages"))
    key = record.contains("conversations") ? "conversations" : "messages";
  const json& list = require_field(record, key);
  if (!list.is_array()) fail("\"", key, "\": expected a list of turns, got ", list.type_name());
  if (list.empty()) fail("\"", key, "\": the conversation is empty");
  json messages = json::array();
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string what = key + "[" + std::to_string(i) + "]";
    const json& turn = list[i];
    if (!turn.is_object()) fail(what, ": expected a turn object, got ", turn.type_name());
    const char* role_key = turn.contains("from") ? "from" : "role";
    const char* value_key = turn.contains("value") ? "value" : "content";
    if (!turn.contains(role_key)) fail(what, ": missing \"from\"");
    if (!turn.contains(value_key)) fail(what, ": missing \"value\"");
    const std::string from = require_string(turn[role_key], what + "." + role_key);
    const std::string value = require_string(turn[value_key], what + "." + value_key);
    if (from == "human" || from == "user") {
      messages.push_back({{"role", "user"}, {"content", value}});
    } else if (from == "gpt" || from == "assistant" || from == "model" || from == "bot") {
      messages.push_back({{"role", "assistant"}, {"content", value}});
    } else if (from == "system") {
      messages.push_back({{"role", "system"}, {"content", value}});
    } else if (from == "function_call") {
      messages.push_back({{"role", "assistant"},
                          {"content", ""},
                          {"tool_calls", tool_calls_from_text(value, what)}});
    } else if (from == "observation" || from == "tool" || from == "function") {
      messages.push_back({{"role", "tool"}, {"content", value}});
    } else {
      fail(what, ": unknown role '", from,
           "' (expected human, gpt, system, function_call or observation)");
    }
  }
  if (const json* system = find_field(record, source.column("system"))) {
    const std::string text = require_string(*system, "\"" + source.column("system") + "\"");
    if (!text.empty() && messages[0]["role"] != "system")
      messages.insert(messages.begin(), json{{"role", "system"}, {"content", text}});
  }
  return messages;
}

Example convert_alpaca(const json& record, const DataSource& source, const FormatOptions& options) {
  const std::string instruction =
      require_string(require_field(record, source.column("instruction")),
                     "\"" + source.column("instruction") + "\"");
  const std::string input = optional_string(record, source.column("input"));
  const std::string output = require_string(require_field(record, source.column("output")),
                                            "\"" + source.column("output") + "\"");
  std::string system = optional_string(record, source.column("system"));
  if (system.empty() && options.system_prompt) system = *options.system_prompt;
  std::vector<std::pair<std::string, std::string>> history;
  if (const json* turns = find_field(record, source.column("history"))) {
    if (!turns->is_array()) fail("\"history\": expected a list of [prompt, response] pairs");
    for (const json& pair : *turns) {
      if (!pair.is_array() || pair.size() != 2 || !pair[0].is_string() || !pair[1].is_string())
        fail("\"history\": expected a list of [prompt, response] string pairs");
      history.emplace_back(pair[0].get<std::string>(), pair[1].get<std::string>());
    }
  }
  Example example;
  if (options.has_chat_template) {
    // As LLaMA-Factory: the user turn is the instruction and the input joined by a newline.
    example.kind = ExampleKind::Chat;
    example.messages = json::array();
    if (!system.empty()) example.messages.push_back({{"role", "system"}, {"content", system}});
    for (const auto& [prompt, response] : history) {
      example.messages.push_back({{"role", "user"}, {"content", prompt}});
      example.messages.push_back({{"role", "assistant"}, {"content", response}});
    }
    const std::string query = input.empty() ? instruction : instruction + "\n" + input;
    example.messages.push_back({{"role", "user"}, {"content", query}});
    example.messages.push_back({{"role", "assistant"}, {"content", output}});
    example.tools = nullptr;
    return example;
  }
  // No template: "instruction\n\ninput\n\n" then the output.
  example.kind = ExampleKind::PromptCompletion;
  if (!system.empty()) example.prompt += system + "\n\n";
  for (const auto& [prompt, response] : history)
    example.prompt += prompt + "\n\n" + response + "\n\n";
  example.prompt += instruction + "\n\n";
  if (!input.empty()) example.prompt += input + "\n\n";
  example.completion = output;
  return example;
}

Example convert_prompt_completion(const json& record, const DataSource& source,
                                  const FormatOptions& options) {
  const std::string prompt_key = source.column("prompt");
  const std::string completion_key = source.column("completion");
  const json& prompt = require_field(record, prompt_key);
  const json& completion = require_field(record, completion_key);
  Example example;
  if (prompt.is_array()) {
    // Conversational prompt/completion (TRL): the loss is on the completion messages only.
    example.kind = ExampleKind::Chat;
    example.messages = convert_openai_messages(prompt, prompt_key);
    add_system_prompt(example.messages, options.system_prompt);
    example.first_trained_message = example.messages.size();
    if (completion.is_string()) {
      example.messages.push_back({{"role", "assistant"}, {"content", completion}});
    } else {
      for (json& message : convert_openai_messages(completion, completion_key))
        example.messages.push_back(std::move(message));
    }
    if (const json* tools = find_field(record, source.column("tools")))
      example.tools = normalize_tools(*tools);
    return example;
  }
  example.kind = ExampleKind::PromptCompletion;
  example.prompt = require_string(prompt, "\"" + prompt_key + "\"");
  example.completion = require_string(completion, "\"" + completion_key + "\"");
  return example;
}

}  // namespace

void read_json_records(const std::filesystem::path& path,
                       const std::function<bool(int64_t line, std::string_view text)>& on_record) {
  const std::string content = read_file(path);
  std::string_view text = content;
  if (text.starts_with("\xEF\xBB\xBF")) text.remove_prefix(3);  // UTF-8 byte order mark
  if (path.extension() == ".json")
    read_json_values(path, text, on_record);
  else
    read_lines(path, text, on_record);
}

DataFormat detect_format(const json& record, const DataSource& source) {
  if (!record.is_object()) fail("expected a JSON object, got ", record.type_name());
  auto has = [&](const std::string& name) { return find_field(record, source.column(name)); };
  if (const json* list = has("messages"); list || (list = find_field(record, "conversations"))) {
    if (list->is_array() && !list->empty() && (*list)[0].is_object() && (*list)[0].contains("from"))
      return DataFormat::ShareGPT;
    if (!source.columns.count("messages") && !record.contains("messages"))
      return DataFormat::ShareGPT;  // "conversations" holding role/content turns
    return DataFormat::Messages;
  }
  if (has("instruction") && has("output")) return DataFormat::Alpaca;
  if (has("prompt") && has("completion")) return DataFormat::PromptCompletion;
  if (has("text")) return DataFormat::Text;
  fail("cannot tell the data format from the record's keys ", keys_of(record), "; set ",
       source.context, ".format (messages, sharegpt, alpaca, prompt_completion, text) and ",
       source.context, ".columns");
}

Example convert_record(const json& record, DataFormat format, const DataSource& source,
                       const FormatOptions& options) {
  if (!record.is_object()) fail("expected a JSON object, got ", record.type_name());
  Example example;
  switch (format) {
    case DataFormat::Messages:
    case DataFormat::ShareGPT: {
      example.kind = ExampleKind::Chat;
      if (format == DataFormat::Messages) {
        const std::string key = source.column("messages");
        example.messages = convert_openai_messages(require_field(record, key), key);
      } else {
        example.messages = convert_sharegpt(record, source);
      }
      add_system_prompt(example.messages, options.system_prompt);
      if (const json* tools = find_field(record, source.column("tools")))
        example.tools = normalize_tools(*tools);
      return example;
    }
    case DataFormat::Alpaca:
      return convert_alpaca(record, source, options);
    case DataFormat::PromptCompletion:
      return convert_prompt_completion(record, source, options);
    case DataFormat::Text:
      example.kind = ExampleKind::Text;
      example.text = require_string(require_field(record, source.column("text")),
                                    "\"" + source.column("text") + "\"");
      return example;
    case DataFormat::Auto:
      break;
  }
  fail("internal: convert_record needs a resolved format");
}

}  // namespace moetune
