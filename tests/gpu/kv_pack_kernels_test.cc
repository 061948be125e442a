// GPU pack kernels against the CPU codecs of the quantized KV store: the bytes must be identical.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/half.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kernels/cuda/kv_pack.h"
#include "kernels/kv_pack.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_codecs.h"
#include "kvstore/kv_scheme.h"

namespace kvshard {
namespace {

using testing::DeviceBuffer;
using testing::ToDevice;

constexpr double kOutlierFraction = 0.01;

// A one-layer, one-KV-head calibration with random thresholds and codebooks. Channel 5 gets low == high
// (the codec's degenerate case, u = 0); channel 0's thresholds lie on values the keys take exactly.
Calibration SyntheticCalibration(int head_dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> width(0.3f, 1.5f), centre(-0.3f, 0.3f), unit(-1.0f, 1.0f);
  Calibration cal;
  cal.model.n_layers = 1;
  cal.model.n_kv_heads = 1;
  cal.model.n_heads = 1;
  cal.model.head_dim = head_dim;
  cal.outlier_fractions = {kOutlierFraction};
  cal.codebook_bits = {2, 3, 4};
  KvqLayerTables t;
  for (int c = 0; c < head_dim; ++c) {
    const float m = centre(rng), w = width(rng);
    t.key_low.push_back(HalfToFloat(FloatToHalf(m - w)));
    t.key_high.push_back(HalfToFloat(FloatToHalf(m + w)));
  }
  t.key_low[5] = t.key_high[5] = 0.25f;
  for (int b : cal.codebook_bits) {
    std::vector<float> cb(1 << b);
    for (float& x : cb) x = unit(rng);
    std::sort(cb.begin(), cb.end());
    t.key_codebooks.push_back(cb);
    t.value_codebooks.push_back(cb);
  }
  cal.layers.resize(1);
  cal.layers[0].kvq.push_back(t);
  return cal;
}

// fp16-exact keys, mostly inside the thresholds, some outside (outliers), some exactly on them.
std::vector<float> SyntheticKeys(int64_t n, int head_dim, const KvqLayerTables& t, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> unit(-1.2f, 1.2f);
  std::uniform_int_distribution<int> pick(0, 63);
  std::vector<float> keys(n * head_dim);
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < head_dim; ++c) {
      const float lo = t.key_low[c], hi = t.key_high[c];
      float x = 0.5f * (lo + hi) + 0.5f * (hi - lo) * unit(rng);
      const int r = pick(rng);
      if (r == 0) x = lo;
      if (r == 1) x = hi;
      if (r == 2) x = 4.0f * hi;  // a clear outlier
      keys[i * head_dim + c] = HalfToFloat(FloatToHalf(x));  // the store rounds its input to fp16
    }
  }
  return keys;
}

// (head_dim, bits, first_token, n_tokens)
using PackParam = std::tuple<int, int, int, int>;
class KvqKeyPackTest : public ::testing::TestWithParam<PackParam> {};

