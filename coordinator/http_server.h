// `kvshard serve`: the OpenAI-compatible HTTP API over an Engine (civetweb does the HTTP).
//
//   POST /v1/completions, POST /v1/chat/completions   JSON, or Server-Sent Events with "stream": true
//                                                     (ending with "data: [DONE]")
//   GET  /v1/models, GET /v1/models/{id}              the served model
//   GET  /health                                      liveness; never needs the API key
//
// Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with its HTTP status.
// Requests run on the engine from a scheduler (coordinator/scheduler.h: as many at once as the engine
// batches); at most max_queue wait, and the next one gets 429.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/civet_listener.h"
#include "coordinator/engine.h"
#include "coordinator/metrics.h"
#include "coordinator/openai_api.h"

struct mg_connection;
struct mg_request_info;

namespace kvshard {

class RequestScheduler;

struct ServeOptions {
  std::string host = "127.0.0.1";  // loopback unless told otherwise
  int port = 8000;                 // 0: any free port
  std::string metrics_host = "127.0.0.1";
  int metrics_port = 9400;         // 0: any free port; negative: no metrics endpoint
  std::string api_key;             // empty: no key needed
  int64_t max_body_bytes = int64_t{64} << 20;
  int max_queue = 64;              // requests waiting while others run; more get 429
  int http_threads = 0;            // connections served at once; 0: max_queue + running + 8
  ApiOptions api;
};

// Compares a presented secret with the expected one in time that depends only on the expected
// secret's length, so response timing does not reveal how many leading bytes matched.
bool ConstantTimeEquals(std::string_view presented, std::string_view expected);

class HttpServer {
 public:
  // Listens and serves until Stop(). `metrics` may be null; it must outlive the server.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(Engine& engine, const ServeOptions& options,
                                                           ServingMetrics* metrics);
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const { return listener_->port(); }
  // Fails waiting requests, cancels the running one, finishes the open connections. Idempotent.
  void Stop();

 private:
  HttpServer(Engine& engine, const ServeOptions& options, ServingMetrics* metrics);
  int Handle(mg_connection* conn);
  int Dispatch(mg_connection* conn, const mg_request_info& info, const std::string& path);
  int HandleGeneration(mg_connection* conn, const mg_request_info& info, ApiEndpoint endpoint);
  int StreamResponse(mg_connection* conn, const mg_request_info& info, const ApiRequest& request);
  absl::Status CheckApiKey(const mg_request_info& info) const;
  absl::StatusOr<std::string> ReadBody(mg_connection* conn, const mg_request_info& info) const;

  Engine& engine_;
  ServeOptions options_;
  ServingMetrics* metrics_;
  std::unique_ptr<RequestScheduler> scheduler_;
  std::unique_ptr<CivetListener> listener_;
  int64_t started_at_ = 0;  // unix seconds, reported as the model's "created"
};

// Starts the metrics endpoint (unless metrics_port < 0) and the HTTP server, prints where they listen
// on stderr, and serves until SIGINT or SIGTERM. A second signal during shutdown ends the process.
absl::Status RunServe(Engine& engine, const ServeOptions& options);

}  // namespace kvshard
