// The merge of attention partials (split-KV decode, and across workers) and the packing of partials for
// the wire. lse is the natural log throughout (kernels/cuda/attention.h).
#include <climits>
#include <cmath>
#include <type_traits>

#include <cuda_bf16.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/reduce.cuh"

namespace kvshard {
namespace {

constexpr int kMergeThreads = 256;
constexpr int kMergeMaxHeadDim = 256;
constexpr int kElementwiseThreads = 256;

// Four consecutive values of a source (fp32 or bf16) as a float4; p is 4-element aligned.
template <typename T>
__device__ __forceinline__ float4 Load4(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *reinterpret_cast<const float4*>(p);
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    __nv_bfloat162 lo, hi;
    memcpy(&lo, &raw.x, 4);
    memcpy(&hi, &raw.y, 4);
    const float2 a = __bfloat1622float2(lo);
    const float2 b = __bfloat1622float2(hi);
    return make_float4(a.x, a.y, b.x, b.y);
  }
}

template <typename T>
__device__ __forceinline__ void Store4(T* p, float4 v) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = v;
  } else {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 raw;
    memcpy(&raw.x, &lo, 4);
    memcpy(&raw.y, &hi, 4);
    *reinterpret_cast<uint2*>(p) = raw;
  }
}

// One block per row. Thread t owns the 4-channel group t % (head_dim / 4) and the sources
// s = t / (head_dim / 4) + k * slots, so the walk over many sources runs `slots` ways in parallel; the
// slots are then summed in shared memory in a fixed order. Source s's row r: out at
// outs + s * out_stride + r * head_dim, lse at lses[s * lse_stride + r].
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    MergePartialsKernel(const T* __restrict__ outs, int64_t out_stride, const float* __restrict__ lses,
                        int64_t lse_stride, int n_sources, int head_dim, float* __restrict__ out,
                        float* __restrict__ lse) {
  __shared__ float scratch[kMergeThreads / 32];
  __shared__ __align__(16) float partial[kMergeThreads * 4];
  __shared__ float partial_weight[kMergeThreads];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  float max_lse = -INFINITY;
  for (int s = tid; s < n_sources; s += kMergeThreads) max_lse = fmaxf(max_lse, lses[s * lse_stride + row]);
  max_lse = BlockMax(max_lse, scratch);
  if (max_lse == -INFINITY) {
    for (int c = tid; c < head_dim; c += kMergeThreads) out[row * head_dim + c] = 0.0f;
    if (tid == 0) lse[row] = -INFINITY;
    return;
  }
  const int groups = head_dim / 4;
  const int slots = kMergeThreads / groups;
  const int group = tid % groups;
  const int slot = tid / groups;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float weight = 0.0f;
  if (slot < slots) {
    for (int s = slot; s < n_sources; s += slots) {
      const float source_lse = lses[s * lse_stride + row];
      if (source_lse == -INFINITY) continue;
      const float w = expf(source_lse - max_lse);
      weight += w;
      const float4 o = Load4(outs + s * out_stride + row * head_dim + group * 4);
      acc.x = fmaf(w, o.x, acc.x);
      acc.y = fmaf(w, o.y, acc.y);
      acc.z = fmaf(w, o.z, acc.z);
      acc.w = fmaf(w, o.w, acc.w);
    }
    reinterpret_cast<float4*>(partial)[slot * groups + group] = acc;
    if (group == 0) partial_weight[slot] = weight;
  }
  __syncthreads();
  float total = 0.0f;
  for (int k = 0; k < slots; ++k) total += partial_weight[k];
  for (int c = tid; c < head_dim; c += kMergeThreads) {
    float value = 0.0f;
    for (int k = 0; k < slots; ++k) value += partial[k * head_dim + c];
    out[row * head_dim + c] = value / total;
  }
  if (tid == 0) lse[row] = max_lse + logf(total);
}

// Thread i packs channels 4i..4i+3 of the flattened [n_rows][head_dim] out, and lse[i] when i < n_rows.
template <typename T>
__global__ void PackPartialsKernel(const float* __restrict__ out, const float* __restrict__ lse, int64_t n_rows,
                                   int64_t n_groups, T* __restrict__ record_out, float* __restrict__ record_lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_groups) Store4(record_out + i * 4, *reinterpret_cast<const float4*>(out + i * 4));
  if (i < n_rows) record_lse[i] = lse[i];
}

