// MakeGpuKvWindows: calibration activations from the GPU forward pass (see worker/gpu_kv_windows.h).
#include "worker/gpu_kv_windows.h"

#include <algorithm>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "worker/cuda/gpu_model.h"

namespace kvshard {
namespace {

// The fp16 cache as the window's attention context; each layer's new K/V also go down to the host for
// the observer before they are appended.
class ObservedKvCache final : public GpuAttentionContext {
 public:
  ObservedKvCache(GpuKvCache& cache, const KvGeometry& geometry) : cache_(cache), geometry_(geometry) {}

  void set_observer(const KvObserver* observer) { observer_ = observer; }

  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride,
                        const int64_t* positions, cudaStream_t stream) override {
    if (observer_ != nullptr && *observer_) {
      const size_t width = static_cast<size_t>(geometry_.n_kv_heads) * geometry_.head_dim;
      host_k_.resize(static_cast<size_t>(n_tokens) * width);
      host_v_.resize(host_k_.size());
      const size_t pitch = static_cast<size_t>(row_stride) * sizeof(float);
      CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(host_k_.data(), width * sizeof(float), k, pitch, width * sizeof(float),
                                             n_tokens, cudaMemcpyDeviceToHost, stream));
      CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(host_v_.data(), width * sizeof(float), v, pitch, width * sizeof(float),
                                             n_tokens, cudaMemcpyDeviceToHost, stream));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      (*observer_)(layer, n_tokens, host_k_.data(), host_v_.data());
    }
    return cache_.AppendKv(layer, n_tokens, k, v, row_stride, positions, stream);
  }

  absl::Status Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t first_position, float* out,
                      cudaStream_t stream) override {
    return cache_.Attend(layer, n_queries, q, q_stride, first_position, out, stream);
  }

 private:
  GpuKvCache& cache_;
  KvGeometry geometry_;
  const KvObserver* observer_ = nullptr;
  std::vector<float> host_k_, host_v_;
};

class CudaKvWindows final : public GpuKvWindows {
 public:
  CudaKvWindows(std::unique_ptr<GpuModel> model, std::unique_ptr<GpuKvCache> cache)
      : model_(std::move(model)), cache_(std::move(cache)), context_(*cache_, model_->kv_geometry()) {}

  absl::Status Run(std::span<const int32_t> window, const KvObserver& observer) override {
    if (static_cast<int64_t>(window.size()) > cache_->capacity()) {
      return absl::InvalidArgumentError(
          absl::StrCat("a calibration window of ", window.size(), " tokens; the GPU cache holds ", cache_->capacity()));
    }
    cache_->Clear();
    context_.set_observer(&observer);
    absl::Status status;
    for (size_t c0 = 0; c0 < window.size() && status.ok(); c0 += static_cast<size_t>(model_->max_chunk())) {
      const size_t n = std::min(window.size() - c0, static_cast<size_t>(model_->max_chunk()));
      status = model_->Forward(window.subspan(c0, n), static_cast<int64_t>(c0), context_, nullptr, nullptr).status();
    }
    context_.set_observer(nullptr);
    return status;
  }

 private:
  std::unique_ptr<GpuModel> model_;
  std::unique_ptr<GpuKvCache> cache_;
  ObservedKvCache context_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuKvWindows>> MakeGpuKvWindows(const ModelWeights& weights, int64_t max_window) {
  if (CudaDeviceCount() == 0) return absl::UnavailableError("no CUDA GPU on this host");
  if (max_window < 1) return absl::InvalidArgumentError("MakeGpuKvWindows: the window must hold a token");
  GpuModelOptions options;
  options.graph_rows = 0;  // chunks of a whole window: nothing to replay
  KV_ASSIGN_OR_RETURN(std::unique_ptr<GpuModel> model, GpuModel::Create(weights, options));
  KV_ASSIGN_OR_RETURN(std::unique_ptr<GpuKvCache> cache, GpuKvCache::Create(model->kv_geometry(), max_window));
  return std::unique_ptr<GpuKvWindows>(new CudaKvWindows(std::move(model), std::move(cache)));
}

}  // namespace kvshard
