// The HTTP server (src/serve/http.h), driven over raw sockets so that every byte on the wire
// is the test's choice: malformed and oversized requests, pipelining, half-sent requests,
// clients that vanish. Each wait has a deadline of a few seconds, so a broken server fails a
// test instead of hanging it; no test sleeps for correctness.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/error.h"
#include "serve/http.h"

namespace fathom::serve {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
constexpr milliseconds kTimeout{5000};

struct Response {
  int status = 0;
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;                                           // de-chunked
  std::vector<std::string> chunks;                            // a chunked body's chunks, in order
  std::string header(const std::string& lower_name) const {
    for (const auto& [n, v] : headers)
      if (n == lower_name) return v;
    return {};
  }
};

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// A raw HTTP client over one TCP connection to 127.0.0.1:port.
class Client {
 public:
  explicit Client(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(uint16_t(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) close();
  }
  ~Client() { close(); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  bool connected() const { return fd_ >= 0; }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void shutdown_write() { ::shutdown(fd_, SHUT_WR); }

  bool send(std::string_view data) {
    while (!data.empty()) {
      ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      data.remove_prefix(size_t(n));
    }
    return true;
  }

  // One response (an interim 1xx one too); nullopt when the connection ends or the deadline
  // passes before it is complete. head: the response to a HEAD request (no body bytes follow).
  std::optional<Response> read_response(bool head = false, milliseconds timeout = kTimeout) {
    auto deadline = Clock::now() + timeout;
    size_t end;
    while ((end = buf_.find("\r\n\r\n")) == std::string::npos)
      if (!fill(deadline)) return std::nullopt;
    Response r;
    std::string block = buf_.substr(0, end + 2);
    buf_.erase(0, end + 4);
    size_t eol = block.find("\r\n");
    std::string status_line = block.substr(0, eol);
    if (status_line.rfind("HTTP/1.1 ", 0) != 0 || status_line.size() < 12) return std::nullopt;
    r.status = std::stoi(status_line.substr(9, 3));
    for (size_t pos = eol + 2; pos < block.size();) {
      size_t next = block.find("\r\n", pos);
      std::string line = block.substr(pos, next - pos);
      size_t colon = line.find(':');
      if (colon == std::string::npos) return std::nullopt;
      size_t v = line.find_first_not_of(' ', colon + 1);
      r.headers.emplace_back(lower(line.substr(0, colon)), v == std::string::npos ? "" : line.substr(v));
      pos = next + 2;
    }
    if (head || r.status < 200 || r.status == 204 || r.status == 304) return r;
    if (r.header("transfer-encoding") == "chunked") {
      for (;;) {
        size_t line_end;
        while ((line_end = buf_.find("\r\n")) == std::string::npos)
          if (!fill(deadline)) return std::nullopt;
        size_t size = std::stoul(buf_.substr(0, line_end), nullptr, 16);
        while (buf_.size() < line_end + 2 + size + 2)
          if (!fill(deadline)) return std::nullopt;
        if (buf_.compare(line_end + 2 + size, 2, "\r\n") != 0) return std::nullopt;
        std::string data = buf_.substr(line_end + 2, size);
        buf_.erase(0, line_end + 2 + size + 2);
        if (size == 0) return r;  // the last chunk (the server sends no trailers)
        r.chunks.push_back(data);
        r.body += data;
      }
    }
    if (!r.header("content-length").empty()) {
      size_t n = std::stoul(r.header("content-length"));
      while (buf_.size() < n)
        if (!fill(deadline)) return std::nullopt;
      r.body = buf_.substr(0, n);
      buf_.erase(0, n);
      return r;
    }
    while (fill(deadline)) {  // framed by the connection's end
    }
    if (!eof_) return std::nullopt;
    r.body = std::move(buf_);
    buf_.clear();
    return r;
  }

  // Whether the server closes the connection (EOF or reset) before the deadline; bytes that
  // arrive meanwhile are kept (leftover() shows them).
  bool wait_closed(milliseconds timeout = kTimeout) {
    auto deadline = Clock::now() + timeout;
    while (fill(deadline)) {
    }
    return eof_;
  }
  const std::string& leftover() const { return buf_; }

 private:
  // One recv into buf_; false at EOF (eof_ set), on error (eof_ set) or at the deadline.
  bool fill(Clock::time_point deadline) {
    if (eof_ || fd_ < 0) return false;
    for (;;) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      int r = ::poll(&p, 1, int(left));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) continue;  // re-checks the deadline
      char tmp[65536];
      ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        eof_ = true;
        return false;
      }
      buf_.append(tmp, size_t(n));
      return true;
    }
  }

