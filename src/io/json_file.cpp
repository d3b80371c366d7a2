// Depth-limited JSON parsing with errors that name the file (see json_file.h).
#include "io/json_file.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moetune {

nlohmann::json parse_json_text(std::string_view text, const std::string& source, int max_depth) {
  auto limit_depth = [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    if (depth > max_depth) fail(source, ": JSON nested deeper than ", max_depth, " levels");
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), limit_depth);
  } catch (const nlohmann::json::exception& error) {
    fail(source, ": not valid JSON: ", error.what());
  }
}

nlohmann::json read_json_file(const std::filesystem::path& path, int max_depth) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path.string(), ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) fail(path.string(), ": read failed");
  return parse_json_text(text.str(), path.string(), max_depth);
}

}  // namespace moetune
