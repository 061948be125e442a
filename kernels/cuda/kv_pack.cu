// kvq key packing on the GPU; bit-exact twin of KvqKeyCodec::Encode (kvstore/kv_codecs.cc).
//
// The build uses --use_fast_math, so the normalization is written with explicitly rounded intrinsics: the
// codes must come from the same fp32 operations, in the same order, as the CPU's
//   u = clamp(2 (x - lo) / (hi - lo) - 1, -1, 1), then the nearest centroid (ties to the lower one).
#include "kernels/cuda/kv_pack.h"

#include <cuda_fp16.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/kv_pack.h"

namespace kvshard {
namespace {

constexpr int kWordTokens = 32;  // one thread packs 32 tokens of one channel: exactly `bits` 32-bit words
constexpr int kMaxKeyOutliers = 255;  // kvstore's kMaxKeyOutliersPerToken (a uint8 count per token)

__device__ __forceinline__ float RoundToHalf(float x) { return __half2float(__float2half_rn(x)); }

__device__ __forceinline__ float Normalize(float x, float lo, float hi) {
  if (!(hi > lo)) return 0.0f;
  const float u = __fsub_rn(__fdiv_rn(__fmul_rn(2.0f, __fsub_rn(x, lo)), __fsub_rn(hi, lo)), 1.0f);
  return fminf(fmaxf(u, -1.0f), 1.0f);
}

template <int BITS>
__device__ __forceinline__ uint32_t Nearest(const float (&cb)[1 << BITS], float u) {
  constexpr int k = 1 << BITS;
  int hi = 0;  // first centroid >= u (std::lower_bound)
#pragma unroll
  for (int i = 0; i < k; ++i) hi += cb[i] < u ? 1 : 0;
  if (hi == 0) return 0;
  if (hi == k) return k - 1;
  return __fsub_rn(u, cb[hi - 1]) <= __fsub_rn(cb[hi], u) ? hi - 1 : hi;
}

// One thread per (32-token word group, channel). Part token j = first_token + 32 g + i of channel c is
// code c * 128 + (j % 128) of page j / 128; the group's 32 codes are stream bits starting at a multiple of
// 32 * BITS, i.e. BITS whole aligned words.
template <int BITS>
__global__ void PackKvqKeyCodesKernel(const float* __restrict__ keys, int64_t n_tokens, int64_t first_token,
                                      int head_dim, const float* __restrict__ low, const float* __restrict__ high,
                                      const float* __restrict__ codebook, uint8_t* __restrict__ pages) {
  const int c = threadIdx.x;
  const int64_t g = blockIdx.x;
  if (c >= head_dim) return;
  const int64_t j0 = first_token + g * kWordTokens;
  const float lo = low[c], hi = high[c];
  float cb[1 << BITS];
#pragma unroll
  for (int i = 0; i < (1 << BITS); ++i) cb[i] = codebook[i];
  uint32_t words[BITS] = {};
  // Fully unrolled so that the word indices are constants and words[] stays in registers.
#pragma unroll
  for (int i = 0; i < kWordTokens; ++i) {
    const int64_t t = g * kWordTokens + i;
    uint32_t code = 0;
    if (t < n_tokens) code = Nearest<BITS>(cb, Normalize(RoundToHalf(keys[t * head_dim + c]), lo, hi));
    const int bit = i * BITS;
    words[bit >> 5] |= code << (bit & 31);
    if ((bit & 31) + BITS > 32) words[(bit >> 5) + 1] |= code >> (32 - (bit & 31));
  }
  const int64_t page_bytes = static_cast<int64_t>(16 * BITS) * head_dim;  // PackedBytes(128 * head_dim, BITS)
  const int64_t page = j0 / kPackBlockCodes;
  const int64_t code_index = static_cast<int64_t>(c) * kPackBlockCodes + j0 % kPackBlockCodes;
  uint32_t* out = reinterpret_cast<uint32_t*>(pages + page * page_bytes) + code_index * BITS / 32;
#pragma unroll
  for (int w = 0; w < BITS; ++w) out[w] = words[w];
}

// One warp per token: each lane tests its channels, a ballot per 32 channels gives every outlier its
// slot in ascending channel order (the CPU codec's order), capped at 255 per token.
__global__ void PackKvqKeyOutliersKernel(const float* __restrict__ keys, int64_t n_tokens, int head_dim,
                                         const float* __restrict__ low, const float* __restrict__ high,
                                         uint8_t* __restrict__ count_out, uint8_t* __restrict__ channel_out,
                                         uint16_t* __restrict__ value_out) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= n_tokens) return;
  int count = 0;
  for (int c0 = 0; c0 < head_dim; c0 += 32) {
    const int c = c0 + lane;
    bool outlier = false;
    __half h = __float2half_rn(0.0f);
    if (c < head_dim) {
      h = __float2half_rn(keys[t * head_dim + c]);
      const float x = __half2float(h);
      outlier = x < low[c] || x > high[c];
    }
    const uint32_t mask = __ballot_sync(0xffffffffu, outlier);
    if (outlier) {
      const int slot = count + __popc(mask & ((1u << lane) - 1u));
      if (slot < kMaxKeyOutliers) {
        channel_out[t * head_dim + slot] = static_cast<uint8_t>(c);
        value_out[t * head_dim + slot] = __half_as_ushort(h);
      }
    }
    count += __popc(mask);
  }
  if (lane == 0) count_out[t] = static_cast<uint8_t>(count < kMaxKeyOutliers ? count : kMaxKeyOutliers);
}

