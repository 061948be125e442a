#include "worker/cuda/nccl_merge.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"

namespace kvshard {
namespace {

int64_t Align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

DType WireDType(WireType wire) { return wire == WireType::kBf16 ? DType::kBF16 : DType::kF32; }

}  // namespace

NcclPartialsMerger::~NcclPartialsMerger() {
  if (workspace_ != nullptr) cudaFreeAsync(workspace_, nccl_.stream());
}

absl::StatusOr<char*> NcclPartialsMerger::Workspace(int64_t bytes) {
  if (bytes > capacity_) {
    // Stream-ordered: the old buffer is released after the work already enqueued that uses it.
    if (workspace_ != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeAsync(workspace_, nccl_.stream()));
    workspace_ = nullptr;
    capacity_ = 0;
    CUDA_RETURN_IF_ERROR(cudaMallocAsync(&workspace_, bytes, nccl_.stream()));
    capacity_ = bytes;
  }
  return static_cast<char*>(workspace_);
}

int64_t NcclPartialsMerger::WireBytesPerWorker(const MergeOptions& options, int64_t rows, int head_dim) {
  if (options.mode == MergeMode::kAllGather) return PartialsRecordBytes(rows, head_dim, WireDType(options.wire));
  return rows * 4 + rows * head_dim * WireTypeBytes(options.wire) + rows * 4;
}

absl::Status NcclPartialsMerger::Merge(const MergeOptions& options, int64_t rows, int head_dim, float* out,
                                       float* lse) {
  if (rows < 0 || head_dim <= 0 || head_dim % 4 != 0 || head_dim > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU merge of partials: bad shape rows=", rows, " head_dim=", head_dim));
  }
  // One worker's partials are already the merged result: no pack, collective or merge kernel (as the CPU
  // twin, MergePartialsAcrossWorkers).
  if (rows == 0 || nccl_.size() == 1) return absl::OkStatus();
  if (options.mode == MergeMode::kTree) return MergeByTree(options.wire, rows, head_dim, out, lse);
  return MergeByAllGather(options.wire, rows, head_dim, out, lse);
}

absl::Status NcclPartialsMerger::MergeByAllGather(WireType wire, int64_t rows, int head_dim, float* out,
                                                  float* lse) {
  const DType dtype = WireDType(wire);
  const int n = nccl_.size();
  const int64_t record = PartialsRecordBytes(rows, head_dim, dtype);
  KV_ASSIGN_OR_RETURN(char* gathered, Workspace(record * n));
  char* mine = gathered + record * nccl_.rank();  // in place: this worker's slot is its send buffer
  cudaStream_t stream = nccl_.stream();
  KV_RETURN_IF_ERROR(PackPartialsCuda(out, lse, rows, head_dim, dtype, mine, stream));
  KV_RETURN_IF_ERROR(nccl_.AllGather(mine, gathered, record));
  return MergePartialRecordsCuda(gathered, dtype, n, rows, head_dim, out, lse, stream);
}

absl::Status NcclPartialsMerger::MergeByTree(WireType wire, int64_t rows, int head_dim, float* out, float* lse) {
  const DType dtype = WireDType(wire);
  const int64_t n_out = rows * head_dim;
  const int64_t max_bytes = Align16(rows * 4);
  const int64_t numerator_bytes = wire == WireType::kF32 ? n_out * 4 : Align16(n_out * 2);
  KV_ASSIGN_OR_RETURN(char* ws, Workspace(max_bytes + numerator_bytes + rows * 4));
  float* max_lse = reinterpret_cast<float*>(ws);
  void* numerators = ws + max_bytes;
  float* weights = reinterpret_cast<float*>(ws + max_bytes + numerator_bytes);  // right after fp32 numerators
  cudaStream_t stream = nccl_.stream();
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(max_lse, lse, rows * sizeof(float), cudaMemcpyDeviceToDevice, stream));
  KV_RETURN_IF_ERROR(nccl_.AllReduce(max_lse, rows, WireType::kF32, ReduceOp::kMax));
  KV_RETURN_IF_ERROR(TreeMergeScaleCuda(out, lse, max_lse, rows, head_dim, dtype, numerators, weights, stream));
  if (wire == WireType::kF32) {
    KV_RETURN_IF_ERROR(nccl_.AllReduce(numerators, n_out + rows, WireType::kF32, ReduceOp::kSum));
  } else {
    const NcclCollectives::Reduction sums[] = {{numerators, n_out, WireType::kBf16, ReduceOp::kSum},
                                               {weights, rows, WireType::kF32, ReduceOp::kSum}};
    KV_RETURN_IF_ERROR(nccl_.AllReduces(sums));  // one group: one launch
  }
  return TreeMergeFinishCuda(numerators, weights, max_lse, rows, head_dim, dtype, out, lse, stream);
}

}  // namespace kvshard
