// Errors. fathom::Error is a problem with what the user gave us (a file, a field, an
// argument): its message is one sentence naming the thing and what was expected, and the
// CLI turns it into exit code 2. Internal invariant failures use FATHOM_ASSERT.
#pragma once
#include <stdexcept>
#include <string>
#include <sstream>

namespace fathom {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Builds a message from stream-able pieces: throw Error(cat("tensor ", name, " has ", n, " elements")).
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// A bug in fathom, not in the user's input.
[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace fathom

#define FATHOM_ASSERT(cond, ...)                                                     \
  do {                                                                               \
    if (!(cond)) ::fathom::assert_fail(#cond, __FILE__, __LINE__, ::fathom::cat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)

// Input validation: throws fathom::Error with the message when cond is false.
#define FATHOM_CHECK(cond, ...)                                                     \
  do {                                                                              \
    if (!(cond)) throw ::fathom::Error(::fathom::cat(__VA_ARGS__));                  \
  } while (0)
