#include "coordinator/serving_flags.h"

#include <fstream>
#include <sstream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

// ---- serve ----
ABSL_FLAG(std::string, host, "127.0.0.1",
          "serve: address the HTTP API listens on (loopback by default; 0.0.0.0 for every interface)");
ABSL_FLAG(int, port, 8000, "serve: HTTP API port (0: any free port, printed at start)");
ABSL_FLAG(std::string, metrics_host, "127.0.0.1", "address the Prometheus /metrics endpoint listens on");
ABSL_FLAG(int, metrics_port, 9400, "Prometheus /metrics port (0: any free port; -1: no metrics endpoint)");
ABSL_FLAG(std::string, api_key, "",
          "serve: API key clients send as \"Authorization: Bearer KEY\" (empty: none needed); prefer "
          "api_key_file, since flags show in the process list");
ABSL_FLAG(std::string, api_key_file, "", "serve: file whose first line is the API key");
ABSL_FLAG(int64_t, max_body_bytes, int64_t{64} << 20, "serve: largest request body accepted (413 above)");
ABSL_FLAG(int, max_queue, 64, "serve: requests that may wait while others run (429 above)");
ABSL_FLAG(int, http_threads, 0, "serve: connections served at once (0: max_queue + the requests that run at once + 8)");

// ---- requests, for serve and batch ----
ABSL_FLAG(int, default_max_tokens, 256,
          "tokens generated when a request gives no max_tokens (capped by the context left)");
ABSL_FLAG(double, default_temperature, 1.0, "temperature when a request gives none (OpenAI's default)");
ABSL_FLAG(double, default_repetition_penalty, 1.0,
          "repetition penalty when a request gives none (1: none, as OpenAI's API behaves)");
ABSL_FLAG(std::string, served_model_name, "",
          "comma-separated names requests may give as \"model\"; the first is reported (empty: the "
          "model's own name)");

// ---- run-batch ----
ABSL_FLAG(std::string, batch_input, "", "run-batch: OpenAI batch input JSONL (-i)");
ABSL_FLAG(std::string, batch_output, "", "run-batch: output JSONL; rerunning resumes it (-o)");
ABSL_FLAG(bool, batch_fsync, true, "run-batch: fdatasync after every output record");
ABSL_FLAG(bool, show_progress, true, "run-batch, summarize: progress lines on stderr");
ABSL_FLAG(int64_t, prefill_progress_min_tokens, 2048,
          "run-batch, summarize: prompts at least this long show their own prefill progress");

// ---- summarize --input-dir ----
ABSL_FLAG(std::string, input_dir, "", "summarize: folder of documents to summarize (--input-dir)");
ABSL_FLAG(std::string, summary_output, "summaries.jsonl",
          "summarize --input-dir: batch output JSONL with one summary per document");
ABSL_FLAG(std::string, summary_requests, "",
          "summarize --input-dir: where the batch input is written (empty: SUMMARY_OUTPUT.requests.jsonl)");
ABSL_FLAG(std::string, summary_extensions, ".txt,.md",
          "summarize --input-dir: comma-separated file name endings to take (empty: every file)");

// Shared with `summarize --input FILE` (coordinator/cli_commands.cc).
ABSL_DECLARE_FLAG(std::string, summary_instruction);
ABSL_DECLARE_FLAG(int, max_tokens);
ABSL_DECLARE_FLAG(double, repetition_penalty);

namespace kvshard {

absl::StatusOr<ApiOptions> ApiOptionsFromFlags() {
  ApiOptions api;
  api.default_max_tokens = absl::GetFlag(FLAGS_default_max_tokens);
  if (api.default_max_tokens < 1) return absl::InvalidArgumentError("default_max_tokens must be at least 1");
  api.default_temperature = static_cast<float>(absl::GetFlag(FLAGS_default_temperature));
  if (!(api.default_temperature >= 0 && api.default_temperature <= 2)) {
    return absl::InvalidArgumentError("default_temperature must be in [0, 2]");
  }
  api.default_repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_default_repetition_penalty));
  if (!(api.default_repetition_penalty > 0 && api.default_repetition_penalty <= 2)) {
    return absl::InvalidArgumentError("default_repetition_penalty must be in (0, 2]");
  }
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_served_model_name), ',')) {
    name = absl::StripAsciiWhitespace(name);
    if (!name.empty()) api.model_names.emplace_back(name);
  }
  return api;
}

