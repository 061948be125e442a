// The cross-worker merge of attention partials on the GPU: the device twin of MergePartialsAcrossWorkers
// (worker/distributed_attention.h) over device buffers, through NCCL (worker/cuda/nccl_collectives.h) and
// the merge kernels of kernels/cuda/attention.h. Same modes, wire types and result conventions:
//   - allgather: each worker packs (out in the wire type, lse fp32) into one record, one ncclAllGather
//     (in place) lays the records end to end, and every worker merges them with the same kernel in the
//     same order, so all workers end bit-identical;
//   - tree: an all-reduce max of lse gives M; a = exp(lse - M); an all-reduce sum of [a * out, a] (one
//     call for fp32; for bf16, the bf16 numerators and the fp32 weights are two calls in one group); then
//     out = sum(a * out) / sum(a) and lse = M + ln sum(a).
// Rows where every worker has lse = -inf come out 0 / -inf. Everything is enqueued on the
// communicator's stream; the result is there for later work on that stream.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/nccl_collectives.h"
#include "worker/distributed_attention.h"

namespace kvshard {

class NcclPartialsMerger {
 public:
  explicit NcclPartialsMerger(NcclCollectives& nccl) : nccl_(nccl) {}
  ~NcclPartialsMerger();
  NcclPartialsMerger(const NcclPartialsMerger&) = delete;
  NcclPartialsMerger& operator=(const NcclPartialsMerger&) = delete;

  // In place over device buffers out [rows][head_dim] fp32 and lse [rows] fp32 (head_dim a multiple of 4,
  // at most 256). The workspace grows on demand (stream-ordered allocation).
  absl::Status Merge(const MergeOptions& options, int64_t rows, int head_dim, float* out, float* lse);

  // Bytes of wire traffic one worker contributes per merge (for benchmarks).
  static int64_t WireBytesPerWorker(const MergeOptions& options, int64_t rows, int head_dim);

 private:
  absl::StatusOr<char*> Workspace(int64_t bytes);
  absl::Status MergeByAllGather(WireType wire, int64_t rows, int head_dim, float* out, float* lse);
  absl::Status MergeByTree(WireType wire, int64_t rows, int head_dim, float* out, float* lse);

  NcclCollectives& nccl_;
  void* workspace_ = nullptr;
  int64_t capacity_ = 0;
};

}  // namespace kvshard
