#include "serve/http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace fathom::serve {

struct HttpServer::Connection {
  int fd = -1;        // -1 once closed; guarded by HttpServer::mutex_ so stop() never shuts down a reused fd
  bool done = false;  // the thread has finished (only a join is left); guarded by HttpServer::mutex_
  std::thread thread;
};

namespace {

using Clock = std::chrono::steady_clock;

std::string errno_text(int e) { return std::system_category().message(e); }

// Milliseconds left until deadline, rounded up (so poll never returns just before it), for poll().
int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return int(std::clamp<long long>(left, 0, INT_MAX));
}

bool is_tchar(unsigned char c) {
  // RFC 9110 token characters: the names of methods and header fields.
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
    case '-': case '.': case '^': case '_': case '`': case '|': case '~':
      return true;
    default:
      return false;
  }
}

bool is_token(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return is_tchar(static_cast<unsigned char>(c)); });
}

// A field value may hold visible characters, spaces, tabs and obs-text, never CR, LF, NUL or
// another control character: a CR or LF smuggled into a value could start a new header.
bool is_field_value(std::string_view s) {
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (c == '\t') continue;
    if (c < 0x20 || c == 0x7f) return false;
  }
  return true;
}

std::string_view trim_ows(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? char(c - 'A' + 'a') : c; }

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = ascii_lower(c);
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (ascii_lower(a[i]) != ascii_lower(b[i])) return false;
  return true;
}

// Whether a comma-separated header value (Connection, Expect) lists token, case-insensitively.
bool has_token(std::string_view list, std::string_view token) {
  while (!list.empty()) {
    size_t comma = list.find(',');
    if (iequals(trim_ows(list.substr(0, comma)), token)) return true;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return false;
}

enum class Recv { kData, kClosed, kTimeout };

// Waits (poll) until fd has bytes or deadline passes, and appends what one recv gives.
Recv recv_some(int fd, std::string& buf, Clock::time_point deadline) {
  char chunk[16384];
  for (;;) {
    int ms = remaining_ms(deadline);
    if (ms <= 0) return Recv::kTimeout;
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      return Recv::kClosed;
    }
    if (r == 0) continue;  // the loop re-checks the deadline
    ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n > 0) {
      buf.append(chunk, size_t(n));
      return Recv::kData;
    }
    if (n == 0) return Recv::kClosed;
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
    return Recv::kClosed;  // ECONNRESET and the like: the peer is gone
  }
}

// Closing a socket that still has unread bytes from the peer makes the kernel send a reset,
// which can destroy the response we just sent before the client reads it (the classic case: a
// 413 sent while the client is still sending its body). So: end our direction (the client sees
// the response, then EOF), discard what the peer still sends for a short while, then close.
void lingering_drain(int fd, int max_ms) {
  ::shutdown(fd, SHUT_WR);
  auto deadline = Clock::now() + std::chrono::milliseconds(max_ms);
  char scratch[16384];
  for (;;) {
    int ms = remaining_ms(deadline);
    if (ms <= 0) return;
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return;
    ssize_t n = ::recv(fd, scratch, sizeof scratch, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
  }
}

// Parses a decimal Content-Length element; values too large for size_t saturate to SIZE_MAX
// (they are numeric, just over any limit: 413, not 400). False when it is not all digits.
bool parse_length(std::string_view s, size_t& out) {
  if (s.empty()) return false;
  size_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    size_t d = size_t(c - '0');
    v = (v > (SIZE_MAX - d) / 10) ? SIZE_MAX : v * 10 + d;
  }
  out = v;
  return true;
}

// The lingering drain after an error response never holds a connection thread for long.
constexpr int kMaxLingerMs = 2000;

}  // namespace

// ---------------------------------------------------------------------------------------------
// HttpRequest, reason phrases, error bodies

std::string HttpRequest::header(std::string_view lower_name) const {
  for (const auto& [name, value] : headers)
    if (name == lower_name) return value;
  return {};
}

const char* http_reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "";
  }
}

