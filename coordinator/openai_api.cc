#include "coordinator/openai_api.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvshard {
namespace {

using nlohmann::json;

// absl::string_view: this abseil build has its own string_view type, not std::string_view.
constexpr absl::string_view kParamPayload = "kvshard/openai/param";
constexpr absl::string_view kCodePayload = "kvshard/openai/code";
constexpr absl::string_view kHttpStatusPayload = "kvshard/openai/http_status";
constexpr int kMaxStopStrings = 16;

absl::Status BadField(const std::string& param, const std::string& message) {
  return ApiError(absl::StatusCode::kInvalidArgument, message, param);
}

absl::Status Unsupported(const std::string& param, const std::string& message) {
  return ApiError(absl::StatusCode::kInvalidArgument, message, param, "unsupported_parameter");
}

// A field that is absent or JSON null counts as not given.
const json* Field(const json& body, const std::string& name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<std::optional<double>> NumberField(const json& body, const std::string& name, double lo,
                                                  double hi) {
  const json* value = Field(body, name);
  if (value == nullptr) return std::optional<double>();
  if (!value->is_number()) return BadField(name, absl::StrCat(name, " must be a number"));
  const double x = value->get<double>();
  if (!(x >= lo && x <= hi)) {
    return BadField(name, absl::StrCat(name, " must be between ", lo, " and ", hi, "; got ", x));
  }
  return std::optional<double>(x);
}

// Integers may be written as 5 or 5.0; 5.5 is an error.
absl::StatusOr<std::optional<int64_t>> IntegerField(const json& body, const std::string& name, int64_t lo,
                                                    int64_t hi) {
  const json* value = Field(body, name);
  if (value == nullptr) return std::optional<int64_t>();
  int64_t x = 0;
  if (value->is_number_integer()) {
    if (value->is_number_unsigned() && value->get<uint64_t>() > uint64_t{INT64_MAX}) {
      return BadField(name, absl::StrCat(name, " is out of range"));
    }
    x = value->get<int64_t>();
  } else if (value->is_number_float()) {
    const double d = value->get<double>();
    if (!(std::floor(d) == d && std::fabs(d) < 9.0e15)) {
      return BadField(name, absl::StrCat(name, " must be an integer"));
    }
    x = static_cast<int64_t>(d);
  } else {
    return BadField(name, absl::StrCat(name, " must be an integer"));
  }
  if (x < lo || x > hi) {
    return BadField(name, absl::StrCat(name, " must be between ", lo, " and ", hi, "; got ", x));
  }
  return std::optional<int64_t>(x);
}

absl::StatusOr<std::optional<bool>> BoolField(const json& body, const std::string& name) {
  const json* value = Field(body, name);
  if (value == nullptr) return std::optional<bool>();
  if (!value->is_boolean()) return BadField(name, absl::StrCat(name, " must be a boolean"));
  return std::optional<bool>(value->get<bool>());
}

absl::StatusOr<std::vector<std::string>> StopField(const json& body) {
  std::vector<std::string> stops;
  const json* value = Field(body, "stop");
  if (value == nullptr) return stops;
  if (value->is_string()) {
    stops.push_back(value->get<std::string>());
  } else if (value->is_array()) {
    if (value->size() > kMaxStopStrings) {
      return BadField("stop", absl::StrCat("stop takes at most ", kMaxStopStrings, " strings"));
    }
    for (const json& s : *value) {
      if (!s.is_string()) return BadField("stop", "stop must be a string or a list of strings");
      stops.push_back(s.get<std::string>());
    }
  } else {
    return BadField("stop", "stop must be a string or a list of strings");
  }
  stops.erase(std::remove(stops.begin(), stops.end(), std::string()), stops.end());
  return stops;
}

absl::StatusOr<std::vector<int32_t>> TokenIdList(const json& ids, const Tokenizer& tokenizer) {
  std::vector<int32_t> out;
  out.reserve(ids.size());
  for (const json& id : ids) {
    if (!id.is_number_integer()) return BadField("prompt", "prompt token ids must be integers");
    const int64_t v = id.get<int64_t>();
    if (v < 0 || v >= tokenizer.vocab_size()) {
      return BadField("prompt", absl::StrCat("prompt token id ", v, " is outside the vocabulary [0, ",
                                             tokenizer.vocab_size(), ")"));
    }
    out.push_back(static_cast<int32_t>(v));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> CompletionPrompt(const json& body, const Tokenizer& tokenizer) {
  const json* prompt = Field(body, "prompt");
  if (prompt == nullptr) return BadField("prompt", "prompt is required");
  const json* single = prompt;
  if (prompt->is_array() && !prompt->empty() && (prompt->front().is_string() || prompt->front().is_array())) {
    if (prompt->size() != 1) {
      return Unsupported("prompt", "only one prompt per request is supported; send one request per prompt");
    }
    single = &prompt->front();
  }
  std::vector<int32_t> ids;
  if (single->is_string()) {
    ids = tokenizer.Encode(single->get_ref<const std::string&>(), /*parse_special=*/true);
  } else if (single->is_array()) {
    KV_ASSIGN_OR_RETURN(ids, TokenIdList(*single, tokenizer));
  } else {
    return BadField("prompt", "prompt must be a string, a list of one string, or a list of token ids");
  }
  if (ids.empty()) {
    if (!tokenizer.bos_id()) return BadField("prompt", "prompt is empty");
    ids.push_back(*tokenizer.bos_id());
  }
  return ids;
}

absl::StatusOr<std::string> MessageContent(const json& message, size_t index) {
  const std::string param = absl::StrCat("messages[", index, "].content");
  auto it = message.find("content");
  if (it == message.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (!it->is_array()) return BadField(param, absl::StrCat(param, " must be a string or a list of parts"));
  std::string text;
  for (const json& part : *it) {
    if (!part.is_object()) return BadField(param, absl::StrCat(param, " parts must be objects"));
    auto type = part.find("type");
    if (type == part.end() || !type->is_string() || type->get_ref<const std::string&>() != "text") {
      return Unsupported(param, "only text content parts are supported");
    }
    auto t = part.find("text");
    if (t == part.end() || !t->is_string()) {
      return BadField(param, absl::StrCat(param, " text parts need a string \"text\""));
    }
    text += t->get_ref<const std::string&>();
  }
  return text;
}

absl::StatusOr<std::vector<int32_t>> ChatPrompt(const json& body, const Tokenizer& tokenizer) {
  const json* messages = Field(body, "messages");
  if (messages == nullptr) return BadField("messages", "messages is required");
  if (!messages->is_array()) return BadField("messages", "messages must be a list of message objects");
  if (messages->empty()) return BadField("messages", "messages must not be empty");
  std::vector<ChatMessage> chat;
  chat.reserve(messages->size());
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string param = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return BadField(param, absl::StrCat(param, " must be an object"));
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return BadField(param + ".role", absl::StrCat(param, ".role must be a string"));
    }
    std::string role_name = role->get<std::string>();
    if (role_name == "developer") role_name = "system";  // OpenAI's newer name for system
    if (role_name != "system" && role_name != "user" && role_name != "assistant") {
      return BadField(param + ".role", absl::StrCat(param, ".role must be system, user or assistant; got \"",
                                                    role_name, "\""));
    }
    KV_ASSIGN_OR_RETURN(std::string content, MessageContent(m, i));
    chat.push_back({std::move(role_name), std::move(content)});
  }
  return EncodeChat(tokenizer, chat);
}

absl::Status RejectUnsupported(ApiEndpoint endpoint, const json& body) {
  KV_ASSIGN_OR_RETURN(std::optional<int64_t> n, IntegerField(body, "n", 1, 128));
  if (n && *n != 1) return Unsupported("n", "only n=1 is supported");
  KV_ASSIGN_OR_RETURN(std::optional<int64_t> best_of, IntegerField(body, "best_of", 1, 128));
  if (best_of && *best_of != 1) return Unsupported("best_of", "only best_of=1 is supported");
  if (const json* logprobs = Field(body, "logprobs")) {
    const bool asked = logprobs->is_boolean() ? logprobs->get<bool>()
                                              : !(logprobs->is_number() && logprobs->get<double>() == 0);
    if (asked) return Unsupported("logprobs", "logprobs are not supported");
  }
  if (const json* echo = Field(body, "echo")) {
    if (!echo->is_boolean()) return BadField("echo", "echo must be a boolean");
    if (echo->get<bool>()) return Unsupported("echo", "echo is not supported");
  }
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    KV_ASSIGN_OR_RETURN(std::optional<double> penalty, NumberField(body, name, -2.0, 2.0));
    if (penalty && *penalty != 0.0) return Unsupported(name, absl::StrCat(name, " is not supported"));
  }
  if (const json* tools = Field(body, "tools")) {
    if (!tools->is_array() || !tools->empty()) return Unsupported("tools", "tools are not supported");
  }
  if (const json* format = Field(body, "response_format")) {
    const bool plain_text = format->is_object() && format->contains("type") &&
                            (*format)["type"] == "text";
    if (!plain_text) return Unsupported("response_format", "only response_format {\"type\": \"text\"} is supported");
  }
  (void)endpoint;
  return absl::OkStatus();
}

uint64_t RandomSeed() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

json Usage(const GenerationOutcome& outcome) {
  return json{{"prompt_tokens", outcome.prompt_tokens},
              {"completion_tokens", outcome.completion_tokens},
              {"total_tokens", outcome.prompt_tokens + outcome.completion_tokens}};
}

}  // namespace

std::vector<int32_t> EncodeChat(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages) {
  // Render the template around placeholders, then encode its own markers with special tokens and each
  // message's content as plain text.
  constexpr char kHole = '\x01';
  std::vector<ChatMessage> holes = messages;
  for (ChatMessage& m : holes) m.content = std::string(1, kHole);
  const std::string rendered =
      ApplyChatTemplate(tokenizer.DefaultChatTemplate(), holes, /*add_generation_prompt=*/true);
  std::vector<std::string_view> parts;
  size_t start = 0;
  for (size_t at = rendered.find(kHole); at != std::string::npos; at = rendered.find(kHole, start)) {
    parts.emplace_back(rendered.data() + start, at - start);
    start = at + 1;
  }
  parts.emplace_back(rendered.data() + start, rendered.size() - start);
  std::vector<int32_t> ids;
  auto append = [&](std::string_view text, bool special) {
    const std::vector<int32_t> piece = tokenizer.Encode(text, special);
    ids.insert(ids.end(), piece.begin(), piece.end());
  };
  if (parts.size() != messages.size() + 1) {
    // A template that does not show each content once: encode the rendering as a whole.
    append(ApplyChatTemplate(tokenizer.DefaultChatTemplate(), messages, true), true);
    return ids;
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    append(parts[i], true);
    append(messages[i].content, false);
  }
  append(parts.back(), true);
  return ids;
}

std::optional<ApiEndpoint> EndpointFromPath(std::string_view path) {
  if (path == "/v1/completions") return ApiEndpoint::kCompletions;
  if (path == "/v1/chat/completions") return ApiEndpoint::kChatCompletions;
  return std::nullopt;
}

std::string_view EndpointPath(ApiEndpoint endpoint) {
  return endpoint == ApiEndpoint::kChatCompletions ? "/v1/chat/completions" : "/v1/completions";
}

absl::Status ApiError(absl::StatusCode code, std::string_view message, std::string_view param,
                      std::string_view error_code, int http_status) {
  absl::Status status(code, std::string(message));
  if (!param.empty()) status.SetPayload(kParamPayload, absl::Cord(std::string(param)));
  if (!error_code.empty()) status.SetPayload(kCodePayload, absl::Cord(std::string(error_code)));
  if (http_status != 0) status.SetPayload(kHttpStatusPayload, absl::Cord(absl::StrCat(http_status)));
  return status;
}

HttpError ToHttpError(const absl::Status& status) {
  int http = 500;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition: http = 400; break;
    case absl::StatusCode::kUnauthenticated: http = 401; break;
    case absl::StatusCode::kPermissionDenied: http = 403; break;
    case absl::StatusCode::kNotFound: http = 404; break;
    case absl::StatusCode::kResourceExhausted: http = 429; break;
    case absl::StatusCode::kUnimplemented: http = 501; break;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kCancelled: http = 503; break;  // shutting down (a gone client sees nothing)
    case absl::StatusCode::kDeadlineExceeded: http = 504; break;
    default: http = 500; break;
  }
  if (auto payload = status.GetPayload(kHttpStatusPayload)) {
    int parsed = 0;
    if (absl::SimpleAtoi(std::string(*payload), &parsed) && parsed >= 400 && parsed <= 599) http = parsed;
  }
  std::string type = "invalid_request_error";
  if (http == 429) type = "rate_limit_error";
  if (http >= 500) type = "server_error";
  json error = {{"message", std::string(status.message())}, {"type", type}, {"param", nullptr},
                {"code", nullptr}};
  if (auto param = status.GetPayload(kParamPayload)) error["param"] = std::string(*param);
  if (auto code = status.GetPayload(kCodePayload)) error["code"] = std::string(*code);
  return HttpError{http, json{{"error", std::move(error)}}};
}