  int fd_ = -1;
  std::string buf_;
  bool eof_ = false;
};

std::string get(const std::string& target, const std::string& extra_headers = "") {
  return "GET " + target + " HTTP/1.1\r\nHost: test\r\n" + extra_headers + "\r\n";
}

std::string post(const std::string& target, const std::string& body, const std::string& extra_headers = "") {
  return "POST " + target + " HTTP/1.1\r\nHost: test\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" +
         extra_headers + "\r\n" + body;
}

// The handler most tests use; `calls` counts its invocations (requests the server accepted).
struct TestHandler {
  std::shared_ptr<std::atomic<int>> calls = std::make_shared<std::atomic<int>>(0);
  void operator()(const HttpRequest& r, HttpResponseWriter& w) const {
    ++*calls;
    if (r.path == "/missing") return w.send(404, "application/json", R"({"error":"no such thing"})");
    if (r.path == "/throw") throw std::runtime_error("boom \"quoted\"\n");
    if (r.path == "/silent") return;
    if (r.path == "/stream") {
      if (!w.begin_stream(200, "text/event-stream", {{"X-Stream", "1"}})) return;
      for (int i = 0; i < 3; ++i)
        if (!w.write("data: " + std::to_string(i) + "\n\n")) return;
      w.end();
      return;
    }
    std::string out = r.method + " " + r.path + " q=" + r.query + " x-test=" + r.header("x-test") + " body=" + r.body;
    w.send(200, "text/plain", out, {{"X-Echo", "yes"}});
  }
};

std::unique_ptr<HttpServer> start_server(HttpHandler handler, HttpServerOptions options = {}) {
  options.port = 0;
  auto server = std::make_unique<HttpServer>(std::move(options), std::move(handler));
  server->start();
  return server;
}

// A fresh connection gets a good answer: the server survived whatever came before.
void expect_healthy(int port) {
  Client c(port);
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.send(get("/ok?after=1")));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value()) << "no response from the server after the previous request";
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "GET /ok q=after=1 x-test= body=");
}

// Sends raw bytes on a fresh connection; expects the status, then the server closing it.
void expect_error_and_close(int port, const std::string& request, int status) {
  Client c(port);
  ASSERT_TRUE(c.connected());
  c.send(request);  // may fail part-way when the server answers early; the response still comes
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value()) << "no response to: " << request.substr(0, 200);
  EXPECT_EQ(r->status, status) << "request: " << request.substr(0, 200);
  EXPECT_EQ(r->header("connection"), "close");
  EXPECT_EQ(r->header("content-type"), "application/json");
  EXPECT_NE(r->body.find("\"code\":" + std::to_string(status)), std::string::npos) << r->body;
  EXPECT_TRUE(c.wait_closed()) << "the server kept the connection open after a " << status;
}

TEST(HttpServer, GetAndPostEchoed) {
  TestHandler h;
  auto server = start_server(h);
  Client c(server->port());
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.send(get("/hello?x=1&y=2", "X-Test:   padded value \t\r\n")));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "GET /hello q=x=1&y=2 x-test=padded value body=");
  EXPECT_EQ(r->header("content-type"), "text/plain");
  EXPECT_EQ(r->header("content-length"), std::to_string(r->body.size()));
  EXPECT_EQ(r->header("connection"), "keep-alive");
  EXPECT_EQ(r->header("x-echo"), "yes");

  std::string body = "{\"prompt\": \"hi\"}\r\n\r\nwith a blank line inside";
  ASSERT_TRUE(c.send(post("/v1/echo", body)));
  r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "POST /v1/echo q= x-test= body=" + body);
}

