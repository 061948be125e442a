#include "kvstore/kv_codecs.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/kv_pack.h"

namespace kvshard {

// ---------------------------------------------------------------------------------------------------
// PagedCodes

int64_t PagedCodes::Index(int64_t token_in_page, int channel) const {
  return order_ == Order::kChannelMajor ? static_cast<int64_t>(channel) * kPageTokens + token_in_page
                                        : token_in_page * head_dim_ + channel;
}

uint8_t* PagedCodes::PageFor(int64_t page) {
  while (static_cast<int64_t>(pages_.size()) <= page) {
    pages_.emplace_back(PackedBytes(static_cast<int64_t>(kPageTokens) * head_dim_, bits_), 0);
  }
  return pages_[page].data();
}

void PagedCodes::Set(int64_t token, int channel, uint32_t code) {
  SetPackedCode(PageFor(token / kPageTokens), Index(token % kPageTokens, channel), bits_, code);
}

uint32_t PagedCodes::Get(int64_t token, int channel) const {
  return GetPackedCode(pages_[token / kPageTokens].data(), Index(token % kPageTokens, channel), bits_);
}

void PagedCodes::UnpackTokens(int64_t first, int64_t n, uint8_t* out) const {
  thread_local std::vector<uint8_t> column;
  for (int64_t t = first; t < first + n;) {
    const int64_t t0 = t % kPageTokens;
    const int64_t run = std::min<int64_t>(kPageTokens - t0, first + n - t);
    const uint8_t* stream = pages_[t / kPageTokens].data();
    uint8_t* dst = out + (t - first) * head_dim_;
    if (order_ == Order::kChannelMajor) {
      column.resize(run);
      for (int c = 0; c < head_dim_; ++c) {
        UnpackChannelRun(t, run, c, column.data());
        for (int64_t i = 0; i < run; ++i) dst[i * head_dim_ + c] = column[i];
      }
    } else {  // a token's channels are consecutive codes (Index)
      UnpackCodesCpu(stream, Index(t0, 0), run * head_dim_, bits_, dst);
    }
    t += run;
  }
}

void PagedCodes::UnpackChannelRun(int64_t first, int64_t n, int channel, uint8_t* out) const {
  UnpackCodesCpu(pages_[first / kPageTokens].data(), Index(first % kPageTokens, channel), n, bits_, out);
}

void PagedCodes::SetIndex(int64_t page, int64_t index, uint32_t code) {
  SetPackedCode(PageFor(page), index, bits_, code);
}

uint32_t PagedCodes::GetIndex(int64_t page, int64_t index) const {
  return GetPackedCode(pages_[page].data(), index, bits_);
}

// Unpacks the codes of tokens [first, first + n) a page at a time into a reused buffer and calls
// fn(first token, tokens, codes [tokens][head_dim]): no allocation per call, and the codes stay in cache.
template <typename Fn>
void ForEachCodeChunk(const PagedCodes& codes, int64_t first, int64_t n, Fn fn) {
  thread_local std::vector<uint8_t> buffer;
  buffer.resize(static_cast<size_t>(kPageTokens) * codes.head_dim());
  for (int64_t t = first; t < first + n;) {
    const int64_t run = std::min<int64_t>(kPageTokens - t % kPageTokens, first + n - t);
    codes.UnpackTokens(t, run, buffer.data());
    fn(t, run, buffer.data());
    t += run;
  }
}

// ---------------------------------------------------------------------------------------------------
// Numeric helpers

void KvqValueThresholds(const float* x, int d, int n_out, float* low, float* high, std::vector<int>* outliers) {
  outliers->clear();
  n_out = std::clamp(n_out, 0, d - 1);
  if (n_out == 0) {
    *low = *std::min_element(x, x + d);
    *high = *std::max_element(x, x + d);
    return;
  }
  // The n_out + 1 smallest and n_out + 1 largest, by (value, channel) so ties are deterministic.
  auto less = [x](int a, int b) { return x[a] < x[b] || (x[a] == x[b] && a < b); };
  std::vector<int> idx(d);
  std::iota(idx.begin(), idx.end(), 0);
  std::vector<int> smallest = idx, largest = idx;
  const int keep = n_out + 1;
  std::partial_sort(smallest.begin(), smallest.begin() + keep, smallest.end(), less);
  std::partial_sort(largest.begin(), largest.begin() + keep, largest.end(), [&](int a, int b) { return less(b, a); });
  int best_a = 0;
  float best_range = 0;
  for (int a = 0; a <= n_out; ++a) {  // a smallest and n_out - a largest are outliers
    const float range = x[largest[n_out - a]] - x[smallest[a]];
    if (a == 0 || range < best_range) {
      best_range = range;
      best_a = a;
    }
  }
  *low = x[smallest[best_a]];
  *high = x[largest[n_out - best_a]];
  for (int i = 0; i < best_a; ++i) outliers->push_back(smallest[i]);
  for (int i = 0; i < n_out - best_a; ++i) outliers->push_back(largest[i]);
  std::sort(outliers->begin(), outliers->end());
}

int NearestCentroid(const float* centroids, int k, float u) {
  // First centroid >= u, then compare with its lower neighbour.
  const int hi = static_cast<int>(std::lower_bound(centroids, centroids + k, u) - centroids);
  if (hi == 0) return 0;
  if (hi == k) return k - 1;
  return (u - centroids[hi - 1] <= centroids[hi] - u) ? hi - 1 : hi;
}

uint16_t SymmetricScale(const float* x, int n, int bits) {
  float signed_max = 0.0f;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > std::fabs(signed_max)) signed_max = x[i];
  return FloatToHalf(signed_max / -static_cast<float>(1 << (bits - 1)));
}

