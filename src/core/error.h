// Errors with context. Every failure a user can cause (bad file, bad key, bad shape)
// is reported by throwing moetune::Error with a message that names the file, key or
// tensor; the CLI prints it and exits with a non-zero code. MOETUNE_CHECK is for
// internal invariants and carries file:line.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moetune {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// A failure caused by another process of a distributed job (a rank that died, hung or
// disagreed). Processes exit with kExitPeerFailure for it, so that a launcher can tell the
// rank that failed first from the ranks that stopped because of it.
class PeerFailure : public Error {
 public:
  using Error::Error;
};
constexpr int kExitPeerFailure = 75;

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

// Throws moetune::Error built from the arguments (streamed one after another).
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(detail::concat(args...));
}

}  // namespace moetune

#define MOETUNE_CHECK(cond, ...)                                                             \
  do {                                                                                       \
    if (!(cond))                                                                             \
      ::moetune::fail(__FILE__, ":", __LINE__, ": check failed: " #cond " ", ##__VA_ARGS__); \
  } while (0)
