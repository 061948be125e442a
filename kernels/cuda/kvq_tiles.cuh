// Device helpers shared by the kvq3 attention kernels (kvq_decode_attention.cu, kvq_prefill_attention.cu):
// staging, RoPE angles in fp32 that --use_fast_math leaves alone, and the register lookup table that turns
// 3-bit plane-group codes (kernels/kv_pack.h) into fp16 values. CUDA sources only.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_fp16.h>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/kv_pack.h"

namespace kvshard {

inline constexpr int kKvqPageTokens = 128;  // quantized tokens per page (kv_codecs.h's kPageTokens)

// Copies `bytes` (a multiple of 16) from global to shared memory with the warp's lanes, 16 bytes each.
__device__ __forceinline__ void StageAsync(void* smem, const void* gmem, int bytes, int lane) {
  for (int off = lane * 16; off < bytes; off += 32 * 16) {
    CpAsync16(static_cast<char*>(smem) + off, static_cast<const char*>(gmem) + off, true);
  }
}

__device__ __forceinline__ void RopeAngle(int64_t position, float inv_freq, float* c, float* s) {
  double sn, cs;
  sincos(static_cast<double>(position) * static_cast<double>(inv_freq), &sn, &cs);
  *c = static_cast<float>(cs);
  *s = static_cast<float>(sn);
}

// RoPE of the pair (a at channel i, b at channel i + head_dim / 2) by cos/sin, in fp32 with explicitly
// rounded, unfused products, as the CPU twin's rotation (so --use_fast_math does not contract them).
__device__ __forceinline__ void RotatePairBy(float* a, float* b, float c, float s) {
  const float r0 = __fsub_rn(__fmul_rn(*a, c), __fmul_rn(*b, s));
  const float r1 = __fadd_rn(__fmul_rn(*b, c), __fmul_rn(*a, s));
  *a = r0;
  *b = r1;
}

// The same at `position`, the angle in double (RopeAngle).
__device__ __forceinline__ void RotatePair(float* a, float* b, int64_t position, float inv_freq) {
  float c, s;
  RopeAngle(position, inv_freq, &c, &s);
  RotatePairBy(a, b, c, s);
}

// sin and cos of 0 <= x < 128 in fp32 with explicit operations, so --use_fast_math (which turns sincosf
// into the hardware approximation, ~1e-5 off at 100 rad) does not touch them: three-part Cody-Waite
// reduction by pi/2 (FMA), then the Cephes minimax polynomials on [-pi/4, pi/4]. Within 1e-7 of the
// double results over [0, 128).
__device__ __forceinline__ void SinCosSmall(float x, float* s, float* c) {
  const float k = rintf(x * 0.636619772f);
  float r = fmaf(-k, 1.57079637050628662109375f, x);
  r = fmaf(-k, -4.3711388286737929e-8f, r);
  r = fmaf(-k, -1.7150994166548195e-15f, r);
  const float r2 = __fmul_rn(r, r);
  float ps = fmaf(r2, -1.9515295891e-4f, 8.3321608736e-3f);
  ps = fmaf(r2, ps, -1.6666654611e-1f);
  const float sr = fmaf(__fmul_rn(r, r2), ps, r);
  float pc = fmaf(r2, 2.443315711809948e-5f, -1.388731625493765e-3f);
  pc = fmaf(r2, pc, 4.166664568298827e-2f);
  const float cr = fmaf(__fmul_rn(r2, r2), pc, fmaf(-0.5f, r2, 1.0f));
  const int q = static_cast<int>(k) & 3;
  const float sa = (q & 1) ? cr : sr, ca = (q & 1) ? sr : cr;
  *s = (q & 2) ? -sa : sa;
  *c = ((q + 1) & 2) ? -ca : ca;
}

// cos/sin(t * inv_freq) for a token offset 0 <= t < 128 inside a page (|angle| < 128 rad): the product is
// split exactly into fp32 h + l (FMA), SinCosSmall(h) is corrected to first order by l (|l| < 4e-6, so
// the dropped term is < 1e-11). Within 1.1e-7 of cos/sin(double(t) * double(inv_freq)) for every t and
// frequency of RoPE bases 1e4 .. 1e6, head_dim 64 and 128 (checked exhaustively against libm).
__device__ __forceinline__ void SmallAngle(int t, float inv_freq, float* c, float* s) {
  const float x = static_cast<float>(t);
  const float h = __fmul_rn(x, inv_freq);
  const float l = fmaf(x, inv_freq, -h);
  float sh, ch;
  SinCosSmall(h, &sh, &ch);
  *c = fmaf(-l, sh, ch);
  *s = fmaf(l, ch, sh);
}

// cos/sin(A + B) from anchor (cos A, sin A) and cos/sin B, in fp32: with inputs within 1.1e-7 and two
// roundings per output the result is within 4e-7 absolute.
__device__ __forceinline__ void AddAngle(float2 anchor, float cb, float sb, float* c, float* s) {
  *c = fmaf(anchor.x, cb, -anchor.y * sb);
  *s = fmaf(anchor.y, cb, anchor.x * sb);
}

// The fp16 codebook of 8 entries as byte tables: lo[k / 4] byte k % 4 is the low byte of entry k.
struct HalfLut {
  uint32_t lo0, lo1, hi0, hi1;
};

__device__ __forceinline__ HalfLut MakeHalfLut(const float* codebook) {
  uint32_t lo[2] = {0u, 0u}, hi[2] = {0u, 0u};
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t h = __half_as_ushort(__float2half_rn(codebook[k]));
    lo[k >> 2] |= (h & 0xFFu) << (8 * (k & 3));
    hi[k >> 2] |= (h >> 8) << (8 * (k & 3));
  }
  return HalfLut{lo[0], lo[1], hi[0], hi[1]};
}