std::string default_http_error_body(int status, const std::string& message) {
  // error_handler_t::replace: a message with invalid UTF-8 still makes valid JSON
  const nlohmann::json body = {
      {"error", {{"message", message}, {"type", status >= 500 ? "server_error" : "invalid_request_error"}, {"code", status}}}};
  return body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// ---------------------------------------------------------------------------------------------
// HttpResponseWriter

HttpResponseWriter::HttpResponseWriter(int fd, bool keep_alive, bool head_request, bool http11)
    : fd_(fd), keep_alive_(keep_alive), head_request_(head_request), http11_(http11) {}

bool HttpResponseWriter::send_all(std::string_view data) {
  if (failed_) return false;
  while (!data.empty()) {
    // MSG_NOSIGNAL: a peer that closed gives EPIPE here instead of killing the process.
    ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(size_t(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    // EPIPE/ECONNRESET: the client is gone; EAGAIN: the send timeout (SO_SNDTIMEO) passed with
    // the client not reading. Either way this response cannot be finished.
    failed_ = true;
    keep_alive_ = false;
    return false;
  }
  return true;
}

std::string HttpResponseWriter::head(int status, std::string_view content_type, const HttpHeaders& extra_headers,
                                     std::string_view framing_headers) {
  FATHOM_CHECK(status >= 200 && status <= 999, "HTTP response status ", status, " is not a final status (200-999)");
  FATHOM_CHECK(is_field_value(content_type), "HTTP response Content-Type holds a control character");
  // Validate everything before anything is sent, so a bad header becomes a clean 500.
  for (const auto& [name, value] : extra_headers) {
    FATHOM_CHECK(is_token(name), "HTTP response header name '", name, "' is not a token");
    FATHOM_CHECK(is_field_value(value), "HTTP response header '", name, "' holds a control character (CR, LF, ...)");
    FATHOM_CHECK(!iequals(name, "content-length") && !iequals(name, "transfer-encoding"),
                 "HTTP response header '", name, "' is set by the server (it frames the response)");
    if (iequals(name, "connection") && has_token(value, "close")) keep_alive_ = false;
  }
  std::string out = "HTTP/1.1 " + std::to_string(status) + " " + http_reason_phrase(status) + "\r\n";
  if (!content_type.empty()) out.append("Content-Type: ").append(content_type).append("\r\n");
  out += framing_headers;
  out += keep_alive_ ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  for (const auto& [name, value] : extra_headers) {
    if (iequals(name, "connection")) continue;  // ours above says the same, and says it once
    out.append(name).append(": ").append(value).append("\r\n");
  }
  out += "\r\n";
  return out;
}

void HttpResponseWriter::send(int status, std::string_view content_type, std::string_view body,
                              const HttpHeaders& extra_headers) {
  FATHOM_ASSERT(!responded_, "send() after a response was already started");
  // 204 and 304 carry no body and, by RFC 9110, no Content-Length.
  bool bodiless = status == 204 || status == 304;
  std::string framing = bodiless ? "" : "Content-Length: " + std::to_string(body.size()) + "\r\n";
  std::string out = head(status, content_type, extra_headers, framing);
  responded_ = true;
  if (!bodiless && !head_request_) out += body;  // one send: headers and a small body in one packet
  send_all(out);
}

bool HttpResponseWriter::begin_stream(int status, std::string_view content_type, const HttpHeaders& extra_headers) {
  FATHOM_ASSERT(!responded_, "begin_stream() after a response was already started");
  // An HTTP/1.0 client knows no chunked framing: the stream ends when the connection closes.
  raw_stream_ = !http11_;
  if (raw_stream_) keep_alive_ = false;
  std::string framing = raw_stream_ ? "Cache-Control: no-cache\r\n"
                                    : "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n";
  std::string out = head(status, content_type, extra_headers, framing);
  responded_ = true;
  streaming_ = true;
  return send_all(out);
}

bool HttpResponseWriter::write(std::string_view data) {
  FATHOM_ASSERT(streaming_ && !ended_, "write() outside begin_stream() ... end()");
  if (failed_) return false;
  if (data.empty() || head_request_) return true;
  if (raw_stream_) return send_all(data);
  char size_line[32];
  int n = std::snprintf(size_line, sizeof size_line, "%zx\r\n", data.size());
  std::string chunk;
  chunk.reserve(size_t(n) + data.size() + 2);
  chunk.append(size_line, size_t(n)).append(data).append("\r\n");
  return send_all(chunk);
}

void HttpResponseWriter::end() {
  FATHOM_ASSERT(streaming_, "end() without begin_stream()");
  if (ended_) return;
  ended_ = true;
  if (!failed_ && !raw_stream_ && !head_request_) send_all("0\r\n\r\n");
}

bool HttpResponseWriter::client_gone() const {
  if (failed_) return true;
  pollfd p{fd_, POLLIN | POLLRDHUP, 0};
  int r = ::poll(&p, 1, 0);
  if (r <= 0) return false;
  // POLLRDHUP: the peer sent FIN (even when a pipelined request sits unread before it);
  // POLLHUP/POLLERR: reset, or stop() shut the socket down.
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char c;
    ssize_t n = ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return true;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// HttpServer

HttpServer::HttpServer(HttpServerOptions options, HttpHandler handler)
    : options_(std::move(options)), handler_(std::move(handler)) {
  FATHOM_CHECK(handler_, "HttpServer needs a handler");
  FATHOM_CHECK(options_.port >= 0 && options_.port <= 65535, "HTTP port ", options_.port, " is not in 0-65535");
  FATHOM_CHECK(options_.max_connections >= 1, "HTTP max_connections must be at least 1, not ",
               options_.max_connections);
  FATHOM_CHECK(options_.idle_timeout_ms >= 1, "HTTP idle_timeout_ms must be at least 1, not ",
               options_.idle_timeout_ms);
  FATHOM_CHECK(options_.max_header_bytes >= 64, "HTTP max_header_bytes must be at least 64, not ",
               options_.max_header_bytes);
}

HttpServer::~HttpServer() { stop(); }

void HttpServer::start() {
  std::lock_guard<std::mutex> lock(stop_mutex_);
  FATHOM_ASSERT(!started_, "HttpServer::start() called twice");
  const std::string& host = options_.host;
  std::string where = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
                      std::to_string(options_.port);

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  std::string port_text = std::to_string(options_.port);
  int gai = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port_text.c_str(), &hints, &found);
  FATHOM_CHECK(gai == 0, "cannot listen on ", where, ": the host does not resolve (", ::gai_strerror(gai), ")");

  // Try each address the host resolves to until one binds, IPv4 first: "localhost" often resolves
  // to ::1 first, and a server on ::1 alone would refuse clients that dial 127.0.0.1.
  std::vector<addrinfo*> candidates;
  for (addrinfo* a = found; a; a = a->ai_next) candidates.push_back(a);
  std::stable_partition(candidates.begin(), candidates.end(), [](addrinfo* a) { return a->ai_family == AF_INET; });
  int fd = -1, err = EADDRNOTAVAIL;
  for (addrinfo* a : candidates) {
    if (fd >= 0) break;
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    // SO_REUSEADDR: a restarted server can bind while old connections sit in TIME_WAIT. (It does
    // not let two servers listen on one port: that is still EADDRINUSE on Linux.)
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, SOMAXCONN) != 0) {
      err = errno;
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  FATHOM_CHECK(fd >= 0, "cannot listen on ", where, ": ", errno_text(err),
               err == EADDRINUSE ? " (is another server running on that port?)" : "");

  sockaddr_storage bound{};
  socklen_t bound_len = sizeof bound;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_len) == 0)
    port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                              : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  if (::pipe2(wake_pipe_, O_CLOEXEC | O_NONBLOCK) != 0) {
    err = errno;
    ::close(fd);
    FATHOM_CHECK(false, "cannot start the HTTP server on ", where, ": pipe: ", errno_text(err));
  }
  listen_fd_ = fd;
  started_ = true;
  accept_thread_ = std::thread([this] { accept_loop(); });
}

void HttpServer::stop() {
  std::lock_guard<std::mutex> lock(stop_mutex_);
  if (stopped_) return;
  stopped_ = true;
  if (!started_) return;
  stopping_ = true;
  // 1. No new connections: wake the accept thread and wait for it.
  char byte = 1;
  [[maybe_unused]] ssize_t w = ::write(wake_pipe_[1], &byte, 1);
  if (accept_thread_.joinable()) accept_thread_.join();
  ::close(listen_fd_);
  listen_fd_ = -1;
  // 2. Wake every connection thread: a blocked poll/recv sees EOF, a blocked or later send fails
  //    (so a streaming handler sees write() return false), client_gone() turns true.
  {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto& c : connections_)
      if (c->fd >= 0) ::shutdown(c->fd, SHUT_RDWR);
  }
  // 3. Wait for them (their handlers return once they notice).
  reap(/*all=*/true);
  ::close(wake_pipe_[0]);
  ::close(wake_pipe_[1]);
  wake_pipe_[0] = wake_pipe_[1] = -1;
}

