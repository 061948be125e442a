// One sequence of a DeviceKvStore as a request's whole attention context (single-process mode): the
// store holds every earlier token, so its partials are the attention output itself. A chunk appends its
// K/V, then its queries attend causally (AttendChunk); a one-token step runs the decode kernel
// (AttendRows), as a GPU worker that holds all of a request does.
#pragma once

#include <cstdint>

#include "worker/cuda/device_kv_store.h"
#include "worker/cuda/gpu_model.h"

namespace kvshard {

class StoreSequenceContext final : public GpuAttentionContext {
 public:
  // `store` must hold sequence `id` and outlive this object. n_heads: the model's query heads.
  StoreSequenceContext(DeviceKvStore& store, int64_t id, int n_heads) : store_(store), id_(id), n_heads_(n_heads) {}

  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride,
                        const int64_t* positions, cudaStream_t stream) override;
  absl::Status Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t first_position, float* out,
                      cudaStream_t stream) override;

 private:
  DeviceKvStore& store_;
  int64_t id_;
  int n_heads_;
  DeviceMemory lse_;  // fp32 [rows][n_heads]: the store returns it; one context needs none
};

}  // namespace kvshard
