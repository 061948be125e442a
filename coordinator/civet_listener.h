// A civetweb HTTP listener whose requests are handled on threads with full-size stacks.
//
// civetweb's worker threads have stacks of about 100 KB, and the static TLS of every loaded library
// lives there too (OpenBLAS alone takes 60 KB), which leaves too little even for civetweb's own
// formatted writes. Each request is therefore handled on a thread of its own while the civetweb thread
// waits; nothing else touches the connection meanwhile.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

struct mg_connection;
struct mg_context;

namespace kvshard {

class CivetListener {
 public:
  // Returns the HTTP status it answered with (for the access count).
  using Handler = std::function<int(mg_connection* conn)>;

  // Listens on host:port (port 0: any free port) with `threads` connections served at once.
  static absl::StatusOr<std::unique_ptr<CivetListener>> Start(const std::string& host, int port, int threads,
                                                              Handler handler);
  ~CivetListener();  // Stop()
  CivetListener(const CivetListener&) = delete;
  CivetListener& operator=(const CivetListener&) = delete;

  int port() const { return port_; }
  // Stops listening and waits for the open requests to finish. Idempotent.
  void Stop();

 private:
  explicit CivetListener(Handler handler) : handler_(std::move(handler)) {}
  static int HandleThunk(mg_connection* conn, void* self);

  Handler handler_;
  mg_context* context_ = nullptr;
  int port_ = 0;
};

// "host:port", with an IPv6 host in brackets.
std::string HostPort(const std::string& host, int port);

// Sends a complete response with Content-Type and Content-Length.
void SendHttpResponse(mg_connection* conn, int status, const char* content_type, std::string_view body,
                      const std::vector<std::pair<const char*, std::string>>& extra_headers = {});

}  // namespace kvshard
