// GpuBackend over GpuModel and GpuKvCache.
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "worker/cuda/gpu_model.h"
#include "worker/gpu_backend.h"

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
    sampling_ = sampling;
    recent_.clear();
    recent_next_ = 0;
    if (cache_ != nullptr && cache_->capacity() >= max_positions) {
      cache_->Clear();
      return absl::OkStatus();
    }
    cache_.reset();  // free the old cache before sizing the new one
    KV_ASSIGN_OR_RETURN(cache_, GpuKvCache::Create(model_->kv_geometry(), max_positions));
    return absl::OkStatus();
  }

  absl::StatusOr<int32_t> Feed(std::span<const int32_t> tokens, int64_t first_position, uint64_t step) override {
    if (cache_ == nullptr) return absl::FailedPreconditionError("Feed before StartRequest");
    TokenSampling s;
    s.temperature = sampling_.temperature;
    s.top_k = sampling_.top_k;
    s.top_p = sampling_.top_p;
    s.repetition_penalty = sampling_.repetition_penalty;
    s.seed = sampling_.seed;
    s.step = step;
    return model_->Forward(tokens, first_position, *cache_, &s, nullptr, recent_);
  }

  void Accept(int32_t token) override {  // the ring of Sampler::Accept
    if (sampling_.repetition_penalty == 1.0f || sampling_.repetition_window <= 0) return;
    if (recent_.size() < static_cast<size_t>(sampling_.repetition_window)) {
      recent_.push_back(token);
    } else {
      recent_[recent_next_] = token;
      recent_next_ = (recent_next_ + 1) % recent_.size();
    }
  }

  int max_chunk() const override { return model_->max_chunk(); }

 private:
  std::unique_ptr<GpuModel> model_;
  std::unique_ptr<GpuKvCache> cache_;
  SamplingParams sampling_;
  std::vector<int32_t> recent_;  // the last repetition_window accepted tokens (a ring)
  size_t recent_next_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const ModelWeights& weights) {
  if (CudaDeviceCount() == 0) return absl::UnavailableError("no CUDA GPU on this host");
  KV_ASSIGN_OR_RETURN(std::unique_ptr<GpuModel> model, GpuModel::Create(weights, GpuModelOptions{}));
  return std::unique_ptr<GpuBackend>(new CudaBackend(std::move(model)));
}

}  // namespace kvshard