uint32_t SymmetricCode(float x, float scale, int bits) {
  const int half = 1 << (bits - 1);
  if (scale == 0.0f) return static_cast<uint32_t>(half);
  const float q = std::floor(x / scale + 0.5f) + static_cast<float>(half);  // round half up
  return static_cast<uint32_t>(std::clamp(q, 0.0f, static_cast<float>((1 << bits) - 1)));
}

void AsymmetricParams(const float* x, int n, int stride, int bits, uint16_t* scale, uint16_t* zero) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[static_cast<int64_t>(i) * stride]);
    hi = std::max(hi, x[static_cast<int64_t>(i) * stride]);
  }
  *scale = FloatToHalf((hi - lo) / static_cast<float>((1 << bits) - 1));
  *zero = FloatToHalf(lo);
}

uint32_t AsymmetricCode(float x, float scale, float zero, int bits) {
  if (scale == 0.0f) return 0;
  const float q = std::floor((x - zero) / scale + 0.5f);
  return static_cast<uint32_t>(std::clamp(q, 0.0f, static_cast<float>((1 << bits) - 1)));
}

namespace {

// ---------------------------------------------------------------------------------------------------
// int<b>: per token, groups of channels, symmetric (llama.cpp q8_0/q4_0 class).

class IntCodec final : public PartCodec {
 public:
  IntCodec(int d, int bits, int group)
      : d_(d), bits_(bits), group_(std::min(group, d)), groups_((d + group_ - 1) / group_),
        codes_(d, bits, PagedCodes::Order::kTokenMajor) {}

  void Encode(int n, const float* x) override {
    for (int t = 0; t < n; ++t, ++size_) {
      const float* row = x + static_cast<int64_t>(t) * d_;
      for (int g = 0; g < groups_; ++g) {
        const int c0 = g * group_, c1 = std::min(d_, c0 + group_);
        const uint16_t s16 = SymmetricScale(row + c0, c1 - c0, bits_);
        scales_.push_back(s16);
        const float s = HalfToFloat(s16);
        for (int c = c0; c < c1; ++c) codes_.Set(size_, c, SymmetricCode(row[c], s, bits_));
      }
    }
  }
  void Decode(int64_t first, int64_t n, float* x) const override {
    ForEachCodeChunk(codes_, first, n, [&](int64_t t0, int64_t run, const uint8_t* codes) {
      for (int64_t t = 0; t < run; ++t) {
        const int64_t j = t0 + t;
        for (int g = 0; g < groups_; ++g) {
          const float s = HalfToFloat(scales_[j * groups_ + g]);
          for (int c = g * group_; c < std::min(d_, (g + 1) * group_); ++c)
            x[(j - first) * d_ + c] = SymmetricValue(codes[t * d_ + c], s, bits_);
        }
      }
    });
  }
  int64_t size() const override { return size_; }
  int64_t bits() const override {
    return size_ * d_ * bits_ + static_cast<int64_t>(scales_.size()) * kHalfBits;
  }
  const PagedCodes& codes() const override { return codes_; }
  void Clear() override {
    size_ = 0;
    scales_.clear();
    codes_.Clear();
  }

