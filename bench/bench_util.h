// Shared pieces of the GPU benchmarks: seeded random fill on the device, CUDA-event timing with a median,
// and the device-to-device copy bandwidth that every bandwidth figure is quoted against.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <cuda_runtime.h>

#include "absl/status/statusor.h"

namespace kvshard::bench {

// Fills n 16-bit values (fp16 when !bf16, else bf16) with uniform values in [-1, 1) from a seeded hash.
absl::Status FillRandom16(void* data, int64_t n, bool bf16, uint64_t seed, cudaStream_t stream);
// Fills n floats with uniform values in [lo, hi).
absl::Status FillRandomF32(float* data, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream);

// Runs `launch` at least `warmup` times and for at least 0.2 s (clocks ramp up from idle), then times
// `iters` runs one by one with CUDA events; returns the median in milliseconds. `launch` gets the
// iteration index (to rotate among input copies).
absl::StatusOr<double> MedianMs(const std::function<absl::Status(int)>& launch, int warmup, int iters,
                                cudaStream_t stream);

// Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second), median of `iters`
// copies of `bytes`.
absl::StatusOr<double> CopyBandwidthGBs(int64_t bytes, int iters, cudaStream_t stream);

std::string DeviceSummary();

}  // namespace kvshard::bench
