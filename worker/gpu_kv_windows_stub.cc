// GPU calibration windows in builds without CUDA: unavailable, so `kvshard calibrate` runs on the CPU.
#include "worker/gpu_kv_windows.h"

namespace kvshard {

absl::StatusOr<std::unique_ptr<GpuKvWindows>> MakeGpuKvWindows(const ModelWeights&, int64_t) {
  return absl::UnavailableError("this build has no CUDA backend (nvcc was not found at configure time)");
}

}  // namespace kvshard
