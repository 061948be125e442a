// Flags of `kvshard serve`, `kvshard run-batch` and `kvshard summarize --input-dir`. Each can also be
// set in the YAML config under the same name (deploy/kvshard.example.yaml lists them with defaults).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/batch_runner.h"
#include "coordinator/http_server.h"
#include "coordinator/openai_api.h"

namespace kvshard {

// host, port, metrics_host, metrics_port, api_key, api_key_file, max_body_bytes, max_queue,
// http_threads, plus the API flags below.
absl::StatusOr<ServeOptions> ServeOptionsFromFlags();
// default_max_tokens, default_temperature, served_model_name.
absl::StatusOr<ApiOptions> ApiOptionsFromFlags();
// batch_input, batch_output, batch_fsync, show_progress, prefill_progress_min_tokens, plus the API flags.
absl::StatusOr<BatchOptions> BatchOptionsFromFlags();
// input_dir, summary_output, summary_requests, summary_extensions, and summary_instruction, max_tokens
// and repetition_penalty shared with `summarize --input FILE`, plus the batch flags and the API flags.
absl::StatusOr<SummarizeDirOptions> SummarizeDirOptionsFromFlags();

// `run-batch -i IN -o OUT` and `summarize --input-dir DIR`: rewrites "-i X"/"-i=X", "-o X"/"-o=X" and
// "--input-dir" into --batch_input, --batch_output and --input_dir before the flags are parsed.
// Other arguments pass through unchanged.
std::vector<std::string> ExpandServingShortFlags(const std::vector<std::string>& args);

}  // namespace kvshard
