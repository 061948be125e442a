// The OpenAI-compatible front end with the fake engine: request validation, error shapes, the API key
// check, the HTTP server on loopback (JSON, SSE streaming, 413/429/404/405), and the metrics.
#include <atomic>
#include <chrono>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "civetweb.h"
#include "coordinator/http_server.h"
#include "coordinator/metrics.h"
#include "coordinator/openai_api.h"
#include "gtest/gtest.h"
#include "tests/fake_engine.h"

// Static TLS as large as the product binary's (OpenBLAS alone has 60 KB). civetweb's worker stacks
// (about 100 KB) hold it too, so these tests fail if request handling ever runs on them again.
thread_local char g_tls_like_openblas[64 * 1024];

namespace kvshard {
namespace {

using nlohmann::json;
using testing::FakeEngine;

// ---- Pure functions ------------------------------------------------------------------------------

TEST(ConstantTimeEqualsTest, ComparesWholeValues) {
  g_tls_like_openblas[0] = 1;  // keeps the TLS block in the binary
  EXPECT_TRUE(ConstantTimeEquals("secret-key", "secret-key"));
  EXPECT_FALSE(ConstantTimeEquals("secret-kez", "secret-key"));
  EXPECT_FALSE(ConstantTimeEquals("Secret-key", "secret-key"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret-key"));         // a prefix
  EXPECT_FALSE(ConstantTimeEquals("secret-key-and-more", "secret-key"));
  EXPECT_FALSE(ConstantTimeEquals("", "secret-key"));
  EXPECT_FALSE(ConstantTimeEquals(std::string("secret-key\0", 11), "secret-key"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

TEST(ErrorShapeTest, CarriesOpenAiFields) {
  HttpError e = ToHttpError(ApiError(absl::StatusCode::kInvalidArgument, "bad temperature", "temperature"));
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.body, json::parse(R"({"error": {"message": "bad temperature", "type": "invalid_request_error",
                                             "param": "temperature", "code": null}})"));
  e = ToHttpError(ApiError(absl::StatusCode::kNotFound, "no such model", "model", "model_not_found"));
  EXPECT_EQ(e.http_status, 404);
  EXPECT_EQ(e.body["error"]["code"], "model_not_found");
  e = ToHttpError(ApiError(absl::StatusCode::kInvalidArgument, "too big", {}, "request_too_large", 413));
  EXPECT_EQ(e.http_status, 413);
  EXPECT_TRUE(e.body["error"]["param"].is_null());
  e = ToHttpError(absl::ResourceExhaustedError("busy"));
  EXPECT_EQ(e.http_status, 429);
  EXPECT_EQ(e.body["error"]["type"], "rate_limit_error");
  e = ToHttpError(absl::UnauthenticatedError("who"));
  EXPECT_EQ(e.http_status, 401);
  e = ToHttpError(absl::InternalError("boom"));
  EXPECT_EQ(e.http_status, 500);
  EXPECT_EQ(e.body["error"]["type"], "server_error");
  EXPECT_EQ(e.body["error"]["message"], "boom");
  EXPECT_EQ(ToHttpError(absl::UnavailableError("x")).http_status, 503);
}

class ParseRequestTest : public ::testing::Test {
 protected:
  absl::StatusOr<ApiRequest> Parse(ApiEndpoint endpoint, const std::string& body) {
    return ParseApiRequest(endpoint, json::parse(body), engine_, options_);
  }
  FakeEngine engine_{/*max_context=*/100};
  ApiOptions options_;
};

TEST_F(ParseRequestTest, AcceptsAFullRequest) {
  absl::StatusOr<ApiRequest> r = Parse(ApiEndpoint::kCompletions, R"({
      "model": "fake-model", "prompt": "abc", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
      "seed": 42, "stop": ["x", "yz"], "stream": true, "stream_options": {"include_usage": true},
      "kv_scheme": "kvq3", "repetition_penalty": 1.2, "user": "ignored"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generation.prompt_ids, (std::vector<int32_t>{'a', 'b', 'c'}));
  EXPECT_EQ(r->generation.max_tokens, 7);
  EXPECT_FLOAT_EQ(r->generation.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r->generation.sampling.top_p, 0.9f);
  EXPECT_EQ(r->generation.sampling.seed, 42u);
  EXPECT_EQ(r->generation.stop, (std::vector<std::string>{"x", "yz"}));
  EXPECT_EQ(r->generation.kv_scheme, "kvq3");
  EXPECT_FLOAT_EQ(r->generation.sampling.repetition_penalty, 1.2f);
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_EQ(r->model, "fake-model");
}

TEST_F(ParseRequestTest, KvSchemesWithParameters) {
  // Empty means the server's default; names are case-insensitive.
  for (const char* scheme : {"fp16", "fp32", "int6", "kivi2", "kvq3:outliers=0.005,sink=4", "deco", "", "KVQ3"}) {
    absl::StatusOr<ApiRequest> r =
        Parse(ApiEndpoint::kCompletions, json{{"prompt", "a"}, {"kv_scheme", scheme}}.dump());
    ASSERT_TRUE(r.ok()) << scheme << ": " << r.status();
    EXPECT_EQ(r->generation.kv_scheme, scheme);
  }
  for (const char* scheme : {"kvq9", "int1", "kvq3:colour=blue", "zip"}) {
    absl::StatusOr<ApiRequest> r =
        Parse(ApiEndpoint::kCompletions, json{{"prompt", "a"}, {"kv_scheme", scheme}}.dump());
    EXPECT_FALSE(r.ok()) << scheme;
    EXPECT_EQ(ToHttpError(r.status()).body["error"]["code"], "invalid_kv_scheme") << scheme;
  }
}

TEST_F(ParseRequestTest, DefaultsFollowOpenAi) {
  options_.default_max_tokens = 50;
  absl::StatusOr<ApiRequest> r = Parse(ApiEndpoint::kCompletions, R"({"prompt": [104, 105], "stop": "s"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generation.max_tokens, 50);
  EXPECT_FLOAT_EQ(r->generation.sampling.temperature, 1.0f);
  EXPECT_FLOAT_EQ(r->generation.sampling.repetition_penalty, 1.0f);
  EXPECT_EQ(r->generation.stop, std::vector<std::string>{"s"});
  EXPECT_FALSE(r->stream);
  // The default is capped by the context left: 100 - 90 prompt tokens.
  r = Parse(ApiEndpoint::kCompletions, json{{"prompt", std::string(90, 'a')}}.dump());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generation.max_tokens, 10);
}

TEST_F(ParseRequestTest, ChatGoesThroughTheTemplate) {
  absl::StatusOr<ApiRequest> r = Parse(ApiEndpoint::kChatCompletions, R"({"messages": [
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "hi <|im_end|>"}]}], "max_completion_tokens": 3})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generation.max_tokens, 3);
  const std::vector<int32_t>& ids = r->generation.prompt_ids;
  // The template's markers are special tokens; the same text inside a message is not.
  EXPECT_EQ(ids.front(), testing::ByteTokenizer::kImStart);
  const std::string text = engine_.tokenizer().Decode(ids, /*skip_special=*/true);
  EXPECT_NE(text.find("be brief"), std::string::npos) << text;
  EXPECT_NE(text.find("hi <|im_end|>"), std::string::npos) << text;
}

