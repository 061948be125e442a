// The fused kvq decode attention kernel against its CPU twin, QuantizedKvShard::Attend: the CPU store
// is filled through Append, its code pages are uploaded as they are, and the per-token metadata
// (value thresholds and outliers, key outliers) is rebuilt with the codec's rules; the GPU partials must
// match the CPU partials.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "common/half.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kernels/cuda/kvq_attention.h"
#include "kernels/rope.h"
#include "tests/kv_test_util.h"
#include "kvstore/kv_codecs.h"
#include "kvstore/kv_scheme.h"
#include "kvstore/quantized_shard.h"

namespace kvshard {
namespace {

using testing::CountMismatches;
using testing::DeviceBuffer;
using testing::ToDevice;

constexpr int kSink = 4;
constexpr int kResidual = 32;
constexpr int kKvHeads = 2;

struct HostStore {
  std::vector<uint8_t> key_codes, value_codes, value_outlier_channel, key_outlier_count, key_outlier_channel;
  std::vector<uint16_t> value_low, value_high, value_outlier_value, key_outlier_value;
  std::vector<int64_t> key_outlier_offset;
  std::vector<int32_t> page_table;
  std::vector<uint16_t> sink_k, sink_v, residual_k, residual_v;
  std::vector<int32_t> sink_lens, quantized_lens, residual_lens;
  std::vector<int64_t> start_positions;
};

// (head_dim, query group, context lengths of the batch, start position of request 0, max splits, code bits)
using Param = std::tuple<int, int, std::vector<int>, int64_t, int, int>;

// The GPU kernel against the CPU shard on the same tokens. one_value_channel: every token's largest value
// sits on channel 5 of its KV head, so each page's value outliers all share one channel (the kernel's
// warp-wide merge of crowded channels; synthetic values otherwise spread them).
void CheckKvqDecode(const Param& param, bool one_value_channel) {
  KV_SKIP_WITHOUT_GPU();
  const auto& [head_dim, group, lens, start0, max_splits, bits] = param;
  const int d = head_dim;
  const int batch = static_cast<int>(lens.size());
  KvGeometry g = testing::SmallGeometry(d, /*n_layers=*/1, /*n_heads=*/kKvHeads * group, kKvHeads);
  const Calibration cal = testing::MakeSyntheticCalibration(g, 512);
  auto config = ParseKvScheme("kvq" + std::to_string(bits) + ":sink=" + std::to_string(kSink) +
                              ",residual=" + std::to_string(kResidual));
  ASSERT_TRUE(config.ok()) << config.status();
  const int n_out = std::clamp(KvqValueOutliersPerToken(*config, d), 0, d - 1);
  const int fi = *cal.FractionIndex(config->outlier_fraction);
  const int bi = *cal.BitsIndex(bits);
  const KvqLayerTables& tables = cal.layers[0].kvq[fi];
  const std::vector<float> inv_freq = RopeInverseFrequencies(g.rope);
  const int64_t code_bytes = 16 * bits * d;

  // CPU partials, and the GPU store built from the same shards.
  HostStore hs;
  std::vector<float> q = testing::MakeQueries(g, batch, 17);
  std::vector<float> want_out(static_cast<size_t>(batch) * g.n_heads * d), want_lse(batch * g.n_heads);
  std::vector<double> atol_out(want_out.size()), atol_lse(want_lse.size());
  int64_t max_pages = 1, max_quantized = 0, total_pages = 0;
  std::vector<std::unique_ptr<QuantizedKvShard>> shards;
  std::vector<testing::SyntheticKv> data;
  for (int b = 0; b < batch; ++b) {
    const int64_t start = b == 0 ? start0 : 0;
    auto shard = QuantizedKvShard::Create(*config, g, start, &cal);
    ASSERT_TRUE(shard.ok()) << shard.status();
    data.push_back(testing::MakeSyntheticKv(g, 0, lens[b], 100 + b));
    if (one_value_channel) {
      for (int64_t t = 0; t < lens[b]; ++t) {
        for (int h = 0; h < kKvHeads; ++h) data[b].v[(t * kKvHeads + h) * d + 5] = 12.0f + 0.01f * static_cast<float>(t % 7);
      }
    }
    ASSERT_TRUE((*shard)->Append(0, lens[b], data[b].k.data(), data[b].v.data()).ok());
    const int64_t q_position = start + lens[b];
    ASSERT_TRUE((*shard)->Attend(0, 1, q.data() + static_cast<size_t>(b) * g.n_heads * d, &q_position,
                                 want_out.data() + static_cast<size_t>(b) * g.n_heads * d,
                                 want_lse.data() + b * g.n_heads)
                    .ok());
    const KvStreamLayout layout = (*shard)->layout(0);
    hs.sink_lens.push_back(static_cast<int32_t>(layout.sink));
    hs.quantized_lens.push_back(static_cast<int32_t>(layout.quantized()));
    hs.residual_lens.push_back(static_cast<int32_t>(layout.n - layout.quantized_end));
    hs.start_positions.push_back(start);
    max_quantized = std::max(max_quantized, layout.quantized());
    max_pages = std::max<int64_t>(max_pages, (layout.quantized() + kPageTokens - 1) / kPageTokens);

    // Tolerance per (request, head). kvq2 and kvq4 run in fp32: the same form with 1e-5 in place of the
    // fp16 terms below (the RoPE anchor's angle addition is within 4e-7 in cos and sin). kvq3 runs QK and
    // PV on tensor cores with fp16 operands (fp32 accumulation): a key element is dequantized in fp16 from fp16 mid and half-range (one rounding each
    // of mid, half, the codebook entry and the FMA: u (|mid| + 2 |half| + |k|), u = 2^-11), rotated with
    // fp16 cos/sin of the page offset (three more roundings of |k|), and the query is rotated back by the
    // page's first position in fp32 and rounded to fp16 (u |q|). So a score moves by at most
    // E = scale * max_t sum_c |q_c| (|k_tc| + |mid_c| + |half_c|) * 6u (3e-3); the lse then by at most E,
    // and the output (a convex combination of values whose weights change by a factor within
    // exp(+-2E)) by 2E * max |v|, plus the fp16 weights and value terms (p, half-range, codebook entry
    // and product: 4u max |v|, 2e-3 max |v|). A key outlier's correction is rotated with the same fp16
    // cos/sin: u |delta| (|q_c| + |q_c'|) for its channel c and RoPE partner c', with |delta| <= |k_tc| +
    // |mid_c| + |half_c|, inside those channels' terms above. Value outliers, sink and residual stay in fp32.
    std::vector<float> k_all(static_cast<size_t>(lens[b]) * d), v_all(k_all.size());
    const std::vector<std::vector<double>> key_range = testing::KvqKeyRange(tables, kKvHeads, d);
    for (int h = 0; h < kKvHeads; ++h) {
      (*shard)->Dequantize(0, h, 0, lens[b], k_all.data(), v_all.data());
      double max_v = 0.0;
      for (float x : v_all) max_v = std::max(max_v, std::fabs(static_cast<double>(x)));
      for (int gi = 0; gi < group; ++gi) {
        const int head = h * group + gi;
        const float* qh = q.data() + (static_cast<size_t>(b) * g.n_heads + head) * d;
        double max_dot = 0.0;
        for (int t = 0; t < lens[b]; ++t) {
          double dot = 0.0;
          for (int c = 0; c < d; ++c) {
            dot += std::fabs(static_cast<double>(qh[c])) * (std::fabs(static_cast<double>(k_all[t * d + c])) + key_range[h][c]);
          }
          max_dot = std::max(max_dot, dot);
        }
        const bool fp16_operands = bits == 3;
        const double e = g.scale() * max_dot * (fp16_operands ? 3e-3 : 1e-5);
        atol_lse[b * g.n_heads + head] = e + 1e-6;
        for (int c = 0; c < d; ++c) {
          atol_out[(static_cast<size_t>(b) * g.n_heads + head) * d + c] =
              (2 * e + (fp16_operands ? 2e-3 : 1e-5)) * max_v + 1e-6;
        }
      }
    }
    shards.push_back(std::move(*shard));
  }

  // Pages: request b's pages are laid out in reverse order of the batch (the page table is exercised).
  std::vector<int64_t> first_page(batch);
  for (int b = batch - 1; b >= 0; --b) {
    first_page[b] = total_pages;
    total_pages += (hs.quantized_lens[b] + kPageTokens - 1) / kPageTokens;
  }
  const int64_t ph_count = std::max<int64_t>(total_pages, 1) * kKvHeads;
  hs.key_codes.assign(ph_count * code_bytes, 0);
  hs.value_codes.assign(ph_count * code_bytes, 0);
  hs.value_low.assign(ph_count * kPageTokens, 0);
  hs.value_high.assign(ph_count * kPageTokens, 0);
  hs.value_outlier_channel.assign(std::max<int64_t>(ph_count * kPageTokens * n_out, 16), 0);
  hs.value_outlier_value.assign(std::max<int64_t>(ph_count * kPageTokens * n_out, 8), 0);
  hs.key_outlier_count.assign(ph_count * kPageTokens, 0);
  hs.key_outlier_offset.assign(ph_count, 0);
  hs.page_table.assign(static_cast<size_t>(batch) * max_pages, -1);
  hs.sink_k.assign(static_cast<size_t>(batch) * kKvHeads * kSink * d, 0);
  hs.sink_v = hs.sink_k;
  hs.residual_k.assign(static_cast<size_t>(batch) * kKvHeads * kResidual * d, 0);
  hs.residual_v = hs.residual_k;
  // Key outliers are listed per physical page in page order; build them page by page.
  std::vector<std::vector<std::pair<uint8_t, uint16_t>>> page_outliers(ph_count);
  std::vector<float> row(d);
  std::vector<int> outliers;
  for (int b = 0; b < batch; ++b) {
    const int sink = hs.sink_lens[b], quantized = hs.quantized_lens[b], residual = hs.residual_lens[b];
    const int64_t pages = (quantized + kPageTokens - 1) / kPageTokens;
    for (int64_t p = 0; p < pages; ++p) hs.page_table[b * max_pages + p] = static_cast<int32_t>(first_page[b] + p);
    for (int h = 0; h < kKvHeads; ++h) {
      const PagedCodes& kc = shards[b]->key_codes(0, h);
      const PagedCodes& vc = shards[b]->value_codes(0, h);
      ASSERT_EQ(kc.pages(), pages);
      for (int64_t p = 0; p < pages; ++p) {
        const int64_t ph = (first_page[b] + p) * kKvHeads + h;
        std::copy(kc.page(p).begin(), kc.page(p).end(), hs.key_codes.begin() + ph * code_bytes);
        std::copy(vc.page(p).begin(), vc.page(p).end(), hs.value_codes.begin() + ph * code_bytes);
      }
      const int64_t stream = static_cast<int64_t>(b) * kKvHeads + h;
      for (int j = 0; j < sink + quantized + residual; ++j) {
        const float* kt = data[b].k.data() + (static_cast<int64_t>(j) * kKvHeads + h) * d;
        const float* vt = data[b].v.data() + (static_cast<int64_t>(j) * kKvHeads + h) * d;
        if (j < sink) {  // fp16 after RoPE, as the store keeps it
          std::vector<float> k(d);
          shards[b]->Dequantize(0, h, j, 1, k.data(), row.data());
          for (int c = 0; c < d; ++c) {
            hs.sink_k[(stream * kSink + j) * d + c] = FloatToHalf(k[c]);
            hs.sink_v[(stream * kSink + j) * d + c] = FloatToHalf(row[c]);
          }
          continue;
        }
        if (j >= sink + quantized) {  // fp16, keys pre-RoPE
          const int r = j - sink - quantized;
          for (int c = 0; c < d; ++c) {
            hs.residual_k[(stream * kResidual + r) * d + c] = FloatToHalf(kt[c]);
            hs.residual_v[(stream * kResidual + r) * d + c] = FloatToHalf(vt[c]);
          }
          continue;
        }
        const int t = j - sink;
        const int64_t ph = (first_page[b] + t / kPageTokens) * kKvHeads + h;
        const int64_t slot = ph * kPageTokens + t % kPageTokens;
        // Values: the codec's thresholds and outliers of the fp16-rounded row.
        for (int c = 0; c < d; ++c) row[c] = HalfToFloat(FloatToHalf(vt[c]));
        float lo, hi;
        KvqValueThresholds(row.data(), d, n_out, &lo, &hi, &outliers);
        hs.value_low[slot] = FloatToHalf(lo);
        hs.value_high[slot] = FloatToHalf(hi);
        for (int o = 0; o < n_out; ++o) {
          hs.value_outlier_channel[slot * n_out + o] = static_cast<uint8_t>(outliers[o]);
          hs.value_outlier_value[slot * n_out + o] = FloatToHalf(row[outliers[o]]);
        }
        // Keys: outside the calibrated per-channel thresholds, at most 255 per token.
        int count = 0;
        for (int c = 0; c < d; ++c) {
          const float x = HalfToFloat(FloatToHalf(kt[c]));
          const float klo = tables.key_low[h * d + c], khi = tables.key_high[h * d + c];
          if ((x < klo || x > khi) && count < kMaxKeyOutliersPerToken) {
            page_outliers[ph].push_back({static_cast<uint8_t>(c), FloatToHalf(x)});
            ++count;
          }
        }
        hs.key_outlier_count[slot] = static_cast<uint8_t>(count);
      }
    }
  }
  int64_t key_outliers = 0;
  for (int64_t ph = 0; ph < ph_count; ++ph) {
    hs.key_outlier_offset[ph] = static_cast<int64_t>(hs.key_outlier_channel.size());
    for (const auto& [c, v] : page_outliers[ph]) {
      hs.key_outlier_channel.push_back(c);
      hs.key_outlier_value.push_back(v);
      ++key_outliers;
    }
  }
  hs.key_outlier_channel.push_back(0);  // never empty
  hs.key_outlier_value.push_back(0);
  int64_t cpu_key_outliers = 0;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < kKvHeads; ++h) cpu_key_outliers += shards[b]->KeyOutliers(0, h);
  ASSERT_EQ(key_outliers, cpu_key_outliers) << "the rebuilt key outliers differ from the store's";

