#include "kernels/cuda/dense.h"

#include <climits>
#include <cstdint>
#include <utility>

#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/reduce.cuh"

namespace kvshard {
namespace {

constexpr size_t kCublasWorkspaceBytes = 32u << 20;  // cuBLAS recommends >= 32 MiB on Hopper

cudaDataType CudaDataType(DType dtype) {
  switch (dtype) {
    case DType::kF32: return CUDA_R_32F;
    case DType::kF16: return CUDA_R_16F;
    case DType::kBF16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

// Binds T to the C++ type of any DType.
#define KV_DISPATCH_ANY_TYPE(dtype, T, ...)              \
  [&]() -> ::absl::Status {                              \
    switch (dtype) {                                     \
      case DType::kF32: {                                \
        using T = float;                                 \
        __VA_ARGS__                                      \
      }                                                  \
      case DType::kF16: {                                \
        using T = __half;                                \
        __VA_ARGS__                                      \
      }                                                  \
      case DType::kBF16: {                               \
        using T = __nv_bfloat16;                         \
        __VA_ARGS__                                      \
      }                                                  \
    }                                                    \
    return ::absl::InvalidArgumentError("unknown dtype"); \
  }()

absl::Status CheckRows(int64_t rows, int64_t dim, const char* what) {
  if (rows < 0 || dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": bad shape rows=", rows, " dim=", dim));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm: one block per row; the row is read twice (the second pass hits L1/L2). Rows of a multiple of 4
// floats (16-byte aligned) go as float4 with four loads in flight per thread: a decode step normalizes a
// single row, so the kernel is one block and its time is the latency of its dependent loads.
constexpr int kNormThreads = 256;

template <typename OutT>
__global__ void __launch_bounds__(kNormThreads) RmsNormKernel(const float* __restrict__ x,
                                                              const float* __restrict__ weight, int64_t dim,
                                                              float eps, OutT* __restrict__ y) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  OutT* yr = y + row * dim;
  __shared__ float scratch[kNormThreads / 32];
  float sum_sq = 0.0f;
  if (dim % 4 == 0 && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(weight)) & 15) == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    const int64_t n4 = dim / 4;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < n4; i += kNormThreads) {
      const float4 v = x4[i];
      sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    sum_sq = BlockSum(sum_sq, scratch);
    const float inv_rms = rsqrtf(sum_sq / static_cast<float>(dim) + eps);
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < n4; i += kNormThreads) {
      const float4 v = x4[i], w = w4[i];
      OutT* out = yr + 4 * i;
      out[0] = FromFloat<OutT>(v.x * inv_rms * w.x);
      out[1] = FromFloat<OutT>(v.y * inv_rms * w.y);
      out[2] = FromFloat<OutT>(v.z * inv_rms * w.z);
      out[3] = FromFloat<OutT>(v.w * inv_rms * w.w);
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) sum_sq += xr[i] * xr[i];
  sum_sq = BlockSum(sum_sq, scratch);
  const float inv_rms = rsqrtf(sum_sq / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) yr[i] = FromFloat<OutT>(xr[i] * inv_rms * weight[i]);
}

// ---------------------------------------------------------------------------------------------------
// RoPE: one thread per (row, channel pair, group of kRopeHeadsPerThread heads); it computes cos/sin once (in
// double, as the CPU twin) and rotates its heads with their loads issued together. A decode row has 64 pairs,
// so spreading the heads over threads is what gives the kernel more than one block.
constexpr int kRopeThreads = 128;
constexpr int kRopeHeadsPerThread = 4;

__global__ void __launch_bounds__(kRopeThreads) RopeKernel(float* __restrict__ x, int64_t row_stride,
                                                           const int64_t* __restrict__ positions,
                                                           const float* __restrict__ inv_freq, int64_t rows,
                                                           int n_heads, int head_dim) {
  const int half = head_dim / 2;
  const int head_groups = (n_heads + kRopeHeadsPerThread - 1) / kRopeHeadsPerThread;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * half * head_groups) return;
  const int64_t row = idx / (static_cast<int64_t>(half) * head_groups);
  const int rest = static_cast<int>(idx % (static_cast<int64_t>(half) * head_groups));
  const int group = rest / half;
  const int i = rest % half;
  const double angle = static_cast<double>(positions[row]) * static_cast<double>(inv_freq[i]);
  double s_d, c_d;
  sincos(angle, &s_d, &c_d);
  const float c = static_cast<float>(c_d);
  const float s = static_cast<float>(s_d);
  float* xr = x + row * row_stride;
  const int h0 = group * kRopeHeadsPerThread;
  const int n = min(kRopeHeadsPerThread, n_heads - h0);
  float a[kRopeHeadsPerThread], b[kRopeHeadsPerThread];
#pragma unroll
  for (int k = 0; k < kRopeHeadsPerThread; ++k) {
    if (k < n) {
      a[k] = xr[static_cast<int64_t>(h0 + k) * head_dim + i];
      b[k] = xr[static_cast<int64_t>(h0 + k) * head_dim + i + half];
    }
  }
#pragma unroll
  for (int k = 0; k < kRopeHeadsPerThread; ++k) {
    if (k < n) {
      float* v = xr + static_cast<int64_t>(h0 + k) * head_dim;
      v[i] = a[k] * c - b[k] * s;
      v[i + half] = b[k] * c + a[k] * s;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
constexpr int kElementwiseThreads = 256;

template <typename OutT>
__global__ void __launch_bounds__(kElementwiseThreads) SwiGluKernel(const float* __restrict__ gate,
                                                                    const float* __restrict__ up,
                                                                    int64_t in_row_stride, int64_t dim,
                                                                    OutT* __restrict__ out) {
  const int64_t row = blockIdx.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < dim;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[row * in_row_stride + i];
    const float u = up[row * in_row_stride + i];
    out[row * dim + i] = FromFloat<OutT>(g / (1.0f + expf(-g)) * u);
  }
}

template <typename TableT>
__global__ void __launch_bounds__(kElementwiseThreads) EmbeddingGatherKernel(const TableT* __restrict__ table,
                                                                             int64_t vocab, int64_t dim,
                                                                             const int32_t* __restrict__ ids,
                                                                             float* __restrict__ out) {
  const int64_t row = blockIdx.y;
  const int32_t id = ids[row];
  const bool valid = id >= 0 && id < vocab;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < dim;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[row * dim + i] = valid ? ToFloat(table[static_cast<int64_t>(id) * dim + i]) : 0.0f;
  }
}

template <typename SrcT, typename DstT>
__global__ void __launch_bounds__(kElementwiseThreads) ConvertKernel(const SrcT* __restrict__ src,
                                                                     DstT* __restrict__ dst, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = FromFloat<DstT>(ToFloat(src[i]));
  }
}