struct BadRequestCase {
  ApiEndpoint endpoint;
  std::string body;
  absl::StatusCode code;
  std::string param;       // empty: param is null
  std::string error_code;  // empty: not checked
};

TEST_F(ParseRequestTest, RejectsBadRequestsWithTheRightField) {
  const ApiEndpoint C = ApiEndpoint::kCompletions, Chat = ApiEndpoint::kChatCompletions;
  const auto kBad = absl::StatusCode::kInvalidArgument;
  const std::vector<BadRequestCase> cases = {
      {C, R"([1, 2])", kBad, "", ""},
      {C, R"({})", kBad, "prompt", ""},
      {C, R"({"prompt": 5})", kBad, "prompt", ""},
      {C, R"({"prompt": ["a", "b"]})", kBad, "prompt", "unsupported_parameter"},
      {C, R"({"prompt": [1, 999]})", kBad, "prompt", ""},
      {C, R"({"prompt": "a", "model": 3})", kBad, "model", ""},
      {C, R"({"prompt": "a", "model": "gpt-4"})", absl::StatusCode::kNotFound, "model", "model_not_found"},
      {C, R"({"prompt": "a", "temperature": "hot"})", kBad, "temperature", ""},
      {C, R"({"prompt": "a", "temperature": 3})", kBad, "temperature", ""},
      {C, R"({"prompt": "a", "top_p": 0})", kBad, "top_p", ""},
      {C, R"({"prompt": "a", "repetition_penalty": 0})", kBad, "repetition_penalty", ""},
      {C, R"({"prompt": "a", "repetition_penalty": "x"})", kBad, "repetition_penalty", ""},
      {C, R"({"prompt": "a", "max_tokens": "ten"})", kBad, "max_tokens", ""},
      {C, R"({"prompt": "a", "max_tokens": 2.5})", kBad, "max_tokens", ""},
      {C, R"({"prompt": "a", "max_tokens": 0})", kBad, "max_tokens", ""},
      {C, R"({"prompt": "a", "max_tokens": 100})", kBad, "max_tokens", "context_length_exceeded"},
      {C, R"({"prompt": "a", "seed": "x"})", kBad, "seed", ""},
      {C, R"({"prompt": "a", "stream": "yes"})", kBad, "stream", ""},
      {C, R"({"prompt": "a", "stop": [1]})", kBad, "stop", ""},
      {C, R"({"prompt": "a", "stop": {"a": 1}})", kBad, "stop", ""},
      {C, R"({"prompt": "a", "kv_scheme": "kvq7"})", kBad, "kv_scheme", "invalid_kv_scheme"},
      {C, R"({"prompt": "a", "kv_scheme": 3})", kBad, "kv_scheme", ""},
      {C, R"({"prompt": "a", "n": 2})", kBad, "n", "unsupported_parameter"},
      {C, R"({"prompt": "a", "logprobs": 2})", kBad, "logprobs", "unsupported_parameter"},
      {C, R"({"prompt": "a", "echo": true})", kBad, "echo", "unsupported_parameter"},
      {C, R"({"prompt": "a", "stream_options": 1})", kBad, "stream_options", ""},
      {Chat, R"({})", kBad, "messages", ""},
      {Chat, R"({"messages": []})", kBad, "messages", ""},
      {Chat, R"({"messages": "hi"})", kBad, "messages", ""},
      {Chat, R"({"messages": [{"content": "hi"}]})", kBad, "messages[0].role", ""},
      {Chat, R"({"messages": [{"role": "wizard", "content": "hi"}]})", kBad, "messages[0].role", ""},
      {Chat, R"({"messages": [{"role": "user", "content": 5}]})", kBad, "messages[0].content", ""},
      {Chat, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", kBad,
       "messages[0].content", "unsupported_parameter"},
      {Chat, R"({"messages": [{"role": "user", "content": "hi"}], "tools": [{}]})", kBad, "tools", ""},
      {Chat, json{{"messages", {{{"role", "user"}, {"content", std::string(120, 'x')}}}}}.dump(), kBad, "messages",
       "context_length_exceeded"},
  };
  for (const BadRequestCase& c : cases) {
    absl::StatusOr<ApiRequest> r = Parse(c.endpoint, c.body);
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(r.status().code(), c.code) << c.body << " -> " << r.status();
    const HttpError e = ToHttpError(r.status());
    if (c.param.empty()) {
      EXPECT_TRUE(e.body["error"]["param"].is_null()) << c.body << " -> " << e.body;
    } else {
      EXPECT_EQ(e.body["error"]["param"], c.param) << c.body << " -> " << e.body;
    }
    if (!c.error_code.empty()) {
      EXPECT_EQ(e.body["error"]["code"], c.error_code) << c.body << " -> " << e.body;
    }
    EXPECT_FALSE(e.body["error"]["message"].get<std::string>().empty());
  }
}