TEST(HttpServer, RequestFieldsAndHeaderLookup) {
  std::promise<HttpRequest> seen;
  auto server = start_server([&](const HttpRequest& r, HttpResponseWriter& w) {
    seen.set_value(r);
    w.send(204, "", "");
  });
  Client c(server->port());
  ASSERT_TRUE(c.send("\r\nDELETE /a/b?k=v HTTP/1.1\r\nHost: x\r\nX-Mixed-Case: One\r\nx-mixed-case: Two\r\n"
                     "Empty:\r\n\r\n"));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 204);
  EXPECT_EQ(r->header("content-length"), "");  // 204 carries none
  auto f = seen.get_future();
  ASSERT_EQ(f.wait_for(kTimeout), std::future_status::ready);
  HttpRequest req = f.get();
  EXPECT_EQ(req.method, "DELETE");
  EXPECT_EQ(req.target, "/a/b?k=v");
  EXPECT_EQ(req.path, "/a/b");
  EXPECT_EQ(req.query, "k=v");
  EXPECT_EQ(req.version, "HTTP/1.1");
  EXPECT_EQ(req.header("x-mixed-case"), "One");  // the first of two
  EXPECT_EQ(req.header("empty"), "");
  EXPECT_EQ(req.header("absent"), "");
  ASSERT_EQ(req.headers.size(), 4u);
  EXPECT_EQ(req.headers[1].first, "x-mixed-case");
  EXPECT_EQ(req.headers[2].second, "Two");
}

TEST(HttpServer, KeepAliveServesSeveralRequestsOnOneConnection) {
  TestHandler h;
  auto server = start_server(h);
  Client c(server->port());
  ASSERT_TRUE(c.connected());
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(c.send(get("/n" + std::to_string(i))));
    auto r = c.read_response();
    ASSERT_TRUE(r.has_value()) << "request " << i;
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(r->body, "GET /n" + std::to_string(i) + " q= x-test= body=");
    EXPECT_EQ(r->header("connection"), "keep-alive");
  }
  // Pipelined: two requests in one write, answered in order.
  ASSERT_TRUE(c.send(post("/p1", "one") + get("/p2")));
  auto r1 = c.read_response(), r2 = c.read_response();
  ASSERT_TRUE(r1.has_value() && r2.has_value());
  EXPECT_EQ(r1->body, "POST /p1 q= x-test= body=one");
  EXPECT_EQ(r2->body, "GET /p2 q= x-test= body=");
  // "Connection: close" is honoured: answered, then closed.
  ASSERT_TRUE(c.send(get("/last", "Connection: close\r\n")));
  auto r3 = c.read_response();
  ASSERT_TRUE(r3.has_value());
  EXPECT_EQ(r3->header("connection"), "close");
  EXPECT_TRUE(c.wait_closed());
  EXPECT_EQ(*h.calls, 5);
}