__device__ __forceinline__ float TreeWeight(float lse, float max_lse) {
  return (lse == -INFINITY || max_lse == -INFINITY) ? 0.0f : expf(lse - max_lse);
}

template <typename T>
__global__ void TreeScaleKernel(const float* __restrict__ out, const float* __restrict__ lse,
                                const float* __restrict__ max_lse, int64_t n_rows, int head_dim, int64_t n_groups,
                                T* __restrict__ numerators, float* __restrict__ weights) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_groups) {
    const int64_t row = i * 4 / head_dim;
    const float w = TreeWeight(lse[row], max_lse[row]);
    float4 o = *reinterpret_cast<const float4*>(out + i * 4);
    o.x *= w;
    o.y *= w;
    o.z *= w;
    o.w *= w;
    Store4(numerators + i * 4, o);
  }
  if (i < n_rows) weights[i] = TreeWeight(lse[i], max_lse[i]);
}

template <typename T>
__global__ void TreeFinishKernel(const T* __restrict__ numerators, const float* __restrict__ weights,
                                 const float* __restrict__ max_lse, int64_t n_rows, int head_dim, int64_t n_groups,
                                 float* __restrict__ out, float* __restrict__ lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_groups) {
    const float w = weights[i * 4 / head_dim];
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (w > 0.0f) {
      const float inv = 1.0f / w;
      o = Load4(numerators + i * 4);
      o.x *= inv;
      o.y *= inv;
      o.z *= inv;
      o.w *= inv;
    }
    *reinterpret_cast<float4*>(out + i * 4) = o;
  }
  if (i < n_rows) {
    const float w = weights[i];
    lse[i] = w > 0.0f ? max_lse[i] + logf(w) : -INFINITY;  // w == 0: guards -inf - (-inf)
  }
}

absl::Status CheckShape(const char* what, int64_t n_rows, int head_dim) {
  if (n_rows < 0 || n_rows > INT_MAX || head_dim <= 0 || head_dim > kMergeMaxHeadDim || head_dim % 4 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": bad shape n_rows=", n_rows, " head_dim=", head_dim,
                                                   " (head_dim a multiple of 4, at most 256)"));
  }
  return absl::OkStatus();
}

absl::Status CheckWire(const char* what, DType wire) {
  if (wire == DType::kF32 || wire == DType::kBF16) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, ": wire type ", DTypeName(wire), " (f32 or bf16)"));
}

// Blocks of kElementwiseThreads covering max(n_groups, n_rows) threads.
unsigned ElementwiseBlocks(int64_t n_rows, int64_t n_groups) {
  const int64_t n = n_groups > n_rows ? n_groups : n_rows;
  return static_cast<unsigned>((n + kElementwiseThreads - 1) / kElementwiseThreads);
}

}  // namespace