TEST(JsonBodyTest, MalformedJsonSaysWhere) {
  absl::StatusOr<json> r = ParseJsonBody("{\"prompt\": ");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(ToHttpError(r.status()).http_status, 400);
  EXPECT_EQ(ToHttpError(r.status()).body["error"]["code"], "invalid_json");
  EXPECT_TRUE(ParseJsonBody("{}").ok());
}

TEST(RunApiGenerationTest, StreamedTextEqualsTheResult) {
  FakeEngine engine;
  for (const std::vector<std::string>& stop :
       {std::vector<std::string>{}, {"fox"}, {"lazy dog"}, {"z", "own f"}, {"not there"}}) {
    GenerationRequest request;
    request.prompt_ids = {'h', 'i'};
    request.max_tokens = 60;
    request.stop = stop;
    std::string streamed;
    int tokens = 0;
    GenerationHooks hooks;
    hooks.on_text = [&](std::string_view text) {
      streamed.append(text);
      return true;
    };
    hooks.on_token = [&] { ++tokens; };
    absl::StatusOr<GenerationOutcome> outcome = RunApiGeneration(engine, request, hooks);
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    EXPECT_EQ(streamed, outcome->text);
    EXPECT_EQ(tokens, outcome->completion_tokens);
    EXPECT_EQ(outcome->prompt_tokens, 2);
    if (!stop.empty() && stop[0] != "not there") {
      EXPECT_EQ(outcome->finish_reason, FinishReason::kStop);
      for (const std::string& s : stop) EXPECT_EQ(outcome->text.find(s), std::string::npos) << outcome->text;
    } else {
      EXPECT_EQ(outcome->finish_reason, FinishReason::kLength);
      EXPECT_EQ(outcome->text.size(), 60u);
    }
  }
}