absl::StatusOr<json> ParseJsonBody(std::string_view text) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return ApiError(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("the request body is not valid JSON (byte ", e.byte, ")"), {},
                    "invalid_json");
  }
}

std::vector<std::string> AcceptedModelNames(const Engine& engine, const ApiOptions& options) {
  if (!options.model_names.empty()) return options.model_names;
  return {engine.model_name()};
}

absl::StatusOr<ApiRequest> ParseApiRequest(ApiEndpoint endpoint, const json& body, const Engine& engine,
                                           const ApiOptions& options) {
  if (!body.is_object()) {
    return ApiError(absl::StatusCode::kInvalidArgument, "the request body must be a JSON object");
  }
  ApiRequest request;
  request.endpoint = endpoint;

  // Types and ranges first, so a malformed request never costs a tokenization.
  const std::vector<std::string> models = AcceptedModelNames(engine, options);
  request.model = models.front();
  if (const json* model = Field(body, "model")) {
    if (!model->is_string()) return BadField("model", "model must be a string");
    const std::string& name = model->get_ref<const std::string&>();
    if (std::find(models.begin(), models.end(), name) == models.end()) {
      return ApiError(absl::StatusCode::kNotFound,
                      absl::StrCat("The model `", name, "` does not exist; this server serves `",
                                   models.front(), "`"),
                      "model", "model_not_found");
    }
  }
  KV_ASSIGN_OR_RETURN(std::optional<double> temperature, NumberField(body, "temperature", 0.0, 2.0));
  KV_ASSIGN_OR_RETURN(std::optional<double> top_p, NumberField(body, "top_p", 0.0, 1.0));
  if (top_p && *top_p <= 0.0) return BadField("top_p", "top_p must be greater than 0");
  KV_ASSIGN_OR_RETURN(std::optional<int64_t> top_k, IntegerField(body, "top_k", -1, INT32_MAX));
  KV_ASSIGN_OR_RETURN(std::optional<double> repetition_penalty,
                      NumberField(body, "repetition_penalty", 0.0, 2.0));
  if (repetition_penalty && *repetition_penalty <= 0.0) {
    return BadField("repetition_penalty", "repetition_penalty must be greater than 0");
  }
  const int64_t max_int = std::numeric_limits<int32_t>::max();
  KV_ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens, IntegerField(body, "max_tokens", 1, max_int));
  if (endpoint == ApiEndpoint::kChatCompletions) {
    KV_ASSIGN_OR_RETURN(std::optional<int64_t> max_completion,
                        IntegerField(body, "max_completion_tokens", 1, max_int));
    if (max_completion) max_tokens = max_completion;
  }
  KV_ASSIGN_OR_RETURN(std::optional<int64_t> seed,
                      IntegerField(body, "seed", std::numeric_limits<int64_t>::min(), INT64_MAX));
  KV_ASSIGN_OR_RETURN(std::optional<bool> stream, BoolField(body, "stream"));
  KV_ASSIGN_OR_RETURN(std::vector<std::string> stops, StopField(body));
  if (const json* stream_options = Field(body, "stream_options")) {
    if (!stream_options->is_object()) return BadField("stream_options", "stream_options must be an object");
    KV_ASSIGN_OR_RETURN(std::optional<bool> include_usage, BoolField(*stream_options, "include_usage"));
    request.include_usage = include_usage.value_or(false);
  }
  std::string kv_scheme;
  if (const json* scheme = Field(body, "kv_scheme")) {
    if (!scheme->is_string()) return BadField("kv_scheme", "kv_scheme must be a string");
    kv_scheme = scheme->get<std::string>();
    absl::Status known = kv_scheme.empty() ? absl::OkStatus() : engine.CheckKvScheme(kv_scheme);
    if (!known.ok()) {
      return ApiError(absl::StatusCode::kInvalidArgument,
                      absl::StrCat("unknown kv_scheme \"", kv_scheme, "\": ", known.message(),
                                   " (schemes: fp16, fp32, int<b>, kivi<b>, kvq<b>, wkv<b>, deco<b>, optionally "
                                   "with parameters, e.g. kvq3:outliers=0.005)"),
                      "kv_scheme", "invalid_kv_scheme");
    }
  }
  KV_RETURN_IF_ERROR(RejectUnsupported(endpoint, body));

  std::vector<int32_t> prompt;
  if (endpoint == ApiEndpoint::kChatCompletions) {
    KV_ASSIGN_OR_RETURN(prompt, ChatPrompt(body, engine.tokenizer()));
  } else {
    KV_ASSIGN_OR_RETURN(prompt, CompletionPrompt(body, engine.tokenizer()));
  }

  const int64_t context = engine.max_context();
  const int64_t prompt_tokens = static_cast<int64_t>(prompt.size());
  const char* prompt_param = endpoint == ApiEndpoint::kChatCompletions ? "messages" : "prompt";
  if (prompt_tokens >= context) {
    return ApiError(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("This model's maximum context length is ", context, " tokens; the prompt has ",
                                 prompt_tokens, " tokens, which leaves no room for a completion"),
                    prompt_param, "context_length_exceeded");
  }
  if (max_tokens && prompt_tokens + *max_tokens > context) {
    return ApiError(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("This model's maximum context length is ", context, " tokens; you requested ",
                                 prompt_tokens + *max_tokens, " tokens (", prompt_tokens, " in the prompt, ",
                                 *max_tokens, " for the completion)"),
                    "max_tokens", "context_length_exceeded");
  }

  GenerationRequest& gen = request.generation;
  gen.prompt_ids = std::move(prompt);
  gen.max_tokens = static_cast<int>(
      max_tokens ? *max_tokens : std::min<int64_t>(options.default_max_tokens, context - prompt_tokens));
  gen.sampling.temperature = static_cast<float>(temperature.value_or(options.default_temperature));
  gen.sampling.top_p = static_cast<float>(top_p.value_or(1.0));
  gen.sampling.top_k = static_cast<int>(std::max<int64_t>(0, top_k.value_or(0)));
  gen.sampling.repetition_penalty =
      static_cast<float>(repetition_penalty.value_or(options.default_repetition_penalty));
  gen.sampling.seed = seed ? static_cast<uint64_t>(*seed) : RandomSeed();
  gen.stop = std::move(stops);
  gen.kv_scheme = std::move(kv_scheme);
  request.stream = stream.value_or(false);
  return request;
}

