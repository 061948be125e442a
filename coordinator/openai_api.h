// The OpenAI-compatible API without its transport: request validation, running one request on an
// Engine with stop strings, response and stream-chunk shapes, and the error shape. The HTTP server and
// the batch runner both build on it, so a request means the same thing to either.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/engine.h"
#include "nlohmann/json.hpp"

namespace kvshard {

enum class ApiEndpoint { kCompletions, kChatCompletions };

// "/v1/completions" and "/v1/chat/completions"; nullopt for any other path.
std::optional<ApiEndpoint> EndpointFromPath(std::string_view path);
std::string_view EndpointPath(ApiEndpoint endpoint);

// ---- Errors -------------------------------------------------------------------------------------
// Errors travel as absl::Status. ApiError attaches OpenAI's "param" and "code" fields and, where the
// status code alone does not decide it (413 for a body over the limit), the HTTP status.
absl::Status ApiError(absl::StatusCode code, std::string_view message, std::string_view param = {},
                      std::string_view error_code = {}, int http_status = 0);

struct HttpError {
  int http_status = 500;
  nlohmann::json body;  // {"error": {"message": str, "type": str, "param": str|null, "code": str|null}}
};
// Maps a status to its HTTP status (InvalidArgument/OutOfRange/FailedPrecondition 400, Unauthenticated
// 401, PermissionDenied 403, NotFound 404, ResourceExhausted 429, Unimplemented 501, Unavailable and
// Cancelled 503, DeadlineExceeded 504, anything else 500) and OpenAI's error body.
HttpError ToHttpError(const absl::Status& status);

// ---- Requests -----------------------------------------------------------------------------------
struct ApiOptions {
  int default_max_tokens = 256;      // when a request gives none (capped by the context left)
  float default_temperature = 1.0f;  // OpenAI's default
  float default_repetition_penalty = 1.0f;  // 1: none, as OpenAI's API behaves
  // Names accepted in a request's "model"; the first is the one responses report. Empty: only
  // engine.model_name().
  std::vector<std::string> model_names;
};

struct ApiRequest {
  ApiEndpoint endpoint = ApiEndpoint::kCompletions;
  std::string model;  // the name responses report
  GenerationRequest generation;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk carries the usage
};

// Parses a request body; malformed JSON is InvalidArgument naming the position.
absl::StatusOr<nlohmann::json> ParseJsonBody(std::string_view text);

// Validates an OpenAI request body and turns it into a generation request: checks every field's type
// and range, the model name and the kv_scheme; tokenizes the prompt (chat: through the tokenizer's
// chat template); checks prompt + max_tokens against the context. Errors are ApiError statuses.
// Fields we do not implement and that would change the output (n > 1, logprobs, echo, tools, penalties)
// are rejected rather than ignored.
absl::StatusOr<ApiRequest> ParseApiRequest(ApiEndpoint endpoint, const nlohmann::json& body,
                                           const Engine& engine, const ApiOptions& options);

// Chat messages to prompt ids through the tokenizer's default template (ending with the assistant
// header). The template's markers become special tokens; message contents are encoded as plain text,
// so a special-token string inside a message or document stays text.
std::vector<int32_t> EncodeChat(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages);

// The names "model" may take, and the one responses report.
std::vector<std::string> AcceptedModelNames(const Engine& engine, const ApiOptions& options);

// ---- Running ------------------------------------------------------------------------------------
struct GenerationOutcome {
  std::string text;  // the engine's text: stop strings cut
  FinishReason finish_reason = FinishReason::kStop;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double prefill_seconds = 0;  // 0 when the engine did not say
  double decode_seconds = 0;
};

struct GenerationHooks {
  // Final text as it is decided; the pieces concatenate to the outcome's text. Returning false means
  // the client went away: generation stops and the run returns Cancelled.
  std::function<bool(std::string_view text)> on_text;
  // Each generated token, for counters and latency histograms.
  std::function<void()> on_token;
  PrefillCallback on_prefill;
};

// Runs one request on the engine (which applies the stop strings and stop ids). The text pieces it
// streams are passed on whole UTF-8 characters at a time, and whatever the pieces did not show of the
// final text is passed on at the end, so the streamed text always equals the outcome's text.
absl::StatusOr<GenerationOutcome> RunApiGeneration(Engine& engine, const GenerationRequest& request,
                                                   const GenerationHooks& hooks);

// ---- Responses ----------------------------------------------------------------------------------
// "cmpl-..." / "chatcmpl-..." followed by 24 random hex digits.
std::string NewResponseId(ApiEndpoint endpoint);
std::string RandomHex(int digits);
int64_t UnixSeconds();

// The non-streamed response body (text_completion or chat.completion) with usage.
nlohmann::json MakeResponseBody(const ApiRequest& request, const GenerationOutcome& outcome,
                                const std::string& id, int64_t created);

// Stream chunks in OpenAI's shapes: chat chunks carry choices[0].delta; completion chunks carry
// choices[0].text. The last content chunk has finish_reason; with include_usage a final chunk with
// empty choices carries the usage.
class StreamChunks {
 public:
  StreamChunks(const ApiRequest& request, std::string id, int64_t created);
  // Chat: the opening chunk with delta {"role": "assistant", "content": ""}; completions: none.
  std::optional<nlohmann::json> Opening() const;
  nlohmann::json Text(std::string_view text) const;
  // The finish chunk, then the usage chunk when asked for.
  std::vector<nlohmann::json> Closing(const GenerationOutcome& outcome) const;

 private:
  nlohmann::json Chunk(nlohmann::json choice) const;
  const ApiRequest& request_;
  std::string id_;
  int64_t created_;
};

// One Server-Sent Events record: "data: <json>\n\n".
std::string SseEvent(const nlohmann::json& data);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

// JSON text; invalid UTF-8 in strings becomes U+FFFD instead of throwing.
std::string DumpJson(const nlohmann::json& value);

std::string_view FinishReasonName(FinishReason reason);  // "stop", "length"

}  // namespace kvshard