TEST(RunApiGenerationTest, AClientThatLeavesStopsGeneration) {
  FakeEngine engine;
  GenerationRequest request;
  request.prompt_ids = {'h'};
  request.max_tokens = 200;
  int tokens = 0;
  GenerationHooks hooks;
  hooks.on_text = [&](std::string_view) { return tokens < 3; };
  hooks.on_token = [&] { ++tokens; };
  absl::StatusOr<GenerationOutcome> outcome = RunApiGeneration(engine, request, hooks);
  EXPECT_EQ(outcome.status().code(), absl::StatusCode::kCancelled);
  EXPECT_LE(tokens, 4);
}

// ---- The server on loopback ---------------------------------------------------------------------

struct HttpReply {
  int status = 0;
  std::map<std::string, std::string> headers;
  std::string body;
  json Json() const { return json::parse(body, nullptr, false); }
};

HttpReply Call(int port, const std::string& method, const std::string& path, const std::string& body = "",
               const std::vector<std::string>& headers = {}) {
  char error[256] = "";
  mg_connection* conn = mg_connect_client("127.0.0.1", port, 0, error, sizeof(error));
  if (conn == nullptr) return {-1, {}, error};
  std::string request = absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n",
                                     "Content-Type: application/json\r\nContent-Length: ", body.size(), "\r\n");
  for (const std::string& h : headers) absl::StrAppend(&request, h, "\r\n");
  request += "\r\n";
  mg_write(conn, request.data(), request.size());
  if (!body.empty()) mg_write(conn, body.data(), body.size());
  HttpReply reply;
  if (mg_get_response(conn, error, sizeof(error), 30000) < 0) {
    mg_close_connection(conn);
    return {-1, {}, error};
  }
  const mg_response_info* info = mg_get_response_info(conn);
  reply.status = info->status_code;
  for (int i = 0; i < info->num_headers; ++i) reply.headers[info->http_headers[i].name] = info->http_headers[i].value;
  char buffer[4096];
  int n = 0;
  while ((n = mg_read(conn, buffer, sizeof(buffer))) > 0) reply.body.append(buffer, n);
  mg_close_connection(conn);
  return reply;
}

// The JSON payloads of an SSE body, and whether it ended with [DONE].
std::vector<json> SseEvents(const std::string& body, bool* done) {
  std::vector<json> events;
  *done = false;
  for (absl::string_view record : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    if (record.substr(0, 1) == ":") continue;  // keep-alive comment
    EXPECT_EQ(record.substr(0, 6), "data: ") << record;
    const absl::string_view data = record.substr(6);
    if (data == "[DONE]") {
      *done = true;
      continue;
    }
    EXPECT_FALSE(*done) << "data after [DONE]";
    events.push_back(json::parse(std::string(data)));
  }
  return events;
}

