// The engine's view of the GPU backend: the whole forward pass and the sampling on one GPU, for one
// request at a time. CUDA builds implement it in worker/cuda/gpu_backend.cc (over GpuModel and
// GpuKvCache); other builds link worker/gpu_backend_stub.cc, which answers Unavailable.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "worker/model.h"
#include "worker/sampler.h"

namespace kvshard {

class GpuBackend {
 public:
  // Unavailable when this build has no CUDA backend or the host has no GPU; ResourceExhausted, naming
  // the bytes needed and free, when the model does not fit the GPU. Keeps a reference to `weights`.
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const ModelWeights& weights);
  virtual ~GpuBackend() = default;

  // The GPU's name, for logs.
  virtual std::string device_name() const = 0;
  // Starts a request whose prompt and generated tokens take at most `max_positions` positions: an fp16
  // KV cache of that size on the GPU (refused with ResourceExhausted when it does not fit).
  virtual absl::Status StartRequest(int64_t max_positions) = 0;
  // Feeds `tokens` (at most max_chunk()) at positions first_position.. and returns the next token, drawn
  // on the GPU with `sampling` as the step-th draw of the request (kernels/sampling.h: greedy picks the
  // lowest id among equal logits, like Sampler; other settings use the device's counter-based stream).
  virtual absl::StatusOr<int32_t> Feed(std::span<const int32_t> tokens, int64_t first_position,
                                       const SamplingParams& sampling, uint64_t step) = 0;
  virtual int max_chunk() const = 0;
};

}  // namespace kvshard
