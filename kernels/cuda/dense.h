// Dense-layer kernels on the GPU: bf16 GEMM (cuBLAS, fp32 accumulate), RMSNorm, RoPE, SwiGLU, embedding
// gather, type conversion, and the final norm + logits. Host launchers; every pointer is device memory
// unless said otherwise; every launch is asynchronous on `stream`.
//
// CPU twins: kernels/gemm_cpu.h (LinearCpu), kernels/dense_cpu.h (RmsNormCpu, SwiGluCpu,
// EmbeddingGatherCpu), kernels/rope.h (ApplyRopeCpu, RopeInverseFrequencies).
//
// Precision plan: the residual stream and every norm/activation input are fp32; GEMM operands are bf16
// (weights stored bf16, activations rounded to bf16 by the kernel that produces them); GEMMs accumulate
// in fp32 and may write fp32.
#pragma once

#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/cublas_api.h"
#include "kernels/cuda/dtype.h"

namespace kvshard {

// Owns a cuBLAS handle and its workspace. Not thread-safe; one per stream is the usual pattern.
class CublasHandle {
 public:
  static absl::StatusOr<CublasHandle> Create();
  CublasHandle(CublasHandle&& other) noexcept;
  CublasHandle& operator=(CublasHandle&& other) noexcept;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle();

  cublasHandle_t get() const { return handle_; }
  const CublasApi& api() const { return *api_; }

 private:
  CublasHandle() = default;
  const CublasApi* api_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
};

// A Linear layer in Hugging Face weight layout, row-major:
//   y[m, n] = alpha * sum_k x[m, k] * w[n, k] + beta * y[m, n]
// x: [m][k] bf16, w: [n][k] bf16, y: [m][n] in y_dtype (kF32 or kBF16). fp32 accumulate.
// beta = 1 with an fp32 y adds the product into y (e.g. an output projection into the residual).
absl::Status GemmBf16(CublasHandle& handle, const void* x, const void* w, int64_t m, int64_t n, int64_t k,
                      void* y, DType y_dtype, float alpha, float beta, cudaStream_t stream);

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, for `rows` rows of `dim` values.
// x: fp32 [rows][dim], weight: fp32 [dim], y: [rows][dim] in y_dtype (any DType). fp32 math.
absl::Status RmsNormCuda(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, void* y,
                         DType y_dtype, cudaStream_t stream);

// Rotates, in place, `n_heads` head vectors of each of `rows` rows, "rotate_half" convention (channel i
// pairs with i + head_dim/2), row r at position positions[r]:
//   x: fp32, head h of row r at x + r * row_stride + h * head_dim;  positions: int64 [rows];
//   inv_freq: fp32 [head_dim/2] from RopeInverseFrequencies.
// Angles are pos * inv_freq in double, cos/sin in double, rounded once to fp32: matches ApplyRopeCpu to
// fp32 rounding.
absl::Status RopeCuda(float* x, int64_t row_stride, const int64_t* positions, const float* inv_freq,
                      int64_t rows, int n_heads, int head_dim, cudaStream_t stream);

// out[r, i] = silu(gate[r, i]) * up[r, i], silu(g) = g / (1 + exp(-g)), fp32 math.
// gate/up: fp32, row r at gate + r * in_row_stride (a fused gate|up projection uses up = gate + dim and
// in_row_stride = 2 * dim); out: [rows][dim] in out_dtype (any DType).
absl::Status SwiGluCuda(const float* gate, const float* up, int64_t in_row_stride, int64_t rows, int64_t dim,
                        void* out, DType out_dtype, cudaStream_t stream);

// out[r, :] = table[ids[r], :] as fp32. table: [vocab][dim] in table_dtype (kF32 or kBF16); ids: int32
// [n]. An id outside [0, vocab) gives a row of zeros (callers validate ids before they reach the GPU).
absl::Status EmbeddingGatherCuda(const void* table, DType table_dtype, int64_t vocab, int64_t dim,
                                 const int32_t* ids, int64_t n, float* out, cudaStream_t stream);

// dst[i] = src[i] converted (round to nearest even), n elements, any pair of DTypes.
absl::Status ConvertCuda(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                         cudaStream_t stream);

// dst row r = src row r converted (round to nearest even), `rows` rows of `cols` values with row strides
// in elements (a strided view, e.g. the query part of a fused QKV projection, to a packed tensor).
absl::Status ConvertRowsCuda(const void* src, DType src_dtype, int64_t src_stride, void* dst, DType dst_dtype,
                             int64_t dst_stride, int64_t rows, int64_t cols, cudaStream_t stream);

// dst[i] = value for n int32s; a kernel, so the value travels as an argument (no host buffer to keep).
absl::Status FillInt32Cuda(int32_t* dst, int32_t value, int64_t n, cudaStream_t stream);

// y[r, c] += bias[c]: fp32 y [rows][cols] (row stride `cols`), fp32 bias [cols].
absl::Status AddBiasCuda(float* y, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream);

// Final norm and logits for `rows` hidden states:
//   normed = RmsNorm(x, norm_weight) rounded to bf16 (into `scratch`, bf16 [rows][hidden])
//   logits[rows][vocab] (fp32) = normed * w_out^T, w_out: bf16 [vocab][hidden] (tied: the embedding).
absl::Status FinalNormLogitsCuda(CublasHandle& handle, const float* x, const float* norm_weight,
                                 const void* w_out, int64_t rows, int64_t hidden, int64_t vocab, float eps,
                                 void* scratch, float* logits, cudaStream_t stream);

}  // namespace kvshard
