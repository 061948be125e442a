// Compile-time dispatch of run-time sizes and types for the kernel launchers (CUDA sources only).
// An unsupported value returns InvalidArgument naming the value and the supported ones: no silent
// fallback and no abort.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dtype.h"

namespace kvshard {

// Raises a kernel's dynamic shared memory limit to `bytes` once per process (*configured remembers it; a
// launcher keeps one flag per kernel instance).
template <typename Kernel>
absl::Status AllowSharedMemory(Kernel kernel, int bytes, bool* configured) {
  if (!*configured) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    *configured = true;
  }
  return absl::OkStatus();
}

}  // namespace kvshard

// KV_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, { ... return Launch<HEAD_DIM>(...); })
#define KV_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, ...)                                             \
  [&]() -> ::absl::Status {                                                                      \
    switch (head_dim) {                                                                          \
      case 64: {                                                                                 \
        constexpr int HEAD_DIM = 64;                                                             \
        __VA_ARGS__                                                                              \
      }                                                                                          \
      case 128: {                                                                                \
        constexpr int HEAD_DIM = 128;                                                            \
        __VA_ARGS__                                                                              \
      }                                                                                          \
      default:                                                                                   \
        return ::absl::InvalidArgumentError(                                                     \
            ::absl::StrCat("head_dim ", head_dim, " is not supported (supported: 64, 128)"));   \
    }                                                                                            \
  }()

// KV_DISPATCH_HALF_TYPE(dtype, T, { ... }) binds T to __half or __nv_bfloat16. A build with
// KVSHARD_QUICK_KERNELS instantiates fp16 only.
#if defined(KVSHARD_QUICK_KERNELS)
#define KV_DISPATCH_HALF_TYPE(dtype, T, ...)                                                      \
  [&]() -> ::absl::Status {                                                                      \
    if ((dtype) == ::kvshard::DType::kF16) {                                                     \
      using T = __half;                                                                          \
      __VA_ARGS__                                                                                \
    }                                                                                            \
    return ::absl::InvalidArgumentError(::absl::StrCat(                                          \
        "element type ", ::kvshard::DTypeName(dtype),                                            \
        " is not built (this build has KVSHARD_QUICK_KERNELS: f16 only)"));                      \
  }()
#else
#define KV_DISPATCH_HALF_TYPE(dtype, T, ...)                                                      \
  [&]() -> ::absl::Status {                                                                      \
    if ((dtype) == ::kvshard::DType::kF16) {                                                     \
      using T = __half;                                                                          \
      __VA_ARGS__                                                                                \
    }                                                                                            \
    if ((dtype) == ::kvshard::DType::kBF16) {                                                    \
      using T = __nv_bfloat16;                                                                   \
      __VA_ARGS__                                                                                \
    }                                                                                            \
    return ::absl::InvalidArgumentError(::absl::StrCat(                                          \
        "element type ", ::kvshard::DTypeName(dtype), " is not supported (supported: f16, bf16)")); \
  }()
#endif

namespace kvshard {

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Converts between float and the 16-bit types inside kernels.
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

}  // namespace kvshard

// KV_DISPATCH_KVQ_BITS(bits, BITS, { ... }) binds the code width.
#if defined(KVSHARD_QUICK_KERNELS)
#define KV_DISPATCH_KVQ_BITS(bits, BITS, ...)                                                    \
  [&]() -> ::absl::Status {                                                                     \
    if ((bits) == 3) {                                                                          \
      constexpr int BITS = 3;                                                                   \
      __VA_ARGS__                                                                               \
    }                                                                                           \
    if ((bits) == 2 || (bits) == 4) {                                                           \
      return ::absl::InvalidArgumentError(::absl::StrCat(                                       \
          "kvq bits ", bits, " is not built (this build has KVSHARD_QUICK_KERNELS: 3 only)"));   \
    }                                                                                           \
    return ::absl::InvalidArgumentError(                                                        \
        ::absl::StrCat("kvq bits ", bits, " is not supported (supported: 2, 3, 4)"));            \
  }()
#else
#define KV_DISPATCH_KVQ_BITS(bits, BITS, ...)                                                    \
  [&]() -> ::absl::Status {                                                                     \
    switch (bits) {                                                                             \
      case 2: {                                                                                 \
        constexpr int BITS = 2;                                                                 \
        __VA_ARGS__                                                                             \
      }                                                                                         \
      case 3: {                                                                                 \
        constexpr int BITS = 3;                                                                 \
        __VA_ARGS__                                                                             \
      }                                                                                         \
      case 4: {                                                                                 \
        constexpr int BITS = 4;                                                                 \
        __VA_ARGS__                                                                             \
      }                                                                                         \
      default:                                                                                  \
        return ::absl::InvalidArgumentError(                                                    \
            ::absl::StrCat("kvq bits ", bits, " is not supported (supported: 2, 3, 4)"));        \
    }                                                                                           \
  }()
#endif
