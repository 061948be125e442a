// GpuBackend over GpuModel, with the request's KV in a GpuKvCache (fp16) or one sequence of a
// DeviceKvStore (kvq).
#include <optional>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "worker/cuda/device_kv_store.h"
#include "worker/cuda/gpu_model.h"
#include "worker/cuda/sequence_context.h"
#include "worker/gpu_backend.h"
#include "worker/sampler.h"

namespace kvshard {
namespace {

constexpr int64_t kRequestSequence = 0;  // the store's one sequence: the running request

class CudaBackend final : public GpuBackend {
 public:
  CudaBackend(std::unique_ptr<GpuModel> model, const GpuBackendOptions& options)
      : model_(std::move(model)), options_(options) {}

  std::string device_name() const override {
    int device = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "GPU";
    return prop.name;
  }

  bool Holds(const KvSchemeConfig& scheme) const override {
    if (scheme.kind == KvSchemeKind::kFp16) return true;
    return scheme.kind == KvSchemeKind::kKvq && options_.calibration != nullptr && scheme.quantize_keys &&
           scheme.quantize_values && !scheme.exact_decode_view;
  }

  absl::Status StartRequest(int64_t max_positions, const KvSchemeConfig& scheme,
                            const SamplingParams& sampling) override {
    if (!Holds(scheme)) {
      return absl::InvalidArgumentError(absl::StrCat("the GPU backend holds the KV schemes fp16 and (with a "
                                                     "calibration) kvq2..4, not ", scheme.ToString()));
    }
    sampler_.emplace(sampling);
    sequence_context_.reset();
    if (scheme.kind == KvSchemeKind::kFp16) {
      store_.reset();  // one cache at a time: the store's pool goes back before the cache is sized
      if (cache_ != nullptr && cache_->capacity() >= max_positions) {
        cache_->Clear();
        return absl::OkStatus();
      }
      cache_.reset();  // free the old cache before sizing the new one
      KV_ASSIGN_OR_RETURN(cache_, GpuKvCache::Create(model_->kv_geometry(), max_positions));
      return absl::OkStatus();
    }
    cache_.reset();
    if (store_ != nullptr) store_->RemoveSequence(kRequestSequence);
    const std::string spec = scheme.ToString();
    if (store_ == nullptr || store_scheme_ != spec || store_->FreeTokens() < max_positions) {
      store_.reset();
      // Sized to the request, as the fp16 cache is.
      DeviceKvStoreOptions store_options = OneSequenceStoreOptions(max_positions, model_->max_chunk());
      store_options.key_outlier_headroom = options_.key_outlier_headroom;
      KV_ASSIGN_OR_RETURN(store_, DeviceKvStore::Create(model_->kv_geometry(), scheme, options_.calibration.get(),
                                                        store_options));
      store_scheme_ = spec;
    }
    KV_RETURN_IF_ERROR(store_->AddSequence(kRequestSequence, 0, max_positions));
    sequence_context_ = std::make_unique<StoreSequenceContext>(*store_, kRequestSequence, model_->config().n_heads);
    return absl::OkStatus();
  }

  absl::StatusOr<int32_t> Feed(std::span<const int32_t> tokens, int64_t first_position, uint64_t step) override {
    GpuAttentionContext* context = cache_ != nullptr ? static_cast<GpuAttentionContext*>(cache_.get())
                                                     : sequence_context_.get();
    if (context == nullptr || !sampler_) return absl::FailedPreconditionError("Feed before StartRequest");
    TokenSampling s = sampler_->TakeDraw();
    s.step = step;  // the caller numbers the draws: every prefill chunk draws, only the last one counts
    KV_ASSIGN_OR_RETURN(int32_t token, model_->Forward(tokens, first_position, *context, &s, nullptr,
                                                        sampler_->recent()));
    // Forward waited for the token, so the store's overflow flag is current: key outliers beyond the
    // sequence's room fail the request here, not as quietly wrong attention.
    if (sequence_context_ != nullptr) KV_RETURN_IF_ERROR(store_->Health(kRequestSequence));
    return token;
  }

  void Accept(int32_t token) override {
    if (sampler_) sampler_->Accept(token);
  }

  KvMemory kv_memory() const override {
    if (sequence_context_ != nullptr) return store_->Memory(kRequestSequence);
    if (cache_ == nullptr) return {};
    const KvGeometry g = model_->kv_geometry();
    KvMemory memory;
    memory.elements = int64_t{2} * g.n_layers * g.n_kv_heads * g.head_dim * cache_->length(g.n_layers - 1);
    memory.bytes = memory.elements * 2;  // fp16
    return memory;
  }

  int max_chunk() const override { return model_->max_chunk(); }

 private:
  std::unique_ptr<GpuModel> model_;
  GpuBackendOptions options_;
  std::unique_ptr<GpuKvCache> cache_;  // fp16 requests
  std::unique_ptr<DeviceKvStore> store_;  // kvq requests: one sequence, sized to the largest request so far
  std::string store_scheme_;
  std::unique_ptr<StoreSequenceContext> sequence_context_;  // set while a kvq request runs
  std::optional<Sampler> sampler_;  // the request's settings and the repetition penalty's window
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const ModelWeights& weights,
                                                               const GpuBackendOptions& options) {
  if (CudaDeviceCount() == 0) return absl::UnavailableError("no CUDA GPU on this host");
  GpuModelOptions model_options;
  model_options.graph_rows = options.graph_rows;
  model_options.max_chunk = options.max_chunk;
  KV_ASSIGN_OR_RETURN(std::unique_ptr<GpuModel> model, GpuModel::Create(weights, model_options));
  return std::unique_ptr<GpuBackend>(new CudaBackend(std::move(model), options));
}

}  // namespace kvshard