 private:
  int d_, bits_, group_, groups_;
  int64_t size_ = 0;
  std::vector<uint16_t> scales_;  // [token][group]
  PagedCodes codes_;
};

// ---------------------------------------------------------------------------------------------------
// kivi<b> keys: per channel over groups of G tokens, asymmetric.

class KiviKeyCodec final : public PartCodec {
 public:
  KiviKeyCodec(int d, int bits, int group)
      : d_(d), bits_(bits), group_(group), codes_(d, bits, PagedCodes::Order::kChannelMajor) {}

  void Encode(int n, const float* x) override {
    // n <= group_; the store only passes partial groups when sealing, so groups start at multiples of G.
    for (int c = 0; c < d_; ++c) {
      uint16_t s16, z16;
      AsymmetricParams(x + c, n, d_, bits_, &s16, &z16);
      scales_.push_back(s16);
      zeros_.push_back(z16);
      const float s = HalfToFloat(s16), z = HalfToFloat(z16);
      for (int t = 0; t < n; ++t) codes_.Set(size_ + t, c, AsymmetricCode(x[static_cast<int64_t>(t) * d_ + c], s, z, bits_));
    }
    size_ += n;
  }
  void Decode(int64_t first, int64_t n, float* x) const override {
    ForEachCodeChunk(codes_, first, n, [&](int64_t t0, int64_t run, const uint8_t* codes) {
      for (int64_t t = 0; t < run; ++t) {
        const int64_t j = t0 + t;
        const int64_t g = j / group_;
        for (int c = 0; c < d_; ++c) {
          const float s = HalfToFloat(scales_[g * d_ + c]), z = HalfToFloat(zeros_[g * d_ + c]);
          x[(j - first) * d_ + c] = static_cast<float>(codes[t * d_ + c]) * s + z;
        }
      }
    });
  }
  int64_t size() const override { return size_; }
  int64_t bits() const override {
    return size_ * d_ * bits_ + static_cast<int64_t>(scales_.size() + zeros_.size()) * kHalfBits;
  }
  const PagedCodes& codes() const override { return codes_; }
  void Clear() override {
    size_ = 0;
    scales_.clear();
    zeros_.clear();
    codes_.Clear();
  }

 private:
  int d_, bits_, group_;
  int64_t size_ = 0;
  std::vector<uint16_t> scales_, zeros_;  // [group][channel]
  PagedCodes codes_;
};

// ---------------------------------------------------------------------------------------------------
// Per-token asymmetric with channel groups: kivi<b> values (groups of G channels) and wkv<b> (one group,
// after static per-channel smoothing).

class PerTokenAsymmetricCodec final : public PartCodec {
 public:
  // shift/scale: per-channel smoothing (wkv), or empty (kivi values).
  PerTokenAsymmetricCodec(int d, int bits, int group, std::vector<float> shift, std::vector<float> scale)
      : d_(d), bits_(bits), group_(std::min(group, d)), groups_((d + group_ - 1) / group_),
        shift_(std::move(shift)), scale_(std::move(scale)), codes_(d, bits, PagedCodes::Order::kTokenMajor) {}

  void Encode(int n, const float* x) override {
    std::vector<float> y(d_);
    for (int t = 0; t < n; ++t, ++size_) {
      const float* row = x + static_cast<int64_t>(t) * d_;
      for (int c = 0; c < d_; ++c) y[c] = shift_.empty() ? row[c] : (row[c] - shift_[c]) / scale_[c];
      for (int g = 0; g < groups_; ++g) {
        const int c0 = g * group_, c1 = std::min(d_, c0 + group_);
        uint16_t s16, z16;
        AsymmetricParams(y.data() + c0, c1 - c0, 1, bits_, &s16, &z16);
        scales_.push_back(s16);
        zeros_.push_back(z16);
        const float s = HalfToFloat(s16), z = HalfToFloat(z16);
        for (int c = c0; c < c1; ++c) codes_.Set(size_, c, AsymmetricCode(y[c], s, z, bits_));
      }
    }
  }
  void Decode(int64_t first, int64_t n, float* x) const override {
    ForEachCodeChunk(codes_, first, n, [&](int64_t t0, int64_t run, const uint8_t* codes) {
      for (int64_t t = 0; t < run; ++t) {
        const int64_t j = t0 + t;
        for (int g = 0; g < groups_; ++g) {
          const float s = HalfToFloat(scales_[j * groups_ + g]), z = HalfToFloat(zeros_[j * groups_ + g]);
          for (int c = g * group_; c < std::min(d_, (g + 1) * group_); ++c) {
            const float y = static_cast<float>(codes[t * d_ + c]) * s + z;
            x[(j - first) * d_ + c] = shift_.empty() ? y : y * scale_[c] + shift_[c];
          }
        }
      }
    });
  }
  int64_t size() const override { return size_; }
  int64_t bits() const override {
    return size_ * d_ * bits_ + static_cast<int64_t>(scales_.size() + zeros_.size()) * kHalfBits;
  }
  const PagedCodes& codes() const override { return codes_; }
  void Clear() override {
    size_ = 0;
    scales_.clear();
    zeros_.clear();
    codes_.Clear();
  }

