// A small HTTP/1.1 server on POSIX sockets, enough to serve an OpenAI-style API to local
// clients: whole responses with Content-Length, and streamed ones (Server-Sent Events) with
// chunked framing. No third-party library, one thread per connection.
//
// What it guarantees, because a server that talks to arbitrary clients must:
//   - requests are parsed strictly and bounded (header bytes, body bytes, time): a malformed or
//     oversized request gets the matching 4xx/5xx and the connection is closed, never a crash
//     or an unbounded buffer;
//   - the request body is framed only by Content-Length (Transfer-Encoding in a request is
//     501), so there is exactly one way to find where a request ends (no request smuggling);
//   - every send uses MSG_NOSIGNAL (a client that vanishes never raises SIGPIPE), and a handler
//     streaming to a vanished client sees write() return false;
//   - stop() never hangs on idle keep-alive connections or a handler in the middle of a stream:
//     it shuts down every open socket, which wakes every blocked read and write.
//
// Not supported (not needed behind a local API): TLS, HTTP/2, chunked request bodies,
// percent-decoding of the path (path and query are given raw), a required Host header.
#pragma once
#include <atomic>
#include <cstddef>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace fathom::serve {

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

struct HttpRequest {
  std::string method, target, path, query;  // target = path + optional "?query"; raw, not percent-decoded
  std::string version;                      // "HTTP/1.0" or "HTTP/1.1"
  HttpHeaders headers;                      // in arrival order; names lower-cased, values trimmed
  std::string body;
  // The first header of that (lower-case) name; "" when absent.
  std::string header(std::string_view lower_name) const;
};

// The reason phrase of a status code ("Not Found"); "" for codes it does not know, which
// HTTP/1.1 allows ("HTTP/1.1 299 " is a valid status line).
const char* http_reason_phrase(int status);

// How the handler answers one request. Made by the server, used by one handler call on one
// thread; not thread-safe. A handler calls either send() once, or begin_stream(), write()...,
// end(). Calling them out of that order is a bug in the handler (it throws).
class HttpResponseWriter {
 public:
  HttpResponseWriter(const HttpResponseWriter&) = delete;
  HttpResponseWriter& operator=(const HttpResponseWriter&) = delete;

  // One whole response (Content-Length set). Extra headers are added as given, except that the
  // framing headers are the server's own: Content-Length or Transfer-Encoding among them is an
  // error, and a "Connection: close" among them closes the connection after this response.
  // content_type "" writes no Content-Type. Returns nothing: a client gone by then is noticed
  // by the server, which closes the connection.
  void send(int status, std::string_view content_type, std::string_view body, const HttpHeaders& extra_headers = {});

  // A streamed response (Server-Sent Events): status line + headers with Transfer-Encoding:
  // chunked and Cache-Control: no-cache; then write() sends one chunk each; end() sends the last
  // chunk. (To an HTTP/1.0 client, which knows no chunked framing, the stream is the raw bytes
  // ended by closing the connection.) write() and begin_stream() return false once the client is
  // gone (a failed send); the handler should then stop. A handler that returns without end()
  // gets end() called for it; one that throws mid-stream has its connection closed without the
  // last chunk, so the client sees a truncated stream rather than a complete-looking one.
  bool begin_stream(int status, std::string_view content_type, const HttpHeaders& extra_headers = {});
  bool write(std::string_view data);  // an empty write sends nothing (an empty chunk would end the stream)
  void end();

  // Whether the peer has closed its side (checked without blocking: poll for POLLRDHUP/POLLHUP,
  // then recv MSG_PEEK), or a send to it failed, or the server is stopping. A handler waiting on
  // slow work polls it to cancel early.
  bool client_gone() const;
  bool responded() const { return responded_; }  // send() or begin_stream() happened

 private:
  friend class HttpServer;
  HttpResponseWriter(int fd, bool keep_alive, bool head_request, bool http11);

  // Status line + headers, ending with the blank line.
  std::string head(int status, std::string_view content_type, const HttpHeaders& extra_headers,
                   std::string_view framing_headers);
  bool send_all(std::string_view data);