absl::Status MergePartialsCuda(const float* outs, const float* lses, int n_sources, int64_t n_rows,
                               int head_dim, float* out, float* lse, cudaStream_t stream) {
  if (n_sources < 0) return absl::InvalidArgumentError(absl::StrCat("MergePartialsCuda: n_sources=", n_sources));
  if (absl::Status s = CheckShape("MergePartialsCuda", n_rows, head_dim); !s.ok()) return s;
  if (n_rows == 0) return absl::OkStatus();
  MergePartialsKernel<float><<<static_cast<unsigned>(n_rows), kMergeThreads, 0, stream>>>(
      outs, n_rows * head_dim, lses, n_rows, n_sources, head_dim, out, lse);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

int64_t PartialsRecordBytes(int64_t n_rows, int head_dim, DType wire) {
  const int64_t bytes = n_rows * head_dim * DTypeBytes(wire) + n_rows * static_cast<int64_t>(sizeof(float));
  return (bytes + 15) / 16 * 16;
}

absl::Status PackPartialsCuda(const float* out, const float* lse, int64_t n_rows, int head_dim, DType wire,
                              void* record, cudaStream_t stream) {
  if (absl::Status s = CheckShape("PackPartialsCuda", n_rows, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckWire("PackPartialsCuda", wire); !s.ok()) return s;
  if (n_rows == 0) return absl::OkStatus();
  const int64_t n_groups = n_rows * head_dim / 4;
  char* base = static_cast<char*>(record);
  float* record_lse = reinterpret_cast<float*>(base + n_rows * head_dim * DTypeBytes(wire));
  const unsigned blocks = ElementwiseBlocks(n_rows, n_groups);
  if (wire == DType::kF32) {
    PackPartialsKernel<float><<<blocks, kElementwiseThreads, 0, stream>>>(out, lse, n_rows, n_groups,
                                                                           reinterpret_cast<float*>(base), record_lse);
  } else {
    PackPartialsKernel<__nv_bfloat16><<<blocks, kElementwiseThreads, 0, stream>>>(
        out, lse, n_rows, n_groups, reinterpret_cast<__nv_bfloat16*>(base), record_lse);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  const int64_t used = n_rows * head_dim * DTypeBytes(wire) + n_rows * static_cast<int64_t>(sizeof(float));
  const int64_t padding = PartialsRecordBytes(n_rows, head_dim, wire) - used;
  if (padding > 0) CUDA_RETURN_IF_ERROR(cudaMemsetAsync(base + used, 0, padding, stream));
  return absl::OkStatus();
}

absl::Status MergePartialRecordsCuda(const void* records, DType wire, int n_sources, int64_t n_rows, int head_dim,
                                     float* out, float* lse, cudaStream_t stream) {
  if (n_sources < 0) {
    return absl::InvalidArgumentError(absl::StrCat("MergePartialRecordsCuda: n_sources=", n_sources));
  }
  if (absl::Status s = CheckShape("MergePartialRecordsCuda", n_rows, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckWire("MergePartialRecordsCuda", wire); !s.ok()) return s;
  if (n_rows == 0) return absl::OkStatus();
  const int64_t record = PartialsRecordBytes(n_rows, head_dim, wire);  // a multiple of 16
  const char* base = static_cast<const char*>(records);
  const float* lses = reinterpret_cast<const float*>(base + n_rows * head_dim * DTypeBytes(wire));
  const int64_t lse_stride = record / static_cast<int64_t>(sizeof(float));
  const unsigned blocks = static_cast<unsigned>(n_rows);
  if (wire == DType::kF32) {
    MergePartialsKernel<float><<<blocks, kMergeThreads, 0, stream>>>(
        reinterpret_cast<const float*>(base), record / 4, lses, lse_stride, n_sources, head_dim, out, lse);
  } else {
    MergePartialsKernel<__nv_bfloat16><<<blocks, kMergeThreads, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(base), record / 2, lses, lse_stride, n_sources, head_dim, out, lse);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status TreeMergeScaleCuda(const float* out, const float* lse, const float* max_lse, int64_t n_rows,
                                int head_dim, DType wire, void* numerators, float* weights, cudaStream_t stream) {
  if (absl::Status s = CheckShape("TreeMergeScaleCuda", n_rows, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckWire("TreeMergeScaleCuda", wire); !s.ok()) return s;
  if (n_rows == 0) return absl::OkStatus();
  const int64_t n_groups = n_rows * head_dim / 4;
  const unsigned blocks = ElementwiseBlocks(n_rows, n_groups);
  if (wire == DType::kF32) {
    TreeScaleKernel<float><<<blocks, kElementwiseThreads, 0, stream>>>(
        out, lse, max_lse, n_rows, head_dim, n_groups, static_cast<float*>(numerators), weights);
  } else {
    TreeScaleKernel<__nv_bfloat16><<<blocks, kElementwiseThreads, 0, stream>>>(
        out, lse, max_lse, n_rows, head_dim, n_groups, static_cast<__nv_bfloat16*>(numerators), weights);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status TreeMergeFinishCuda(const void* numerators, const float* weights, const float* max_lse,
                                 int64_t n_rows, int head_dim, DType wire, float* out, float* lse,
                                 cudaStream_t stream) {
  if (absl::Status s = CheckShape("TreeMergeFinishCuda", n_rows, head_dim); !s.ok()) return s;
  if (absl::Status s = CheckWire("TreeMergeFinishCuda", wire); !s.ok()) return s;
  if (n_rows == 0) return absl::OkStatus();
  const int64_t n_groups = n_rows * head_dim / 4;
  const unsigned blocks = ElementwiseBlocks(n_rows, n_groups);
  if (wire == DType::kF32) {
    TreeFinishKernel<float><<<blocks, kElementwiseThreads, 0, stream>>>(
        static_cast<const float*>(numerators), weights, max_lse, n_rows, head_dim, n_groups, out, lse);
  } else {
    TreeFinishKernel<__nv_bfloat16><<<blocks, kElementwiseThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(numerators), weights, max_lse, n_rows, head_dim, n_groups, out, lse);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvshard
