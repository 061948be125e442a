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
// Up to this many rows of A go through sgemv, one row at a time: on two cores a [m, 576] x [576, 12288]
// product took 1.6 / 3.5 / 5.9 / 6.6 ms this way for m = 1 / 2 / 3 / 4 rows, against 1.9 (sgemv) / 5.4 /
// 6.4 / 7.1 ms as one sgemm.
constexpr int64_t kMaxRowsAsVectors = 3;
using CblasSgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);

using CblasSgemv = void (*)(int layout, int trans, int m, int n, float alpha, const float* a, int lda,
                            const float* x, int incx, float beta, float* y, int incy);

// A function of OpenBLAS, opened at run time (common/shared_library.h says why); nullptr when it is not
// installed.
template <typename Function>
Function OpenBlasFunction(const char* name) {
  const std::vector<std::string> candidates = {"libopenblas.so.0", "libopenblas.so"};
  absl::StatusOr<void*> opened = OpenSharedLibrary(candidates);
  Function function = nullptr;
  if (!opened.ok() || !ResolveFunction(*opened, name, function).ok()) return nullptr;
  return function;
}

CblasSgemm OpenBlasSgemm() {
  static const CblasSgemm sgemm = OpenBlasFunction<CblasSgemm>("cblas_sgemm");
  return sgemm;
}

CblasSgemv OpenBlasSgemv() {
  static const CblasSgemv sgemv = OpenBlasFunction<CblasSgemv>("cblas_sgemv");
  return sgemv;
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
  // A few rows (decode): one matrix-vector product per row. sgemm would pack the whole of B (the weights)
  // on every call, which took over half of a CPU decode step.
  if (CblasSgemv sgemv = OpenBlasSgemv(); sgemv != nullptr && m <= kMaxRowsAsVectors) {
    // c_i = B a_i with B [n, k], or B^T a_i with B [k, n]: B's stored rows and columns.
    const int rows = static_cast<int>(transpose_b ? n : k), cols = static_cast<int>(transpose_b ? k : n);
    for (int64_t i = 0; i < m; ++i) {
      sgemv(kCblasRowMajor, transpose_b ? kCblasNoTrans : kCblasTrans, rows, cols, alpha, b, static_cast<int>(ldb),
            a + i * lda, 1, beta, c + i * ldc, 1);
    }
    return;
  }
  if (CblasSgemm sgemm = OpenBlasSgemm(); sgemm != nullptr) {
    sgemm(kCblasRowMajor, kCblasNoTrans, transpose_b ? kCblasTrans : kCblasNoTrans, static_cast<int>(m),
          static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
          c, static_cast<int>(ldc));
    return;
  }
  GemmCpuPortable(transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace kvshard
