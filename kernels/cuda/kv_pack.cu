// kvq key and value packing on the GPU; bit-exact twins of KvqKeyCodec::Encode and KvqValueCodec::Encode
// (kvstore/kv_codecs.cc). The code computation itself is kvq_codes.cuh's, shared with the store's append.
#include "kernels/cuda/kv_pack.h"

#include <cuda_fp16.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kvq_codes.cuh"
#include "kernels/kv_pack.h"

namespace kvshard {
namespace {

constexpr int kWordTokens = 32;  // one thread packs 32 tokens of one channel: exactly `bits` 32-bit words
constexpr int kMaxKeyOutliers = 255;  // kvstore's kMaxKeyOutliersPerToken (a uint8 count per token)

// One thread per (32-token word group, channel). Part token j = first_token + 32 g + i of channel c is
// code c * 128 + (j % 128) of page j / 128; the group's 32 codes are one code group of the stream (kv_pack.h):
// BITS whole aligned words.
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
    if (t < n_tokens) code = KvqNearest<BITS>(cb, KvqNormalize(RoundToHalf(keys[t * head_dim + c]), lo, hi));
    PutCode<BITS>(words, i, code);
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

// A warp per token: kvq_codes.cuh's KvqEncodeValueTokenWarp into the token's row of its page.
template <int BITS, int HEAD_DIM>
__global__ void PackKvqValuesKernel(const float* __restrict__ values, int64_t n_tokens, int64_t first_token, int n_out,
                                    const float* __restrict__ codebook, uint8_t* __restrict__ pages,
                                    uint16_t* __restrict__ low_out, uint16_t* __restrict__ high_out,
                                    uint8_t* __restrict__ channel_out, uint16_t* __restrict__ value_out) {
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (t >= n_tokens) return;  // whole warps: the encoder's shuffles need all 32 lanes
  float x[HEAD_DIM / 32];
#pragma unroll
  for (int j = 0; j < HEAD_DIM / 32; ++j) x[j] = RoundToHalf(values[t * HEAD_DIM + lane + 32 * j]);
  float cb[1 << BITS];
#pragma unroll
  for (int i = 0; i < (1 << BITS); ++i) cb[i] = codebook[i];
  constexpr int kWords = HEAD_DIM * BITS / 32;
  const int64_t j = first_token + t;
  const int64_t page_bytes = static_cast<int64_t>(16 * BITS) * HEAD_DIM;
  uint32_t* out = reinterpret_cast<uint32_t*>(pages + (j / kPackBlockCodes) * page_bytes) + (j % kPackBlockCodes) * kWords;
  KvqEncodeValueTokenWarp<BITS, HEAD_DIM>(x, n_out, cb, lane, out, low_out + t, high_out + t, channel_out + t * n_out,
                                          value_out + t * n_out);
}

template <int BITS>
absl::Status LaunchValues(const KvqValuePackArgs& a, int n_out, cudaStream_t stream) {
  constexpr int kThreads = 128;  // four tokens a block
  const int64_t blocks = (a.n_tokens * 32 + kThreads - 1) / kThreads;
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
  if (n_out > kKvqMaxValueOutliers) {
    return absl::InvalidArgumentError(absl::StrCat("PackKvqValuesCuda: ", n_out, " outliers per token; at most ",
                                                   kKvqMaxValueOutliers, " are supported"));
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
