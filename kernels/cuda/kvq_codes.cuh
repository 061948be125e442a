// kvq code computation on the device, shared by the packers (kv_pack.cu) and the store's append
// (kvq_store.cu), so both give the codes of kv_codecs.cc's KvqKeyCodec / KvqValueCodec bit for bit.
//
// The build uses --use_fast_math, so the normalization is written with explicitly rounded intrinsics: the
// codes must come from the same fp32 operations, in the same order, as the CPU's
//   u = clamp(2 (x - lo) / (hi - lo) - 1, -1, 1), then the nearest centroid (ties to the lower one).
// CUDA sources only.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>

#include "kernels/cuda/kvq_attention.h"
#include "kernels/kv_pack.h"

namespace kvshard {

inline constexpr int kKvqMaxValueOutliers = 8;  // n_out per token the value encoder keeps (1% of 256 is 3)

__device__ __forceinline__ float RoundToHalf(float x) { return __half2float(__float2half_rn(x)); }

__device__ __forceinline__ float KvqNormalize(float x, float lo, float hi) {
  if (!(hi > lo)) return 0.0f;
  const float u = __fsub_rn(__fdiv_rn(__fmul_rn(2.0f, __fsub_rn(x, lo)), __fsub_rn(hi, lo)), 1.0f);
  return fminf(fmaxf(u, -1.0f), 1.0f);
}

template <int BITS>
__device__ __forceinline__ uint32_t KvqNearest(const float (&cb)[1 << BITS], float u) {
  constexpr int k = 1 << BITS;
  int hi = 0;  // first centroid >= u (std::lower_bound)
#pragma unroll
  for (int i = 0; i < k; ++i) hi += cb[i] < u ? 1 : 0;
  if (hi == 0) return 0;
  if (hi == k) return k - 1;
  return __fsub_rn(u, cb[hi - 1]) <= __fsub_rn(cb[hi], u) ? hi - 1 : hi;
}

// Code streams as 32-bit words (kernels/kv_pack.h): every 32 codes are BITS whole words, bit planes for
// 3 bits and a little-endian bit stream otherwise. `words` starts at a 32-code group.

// ORs code `index` into a zeroed slot of the stream (with constant indices the words stay in registers).
template <int BITS>
__device__ __forceinline__ void PutCode(uint32_t* words, int index, uint32_t code) {
  uint32_t* group = words + (index / kPlaneGroupCodes) * BITS;
  const int r = index % kPlaneGroupCodes;
  if constexpr (BITS == 3) {
    group[r >> 4] |= (code & 3u) << (2 * (r & 15));
    group[2] |= (code >> 2) << ThreeBitHighBit(r);
  } else {
    const int bit = r * BITS;
    group[bit >> 5] |= code << (bit & 31);
    if ((bit & 31) + BITS > 32) group[(bit >> 5) + 1] |= code >> (32 - (bit & 31));
  }
}

template <int BITS>
__device__ __forceinline__ uint32_t CodeAt(const uint32_t* words, int64_t index) {
  const uint32_t* group = words + (index / kPlaneGroupCodes) * BITS;
  const int r = static_cast<int>(index % kPlaneGroupCodes);
  if constexpr (BITS == 3) {
    return ((group[r >> 4] >> (2 * (r & 15))) & 3u) | (((group[2] >> ThreeBitHighBit(r)) & 1u) << 2);
  } else {
    const int bit = r * BITS;
    const uint32_t hi = (bit & 31) + BITS > 32 ? group[(bit >> 5) + 1] : 0u;
    return __funnelshift_r(group[bit >> 5], hi, bit & 31) & ((1u << BITS) - 1u);
  }
}

// A key whose unsigned order is KvqValueThresholds' (value, channel) order: ties broken by the channel.
// -0 and +0 compare equal there, so both map to +0's key.
__device__ __forceinline__ uint64_t KvqValueKey(float x, int channel) {
  uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | static_cast<uint32_t>(channel);
}

__device__ __forceinline__ uint64_t WarpMin64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other < v ? other : v;
  }
  return v;
}
__device__ __forceinline__ uint64_t WarpMax64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Encodes one token's values with a warp, as KvqValueCodec::Encode does: lane l holds channels l + 32 k
// (x: fp16-rounded floats). The n_out + 1 smallest and largest channels by (value, channel) come from warp
// reductions (ties: the lower channel for the smallest, the higher for the largest, as the CPU's
// selection); the split with the narrowest remaining range (the first on ties); then the codes. Writes
// HEAD_DIM * BITS / 32 code words (token-major: whole plane groups per token), the fp16 thresholds and the
// n_out outliers (ascending channels). All lanes must call it.
template <int BITS, int HEAD_DIM>
__device__ __forceinline__ void KvqEncodeValueTokenWarp(const float (&x)[HEAD_DIM / 32], int n_out,
                                                        const float (&cb)[1 << BITS], int lane,
                                                        uint32_t* __restrict__ words_out, uint16_t* low_out,
                                                        uint16_t* high_out, uint8_t* channel_out, uint16_t* value_out) {
  constexpr int kPerLane = HEAD_DIM / 32;
  // The value of channel c, from the lane that holds it.
  auto value_of = [&](int c) {
    float v = x[0];
#pragma unroll
    for (int j = 1; j < kPerLane; ++j) v = (c >> 5) == j ? x[j] : v;
    return __shfl_sync(0xffffffffu, v, c & 31);
  };
  int smallest[kKvqMaxValueOutliers + 1], largest[kKvqMaxValueOutliers + 1];
  float small_value[kKvqMaxValueOutliers + 1], large_value[kKvqMaxValueOutliers + 1];
  uint32_t taken_small = 0u, taken_large = 0u;  // this lane's channels already chosen
  for (int k = 0; k <= n_out; ++k) {
    uint64_t best_small = ~uint64_t{0}, best_large = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const uint64_t key = KvqValueKey(x[j], lane + 32 * j);
      if (!((taken_small >> j) & 1u) && key < best_small) best_small = key;
      if (!((taken_large >> j) & 1u) && key > best_large) best_large = key;
    }
    const int s = static_cast<int>(static_cast<uint32_t>(WarpMin64(best_small)));
    const int l = static_cast<int>(static_cast<uint32_t>(WarpMax64(best_large)));
    if ((s & 31) == lane) taken_small |= 1u << (s >> 5);
    if ((l & 31) == lane) taken_large |= 1u << (l >> 5);
    smallest[k] = s;
    largest[k] = l;
    small_value[k] = value_of(s);
    large_value[k] = value_of(l);
  }
  int best_a = 0;
  float best_range = 0.0f;
  for (int a = 0; a <= n_out; ++a) {
    const float range = __fsub_rn(large_value[n_out - a], small_value[a]);
    if (a == 0 || range < best_range) {
      best_range = range;
      best_a = a;
    }
  }
  const __half lo16 = __float2half_rn(small_value[best_a]), hi16 = __float2half_rn(large_value[n_out - best_a]);
  if (lane == 0) {
    *low_out = __half_as_ushort(lo16);
    *high_out = __half_as_ushort(hi16);
    // The outlier channels in ascending order (a small insertion sort of the chosen n_out).
    int chosen[kKvqMaxValueOutliers];
    float chosen_value[kKvqMaxValueOutliers];
    for (int i = 0; i < best_a; ++i) {
      chosen[i] = smallest[i];
      chosen_value[i] = small_value[i];
    }
    for (int i = 0; i < n_out - best_a; ++i) {
      chosen[best_a + i] = largest[i];
      chosen_value[best_a + i] = large_value[i];
    }
    for (int i = 1; i < n_out; ++i) {
      const int c = chosen[i];
      const float v = chosen_value[i];
      int j = i - 1;
      while (j >= 0 && chosen[j] > c) {
        chosen[j + 1] = chosen[j];
        chosen_value[j + 1] = chosen_value[j];
        --j;
      }
      chosen[j + 1] = c;
      chosen_value[j + 1] = v;
    }
    for (int i = 0; i < n_out; ++i) {
      channel_out[i] = static_cast<uint8_t>(chosen[i]);
      value_out[i] = __half_as_ushort(__float2half_rn(chosen_value[i]));
    }
  }
  const float lo = __half2float(lo16), hi = __half2float(hi16);
  // Group j of the token's codes holds channels 32 j .. 32 j + 31: this lane's code is its code `lane`.
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    uint32_t words[BITS] = {};
    PutCodeInGroupWords<BITS>(words, lane, KvqNearest<BITS>(cb, KvqNormalize(x[j], lo, hi)));
