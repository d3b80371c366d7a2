// Fixtures for the dataset/packing/loader tests: a tiny byte-level BPE tokenizer folder
// written by the test (256 byte tokens, a few merges, ChatML special tokens) with ChatML
// chat templates (with and without {% generation %} tags), and helpers to write data files.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "test_util.h"

namespace moetune::testing {

// ChatML with {% generation %} around each assistant turn's content + <|im_end|>.
inline const char* kChatmlGenerationTemplate =
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}\n"
    "{%- if message['role'] == 'assistant' %}\n"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}\n"
    "{{- '\\n' }}\n"
    "{%- else %}\n"
    "{{- message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n";

// The same rendering without generation tags (masks come from prefix renders).
inline const char* kChatmlTemplate =
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n";

// ChatML that, like Qwen3, renders an empty think block only in the last assistant turn.
inline const char* kChatmlThinkTemplate =
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'assistant' and loop.last %}\n"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + "
    "'<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n";

// GPT-2's byte -> printable character map, as UTF-8.
inline std::string byte_level_char(int byte) {
  int code = byte;
  const bool printable = (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
  if (!printable) {
    int n = 0;
    for (int b = 0; b < byte; ++b)
      if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) ++n;
    code = 256 + n;
  }
  std::string out;
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else {
    out += static_cast<char>(0xC0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3F));
  }
  return out;
}

// Writes tokenizer.json + tokenizer_config.json of a tiny byte-level BPE into `dir`.
// chat_template may be empty (no template).
inline void write_tiny_tokenizer(const std::filesystem::path& dir,
                                 const std::string& chat_template) {
  using nlohmann::json;
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level_char(b)] = b;
  const char* merges[][2] = {{"h", "e"}, {"l", "l"}, {"\xC4\xA0", "t"}, {"\xC4\xA0t", "he"},
                             {"o", "r"}, {"i", "n"}, {"\xC4\xA0", "a"}, {"e", "r"}};
  json merge_list = json::array();
  int next_id = 256;
  for (const auto& merge : merges) {
    merge_list.push_back(std::string(merge[0]) + " " + merge[1]);
    vocab[std::string(merge[0]) + merge[1]] = next_id++;
  }
  json added = json::array();
  for (const char* token : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    added.push_back({{"id", next_id++},
                     {"content", token},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  const json byte_level = {{"type", "ByteLevel"},
                           {"add_prefix_space", false},
                           {"trim_offsets", false},
                           {"use_regex", true}};
  json tokenizer = {{"version", "1.0"},
                    {"truncation", nullptr},
                    {"padding", nullptr},
                    {"added_tokens", added},
                    {"normalizer", nullptr},
                    {"pre_tokenizer", byte_level},
                    {"post_processor", byte_level},
                    {"decoder", byte_level},
                    {"model",
                     {{"type", "BPE"},
                      {"dropout", nullptr},
                      {"unk_token", nullptr},
                      {"continuing_subword_prefix", nullptr},
                      {"end_of_word_suffix", nullptr},
                      {"fuse_unk", false},
                      {"byte_fallback", false},
                      {"ignore_merges", false},
                      {"vocab", vocab},
                      {"merges", merge_list}}}};
  json config = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                 {"eos_token", "<|im_end|>"},
                 {"pad_token", "<|endoftext|>"},
                 {"bos_token", nullptr}};
  if (!chat_template.empty()) config["chat_template"] = chat_template;
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << tokenizer.dump(1);
  std::ofstream(dir / "tokenizer_config.json") << config.dump(1);
}

inline void write_text_file(const std::filesystem::path& path, const std::string& text) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

}  // namespace moetune::testing