 private:
  int d_, bits_, group_, groups_;
  std::vector<float> shift_, scale_;
  int64_t size_ = 0;
  std::vector<uint16_t> scales_, zeros_;  // [token][group]
  PagedCodes codes_;
};

// ---------------------------------------------------------------------------------------------------
// kvq<b> keys: pre-RoPE, per channel, calibrated thresholds as scale/zero point, non-uniform codebook,
// values outside the thresholds kept exactly (fp16 + channel index), counted per token.

class KvqKeyCodec final : public PartCodec {
 public:
  KvqKeyCodec(int d, int bits, std::vector<float> low, std::vector<float> high, std::vector<float> codebook)
      : d_(d), bits_(bits), low_(std::move(low)), high_(std::move(high)), codebook_(std::move(codebook)),
        codes_(d, bits, PagedCodes::Order::kChannelMajor) {
    offsets_.push_back(0);
    // Every (channel, code)'s dequantized value, by the same expression Decode used per element.
    const int k = static_cast<int>(codebook_.size());
    lut_.resize(static_cast<size_t>(d_) * k);
    for (int c = 0; c < d_; ++c)
      for (int i = 0; i < k; ++i) lut_[c * k + i] = low_[c] + (codebook_[i] + 1.0f) * 0.5f * (high_[c] - low_[c]);
  }

  void Encode(int n, const float* x) override {
    const int k = static_cast<int>(codebook_.size());
    for (int t = 0; t < n; ++t, ++size_) {
      const float* row = x + static_cast<int64_t>(t) * d_;
      int count = 0;
      for (int c = 0; c < d_; ++c) {
        const float lo = low_[c], hi = high_[c];
        if ((row[c] < lo || row[c] > hi) && count < kMaxKeyOutliersPerToken) {
          outlier_channel_.push_back(static_cast<uint8_t>(c));
          outlier_value_.push_back(FloatToHalf(row[c]));
          ++count;
        }
        const float u = hi > lo ? std::clamp(2.0f * (row[c] - lo) / (hi - lo) - 1.0f, -1.0f, 1.0f) : 0.0f;
        codes_.Set(size_, c, static_cast<uint32_t>(NearestCentroid(codebook_.data(), k, u)));
      }
      offsets_.push_back(offsets_.back() + count);
    }
  }
  void Decode(int64_t first, int64_t n, float* x) const override {
    // Channel by channel within a page: the channel's codes are contiguous, and its values come from
    // its own 2^bits-entry row of the table.
    const int k = static_cast<int>(codebook_.size());
    uint8_t column[kPageTokens];
    for (int64_t t0 = first; t0 < first + n;) {
      const int64_t run = std::min<int64_t>(kPageTokens - t0 % kPageTokens, first + n - t0);
      float* rows = x + (t0 - first) * d_;
      for (int c = 0; c < d_; ++c) {
        codes_.UnpackChannelRun(t0, run, c, column);
        const float* lut = lut_.data() + c * k;
        for (int64_t t = 0; t < run; ++t) rows[t * d_ + c] = lut[column[t]];
      }
      for (int64_t j = t0; j < t0 + run; ++j) {
        float* row = x + (j - first) * d_;
        for (int64_t o = offsets_[j]; o < offsets_[j + 1]; ++o) row[outlier_channel_[o]] = HalfToFloat(outlier_value_[o]);
      }
      t0 += run;
    }
  }
  int64_t size() const override { return size_; }
  int64_t bits() const override {
    // The per-token counts are what a page stores; offsets_ is their prefix sum, a CPU convenience.
    return size_ * d_ * bits_ + size_ * kOutlierCountBits + outliers() * (kHalfBits + kOutlierIndexBits);
  }
  int64_t outliers() const override { return static_cast<int64_t>(outlier_value_.size()); }
  const PagedCodes& codes() const override { return codes_; }
  void Clear() override {
    size_ = 0;
    offsets_.assign(1, 0);
    outlier_channel_.clear();
    outlier_value_.clear();
    codes_.Clear();
  }

