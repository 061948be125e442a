#include "coordinator/civet_listener.h"

#include <cstdio>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "civetweb.h"

namespace kvshard {
namespace {

int LogMessage(const mg_connection*, const char* message) {
  std::fprintf(stderr, "kvshard: http: %s\n", message);
  return 1;
}

}  // namespace

std::string HostPort(const std::string& host, int port) {
  if (host.find(':') != std::string::npos) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host, ":", port);
}

absl::StatusOr<std::unique_ptr<CivetListener>> CivetListener::Start(const std::string& host, int port,
                                                                    int threads, Handler handler) {
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("port must be in [0, 65535]; got ", port));
  }
  std::unique_ptr<CivetListener> listener(new CivetListener(std::move(handler)));
  const std::string ports = HostPort(host, port);
  const std::string threads_text = std::to_string(threads);
  const char* options[] = {"listening_ports", ports.c_str(), "num_threads", threads_text.c_str(),
                           "enable_keep_alive", "no", nullptr};
  mg_callbacks callbacks;
  std::memset(&callbacks, 0, sizeof(callbacks));
  callbacks.log_message = &LogMessage;
  mg_init_library(0);
  listener->context_ = mg_start(&callbacks, listener.get(), options);
  if (listener->context_ == nullptr) {
    mg_exit_library();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", ports, " (see the message above)"));
  }
  mg_set_request_handler(listener->context_, "/", &CivetListener::HandleThunk, listener.get());
  mg_server_port listening[4];
  const int n = mg_get_server_ports(listener->context_, 4, listening);
  listener->port_ = n > 0 ? listening[0].port : port;
  return listener;
}

CivetListener::~CivetListener() { Stop(); }

void CivetListener::Stop() {
  if (context_ == nullptr) return;
  mg_stop(context_);
  context_ = nullptr;
  mg_exit_library();
}

int CivetListener::HandleThunk(mg_connection* conn, void* self) {
  int status = 500;
  std::thread([&] { status = static_cast<CivetListener*>(self)->handler_(conn); }).join();
  return status;
}

void SendHttpResponse(mg_connection* conn, int status, const char* content_type, std::string_view body,
                      const std::vector<std::pair<const char*, std::string>>& extra_headers) {
  mg_response_header_start(conn, status);
  mg_response_header_add(conn, "Content-Type", content_type, -1);
  mg_response_header_add(conn, "Content-Length", std::to_string(body.size()).c_str(), -1);
  for (const auto& [name, value] : extra_headers) mg_response_header_add(conn, name, value.c_str(), -1);
  mg_response_header_send(conn);
  mg_write(conn, body.data(), body.size());
}

}  // namespace kvshard