TEST(HttpServer, Http10ClosesUnlessKeepAliveAsked) {
  TestHandler h;
  auto server = start_server(h);
  {
    Client c(server->port());
    ASSERT_TRUE(c.send("GET /old HTTP/1.0\r\n\r\n"));
    auto r = c.read_response();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(r->header("connection"), "close");
    EXPECT_TRUE(c.wait_closed());
  }
  {
    Client c(server->port());
    for (int i = 0; i < 2; ++i) {
      ASSERT_TRUE(c.send("GET /old HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
      auto r = c.read_response();
      ASSERT_TRUE(r.has_value());
      EXPECT_EQ(r->header("connection"), "keep-alive");
    }
  }
  {
    // No chunked framing for HTTP/1.0: the stream is raw bytes ended by the close.
    Client c(server->port());
    ASSERT_TRUE(c.send("GET /stream HTTP/1.0\r\n\r\n"));
    auto r = c.read_response();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->header("transfer-encoding"), "");
    EXPECT_EQ(r->body, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
  }
}

TEST(HttpServer, StreamedResponseArrivesAsChunks) {
  TestHandler h;
  auto server = start_server(h);
  Client c(server->port());
  ASSERT_TRUE(c.send(get("/stream")));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->header("transfer-encoding"), "chunked");
  EXPECT_EQ(r->header("cache-control"), "no-cache");
  EXPECT_EQ(r->header("content-type"), "text/event-stream");
  EXPECT_EQ(r->header("content-length"), "");
  EXPECT_EQ(r->header("x-stream"), "1");
  EXPECT_EQ(r->chunks, (std::vector<std::string>{"data: 0\n\n", "data: 1\n\n", "data: 2\n\n"}));
  // The last chunk ended the response, so the connection carries the next request.
  ASSERT_TRUE(c.send(get("/after-stream")));
  auto r2 = c.read_response();
  ASSERT_TRUE(r2.has_value());
  EXPECT_EQ(r2->body, "GET /after-stream q= x-test= body=");
}

TEST(HttpServer, StreamNotEndedByHandlerIsEndedForIt) {
  auto server = start_server([](const HttpRequest&, HttpResponseWriter& w) {
    w.begin_stream(200, "text/event-stream");
    w.write("data: x\n\n");
    w.write("");  // sends nothing (an empty chunk would end the stream early)
  });
  Client c(server->port());
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(c.send(get("/s")));
    auto r = c.read_response();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->chunks, std::vector<std::string>{"data: x\n\n"});
  }
}

TEST(HttpServer, HeadGetsHeadersOnly) {
  TestHandler h;
  auto server = start_server(h);
  Client c(server->port());
  ASSERT_TRUE(c.send("HEAD /x HTTP/1.1\r\n\r\n"));
  auto r = c.read_response(/*head=*/true);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->header("content-length"), std::to_string(std::string("HEAD /x q= x-test= body=").size()));
  // No body bytes followed: the next response starts right away.
  ASSERT_TRUE(c.send(get("/y")));
  auto r2 = c.read_response();
  ASSERT_TRUE(r2.has_value());
  EXPECT_EQ(r2->body, "GET /y q= x-test= body=");
}

TEST(HttpServer, HandlerNotFound) {
  TestHandler h;
  auto server = start_server(h);
  Client c(server->port());
  ASSERT_TRUE(c.send(get("/missing")));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 404);
  EXPECT_EQ(r->body, R"({"error":"no such thing"})");
  EXPECT_EQ(r->header("connection"), "keep-alive");  // a handler's 404 is a normal response
  ASSERT_TRUE(c.send(get("/found")));
  auto r2 = c.read_response();
  ASSERT_TRUE(r2.has_value());
  EXPECT_EQ(r2->status, 200);
}

TEST(HttpServer, MalformedRequestsAre400) {
  TestHandler h;
  auto server = start_server(h);
  const std::vector<std::string> bad = {
      "GARBAGE\r\n\r\n",
      "GET /\r\n\r\n",
      "GET  / HTTP/1.1\r\n\r\n",
      "GET / HTTP/1.1 \r\n\r\n",
      "GET foo HTTP/1.1\r\n\r\n",
      "GET * HTTP/1.1\r\n\r\n",
      "GET /a#frag HTTP/1.1\r\n\r\n",
      "G(T / HTTP/1.1\r\n\r\n",
      "GET / HTTX/1.1\r\n\r\n",
      "GET / HTTP/11\r\n\r\n",
      "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
      "GET / HTTP/1.1\r\nName : space-before-colon\r\n\r\n",
      "GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
      "GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
      "GET / HTTP/1.1\r\nA: b\r\n\tfolded\r\n\r\n",
      std::string("GET / HTTP/1.1\r\nA: b\x01") + "c\r\n\r\n",
      "GET / HTTP/1.1\r\nA: bare\nLF: x\r\n\r\n",
      "POST /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
      "POST /echo HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
      "POST /echo HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
      "POST /echo HTTP/1.1\r\nContent-Length:\r\n\r\n",
      "POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
      "POST /echo HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\nabcd",
  };
  for (const auto& request : bad) expect_error_and_close(server->port(), request, 400);
  EXPECT_EQ(*h.calls, 0) << "the handler saw a malformed request";
  expect_healthy(server->port());

  // Repeated but equal Content-Length values are one length.
  Client c(server->port());
  ASSERT_TRUE(c.send("POST /e HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\nabc"));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->body, "POST /e q= x-test= body=abc");
}

