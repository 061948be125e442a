// Attention over a context sharded by token ranges across workers (DESIGN.md, "Attention partials and
// their merge"). These AttentionContexts let CpuModel::Forward run unchanged on every worker.
//
// Partials: for each query row and head, out (head_dim fp32 values, softmax-normalized over the shard's
// visible tokens) and lse (natural log of the sum of exp(score), fp32); a shard that sees nothing gives
// out = 0, lse = -inf and merges as a no-op.
//
// Errors. Collectives must stay aligned across workers, so a local failure (a shard that cannot append
// or attend, an injected fault) does not leave the layer loop: it is recorded against the request,
// neutral partials (lse = -inf) or nothing are used in its place, and the step goes on; the worker
// reports the failed requests when the step ends. Only a failing collective (a peer gone: the job cannot
// go on) comes back as an error from AppendKv/Attend.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/kv_shard.h"
#include "worker/collectives.h"
#include "worker/forward.h"

namespace kvshard {

// How decode merges the workers' partials each layer.
enum class MergeMode {
  kAllGather,  // one allgather of (out, lse) from every worker, then a local merge (MergePartialsCpu)
  kTree,       // allreduce-max of lse, then allreduce-sum of exp(lse - max) * out and exp(lse - max)
};

struct MergeOptions {
  MergeMode mode = MergeMode::kAllGather;
  WireType wire = WireType::kF32;  // the precision of `out` on the wire; lse is always fp32
};

absl::StatusOr<MergeMode> ParseMergeMode(const std::string& name);   // "allgather" | "tree"
absl::StatusOr<WireType> ParseWireType(const std::string& name);     // "fp32" | "bf16"
std::string MergeModeName(MergeMode mode);
std::string WireTypeName(WireType type);

// Merges every worker's partials of `rows` rows (row r: out[r*head_dim ..], lse[r]) in place: on return
// every worker holds the merged out and lse. Rows where every worker has lse = -inf come out 0 / -inf.
absl::Status MergePartialsAcrossWorkers(Collectives& collectives, const MergeOptions& options, int64_t rows,
                                        int head_dim, float* out, float* lse);

// Where one request's tokens live: ranges[w] = [start, end) of absolute positions on worker w (end
// exclusive; empty when start == end). Ranges are contiguous and in worker order.
struct TokenRange {
  int64_t start = 0;
  int64_t end = 0;
  int64_t size() const { return end - start; }
  bool empty() const { return end <= start; }
  bool contains(int64_t position) const { return position >= start && position < end; }
};

// One worker's part of a request during a step: its shard (null when its range is empty) and, once a
// local operation failed, the error that fails the request.
struct LocalRequestState {
  std::vector<TokenRange> ranges;
  std::unique_ptr<KvShard> shard;
  absl::Status error;
  void Fail(const absl::Status& status) {
    if (error.ok()) error = status;
  }
};

// Test hook and fault injection: makes the first local operation at `layer` fail with `status`.
struct InjectedFault {
  int layer = -1;  // -1: none
  absl::Status status;
};

// Prefill, on the worker that owns the chunk (pass-Q). Its keys/values go into its own shard; for each
// layer its queries go to `sources` (the workers holding earlier tokens of the request), which answer with
// partials (ServePassQ) that are merged with the local causal part, in the order of the sources then the
// local part. One call of Forward covers all layers once: chunks are at most CpuModel::max_chunk().
class PassQPrefillContext final : public AttentionContext {
 public:
  PassQPrefillContext(Collectives& collectives, LocalRequestState& request, const KvGeometry& geometry,
                      std::vector<int> sources, WireType wire, InjectedFault fault = {});
  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v) override;
  absl::Status Attend(int layer, int n_queries, const float* q, const int64_t* positions, float* out) override;
  // Runs the transfers of the layers Forward did not reach (it stopped early on an error), so the
  // sources are released. n_queries is the chunk's.
  absl::Status Drain(int n_queries, int64_t first_position);
  // The first failed transfer: the job cannot go on. OK while the workers are in step.
  const absl::Status& fatal() const { return fatal_; }

 private:
  absl::Status Transfer(absl::Status status);
  absl::Status fatal_;
  Collectives& collectives_;
  LocalRequestState& request_;
  KvGeometry geometry_;
  std::vector<int> sources_;
  WireType wire_;
  InjectedFault fault_;
  int next_layer_ = 0;
  std::vector<uint8_t> send_buffer_;
  std::vector<std::vector<uint8_t>> recv_buffers_;
  std::vector<std::vector<float>> source_out_, source_lse_;
  std::vector<float> local_out_, local_lse_;
};

// Prefill, on a worker holding earlier tokens of the request: for every layer receives the owner's
// `n_queries` queries, computes partials over its shard and sends them back. Local failures are recorded
// on `request` (and answered with lse = -inf); only transfer failures return an error.
absl::Status ServePassQ(Collectives& collectives, LocalRequestState& request, const KvGeometry& geometry,
                        int owner, int n_queries, WireType wire, InjectedFault fault = {});

// Decode (and any step where every worker runs the same rows): row i belongs to rows[i].request at
// position rows[i].position. Each worker appends a row's keys/values only if it holds that position, and
// computes partials over its own shard of the row's request; the partials are merged across all workers
// every layer. Every worker ends with the same attention output.
struct DecodeRow {
  LocalRequestState* request = nullptr;  // null: this worker holds nothing of the row's request
  int64_t position = 0;
};

class DistributedDecodeContext final : public AttentionContext {
 public:
  DistributedDecodeContext(Collectives& collectives, const KvGeometry& geometry, std::vector<DecodeRow> rows,
                           MergeOptions merge, InjectedFault fault = {});
  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v) override;
  absl::Status Attend(int layer, int n_queries, const float* q, const int64_t* positions, float* out) override;
  // Runs the merges of the layers Forward did not reach.
  absl::Status Drain();
  // The first failed merge: the job cannot go on. OK while the workers are in step.
  const absl::Status& fatal() const { return fatal_; }
  // Time spent in cross-worker merges, and their number (one per layer; none with one worker).
  double merge_seconds() const { return merge_seconds_; }
  int64_t merges() const { return merges_; }

 private:
  absl::Status Merge(int64_t rows, float* out, float* lse);
  absl::Status fatal_;
  double merge_seconds_ = 0;
  int64_t merges_ = 0;
  Collectives& collectives_;
  KvGeometry geometry_;
  std::vector<DecodeRow> rows_;
  MergeOptions merge_;
  InjectedFault fault_;
  int next_layer_ = 0;
  std::vector<float> lse_;
};

}  // namespace kvshard