absl::StatusOr<ServeOptions> ServeOptionsFromFlags() {
  ServeOptions options;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.metrics_host = absl::GetFlag(FLAGS_metrics_host);
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.api_key = absl::GetFlag(FLAGS_api_key);
  const std::string key_file = absl::GetFlag(FLAGS_api_key_file);
  if (!key_file.empty()) {
    if (!options.api_key.empty()) return absl::InvalidArgumentError("give api_key or api_key_file, not both");
    std::ifstream in(key_file);
    if (!in) return absl::NotFoundError(absl::StrCat("api_key_file ", key_file, " cannot be read"));
    std::string line;
    std::getline(in, line);
    options.api_key = std::string(absl::StripAsciiWhitespace(line));
    if (options.api_key.empty()) return absl::InvalidArgumentError(absl::StrCat("api_key_file ", key_file, " is empty"));
  }
  options.max_body_bytes = absl::GetFlag(FLAGS_max_body_bytes);
  options.max_queue = absl::GetFlag(FLAGS_max_queue);
  options.http_threads = absl::GetFlag(FLAGS_http_threads);
  KV_ASSIGN_OR_RETURN(options.api, ApiOptionsFromFlags());
  return options;
}

absl::StatusOr<BatchOptions> BatchOptionsFromFlags() {
  BatchOptions options;
  options.input_path = absl::GetFlag(FLAGS_batch_input);
  options.output_path = absl::GetFlag(FLAGS_batch_output);
  options.fsync = absl::GetFlag(FLAGS_batch_fsync);
  options.show_progress = absl::GetFlag(FLAGS_show_progress);
  options.prefill_progress_min_tokens = absl::GetFlag(FLAGS_prefill_progress_min_tokens);
  KV_ASSIGN_OR_RETURN(options.api, ApiOptionsFromFlags());
  return options;
}

absl::StatusOr<SummarizeDirOptions> SummarizeDirOptionsFromFlags() {
  SummarizeDirOptions options;
  options.input_dir = absl::GetFlag(FLAGS_input_dir);
  if (options.input_dir.empty()) return absl::InvalidArgumentError("summarize: give --input-dir DIR");
  options.output_path = absl::GetFlag(FLAGS_summary_output);
  options.requests_path = absl::GetFlag(FLAGS_summary_requests);
  options.prompt = absl::GetFlag(FLAGS_summary_instruction);
  options.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.repetition_penalty = absl::GetFlag(FLAGS_repetition_penalty);
  options.extensions.clear();
  for (absl::string_view ext : absl::StrSplit(absl::GetFlag(FLAGS_summary_extensions), ',')) {
    ext = absl::StripAsciiWhitespace(ext);
    if (!ext.empty()) options.extensions.emplace_back(ext);
  }
  KV_ASSIGN_OR_RETURN(options.batch, BatchOptionsFromFlags());
  return options;
}

std::vector<std::string> ExpandServingShortFlags(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  out.reserve(args.size());
  for (const std::string& arg : args) {
    if (arg == "-i") {
      out.push_back("--batch_input");
    } else if (arg == "-o") {
      out.push_back("--batch_output");
    } else if (absl::StartsWith(arg, "-i=")) {
      out.push_back("--batch_input=" + arg.substr(3));
    } else if (absl::StartsWith(arg, "-o=")) {
      out.push_back("--batch_output=" + arg.substr(3));
    } else if (arg == "--input-dir" || arg == "-input-dir") {
      out.push_back("--input_dir");
    } else if (absl::StartsWith(arg, "--input-dir=")) {
      out.push_back("--input_dir=" + arg.substr(12));
    } else {
      out.push_back(arg);
    }
  }
  return out;
}

}  // namespace kvshard
