// libFuzzer target for the HTTP server's request-head parser (src/serve/http.h,
// parse_request_head): the input is a request line and header fields as a client could send
// them. Parsing must never crash, and what it accepts must be what the server relies on: a
// token method, a printable target starting with '/' split into path and query, lower-case
// token header names without control characters in their values, a body length within the limit.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "serve/http.h"

namespace {

bool is_tchar(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         std::string_view("!#$%&'*+-.^_`|~").find(char(c)) != std::string_view::npos;
}

void require(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view block(reinterpret_cast<const char*>(data), size);
  const size_t max_body = 1 << 16;
  fathom::serve::HttpRequest req;
  bool keep_alive = false, expect_continue = false;
  size_t length = 0;
  std::string message;
  const int status = fathom::serve::parse_request_head(block, max_body, req, keep_alive, length, expect_continue, message);
  if (status != 0) {
    require(status >= 400 && status <= 599 && !message.empty());
    return 0;
  }
  require(!req.method.empty());
  for (unsigned char c : req.method) require(is_tchar(c));
  require(!req.target.empty() && req.target[0] == '/');
  for (unsigned char c : req.target) require(c > 0x20 && c < 0x7f && c != '#');
  require(req.version == "HTTP/1.1" || req.version == "HTTP/1.0");
  require(req.path + (req.target.find('?') == std::string::npos ? "" : "?" + req.query) == req.target);
  for (const auto& [name, value] : req.headers) {
    require(!name.empty());
    for (unsigned char c : name) require(is_tchar(c) && !(c >= 'A' && c <= 'Z'));
    for (unsigned char c : value) require(c == '\t' || (c >= 0x20 && c != 0x7f));
    require(value.empty() || (value.front() != ' ' && value.front() != '\t' && value.back() != ' ' && value.back() != '\t'));
  }
  require(length <= max_body);
  require(req.body.empty());
  return 0;
}