// Codes in selector nibbles 0..3 (low 16 bits; bit 3 of each nibble clear) to fp16x2 {code 0, code 2}
// and {code 1, code 3}.
__device__ __forceinline__ void LutLookup(const HalfLut& t, uint32_t selector, uint32_t* x02, uint32_t* x13) {
  const uint32_t lo = __byte_perm(t.lo0, t.lo1, selector);
  const uint32_t hi = __byte_perm(t.hi0, t.hi1, selector);
  *x02 = __byte_perm(lo, hi, 0x6240);
  *x13 = __byte_perm(lo, hi, 0x7351);
}

// Byte `index` (0..3) of a and of b as selector nibbles 0, 1 and 2, 3.
__device__ __forceinline__ uint32_t JoinBytes(uint32_t a, uint32_t b, int index) {
  return __byte_perm(a, b, static_cast<uint32_t>(index | ((4 + index) << 4)));
}

__device__ __forceinline__ __half2 AsHalf2(uint32_t x) {
  __half2 h;
  memcpy(&h, &x, 4);
  return h;
}
__device__ __forceinline__ uint32_t AsWord(__half2 h) {
  uint32_t x;
  memcpy(&x, &h, 4);
  return x;
}

// Channel c's codes of tokens 16g .. 16g + 15 of a channel-major kvq3 key page (128 codes, four plane
// groups, a channel) as nibbles: *even holds token 16g + 2k in nibble k, *odd token 16g + 2k + 1.
__device__ __forceinline__ void KeyNibbles(const uint32_t* kcodes, int c, int g, uint32_t* even, uint32_t* odd) {
  const uint32_t* group = kcodes + c * (kKvqPageTokens * 3 / 32) + 3 * (g >> 1);
  ThreeBitPlaneNibbles(group[g & 1], group[2], g & 1, even, odd);
}

// Token t's codes of channels (HEAD_DIM / 8) g .. + HEAD_DIM / 8 - 1 of a token-major kvq3 value page as
// nibbles: *even holds channel (HEAD_DIM / 8) g + 2k in nibble k, *odd the next channel (k < HEAD_DIM / 16).
template <int HEAD_DIM>
__device__ __forceinline__ void ValueNibbles(const uint32_t* vcodes, int t, int g, uint32_t* even, uint32_t* odd) {
  const int index = t * HEAD_DIM + (HEAD_DIM / 8) * g;
  const int r = index % kPlaneGroupCodes;  // 0 or 16 (head_dim 128); 0, 8, 16 or 24 (head_dim 64)
  const uint32_t* group = vcodes + (index / kPlaneGroupCodes) * 3;
  ThreeBitPlaneNibbles(group[r >> 4], group[2], r >> 4, even, odd);
  *even >>= 2 * (r & 15);
  *odd >>= 2 * (r & 15);
}

// RoPE of the pair (a at channel i, b at channel i + HEAD_DIM / 2) of two channels at once, in fp16:
// factors = {fp16x2 cos, fp16x2 sin}.
__device__ __forceinline__ void RotateHalf2(__half2 a, __half2 b, uint2 factors, uint32_t* ra, uint32_t* rb) {
  const __half2 c = AsHalf2(factors.x), s = AsHalf2(factors.y);
  *ra = AsWord(__hfma2(a, c, __hneg2(__hmul2(b, s))));
  *rb = AsWord(__hfma2(b, c, __hmul2(a, s)));
}

}  // namespace kvshard
