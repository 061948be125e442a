#include "coordinator/http_server.h"

#include <semaphore.h>
#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "civetweb.h"
#include "common/status.h"
#include "coordinator/scheduler.h"

namespace kvshard {
namespace {

using nlohmann::json;

// A streamed response sends an SSE comment this often while nothing else happens (a long prefill), so
// proxies keep the connection and a client that left is noticed.
constexpr std::chrono::milliseconds kStreamKeepAlive{10000};
// After a body over the limit, at most this much more is read and discarded so that the client sees the
// 413 instead of a reset connection.
constexpr int64_t kMaxDrainBytes = int64_t{16} << 20;
constexpr size_t kReadChunkBytes = size_t{1} << 16;

void SendJson(mg_connection* conn, int status, const json& body,
              const std::vector<std::pair<const char*, std::string>>& extra_headers = {}) {
  SendHttpResponse(conn, status, "application/json", DumpJson(body), extra_headers);
}

int SendError(mg_connection* conn, const absl::Status& status) {
  HttpError error = ToHttpError(status);
  std::vector<std::pair<const char*, std::string>> headers;
  if (error.http_status == 401) headers.push_back({"WWW-Authenticate", "Bearer"});
  if (error.http_status == 429) headers.push_back({"Retry-After", "1"});
  SendJson(conn, error.http_status, error.body, headers);
  return error.http_status;
}

int SendMethodNotAllowed(mg_connection* conn, const std::string& method, const std::string& path,
                         const char* allowed) {
  absl::Status status = ApiError(absl::StatusCode::kInvalidArgument,
                                 absl::StrCat(method, " is not allowed on ", path, "; use ", allowed), {},
                                 "method_not_allowed", 405);
  HttpError error = ToHttpError(status);
  SendJson(conn, error.http_status, error.body, {{"Allow", allowed}});
  return error.http_status;
}

// The metrics label for a path: the known endpoints, else "other" (no unbounded label values).
std::string EndpointLabel(const std::string& path) {
  for (const char* known : {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}) {
    if (path == known) return known;
  }
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models";
  return "other";
}

}  // namespace

bool ConstantTimeEquals(std::string_view presented, std::string_view expected) {
  // Loop over the expected secret only; a shorter or longer presented value is read as zero bytes.
  volatile unsigned char diff = presented.size() != expected.size() ? 1 : 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char p = i < presented.size() ? static_cast<unsigned char>(presented[i]) : 0;
    diff = diff | (p ^ static_cast<unsigned char>(expected[i]));
  }
  return diff == 0;
}

HttpServer::HttpServer(Engine& engine, const ServeOptions& options, ServingMetrics* metrics)
    : engine_(engine), options_(options), metrics_(metrics), started_at_(UnixSeconds()) {}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(Engine& engine, const ServeOptions& options,
                                                              ServingMetrics* metrics) {
  if (options.max_queue < 1) return absl::InvalidArgumentError("max_queue must be at least 1");
  if (options.max_body_bytes < 1) return absl::InvalidArgumentError("max_body_bytes must be at least 1");
  std::unique_ptr<HttpServer> server(new HttpServer(engine, options, metrics));
  server->scheduler_ = std::make_unique<RequestScheduler>(engine, options.max_queue, metrics);
  // Every waiting and running request holds a connection, and a few more answer /health and refusals.
  const int threads =
      options.http_threads > 0 ? options.http_threads : options.max_queue + engine.max_concurrent_requests() + 8;
  HttpServer* self = server.get();
  KV_ASSIGN_OR_RETURN(server->listener_,
                      CivetListener::Start(options.host, options.port, threads,
                                           [self](mg_connection* conn) { return self->Handle(conn); }));
  return server;
}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  // Ending the queued and running requests first lets the listener's wait for open requests end soon.
  if (scheduler_) scheduler_->Shutdown();
  if (listener_) listener_->Stop();
}

int HttpServer::Handle(mg_connection* conn) {
  const mg_request_info* info = mg_get_request_info(conn);
  const std::string path = info->local_uri != nullptr ? info->local_uri : "";
  int status = 500;
  try {
    status = Dispatch(conn, *info, path);
  } catch (const std::exception& e) {
    // Nothing below throws by design; a bug still answers instead of taking the server down.
    status = SendError(conn, absl::InternalError(absl::StrCat("internal error: ", e.what())));
  }
  if (metrics_ != nullptr) metrics_->CountResponse(EndpointLabel(path), status);
  return status;
}