  auto d_key_codes = ToDevice(hs.key_codes);
  auto d_value_codes = ToDevice(hs.value_codes);
  auto d_value_low = ToDevice(hs.value_low);
  auto d_value_high = ToDevice(hs.value_high);
  auto d_voc = ToDevice(hs.value_outlier_channel);
  auto d_vov = ToDevice(hs.value_outlier_value);
  auto d_koc = ToDevice(hs.key_outlier_count);
  auto d_koo = ToDevice(hs.key_outlier_offset);
  auto d_kch = ToDevice(hs.key_outlier_channel);
  auto d_kval = ToDevice(hs.key_outlier_value);
  auto d_pt = ToDevice(hs.page_table);
  auto d_sink_k = ToDevice(hs.sink_k);
  auto d_sink_v = ToDevice(hs.sink_v);
  auto d_res_k = ToDevice(hs.residual_k);
  auto d_res_v = ToDevice(hs.residual_v);
  auto d_sink_lens = ToDevice(hs.sink_lens);
  auto d_q_lens = ToDevice(hs.quantized_lens);
  auto d_res_lens = ToDevice(hs.residual_lens);
  auto d_starts = ToDevice(hs.start_positions);
  std::vector<float> key_low(tables.key_low.begin(), tables.key_low.begin() + kKvHeads * d);
  std::vector<float> key_high(tables.key_high.begin(), tables.key_high.begin() + kKvHeads * d);
  auto d_key_low = ToDevice(key_low);
  auto d_key_high = ToDevice(key_high);
  auto d_kcb = ToDevice(tables.key_codebooks[bi]);
  auto d_vcb = ToDevice(tables.value_codebooks[bi]);
  auto d_inv_freq = ToDevice(inv_freq);
  auto d_rope_table = ToDevice(KvqRopeTable(inv_freq));
  auto d_q = ToDevice(q);
  DeviceBuffer<float> d_out(want_out.size()), d_lse(want_lse.size());
  DeviceBuffer<uint8_t> d_ws(KvqDecodeAttentionWorkspaceBytes(batch, g.n_heads, d));

