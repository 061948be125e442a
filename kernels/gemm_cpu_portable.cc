// Fallback when no BLAS is installed: correct and multi-threaded, several times slower than OpenBLAS.
#include <algorithm>
#include <vector>

#include "kernels/gemm_cpu.h"

namespace kvshard {

void GemmCpu(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
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

}  // namespace kvshard