 private:
  int d_, bits_;
  std::vector<float> low_, high_, codebook_;
  std::vector<float> lut_;  // [channel][code]: the dequantized value
  int64_t size_ = 0;
  std::vector<int64_t> offsets_;  // outliers of token j: [offsets_[j], offsets_[j+1])
  std::vector<uint8_t> outlier_channel_;
  std::vector<uint16_t> outlier_value_;
  PagedCodes codes_;
};

// ---------------------------------------------------------------------------------------------------
// kvq<b> values: per token, online thresholds (n_out extremes kept exactly), fp16 low/high as zero point
// and scale, non-uniform codebook.

class KvqValueCodec final : public PartCodec {
 public:
  KvqValueCodec(int d, int bits, int n_out, std::vector<float> codebook)
      : d_(d), bits_(bits), n_out_(std::clamp(n_out, 0, d - 1)), codebook_(std::move(codebook)),
        codes_(d, bits, PagedCodes::Order::kTokenMajor) {}

  void Encode(int n, const float* x) override {
    const int k = static_cast<int>(codebook_.size());
    std::vector<int> outliers;
    for (int t = 0; t < n; ++t, ++size_) {
      const float* row = x + static_cast<int64_t>(t) * d_;
      float lo, hi;
      KvqValueThresholds(row, d_, n_out_, &lo, &hi, &outliers);
      const uint16_t lo16 = FloatToHalf(lo), hi16 = FloatToHalf(hi);
      low_.push_back(lo16);
      high_.push_back(hi16);
      lo = HalfToFloat(lo16);
      hi = HalfToFloat(hi16);
      for (int o : outliers) {
        outlier_channel_.push_back(static_cast<uint8_t>(o));
        outlier_value_.push_back(FloatToHalf(row[o]));
      }
      for (int c = 0; c < d_; ++c) {
        const float u = hi > lo ? std::clamp(2.0f * (row[c] - lo) / (hi - lo) - 1.0f, -1.0f, 1.0f) : 0.0f;
        codes_.Set(size_, c, static_cast<uint32_t>(NearestCentroid(codebook_.data(), k, u)));
      }
    }
  }
  void Decode(int64_t first, int64_t n, float* x) const override {
    const int k = static_cast<int>(codebook_.size());
    float lut[16];  // this token's value of each code, by the expression the encoder inverts
    ForEachCodeChunk(codes_, first, n, [&](int64_t t0, int64_t run, const uint8_t* codes) {
      for (int64_t t = 0; t < run; ++t) {
        const int64_t j = t0 + t;
        float* row = x + (j - first) * d_;
        const float lo = HalfToFloat(low_[j]), hi = HalfToFloat(high_[j]);
        for (int i = 0; i < k; ++i) lut[i] = lo + (codebook_[i] + 1.0f) * 0.5f * (hi - lo);
        const uint8_t* code = codes + t * d_;
        for (int c = 0; c < d_; ++c) row[c] = lut[code[c]];
        for (int64_t o = j * n_out_; o < (j + 1) * n_out_; ++o) row[outlier_channel_[o]] = HalfToFloat(outlier_value_[o]);
      }
    });
  }
  int64_t size() const override { return size_; }
  int64_t bits() const override {
    return size_ * d_ * bits_ + static_cast<int64_t>(low_.size() + high_.size()) * kHalfBits +
           outliers() * (kHalfBits + kOutlierIndexBits);
  }
  int64_t outliers() const override { return static_cast<int64_t>(outlier_value_.size()); }
  const PagedCodes& codes() const override { return codes_; }
  void Clear() override {
    size_ = 0;
    low_.clear();
    high_.clear();
    outlier_channel_.clear();
    outlier_value_.clear();
    codes_.Clear();
  }