TEST(HttpServer, UnsupportedVersionIs505) {
  TestHandler h;
  auto server = start_server(h);
  for (const char* v : {"HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTP/3.0"})
    expect_error_and_close(server->port(), std::string("GET / ") + v + "\r\n\r\n", 505);
  EXPECT_EQ(*h.calls, 0);
  expect_healthy(server->port());
}

TEST(HttpServer, BodyWithoutContentLengthIs411) {
  TestHandler h;
  auto server = start_server(h);
  expect_error_and_close(server->port(), "POST /echo HTTP/1.1\r\nHost: x\r\n\r\n", 411);
  expect_error_and_close(server->port(), "PUT /echo HTTP/1.1\r\nHost: x\r\n\r\n", 411);
  EXPECT_EQ(*h.calls, 0);
  expect_healthy(server->port());
}

TEST(HttpServer, BodyOverLimitIs413WithoutReadingIt) {
  TestHandler h;
  HttpServerOptions o;
  o.max_body_bytes = 1024;
  auto server = start_server(h, o);
  // The body is announced but only partly sent: the 413 must come without waiting for the rest.
  expect_error_and_close(server->port(),
                         "POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + std::string(2000, 'b'), 413);
  expect_error_and_close(server->port(), "POST /echo HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
                         413);
  EXPECT_EQ(*h.calls, 0);
  expect_healthy(server->port());
  // Exactly at the limit is fine.
  Client c(server->port());
  ASSERT_TRUE(c.send(post("/echo", std::string(1024, 'z'))));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "POST /echo q= x-test= body=" + std::string(1024, 'z'));
}

TEST(HttpServer, HeadersOverLimitAre431) {
  TestHandler h;
  HttpServerOptions o;
  o.max_header_bytes = 1024;
  auto server = start_server(h, o);
  // Complete but too large, and too large without ever ending (the server must not wait for the end).
  expect_error_and_close(server->port(), get("/", "X-Big: " + std::string(2000, 'a') + "\r\n"), 431);
  expect_error_and_close(server->port(), "GET / HTTP/1.1\r\nX-Big: " + std::string(4000, 'a'), 431);
  expect_error_and_close(server->port(), "GET /" + std::string(3000, 'p') + " HTTP/1.1\r\n\r\n", 431);
  EXPECT_EQ(*h.calls, 0);
  expect_healthy(server->port());
  // Exactly at the limit (the blank line included) is fine; one byte more is not.
  const std::string prefix = "GET / HTTP/1.1\r\nX-Fill: ", suffix = "\r\n\r\n";
  std::string at_limit = prefix + std::string(1024 - prefix.size() - suffix.size(), 'f') + suffix;
  ASSERT_EQ(at_limit.size(), 1024u);
  Client c(server->port());
  ASSERT_TRUE(c.send(at_limit));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  expect_error_and_close(server->port(), prefix + std::string(1025 - prefix.size() - suffix.size(), 'f') + suffix,
                         431);
}

TEST(HttpServer, TransferEncodingInRequestIs501) {
  TestHandler h;
  auto server = start_server(h);
  expect_error_and_close(server->port(),
                         "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 501);
  // Together with Content-Length (the classic smuggling shape) it is refused the same way.
  expect_error_and_close(server->port(),
                         "POST /echo HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                         501);
  EXPECT_EQ(*h.calls, 0);
  expect_healthy(server->port());
}

TEST(HttpServer, HandlerThatThrowsOrForgetsToRespondGets500) {
  TestHandler h;
  auto server = start_server(h);
  Client c(server->port());
  ASSERT_TRUE(c.send(get("/throw")));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 500);
  EXPECT_EQ(r->header("content-type"), "application/json");
  // the same JSON whatever the key order
  EXPECT_EQ(nlohmann::json::parse(r->body),
            nlohmann::json::parse(R"({"error":{"message":"boom \"quoted\"\n","type":"server_error","code":500}})"));
  // The request was read whole, so the connection still works.
  ASSERT_TRUE(c.send(get("/silent")));
  r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 500);
  EXPECT_NE(r->body.find("without a response"), std::string::npos) << r->body;
  ASSERT_TRUE(c.send(get("/fine")));
  r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
}

