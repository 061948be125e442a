#include "bench/bench_util.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "absl/strings/str_format.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/sampling.h"

namespace kvshard::bench {
namespace {

constexpr double kMinWarmupSeconds = 0.2;

__device__ __forceinline__ float HashUniform(uint64_t seed, int64_t i) {
  const uint64_t bits = MixBits64(seed ^ MixBits64(static_cast<uint64_t>(i)));
  return static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // [0, 1)
}

__global__ void Fill16Kernel(uint16_t* data, int64_t n, bool bf16, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = 2.0f * HashUniform(seed, i) - 1.0f;
    if (bf16) {
      const __nv_bfloat16 b = __float2bfloat16_rn(x);
      data[i] = *reinterpret_cast<const uint16_t*>(&b);
    } else {
      const __half h = __float2half_rn(x);
      data[i] = *reinterpret_cast<const uint16_t*>(&h);
    }
  }
}

__global__ void FillF32Kernel(float* data, int64_t n, float lo, float hi, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    data[i] = lo + (hi - lo) * HashUniform(seed, i);
  }
}

}  // namespace

absl::Status FillRandom16(void* data, int64_t n, bool bf16, uint64_t seed, cudaStream_t stream) {
  Fill16Kernel<<<4096, 256, 0, stream>>>(static_cast<uint16_t*>(data), n, bf16, seed);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status FillRandomF32(float* data, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream) {
  FillF32Kernel<<<1024, 256, 0, stream>>>(data, n, lo, hi, seed);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::StatusOr<double> MedianMs(const std::function<absl::Status(int)>& launch, int warmup, int iters,
                                cudaStream_t stream) {
  // Warm up for at least `warmup` runs and kMinWarmupSeconds, so clocks have ramped up from idle before
  // the first timed run (short kernels right after an allocation otherwise time 15-20% slow).
  const auto warm_start = std::chrono::steady_clock::now();
  for (int i = 0;; ++i) {
    if (absl::Status s = launch(i); !s.ok()) return s;
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - warm_start).count();
    if (i + 1 >= warmup && elapsed >= kMinWarmupSeconds) break;
  }
  cudaEvent_t start, stop;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
  std::vector<double> times;
  for (int i = 0; i < iters; ++i) {
    CUDA_RETURN_IF_ERROR(cudaEventRecord(start, stream));
    if (absl::Status s = launch(warmup + i); !s.ok()) return s;
    CUDA_RETURN_IF_ERROR(cudaEventRecord(stop, stream));
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

absl::StatusOr<double> CopyBandwidthGBs(int64_t bytes, int iters, cudaStream_t stream) {
  void* src = nullptr;
  void* dst = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&src, bytes));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&dst, bytes));
  if (absl::Status s = FillRandom16(src, bytes / 2, false, 1, stream); !s.ok()) return s;
  auto ms = MedianMs(
      [&](int) -> absl::Status {
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
        return absl::OkStatus();
      },
      3, iters, stream);
  cudaFree(src);
  cudaFree(dst);
  if (!ms.ok()) return ms.status();
  return 2.0 * static_cast<double>(bytes) / (*ms * 1e-3) / 1e9;
}

std::string DeviceSummary() {
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    return "unknown device";
  }
  size_t free_bytes = 0, total_bytes = 0;
  cudaMemGetInfo(&free_bytes, &total_bytes);
  return absl::StrFormat("%s, %d SMs, L2 %d MB, %.1f GiB (%.1f free), cc %d.%d", prop.name,
                         prop.multiProcessorCount, prop.l2CacheSize >> 20, total_bytes / 1073741824.0,
                         free_bytes / 1073741824.0, prop.major, prop.minor);
}

}  // namespace kvshard::bench