template <typename SrcT, typename DstT>
__global__ void __launch_bounds__(kElementwiseThreads) ConvertRowsKernel(const SrcT* __restrict__ src,
                                                                         int64_t src_stride,
                                                                         DstT* __restrict__ dst,
                                                                         int64_t dst_stride, int64_t cols) {
  const int64_t row = blockIdx.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[row * dst_stride + i] = FromFloat<DstT>(ToFloat(src[row * src_stride + i]));
  }
}

__global__ void __launch_bounds__(kElementwiseThreads) AddBiasKernel(float* __restrict__ y,
                                                                     const float* __restrict__ bias,
                                                                     int64_t cols) {
  const int64_t row = blockIdx.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[row * cols + i] += bias[i];
  }
}

__global__ void __launch_bounds__(kElementwiseThreads) FillInt32Kernel(int32_t* __restrict__ dst, int32_t value,
                                                                       int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = value;
  }
}

// Grid for a row-wise elementwise kernel: y = rows, x = enough blocks to cover dim (capped).
dim3 RowGrid(int64_t rows, int64_t dim) {
  return dim3(static_cast<unsigned>(std::min<int64_t>(CeilDiv(dim, kElementwiseThreads), 64)),
              static_cast<unsigned>(rows));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
absl::StatusOr<CublasHandle> CublasHandle::Create() {
  CublasHandle h;
  KV_ASSIGN_OR_RETURN(h.api_, LoadCublas());
  CUBLAS_RETURN_IF_ERROR(h.api_->create(&h.handle_));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&h.workspace_, kCublasWorkspaceBytes));
  CUBLAS_RETURN_IF_ERROR(h.api_->set_workspace(h.handle_, h.workspace_, kCublasWorkspaceBytes));
  return h;
}