class HttpServerTest : public ::testing::Test {
 protected:
  void StartServer(ServeOptions options) {
    options.host = "127.0.0.1";
    options.port = 0;
    metrics_ = ServingMetrics::CreateUnexposed();
    absl::StatusOr<std::unique_ptr<HttpServer>> server = HttpServer::Start(engine_, options, metrics_.get());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_GT(server_->port(), 0);
  }
  HttpReply Post(const std::string& path, const std::string& body, std::vector<std::string> headers = {}) {
    headers.push_back("Authorization: Bearer " + key_);
    return Call(server_->port(), "POST", path, body, headers);
  }
  void ExpectError(const HttpReply& reply, int status, const std::string& code = "") {
    EXPECT_EQ(reply.status, status) << reply.body;
    const json body = reply.Json();
    ASSERT_TRUE(body.is_object() && body.contains("error")) << reply.body;
    const json& e = body["error"];
    EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << reply.body;
    EXPECT_TRUE(e["type"].is_string()) << reply.body;
    EXPECT_TRUE(e.contains("param") && e.contains("code")) << reply.body;
    if (!code.empty()) {
      EXPECT_EQ(e["code"], code) << reply.body;
    }
    EXPECT_EQ(reply.headers.count("Content-Type"), 1u);
  }

  std::string key_ = "test-key-123";
  FakeEngine engine_{/*max_context=*/256};
  std::unique_ptr<ServingMetrics> metrics_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(HttpServerTest, CompletionsChatAndModels) {
  ServeOptions options;
  options.api_key = key_;
  StartServer(options);

  HttpReply health = Call(server_->port(), "GET", "/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(health.Json()["status"], "ok");

  HttpReply models = Call(server_->port(), "GET", "/v1/models", "", {"Authorization: Bearer " + key_});
  ASSERT_EQ(models.status, 200) << models.body;
  EXPECT_EQ(models.Json()["object"], "list");
  EXPECT_EQ(models.Json()["data"][0]["id"], "fake-model");
  EXPECT_EQ(Call(server_->port(), "GET", "/v1/models/fake-model", "", {"Authorization: Bearer " + key_}).status, 200);
  ExpectError(Call(server_->port(), "GET", "/v1/models/other", "", {"Authorization: Bearer " + key_}), 404,
              "model_not_found");

  HttpReply completion = Post("/v1/completions", R"({"model": "fake-model", "prompt": "Hi", "max_tokens": 9,
                                                     "temperature": 0})");
  ASSERT_EQ(completion.status, 200) << completion.body;
  json body = completion.Json();
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["model"], "fake-model");
  EXPECT_EQ(body["choices"][0]["text"], "The quick");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(body["usage"], json::parse(R"({"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11})"));
  EXPECT_EQ(body["id"].get<std::string>().rfind("cmpl-", 0), 0u);

  HttpReply chat = Post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 30, "temperature": 0, "stop": ["jumps"]})");
  ASSERT_EQ(chat.status, 200) << chat.body;
  body = chat.Json();
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "The quick brown fox ");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
}

TEST_F(HttpServerTest, StreamingMatchesNonStreaming) {
  StartServer(ServeOptions());
  for (const char* endpoint : {"/v1/chat/completions", "/v1/completions"}) {
    const bool chat = std::string(endpoint) == "/v1/chat/completions";
    json request = {{"max_tokens", 40}, {"temperature", 0}, {"stop", "lazy"}};
    if (chat) {
      request["messages"] = json::array({{{"role", "user"}, {"content", "Hi"}}});
    } else {
      request["prompt"] = "Hi";
    }
    const HttpReply whole = Post(endpoint, request.dump());
    ASSERT_EQ(whole.status, 200) << whole.body;
    request["stream"] = true;
    request["stream_options"] = {{"include_usage", true}};
    const HttpReply streamed = Post(endpoint, request.dump());
    ASSERT_EQ(streamed.status, 200) << streamed.body;
    EXPECT_EQ(streamed.headers.at("Content-Type").rfind("text/event-stream", 0), 0u);
    bool done = false;
    const std::vector<json> events = SseEvents(streamed.body, &done);
    EXPECT_TRUE(done);
    ASSERT_GE(events.size(), 3u);
    std::string text;
    std::string finish;
    for (size_t i = 0; i + 1 < events.size(); ++i) {
      const json& e = events[i];
      EXPECT_EQ(e["object"], chat ? "chat.completion.chunk" : "text_completion");
      ASSERT_EQ(e["choices"].size(), 1u) << e;
      const json& choice = e["choices"][0];
      if (chat) {
        if (i == 0) {
          EXPECT_EQ(choice["delta"]["role"], "assistant");
        }
        if (choice["delta"].contains("content")) text += choice["delta"]["content"].get<std::string>();
      } else {
        text += choice["text"].get<std::string>();
      }
      if (!choice["finish_reason"].is_null()) {
        EXPECT_EQ(i + 2, events.size()) << "finish_reason before the last content chunk";
        finish = choice["finish_reason"];
      }
    }
    const json& usage_chunk = events.back();
    EXPECT_TRUE(usage_chunk["choices"].empty());
    const json whole_body = whole.Json();
    EXPECT_EQ(usage_chunk["usage"], whole_body["usage"]);
    const json& whole_choice = whole_body["choices"][0];
    EXPECT_EQ(text, chat ? whole_choice["message"]["content"] : whole_choice["text"]);
    EXPECT_EQ(text, "The quick brown fox jumps over the ");
    EXPECT_EQ(finish, "stop");
    EXPECT_EQ(whole_choice["finish_reason"], "stop");
  }
}