 private:
  int d_, bits_, n_out_;
  std::vector<float> codebook_;
  int64_t size_ = 0;
  std::vector<uint16_t> low_, high_;  // [token]
  std::vector<uint8_t> outlier_channel_;  // [token][n_out]
  std::vector<uint16_t> outlier_value_;
  PagedCodes codes_;
};

// ---------------------------------------------------------------------------------------------------
// deco<b>: DecoQuant. A block X of t tokens x d channels, channel c = (j1, j2, j3) with c = (j1 m + j2) l
// + j3, l = local channels, m = d / l^2, is written exactly (full rank) as a three-core MPO:
//   X[i][c] = sum_{r1, r2} A[j1][r1] C[r1][i][j2][r2] B[r2][j3]
// by two SVDs (TT-SVD): M1 = X as l x (t m l) rows j1 = U1 S1 V1^T, A = U1 S1; then V1^T as (l t m) x l
// rows (r1, i, j2) = U2 S2 V2^T, C = U2, B = S2 V2^T. The small local tensors A and B (l x l each) take
// the channel scales, so outlier channels land in them and stay fp16; the large core C (t d values,
// orthonormal columns) has a narrow range and is quantized symmetric b-bit, one fp16 scale per (r1, r2)
// slice. Data-free: nothing comes from calibration.

// Eigen-decomposition of a symmetric n x n matrix (row-major) by cyclic Jacobi rotations. Eigenvalues
// descending; eigenvector k is column k of vectors.
void SymmetricEigen(std::vector<double> a, int n, std::vector<double>* values, std::vector<double>* vectors) {
  std::vector<double> v(n * n, 0.0);
  for (int i = 0; i < n; ++i) v[i * n + i] = 1.0;
  for (int sweep = 0; sweep < 64; ++sweep) {
    double off = 0.0;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) off += a[p * n + q] * a[p * n + q];
    if (off < 1e-30) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (std::fabs(apq) < 1e-300) continue;
        const double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int k = 0; k < n; ++k) {  // A <- A J (columns p, q)
          const double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // A <- J^T A (rows p, q)
          const double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {
          const double vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int x, int y) { return a[x * n + x] > a[y * n + y]; });
  values->resize(n);
  vectors->resize(n * n);
  for (int k = 0; k < n; ++k) {
    (*values)[k] = std::max(0.0, a[order[k] * n + order[k]]);
    for (int i = 0; i < n; ++i) (*vectors)[i * n + k] = v[i * n + order[k]];
  }
}

class DecoCodec final : public PartCodec {
 public:
  DecoCodec(int d, int bits, int block, int local)
      : d_(d), bits_(bits), block_(block), l_(local), m_(d / (local * local)),
        codes_(d, bits, PagedCodes::Order::kBlockMajor) {}

  void Encode(int n, const float* x) override {
    const int t_len = n, l = l_, m = m_, ml = m_ * l_;
    const int64_t cols1 = static_cast<int64_t>(t_len) * ml;  // M1 is l x cols1, M1[j1][i*ml + r] = X[i][j1*ml + r]
    auto m1 = [&](int j1, int64_t col) {
      return static_cast<double>(x[(col / ml) * d_ + j1 * ml + col % ml]);
    };
    // Step 1: M1 = U1 S1 V1^T through the Gram matrix M1 M1^T.
    std::vector<double> gram(l * l, 0.0), values, u1;
    for (int a = 0; a < l; ++a)
      for (int b = a; b < l; ++b) {
        double s = 0;
        for (int64_t col = 0; col < cols1; ++col) s += m1(a, col) * m1(b, col);
        gram[a * l + b] = gram[b * l + a] = s;
      }
    SymmetricEigen(gram, l, &values, &u1);
    std::vector<double> s1(l);
    const double floor1 = std::sqrt(values[0]) * 1e-7;
    for (int r = 0; r < l; ++r) s1[r] = std::sqrt(values[r]);
    std::vector<uint16_t> a16(l * l);
    for (int j1 = 0; j1 < l; ++j1)
      for (int r = 0; r < l; ++r) a16[j1 * l + r] = FloatToHalf(static_cast<float>(u1[j1 * l + r] * s1[r]));
    // R1 = S1^-1 U1^T M1 (l x cols1); directions without energy stay zero.
    std::vector<double> r1(l * cols1, 0.0);
    for (int r = 0; r < l; ++r) {
      if (s1[r] <= floor1 || s1[r] == 0.0) continue;
      for (int64_t col = 0; col < cols1; ++col) {
        double s = 0;
        for (int j1 = 0; j1 < l; ++j1) s += u1[j1 * l + r] * m1(j1, col);
        r1[r * cols1 + col] = s / s1[r];
      }
    }
    // Step 2: M2 = R1 as rows (r1, i, j2) x columns j3: M2[(r1*t + i)*m + j2][j3] = R1[r1][(i*m + j2)*l + j3].
    // That row-major (rows2 x l) matrix is exactly R1's memory, so M2 = r1 viewed with row stride l.
    const int64_t rows2 = static_cast<int64_t>(l) * t_len * m;
    std::fill(gram.begin(), gram.end(), 0.0);
    for (int a = 0; a < l; ++a)
      for (int b = a; b < l; ++b) {
        double s = 0;
        for (int64_t row = 0; row < rows2; ++row) s += r1[row * l + a] * r1[row * l + b];
        gram[a * l + b] = gram[b * l + a] = s;
      }
    std::vector<double> v2;
    SymmetricEigen(gram, l, &values, &v2);
    std::vector<double> s2(l);
    const double floor2 = std::sqrt(values[0]) * 1e-7;
    for (int r = 0; r < l; ++r) s2[r] = std::sqrt(values[r]);
    std::vector<uint16_t> b16(l * l);
    for (int r = 0; r < l; ++r)
      for (int j3 = 0; j3 < l; ++j3) b16[r * l + j3] = FloatToHalf(static_cast<float>(s2[r] * v2[j3 * l + r]));
    // C = M2 V2 S2^-1, quantized per (r1, r2) slice.
    std::vector<float> core(rows2 * l, 0.0f);
    for (int64_t row = 0; row < rows2; ++row)
      for (int r = 0; r < l; ++r) {
        if (s2[r] <= floor2 || s2[r] == 0.0) continue;
        double s = 0;
        for (int j3 = 0; j3 < l; ++j3) s += r1[row * l + j3] * v2[j3 * l + r];
        core[row * l + r] = static_cast<float>(s / s2[r]);
      }
    const int64_t slice = static_cast<int64_t>(t_len) * m;  // rows of one r1
    const int64_t page = size_ / kPageTokens;
    const int64_t base = (size_ % kPageTokens) * d_;  // block b of the page starts at code b * T * d
    std::vector<float> slice_values(slice);
    for (int ra = 0; ra < l; ++ra)
      for (int rb = 0; rb < l; ++rb) {
        for (int64_t s = 0; s < slice; ++s) slice_values[s] = core[(ra * slice + s) * l + rb];
        const uint16_t scale16 = SymmetricScale(slice_values.data(), static_cast<int>(slice), bits_);
        scales_.push_back(scale16);
        const float scale = HalfToFloat(scale16);
        for (int64_t s = 0; s < slice; ++s)
          codes_.SetIndex(page, base + (ra * slice + s) * l + rb, SymmetricCode(slice_values[s], scale, bits_));
      }
    local_a_.insert(local_a_.end(), a16.begin(), a16.end());
    local_b_.insert(local_b_.end(), b16.begin(), b16.end());
    block_tokens_.push_back(t_len);
    size_ += n;
  }