CublasHandle::CublasHandle(CublasHandle&& other) noexcept
    : api_(other.api_),
      handle_(std::exchange(other.handle_, nullptr)),
      workspace_(std::exchange(other.workspace_, nullptr)) {}

CublasHandle& CublasHandle::operator=(CublasHandle&& other) noexcept {
  if (this != &other) {
    this->~CublasHandle();
    api_ = other.api_;
    handle_ = std::exchange(other.handle_, nullptr);
    workspace_ = std::exchange(other.workspace_, nullptr);
  }
  return *this;
}

CublasHandle::~CublasHandle() {
  if (handle_ != nullptr) api_->destroy(handle_);
  if (workspace_ != nullptr) cudaFree(workspace_);
}

absl::Status GemmBf16(CublasHandle& handle, const void* x, const void* w, int64_t m, int64_t n, int64_t k,
                      void* y, DType y_dtype, float alpha, float beta, cudaStream_t stream) {
  if (m < 0 || n <= 0 || k <= 0 || m > INT_MAX || n > INT_MAX || k > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("GemmBf16: bad shape m=", m, " n=", n, " k=", k));
  }
  if (y_dtype != DType::kF32 && y_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("GemmBf16: output type ", DTypeName(y_dtype), " is not supported (f32, bf16)"));
  }
  if (m == 0) return absl::OkStatus();
  const CublasApi& cublas = handle.api();
  CUBLAS_RETURN_IF_ERROR(cublas.set_stream(handle.get(), stream));
  // Row-major y[m][n] is column-major y^T (n x m) = w (n x k, i.e. column-major [k][n] transposed) * x^T.
  CUBLAS_RETURN_IF_ERROR(cublas.gemm_ex(handle.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                                      static_cast<int>(m), static_cast<int>(k), &alpha, w, CUDA_R_16BF,
                                      static_cast<int>(k), x, CUDA_R_16BF, static_cast<int>(k), &beta, y,
                                      CudaDataType(y_dtype), static_cast<int>(n), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status RmsNormCuda(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, void* y,
                         DType y_dtype, cudaStream_t stream) {
  if (absl::Status s = CheckRows(rows, dim, "RmsNormCuda"); !s.ok()) return s;
  if (rows == 0) return absl::OkStatus();
  if (rows > INT_MAX) return absl::InvalidArgumentError("RmsNormCuda: too many rows");
  return KV_DISPATCH_ANY_TYPE(y_dtype, OutT, {
    RmsNormKernel<OutT><<<static_cast<unsigned>(rows), kNormThreads, 0, stream>>>(x, weight, dim, eps,
                                                                                 static_cast<OutT*>(y));
    CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status RopeCuda(float* x, int64_t row_stride, const int64_t* positions, const float* inv_freq,
                      int64_t rows, int n_heads, int head_dim, cudaStream_t stream) {
  if (head_dim <= 0 || head_dim % 2 != 0 || n_heads <= 0 || rows < 0 ||
      row_stride < static_cast<int64_t>(n_heads) * head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("RopeCuda: bad shape rows=", rows, " n_heads=", n_heads,
                                                   " head_dim=", head_dim, " row_stride=", row_stride));
  }
  const int64_t threads = rows * (head_dim / 2) * ((n_heads + kRopeHeadsPerThread - 1) / kRopeHeadsPerThread);
  if (threads == 0) return absl::OkStatus();
  if (CeilDiv(threads, kRopeThreads) > INT_MAX) return absl::InvalidArgumentError("RopeCuda: too many rows");
  RopeKernel<<<static_cast<unsigned>(CeilDiv(threads, kRopeThreads)), kRopeThreads, 0, stream>>>(
      x, row_stride, positions, inv_freq, rows, n_heads, head_dim);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status SwiGluCuda(const float* gate, const float* up, int64_t in_row_stride, int64_t rows, int64_t dim,
                        void* out, DType out_dtype, cudaStream_t stream) {
  if (absl::Status s = CheckRows(rows, dim, "SwiGluCuda"); !s.ok()) return s;
  if (rows > 65535) return absl::InvalidArgumentError("SwiGluCuda: more than 65535 rows; split the call");
  if (rows == 0) return absl::OkStatus();
  return KV_DISPATCH_ANY_TYPE(out_dtype, OutT, {
    SwiGluKernel<OutT><<<RowGrid(rows, dim), kElementwiseThreads, 0, stream>>>(gate, up, in_row_stride, dim,
                                                                              static_cast<OutT*>(out));
    CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status EmbeddingGatherCuda(const void* table, DType table_dtype, int64_t vocab, int64_t dim,
                                 const int32_t* ids, int64_t n, float* out, cudaStream_t stream) {
  if (absl::Status s = CheckRows(n, dim, "EmbeddingGatherCuda"); !s.ok()) return s;
  if (n > 65535) return absl::InvalidArgumentError("EmbeddingGatherCuda: more than 65535 ids; split the call");
  if (n == 0) return absl::OkStatus();
  if (table_dtype == DType::kF16) {
    return absl::InvalidArgumentError("EmbeddingGatherCuda: table type f16 is not supported (f32, bf16)");
  }
  return KV_DISPATCH_ANY_TYPE(table_dtype, TableT, {
    EmbeddingGatherKernel<TableT><<<RowGrid(n, dim), kElementwiseThreads, 0, stream>>>(
        static_cast<const TableT*>(table), vocab, dim, ids, out);
    CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status ConvertCuda(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                         cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("ConvertCuda: negative size");
  if (n == 0) return absl::OkStatus();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(CeilDiv(n, kElementwiseThreads), 4096));
  return KV_DISPATCH_ANY_TYPE(src_dtype, SrcT, {
    return KV_DISPATCH_ANY_TYPE(dst_dtype, DstT, {
      ConvertKernel<SrcT, DstT><<<blocks, kElementwiseThreads, 0, stream>>>(static_cast<const SrcT*>(src),
                                                                           static_cast<DstT*>(dst), n);
      CUDA_RETURN_IF_LAUNCH_ERROR();
      return absl::OkStatus();
    });
  });
}

absl::Status ConvertRowsCuda(const void* src, DType src_dtype, int64_t src_stride, void* dst, DType dst_dtype,
                             int64_t dst_stride, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (absl::Status s = CheckRows(rows, cols, "ConvertRowsCuda"); !s.ok()) return s;
  if (rows > 65535) return absl::InvalidArgumentError("ConvertRowsCuda: more than 65535 rows; split the call");
  if (rows == 0) return absl::OkStatus();
  return KV_DISPATCH_ANY_TYPE(src_dtype, SrcT, {
    return KV_DISPATCH_ANY_TYPE(dst_dtype, DstT, {
      ConvertRowsKernel<SrcT, DstT><<<RowGrid(rows, cols), kElementwiseThreads, 0, stream>>>(
          static_cast<const SrcT*>(src), src_stride, static_cast<DstT*>(dst), dst_stride, cols);
      CUDA_RETURN_IF_LAUNCH_ERROR();
      return absl::OkStatus();
    });
  });
}

absl::Status FillInt32Cuda(int32_t* dst, int32_t value, int64_t n, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("FillInt32Cuda: negative size");
  if (n == 0) return absl::OkStatus();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(CeilDiv(n, kElementwiseThreads), 1024));
  FillInt32Kernel<<<blocks, kElementwiseThreads, 0, stream>>>(dst, value, n);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status AddBiasCuda(float* y, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (absl::Status s = CheckRows(rows, cols, "AddBiasCuda"); !s.ok()) return s;
  if (rows > 65535) return absl::InvalidArgumentError("AddBiasCuda: more than 65535 rows; split the call");
  if (rows == 0) return absl::OkStatus();
  AddBiasKernel<<<RowGrid(rows, cols), kElementwiseThreads, 0, stream>>>(y, bias, cols);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status FinalNormLogitsCuda(CublasHandle& handle, const float* x, const float* norm_weight,
                                 const void* w_out, int64_t rows, int64_t hidden, int64_t vocab, float eps,
                                 void* scratch, float* logits, cudaStream_t stream) {
  if (absl::Status s = RmsNormCuda(x, norm_weight, rows, hidden, eps, scratch, DType::kBF16, stream); !s.ok()) {
    return s;
  }
  return GemmBf16(handle, scratch, w_out, rows, vocab, hidden, logits, DType::kF32, 1.0f, 0.0f, stream);
}

}  // namespace kvshard