TEST_F(HttpServerTest, BadRequestsGetOpenAiErrorsAndTheServerKeepsServing) {
  ServeOptions options;
  options.api_key = key_;
  options.max_body_bytes = 4096;
  StartServer(options);
  const int port = server_->port();
  const std::string good = R"({"prompt": "Hi", "max_tokens": 3, "temperature": 0})";

  ExpectError(Post("/v1/completions", "{\"prompt\": \"Hi\""), 400, "invalid_json");
  ExpectError(Post("/v1/completions", R"({"prompt": "Hi", "temperature": "warm"})"), 400);
  ExpectError(Post("/v1/completions", json{{"prompt", std::string(10000, 'a')}}.dump()), 413, "request_too_large");
  ExpectError(Post("/v1/completions", R"({"prompt": "Hi", "max_tokens": 1000})"), 400, "context_length_exceeded");
  ExpectError(Post("/v1/completions", R"({"prompt": "Hi", "model": "gpt-4o"})"), 404, "model_not_found");
  ExpectError(Post("/v1/completions", R"({"prompt": "Hi", "kv_scheme": "zip"})"), 400, "invalid_kv_scheme");
  ExpectError(Post("/v1/completions", R"({"prompt": "FAIL please"})"), 500);
  ExpectError(Call(port, "POST", "/v1/completions", good, {"Authorization: Bearer wrong-key"}), 401, "invalid_api_key");
  ExpectError(Call(port, "POST", "/v1/completions", good, {"Authorization: Basic dGVzdA=="}), 401, "invalid_api_key");
  ExpectError(Call(port, "POST", "/v1/completions", good), 401, "missing_api_key");
  EXPECT_EQ(Call(port, "POST", "/v1/completions", good, {"Authorization: Bearer wrong-key"}).headers.count(
                "WWW-Authenticate"),
            1u);
  ExpectError(Post("/v1/embeddings", good), 404, "not_found");
  ExpectError(Call(port, "GET", "/v1/completions", "", {"Authorization: Bearer " + key_}), 405, "method_not_allowed");
  ExpectError(Call(port, "GET", "/index.html"), 404);

  HttpReply ok = Post("/v1/completions", good);
  EXPECT_EQ(ok.status, 200) << ok.body;
  EXPECT_EQ(ok.Json()["choices"][0]["text"], "The");
  // Bearer is case-insensitive, as HTTP auth schemes are.
  EXPECT_EQ(Call(port, "POST", "/v1/completions", good, {"Authorization: bearer " + key_}).status, 200);

  const std::string metrics = metrics_->Serialize();
  EXPECT_NE(metrics.find("kvshard_requests_total{endpoint=\"/v1/completions\",status=\"413\"} 1"), std::string::npos)
      << metrics;
}