int HttpServer::Dispatch(mg_connection* conn, const mg_request_info& info, const std::string& path) {
  const std::string method = info.request_method != nullptr ? info.request_method : "";
  if (path == "/health") {
    if (method != "GET" && method != "HEAD") return SendMethodNotAllowed(conn, method, path, "GET");
    SendJson(conn, 200, json{{"status", "ok"}, {"model", AcceptedModelNames(engine_, options_.api).front()},
                             {"requests_waiting", scheduler_->waiting()}});
    return 200;
  }
  if (path.rfind("/v1/", 0) != 0) {
    return SendError(conn, ApiError(absl::StatusCode::kNotFound, absl::StrCat("no such path: ", path), {},
                                    "not_found"));
  }
  if (absl::Status auth = CheckApiKey(info); !auth.ok()) return SendError(conn, auth);

  if (std::optional<ApiEndpoint> endpoint = EndpointFromPath(path)) {
    if (method != "POST") return SendMethodNotAllowed(conn, method, path, "POST");
    return HandleGeneration(conn, info, *endpoint);
  }
  if (path == "/v1/models" || path.rfind("/v1/models/", 0) == 0) {
    if (method != "GET") return SendMethodNotAllowed(conn, method, path, "GET");
    const std::vector<std::string> names = AcceptedModelNames(engine_, options_.api);
    auto model_json = [&](const std::string& name) {
      return json{{"id", name},
                  {"object", "model"},
                  {"created", started_at_},
                  {"owned_by", "kvshard"},
                  {"max_model_len", engine_.max_context()}};
    };
    if (path == "/v1/models") {
      json data = json::array();
      for (const std::string& name : names) data.push_back(model_json(name));
      SendJson(conn, 200, json{{"object", "list"}, {"data", std::move(data)}});
      return 200;
    }
    const std::string id = path.substr(std::strlen("/v1/models/"));
    if (std::find(names.begin(), names.end(), id) == names.end()) {
      return SendError(conn, ApiError(absl::StatusCode::kNotFound,
                                      absl::StrCat("The model `", id, "` does not exist"), "model",
                                      "model_not_found"));
    }
    SendJson(conn, 200, model_json(id));
    return 200;
  }
  return SendError(conn,
                   ApiError(absl::StatusCode::kNotFound, absl::StrCat("no such path: ", path), {}, "not_found"));
}

