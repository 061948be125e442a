// fp32 GEMM on the CPU: OpenBLAS, opened at run time, when it is installed (Debian: libopenblas0-openmp),
// else a portable loop.
// Row-major throughout.
#pragma once

#include <cstdint>

namespace kvshard {

// "OpenBLAS" or "portable loop": what GemmCpu uses in this process.
const char* CpuGemmLibrary();

// C[m, n] = alpha * sum_k A[m, k] * op(B)[k, n] + beta * C[m, n]
// op(B) = B [k, n] (ldb >= n) when !transpose_b, else B^T with B stored [n, k] (ldb >= k).
void GemmCpu(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// y[m, out] = x[m, in] * w[out, in]^T: a Linear layer with Hugging Face weight layout.
inline void LinearCpu(const float* x, const float* w, int64_t m, int64_t in, int64_t out, float* y) {
  GemmCpu(/*transpose_b=*/true, m, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

}  // namespace kvshard