constexpr int kMaxValueOutliers = 8;  // n_out per token the value kernel keeps (1% of 256 channels is 3)

// (value, channel) order of KvqValueThresholds: ties broken by the lower channel.
__device__ __forceinline__ bool Less(const float* x, int a, int b) { return x[a] < x[b] || (x[a] == x[b] && a < b); }

// One thread per token: the n_out + 1 smallest and largest channels by selection (n_out is small), the
// split with the narrowest remaining range (the first on ties, as the CPU loop), then the codes of the
// token's head_dim channels, which are whole 32-bit words of the token-major page.
template <int BITS, int HEAD_DIM>
__global__ void PackKvqValuesKernel(const float* __restrict__ values, int64_t n_tokens, int64_t first_token, int n_out,
                                    const float* __restrict__ codebook, uint8_t* __restrict__ pages,
                                    uint16_t* __restrict__ low_out, uint16_t* __restrict__ high_out,
                                    uint8_t* __restrict__ channel_out, uint16_t* __restrict__ value_out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_tokens) return;
  float x[HEAD_DIM];
#pragma unroll
  for (int c = 0; c < HEAD_DIM; ++c) x[c] = RoundToHalf(values[t * HEAD_DIM + c]);
  int smallest[kMaxValueOutliers + 1], largest[kMaxValueOutliers + 1];
  float lo, hi;
  int best_a = 0;
  if (n_out == 0) {
    lo = x[0];
    hi = x[0];
    for (int c = 1; c < HEAD_DIM; ++c) {
      lo = fminf(lo, x[c]);
      hi = fmaxf(hi, x[c]);
    }
  } else {
    for (int k = 0; k <= n_out; ++k) {
      int s = -1, l = -1;
      for (int c = 0; c < HEAD_DIM; ++c) {
        bool taken_s = false, taken_l = false;
        for (int j = 0; j < k; ++j) {
          taken_s |= smallest[j] == c;
          taken_l |= largest[j] == c;
        }
        if (!taken_s && (s < 0 || Less(x, c, s))) s = c;
        if (!taken_l && (l < 0 || Less(x, l, c))) l = c;
      }
      smallest[k] = s;
      largest[k] = l;
    }
    float best_range = 0.0f;
    for (int a = 0; a <= n_out; ++a) {
      const float range = __fsub_rn(x[largest[n_out - a]], x[smallest[a]]);
      if (a == 0 || range < best_range) {
        best_range = range;
        best_a = a;
      }
    }
    lo = x[smallest[best_a]];
    hi = x[largest[n_out - best_a]];
    // The outlier channels in ascending order: a merge of the chosen smallest and largest (each list is
    // sorted by value, so sort the n_out channels by a small insertion sort).
    int chosen[kMaxValueOutliers];
    for (int i = 0; i < best_a; ++i) chosen[i] = smallest[i];
    for (int i = 0; i < n_out - best_a; ++i) chosen[best_a + i] = largest[i];
    for (int i = 1; i < n_out; ++i) {
      const int v = chosen[i];
      int j = i - 1;
      while (j >= 0 && chosen[j] > v) {
        chosen[j + 1] = chosen[j];
        --j;
      }
      chosen[j + 1] = v;
    }
    for (int i = 0; i < n_out; ++i) {
      channel_out[t * n_out + i] = static_cast<uint8_t>(chosen[i]);
      value_out[t * n_out + i] = __half_as_ushort(__float2half_rn(x[chosen[i]]));
    }
  }
  const __half lo16 = __float2half_rn(lo), hi16 = __float2half_rn(hi);
  low_out[t] = __half_as_ushort(lo16);
  high_out[t] = __half_as_ushort(hi16);
  lo = __half2float(lo16);
  hi = __half2float(hi16);
  float cb[1 << BITS];
#pragma unroll
  for (int i = 0; i < (1 << BITS); ++i) cb[i] = codebook[i];
  constexpr int kWords = HEAD_DIM * BITS / 32;
  uint32_t words[kWords] = {};
#pragma unroll
  for (int c = 0; c < HEAD_DIM; ++c) {
    const uint32_t code = Nearest<BITS>(cb, Normalize(x[c], lo, hi));
    const int bit = c * BITS;
    words[bit >> 5] |= code << (bit & 31);
    if ((bit & 31) + BITS > 32) words[(bit >> 5) + 1] |= code >> (32 - (bit & 31));
  }
  const int64_t j = first_token + t;
  const int64_t page_bytes = static_cast<int64_t>(16 * BITS) * HEAD_DIM;
  uint32_t* out = reinterpret_cast<uint32_t*>(pages + (j / kPackBlockCodes) * page_bytes) + (j % kPackBlockCodes) * kWords;