TEST(HttpServer, HandlerThatThrowsMidStreamClosesTheConnection) {
  auto server = start_server([](const HttpRequest& r, HttpResponseWriter& w) {
    if (r.path != "/bad-stream") return w.send(200, "text/plain", "ok");
    w.begin_stream(200, "text/event-stream");
    w.write("data: partial\n\n");
    throw std::runtime_error("failed mid-stream");
  });
  Client c(server->port());
  ASSERT_TRUE(c.send(get("/bad-stream")));
  EXPECT_TRUE(c.wait_closed());
  // The headers and the chunk that was written, then EOF without the last chunk: truncated.
  const std::string& raw = c.leftover();
  EXPECT_NE(raw.find("Transfer-Encoding: chunked\r\n"), std::string::npos) << raw;
  EXPECT_TRUE(raw.ends_with("\r\n\r\nf\r\ndata: partial\n\n\r\n")) << raw;
  Client c2(server->port());
  ASSERT_TRUE(c2.send(get("/other")));
  auto r = c2.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->body, "ok");
}

TEST(HttpServer, CustomErrorBodyAndBadResponseHeaders) {
  HttpServerOptions o;
  // (built step by step: "E" + std::to_string(...) trips a GCC 12 -Wrestrict false positive)
  o.error_body = [](int status, const std::string& message) {
    std::string body = "E";
    body += std::to_string(status);
    body += ":";
    return body + message;
  };
  o.error_content_type = "text/plain";
  auto server = start_server(
      [](const HttpRequest&, HttpResponseWriter& w) { w.send(200, "text/plain", "x", {{"X-Bad", "a\r\nInjected: 1"}}); },
      o);
  Client c(server->port());
  ASSERT_TRUE(c.send(get("/")));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 500);  // the header injection was refused before anything was sent
  EXPECT_EQ(r->header("content-type"), "text/plain");
  EXPECT_EQ(r->header("injected"), "");
  EXPECT_EQ(r->body.rfind("E500:", 0), 0u) << r->body;
  c.close();

  Client c2(server->port());
  ASSERT_TRUE(c2.send("GET / HTTP/9.9\r\n\r\n"));
  r = c2.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 505);
  EXPECT_EQ(r->body.rfind("E505:", 0), 0u) << r->body;
}

TEST(HttpServer, ExpectContinueGetsAGoAhead) {
  TestHandler h;
  auto server = start_server(h);
  Client c(server->port());
  ASSERT_TRUE(c.send("POST /up HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"));
  auto interim = c.read_response();
  ASSERT_TRUE(interim.has_value());
  EXPECT_EQ(interim->status, 100);
  ASSERT_TRUE(c.send("hello"));
  auto r = c.read_response();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "POST /up q= x-test= body=hello");
}