  KvqDecodeAttentionArgs a;
  a.q = d_q.get();
  a.kv.bits = bits;
  a.kv.n_value_outliers = n_out;
  a.kv.key_codes = d_key_codes.get();
  a.kv.value_codes = d_value_codes.get();
  a.kv.value_low = d_value_low.get();
  a.kv.value_high = d_value_high.get();
  a.kv.value_outlier_channel = d_voc.get();
  a.kv.value_outlier_value = d_vov.get();
  a.kv.key_outlier_count = d_koc.get();
  a.kv.key_outlier_offset = d_koo.get();
  a.kv.key_outlier_channel = d_kch.get();
  a.kv.key_outlier_value = d_kval.get();
  a.kv.page_table = d_pt.get();
  a.kv.pages_per_request = max_pages;
  a.kv.sink_k = d_sink_k.get();
  a.kv.sink_v = d_sink_v.get();
  a.kv.max_sink = kSink;
  a.kv.residual_k = d_res_k.get();
  a.kv.residual_v = d_res_v.get();
  a.kv.max_residual = kResidual;
  a.kv.sink_lens = d_sink_lens.get();
  a.kv.quantized_lens = d_q_lens.get();
  a.kv.residual_lens = d_res_lens.get();
  a.kv.start_positions = d_starts.get();
  a.kv.key_low = d_key_low.get();
  a.kv.key_high = d_key_high.get();
  a.kv.key_codebook = d_kcb.get();
  a.kv.value_codebook = d_vcb.get();
  a.kv.inv_freq = d_inv_freq.get();
  a.kv.rope_table = d_rope_table.get();
  a.max_quantized_len = max_quantized;
  a.batch = batch;
  a.n_heads = g.n_heads;
  a.n_kv_heads = kKvHeads;
  a.head_dim = d;
  a.scale = g.scale();
  a.out = d_out.get();
  a.lse = d_lse.get();
  a.workspace = d_ws.get();
  a.workspace_bytes = static_cast<int64_t>(d_ws.size());
  a.max_splits = max_splits;
  d_out.Poison();
  d_lse.Poison();
  d_ws.Poison();
  const absl::Status status = KvqDecodeAttentionCuda(a, nullptr);
  KV_SKIP_IF_NOT_BUILT(status);
  ASSERT_TRUE(status.ok()) << status;
  KV_CUDA_OK(cudaDeviceSynchronize());
  std::printf("  kvq%d head_dim %d group %d batch %d: %d quantized split(s), %lld key outliers\n", bits, d, group, batch,
              KvqDecodeAttentionSplits(a), static_cast<long long>(key_outliers));
  const std::vector<float> got_out = d_out.Download(), got_lse = d_lse.Download();
  EXPECT_EQ(CountMismatches("out", got_out, want_out, 0.0, 1e-5, &atol_out), 0);
  EXPECT_EQ(CountMismatches("lse", got_lse, want_lse, 0.0, 1e-6, &atol_lse), 0);
  // How much of the bound the worst element uses (finite entries).
  const auto worst = [](const std::vector<float>& got, const std::vector<float>& want, const std::vector<double>& atol) {
    double w = 0.0;
    for (size_t i = 0; i < got.size(); ++i) {
      if (std::isfinite(want[i]) && std::isfinite(got[i])) w = std::max(w, std::fabs(got[i] - want[i]) / atol[i]);
    }
    return w;
  };
  std::printf("  worst error / bound: out %.3g, lse %.3g\n", worst(got_out, want_out, atol_out),
              worst(got_lse, want_lse, atol_lse));
}

class KvqDecodeTest : public ::testing::TestWithParam<Param> {};
TEST_P(KvqDecodeTest, MatchesTheCpuShard) { CheckKvqDecode(GetParam(), /*one_value_channel=*/false); }

class KvqDecodeOneValueChannelTest : public ::testing::TestWithParam<Param> {};
TEST_P(KvqDecodeOneValueChannelTest, MatchesTheCpuShard) { CheckKvqDecode(GetParam(), /*one_value_channel=*/true); }
INSTANTIATE_TEST_SUITE_P(Kvq3, KvqDecodeOneValueChannelTest,
                         ::testing::Values(Param{128, 4, {3000}, 0, 0, 3}, Param{64, 3, {2500}, 0, 3, 3},
                                           Param{128, 4, {0, 37, 300, 1000}, 0, 0, 3}));

INSTANTIATE_TEST_SUITE_P(
    Kvq3Sizes, KvqDecodeTest,
    ::testing::Values(
        // kv_len 1 (only the sink), only the sink, 37 (sink, one quantized token, the residual), ending
        // inside the residual window, an empty shard, a shard past the sink (start 5000), page edges.
        Param{128, 4, {1}, 0, 0, 3}, Param{128, 4, {4}, 0, 0, 3}, Param{128, 4, {37}, 0, 0, 3},
        Param{128, 4, {20}, 0, 0, 3}, Param{128, 4, {0}, 0, 0, 3}, Param{64, 3, {37}, 5000, 0, 3},
        Param{64, 3, {1}, 0, 0, 3}, Param{64, 3, {0}, 0, 0, 3}, Param{64, 3, {4 + 128 + 32}, 0, 0, 3},
        Param{128, 4, {4 + 129 + 32}, 0, 0, 3}, Param{128, 4, {3000}, 0, 0, 3}, Param{128, 4, {3000}, 9000, 1, 3},
        Param{64, 3, {2500}, 0, 3, 3}, Param{64, 6, {700}, 0, 0, 3},
        // Mixed batches of different lengths (empty, sink only, residual only, several pages).
        Param{128, 4, {0, 1, 37, 300, 1000, 4099, 20, 2}, 0, 0, 3},
        Param{64, 3, {4099, 0, 37, 129, 1}, 123456, 0, 3}));

// kvq2 and kvq4 keep the fp32 path (builds with only kvq3 kernels skip these).
INSTANTIATE_TEST_SUITE_P(
    OtherWidths, KvqDecodeTest,
    ::testing::Values(Param{128, 4, {1}, 0, 0, 2}, Param{128, 4, {37}, 0, 0, 4}, Param{64, 3, {0}, 0, 0, 2},
                      Param{64, 3, {2500}, 0, 3, 2}, Param{64, 3, {2500}, 0, 3, 4},
                      Param{128, 4, {3000}, 9000, 1, 4}, Param{128, 4, {0, 1, 37, 300, 1000, 4099, 20, 2}, 0, 0, 2},
                      Param{64, 6, {4099, 0, 37, 129, 1}, 123456, 0, 4}));

TEST(KvqDecodeErrors, RejectsBadArguments) {
  KvqDecodeAttentionArgs a;
  a.batch = 1;
  a.n_heads = 4;
  a.n_kv_heads = 3;
  a.head_dim = 128;
  EXPECT_EQ(KvqDecodeAttentionCuda(a, nullptr).code(), absl::StatusCode::kInvalidArgument);  // heads
  a.n_kv_heads = 1;
  EXPECT_EQ(KvqDecodeAttentionCuda(a, nullptr).code(), absl::StatusCode::kInvalidArgument);  // null
  a.batch = 0;
  a.head_dim = 96;
  EXPECT_EQ(KvqDecodeAttentionCuda(a, nullptr).code(), absl::StatusCode::kInvalidArgument);  // head_dim
  a.head_dim = 128;
  a.kv.bits = 5;
  EXPECT_EQ(KvqDecodeAttentionCuda(a, nullptr).code(), absl::StatusCode::kInvalidArgument);  // bits
  a.kv.bits = 3;
  a.q_row_stride = 4 * 128 - 1;  // rows would overlap
  EXPECT_EQ(KvqDecodeAttentionCuda(a, nullptr).code(), absl::StatusCode::kInvalidArgument);  // q_row_stride
}

}  // namespace
}  // namespace kvshard
