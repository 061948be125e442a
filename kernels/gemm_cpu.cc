#include "kernels/gemm_cpu.h"

#include <string>
#include <vector>

#include "common/shared_library.h"

namespace kvshard {
namespace {

// The CBLAS ABI (cblas.h): enum values fixed by the reference interface.
constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;
using CblasSgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);

// OpenBLAS's sgemm, opened at run time (common/shared_library.h says why); nullptr when it is not installed.
CblasSgemm OpenBlasSgemm() {
  static const CblasSgemm sgemm = [] {
    const std::vector<std::string> candidates = {"libopenblas.so.0", "libopenblas.so"};
    absl::StatusOr<void*> opened = OpenSharedLibrary(candidates);
    CblasSgemm function = nullptr;
    if (!opened.ok() || !ResolveFunction(*opened, "cblas_sgemm", function).ok()) return CblasSgemm{nullptr};
    return function;
  }();
  return sgemm;
}

// Correct and multi-threaded, several times slower than OpenBLAS.
void GemmCpuPortable(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      if (transpose_b) {
        const float* ar = a + i * lda;
        const float* br = b + j * ldb;
        for (int64_t p = 0; p < k; ++p) acc += ar[p] * br[p];
      } else {
        for (int64_t p = 0; p < k; ++p) acc += a[i * lda + p] * b[p * ldb + j];
      }
      float& out = c[i * ldc + j];
      out = alpha * acc + (beta == 0.0f ? 0.0f : beta * out);
    }
  }
}

}  // namespace

const char* CpuGemmLibrary() { return OpenBlasSgemm() != nullptr ? "OpenBLAS" : "portable loop"; }

void GemmCpu(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (CblasSgemm sgemm = OpenBlasSgemm(); sgemm != nullptr) {
    sgemm(kCblasRowMajor, kCblasNoTrans, transpose_b ? kCblasTrans : kCblasNoTrans, static_cast<int>(m),
          static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
          c, static_cast<int>(ldc));
    return;
  }
  GemmCpuPortable(transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace kvshard