void HttpServer::reap(bool all) {
  std::list<std::unique_ptr<Connection>> finished;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      auto next = std::next(it);
      if (all || (*it)->done) finished.splice(finished.end(), connections_, it);
      it = next;
    }
  }
  // Join outside the lock: a finishing thread takes the lock to mark itself done.
  for (auto& c : finished)
    if (c->thread.joinable()) c->thread.join();
}

void HttpServer::accept_loop() {
  while (!stopping_) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    // The timeout only bounds how long finished connection threads wait to be joined.
    int r = ::poll(p, 2, 1000);
    reap(/*all=*/false);
    if (stopping_) break;
    if (r <= 0 || !(p[0].revents & POLLIN)) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      // Out of descriptors or memory: the listener stays readable, so back off instead of spinning.
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        pollfd wake{wake_pipe_[0], POLLIN, 0};
        ::poll(&wake, 1, 100);
      }
      continue;  // EAGAIN, ECONNABORTED, EINTR: nothing to do
    }
    // Token-sized stream chunks go out at once rather than waiting on Nagle + delayed ACK (~40 ms).
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    // A client that stops reading cannot hold a thread in send() forever.
    timeval tv{options_.idle_timeout_ms / 1000, (options_.idle_timeout_ms % 1000) * 1000};
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

    Connection* c = nullptr;
    try {
      auto connection = std::make_unique<Connection>();
      connection->fd = fd;
      std::lock_guard<std::mutex> lock(mutex_);
      if (active_ < options_.max_connections) {
        c = connection.get();
        connections_.push_back(std::move(connection));
        ++active_;
      }
    } catch (...) {  // out of memory: answer like a full server
    }
    if (c) {
      try {
        c->thread = std::thread([this, c] { serve_connection(c); });
        continue;  // the connection thread owns fd now
      } catch (...) {  // no thread to be had: answer like a full server
        std::lock_guard<std::mutex> lock(mutex_);
        --active_;
        connections_.remove_if([c](const std::unique_ptr<Connection>& x) { return x.get() == c; });
      }
    }
    // Full: a short 503 without waiting for the request (the accept thread must not block), then close.
    try {
      std::string body = error_body(503, "the server is at its connection limit; retry shortly");
      std::string out = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: " + options_.error_content_type +
                        "\r\nContent-Length: " + std::to_string(body.size()) +
                        "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" + body;
      [[maybe_unused]] ssize_t n = ::send(fd, out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    } catch (...) {
    }
    ::shutdown(fd, SHUT_WR);
    ::close(fd);
  }
}

