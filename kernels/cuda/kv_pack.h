// Pack kernels for the quantized KV store on the GPU. They write the same bytes as the CPU codecs of
// kvstore/kv_codecs.h (the layout of kernels/kv_pack.h and kv_codecs.h's code pages). Host launchers;
// pointers are device memory; launches are asynchronous on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace kvshard {

// kvq<b> keys of one (layer, KV head) part (the CPU twin is kv_codecs.cc's KvqKeyCodec::Encode):
//   keys:      fp32 [n_tokens][head_dim], pre-RoPE; rounded to fp16 here, as the store does on input.
//   low, high: fp32 [head_dim], the calibrated per-channel thresholds of this (layer, KV head).
//   codebook:  fp32 [2^bits], sorted centroids in [-1, 1].
//   pages:     the part's code pages, PackedBytes(128 * head_dim, bits) bytes each, page p holding
//              part tokens [128 p, 128 p + 128), channel-major (code index c * 128 + t).
//   first_token: part index of keys[0]; a multiple of 32, so every 32-token word group is written whole
//              (codes of tokens at or after first_token + n_tokens in the last group are written 0, as the
//              CPU store's absent tokens are).
//   outlier_count:   uint8 [n_tokens]: keys outside [low, high], at most 255 per token.
//   outlier_channel: uint8 [n_tokens][head_dim], outlier_value: fp16 bits [n_tokens][head_dim]: the first
//              outlier_count[t] slots of row t hold the token's outliers in ascending channel order (the
//              CPU codec's flat list is these rows concatenated). May be null to skip outliers.
// Supported: bits 2..4, head_dim 64 or 128.
struct KvqKeyPackArgs {
  const float* keys = nullptr;
  int64_t n_tokens = 0;
  int64_t first_token = 0;
  int head_dim = 0;
  int bits = 3;
  const float* low = nullptr;
  const float* high = nullptr;
  const float* codebook = nullptr;
  uint8_t* pages = nullptr;
  uint8_t* outlier_count = nullptr;
  uint8_t* outlier_channel = nullptr;
  uint16_t* outlier_value = nullptr;
};
absl::Status PackKvqKeysCuda(const KvqKeyPackArgs& args, cudaStream_t stream);

// kvq<b> values of one (layer, KV head) part (the CPU twin is kv_codecs.cc's KvqValueCodec::Encode):
//   values:   fp32 [n_tokens][head_dim]; rounded to fp16 here, as the store does on input.
//   n_out:    outliers per token (KvqValueOutliersPerToken), clamped to [0, head_dim - 1] as the codec does.
//   codebook: fp32 [2^bits], sorted centroids in [-1, 1].
//   pages:    the part's code pages, PackedBytes(128 * head_dim, bits) bytes each, token-major (code index
//             t * head_dim + c); each token's codes are whole 32-bit words, so any first_token works.
//   low, high: fp16 bits [n_tokens], the per-token thresholds (KvqValueThresholds, rounded to fp16).
//   outlier_channel: uint8 [n_tokens][n_out] ascending; outlier_value: fp16 bits [n_tokens][n_out].
struct KvqValuePackArgs {
  const float* values = nullptr;
  int64_t n_tokens = 0;
  int64_t first_token = 0;
  int head_dim = 0;
  int bits = 3;
  int n_out = 0;
  const float* codebook = nullptr;
  uint8_t* pages = nullptr;
  uint16_t* low = nullptr;
  uint16_t* high = nullptr;
  uint8_t* outlier_channel = nullptr;
  uint16_t* outlier_value = nullptr;
};
absl::Status PackKvqValuesCuda(const KvqValuePackArgs& args, cudaStream_t stream);

}  // namespace kvshard
