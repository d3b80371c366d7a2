// Reading untrusted JSON files (config.json, model.safetensors.index.json, headers).
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

}  // namespace moetune
