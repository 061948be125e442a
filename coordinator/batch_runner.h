// `kvshard run-batch -i IN.jsonl -o OUT.jsonl`: OpenAI batch files run on an Engine.
//
// Input, one request per line (blank lines are ignored):
//   {"custom_id": "doc-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
// Output, one record per input line, in the order requests finish (under mpirun several run at once):
//   {"id": "batch_req_...", "custom_id": "doc-1",
//    "response": {"status_code": 200, "request_id": "...", "body": {...chat.completion...}}, "error": null}
// A request the API rejects gets its status code and OpenAI error body in "response". A line that is
// not a request at all (not JSON, no custom_id, unknown url, a repeated custom_id) gets "response": null
// and "error": {"code", "message", "line"}; its custom_id is null when the line has no usable one.
//
// Resuming: a rerun with the same OUT skips every custom_id (and every id-less input line) that OUT
// already answers. Each record is one write() of a whole line followed by fdatasync, so a killed run
// leaves whole lines plus at most one unterminated last line, which the next run cuts off. A lock on
// OUT keeps two runs from writing it at once.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/engine.h"
#include "coordinator/metrics.h"
#include "coordinator/openai_api.h"
#include "nlohmann/json.hpp"

namespace kvshard {

struct BatchOptions {
  std::string input_path;
  std::string output_path;
  bool fsync = true;          // fdatasync after every record
  bool show_progress = true;  // progress lines on stderr
  // Prompts at least this long show their own prefill progress line.
  int64_t prefill_progress_min_tokens = 2048;
  ApiOptions api;
};

struct BatchSummary {
  int64_t total = 0;           // requests in the input (non-blank lines)
  int64_t skipped = 0;         // answered by an earlier run
  int64_t succeeded = 0;       // status 200 in this run
  int64_t failed = 0;          // error records and non-200 responses in this run
  int64_t tokens_generated = 0;
  int64_t repaired_bytes = 0;  // unterminated tail cut off OUT before resuming
  int64_t peak_running = 0;    // most requests that ran at once (BatchOptions: as many as the engine batches)
};

// Runs every request of the input that OUT does not answer yet, as many at once as the engine batches
// (Engine::max_concurrent_requests), writing each record as its request finishes. Bad lines and failed
// requests become records; only I/O problems with IN or OUT end the job with an error.
absl::StatusOr<BatchSummary> RunBatch(Engine& engine, const BatchOptions& options,
                                      ServingMetrics* metrics = nullptr);

// One input line, parsed. `error` is not OK when the line is not a usable request.
struct BatchInputLine {
  int64_t line_number = 0;  // 1-based, counting blank lines
  std::string custom_id;    // empty when the line has none
  ApiEndpoint endpoint = ApiEndpoint::kChatCompletions;
  nlohmann::json body;
  absl::Status error;
};
BatchInputLine ParseBatchInputLine(std::string_view text, int64_t line_number);

// What an earlier run left in OUT.
struct BatchOutputState {
  std::set<std::string> custom_ids;
  std::set<int64_t> lines;  // input lines answered by records without a custom_id
  int64_t records = 0;
  int64_t repaired_bytes = 0;
};
// Reads OUT (a missing file is empty) and cuts off an unterminated last line. A complete line that is
// not a batch output record is an error naming the line, since overwriting it could lose results.
absl::StatusOr<BatchOutputState> LoadAndRepairBatchOutput(const std::string& path);

// Output records.
nlohmann::json BatchResponseRecord(const std::string& custom_id, int status_code, nlohmann::json body);
nlohmann::json BatchErrorRecord(const BatchInputLine& line);

// ---- Summarization of a folder of documents ------------------------------------------------------

struct SummarizeDirOptions {
  std::string input_dir;
  std::string output_path;    // batch output JSONL with the summaries
  std::string requests_path;  // the batch input built from the folder; empty: output_path + ".requests.jsonl"
  std::string prompt = "Summarize the following document in a few sentences.";
  int max_tokens = 512;
  double repetition_penalty = 1.1;  // small models loop on greedy summaries without one
  // File name endings taken from the folder; empty: every regular file. Hidden files are skipped.
  std::vector<std::string> extensions = {".txt", ".md"};
  BatchOptions batch;  // fsync, progress, api; its paths are set from the fields above
};

// The chat request body that asks for a summary of one document (temperature 0).
nlohmann::json SummaryRequestBody(std::string_view document, const std::string& prompt, int max_tokens,
                                  double repetition_penalty);

// Writes the batch input for every matching file of the folder, sorted by name, custom_id = file name.
// Returns how many requests it wrote. The file is replaced atomically.
absl::StatusOr<int64_t> WriteSummarizeRequests(const SummarizeDirOptions& options);

// `kvshard summarize --input-dir DIR`: WriteSummarizeRequests, then RunBatch (resumable like it).
absl::StatusOr<BatchSummary> RunSummarizeDir(Engine& engine, const SummarizeDirOptions& options,
                                             ServingMetrics* metrics = nullptr);

}  // namespace kvshard
