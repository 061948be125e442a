// Hopper warpgroup MMA (wgmma.mma_async, sm_90a): shared-memory matrix descriptors for 128-byte swizzled
// tiles, the fences around the asynchronous MMAs, and the m64nNk16 shapes the prefill kernel uses
// (fp32 accumulation of fp16 or bf16 operands). CUDA sources only; the kernels that use them run on
// compute capability 9.x.
//
// Accumulator layout (the same as four mma.sync m16n8 tiles per warp): thread t of the warpgroup holds in
// d[j][e] the element at row 16 (t / 32) + (t % 32) / 4 + 8 (e / 2) and column 8 j + 2 (t % 4) + e % 2.
// A from registers (a[0..3]) has mma.sync m16n8k16's A layout for the warp's 16 rows, so two accumulator
// tiles of 8 columns, rounded to 16 bits, are the A operand of one k-step of the next MMA.
//
// Tiles are 128-byte swizzled (Swizzle128Offset): a [rows][64] panel of 16-bit values with 128-byte rows,
// 16-byte chunk c of row r stored at chunk c ^ (r % 8), panels 1024-byte aligned. Wider rows are split into
// panels of 64 columns placed one after another.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kvshard {

// Byte offset of 16-byte chunk `chunk` (of 8 values) of row `row` in a 128-byte swizzled tile of `rows`
// rows whose panels are consecutive (chunk / 8 is the panel).
__host__ __device__ constexpr int Swizzle128Offset(int row, int chunk, int rows) {
  return (chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// Descriptor of a 128-byte swizzled operand at `smem` (shared memory). K-major operands (A = Q, B = K):
// rows are M or N, a k-step of 16 values is 32 bytes inside a row, so `smem` steps by 32 bytes within a
// panel; stride_bytes = 1024 (8 rows of 128 bytes), leading_bytes unused. MN-major operands (B = V, read
// transposed): rows are K, 64 values of N per panel; leading_bytes = the panel stride, stride_bytes = 1024.
__device__ __forceinline__ uint64_t SmemDescriptor128(const void* smem, uint32_t leading_bytes, uint32_t stride_bytes) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint64_t desc = (address & 0x3FFFFu) >> 4;
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFFu) << 32;
  desc |= uint64_t{1} << 62;  // 128-byte swizzle
  return desc;
}

// Orders the accumulators' ordinary reads and writes against the asynchronous MMAs (the compiler sees the
// MMA's outputs as ready when it is issued; this pins them to the fence or wait it follows).
template <int N>
__device__ __forceinline__ void WgmmaFenceOperands(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
  }
}

// Before the first MMA of a batch (registers written since the last batch become visible to it).
__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's ordinary (and cp.async) writes to shared memory visible to the MMAs' async proxy.
__device__ __forceinline__ void FenceProxyAsyncShared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The accumulator operands of an m64nNk16 MMA, d[N / 8][4] (N = 128 and 64).
#define KV_WGMMA_D128 \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
    "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
    "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
    "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
    "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
    "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
    "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), \
    "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), \
    "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
    "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), \
    "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
    "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), \
    "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
    "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), \
    "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define KV_WGMMA_D64 \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
    "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
    "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
    "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
    "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
    "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
    "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

// The instructions; TYPE is "f16" or "bf16" (a string literal, joined into the PTX).
#define KV_WGMMA_M64N128_SS(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
               : KV_WGMMA_D128 \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
#define KV_WGMMA_M64N128_RS(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n" \
               : KV_WGMMA_D128 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))
#define KV_WGMMA_M64N64_RS(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n" \
               : KV_WGMMA_D64 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))

// d (+)= A B for one k-step of 16: m64nNk16. accumulate = 0 overwrites d. SS: A and B by descriptor
// (K-major). RS: A from registers; TRANS_B = 1 reads B MN-major.
template <typename T>
__device__ __forceinline__ void WgmmaM64N128SS(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same_v<T, __half>) {
    KV_WGMMA_M64N128_SS("f16");
  } else {
    KV_WGMMA_M64N128_SS("bf16");
  }
}

template <typename T, int TRANS_B>
__device__ __forceinline__ void WgmmaM64N128RS(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b,
                                               int accumulate) {
  if constexpr (std::is_same_v<T, __half>) {
    KV_WGMMA_M64N128_RS("f16");
  } else {
    KV_WGMMA_M64N128_RS("bf16");
  }
}

template <typename T, int TRANS_B>
__device__ __forceinline__ void WgmmaM64N64RS(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                              int accumulate) {
  if constexpr (std::is_same_v<T, __half>) {
    KV_WGMMA_M64N64_RS("f16");
  } else {
    KV_WGMMA_M64N64_RS("bf16");
  }
}

#undef KV_WGMMA_M64N128_SS
#undef KV_WGMMA_M64N128_RS
#undef KV_WGMMA_M64N64_RS
#undef KV_WGMMA_D128
#undef KV_WGMMA_D64

}  // namespace kvshard