#pragma unroll
    for (int w = 0; w < BITS; ++w) {
      const uint32_t word = __reduce_or_sync(0xffffffffu, words[w]);
      if (lane == w) words_out[j * BITS + w] = word;
    }
  }
}

// Where entry v of a KV stream's key outlier list lives (KvqStoreView::key_outlier_segment_shift). shift < 0:
// the list is flat, v is the index. shift >= 0: the stream (a sequence's KV head h at one layer) is a
// chain of 2^shift-entry segments taken on demand from the sequence's pool (the segments of all its pages,
// heads and layers), so pages, heads and layers with many outliers use the room of others. The chain's
// k-th segment (an index into the outlier arrays in units of 2^shift) is entry k % W of row
// stream_pages[k / W] * n_kv_heads + h of the layer's table segments [ph][W], W =
// kKvqSegmentTableWidth (kvq_attention.h): a stream may own W segments per page of its sequence.

__device__ __forceinline__ int64_t KvqKeyOutlierSegmentEntry(int64_t k, const int32_t* stream_pages, int n_kv_heads,
                                                            int h) {
  const int64_t page = k / kKvqSegmentTableWidth;
  return (static_cast<int64_t>(stream_pages[page]) * n_kv_heads + h) * kKvqSegmentTableWidth +
         (k - page * kKvqSegmentTableWidth);
}

__device__ __forceinline__ int64_t KvqKeyOutlierIndex(int64_t v, const int32_t* stream_pages, const int32_t* segments,
                                                     int n_kv_heads, int h, int shift) {
  if (shift < 0) return v;
  const int64_t segment = segments[KvqKeyOutlierSegmentEntry(v >> shift, stream_pages, n_kv_heads, h)];
  return (segment << shift) | (v & ((int64_t{1} << shift) - 1));
}

}  // namespace kvshard
