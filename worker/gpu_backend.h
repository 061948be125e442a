// The engine's view of the GPU backend: the whole forward pass and the sampling on one GPU, for one
// request at a time, with the request's KV on the GPU in fp16 (GpuKvCache) or in a kvq scheme
// (DeviceKvStore). CUDA builds implement it in worker/cuda/gpu_backend.cc; other builds link
// worker/gpu_backend_stub.cc, which answers Unavailable.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_scheme.h"
#include "kvstore/kv_shard.h"
#include "worker/model.h"
#include "worker/sampler.h"

namespace kvshard {

struct GpuBackendOptions {
  int graph_rows = 64;                      // GpuModelOptions::graph_rows
  int max_chunk = kDefaultGpuPrefillChunk;  // GpuModelOptions::max_chunk
  // The kvq schemes' tables; without one the GPU holds fp16 only.
  std::shared_ptr<const Calibration> calibration;
  double key_outlier_headroom = 3.0;  // DeviceKvStoreOptions::key_outlier_headroom
};

class GpuBackend {
 public:
  // Unavailable when this build has no CUDA backend or the host has no GPU; ResourceExhausted, naming
  // the bytes needed and free, when the model does not fit the GPU. Keeps a reference to `weights`.
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const ModelWeights& weights,
                                                            const GpuBackendOptions& options = {});
  virtual ~GpuBackend() = default;

  // The GPU's name, for logs.
  virtual std::string device_name() const = 0;
  // Whether requests of `scheme` run here: fp16, and kvq2..4 when the backend has a calibration. The
  // others (and kvq ablations) run on the CPU.
  virtual bool Holds(const KvSchemeConfig& scheme) const = 0;
  // Starts a request whose prompt and generated tokens take at most `max_positions` positions: a KV
  // cache of that size on the GPU in `scheme` (refused with ResourceExhausted when it does not fit).
  // `sampling` holds for the whole request.
  virtual absl::Status StartRequest(int64_t max_positions, const KvSchemeConfig& scheme,
                                    const SamplingParams& sampling) = 0;
  // Feeds `tokens` (at most max_chunk()) at positions first_position.. and returns the next token, drawn
  // on the GPU as the step-th draw of the request (kernels/sampling.h, as Sampler draws on the CPU; the
  // repetition penalty covers the accepted tokens of Sampler's window).
  virtual absl::StatusOr<int32_t> Feed(std::span<const int32_t> tokens, int64_t first_position, uint64_t step) = 0;
  // Records a generated token for the repetition penalty (as Sampler::Accept).
  virtual void Accept(int32_t token) = 0;
  // The running request's KV, counted as KvShard::Memory counts it. Waits for the device.
  virtual KvMemory kv_memory() const = 0;
  virtual int max_chunk() const = 0;
};

}  // namespace kvshard
