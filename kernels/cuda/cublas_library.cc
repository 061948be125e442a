#include "kernels/cuda/cublas_library.h"

#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "common/shared_library.h"
#include "common/status.h"

namespace kvshard {
namespace {

absl::StatusOr<CublasLibrary> Open() {
  const std::string soname = absl::StrCat("libcublas.so.", CUBLAS_VER_MAJOR);
  std::vector<std::string> candidates = {soname};
  // A toolkit keeps cuBLAS beside the CUDA runtime.
  cudaError_t (*runtime_function)(void**, size_t) = &cudaMalloc;
  if (std::string dir = DirectoryOfLoadedObject(reinterpret_cast<const void*>(runtime_function)); !dir.empty()) {
    candidates.push_back(dir + soname);
  }
  absl::StatusOr<void*> library = OpenSharedLibrary(candidates);
  if (!library.ok()) {
    return absl::UnavailableError(absl::StrCat("cuBLAS: ", library.status().message(),
                                               "; install the CUDA toolkit's cuBLAS or add its directory to "
                                               "the library path"));
  }
  CublasLibrary lib;
  for (absl::Status s : {ResolveFunction(*library, "cublasCreate_v2", lib.create),
                         ResolveFunction(*library, "cublasDestroy_v2", lib.destroy),
                         ResolveFunction(*library, "cublasSetStream_v2", lib.set_stream),
                         ResolveFunction(*library, "cublasSetWorkspace_v2", lib.set_workspace),
                         ResolveFunction(*library, "cublasGemmEx", lib.gemm_ex)}) {
    if (!s.ok()) return absl::UnavailableError(absl::StrCat(soname, ": ", s.message()));
  }
  return lib;
}

}  // namespace

absl::StatusOr<const CublasLibrary*> LoadCublas() {
  static const absl::StatusOr<CublasLibrary>* const loaded = new absl::StatusOr<CublasLibrary>(Open());
  if (!loaded->ok()) return loaded->status();
  return &loaded->value();
}

}  // namespace kvshard
