// `kvshard generate` and `kvshard summarize`: one request through the single-process engine, tokens
// streamed to stdout, prefill progress and a closing summary on stderr.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/progress.h"
#include "common/status.h"
#include "coordinator/commands.h"
#include "coordinator/engine_factory.h"

ABSL_FLAG(std::string, model, "",
          "Model: a .gguf file or a Hugging Face directory. Default: the cached demo model "
          "($XDG_CACHE_HOME or ~/.cache)/kvshard/models/SmolLM2-135M-Instruct.Q4_1.gguf");
ABSL_FLAG(std::string, prompt, "", "generate: the prompt text");
ABSL_FLAG(std::string, input, "", "summarize: the document to summarize");
ABSL_FLAG(bool, chat, false, "generate: wrap the prompt in the model's chat template as a user turn");
ABSL_FLAG(std::string, system, "", "System message for chat prompts (empty: the template's default)");
ABSL_FLAG(std::string, summary_instruction,
          "Summarize the following document in a few sentences.",
          "summarize: the instruction placed before the document");
ABSL_FLAG(int, max_tokens, 256, "Most tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature; 0 is greedy");
ABSL_FLAG(int, top_k, 0, "Keep the k most likely tokens (0: all)");
ABSL_FLAG(double, top_p, 1.0, "Nucleus sampling mass (1: all)");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed");
ABSL_FLAG(double, repetition_penalty, 1.1,
          "Penalty on recently generated tokens (1: none); keeps small models from looping");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Stop strings, comma-separated");
ABSL_FLAG(std::string, kv_scheme, "auto",
          "KV cache scheme: auto, fp16, fp32, int8, int4, kivi2, kvq3, wkv4, deco, ... with optional parameters "
          "(kvq3:outliers=0.01,sink=4,residual=32). kvq and wkv need a calibration (--calibration, or MODEL.kvcal "
          "beside the model, which `kvshard calibrate` writes by default); auto is kvq3 when there is one, else fp16");
ABSL_FLAG(std::string, device, "auto", "Where the model runs: auto (the GPU when present), gpu, or cpu");
ABSL_DECLARE_FLAG(int64_t, synthetic_fill_tokens);