#pragma unroll
  for (int w = 0; w < kWords; ++w) out[w] = words[w];
}

template <int BITS>
absl::Status LaunchValues(const KvqValuePackArgs& a, int n_out, cudaStream_t stream) {
  constexpr int kThreads = 128;
  const int64_t blocks = (a.n_tokens + kThreads - 1) / kThreads;
  if (a.head_dim == 128) {
    PackKvqValuesKernel<BITS, 128><<<blocks, kThreads, 0, stream>>>(a.values, a.n_tokens, a.first_token, n_out, a.codebook,
                                                                    a.pages, a.low, a.high, a.outlier_channel, a.outlier_value);
  } else {
    PackKvqValuesKernel<BITS, 64><<<blocks, kThreads, 0, stream>>>(a.values, a.n_tokens, a.first_token, n_out, a.codebook,
                                                                   a.pages, a.low, a.high, a.outlier_channel, a.outlier_value);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status PackKvqValuesCuda(const KvqValuePackArgs& a, cudaStream_t stream) {
  if (a.bits < 2 || a.bits > 4) return absl::InvalidArgumentError(absl::StrCat("PackKvqValuesCuda: bits ", a.bits, " not in 2..4"));
  if (a.head_dim != 64 && a.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("PackKvqValuesCuda: head_dim ", a.head_dim, " not 64 or 128"));
  }
  const int n_out = a.n_out < 0 ? 0 : (a.n_out > a.head_dim - 1 ? a.head_dim - 1 : a.n_out);
  if (n_out > kMaxValueOutliers) {
    return absl::InvalidArgumentError(absl::StrCat("PackKvqValuesCuda: ", n_out, " outliers per token; at most ",
                                                   kMaxValueOutliers, " are supported"));
  }
  if (a.n_tokens < 0 || a.first_token < 0) return absl::InvalidArgumentError("PackKvqValuesCuda: negative token range");
  if (a.n_tokens == 0) return absl::OkStatus();
  if (a.values == nullptr || a.codebook == nullptr || a.pages == nullptr || a.low == nullptr || a.high == nullptr ||
      (n_out > 0 && (a.outlier_channel == nullptr || a.outlier_value == nullptr))) {
    return absl::InvalidArgumentError("PackKvqValuesCuda: null values, codebook, pages, thresholds or outliers");
  }
  switch (a.bits) {
    case 2: return LaunchValues<2>(a, n_out, stream);
    case 3: return LaunchValues<3>(a, n_out, stream);
    default: return LaunchValues<4>(a, n_out, stream);
  }
}

absl::Status PackKvqKeysCuda(const KvqKeyPackArgs& a, cudaStream_t stream) {
  if (a.bits < 2 || a.bits > 4) return absl::InvalidArgumentError(absl::StrCat("PackKvqKeysCuda: bits ", a.bits, " not in 2..4"));
  if (a.head_dim != 64 && a.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("PackKvqKeysCuda: head_dim ", a.head_dim, " not 64 or 128"));
  }
  if (a.n_tokens < 0 || a.first_token < 0 || a.first_token % kWordTokens != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PackKvqKeysCuda: bad token range (first ", a.first_token,
                                                   ", n ", a.n_tokens, "); first must be a multiple of 32"));
  }
  if (a.n_tokens == 0) return absl::OkStatus();
  if (a.keys == nullptr || a.low == nullptr || a.high == nullptr || a.codebook == nullptr || a.pages == nullptr) {
    return absl::InvalidArgumentError("PackKvqKeysCuda: null keys, thresholds, codebook or pages");
  }
  const int64_t groups = (a.n_tokens + kWordTokens - 1) / kWordTokens;
  switch (a.bits) {
    case 2: PackKvqKeyCodesKernel<2><<<groups, a.head_dim, 0, stream>>>(a.keys, a.n_tokens, a.first_token, a.head_dim, a.low, a.high, a.codebook, a.pages); break;
    case 3: PackKvqKeyCodesKernel<3><<<groups, a.head_dim, 0, stream>>>(a.keys, a.n_tokens, a.first_token, a.head_dim, a.low, a.high, a.codebook, a.pages); break;
    default: PackKvqKeyCodesKernel<4><<<groups, a.head_dim, 0, stream>>>(a.keys, a.n_tokens, a.first_token, a.head_dim, a.low, a.high, a.codebook, a.pages); break;
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (a.outlier_count != nullptr) {
    if (a.outlier_channel == nullptr || a.outlier_value == nullptr) {
      return absl::InvalidArgumentError("PackKvqKeysCuda: outlier_count given without channel/value buffers");
    }
    constexpr int kWarps = 8;
    const int64_t blocks = (a.n_tokens + kWarps - 1) / kWarps;
    PackKvqKeyOutliersKernel<<<blocks, 32 * kWarps, 0, stream>>>(a.keys, a.n_tokens, a.head_dim, a.low, a.high,
                                                                 a.outlier_count, a.outlier_channel, a.outlier_value);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace kvshard