// ---- Running ------------------------------------------------------------------------------------

absl::StatusOr<GenerationOutcome> RunApiGeneration(Engine& engine, const GenerationRequest& request,
                                                   const GenerationHooks& hooks) {
  Utf8StreamDecoder utf8;  // a piece may end inside a character; chunks must be valid UTF-8
  std::string emitted;
  bool client_gone = false;
  auto emit = [&](const std::string& text) {
    if (text.empty() || client_gone) return;
    emitted += text;
    if (hooks.on_text && !hooks.on_text(text)) client_gone = true;
  };
  auto on_token = [&](int32_t token_id, const std::string& piece) {
    if (token_id >= 0 && hooks.on_token) hooks.on_token();  // -1 flushes held-back text; not a token
    emit(utf8.Push(piece));
    return !client_gone;
  };
  absl::StatusOr<GenerationResult> result = engine.Generate(request, on_token, hooks.on_prefill);
  if (client_gone) return absl::CancelledError("the client went away");
  if (!result.ok()) return result.status();

  GenerationOutcome outcome;
  outcome.text = std::move(result->text);
  outcome.finish_reason = result->finish_reason;
  outcome.prompt_tokens =
      result->prompt_tokens > 0 ? result->prompt_tokens : static_cast<int64_t>(request.prompt_ids.size());
  outcome.completion_tokens = static_cast<int64_t>(result->token_ids.size());
  outcome.prefill_seconds = result->prefill_seconds;
  outcome.decode_seconds = result->decode_seconds;
  // The engine's text is final; stream whatever of it the pieces have not shown yet.
  if (outcome.text.size() > emitted.size() && outcome.text.compare(0, emitted.size(), emitted) == 0) {
    emit(outcome.text.substr(emitted.size()));
  }
  return outcome;
}