namespace kvshard {

absl::StatusOr<std::string> ResolveModelPath() {
  std::string path = absl::GetFlag(FLAGS_model);
  if (!path.empty()) {
    if (!std::filesystem::exists(path)) {
      return absl::NotFoundError(absl::StrCat("model path ", path, " does not exist"));
    }
    return path;
  }
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  std::filesystem::path cache = xdg && *xdg ? std::filesystem::path(xdg)
                                : std::filesystem::path(home ? home : ".") / ".cache";
  path = (cache / "kvshard" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").string();
  if (!std::filesystem::exists(path)) {
    return absl::NotFoundError(absl::StrCat("no --model given and the demo model is not cached at ", path,
                                            "; fetch it with deploy/fetch-demo-model.sh"));
  }
  return path;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  if (std::filesystem::is_directory(path)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read input file ", path, ": it is a directory"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read input file ", path, ": ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading input file ", path));
  return text.str();
}

namespace {

GenerationRequest RequestFromFlags() {
  GenerationRequest request;
  request.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  request.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  request.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  request.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  request.sampling.seed = absl::GetFlag(FLAGS_seed);
  request.sampling.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  request.stop = absl::GetFlag(FLAGS_stop);
  // The engine's default scheme is --kv_scheme, resolved (auto) where the engine is made.
  return request;
}

std::vector<ChatMessage> ChatWith(const std::string& user_text) {
  std::vector<ChatMessage> messages;
  const std::string system = absl::GetFlag(FLAGS_system);
  if (!system.empty()) messages.push_back({"system", system});
  messages.push_back({"user", user_text});
  return messages;
}

// Runs one request with streamed output and progress; prints a one-line summary on stderr.
// `kv_note`: what --kv_scheme auto chose and why, shown in the closing line.
absl::Status RunStreaming(Engine& engine, GenerationRequest request, const std::string& kv_note) {
  const int64_t n_prompt = static_cast<int64_t>(request.prompt_ids.size());
  // Started before the first chunk, so its rate and ETA count the first chunk too.
  auto progress = std::make_unique<ProgressLine>("prefill", "tokens", n_prompt);
  auto on_prefill = [&](const PrefillProgress& p) {
    progress->Update(p.done);
    if (p.done == p.total) progress->Finish();
  };
  auto on_token = [&](int32_t, const std::string& piece) {
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
    return true;
  };
  KV_ASSIGN_OR_RETURN(GenerationResult result, engine.Generate(request, on_token, on_prefill));
  std::fputc('\n', stdout);
  std::fflush(stdout);
  const double prefill_rate = result.prefill_seconds > 0 ? n_prompt / result.prefill_seconds : 0;
  const double decode_rate = result.decode_seconds > 0 ? result.token_ids.size() / result.decode_seconds : 0;
  const int64_t fill = absl::GetFlag(FLAGS_synthetic_fill_tokens);
  const std::string fill_note =
      fill > 0 ? absl::StrFormat("SYNTHETIC FILL of %d tokens before the prompt (their K/V is random); ", fill) : "";
  // The store's all-in bits per element (codes, scales, outliers, sink, residual) as the KV gauge last saw it.
  double kv_bits = 0;
  for (const WorkerKvMemory& memory : engine.kv_memory()) kv_bits = std::max(kv_bits, memory.bits_per_element);
  std::string kv = result.kv_scheme;
  if (kv_bits > 0) absl::StrAppendFormat(&kv, " at %.2f bits/element", kv_bits);
  if (!kv_note.empty()) absl::StrAppend(&kv, " (", kv_note, ")");
  std::fprintf(stderr, "%s\n",
               absl::StrFormat("kvshard: %sprompt %d tokens, prefill %.1f s (%.1f tokens/s); generated %d tokens "
                               "in %.1f s (%.1f tokens/s); kv %s; finish %s; on %s",
                               fill_note, n_prompt, result.prefill_seconds, prefill_rate, result.token_ids.size(),
                               result.decode_seconds, decode_rate, kv,
                               result.finish_reason == FinishReason::kStop ? "stop" : "length",
                               engine.device_name())
                   .c_str());
  if (result.token_ids.empty() && result.finish_reason == FinishReason::kStop) {
    std::fprintf(stderr, "kvshard: the model ended its answer at once (an end token came first); another prompt or "
                         "instruction, or --temperature above 0, may get an answer\n");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> MakeEngineFromFlags(std::string* kv_note) {
  return CreateEngineFromFlags(kv_note);
}

absl::Status RunGenerate(const std::vector<std::string>& args) {
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  if (prompt.empty()) return absl::InvalidArgumentError("generate needs --prompt TEXT");
  std::string kv_note;
  KV_ASSIGN_OR_RETURN(auto engine, MakeEngineFromFlags(&kv_note));
  GenerationRequest request = RequestFromFlags();
  const Tokenizer& tok = engine->tokenizer();
  const std::string text =
      absl::GetFlag(FLAGS_chat) ? ApplyChatTemplate(tok.DefaultChatTemplate(), ChatWith(prompt), true) : prompt;
  request.prompt_ids = tok.Encode(text, /*parse_special=*/absl::GetFlag(FLAGS_chat));
  return RunStreaming(*engine, std::move(request), kv_note);
}

absl::Status RunSummarize(const std::vector<std::string>& args) {
  const std::string input = absl::GetFlag(FLAGS_input);
  if (input.empty()) return absl::InvalidArgumentError("summarize needs --input FILE");
  KV_ASSIGN_OR_RETURN(std::string document, ReadTextFile(input));
  std::string kv_note;
  KV_ASSIGN_OR_RETURN(auto engine, MakeEngineFromFlags(&kv_note));
  const Tokenizer& tok = engine->tokenizer();
  const std::string user = absl::StrCat(absl::GetFlag(FLAGS_summary_instruction), "\n\n", document);
  GenerationRequest request = RequestFromFlags();
  // The document is user text: special-token strings inside it stay plain text; only the template's own
  // markers are special.
  const std::string templ = ApplyChatTemplate(tok.DefaultChatTemplate(), ChatWith("\x01"), true);
  const size_t hole = templ.find('\x01');
  request.prompt_ids = tok.Encode(templ.substr(0, hole), true);
  const std::vector<int32_t> body = tok.Encode(user, false);
  request.prompt_ids.insert(request.prompt_ids.end(), body.begin(), body.end());
  const std::vector<int32_t> tail = tok.Encode(templ.substr(hole + 1), true);
  request.prompt_ids.insert(request.prompt_ids.end(), tail.begin(), tail.end());
  return RunStreaming(*engine, std::move(request), kv_note);
}

}  // namespace kvshard
