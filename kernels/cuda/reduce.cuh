// Warp and block reductions in a fixed order (deterministic results), for the kernels in kernels/cuda/.
#pragma once

#include <cuda_runtime.h>

namespace kvshard {

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ int WarpSumInt(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one value per warp; the call
// ends with a barrier, so scratch can be reused by the next call.
template <typename T, typename WarpOp, typename Combine>
__device__ __forceinline__ T BlockReduce(T v, T* scratch, WarpOp warp_op, Combine combine) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  v = warp_op(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
  for (int w = 1; w < n_warps; ++w) total = combine(total, scratch[w]);
  return total;
}

// Inclusive prefix sum over the warp's lanes in lane order (all lanes must call it).
template <typename T>
__device__ __forceinline__ T WarpInclusiveSum(T v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T other = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// Exclusive prefix sum over the block's threads in thread order, in a fixed order (deterministic for
// floats): returns the sum of `v` over the threads before this one, and *total the block's sum.
// `scratch` holds one T per warp; the call starts and ends with a barrier, so it may be reused.
template <typename T>
__device__ __forceinline__ T BlockExclusiveSum(T v, T* scratch, T* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  const T inclusive = WarpInclusiveSum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  T warp_prefix = T(0), sum = T(0);
  for (int w = 0; w < n_warps; ++w) {
    if (w == warp) warp_prefix = sum;
    sum += scratch[w];
  }
  *total = sum;
  return warp_prefix + inclusive - v;
}

struct WarpSumOp {
  __device__ __forceinline__ float operator()(float v) const { return WarpSum(v); }
};
struct WarpMaxOp {
  __device__ __forceinline__ float operator()(float v) const { return WarpMax(v); }
};
struct WarpSumIntOp {
  __device__ __forceinline__ int operator()(int v) const { return WarpSumInt(v); }
};
struct AddOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  return BlockReduce(v, scratch, WarpSumOp{}, AddOp{});
}
__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  return BlockReduce(v, scratch, WarpMaxOp{}, MaxOp{});
}
__device__ __forceinline__ int BlockSumInt(int v, int* scratch) {
  return BlockReduce(v, scratch, WarpSumIntOp{}, AddOp{});
}

}  // namespace kvshard
