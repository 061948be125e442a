#include "worker/cuda/sequence_context.h"

#include <span>

#include "common/status.h"

namespace kvshard {

absl::Status StoreSequenceContext::AppendKv(int layer, int n_tokens, const float* k, const float* v,
                                            int64_t row_stride, const int64_t*, cudaStream_t stream) {
  return store_.Append(layer, id_, n_tokens, k, v, row_stride, stream);
}

absl::Status StoreSequenceContext::Attend(int layer, int n_queries, const float* q, int64_t q_stride,
                                          int64_t first_position, float* out, cudaStream_t stream) {
  const int64_t lse_bytes = static_cast<int64_t>(n_queries) * n_heads_ * 4;
  if (lse_.bytes() < lse_bytes) {
    lse_ = DeviceMemory();
    KV_ASSIGN_OR_RETURN(lse_, DeviceMemory::Allocate(lse_bytes, "attention lse"));
  }
  if (n_queries == 1) {  // a decode step: the split-KV decode kernel over everything stored
    const int64_t ids[1] = {id_};
    return store_.AttendRows(layer, std::span<const int64_t>(ids, 1), q, q_stride, out, lse_.as<float>(), stream);
  }
  return store_.AttendChunk(layer, id_, n_queries, q, q_stride, first_position, out, lse_.as<float>(), stream);
}

}  // namespace kvshard
