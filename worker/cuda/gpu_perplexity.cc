// ScoreWindowsOnGpu: perplexity windows as the rows of one decode batch (see worker/gpu_perplexity.h).
#include "worker/gpu_perplexity.h"

#include <algorithm>
#include <memory>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/progress.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/sampling.h"
#include "worker/cuda/device_kv_store.h"
#include "worker/cuda/gpu_model.h"

namespace kvshard {
namespace {

// Row i of every step is sequence ids[i]: its new token's KV is appended, then it attends to all of it.
class WindowRowsContext final : public GpuAttentionContext {
 public:
  WindowRowsContext(DeviceKvStore& store, std::span<const int64_t> ids, float* lse)
      : store_(store), ids_(ids), lse_(lse) {}

  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride, const int64_t*,
                        cudaStream_t stream) override {
    if (n_tokens != static_cast<int>(ids_.size())) return absl::InternalError("one row per window expected");
    return store_.AppendRows(layer, ids_, k, v, row_stride, stream);
  }
  // AttendRows' output is already normalized over the whole sequence: its lse is not needed here.
  absl::Status Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t, float* out,
                      cudaStream_t stream) override {
    if (n_queries != static_cast<int>(ids_.size())) return absl::InternalError("one row per window expected");
    return store_.AttendRows(layer, ids_, q, q_stride, out, lse_, stream);
  }

 private:
  DeviceKvStore& store_;
  std::span<const int64_t> ids_;
  float* lse_;
};

}  // namespace

absl::StatusOr<GpuWindowScores> ScoreWindowsOnGpu(const ModelWeights& weights, std::span<const int32_t> tokens,
                                                  int64_t ctx, int64_t windows, const KvSchemeConfig& scheme,
                                                  const Calibration* calibration, int batch, bool show_progress) {
  if (CudaDeviceCount() == 0) return absl::UnavailableError("no CUDA GPU on this host");
  if (ctx < 2 || windows < 1 || batch < 1 || windows * ctx > static_cast<int64_t>(tokens.size())) {
    return absl::InvalidArgumentError(absl::StrCat("ScoreWindowsOnGpu: ", windows, " windows of ", ctx,
                                                   " tokens, batch ", batch, ", from ", tokens.size(), " tokens"));
  }
  const int rows_max = static_cast<int>(std::min<int64_t>(batch, windows));
  GpuModelOptions model_options;
  model_options.max_chunk = rows_max;
  KV_ASSIGN_OR_RETURN(std::unique_ptr<GpuModel> model, GpuModel::Create(weights, model_options));
  const KvGeometry geometry = model->kv_geometry();
  DeviceKvStoreOptions store_options;
  store_options.max_sequences = rows_max;
  store_options.max_rows = rows_max;
  store_options.max_chunk = std::max(rows_max, 64);
  // Real text can bring a page many more key outliers than the calibrated fraction (kvq4 on wiki with
  // thresholds from Austen: over 10% in some pages). The CPU store has no cap, so neither may this:
  // room for half of each page's key elements.
  store_options.key_outlier_capacity = 64 * geometry.head_dim;
  KV_ASSIGN_OR_RETURN(std::unique_ptr<DeviceKvStore> store,
                      DeviceKvStore::Create(geometry, scheme, calibration, store_options));

  const int vocab = model->config().vocab_size;
  KV_ASSIGN_OR_RETURN(DeviceMemory targets, DeviceMemory::Allocate(ctx * rows_max * 4, "perplexity targets"));
  KV_ASSIGN_OR_RETURN(DeviceMemory log_probs, DeviceMemory::Allocate(ctx * rows_max * 4, "perplexity log-probs"));
  KV_ASSIGN_OR_RETURN(DeviceMemory lse,
                      DeviceMemory::Allocate(int64_t{rows_max} * model->config().n_heads * 4, "perplexity lse"));
  std::unique_ptr<ProgressLine> progress;
  if (show_progress) {
    progress = std::make_unique<ProgressLine>(absl::StrCat("perplexity ", scheme.name(), " ctx ", ctx, " (GPU)"),
                                              "tokens", windows * ctx);
  }
  cudaStream_t stream = model->stream();
  GpuWindowScores scores;
  std::vector<int32_t> step_tokens, host_targets;
  std::vector<int64_t> positions;
  std::vector<float> host_log_probs;
  for (int64_t first = 0; first < windows; first += rows_max) {
    const int rows = static_cast<int>(std::min<int64_t>(rows_max, windows - first));
    std::vector<int64_t> ids(rows);
    for (int r = 0; r < rows; ++r) {
      ids[r] = first + r;
      KV_RETURN_IF_ERROR(store->AddSequence(ids[r], 0, ctx));
    }
    // targets[t][r]: the token window r predicts at step t (the next one).
    host_targets.assign(static_cast<size_t>(ctx - 1) * rows, 0);
    for (int64_t t = 0; t + 1 < ctx; ++t)
      for (int r = 0; r < rows; ++r) host_targets[t * rows + r] = tokens[(first + r) * ctx + t + 1];
    CUDA_RETURN_IF_ERROR(cudaMemcpy(targets.get(), host_targets.data(), host_targets.size() * 4,
                                    cudaMemcpyHostToDevice));
    WindowRowsContext context(*store, ids, lse.as<float>());
    step_tokens.resize(rows);
    positions.resize(rows);
    for (int64_t t = 0; t < ctx; ++t) {
      // The window's last token predicts nothing inside it; it is still fed, so the store ends holding
      // the whole window, as the CPU path's does when its bits per element are measured.
      const bool scored = t + 1 < ctx;
      for (int r = 0; r < rows; ++r) step_tokens[r] = tokens[(first + r) * ctx + t];
      std::fill(positions.begin(), positions.end(), t);
      KV_RETURN_IF_ERROR(model->Enqueue(step_tokens, positions, context, /*logits_of_every_row=*/scored));
      if (scored) {
        KV_RETURN_IF_ERROR(TargetLogProbabilitiesCuda(model->logits(), vocab, vocab, rows,
                                                      targets.as<int32_t>() + t * rows,
                                                      log_probs.as<float>() + t * rows, stream));
      }
      KV_RETURN_IF_ERROR(model->Synchronize());
      for (int r = 0; r < rows; ++r) {
        const absl::Status health = store->Health(ids[r]);
        if (!health.ok()) {
          return Annotate(health, absl::StrCat("perplexity window ", ids[r], " at token ", t));
        }
      }
      if (progress && (t % 64 == 0)) progress->Update(first * ctx + (t + 1) * rows);
    }
    host_log_probs.resize(static_cast<size_t>(ctx - 1) * rows);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(host_log_probs.data(), log_probs.get(), host_log_probs.size() * 4,
                                    cudaMemcpyDeviceToHost));
    for (float lp : host_log_probs) scores.nll_sum -= lp;
    scores.scored_tokens += static_cast<int64_t>(host_log_probs.size());
    // The store at the window's end, as the CPU path measures it.
    for (int r = 0; r < rows; ++r) scores.bits_sum += store->Memory(ids[r]).bits_per_element();
    for (int r = 0; r < rows; ++r) store->RemoveSequence(ids[r]);
    scores.windows += rows;
    if (progress) progress->Update((first + rows) * ctx);
  }
  if (progress) progress->Finish();
  return scores;
}

}  // namespace kvshard
