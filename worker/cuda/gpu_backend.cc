// GpuBackend over GpuModel and GpuKvCache.
#include <optional>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "worker/cuda/gpu_model.h"
#include "worker/gpu_backend.h"
#include "worker/sampler.h"

namespace kvshard {
namespace {

class CudaBackend final : public GpuBackend {
 public:
  explicit CudaBackend(std::unique_ptr<GpuModel> model) : model_(std::move(model)) {}

  std::string device_name() const override {
    int device = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "GPU";
    return prop.name;
  }

  absl::Status StartRequest(int64_t max_positions, const SamplingParams& sampling) override {
    sampler_.emplace(sampling);
    if (cache_ != nullptr && cache_->capacity() >= max_positions) {
      cache_->Clear();
      return absl::OkStatus();
    }
    cache_.reset();  // free the old cache before sizing the new one
    KV_ASSIGN_OR_RETURN(cache_, GpuKvCache::Create(model_->kv_geometry(), max_positions));
    return absl::OkStatus();
  }

  absl::StatusOr<int32_t> Feed(std::span<const int32_t> tokens, int64_t first_position, uint64_t step) override {
    if (cache_ == nullptr || !sampler_) return absl::FailedPreconditionError("Feed before StartRequest");
    TokenSampling s = sampler_->TakeDraw();
    s.step = step;  // the caller numbers the draws: every prefill chunk draws, only the last one counts
    return model_->Forward(tokens, first_position, *cache_, &s, nullptr, sampler_->recent());
  }

  void Accept(int32_t token) override {
    if (sampler_) sampler_->Accept(token);
  }

  int max_chunk() const override { return model_->max_chunk(); }

 private:
  std::unique_ptr<GpuModel> model_;
  std::unique_ptr<GpuKvCache> cache_;
  std::optional<Sampler> sampler_;  // the request's settings and the repetition penalty's window
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const ModelWeights& weights, int graph_rows,
                                                               int max_chunk) {
  if (CudaDeviceCount() == 0) return absl::UnavailableError("no CUDA GPU on this host");
  GpuModelOptions options;
  options.graph_rows = graph_rows;
  options.max_chunk = max_chunk;
  KV_ASSIGN_OR_RETURN(std::unique_ptr<GpuModel> model, GpuModel::Create(weights, options));
  return std::unique_ptr<GpuBackend>(new CudaBackend(std::move(model)));
}

}  // namespace kvshard