TEST_P(KvqKeyPackTest, BytesMatchTheCpuCodec) {
  KV_SKIP_WITHOUT_GPU();
  const auto [head_dim, bits, first_token, n_tokens] = GetParam();
  const Calibration cal = SyntheticCalibration(head_dim, 7 + head_dim + bits);
  const KvqLayerTables& tables = cal.layers[0].kvq[0];
  auto config = ParseKvScheme("kvq" + std::to_string(bits));
  ASSERT_TRUE(config.ok()) << config.status();
  config->outlier_fraction = kOutlierFraction;
  auto codec = MakePartCodec(*config, KvPart::kKey, head_dim, 0, 0, &cal);
  ASSERT_TRUE(codec.ok()) << codec.status();

  const int64_t total = first_token + n_tokens;
  const std::vector<float> keys = SyntheticKeys(total, head_dim, tables, 100 + n_tokens);
  // The CPU store: the tokens before first_token, then the tested ones.
  if (first_token > 0) (*codec)->Encode(first_token, keys.data());
  const int64_t page_bytes = PackedBytes(static_cast<int64_t>(kPageTokens) * head_dim, bits);
  const int64_t n_pages = (total + kPageTokens - 1) / kPageTokens;
  // GPU pages start as the store's after the prefix (fresh pages are zero), with every word the kernel
  // must write poisoned: the 32-token groups covering the new tokens, in every channel. So the kernel
  // must leave earlier tokens' words untouched and write every word of the new ones.
  std::vector<uint8_t> gpu_start(n_pages * page_bytes, 0);
  const PagedCodes& cpu_codes = (*codec)->codes();
  for (int64_t p = 0; p < cpu_codes.pages(); ++p) {
    std::copy(cpu_codes.page(p).begin(), cpu_codes.page(p).end(), gpu_start.begin() + p * page_bytes);
  }
  const int64_t group_bytes = 4 * bits;  // 32 codes of `bits` bits
  for (int64_t j = first_token; j < total; j += 32) {
    for (int c = 0; c < head_dim; ++c) {
      const int64_t at = (j / kPageTokens) * page_bytes + (static_cast<int64_t>(c) * kPageTokens + j % kPageTokens) * bits / 8;
      std::fill(gpu_start.begin() + at, gpu_start.begin() + at + group_bytes, 0xA5);
    }
  }
  const int64_t prefix_outliers = (*codec)->outliers();
  (*codec)->Encode(n_tokens, keys.data() + first_token * head_dim);

  const std::vector<int> bits_list = cal.codebook_bits;
  const int bi = static_cast<int>(std::find(bits_list.begin(), bits_list.end(), bits) - bits_list.begin());
  DeviceBuffer<float> d_keys = ToDevice(std::vector<float>(keys.begin() + first_token * head_dim, keys.end()));
  DeviceBuffer<float> d_low = ToDevice(tables.key_low), d_high = ToDevice(tables.key_high);
  DeviceBuffer<float> d_codebook = ToDevice(tables.key_codebooks[bi]);
  DeviceBuffer<uint8_t> d_pages = ToDevice(gpu_start);
  DeviceBuffer<uint8_t> d_count(n_tokens), d_channel(n_tokens * head_dim);
  DeviceBuffer<uint16_t> d_value(n_tokens * head_dim);
  d_count.Poison();
  KvqKeyPackArgs args;
  args.keys = d_keys.get();
  args.n_tokens = n_tokens;
  args.first_token = first_token;
  args.head_dim = head_dim;
  args.bits = bits;
  args.low = d_low.get();
  args.high = d_high.get();
  args.codebook = d_codebook.get();
  args.pages = d_pages.get();
  args.outlier_count = d_count.get();
  args.outlier_channel = d_channel.get();
  args.outlier_value = d_value.get();
  ASSERT_TRUE(PackKvqKeysCuda(args, nullptr).ok());
  KV_CUDA_OK(cudaDeviceSynchronize());

  // Codes: every page byte identical.
  const std::vector<uint8_t> gpu_pages = d_pages.Download();
  ASSERT_EQ(cpu_codes.pages(), n_pages);
  int64_t wrong = 0;
  for (int64_t p = 0; p < n_pages; ++p) {
    for (int64_t i = 0; i < page_bytes; ++i) {
      const uint8_t want = cpu_codes.page(p)[i], got = gpu_pages[p * page_bytes + i];
      if (want != got && wrong++ < 8) {
        std::printf("  page %lld byte %lld: got 0x%02x want 0x%02x\n", static_cast<long long>(p),
                    static_cast<long long>(i), got, want);
      }
    }
  }
  EXPECT_EQ(wrong, 0) << "code bytes differ";

  // Outliers: same count as the codec, same channels and fp16 values as its rule; the codec's decoded
  // rows (codes, then outliers written over them) carry exactly the GPU's outlier values.
  const std::vector<uint8_t> count = d_count.Download(), channel = d_channel.Download();
  const std::vector<uint16_t> value = d_value.Download();
  std::vector<float> decoded(n_tokens * head_dim);
  (*codec)->Decode(first_token, n_tokens, decoded.data());
  int64_t gpu_outliers = 0, outlier_wrong = 0;
  for (int64_t t = 0; t < n_tokens; ++t) {
    std::vector<int> want;
    for (int c = 0; c < head_dim; ++c) {
      const float x = HalfToFloat(FloatToHalf(keys[(first_token + t) * head_dim + c]));
      if (x < tables.key_low[c] || x > tables.key_high[c]) want.push_back(c);
    }
    gpu_outliers += count[t];
    bool ok = count[t] == want.size();
    for (int s = 0; ok && s < count[t]; ++s) {
      const int c = channel[t * head_dim + s];
      ok = c == want[s] && value[t * head_dim + s] == FloatToHalf(keys[(first_token + t) * head_dim + c]) &&
           HalfToFloat(value[t * head_dim + s]) == decoded[t * head_dim + c];
    }
    if (!ok && outlier_wrong++ < 8) {
      std::printf("  token %lld: %d outliers on the GPU, %zu expected\n", static_cast<long long>(t), count[t],
                  want.size());
    }
  }
  EXPECT_EQ(outlier_wrong, 0);
  EXPECT_EQ(gpu_outliers, (*codec)->outliers() - prefix_outliers);
}