  void Decode(int64_t first, int64_t n, float* x) const override {
    std::vector<float> block;
    const int64_t end = first + n;
    for (int64_t b = first / block_; b * block_ < end; ++b) {
      const int64_t b0 = b * block_;
      DecodeBlock(b, &block);
      const int64_t lo = std::max(first, b0), hi = std::min(end, b0 + block_tokens_[b]);
      std::copy(block.begin() + (lo - b0) * d_, block.begin() + (hi - b0) * d_, x + (lo - first) * d_);
    }
  }
  int64_t size() const override { return size_; }
  int64_t bits() const override {
    return size_ * d_ * bits_ + static_cast<int64_t>(local_a_.size() + local_b_.size() + scales_.size()) * kHalfBits;
  }
  const PagedCodes& codes() const override { return codes_; }
  void Clear() override {
    size_ = 0;
    local_a_.clear();
    local_b_.clear();
    scales_.clear();
    block_tokens_.clear();
    codes_.Clear();
  }

 private:
  void DecodeBlock(int64_t b, std::vector<float>* out) const {
    const int l = l_, m = m_, ml = m_ * l_;
    const int t_len = block_tokens_[b];
    const int64_t slice = static_cast<int64_t>(t_len) * m;
    const int64_t first_token = b * block_;
    const int64_t page = first_token / kPageTokens;
    const int64_t base = (first_token % kPageTokens) * d_;
    const uint16_t* a16 = local_a_.data() + b * l * l;
    const uint16_t* b16 = local_b_.data() + b * l * l;
    const uint16_t* sc = scales_.data() + b * l * l;
    // W[r1][i][j2][j3] = sum_r2 C[r1][i][j2][r2] B[r2][j3], then X[i][(j1 m + j2) l + j3] = sum_r1 A[j1][r1] W.
    std::vector<float> w(static_cast<size_t>(l) * slice * l, 0.0f);
    for (int ra = 0; ra < l; ++ra)
      for (int64_t s = 0; s < slice; ++s)
        for (int rb = 0; rb < l; ++rb) {
          const float scale = HalfToFloat(sc[ra * l + rb]);
          const float cv = SymmetricValue(codes_.GetIndex(page, base + (ra * slice + s) * l + rb), scale, bits_);
          for (int j3 = 0; j3 < l; ++j3) w[(ra * slice + s) * l + j3] += cv * HalfToFloat(b16[rb * l + j3]);
        }
    out->assign(static_cast<size_t>(t_len) * d_, 0.0f);
    for (int i = 0; i < t_len; ++i)
      for (int j1 = 0; j1 < l; ++j1)
        for (int r = 0; r < ml; ++r) {  // r = j2 * l + j3
          float s = 0;
          for (int ra = 0; ra < l; ++ra) s += HalfToFloat(a16[j1 * l + ra]) * w[(ra * slice + i * m) * l + r];
          (*out)[static_cast<int64_t>(i) * d_ + j1 * ml + r] = s;
        }
  }

