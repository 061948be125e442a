// GPU workers of builds without CUDA and NCCL: unavailable, so workers run on the CPU backend.
#include "worker/gpu_worker.h"

namespace kvshard {

absl::StatusOr<std::unique_ptr<GpuWorker>> GpuWorker::Create(const ModelWeights&, Collectives&,
                                                             const GpuWorkerOptions&) {
  return absl::UnavailableError("this build has no CUDA backend with NCCL for GPU workers");
}

int GpuWorker::DeviceCount() { return 0; }

}  // namespace kvshard