std::string HttpServer::error_body(int status, const std::string& message) const {
  if (options_.error_body) {
    try {
      return options_.error_body(status, message);
    } catch (...) {
      // A failing formatter must not take the error response down with it.
    }
  }
  return default_http_error_body(status, message);
}

void HttpServer::send_error(int fd, int status, const std::string& message) {
  HttpResponseWriter w(fd, /*keep_alive=*/false, /*head_request=*/false, /*http11=*/true);
  w.send(status, options_.error_content_type, error_body(status, message));
}

int parse_request_head(std::string_view block, size_t max_body_bytes, HttpRequest& req, bool& keep_alive,
                       size_t& length, bool& expect_continue, std::string& message) {
  req = HttpRequest();
  // The request line: method SP request-target SP HTTP-version, single spaces.
  size_t eol = block.find("\r\n");
  std::string_view line = block.substr(0, eol);
  size_t sp1 = line.find(' ');
  size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos) {
    message = "malformed request line (expected 'METHOD /target HTTP/1.1')";
    return 400;
  }
  std::string_view method = line.substr(0, sp1), target = line.substr(sp1 + 1, sp2 - sp1 - 1),
                   version = line.substr(sp2 + 1);
  if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || version[6] != '.' ||
      !(version[5] >= '0' && version[5] <= '9') || !(version[7] >= '0' && version[7] <= '9')) {
    message = "malformed HTTP version in the request line";
    return 400;
  }
  if (version != "HTTP/1.1" && version != "HTTP/1.0") {
    message = "HTTP version " + std::string(version.substr(5)) + " is not supported (use HTTP/1.1)";
    return 505;
  }
  if (!is_token(method)) {
    message = "malformed method in the request line";
    return 400;
  }
  bool target_ok = !target.empty() && target[0] == '/';
  for (char ch : target) {
    auto c = static_cast<unsigned char>(ch);
    if (c <= 0x20 || c >= 0x7f || c == '#') target_ok = false;
  }
  if (!target_ok) {
    message = "the request target must be a path starting with '/' (printable ASCII, no fragment)";
    return 400;
  }
  req.method = std::string(method);
  req.target = std::string(target);
  req.version = std::string(version);
  size_t q = target.find('?');
  req.path = std::string(target.substr(0, q));
  req.query = q == std::string_view::npos ? std::string() : std::string(target.substr(q + 1));

  // Header fields: "name: value", the name a token right before the colon.
  std::string_view rest = eol == std::string_view::npos ? std::string_view() : block.substr(eol + 2);
  while (!rest.empty()) {
    size_t end = rest.find("\r\n");
    std::string_view field = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 2);
    if (!field.empty() && (field[0] == ' ' || field[0] == '\t')) {
      message = "obsolete line folding in a request header is not accepted";
      return 400;
    }
    size_t colon = field.find(':');
    std::string_view name = field.substr(0, colon);
    if (colon == std::string_view::npos || !is_token(name)) {
      message = "malformed request header line (expected 'Name: value', no space before the colon)";
      return 400;
    }
    std::string_view value = trim_ows(field.substr(colon + 1));
    if (!is_field_value(value)) {
      message = "request header '" + std::string(name) + "' holds a control character";
      return 400;
    }
    req.headers.emplace_back(lower(name), std::string(value));
  }

  // Framing. Only Content-Length: one way to delimit a body leaves no room for disagreement
  //    between this server and a proxy in front of it about where a request ends.
  bool has_length = false;
  length = 0;
  expect_continue = false;
  bool connection_close = false, connection_keep_alive = false;
  for (const auto& [name, value] : req.headers) {
    if (name == "transfer-encoding") {
      message = "Transfer-Encoding in a request is not supported; send the body with Content-Length";
      return 501;
    }
    if (name == "content-length") {
      // Several fields, or a list in one, are allowed only when every element is the same number.
      std::string_view list = value;
      for (;;) {
        size_t comma = list.find(',');
        size_t n = 0;
        if (!parse_length(trim_ows(list.substr(0, comma)), n)) {
          message = "Content-Length '" + value + "' is not a non-negative decimal number";
          return 400;
        }
        if (has_length && n != length) {
          message = "conflicting Content-Length values";
          return 400;
        }
        has_length = true;
        length = n;
        if (comma == std::string_view::npos) break;
        list.remove_prefix(comma + 1);
      }
    }
    if (name == "connection") {
      connection_close = connection_close || has_token(value, "close");
      connection_keep_alive = connection_keep_alive || has_token(value, "keep-alive");
    }
    if (name == "expect" && has_token(value, "100-continue")) expect_continue = true;
  }
  bool http11 = req.version == "HTTP/1.1";
  keep_alive = http11 ? !connection_close : (connection_keep_alive && !connection_close);
  if (!has_length && (req.method == "POST" || req.method == "PUT" || req.method == "PATCH")) {
    message = req.method + " needs a Content-Length header";
    return 411;
  }
  if (length > max_body_bytes) {
    message = "the request body of " + (length == SIZE_MAX ? std::string("an enormous size") : std::to_string(length)) +
              " bytes exceeds the limit of " + std::to_string(max_body_bytes) + " bytes";
    return 413;
  }

  return 0;
}

