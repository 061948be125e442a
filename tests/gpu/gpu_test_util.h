// Helpers for the GPU kernel tests: device buffers, poisoning, and tolerance checks that print the
// first mismatches.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "gtest/gtest.h"
#include "kernels/cuda/cuda_status.h"

namespace kvshard::testing {

#define KV_SKIP_WITHOUT_GPU()                                          \
  do {                                                                 \
    if (::kvshard::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU"; \
  } while (0)

// Kernels left out of a KVSHARD_QUICK_KERNELS build answer InvalidArgument "... not built ...".
#define KV_SKIP_IF_NOT_BUILT(status)                                                          \
  do {                                                                                        \
    if (!(status).ok() && std::string((status).message()).find("not built") != std::string::npos) \
      GTEST_SKIP() << (status).message();                                                     \
  } while (0)

#define KV_CUDA_OK(expr)                                          \
  do {                                                            \
    cudaError_t kv_err_ = (expr);                                 \
    ASSERT_EQ(kv_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(kv_err_); \
  } while (0)

// The current GPU's compute capability major version (0 without a GPU).
inline int GpuComputeCapabilityMajor() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
  return major;
}

// A device allocation of n elements of T, freed on destruction.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { Resize(n); }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), size_(other.size_) {
    other.ptr_ = nullptr;
    other.size_ = 0;
  }

  void Resize(size_t n) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = n;
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) {
      ptr_ = nullptr;
      size_ = 0;
      ADD_FAILURE() << "cudaMalloc of " << n * sizeof(T) << " bytes failed";
    }
  }
  void Upload(const std::vector<T>& host) {
    Resize(host.size());
    if (!host.empty()) {
      EXPECT_EQ(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  std::vector<T> Download() const {
    std::vector<T> host(size_);
    if (size_ > 0) {
      EXPECT_EQ(cudaMemcpy(host.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return host;
  }
  // Fills every byte with 0xFF: NaN for floats, -1 for integers. Unwritten outputs then fail the check.
  void Poison() {
    if (size_ > 0) {
      EXPECT_EQ(cudaMemset(ptr_, 0xFF, size_ * sizeof(T)), cudaSuccess);
    }
  }
  T* get() { return ptr_; }
  const T* get() const { return ptr_; }
  size_t size() const { return size_; }

 private:
  T* ptr_ = nullptr;
  size_t size_ = 0;
};

template <typename T>
DeviceBuffer<T> ToDevice(const std::vector<T>& host) {
  DeviceBuffer<T> buffer;
  buffer.Upload(host);
  return buffer;
}

inline std::vector<float> RandomUniform(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Counts elements outside |got - want| <= atol + rtol * |want| (per-element atol optional), treating
// equal infinities as equal and any NaN as wrong; prints the first few mismatches.
inline int64_t CountMismatches(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
                               double atol, double rtol, const std::vector<double>* atol_per_element = nullptr,
                               int max_print = 8) {
  EXPECT_EQ(got.size(), want.size()) << what;
  int64_t wrong = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const double g = got[i];
    const double w = want[i];
    bool ok;
    if (std::isnan(g) || std::isnan(w)) {
      ok = false;
    } else if (std::isinf(g) || std::isinf(w)) {
      ok = g == w;
    } else {
      const double tol = (atol_per_element ? (*atol_per_element)[i] : atol) + rtol * std::fabs(w);
      ok = std::fabs(g - w) <= tol;
    }
    if (!ok) {
      if (wrong < max_print) {
        std::printf("  %s[%zu]: got %.9g want %.9g (diff %.3g)\n", what.c_str(), i, g, w, std::fabs(g - w));
      }
      ++wrong;
    }
  }
  if (wrong > 0) std::printf("  %s: %lld of %zu wrong\n", what.c_str(), static_cast<long long>(wrong), got.size());
  return wrong;
}

}  // namespace kvshard::testing
