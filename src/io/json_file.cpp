// Depth-limited JSON parsing with errors that name the file (see json_file.h).
#include "io/json_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
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

void write_file_atomic(const std::filesystem::path& path, std::string_view text) {
  std::filesystem::path temporary = path;
  temporary += ".tmp";
  int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(temporary.string(), ": cannot create: ", std::strerror(errno));
  const char* cursor = text.data();
  size_t left = text.size();
  bool ok = true;
  while (ok && left > 0) {
    ssize_t written = ::write(fd, cursor, left);
    if (written < 0 && errno == EINTR) continue;
    ok = written > 0;
    if (ok) {
      cursor += written;
      left -= static_cast<size_t>(written);
    }
  }
  if (ok && ::fsync(fd) != 0) ok = false;
  int saved_errno = errno;
  if (::close(fd) != 0 && ok) {
    ok = false;
    saved_errno = errno;
  }
  std::error_code error;
  if (!ok) {
    std::filesystem::remove(temporary, error);
    fail(temporary.string(), ": write failed: ", std::strerror(saved_errno));
  }
  std::filesystem::rename(temporary, path, error);
  if (error) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    fail(path.string(), ": cannot rename ", temporary.string(), " into place: ", error.message());
  }
}

void write_json_file(const std::filesystem::path& path, const nlohmann::json& json) {
  write_file_atomic(path, json.dump(2, ' ', /*ensure_ascii=*/true) + "\n");
}

}  // namespace moetune
