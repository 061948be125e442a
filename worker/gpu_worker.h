// The GPU compute of one worker of the distributed runtime (worker/worker_runtime.h): the replicated
// dense layers on its GPU (GpuModel), the KV of its token ranges in device memory (DeviceKvStore) and
// the data plane among the workers over NCCL (pass-Q transfers in prefill, the partials merge in
// decode). The worker runtime keeps the control flow, the request states, the samplers and the failure
// reports; it hands this object the GPU parts of each step.
//
// Errors follow worker/distributed_attention.h: a local failure of one request (a store that cannot take
// a token, an injected fault) is returned in that request's error slot while the layer loop goes on with
// neutral partials, so the collectives stay aligned; a failed or timed-out collective comes back as the
// call's status, and the job cannot go on.
//
// CUDA builds with NCCL implement it in worker/cuda/gpu_worker.cc; other builds link
// worker/gpu_worker_stub.cc, whose Create answers Unavailable.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/sampling.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_shard.h"
#include "worker/collectives.h"
#include "worker/distributed_attention.h"
#include "worker/model.h"

namespace kvshard {

struct GpuWorkerOptions {
  int device = 0;  // CUDA device index
  MergeOptions merge;
  absl::Duration collective_timeout = absl::Minutes(5);
  int64_t kv_budget_bytes = 0;  // device memory for KV at most (also bounded by what the GPU has free)
  std::shared_ptr<const Calibration> calibration;  // of the calibrated schemes; may be null
  int max_decode_rows = 64;
  double key_outlier_headroom = 3.0;  // DeviceKvStoreOptions::key_outlier_headroom
  int graph_rows = 64;                // GpuModelOptions::graph_rows
  int max_chunk = kDefaultGpuPrefillChunk;  // GpuModelOptions::max_chunk: prompt tokens per prefill step
};

// One row of a decode step as this worker sees it.
struct GpuDecodeRow {
  int64_t id = 0;
  int32_t token = 0;
  int64_t position = 0;
  bool held = false;     // this worker holds tokens of the request: it computes partials for the row
  bool appends = false;  // this worker holds the row's position: the row's KV goes into its store
  bool failed = false;   // the request already failed here: neutral partials, nothing appended
  // When set, the row's next token is drawn on this worker's GPU with these settings (Sampler::TakeDraw),
  // the repetition penalty covering `recent` (Sampler::recent(); the span must outlive the call).
  std::optional<TokenSampling> draw;
  std::span<const int32_t> recent;
};

class GpuWorker {
 public:
  // Unavailable when this build has no CUDA backend with NCCL, or the device does not exist. Joins the
  // NCCL communicator of all workers (collective: every worker calls Create; `bootstrap`, the MPI
  // collectives of the workers, carries the NCCL id and whether every worker has its model).
  static absl::StatusOr<std::unique_ptr<GpuWorker>> Create(const ModelWeights& weights, Collectives& bootstrap,
                                                           const GpuWorkerOptions& options);
  // The number of CUDA devices this host has (0 without a CUDA build).
  static int DeviceCount();
  virtual ~GpuWorker() = default;

  virtual std::string device_name() const = 0;
  // Device memory the KV stores may use.
  virtual int64_t kv_budget_bytes() const = 0;
  virtual KvGeometry kv_geometry() const = 0;

  // Reserves room for `capacity` tokens of request `id` from absolute position `start_position`, in
  // scheme `scheme` (a job's GPU workers hold one scheme; another is refused with a clear error).
  virtual absl::Status AddRequest(int64_t id, const std::string& scheme, int64_t start_position,
                                  int64_t capacity) = 0;
  virtual void RemoveRequest(int64_t id) = 0;
  virtual bool Holds(int64_t id) const = 0;
  // Tokens of `id` stored in every layer (0 for an unknown id).
  virtual int64_t length(int64_t id) const = 0;
  virtual absl::Status Fill(int64_t id, int64_t end, uint64_t seed) = 0;
  virtual absl::Status Seal(int64_t id) = 0;
  virtual KvMemory Memory() const = 0;

  // A prefill chunk on its owner: `tokens` at first_position.., KV appended here; the queries of every
  // layer go to `sources` (workers holding earlier tokens), whose partials merge with the local causal
  // part (sources in order, then the local part). When `logits` is not null it gets the last token's
  // logits [vocab]. `failed`: the request failed here already (the transfers still run).
  virtual absl::Status PrefillOwner(int64_t id, std::span<const int32_t> tokens, int64_t first_position,
                                    std::span<const int> sources, bool failed, const InjectedFault& fault,
                                    std::vector<float>* logits, absl::Status* error) = 0;
  // A prefill chunk on a source: for every layer receives the owner's queries and answers with partials
  // over this worker's tokens of `id`.
  virtual absl::Status PrefillSource(int64_t id, int owner, int n_queries, int64_t first_position, bool failed,
                                     const InjectedFault& fault, absl::Status* error) = 0;
  // A decode step over `rows`; every worker runs the same rows. (*tokens)[i] gets the token drawn on the
  // device for each row with a `draw` (-1 for the others): only token ids leave the GPU. logits gets
  // [rows][vocab] of the rows with want_logits[i] (others left unset), before any penalty, when any is
  // wanted; errors[i] the local failure of row i. merge_seconds, merges: the cross-worker merges (GPU time, and
  // one per layer; none with one worker).
  virtual absl::Status Decode(std::span<const GpuDecodeRow> rows, const std::vector<bool>& want_logits,
                              const InjectedFault& fault, std::vector<float>* logits, std::vector<int32_t>* tokens,
                              std::vector<absl::Status>* errors, double* merge_seconds, int64_t* merges) = 0;
};

}  // namespace kvshard
