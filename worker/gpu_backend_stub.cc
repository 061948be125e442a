// GPU backend of builds without CUDA: always unavailable, so the engine runs on the CPU.
#include "worker/gpu_backend.h"

namespace kvshard {

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const ModelWeights&, const GpuBackendOptions&) {
  return absl::UnavailableError("this build has no CUDA backend (nvcc was not found at configure time)");
}

}  // namespace kvshard
