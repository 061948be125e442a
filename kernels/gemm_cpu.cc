#include "kernels/gemm_cpu.h"

#include <algorithm>
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
// The blocks of C that sgemm and sgemv compute one per thread (GemmCpu says why). On two cores these keep
// the speed of OpenBLAS's own threads for the model's products: 128 x 1024 within -10% to +15% (128 x 64
// was 30-50% slower), and 64 outputs per sgemv within +15% (1024 was up to 2x slower: one block).
constexpr int64_t kGemmRowBlock = 128;
constexpr int64_t kGemmColBlock = 1024;
constexpr int64_t kGemvBlock = 64;
using CblasSgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);

using CblasSgemv = void (*)(int layout, int trans, int m, int n, float alpha, const float* a, int lda,
                            const float* x, int incx, float beta, float* y, int incy);

// OpenBLAS, opened once at run time (common/shared_library.h says why); nullptr when it is not installed.
// Every call GemmCpu makes is one block for one thread of its own OpenMP region, so OpenBLAS must not
// start threads of its own. Its OpenMP build (which deploy/ installs) runs single-threaded inside a
// parallel region by itself; its pthreads build (Ubuntu's default) started all the cores' worth inside
// each of our threads: on 16 cores a CPU prefill ran 15x and decode 90x slower. That build is set to one
// thread. The OpenMP build is left alone: its openblas_set_num_threads sets the caller's OpenMP thread
// count, which would leave our own regions one thread.
void* OpenBlasLibrary() {
  static void* const library = []() -> void* {
    const std::vector<std::string> candidates = {"libopenblas.so.0", "libopenblas.so"};
    absl::StatusOr<void*> opened = OpenSharedLibrary(candidates);
    if (!opened.ok()) return nullptr;
    using GetParallel = int (*)();
    using SetThreads = void (*)(int);
    GetParallel get_parallel = nullptr;
    SetThreads set_threads = nullptr;
    constexpr int kOpenBlasPthreads = 1;  // openblas_get_parallel(): 0 sequential, 1 pthreads, 2 OpenMP
    if (ResolveFunction(*opened, "openblas_get_parallel", get_parallel).ok() &&
        ResolveFunction(*opened, "openblas_set_num_threads", set_threads).ok() &&
        get_parallel() == kOpenBlasPthreads) {
      set_threads(1);
    }
    return *opened;
  }();
  return library;
}

// A function of OpenBLAS; nullptr when it is not installed.
template <typename Function>
Function OpenBlasFunction(const char* name) {
  void* library = OpenBlasLibrary();
  Function function = nullptr;
  if (library == nullptr || !ResolveFunction(library, name, function).ok()) return nullptr;
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
  // OpenBLAS's own threads split a product by the thread count, and their partial results round
  // differently: sgemm gave other bits for 5-40% of the outputs with 1 and 2 threads, sgemv with 1 and 8,
  // so a worker (its share of the cores) and single-process mode (all of them) computed different KV.
  // Each product is cut instead into blocks of C of a fixed size, each block one single-threaded call;
  // the blocks, and so every rounding, are the same for any thread count. OpenBLAS (its OpenMP build,
  // which deploy/ installs) runs single-threaded inside a parallel region, so the region is entered even
  // for one block.
  // A few rows (decode): one matrix-vector product per row. sgemm would pack the whole of B (the weights)
  // on every call, which took over half of a CPU decode step.
  if (CblasSgemv sgemv = OpenBlasSgemv(); sgemv != nullptr && m <= kMaxRowsAsVectors) {
    // c_i = B a_i with B [n, k], or B^T a_i with B [k, n]: B's stored rows and columns.
    const int64_t col_blocks = (n + kGemvBlock - 1) / kGemvBlock;
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < m * col_blocks; ++block) {
      const int64_t i = block / col_blocks, j0 = block % col_blocks * kGemvBlock;
      const int nb = static_cast<int>(std::min(kGemvBlock, n - j0));
      if (transpose_b) {
        sgemv(kCblasRowMajor, kCblasNoTrans, nb, static_cast<int>(k), alpha, b + j0 * ldb, static_cast<int>(ldb),
              a + i * lda, 1, beta, c + i * ldc + j0, 1);
      } else {
        sgemv(kCblasRowMajor, kCblasTrans, static_cast<int>(k), nb, alpha, b + j0, static_cast<int>(ldb),
              a + i * lda, 1, beta, c + i * ldc + j0, 1);
      }
    }
    return;
  }
  if (CblasSgemm sgemm = OpenBlasSgemm(); sgemm != nullptr) {
    const int64_t row_blocks = (m + kGemmRowBlock - 1) / kGemmRowBlock;
    const int64_t col_blocks = (n + kGemmColBlock - 1) / kGemmColBlock;
#pragma omp parallel for schedule(dynamic)
    for (int64_t block = 0; block < row_blocks * col_blocks; ++block) {
      const int64_t i0 = block / col_blocks * kGemmRowBlock, j0 = block % col_blocks * kGemmColBlock;
      const int64_t mb = std::min(kGemmRowBlock, m - i0), nb = std::min(kGemmColBlock, n - j0);
      sgemm(kCblasRowMajor, kCblasNoTrans, transpose_b ? kCblasTrans : kCblasNoTrans, static_cast<int>(mb),
            static_cast<int>(nb), static_cast<int>(k), alpha, a + i0 * lda, static_cast<int>(lda),
            b + (transpose_b ? j0 * ldb : j0), static_cast<int>(ldb), beta, c + i0 * ldc + j0, static_cast<int>(ldc));
    }
    return;
  }
  GemmCpuPortable(transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace kvshard
