// Perplexity windows scored on the GPU (`kvshard perplexity --device gpu`): the dense layers on
// GpuModel, the KV in a DeviceKvStore of the scheme, and every token fed as one decode step, so each
// prediction sees exactly what decode at its position sees (the quantized KV of earlier tokens, the
// sink and the residual window of that moment). Windows run side by side as the rows of one decode
// batch. CUDA builds implement it in worker/cuda/gpu_perplexity.cc; others answer Unavailable.
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/statusor.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_scheme.h"
#include "worker/model.h"

namespace kvshard {

struct GpuWindowScores {
  int64_t windows = 0;
  int64_t scored_tokens = 0;  // ctx - 1 per window
  double nll_sum = 0;         // nats, summed over the scored tokens
  double bits_sum = 0;        // the store's all-in bits/element at each window's end, summed over windows
};

// Scores `windows` non-overlapping windows of `ctx` tokens from the start of `tokens` (each window an
// empty sequence at position 0), at most `batch` windows at a time. Schemes: those DeviceKvStore holds
// (fp16, kvq2..4); others are Unimplemented. Unavailable without a GPU or CUDA build.
absl::StatusOr<GpuWindowScores> ScoreWindowsOnGpu(const ModelWeights& weights, std::span<const int32_t> tokens,
                                                  int64_t ctx, int64_t windows, const KvSchemeConfig& scheme,
                                                  const Calibration* calibration, int batch, bool show_progress);

}  // namespace kvshard