  int fd_;
  bool keep_alive_;    // the Connection header we send; false once this connection must close
  bool head_request_;  // HEAD: headers only, no body bytes
  bool http11_;        // the client speaks HTTP/1.1 (and so understands chunked framing)
  bool responded_ = false;
  bool streaming_ = false;   // begin_stream() happened
  bool raw_stream_ = false;  // an HTTP/1.0 stream, framed by closing the connection
  bool ended_ = false;       // end() happened
  bool failed_ = false;      // a send failed: the client is gone or stuck
};

using HttpHandler = std::function<void(const HttpRequest&, HttpResponseWriter&)>;

struct HttpServerOptions {
  std::string host = "127.0.0.1";  // a name or a numeric IPv4/IPv6 address ("0.0.0.0", "::")
  int port = 8080;                 // 0: an ephemeral port (see HttpServer::port())
  size_t max_body_bytes = size_t(1) << 20;
  size_t max_header_bytes = size_t(16) << 10;  // request line + headers + the blank line
  int max_connections = 256;                   // beyond: 503 and close
  // A keep-alive connection with no request under way, or a request that has not fully arrived
  // (headers and body) this long after its first byte, is closed (the latter with a 408). Also
  // the send timeout: a client that stops reading for this long is treated as gone.
  int idle_timeout_ms = 30000;
  // Body of the server's own error responses (400, 404 never - that is the handler's, 408, 411,
  // 413, 431, 500 when a handler fails, 501, 503, 505): given the status and a message.
  // Default (when empty): {"error":{"message":...,"type":...,"code":status}} as JSON, the type
  // being "invalid_request_error" for 4xx and "server_error" for 5xx, as the OpenAI API does.
  std::function<std::string(int status, const std::string& message)> error_body;
  std::string error_content_type = "application/json";  // the Content-Type of those bodies
};

// The default error body described above.
std::string default_http_error_body(int status, const std::string& message);

// The request line and header fields of one request: `block` is everything before the blank
// line that ends them, each line ended by CRLF except the last. Fills request (method, target,
// path, query, version, headers; no body), keep_alive, the body's Content-Length and whether the
// client waits for "100 Continue". Returns 0, or the HTTP status of what is wrong (400, 411,
// 413, 501, 505) with a message. Pure: the server's reader and the fuzz target call it.
int parse_request_head(std::string_view block, size_t max_body_bytes, HttpRequest& request, bool& keep_alive,
                       size_t& length, bool& expect_continue, std::string& message);

class HttpServer {
 public:
  // The handler is called from the connection threads, so concurrently for concurrent
  // connections: it must be thread-safe. It must not call stop() (stop() joins its thread).
  HttpServer(HttpServerOptions options, HttpHandler handler);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and listens (a fathom::Error naming host:port and the system's reason on failure),
  // then starts the accept thread. Call once.
  void start();
  int port() const { return port_; }  // the bound port (the real one when options.port was 0)
  // Stops accepting, shuts down open connections, joins every thread; idempotent. Handlers in
  // the middle of a stream see write() fail and client_gone() turn true; stop() waits for them
  // to return.
  void stop();

 private:
  struct Connection;
  void accept_loop();
  void serve_connection(Connection* connection);
  // Reads one request from fd into request (leftover bytes of a pipelined next request stay in
  // buf). Returns 0 with a request, -1 when the connection should close quietly (the peer left,
  // an idle keep-alive timed out, the server is stopping), or the HTTP status of the error to
  // answer before closing, with its message.
  int read_request(int fd, std::string& buf, HttpRequest& request, bool& keep_alive, std::string& error_message);
  void send_error(int fd, int status, const std::string& message);
  std::string error_body(int status, const std::string& message) const;
  // Joins the threads of connections that have finished (all of them, waiting, when all is set).
  void reap(bool all);

  HttpServerOptions options_;
  HttpHandler handler_;
  int listen_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};  // stop() writes a byte to wake the accept thread from poll()
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::mutex stop_mutex_;  // serializes start()/stop(), so concurrent stop() calls are safe
  bool started_ = false, stopped_ = false;
  std::thread accept_thread_;

  std::mutex mutex_;  // guards connections_ (their fd and done fields) and active_
  std::list<std::unique_ptr<Connection>> connections_;
  int active_ = 0;  // connections whose thread has not finished
};

}  // namespace fathom::serve
