#include "kernels/cuda/cublas_api.h"

#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/shared_library.h"
#include "common/status.h"

namespace kvshard {
namespace {

absl::StatusOr<CublasApi> Open() {
  const std::string soname = absl::StrCat("libcublas.so.", CUBLAS_VER_MAJOR);
  std::vector<std::string> candidates = {soname};
  // A toolkit keeps cuBLAS beside the CUDA runtime.
  cudaError_t (*runtime_function)(void**, size_t) = &cudaMalloc;
  if (std::string dir = DirectoryOfLoadedObject(reinterpret_cast<const void*>(runtime_function)); !dir.empty()) {
    candidates.push_back(dir + soname);
  }
  absl::StatusOr<void*> opened = OpenSharedLibrary(candidates);
  if (!opened.ok()) {
    return absl::UnavailableError(absl::StrCat("cuBLAS: ", opened.status().message(),
                                               "; install the CUDA toolkit's cuBLAS or add its directory to "
                                               "the library path"));
  }
  CublasApi api;
  for (absl::Status s : {ResolveFunction(*opened, "cublasCreate_v2", api.create),
                         ResolveFunction(*opened, "cublasDestroy_v2", api.destroy),
                         ResolveFunction(*opened, "cublasSetStream_v2", api.set_stream),
                         ResolveFunction(*opened, "cublasSetWorkspace_v2", api.set_workspace),
                         ResolveFunction(*opened, "cublasGemmEx", api.gemm_ex)}) {
    if (!s.ok()) return absl::UnavailableError(absl::StrCat(soname, ": ", s.message()));
  }
  return api;
}

}  // namespace

absl::StatusOr<const CublasApi*> LoadCublas() {
  static const absl::StatusOr<CublasApi>* const loaded = new absl::StatusOr<CublasApi>(Open());
  if (!loaded->ok()) return loaded->status();
  return &loaded->value();
}

}  // namespace kvshard