absl::Status HttpServer::CheckApiKey(const mg_request_info& info) const {
  if (options_.api_key.empty()) return absl::OkStatus();
  const char* header = nullptr;
  for (int i = 0; i < info.num_headers; ++i) {
    if (absl::EqualsIgnoreCase(info.http_headers[i].name, "Authorization")) header = info.http_headers[i].value;
  }
  if (header == nullptr) {
    return ApiError(absl::StatusCode::kUnauthenticated,
                    "no API key given; send it as \"Authorization: Bearer KEY\"", {}, "missing_api_key");
  }
  const absl::string_view value = absl::StripAsciiWhitespace(header);
  constexpr absl::string_view kBearer = "bearer ";
  absl::string_view presented;
  if (value.size() > kBearer.size() && absl::EqualsIgnoreCase(value.substr(0, kBearer.size()), kBearer)) {
    presented = absl::StripLeadingAsciiWhitespace(value.substr(kBearer.size()));
  }
  if (!ConstantTimeEquals(std::string_view(presented.data(), presented.size()), options_.api_key)) {
    return ApiError(absl::StatusCode::kUnauthenticated, "incorrect API key", {}, "invalid_api_key");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> HttpServer::ReadBody(mg_connection* conn, const mg_request_info& info) const {
  const int64_t limit = options_.max_body_bytes;
  auto too_large = [&]() {
    // Read on a little so the client, still sending, gets to see the answer.
    std::vector<char> sink(kReadChunkBytes);
    int64_t drained = 0;
    while (drained < kMaxDrainBytes) {
      const int n = mg_read(conn, sink.data(), sink.size());
      if (n <= 0) break;
      drained += n;
    }
    return ApiError(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("the request body is larger than max_body_bytes (", limit, " bytes)"), {},
                    "request_too_large", 413);
  };
  if (info.content_length > limit) return too_large();
  std::string body;
  if (info.content_length > 0) body.reserve(static_cast<size_t>(info.content_length));
  std::vector<char> buffer(kReadChunkBytes);
  while (true) {
    const int n = mg_read(conn, buffer.data(), buffer.size());
    if (n < 0) return absl::InvalidArgumentError("reading the request body failed");
    if (n == 0) break;
    if (static_cast<int64_t>(body.size()) + n > limit) return too_large();
    body.append(buffer.data(), static_cast<size_t>(n));
  }
  if (info.content_length >= 0 && static_cast<int64_t>(body.size()) != info.content_length) {
    return absl::InvalidArgumentError("the request body ended before its Content-Length");
  }
  return body;
}

int HttpServer::HandleGeneration(mg_connection* conn, const mg_request_info& info, ApiEndpoint endpoint) {
  absl::StatusOr<std::string> body = ReadBody(conn, info);
  if (!body.ok()) return SendError(conn, body.status());
  absl::StatusOr<json> parsed = ParseJsonBody(*body);
  if (!parsed.ok()) return SendError(conn, parsed.status());
  absl::StatusOr<ApiRequest> request = ParseApiRequest(endpoint, *parsed, engine_, options_.api);
  if (!request.ok()) return SendError(conn, request.status());
  if (request->stream) return StreamResponse(conn, info, *request);

  absl::StatusOr<std::shared_ptr<RequestTicket>> ticket = scheduler_->Submit(*request);
  if (!ticket.ok()) return SendError(conn, ticket.status());
  const absl::StatusOr<GenerationOutcome>& outcome = (*ticket)->Wait();
  if (!outcome.ok()) return SendError(conn, outcome.status());
  SendJson(conn, 200, MakeResponseBody(*request, *outcome, NewResponseId(endpoint), UnixSeconds()));
  return 200;
}

int HttpServer::StreamResponse(mg_connection* conn, const mg_request_info& info, const ApiRequest& request) {
  absl::StatusOr<std::shared_ptr<RequestTicket>> submitted = scheduler_->Submit(request);
  if (!submitted.ok()) return SendError(conn, submitted.status());
  RequestTicket& ticket = **submitted;

  // HTTP/1.1 clients get chunked encoding; older ones a body that ends when the connection closes.
  const bool chunked = info.http_version != nullptr && std::string_view(info.http_version) == "1.1";
  mg_response_header_start(conn, 200);
  mg_response_header_add(conn, "Content-Type", "text/event-stream; charset=utf-8", -1);
  mg_response_header_add(conn, "Cache-Control", "no-cache", -1);
  mg_response_header_add(conn, "X-Accel-Buffering", "no", -1);
  if (chunked) mg_response_header_add(conn, "Transfer-Encoding", "chunked", -1);
  mg_response_header_send(conn);
  auto write = [&](std::string_view data) {
    if (chunked) return mg_send_chunk(conn, data.data(), static_cast<unsigned>(data.size())) >= 0;
    return mg_write(conn, data.data(), data.size()) == static_cast<int>(data.size());
  };

  const StreamChunks chunks(request, NewResponseId(request.endpoint), UnixSeconds());
  bool connected = true;
  if (std::optional<json> opening = chunks.Opening()) connected = write(SseEvent(*opening));
  std::string text;
  while (connected) {
    const RequestTicket::Event event = ticket.WaitNext(&text, kStreamKeepAlive);
    if (event == RequestTicket::Event::kDone) break;
    connected = event == RequestTicket::Event::kText ? write(SseEvent(chunks.Text(text)))
                                                     : write(": keep-alive\n\n");
  }
  if (!connected) {
    ticket.Cancel();
    return 200;  // the status line went out already
  }
  const absl::StatusOr<GenerationOutcome>& outcome = ticket.outcome();
  if (outcome.ok()) {
    for (const json& chunk : chunks.Closing(*outcome)) write(SseEvent(chunk));
  } else {
    // Once the stream has begun, OpenAI reports a failure as an event carrying the error object.
    write(SseEvent(ToHttpError(outcome.status()).body));
  }
  write(kSseDone);
  if (chunked) mg_send_chunk(conn, "", 0);
  return 200;
}

// ---- RunServe -----------------------------------------------------------------------------------

namespace {

sem_t g_stop_signal;
volatile sig_atomic_t g_signal_count = 0;

void OnStopSignal(int signo) {
  g_signal_count = g_signal_count + 1;
  if (g_signal_count > 1) {
    // A second signal while shutting down: stop now.
    signal(signo, SIG_DFL);
    raise(signo);
    return;
  }
  sem_post(&g_stop_signal);  // async-signal-safe
}

}  // namespace

absl::Status RunServe(Engine& engine, const ServeOptions& options) {
  std::unique_ptr<ServingMetrics> metrics;
  if (options.metrics_port >= 0) {
    KV_ASSIGN_OR_RETURN(metrics, ServingMetrics::Start(options.metrics_host, options.metrics_port));
  }
  KV_ASSIGN_OR_RETURN(std::unique_ptr<HttpServer> server, HttpServer::Start(engine, options, metrics.get()));

  sem_init(&g_stop_signal, 0, 0);
  g_signal_count = 0;
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_handler = &OnStopSignal;
  sigemptyset(&action.sa_mask);
  struct sigaction previous_int, previous_term;
  sigaction(SIGINT, &action, &previous_int);
  sigaction(SIGTERM, &action, &previous_term);

  const std::string model = AcceptedModelNames(engine, options.api).front();
  std::fprintf(stderr, "kvshard serve: model %s, context %lld tokens\n", model.c_str(),
               static_cast<long long>(engine.max_context()));
  std::fprintf(stderr, "kvshard serve: listening on http://%s/v1\n",
               HostPort(options.host, server->port()).c_str());
  if (metrics) {
    std::fprintf(stderr, "kvshard serve: metrics on http://%s/metrics\n",
                 HostPort(options.metrics_host, metrics->port()).c_str());
  }
  std::fflush(stderr);

  while (sem_wait(&g_stop_signal) != 0 && errno == EINTR) {
  }
  std::fprintf(stderr, "kvshard serve: shutting down\n");
  server->Stop();
  server.reset();
  metrics.reset();
  sigaction(SIGINT, &previous_int, nullptr);
  sigaction(SIGTERM, &previous_term, nullptr);
  sem_destroy(&g_stop_signal);
  return absl::OkStatus();
}

}  // namespace kvshard