int HttpServer::read_request(int fd, std::string& buf, HttpRequest& req, bool& keep_alive, std::string& message) {
  const size_t max_header = options_.max_header_bytes;
  const auto timeout = std::chrono::milliseconds(options_.idle_timeout_ms);
  auto idle_deadline = Clock::now() + timeout;
  Clock::time_point request_deadline{};
  bool request_started = false;

  // 1. The header block, up to and including the blank line.
  size_t header_end = 0, scan_from = 0;
  for (;;) {
    // RFC 9112 2.2: ignore empty lines before a request line (some clients send a CRLF after a body).
    size_t skip = 0;
    while (buf.size() >= skip + 2 && buf[skip] == '\r' && buf[skip + 1] == '\n') skip += 2;
    if (skip) {
      buf.erase(0, skip);
      scan_from = 0;
    }
    if (!buf.empty() && !request_started) {
      // The whole request must arrive within the timeout of its first byte (no slow-loris).
      request_started = true;
      request_deadline = Clock::now() + timeout;
    }
    size_t pos = buf.find("\r\n\r\n", scan_from);
    if (pos != std::string::npos) {
      header_end = pos + 4;
      break;
    }
    if (buf.size() > max_header) break;
    scan_from = buf.size() >= 3 ? buf.size() - 3 : 0;
    Recv r = recv_some(fd, buf, request_started ? request_deadline : idle_deadline);
    if (r == Recv::kClosed || stopping_) return -1;  // a client leaving mid-request gets no answer
    if (r == Recv::kTimeout) {
      if (!request_started) return -1;  // an idle keep-alive connection: close quietly
      message = "the request did not arrive within " + std::to_string(options_.idle_timeout_ms) + " ms";
      return 408;
    }
  }
  if (header_end == 0 || header_end > max_header) {
    message = "the request line and headers exceed " + std::to_string(max_header) + " bytes";
    return 431;
  }

  // 2.-4. The request line, the header fields and the framing they set.
  std::string_view block(buf.data(), header_end - 2);  // each line ends with CRLF
  size_t length = 0;
  bool expect_continue = false;
  if (int status = parse_request_head(block, options_.max_body_bytes, req, keep_alive, length, expect_continue, message))
    return status;

  // 5. The body. A client that sent "Expect: 100-continue" waits for our go-ahead (curl does so
  //    for bodies over 1 KiB), which it gets only now that the length has passed the checks.
  if (expect_continue && req.version == "HTTP/1.1" && buf.size() - header_end < length) {
    HttpResponseWriter w(fd, true, false, true);
    if (!w.send_all("HTTP/1.1 100 Continue\r\n\r\n")) return -1;
  }
  while (buf.size() - header_end < length) {
    Recv r = recv_some(fd, buf, request_deadline);
    if (r == Recv::kClosed || stopping_) return -1;
    if (r == Recv::kTimeout) {
      message = "the request body did not arrive within " + std::to_string(options_.idle_timeout_ms) + " ms";
      return 408;
    }
  }
  req.body = buf.substr(header_end, length);
  buf.erase(0, header_end + length);
  return 0;
}