TEST(HttpServer, SlowOrIdleConnectionsTimeOut) {
  TestHandler h;
  HttpServerOptions o;
  o.idle_timeout_ms = 300;
  auto server = start_server(h, o);
  {
    Client c(server->port());  // says nothing: closed quietly
    EXPECT_TRUE(c.wait_closed());
    EXPECT_EQ(c.leftover(), "");
  }
  // Half a request line, half a body: 408, then closed.
  expect_error_and_close(server->port(), "GET / HTTP/1.1\r\nHost:", 408);
  expect_error_and_close(server->port(), "POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 408);
  {
    Client c(server->port());  // a keep-alive connection idle after a request: closed quietly
    ASSERT_TRUE(c.send(get("/one")));
    ASSERT_TRUE(c.read_response().has_value());
    EXPECT_TRUE(c.wait_closed());
    EXPECT_EQ(c.leftover(), "");
  }
  expect_healthy(server->port());
}

TEST(HttpServer, ConnectionLimitAnswers503) {
  TestHandler h;
  HttpServerOptions o;
  o.max_connections = 1;
  auto server = start_server(h, o);
  auto first = std::make_unique<Client>(server->port());
  ASSERT_TRUE(first->send(get("/hold")));
  ASSERT_TRUE(first->read_response().has_value());  // now surely admitted, and kept alive
  {
    Client second(server->port());
    auto r = second.read_response();  // the 503 comes without a request
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->status, 503);
    EXPECT_EQ(r->header("retry-after"), "1");
    EXPECT_TRUE(second.wait_closed());
  }
  first.reset();  // frees the slot, which the server notices asynchronously: retry until then
  bool served = false;
  for (auto deadline = Clock::now() + kTimeout; !served && Clock::now() < deadline;) {
    Client c(server->port());
    c.send(get("/again"));
    auto r = c.read_response();
    served = r.has_value() && r->status == 200;
  }
  EXPECT_TRUE(served);
}

TEST(HttpServer, ClientGoneTurnsTrueWhenTheClientCloses) {
  std::promise<bool> gone_at_start, gone;
  std::promise<void> started;
  auto server = start_server([&](const HttpRequest& r, HttpResponseWriter& w) {
    if (r.path != "/slow") return TestHandler{}(r, w);
    gone_at_start.set_value(w.client_gone());
    started.set_value();
    // Slow work that polls for cancellation, bounded by a deadline.
    bool saw = false;
    for (auto deadline = Clock::now() + kTimeout; !saw && Clock::now() < deadline;) {
      saw = w.client_gone();
      if (!saw) std::this_thread::sleep_for(milliseconds(2));
    }
    gone.set_value(saw);
    w.send(200, "text/plain", "too late");
  });
  Client c(server->port());
  ASSERT_TRUE(c.send(get("/slow")));
  auto started_f = started.get_future();
  ASSERT_EQ(started_f.wait_for(kTimeout), std::future_status::ready);
  auto at_start = gone_at_start.get_future();
  EXPECT_FALSE(at_start.get());
  c.close();
  auto gone_f = gone.get_future();
  ASSERT_EQ(gone_f.wait_for(kTimeout + milliseconds(1000)), std::future_status::ready);
  EXPECT_TRUE(gone_f.get());
  expect_healthy(server->port());
}

TEST(HttpServer, StopIsPromptWithIdleKeepAliveConnection) {
  TestHandler h;
  auto server = start_server(h);  // default idle timeout: 30 s
  Client c(server->port());
  ASSERT_TRUE(c.send(get("/x")));
  ASSERT_TRUE(c.read_response().has_value());
  auto t0 = Clock::now();
  server->stop();
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
  EXPECT_TRUE(c.wait_closed());
  server->stop();  // idempotent
  Client after(server->port());
  EXPECT_FALSE(after.connected()) << "the listener still accepts after stop()";
}

TEST(HttpServer, StopIsPromptWithHandlersMidStreamAndWaiting) {
  std::atomic<int> write_failed{0}, saw_gone{0};
  std::promise<void> streaming, waiting;
  auto server = start_server([&](const HttpRequest& r, HttpResponseWriter& w) {
    auto deadline = Clock::now() + milliseconds(20000);  // far beyond the test's bound on stop()
    if (r.path == "/stream") {
      w.begin_stream(200, "text/event-stream");
      bool ok = w.write("data: first\n\n");
      streaming.set_value();
      while (ok && Clock::now() < deadline) {
        ok = w.write("data: more\n\n");
        std::this_thread::sleep_for(milliseconds(1));  // pacing only
      }
      if (!ok) ++write_failed;
    } else {
      waiting.set_value();
      while (!w.client_gone() && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(2));
      if (w.client_gone()) ++saw_gone;
      w.send(200, "text/plain", "late");
    }
  });
  Client a(server->port()), b(server->port());
  ASSERT_TRUE(a.send(get("/stream")));
  ASSERT_TRUE(b.send(get("/wait")));
  auto fs = streaming.get_future(), fw = waiting.get_future();
  ASSERT_EQ(fs.wait_for(kTimeout), std::future_status::ready);
  ASSERT_EQ(fw.wait_for(kTimeout), std::future_status::ready);
  auto t0 = Clock::now();
  server->stop();
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
  EXPECT_EQ(write_failed.load(), 1);
  EXPECT_EQ(saw_gone.load(), 1);
}

