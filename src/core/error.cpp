#include "core/error.h"

namespace fathom {

void assert_fail(const char* expr, const char* file, int line, const std::string& msg) {
  throw std::logic_error(cat("internal error at ", file, ":", line, ": ", expr, msg.empty() ? "" : " — ", msg));
}

}  // namespace fathom
