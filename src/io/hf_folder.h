// The non-weight files of an HF model folder: config.json (written back as read, with the
// dtype updated when the weights are saved in another one) and the tokenizer / generation
// files, copied from the source folder so the saved folder loads in Transformers, vLLM and
// SGLang as the original did.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace moetune {

// Files copied from the source folder when present.
inline constexpr const char* kTokenizerFiles[] = {"tokenizer.json",
                                                  "tokenizer_config.json",
                                                  "special_tokens_map.json",
                                                  "added_tokens.json",
                                                  "chat_template.jinja",
                                                  "chat_template.json",
                                                  "vocab.json",
                                                  "merges.txt",
                                                  "vocab.txt",
                                                  "tokenizer.model",
                                                  "generation_config.json"};
// Folder of extra named chat templates (Transformers v5 saves them there).
inline constexpr const char* kChatTemplatesFolder = "additional_chat_templates";

// Writes config.json into `folder` (atomic). With `dtype` ("bfloat16", "float32", ...), sets
// "dtype" and, when the file used the old spelling, "torch_dtype" too.
void write_config_json(const std::filesystem::path& folder, const nlohmann::json& raw_config,
                       const std::optional<std::string>& dtype = std::nullopt);

// Copies the tokenizer and generation files present in `source` into `destination`
// (created if needed); returns the names copied. Copying a folder onto itself is a no-op.
std::vector<std::string> copy_tokenizer_files(const std::filesystem::path& source,
                                              const std::filesystem::path& destination);

}  // namespace moetune
