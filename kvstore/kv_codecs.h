// The per-scheme encoders/decoders of the quantized KV store (CPU reference), one per part (keys or
// values) of one (layer, KV head), and the small numeric helpers they share with calibration.
//
// Code pages (the layout a GPU packer reproduces): each part's quantized tokens are grouped in pages of
// kPageTokens = 128 tokens; a page's codes are one kernels/kv_pack.h stream of 128 * head_dim codes,
// which maps (token t of the page, channel c) to code index
//   token-major   (per-token quantized parts: int, kivi values, kvq values, wkv):   t * head_dim + c
//   channel-major (per-channel quantized parts: kivi keys, kvq keys):               c * 128 + t
//   deco: block-major, block b of the page (deco_block_tokens = T tokens) holds its core at
//         b * T * head_dim + ((r1 * T + t) * m + j2) * l + r2        (see DecoCodec)
// A page stream is 16 * bits * head_dim bytes; channel-major, each channel's 128 tokens are one
// 16*bits-byte block. Pages are full-size from their first token; codes of absent tokens are 0.
//
// Metadata, per part, in token order (fp16 is IEEE half, round to nearest even, common/half.h):
//   int<b>    scale[token][group]                       x = (code - 2^(b-1)) * scale
//   kivi keys scale[group][channel], zero[group][channel] (group_size tokens)  x = code * scale + zero
//   kivi vals scale[token][group], zero[token][group]  (group_size channels)
//   wkv       scale[token], zero[token]                 x = (code * scale + zero) * s_c + shift_c
//   kvq keys  count[token] (u8), then per outlier (channel u8, value fp16) in channel order;
//             x = low_c + (cb[code] + 1) / 2 * (high_c - low_c), outliers replace x
//   kvq vals  low[token], high[token] (fp16); round(outlier_fraction * head_dim) outliers per token, (channel
//             u8, value fp16) ascending; x = low + (cb[code] + 1) / 2 * (high - low), outliers replace x
//   deco      per block: A[l][l], B[l][l], scale[r1][r2] (fp16)
// Every input is rounded to fp16 before it is quantized, so CPU and GPU packers see the same values.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_scheme.h"

namespace kvshard {

inline constexpr int kPageTokens = 128;

// Pages of packed codes of one part.
class PagedCodes {
 public:
  enum class Order { kTokenMajor, kChannelMajor, kBlockMajor };
  PagedCodes(int head_dim, int bits, Order order) : head_dim_(head_dim), bits_(bits), order_(order) {}

  void Set(int64_t token, int channel, uint32_t code);
  uint32_t Get(int64_t token, int channel) const;
  // The codes of tokens [first, first + n), every channel: out[(token - first) * head_dim + channel].
  void UnpackTokens(int64_t first, int64_t n, uint8_t* out) const;
  // Channel-major pages: the codes of one channel for tokens [first, first + n) of one page.
  void UnpackChannelRun(int64_t first, int64_t n, int channel, uint8_t* out) const;
  // Block-major access: code `index` of the page holding `token` (index within the page stream).
  void SetIndex(int64_t page, int64_t index, uint32_t code);
  uint32_t GetIndex(int64_t page, int64_t index) const;
  int64_t pages() const { return static_cast<int64_t>(pages_.size()); }
  const std::vector<uint8_t>& page(int64_t p) const { return pages_[p]; }
  int bits() const { return bits_; }
  int head_dim() const { return head_dim_; }
  void Clear() { pages_.clear(); }

 private:
  int64_t Index(int64_t token_in_page, int channel) const;
  uint8_t* PageFor(int64_t page);
  int head_dim_, bits_;
  Order order_;
  std::vector<std::vector<uint8_t>> pages_;
};

// Encodes and decodes the quantized tokens of one part of one (layer, KV head). Tokens are indexed from
// 0 within the part's quantized range; inputs are fp16-rounded fp32 [n][head_dim] (keys pre-RoPE for kvq
// and wkv, after RoPE otherwise).
class PartCodec {
 public:
  virtual ~PartCodec() = default;
  // Appends n tokens; n is the scheme's flush unit, or less for the last unit of a sealed shard.
  virtual void Encode(int n, const float* x) = 0;
  virtual void Decode(int64_t first, int64_t n, float* x) const = 0;
  virtual int64_t size() const = 0;
  // Everything held for the tokens: codes plus metadata, in bits (kv_scheme.h's formula counts the same).
  virtual int64_t bits() const = 0;
  virtual int64_t outliers() const { return 0; }
  virtual const PagedCodes& codes() const = 0;
  virtual void Clear() = 0;
};

// The codec of one part (fp16 storage when the scheme leaves the part unquantized). `calibration`
// (kvq, wkv) must already be checked for the scheme.
absl::StatusOr<std::unique_ptr<PartCodec>> MakePartCodec(const KvSchemeConfig& config, KvPart part, int head_dim,
                                                         int layer, int kv_head, const Calibration* calibration);

// ---- numeric helpers shared with calibration and tests ----

// kvq per-token value thresholds: keeps n_out extremes apart, a smallest and n_out - a largest, choosing
// a so that the remaining range is the narrowest (k-th smallest / k-th largest with the split chosen per
// token). Writes the outlier channels (ascending) and the range of the rest.
void KvqValueThresholds(const float* x, int d, int n_out, float* low, float* high, std::vector<int>* outliers);

// Index of the centroid nearest to u in sorted `centroids` (ties to the lower one).
int NearestCentroid(const float* centroids, int k, float u);

// Symmetric b-bit group quantization, llama.cpp q4_0 class: scale = fp16(signed max / -2^(b-1)),
// code = clamp(round(x / scale) + 2^(b-1), 0, 2^b - 1), value = (code - 2^(b-1)) * scale.
uint16_t SymmetricScale(const float* x, int n, int bits);
uint32_t SymmetricCode(float x, float scale, int bits);
inline float SymmetricValue(uint32_t code, float scale, int bits) {
  return (static_cast<float>(code) - static_cast<float>(1 << (bits - 1))) * scale;
}

// Asymmetric b-bit quantization (KIVI, WKV): scale = fp16((max - min) / (2^b - 1)), zero = fp16(min),
// code = clamp(round((x - zero) / scale), 0, 2^b - 1), value = code * scale + zero.
void AsymmetricParams(const float* x, int n, int stride, int bits, uint16_t* scale, uint16_t* zero);
uint32_t AsymmetricCode(float x, float scale, float zero, int bits);

}  // namespace kvshard
