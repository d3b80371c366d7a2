// Reading untrusted JSON files (config.json, model.safetensors.index.json) and writing
// files atomically (path.tmp + fsync + rename).
// Trick: nesting is limited while parsing, because nlohmann's copy and dump recurse and a
// hostile file of 100k nested brackets would otherwise overflow the stack later on.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace moetune {

constexpr int kMaxJsonDepth = 64;

// Parses `text`; errors (syntax, nesting deeper than max_depth) name `source`.
nlohmann::json parse_json_text(std::string_view text, const std::string& source,
                               int max_depth = kMaxJsonDepth);
// Reads and parses a whole file; errors name the file.
nlohmann::json read_json_file(const std::filesystem::path& path, int max_depth = kMaxJsonDepth);

// Writes `text` to path.tmp, fsyncs it and renames it over `path` (atomic replace).
void write_file_atomic(const std::filesystem::path& path, std::string_view text);
// Writes JSON as Transformers does (json.dumps(indent=2, sort_keys=True) + newline; keys of
// nlohmann::json are sorted, non-ASCII is escaped), atomically.
void write_json_file(const std::filesystem::path& path, const nlohmann::json& json);

}  // namespace moetune