TEST(HttpServer, PortInUseIsAnErrorNamingThePort) {
  TestHandler h;
  auto first = start_server(h);
  HttpServerOptions o;
  o.port = first->port();
  HttpServer second(o, h);
  try {
    second.start();
    FAIL() << "binding a port in use succeeded";
  } catch (const fathom::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("127.0.0.1:" + std::to_string(first->port())), std::string::npos) << msg;
    EXPECT_NE(msg.find("in use"), std::string::npos) << msg;
  }
  expect_healthy(first->port());
}

TEST(HttpServer, LocalhostIsReachableOverIPv4) {
  TestHandler h;
  HttpServerOptions o;
  o.host = "localhost";  // may resolve to ::1 first; the server prefers 127.0.0.1
  auto server = start_server(h, o);
  expect_healthy(server->port());
}

TEST(HttpServer, BadOptionsAreErrors) {
  TestHandler h;
  HttpServerOptions o;
  o.port = 70000;
  EXPECT_THROW({ HttpServer s(o, h); }, fathom::Error);
  o.port = 0;
  o.max_connections = 0;
  EXPECT_THROW({ HttpServer s(o, h); }, fathom::Error);
  EXPECT_THROW({ HttpServer s(HttpServerOptions{}, HttpHandler{}); }, fathom::Error);
}

// The request-head parser on its own (the socket tests above go through it too; the fuzz target
// fuzz/fuzz_http_request.cpp checks the same properties on random input).
TEST(HttpServer, RequestHeadParsing) {
  HttpRequest r;
  bool keep_alive = false, expect = false;
  size_t length = 0;
  std::string message;
  ASSERT_EQ(parse_request_head("POST /v1/completions?stream=1 HTTP/1.1\r\nContent-Length: 12, 12\r\n"
                               "X-Thing:  a value\t\r\nExpect: 100-continue",
                               1024, r, keep_alive, length, expect, message),
            0)
      << message;
  EXPECT_EQ(r.method, "POST");
  EXPECT_EQ(r.path, "/v1/completions");
  EXPECT_EQ(r.query, "stream=1");
  EXPECT_EQ(r.header("x-thing"), "a value");
  EXPECT_EQ(length, 12u);
  EXPECT_TRUE(keep_alive);
  EXPECT_TRUE(expect);
  ASSERT_EQ(parse_request_head("GET / HTTP/1.0", 1024, r, keep_alive, length, expect, message), 0);
  EXPECT_FALSE(keep_alive);  // HTTP/1.0 closes unless asked
  EXPECT_TRUE(r.headers.empty());  // nothing left from the request before
  const std::pair<const char*, int> bad[] = {
      {"GET  / HTTP/1.1", 400},                                   // two spaces
      {"GET / HTTP/2.0", 505},                                    // another version
      {"GET nopath HTTP/1.1", 400},                               // not a path
      {"GET / HTTP/1.1\r\n folded: x", 400},                    // obsolete line folding
      {"GET / HTTP/1.1\r\nBad Name: x", 400},                   // a space in the name
      {"POST / HTTP/1.1", 411},                                   // no length
      {"POST / HTTP/1.1\r\nContent-Length: 5, 6", 400},         // conflicting lengths
      {"POST / HTTP/1.1\r\nContent-Length: 2048", 413},         // over the limit
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked", 501},   // not supported
      {"GET / HTTP/1.1\r\nX: a\x01b", 400},                    // a control character
  };
  for (const auto& [head, status] : bad) {
    EXPECT_EQ(parse_request_head(head, 1024, r, keep_alive, length, expect, message), status) << head;
    EXPECT_FALSE(message.empty()) << head;
  }
}

}  // namespace
}  // namespace fathom::serve
