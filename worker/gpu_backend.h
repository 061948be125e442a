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
  // graph_rows, max_chunk: GpuModelOptions'.
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const ModelWeights& weights, int graph_rows = 64,
                                                            int max_chunk = kDefaultGpuPrefillChunk);
  virtual ~GpuBackend() = default;

  // The GPU's name, for logs.
  virtual std::string device_name() const = 0;
  // Starts a request whose prompt and generated tokens take at most `max_positions` positions: an fp16
  // KV cache of that size on the GPU (refused with ResourceExhausted when it does not fit). `sampling`
  // holds for the whole request.
  virtual absl::Status StartRequest(int64_t max_positions, const SamplingParams& sampling) = 0;
  // Feeds `tokens` (at most max_chunk()) at positions first_position.. and returns the next token, drawn
  // on the GPU as the step-th draw of the request (kernels/sampling.h, as Sampler draws on the CPU; the
  // repetition penalty covers the accepted tokens of Sampler's window).
  virtual absl::StatusOr<int32_t> Feed(std::span<const int32_t> tokens, int64_t first_position, uint64_t step) = 0;
  // Records a generated token for the repetition penalty (as Sampler::Accept).
  virtual void Accept(int32_t token) = 0;
  virtual int max_chunk() const = 0;
};

}  // namespace kvshard