TEST_F(HttpServerTest, AFullQueueAnswers429) {
  ServeOptions options;
  options.max_queue = 1;
  StartServer(options);
  const std::string body = R"({"prompt": "Hi", "max_tokens": 2, "temperature": 0})";
  engine_.Hold();
  HttpReply first, second;
  std::thread a([&] { first = Post("/v1/completions", body); });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!engine_.running() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(engine_.running());
  std::thread b([&] { second = Post("/v1/completions", body); });
  while (std::chrono::steady_clock::now() < deadline) {
    if (Call(server_->port(), "GET", "/health").Json()["requests_waiting"] == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const HttpReply third = Post("/v1/completions", body);
  ExpectError(third, 429, "queue_full");
  EXPECT_EQ(third.headers.count("Retry-After"), 1u);
  engine_.Release();
  a.join();
  b.join();
  EXPECT_EQ(first.status, 200) << first.body;
  EXPECT_EQ(second.status, 200) << second.body;
  EXPECT_EQ(Post("/v1/completions", body).status, 200);
}

// An engine that batches gets as many requests at once as it takes; the rest wait their turn.
TEST_F(HttpServerTest, RequestsRunTogetherWhenTheEngineBatchesThem) {
  engine_.set_max_concurrent(3);
  StartServer(ServeOptions());
  const std::string body = R"({"prompt": "Hi", "max_tokens": 4, "temperature": 0})";
  engine_.Hold();
  std::vector<HttpReply> replies(5);
  std::vector<std::thread> clients;
  for (int i = 0; i < 5; ++i) clients.emplace_back([&, i] { replies[i] = Post("/v1/completions", body); });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    if (engine_.in_flight() == 3 && Call(server_->port(), "GET", "/health").Json()["requests_waiting"] == 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(engine_.in_flight(), 3);
  EXPECT_NE(metrics_->Serialize().find("kvshard_requests_running 3"), std::string::npos);
  engine_.Release();
  for (std::thread& t : clients) t.join();
  for (const HttpReply& reply : replies) {
    EXPECT_EQ(reply.status, 200) << reply.body;
    EXPECT_EQ(reply.Json()["choices"][0]["text"], "The ");
  }
  EXPECT_EQ(engine_.peak_in_flight(), 3);
}

TEST_F(HttpServerTest, ConcurrentStreamsAllFinish) {
  StartServer(ServeOptions());
  constexpr int kClients = 16;
  std::vector<HttpReply> replies(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      replies[i] = Post("/v1/chat/completions",
                        R"({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0,
                            "stream": true})");
    });
  }
  for (std::thread& t : threads) t.join();
  for (const HttpReply& reply : replies) {
    ASSERT_EQ(reply.status, 200) << reply.body;
    bool done = false;
    std::string text;
    for (const json& e : SseEvents(reply.body, &done)) {
      if (e["choices"][0]["delta"].contains("content")) text += e["choices"][0]["delta"]["content"].get<std::string>();
    }
    EXPECT_TRUE(done);
    EXPECT_EQ(text, "The quick br");
  }
}

TEST_F(HttpServerTest, MetricsCountTokensAndMemory) {
  StartServer(ServeOptions());
  ASSERT_EQ(Post("/v1/completions", R"({"prompt": "Hello", "max_tokens": 6, "temperature": 0})").status, 200);
  // The handler leaves the running gauge after its reply is on the wire, so the client can read the
  // metrics a moment before that: wait for it (up to 5 s).
  std::string text = metrics_->Serialize();
  for (int i = 0; i < 500 && text.find("kvshard_requests_running 0") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    text = metrics_->Serialize();
  }
  for (const char* expected : {
           "kvshard_tokens_generated_total 6", "kvshard_tokens_prefilled_total 5",
           "kvshard_requests_running 0", "kvshard_requests_waiting 0",
           "kvshard_kv_bytes_used{scheme=\"fp16\",worker=\"0\"} 320",
           "kvshard_kv_bytes_capacity{scheme=\"fp16\",worker=\"0\"} 1048576",
           "kvshard_kv_bits_per_element{scheme=\"fp16\",worker=\"0\"} 16",
           "kvshard_time_to_first_token_seconds_count 1", "kvshard_inter_token_latency_seconds_count 5",
           "kvshard_request_duration_seconds_count 1", "kvshard_decode_step_seconds_count{worker=\"0\"} 6",
           "kvshard_merge_seconds_count 0", "kvshard_prefill_tokens_per_second 5000",
       }) {
    EXPECT_NE(text.find(expected), std::string::npos) << expected << "\n" << text;
  }
}

TEST(MetricsEndpointTest, ServesOnItsOwnPort) {
  absl::StatusOr<std::unique_ptr<ServingMetrics>> metrics = ServingMetrics::Start("127.0.0.1", 0);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  (*metrics)->AddTokenGenerated();
  const HttpReply reply = Call((*metrics)->port(), "GET", "/metrics");
  EXPECT_EQ(reply.status, 200);
  EXPECT_NE(reply.body.find("kvshard_tokens_generated_total 1"), std::string::npos) << reply.body;
}

}  // namespace
}  // namespace kvshard