void HttpServer::serve_connection(Connection* c) {
  const int fd = c->fd;
  bool linger = false;  // close with the lingering drain (after an error, unread bytes may follow)
  try {
    std::string buf;
    while (!stopping_) {
      HttpRequest req;
      bool keep_alive = false;
      std::string message;
      int status = read_request(fd, buf, req, keep_alive, message);
      if (status < 0) break;
      if (status > 0) {
        // The request's framing cannot be trusted, so the connection cannot carry another one.
        send_error(fd, status, message);
        linger = true;
        break;
      }
      if (stopping_) keep_alive = false;
      HttpResponseWriter w(fd, keep_alive, req.method == "HEAD", req.version == "HTTP/1.1");
      bool threw_after_responding = false;
      auto fail = [&](const std::string& what) {
        if (!w.responded_) {
          // Nothing sent yet, and the request was read whole: the connection stays usable.
          w.send(500, options_.error_content_type, error_body(500, what));
        } else {
          threw_after_responding = true;  // a half-sent response: only closing ends it
        }
      };
      try {
        handler_(req, w);
        if (!w.responded_) {
          w.send(500, options_.error_content_type, error_body(500, "the handler returned without a response"));
        } else if (w.streaming_ && !w.ended_) {
          w.end();
        }
      } catch (const std::exception& e) {
        fail(e.what());
      } catch (...) {
        fail("the handler failed with an unknown exception");
      }
      if (threw_after_responding || w.failed_ || w.raw_stream_ || !w.keep_alive_) break;
    }
  } catch (...) {
    // Out of memory or a bug in here: lose this connection, never the process.
  }
  if (linger && !stopping_) lingering_drain(fd, std::min(kMaxLingerMs, options_.idle_timeout_ms));
  std::lock_guard<std::mutex> lock(mutex_);
  ::close(fd);
  c->fd = -1;
  c->done = true;
  --active_;
}

}  // namespace fathom::serve
