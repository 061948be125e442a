// CUDA / cuBLAS / NCCL error plumbing: failures become absl::Status carrying file:line.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#if __has_include(<nccl.h>)
#include <nccl.h>
#define KVSHARD_HAVE_NCCL_HEADER 1
#endif

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvshard {

inline absl::Status CudaStatus(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  const absl::StatusCode code =
      err == cudaErrorMemoryAllocation ? absl::StatusCode::kResourceExhausted : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(file, ":", line, ": CUDA error ", cudaGetErrorName(err), " (",
                                         cudaGetErrorString(err), ") in ", expr));
}

// cuBLAS is opened at run time (kernels/cuda/cublas_api.h), so its status is reported by number.
inline absl::Status CublasStatus(cublasStatus_t err, const char* expr, const char* file, int line) {
  if (err == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(file, ":", line, ": cuBLAS error ", static_cast<int>(err), " in ", expr));
}

#ifdef KVSHARD_HAVE_NCCL_HEADER
// `rank` is the caller's rank in the communicator (-1 before it has one). ncclInProgress is not an error
// for a non-blocking communicator, but callers must poll it out (ncclCommGetAsyncError) before they get
// here; it is reported like any other code.
inline absl::Status NcclStatus(ncclResult_t err, const char* expr, int rank, const char* file, int line) {
  if (err == ncclSuccess) return absl::OkStatus();
  const char* last = ncclGetLastError(nullptr);
  return absl::InternalError(absl::StrCat(file, ":", line, ": NCCL error ", ncclGetErrorString(err), " (", static_cast<int>(err),
                                          ") on rank ", rank, " in ", expr,
                                          last != nullptr && *last != '\0' ? absl::StrCat(": ", last) : ""));
}
#endif

// Number of usable GPUs; 0 when there is no driver or device (never an error).
int CudaDeviceCount();

}  // namespace kvshard

#define CUDA_RETURN_IF_ERROR(expr)                                                          \
  do {                                                                                      \
    ::absl::Status kv_cuda_status_ = ::kvshard::CudaStatus((expr), #expr, __FILE__, __LINE__); \
    if (!kv_cuda_status_.ok()) return kv_cuda_status_;                                      \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site.
#define CUDA_RETURN_IF_LAUNCH_ERROR() CUDA_RETURN_IF_ERROR(cudaGetLastError())

#define CUBLAS_RETURN_IF_ERROR(expr)                                                            \
  do {                                                                                          \
    ::absl::Status kv_cublas_status_ = ::kvshard::CublasStatus((expr), #expr, __FILE__, __LINE__); \
    if (!kv_cublas_status_.ok()) return kv_cublas_status_;                                      \
  } while (0)

// NCCL_RETURN_IF_ERROR(rank, ncclCall(...)): `rank` names the caller in the message.
#define NCCL_RETURN_IF_ERROR(rank, expr)                                                                 \
  do {                                                                                                   \
    ::absl::Status kv_nccl_status_ = ::kvshard::NcclStatus((expr), #expr, (rank), __FILE__, __LINE__);   \
    if (!kv_nccl_status_.ok()) return kv_nccl_status_;                                                   \
  } while (0)
