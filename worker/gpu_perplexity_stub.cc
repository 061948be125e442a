// Perplexity on the GPU in builds without CUDA: unavailable, so `kvshard perplexity` runs on the CPU.
#include "worker/gpu_perplexity.h"

namespace kvshard {

absl::StatusOr<GpuWindowScores> ScoreWindowsOnGpu(const ModelWeights&, std::span<const int32_t>, int64_t, int64_t,
                                                  const KvSchemeConfig&, const Calibration*, int, bool) {
  return absl::UnavailableError("this build has no CUDA backend (nvcc was not found at configure time)");
}

}  // namespace kvshard