// ---- Responses ----------------------------------------------------------------------------------

std::string RandomHex(int digits) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(digits, '0');
  for (char& c : out) c = kHex[rng() & 15];
  return out;
}

std::string NewResponseId(ApiEndpoint endpoint) {
  return absl::StrCat(endpoint == ApiEndpoint::kChatCompletions ? "chatcmpl-" : "cmpl-", RandomHex(24));
}

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string_view FinishReasonName(FinishReason reason) {
  return reason == FinishReason::kLength ? "length" : "stop";
}

json MakeResponseBody(const ApiRequest& request, const GenerationOutcome& outcome, const std::string& id,
                      int64_t created) {
  json choice = {{"index", 0}, {"logprobs", nullptr},
                 {"finish_reason", std::string(FinishReasonName(outcome.finish_reason))}};
  std::string object;
  if (request.endpoint == ApiEndpoint::kChatCompletions) {
    object = "chat.completion";
    choice["message"] = {{"role", "assistant"}, {"content", outcome.text}};
  } else {
    object = "text_completion";
    choice["text"] = outcome.text;
  }
  return json{{"id", id},           {"object", object},         {"created", created},
              {"model", request.model}, {"choices", json::array({choice})}, {"usage", Usage(outcome)}};
}

StreamChunks::StreamChunks(const ApiRequest& request, std::string id, int64_t created)
    : request_(request), id_(std::move(id)), created_(created) {}

