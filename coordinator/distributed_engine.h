// The distributed engine: rank 0 of `mpirun -np N+1 kvshard ...`, and in single-process mode the same engine
// over one in-process worker (CreateInProcess), so every front end runs unchanged and batches alike.
//
// A scheduler thread owns the control plane. Each step it sends every worker one StepPlan:
//   - new requests with their placement (coordinator/placement.h), finished ones to free;
//   - synthetic fill work (a capacity-run option; reported as "SYNTHETIC FILL");
//   - one prefill chunk (chunked, causal, pass-Q: the chunk's owner computes it, the workers holding
//     earlier tokens answer with partials every layer);
//   - one decode row per decoding request (continuous batching: requests join after their prefill and
//     leave when done; every worker runs the replicated dense layers, partials are merged per layer).
// and waits for every worker's report (sampled token ids, failed requests). Generate() runs on the
// caller's thread: it queues the request and streams the scheduler's events into the callbacks.
//
// Admission control: a request whose context (fill + prompt + max generated tokens) exceeds the workers'
// total KV capacity under its scheme is refused with an error naming the capacity; one that fits the
// idle workers waits for room. Workers never see a request that cannot fit.
//
// Faults: a worker's local failure fails the requests it touched, with the worker's message, and the
// engine goes on. A worker that does not report a step within the timeout, or reports a failed
// collective, ends the whole job (MPI_Abort) with a message naming the rank; a rank killed by a signal
// is caught by mpirun, which ends the job.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/engine.h"
#include "coordinator/placement.h"
#include "worker/control.h"
#include "worker/kv_shard_factory.h"
#include "worker/model.h"
#include "worker/in_process_job.h"
#include "worker/job_runtime.h"

namespace kvshard {

struct DistributedEngineOptions {
  std::string default_kv_scheme = "fp16";
  // Probes the bytes per token of a scheme on the coordinator (the workers make their own shards).
  KvShardFactory kv_factory = DefaultKvShardFactory();
  WorkerConfig worker;  // model, KV budget, threads, merge, collective timeout, test faults
  PlacementOptions placement;
  int64_t synthetic_fill_tokens = 0;  // SYNTHETIC FILL: KV of this many tokens before every prompt
  uint64_t synthetic_fill_seed = 1;
  int64_t fill_tokens_per_step = 1 << 16;  // per worker
  int max_batch = 64;                       // decode rows per step
  double worker_timeout_s = 600;            // a step's (or configure's) reports must arrive within this
  // Prompt tokens per prefill step; Create sets it to the least any worker takes (WorkerHello).
  int prefill_chunk = 0;
};

struct DistributedEngineStats {
  int64_t steps = 0;
  int64_t decode_steps = 0;
  double decode_step_seconds = 0;  // summed over decode steps (whole step: plan, compute, reports)
  int64_t decode_rows = 0;
  std::vector<int64_t> worker_kv_bytes;     // KV bytes each worker held after the last step (for metrics)
  std::vector<int64_t> worker_kv_elements;  // the K and V elements they represent
};

// The error of a request that failed on a worker (`message`, as the worker reported it), with advice where
// the cause is known: SYNTHETIC FILL keys (synthetic_fill_tokens > 0) whose kvq outliers outgrew their room
// need a calibration of the fill.
std::string FailureWithAdvice(std::string message, int64_t synthetic_fill_tokens);

class DistributedEngine final : public Engine {
 public:
  // Configures the workers (each loads the model) and waits until all are ready. `config` and `tokenizer`
  // are the coordinator's view of the model (it holds no weights).
  static absl::StatusOr<std::unique_ptr<DistributedEngine>> Create(JobRuntime& job, ModelConfig config,
                                                                   std::unique_ptr<Tokenizer> tokenizer,
                                                                   DistributedEngineOptions options);
  // Single-process mode: the same engine over one worker thread of this process (worker/in_process_job.h),
  // which the engine owns and shuts down last.
  static absl::StatusOr<std::unique_ptr<DistributedEngine>> CreateInProcess(ModelConfig config,
                                                                            std::unique_ptr<Tokenizer> tokenizer,
                                                                            DistributedEngineOptions options,
                                                                            KvShardFactoryMaker kv_factories);
  ~DistributedEngine() override;

  const Tokenizer& tokenizer() const override { return *tokenizer_; }
  std::string model_name() const override { return config_.name; }
  const ModelConfig& model_config() const { return config_; }
  int64_t max_context() const override { return config_.max_context; }
  std::string device_name() const override;
  int n_workers() const { return static_cast<int>(budgets_.size()); }
  const DistributedEngineOptions& options() const { return options_; }
  DistributedEngineStats stats() const;

  // Per worker: KV bytes held after the last step, the budget, bits per element.
  std::vector<WorkerKvMemory> kv_memory() const override;
  // Decode-step and merge times reach the observer from the engine's scheduler thread.
  void set_observer(EngineObserver* observer) override { observer_ = observer; }

  // Its decode batch: that many concurrent Generate calls decode in one step.
  int max_concurrent_requests() const override { return std::max(1, options_.max_batch); }
  // Thread-safe: concurrent calls are batched together.
  absl::StatusOr<GenerationResult> Generate(const GenerationRequest& request, const TokenCallback& on_token,
                                            const PrefillCallback& on_prefill) override;

  struct Request;  // scheduler state of one request (distributed_engine.cc)

 private:
  DistributedEngine(JobRuntime& job, ModelConfig config, std::unique_ptr<Tokenizer> tokenizer,
                    DistributedEngineOptions options, std::vector<int64_t> budgets, std::vector<std::string> devices);
  void SchedulerLoop();
  void Admit(StepPlan& plan);
  void BuildWork(StepPlan& plan);
  void RunStep(const StepPlan& plan);
  void Finish(const std::shared_ptr<Request>& request, const absl::Status& status);
  struct SchemeCost {
    int64_t per_token = 0;  // marginal KV bytes of one more token (all layers)
    int64_t per_shard = 0;  // fixed bytes of a non-empty shard beyond that (fp16 sink and residual)
  };
  absl::StatusOr<SchemeCost> CostOf(const std::string& scheme);

  JobRuntime& job_;
  std::unique_ptr<InProcessJob> in_process_job_;  // single-process mode: job_ is its coordinator end
  ModelConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<int32_t> stop_ids_;
  DistributedEngineOptions options_;
  std::vector<int64_t> budgets_;   // per worker
  std::vector<std::string> devices_;  // per worker: where it computes
  std::vector<int64_t> reserved_;  // per worker, bytes placed requests hold

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Request>> incoming_;  // guarded by mu_
  bool stop_ = false;                              // guarded by mu_
  mutable std::mutex stats_mu_;
  DistributedEngineStats stats_;
  std::atomic<EngineObserver*> observer_{nullptr};

  // Scheduler thread only.
  std::deque<std::shared_ptr<Request>> queued_;
  std::map<int64_t, std::shared_ptr<Request>> active_;  // by id: admission order
  std::vector<int64_t> frees_;
  std::map<std::string, SchemeCost> scheme_costs_;
  int64_t next_id_ = 1;
  int64_t next_step_ = 0;
  size_t decode_rotation_ = 0;
  std::thread scheduler_;
};

}  // namespace kvshard
