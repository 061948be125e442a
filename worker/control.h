// Control-plane messages between the coordinator (MPI rank 0) and the workers (ranks 1..N): what the
// coordinator decides (configuration, placements, prefill chunks, decode batches, token ids) and what
// the workers answer (readiness, sampled token ids, failed requests). Encoded as MessagePack.
//
// The coordinator drives the job in steps. It sends every worker the same StepPlan; each worker does
// its part (collectives keep the workers in lock step inside the step) and answers with a StepReport.
// Worker indices in these messages are 0-based (MPI rank minus one).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/distributed_attention.h"
#include "worker/sampler.h"
#include "worker/synthetic.h"

namespace kvshard {

// Message tags on MPI_COMM_WORLD.
inline constexpr int kCommandTag = 101;  // coordinator -> workers: WorkerCommand
inline constexpr int kReplyTag = 102;    // workers -> coordinator: WorkerHello or StepReport

// Test-only fault injection: at step `step` (counted from the configure command, first step 0), worker
// `worker` fails (its requests fail with an injected error), is killed by SIGKILL, or hangs.
struct FaultInjection {
  int64_t fail_step = -1;
  int64_t kill_step = -1;
  int64_t hang_step = -1;
  int worker = 0;
};

struct WorkerConfig {
  std::string model_path;                         // a .gguf file or a Hugging Face directory, or empty:
  std::optional<SyntheticModelSpec> synthetic;    // ... a synthetic model
  std::string calibration_path;                   // of the calibrated KV schemes; empty: none
  int64_t kv_budget_bytes = 0;                    // KV memory each worker may hold
  int threads = 0;                                // CPU threads per worker; 0: cores / ranks on the node
  std::string device = "auto";                    // auto (a GPU per worker when the node has enough), gpu, cpu
  MergeOptions merge;
  double collective_timeout_s = 300;
  double key_outlier_headroom = 3.0;              // GPU kvq stores: key outlier room (DeviceKvStoreOptions)
  int cuda_graph_rows = 64;                       // GPU workers: GpuModelOptions::graph_rows
  int gpu_prefill_chunk = kDefaultGpuPrefillChunk;  // GPU workers: GpuModelOptions::max_chunk
  FaultInjection faults;
};

struct WorkerHello {
  int worker = 0;
  std::string error;  // empty: ready
  std::string model_name;
  int n_layers = 0;
  int vocab_size = 0;
  int threads = 0;
  std::string device;            // where the worker computes: "CPU (OpenBLAS)", "NVIDIA H200 (GPU 1)", ...
  int64_t kv_budget_bytes = 0;   // the KV memory it offers (a GPU worker: at most what its GPU holds)
  int max_prefill_chunk = 0;     // prompt tokens one prefill step may bring it (as owner or source)
};

// A request the workers learn about: where its tokens go, its scheme and sampling.
struct RequestAlloc {
  int64_t id = 0;
  std::string scheme;
  std::vector<TokenRange> ranges;  // per worker
  int sampler = 0;                 // the worker that samples its tokens
  SamplingParams sampling;
  uint64_t fill_seed = 0;
};

// Synthetic fill: every worker writes up to `tokens_per_worker` more tokens of its part of [0, end).
struct FillWork {
  int64_t id = 0;
  int64_t end = 0;
  int64_t tokens_per_worker = 0;
};

struct PrefillWork {
  int64_t id = 0;
  int64_t first_position = 0;
  std::vector<int32_t> tokens;  // at most CpuModel::max_chunk()
  int owner = 0;
  bool sample = false;          // the last chunk: the sampler samples the first generated token
};

struct DecodeWork {
  int64_t id = 0;
  int32_t token = 0;
  int64_t position = 0;
};

struct StepPlan {
  int64_t step = 0;
  std::vector<RequestAlloc> allocs;
  std::vector<int64_t> frees;
  std::vector<FillWork> fills;
  std::optional<PrefillWork> prefill;
  std::vector<DecodeWork> decode;  // one row per request; the sampler of each samples its next token
};

// A token a worker sampled for a request in a step.
struct ReportedToken {
  int64_t id = 0;
  int32_t token = 0;
};
struct FailedRequest {
  int64_t id = 0;
  std::string message;
};

struct StepReport {
  int64_t step = 0;
  int worker = 0;
  std::vector<ReportedToken> sampled;
  std::vector<FailedRequest> failed;
  int64_t kv_bytes = 0;     // KV bytes this worker holds after the step
  int64_t kv_elements = 0;  // K and V elements they represent
  double step_seconds = 0;    // the whole step on this worker, from the plan to the report
  double decode_seconds = 0;  // the decode forward pass on this worker
  double merge_seconds = 0;   // of which cross-worker merges
  int64_t merges = 0;
  std::string fatal;     // non-empty: the worker cannot go on (a collective failed); the job ends
};

enum class CommandKind { kConfigure, kStep, kReset, kShutdown };

struct WorkerCommand {
  CommandKind kind = CommandKind::kStep;
  WorkerConfig config;  // kConfigure
  StepPlan plan;        // kStep
};

std::string EncodeCommand(const WorkerCommand& command);
absl::StatusOr<WorkerCommand> DecodeCommand(const std::string& bytes);
std::string EncodeHello(const WorkerHello& hello);
absl::StatusOr<WorkerHello> DecodeHello(const std::string& bytes);
std::string EncodeReport(const StepReport& report);
absl::StatusOr<StepReport> DecodeReport(const std::string& bytes);

}  // namespace kvshard
