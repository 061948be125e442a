// Windows of tokens through the model on the GPU for `kvshard calibrate`: each window runs from position 0
// over its own fp16 KV cache, and every layer's new keys (pre-RoPE) and values go to a KvObserver on the
// host, as CpuModel::set_kv_observer hands them over on the CPU (here from the GPU's bf16 dense layers).
// CUDA builds implement it in worker/cuda/gpu_kv_windows.cc; others answer Unavailable.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "worker/forward.h"
#include "worker/model.h"

namespace kvshard {

class GpuKvWindows {
 public:
  virtual ~GpuKvWindows() = default;
  // Runs `window` (at most the max_window given at creation) from position 0. The observer sees each
  // chunk's K/V layer by layer, chunks in order: [n_tokens][n_kv_heads][head_dim] fp32.
  virtual absl::Status Run(std::span<const int32_t> window, const KvObserver& observer) = 0;
};

// Uploads the weights once for every window. Unavailable without a GPU or a CUDA build; ResourceExhausted
// when the model or a window's KV does not fit.
absl::StatusOr<std::unique_ptr<GpuKvWindows>> MakeGpuKvWindows(const ModelWeights& weights, int64_t max_window);

}  // namespace kvshard
