// The generation engine the front ends (CLI, HTTP, batch) talk to: text in, streamed tokens out.
// Single-process mode runs it with one in-process worker; the distributed runtime implements the same
// interface on the coordinator rank.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/tokenizer.h"
#include "kvstore/kv_scheme.h"
#include "worker/sampler.h"

namespace kvshard {

struct GenerationRequest {
  std::vector<int32_t> prompt_ids;
  SamplingParams sampling;
  int max_tokens = 256;
  std::vector<std::string> stop;  // stop strings; the text before the first match is kept
  std::string kv_scheme;          // empty: the engine's default
  // SYNTHETIC FILL before the prompt, for scale runs (kvshard scale-bench): tokens of synthetic K/V the
  // workers write straight into their stores. -1: the engine's own setting (--synthetic_fill_tokens).
  // Only the distributed engine has it; the HTTP and batch front ends never set it.
  int64_t synthetic_fill_tokens = -1;
};

enum class FinishReason { kStop, kLength };

struct GenerationResult {
  std::vector<int32_t> token_ids;  // generated ids (stop strings trimmed only from text)
  std::string text;
  FinishReason finish_reason = FinishReason::kStop;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
  std::string kv_scheme;  // the KV scheme the request ran with (its own, or the engine's default)
};

struct PrefillProgress {
  int64_t done = 0;
  int64_t total = 0;
  double seconds = 0;
};

// Called with each newly complete piece of UTF-8 text (may be empty for a split character, or held back
// while it could begin a stop string). A final call with token_id -1 flushes held-back text.
// Returning false cancels generation (client went away).
using TokenCallback = std::function<bool(int32_t token_id, const std::string& text_piece)>;
using PrefillCallback = std::function<void(const PrefillProgress&)>;

// KV memory of one worker's store, for the metrics endpoint. Bytes count everything the store holds
// (codes, scales, outliers with their indices, sink, residual); capacity is what it may grow to.
struct WorkerKvMemory {
  int worker = 0;
  std::string scheme;
  int64_t bytes_used = 0;
  int64_t bytes_capacity = 0;
  double bits_per_element = 0;
};

// One step of the distributed engine as it ran, for benchmarks: what it carried and how long it took.
struct StepTiming {
  int decode_rows = 0;
  bool prefill = false;       // it carried a prefill chunk
  int prefill_tokens = 0;
  int fills = 0;              // requests it wrote SYNTHETIC FILL for
  double seconds = 0;         // the whole step on the coordinator: plan, compute, reports
  double worker_step_seconds = 0;    // the slowest worker's whole step (plan to report)
  double worker_decode_seconds = 0;  // the slowest worker's decode forward pass
  double merge_seconds = 0;   // worker 1's cross-worker merges in that pass
  int64_t merges = 0;
  std::vector<int64_t> worker_kv_bytes;     // after the step
  std::vector<int64_t> worker_kv_elements;
};

// Timings only the engine sees, reported as they happen. The metrics layer implements it; every call
// comes from the thread that runs Generate.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  virtual void OnDecodeStep(int worker, double seconds) {}
  virtual void OnMerge(double seconds) {}  // one cross-worker merge of attention partials
  virtual void OnStep(const StepTiming& step) {}
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const Tokenizer& tokenizer() const = 0;
  virtual std::string model_name() const = 0;
  virtual int64_t max_context() const = 0;
  // Where requests run, for the closing summary line: "CPU", a GPU's name, "2 workers (CPU)".
  virtual std::string device_name() const { return "CPU"; }
  // How many Generate calls may run at once, each on its own thread: an engine that batches decode steps
  // (the distributed engine's continuous batching) runs them together; 1 means callers serialize.
  virtual int max_concurrent_requests() const { return 1; }
  // Runs one request to completion. Thread-compatible: callers serialize, or use a scheduler.
  virtual absl::StatusOr<GenerationResult> Generate(const GenerationRequest& request,
                                                    const TokenCallback& on_token,
                                                    const PrefillCallback& on_prefill) = 0;

  // Optional hooks for metrics; the defaults report nothing. Called from the thread that runs Generate.
  virtual std::vector<WorkerKvMemory> kv_memory() const { return {}; }
  virtual void set_observer(EngineObserver* observer) {}
  // Whether a request may name `spec` as its kv_scheme ("kvq3", "int4", "kvq3:outliers=0.005", "fp32"):
  // InvalidArgument saying why not. A scheme can still fail at Generate (kvq without calibration).
  virtual absl::Status CheckKvScheme(const std::string& spec) const {
    if (spec == "fp32") return absl::OkStatus();
    return ParseKvScheme(spec).status();
  }
};

}  // namespace kvshard