json StreamChunks::Chunk(json choice) const {
  const bool chat = request_.endpoint == ApiEndpoint::kChatCompletions;
  json chunk = {{"id", id_},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created_},
                {"model", request_.model},
                {"choices", choice.is_null() ? json::array() : json::array({std::move(choice)})}};
  if (request_.include_usage) chunk["usage"] = nullptr;
  return chunk;
}

std::optional<json> StreamChunks::Opening() const {
  if (request_.endpoint != ApiEndpoint::kChatCompletions) return std::nullopt;
  return Chunk({{"index", 0},
                {"delta", {{"role", "assistant"}, {"content", ""}}},
                {"logprobs", nullptr},
                {"finish_reason", nullptr}});
}

json StreamChunks::Text(std::string_view text) const {
  if (request_.endpoint == ApiEndpoint::kChatCompletions) {
    return Chunk({{"index", 0}, {"delta", {{"content", text}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}});
  }
  return Chunk({{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", nullptr}});
}

std::vector<json> StreamChunks::Closing(const GenerationOutcome& outcome) const {
  const std::string reason(FinishReasonName(outcome.finish_reason));
  std::vector<json> chunks;
  if (request_.endpoint == ApiEndpoint::kChatCompletions) {
    chunks.push_back(Chunk({{"index", 0}, {"delta", json::object()}, {"logprobs", nullptr}, {"finish_reason", reason}}));
  } else {
    chunks.push_back(Chunk({{"index", 0}, {"text", ""}, {"logprobs", nullptr}, {"finish_reason", reason}}));
  }
  if (request_.include_usage) {
    json usage_chunk = Chunk(nullptr);
    usage_chunk["usage"] = Usage(outcome);
    chunks.push_back(std::move(usage_chunk));
  }
  return chunks;
}

std::string DumpJson(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string SseEvent(const json& data) { return absl::StrCat("data: ", DumpJson(data), "\n\n"); }

}  // namespace kvshard