  int d_, bits_, block_, l_, m_;
  int64_t size_ = 0;
  std::vector<uint16_t> local_a_, local_b_, scales_;  // per block: A [l][l], B [l][l], scales [l][l]
  std::vector<int> block_tokens_;
  PagedCodes codes_;
};

// A part the scheme leaves unquantized (the "parts" ablation): fp16, 16 bits per element.
class Fp16PartCodec final : public PartCodec {
 public:
  explicit Fp16PartCodec(int d) : d_(d), codes_(d, 8, PagedCodes::Order::kTokenMajor) {}
  void Encode(int n, const float* x) override {
    for (int64_t i = 0; i < static_cast<int64_t>(n) * d_; ++i) values_.push_back(FloatToHalf(x[i]));
  }
  void Decode(int64_t first, int64_t n, float* x) const override {
    HalfToFloatRow(values_.data() + first * d_, n * d_, x);
  }
  int64_t size() const override { return static_cast<int64_t>(values_.size()) / d_; }
  int64_t bits() const override { return static_cast<int64_t>(values_.size()) * kHalfBits; }
  const PagedCodes& codes() const override { return codes_; }  // no codes
  void Clear() override { values_.clear(); }

 private:
  int d_;
  std::vector<uint16_t> values_;
  PagedCodes codes_;
};

std::vector<float> Slice(const std::vector<float>& v, int64_t offset, int64_t n) {
  return std::vector<float>(v.begin() + offset, v.begin() + offset + n);
}

}  // namespace

absl::StatusOr<std::unique_ptr<PartCodec>> MakePartCodec(const KvSchemeConfig& config, KvPart part, int d, int layer,
                                                         int kv_head, const Calibration* calibration) {
  const bool key = part == KvPart::kKey;
  if (!config.quantizes(part)) return std::make_unique<Fp16PartCodec>(d);
  switch (config.kind) {
    case KvSchemeKind::kFp16:
      return absl::InvalidArgumentError("fp16 has no quantized part");
    case KvSchemeKind::kInt:
      return std::make_unique<IntCodec>(d, config.bits, config.group_size);
    case KvSchemeKind::kKivi:
      if (key) return std::make_unique<KiviKeyCodec>(d, config.bits, config.group_size);
      return std::make_unique<PerTokenAsymmetricCodec>(d, config.bits, config.group_size, std::vector<float>{},
                                                       std::vector<float>{});
    case KvSchemeKind::kKvq: {
      if (calibration == nullptr) return absl::InvalidArgumentError("kvq needs a calibration");
      KV_ASSIGN_OR_RETURN(const int fi, calibration->FractionIndex(config.outlier_fraction));
      KV_ASSIGN_OR_RETURN(const int bi, calibration->BitsIndex(config.bits));
      const KvqLayerTables& t = calibration->layers[layer].kvq[fi];
      const int64_t off = static_cast<int64_t>(kv_head) * d;
      if (key) {
        return std::make_unique<KvqKeyCodec>(d, config.bits, Slice(t.key_low, off, d), Slice(t.key_high, off, d),
                                             t.key_codebooks[bi]);
      }
      return std::make_unique<KvqValueCodec>(d, config.bits, KvqValueOutliersPerToken(config, d),
                                             t.value_codebooks[bi]);
    }
    case KvSchemeKind::kWkv: {
      if (calibration == nullptr) return absl::InvalidArgumentError("wkv needs a calibration");
      const LayerCalibration& lc = calibration->layers[layer];
      const int64_t off = static_cast<int64_t>(kv_head) * d;
      return std::make_unique<PerTokenAsymmetricCodec>(d, config.bits, d,
                                                       Slice(key ? lc.key_shift : lc.value_shift, off, d),
                                                       Slice(key ? lc.key_scale : lc.value_scale, off, d));
    }
    case KvSchemeKind::kDeco:
      return std::make_unique<DecoCodec>(d, config.bits, config.deco_block_tokens, config.deco_local_channels);
  }
  return absl::InternalError("unhandled KV scheme");
}

}  // namespace kvshard
