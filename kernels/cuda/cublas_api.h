// cuBLAS, opened at run time instead of linked (common/shared_library.h says why).
#pragma once

#include <cublas_v2.h>

#include "absl/status/statusor.h"

namespace kvshard {

// The cuBLAS entry points kvshard uses. Names follow cublas_v2.h (whose macros map cublasCreate to
// cublasCreate_v2 and so on).
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  // The compute-type overload; C++ also sees an inline one taking cudaDataType.
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                            cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
};

// Opens libcublas.so.<major of the headers> once per process: first through the dynamic loader's search
// path, then beside the CUDA runtime library this process uses. Unavailable, naming what was tried,
// when it cannot be found or lacks an entry point. Thread-safe.
absl::StatusOr<const CublasApi*> LoadCublas();

}  // namespace kvshard