INSTANTIATE_TEST_SUITE_P(
    Sizes, KvqKeyPackTest,
    ::testing::Values(PackParam{128, 3, 0, 1}, PackParam{128, 3, 0, 37}, PackParam{128, 3, 0, 127},
                      PackParam{128, 3, 0, 128}, PackParam{128, 3, 0, 129}, PackParam{128, 3, 32, 300},
                      PackParam{128, 3, 96, 33}, PackParam{64, 3, 0, 37}, PackParam{64, 3, 128, 257},
                      PackParam{128, 2, 0, 129}, PackParam{128, 4, 64, 200}, PackParam{64, 4, 0, 1}),
    [](const ::testing::TestParamInfo<PackParam>& info) {
      return "d" + std::to_string(std::get<0>(info.param)) + "_b" + std::to_string(std::get<1>(info.param)) +
             "_first" + std::to_string(std::get<2>(info.param)) + "_n" + std::to_string(std::get<3>(info.param));
    });

class KvqValuePackTest : public ::testing::TestWithParam<PackParam> {};

// Values: code pages byte-identical to KvqValueCodec; per-token fp16 thresholds and outliers identical to
// KvqValueThresholds (the codec's rule); the codec's decoded rows equal the GPU's pieces bit for bit.
TEST_P(KvqValuePackTest, BytesMatchTheCpuCodec) {
  KV_SKIP_WITHOUT_GPU();
  const auto [head_dim, bits, first_token, n_tokens] = GetParam();
  const Calibration cal = SyntheticCalibration(head_dim, 11 + head_dim + bits);
  const KvqLayerTables& tables = cal.layers[0].kvq[0];
  auto config = ParseKvScheme("kvq" + std::to_string(bits));
  ASSERT_TRUE(config.ok()) << config.status();
  config->outlier_fraction = kOutlierFraction;
  auto codec = MakePartCodec(*config, KvPart::kValue, head_dim, 0, 0, &cal);
  ASSERT_TRUE(codec.ok()) << codec.status();
  const int n_out = std::clamp(KvqValueOutliersPerToken(*config, head_dim), 0, head_dim - 1);

  const int64_t total = first_token + n_tokens;
  std::vector<float> values = SyntheticKeys(total, head_dim, tables, 200 + n_tokens);
  // Exact ties between channels, so the (value, channel) order matters.
  for (int64_t t = 0; t < total; t += 3) values[t * head_dim + 1] = values[t * head_dim + 2];
  if (first_token > 0) (*codec)->Encode(first_token, values.data());
  const int64_t page_bytes = PackedBytes(static_cast<int64_t>(kPageTokens) * head_dim, bits);
  const int64_t n_pages = (total + kPageTokens - 1) / kPageTokens;
  const PagedCodes& cpu_codes = (*codec)->codes();
  std::vector<uint8_t> gpu_start(n_pages * page_bytes, 0);
  for (int64_t p = 0; p < cpu_codes.pages(); ++p) {
    std::copy(cpu_codes.page(p).begin(), cpu_codes.page(p).end(), gpu_start.begin() + p * page_bytes);
  }
  const int64_t token_bytes = static_cast<int64_t>(head_dim) * bits / 8;
  for (int64_t j = first_token; j < total; ++j) {  // poison every byte the kernel must write
    const int64_t at = (j / kPageTokens) * page_bytes + (j % kPageTokens) * token_bytes;
    std::fill(gpu_start.begin() + at, gpu_start.begin() + at + token_bytes, 0xA5);
  }
  (*codec)->Encode(n_tokens, values.data() + first_token * head_dim);

  const int bi = static_cast<int>(std::find(cal.codebook_bits.begin(), cal.codebook_bits.end(), bits) -
                                  cal.codebook_bits.begin());
  DeviceBuffer<float> d_values = ToDevice(std::vector<float>(values.begin() + first_token * head_dim, values.end()));
  DeviceBuffer<float> d_codebook = ToDevice(tables.value_codebooks[bi]);
  DeviceBuffer<uint8_t> d_pages = ToDevice(gpu_start);
  DeviceBuffer<uint16_t> d_low(n_tokens), d_high(n_tokens), d_value(std::max(1, n_tokens * n_out));
  DeviceBuffer<uint8_t> d_channel(std::max(1, n_tokens * n_out));
  d_low.Poison();
  d_high.Poison();
  d_channel.Poison();
  KvqValuePackArgs args;
  args.values = d_values.get();
  args.n_tokens = n_tokens;
  args.first_token = first_token;
  args.head_dim = head_dim;
  args.bits = bits;
  args.n_out = n_out;
  args.codebook = d_codebook.get();
  args.pages = d_pages.get();
  args.low = d_low.get();
  args.high = d_high.get();
  args.outlier_channel = d_channel.get();
  args.outlier_value = d_value.get();
  const absl::Status status = PackKvqValuesCuda(args, nullptr);
  ASSERT_TRUE(status.ok()) << status;
  KV_CUDA_OK(cudaDeviceSynchronize());

  const std::vector<uint8_t> gpu_pages = d_pages.Download();
  ASSERT_EQ(cpu_codes.pages(), n_pages);
  int64_t wrong = 0;
  for (int64_t p = 0; p < n_pages; ++p) {
    for (int64_t i = 0; i < page_bytes; ++i) {
      const uint8_t want = cpu_codes.page(p)[i], got = gpu_pages[p * page_bytes + i];
      if (want != got && wrong++ < 8) {
        std::printf("  page %lld byte %lld: got 0x%02x want 0x%02x\n", static_cast<long long>(p),
                    static_cast<long long>(i), got, want);
      }
    }
  }
  EXPECT_EQ(wrong, 0) << "code bytes differ";

  const std::vector<uint16_t> low = d_low.Download(), high = d_high.Download(), value = d_value.Download();
  const std::vector<uint8_t> channel = d_channel.Download();
  std::vector<float> decoded(n_tokens * head_dim);
  (*codec)->Decode(first_token, n_tokens, decoded.data());
  int64_t token_wrong = 0;
  std::vector<int> want_outliers;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* row = values.data() + (first_token + t) * head_dim;
    float lo, hi;
    KvqValueThresholds(row, head_dim, n_out, &lo, &hi, &want_outliers);
    bool ok = low[t] == FloatToHalf(lo) && high[t] == FloatToHalf(hi) &&
              static_cast<int>(want_outliers.size()) == n_out;
    for (int i = 0; ok && i < n_out; ++i) {
      const int c = channel[t * n_out + i];
      ok = c == want_outliers[i] && value[t * n_out + i] == FloatToHalf(row[c]) &&
           HalfToFloat(value[t * n_out + i]) == decoded[t * head_dim + c];
    }
    if (!ok && token_wrong++ < 8) {
      std::printf("  token %lld: thresholds or outliers differ (low 0x%04x want 0x%04x)\n",
                  static_cast<long long>(t), low[t], FloatToHalf(lo));
    }
  }
  EXPECT_EQ(token_wrong, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Sizes, KvqValuePackTest,
    ::testing::Values(PackParam{128, 3, 0, 1}, PackParam{128, 3, 0, 37}, PackParam{128, 3, 0, 128},
                      PackParam{128, 3, 5, 129}, PackParam{128, 3, 100, 300}, PackParam{64, 3, 0, 37},
                      PackParam{64, 3, 127, 257}, PackParam{128, 2, 0, 129}, PackParam{128, 4, 64, 200},
                      PackParam{64, 4, 0, 1}),
    [](const ::testing::TestParamInfo<PackParam>& info) {
      return "d" + std::to_string(std::get<0>(info.param)) + "_b" + std::to_string(std::get<1>(info.param)) +
             "_first" + std::to_string(std::get<2>(info.param)) + "_n" + std::to_string(std::get<3>(info.param));
    });

TEST(KvqKeyPackErrors, RejectsBadArguments) {
  KvqKeyPackArgs args;
  args.n_tokens = 1;
  args.head_dim = 96;
  EXPECT_EQ(PackKvqKeysCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args.head_dim = 128;
  args.first_token = 5;
  EXPECT_EQ(PackKvqKeysCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args.first_token = 0;
  args.bits = 5;
  EXPECT_EQ(PackKvqKeysCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args.bits = 3;
  EXPECT_EQ(PackKvqKeysCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);  // null buffers
}

}  // namespace
}  // namespace kvshard
