// DeviceKvStore against its CPU twin (MakeKvShard of the same scheme, geometry, calibration and start
// position) after identical appends: prefill chunks of odd sizes, decode steps across the residual/flush
// and page boundaries, several sequences of different lengths in one AttendRows batch (with a row not
// held here and a sequence of sink tokens only), start positions past the sink, Seal; kvq code pages
// byte for byte, partials within bounds, Memory() equal; the pool's admission; SyntheticFill.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kernels/cuda/synthetic_kv.h"
#include "absl/strings/str_split.h"
#include "kvstore/kv_codecs.h"
#include "kvstore/kv_scheme.h"
#include "kvstore/quantized_shard.h"
#include "tests/kv_test_util.h"
#include "worker/cuda/device_kv_store.h"
#include "worker/synthetic.h"

namespace kvshard {
namespace {

using testing::CountMismatches;
using testing::DeviceBuffer;
using testing::ToDevice;

constexpr int kLayers = 2;
constexpr int kKvHeads = 2;

// Per (row, head) bounds from the stored K/V the row sees: scores move by at most
// E = scale * max_t sum_c |q_c k_tc| * rel, so lse by E and the output (a convex combination whose
// weights change by a factor within exp(+-2E)) by 2E max|v|; `value_rel` adds a relative rounding of the
// values (fp16 P or V in the prefill kernel). `key_range` (per KV head and channel, optional) adds
// |mid| + |half-range| of kvq's calibrated key thresholds to |k|: the kvq3 decode kernel dequantizes keys in
// fp16 from those (kvq_attention_kernels_test).
struct Bounds {
  std::vector<double> out, lse;
};
void AddBounds(const KvGeometry& g, const float* q, int rows, const std::vector<std::vector<float>>& k,
               const std::vector<std::vector<float>>& v, int64_t n_keys, double rel, double value_rel, Bounds* b,
               const std::vector<std::vector<double>>* key_range = nullptr) {
  const int d = g.head_dim, group = g.n_heads / g.n_kv_heads;
  for (int r = 0; r < rows; ++r) {
    for (int head = 0; head < g.n_heads; ++head) {
      const int h = head / group;
      const float* qh = q + (static_cast<size_t>(r) * g.n_heads + head) * d;
      double max_dot = 0.0, max_v = 0.0;
      for (int64_t t = 0; t < n_keys; ++t) {
        double dot = 0.0;
        for (int c = 0; c < d; ++c) {
          dot += std::fabs(static_cast<double>(qh[c])) *
                 (std::fabs(static_cast<double>(k[h][t * d + c])) + (key_range ? (*key_range)[h][c] : 0.0));
        }
        max_dot = std::max(max_dot, dot);
        for (int c = 0; c < d; ++c) max_v = std::max(max_v, std::fabs(static_cast<double>(v[h][t * d + c])));
      }
      const double e = g.scale() * max_dot * rel;
      b->lse.push_back(e + 1e-5);
      for (int c = 0; c < d; ++c) b->out.push_back(2 * e * max_v + value_rel * max_v + 1e-5);
    }
  }
}

// K after RoPE and V of a quantized CPU shard's layer, per KV head. (fp16 bounds use the appended
// pre-RoPE keys: RoPE rotates pairs, so sum_c |q_c k_c| changes by at most a factor sqrt(2), within the
// margins below.)
void StoredKv(const KvShard& shard, int layer, std::vector<std::vector<float>>* k, std::vector<std::vector<float>>* v) {
  const KvGeometry& g = shard.geometry();
  const int64_t n = shard.length(layer);
  k->assign(g.n_kv_heads, std::vector<float>(n * g.head_dim));
  v->assign(g.n_kv_heads, std::vector<float>(n * g.head_dim));
  const auto* qs = dynamic_cast<const QuantizedKvShard*>(&shard);
  ASSERT_NE(qs, nullptr);
  for (int h = 0; h < g.n_kv_heads; ++h) qs->Dequantize(layer, h, 0, n, (*k)[h].data(), (*v)[h].data());
}

struct Case {
  std::string scheme;
  int head_dim;
  int group;
  int64_t tile;
  // > 0: kvq key outlier room per page (DeviceKvStoreOptions::key_outlier_capacity), small enough that
  // every page's outliers spill into the room of the sequence's later pages; the sequences then reserve
  // 3x the tokens so their pages together hold them.
  int outlier_segment = 0;
  bool packed_prefill = false;  // kvq3 chunks read the packed pages (DeviceKvStoreOptions::prefill_reads_packed)
  // kvq: key thresholds narrowed to a tenth of the calibrated range, so most keys are outliers: pages with
  // more than the dequantize kernel stages in shared memory (2048), whose outliers it reads per item.
  bool mostly_key_outliers = false;
};

class DeviceKvStoreTest : public ::testing::TestWithParam<Case> {};

// One sequence on both sides.
struct Twin {
  int64_t id;
  int64_t start;
  std::unique_ptr<KvShard> cpu;
  std::vector<std::vector<float>> k_in, v_in;  // per layer, every appended token, pre-RoPE (fp16 bounds)
};

TEST_P(DeviceKvStoreTest, MatchesTheCpuShard) {
  KV_SKIP_WITHOUT_GPU();
  const Case c = GetParam();
  const int d = c.head_dim;
  const KvGeometry g = testing::SmallGeometry(d, kLayers, kKvHeads * c.group, kKvHeads);
  Calibration cal = testing::MakeSyntheticCalibration(g, 512);
  if (c.mostly_key_outliers) {
    for (LayerCalibration& layer : cal.layers)
      for (KvqLayerTables& tables : layer.kvq)
        for (size_t i = 0; i < tables.key_low.size(); ++i) {
          const float mid = (tables.key_low[i] + tables.key_high[i]) / 2, half = (tables.key_high[i] - tables.key_low[i]) / 2;
          tables.key_low[i] = mid - 0.1f * half;
          tables.key_high[i] = mid + 0.1f * half;
        }
  }
  auto config = ParseKvScheme(c.scheme == "fp16" ? "fp16" : c.scheme + ":sink=4,residual=32");
  ASSERT_TRUE(config.ok()) << config.status();
  const bool kvq = config->kind == KvSchemeKind::kKvq;
  const bool kvq3 = kvq && config->bits == 3;
  DeviceKvStoreOptions opt;
  opt.pool_bytes = int64_t{256} << 20;
  opt.max_sequences = 8;
  opt.max_rows = 8;
  opt.max_chunk = 320;
  opt.chunk_tile_tokens = c.tile;
  opt.fill_chunk = 256;
  opt.key_outlier_capacity = c.mostly_key_outliers ? kPageTokens * d : c.outlier_segment;
  opt.prefill_reads_packed = c.packed_prefill;
  auto made = DeviceKvStore::Create(g, *config, &cal, opt);
  ASSERT_TRUE(made.ok()) << made.status();
  DeviceKvStore& store = **made;
  cudaStream_t stream = nullptr;
  const int64_t reserve = c.outlier_segment > 0 ? 3 : 1;

  std::map<int64_t, Twin> twins;
  auto add = [&](int64_t id, int64_t start, int64_t capacity) {
    ASSERT_TRUE(store.AddSequence(id, start, capacity).ok());
    auto cpu = MakeKvShard(*config, g, start, &cal);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    Twin t{id, start, std::move(*cpu), std::vector<std::vector<float>>(kLayers), std::vector<std::vector<float>>(kLayers)};
    twins.emplace(id, std::move(t));
  };
  add(1, 0, 1200 * reserve);
  add(2, 2, 700 * reserve);     // sink of 2 tokens (positions 2, 3)
  add(3, 0, 100);               // sink tokens only
  add(7, 1000, 600 * reserve);  // past the sink
  EXPECT_EQ(store.AddSequence(1, 0, 10).code(), absl::StatusCode::kAlreadyExists);

  const int64_t row = static_cast<int64_t>(kKvHeads) * d;
  int seed = 1;
  bool skipped = false;
  // Appends n tokens to every layer of a sequence (GPU input with a padded row stride).
  auto append = [&](int64_t id, int n) {
    Twin& t = twins.at(id);
    for (int l = 0; l < kLayers; ++l) {
      const testing::SyntheticKv kv = testing::MakeSyntheticKv(g, l, n, 100 + seed++);
      ASSERT_TRUE(t.cpu->Append(l, n, kv.k.data(), kv.v.data()).ok());
      t.k_in[l].insert(t.k_in[l].end(), kv.k.begin(), kv.k.end());
      t.v_in[l].insert(t.v_in[l].end(), kv.v.begin(), kv.v.end());
      std::vector<float> kp(n * 2 * row, 0.0f), vp(kp.size(), 0.0f);
      for (int i = 0; i < n; ++i) {
        std::copy(kv.k.begin() + i * row, kv.k.begin() + (i + 1) * row, kp.begin() + i * 2 * row);
        std::copy(kv.v.begin() + i * row, kv.v.begin() + (i + 1) * row, vp.begin() + i * 2 * row);
      }
      auto dk = ToDevice(kp);
      auto dv = ToDevice(vp);
      const absl::Status s = store.Append(l, id, n, dk.get(), dv.get(), 2 * row, stream);
      if (!s.ok() && std::string(s.message()).find("not built") != std::string::npos) {
        skipped = true;
        return;
      }
      ASSERT_TRUE(s.ok()) << s;
      KV_CUDA_OK(cudaDeviceSynchronize());
    }
  };
  // Stored K (after RoPE) / V per KV head of a layer, for the bounds.
  auto stored = [&](const Twin& t, int l, std::vector<std::vector<float>>* k, std::vector<std::vector<float>>* v) {
    if (kvq) {
      StoredKv(*t.cpu, l, k, v);
      return;
    }
    const int64_t n = t.cpu->length(l);
    k->assign(kKvHeads, std::vector<float>(n * d));
    v->assign(kKvHeads, std::vector<float>(n * d));
    for (int64_t j = 0; j < n; ++j)
      for (int h = 0; h < kKvHeads; ++h)
        for (int ch = 0; ch < d; ++ch) {
          (*k)[h][j * d + ch] = t.k_in[l][j * row + h * d + ch];
          (*v)[h][j * d + ch] = t.v_in[l][j * row + h * d + ch];
        }
  };
  // Chunk partials of the last n tokens' positions of a sequence (after their append).
  auto check_chunk = [&](int64_t id, int n, const std::string& what) {
    Twin& t = twins.at(id);
    for (int l = 0; l < kLayers; ++l) {
      const int64_t first = t.start + t.cpu->length(l) - n;
      const std::vector<float> q = testing::MakeQueries(g, n, 500 + seed++);
      std::vector<int64_t> positions(n);
      for (int i = 0; i < n; ++i) positions[i] = first + i;
      std::vector<float> want_out(q.size()), want_lse(static_cast<size_t>(n) * g.n_heads);
      ASSERT_TRUE(t.cpu->Attend(l, n, q.data(), positions.data(), want_out.data(), want_lse.data()).ok());
      auto dq = ToDevice(q);
      DeviceBuffer<float> out(q.size()), lse(want_lse.size());
      out.Poison();
      lse.Poison();
      ASSERT_TRUE(store.AttendChunk(l, id, n, dq.get(), g.n_heads * d, first, out.get(), lse.get(), stream).ok());
      KV_CUDA_OK(cudaDeviceSynchronize());
      // fp16 queries and keys (2 roundings of 2^-11 relative, one more for the rotation of dequantized
      // keys) and fp16 probabilities/values in the tensor-core products. kvq3 over its packed pages
      // dequantizes and rotates keys in fp16, as its decode kernel does: the decode bound below.
      std::vector<std::vector<float>> k, v;
      stored(t, l, &k, &v);
      Bounds b;
      if (kvq3 && c.packed_prefill) {
        const std::vector<std::vector<double>> range =
            testing::KvqKeyRange(cal.layers[l].kvq[*cal.FractionIndex(config->outlier_fraction)], kKvHeads, d);
        AddBounds(g, q.data(), n, k, v, t.cpu->length(l), 6e-3, 4e-3, &b, &range);
      } else {
        AddBounds(g, q.data(), n, k, v, t.cpu->length(l), 2e-3, 2e-3, &b);
      }
      EXPECT_EQ(CountMismatches(what + " chunk out", out.Download(), want_out, 0, 1e-4, &b.out), 0);
      EXPECT_EQ(CountMismatches(what + " chunk lse", lse.Download(), want_lse, 0, 1e-5, &b.lse), 0);
    }
  };
  // Decode partials of a batch of rows (ids < 0: not held), q rows with a padded stride.
  auto check_rows = [&](const std::vector<int64_t>& ids, const std::string& what) {
    const int rows = static_cast<int>(ids.size());
    const int64_t qs = static_cast<int64_t>(g.n_heads) * d + 32;
    for (int l = 0; l < kLayers; ++l) {
      const std::vector<float> q = testing::MakeQueries(g, rows, 900 + seed++);
      std::vector<float> qp(rows * qs, 0.0f);
      for (int r = 0; r < rows; ++r)
        std::copy(q.begin() + r * g.n_heads * d, q.begin() + (r + 1) * g.n_heads * d, qp.begin() + r * qs);
      std::vector<float> want_out(q.size(), 0.0f), want_lse(static_cast<size_t>(rows) * g.n_heads,
                                                            -std::numeric_limits<float>::infinity());
      Bounds b;
      for (int r = 0; r < rows; ++r) {
        const size_t o = static_cast<size_t>(r) * g.n_heads;
        if (ids[r] < 0) {
          b.lse.insert(b.lse.end(), g.n_heads, 0.0);
          b.out.insert(b.out.end(), static_cast<size_t>(g.n_heads) * d, 0.0);
          continue;
        }
        const Twin& t = twins.at(ids[r]);
        const int64_t pos = t.start + t.cpu->length(l);
        ASSERT_TRUE(t.cpu->Attend(l, 1, q.data() + o * d, &pos, want_out.data() + o * d, want_lse.data() + o).ok());
        std::vector<std::vector<float>> k, v;
        stored(t, l, &k, &v);
        if (kvq3) {  // fp16 operands on tensor cores (kvq_attention_kernels_test's bound, doubled)
          const std::vector<std::vector<double>> range =
              testing::KvqKeyRange(cal.layers[l].kvq[*cal.FractionIndex(config->outlier_fraction)], kKvHeads, d);
          AddBounds(g, q.data() + o * d, 1, k, v, t.cpu->length(l), 6e-3, 4e-3, &b, &range);
        } else {  // the fused kernel's fp32 roundings (kvq_attention_kernels_test's bound, doubled)
          AddBounds(g, q.data() + o * d, 1, k, v, t.cpu->length(l), 4e-5, 0.0, &b);
        }
      }
      auto dq = ToDevice(qp);
      DeviceBuffer<float> out(q.size()), lse(want_lse.size());
      out.Poison();
      lse.Poison();
      ASSERT_TRUE(store.AttendRows(l, ids, dq.get(), qs, out.get(), lse.get(), stream).ok());
      KV_CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(CountMismatches(what + " rows out L" + std::to_string(l), out.Download(), want_out, 0, 1e-5, &b.out), 0);
      EXPECT_EQ(CountMismatches(what + " rows lse L" + std::to_string(l), lse.Download(), want_lse, 0, 1e-5, &b.lse), 0);
    }
  };
  auto check_pages = [&](const std::string& what) {
    if (!kvq) return;
    for (auto& [id, t] : twins) {
      const auto* qs = dynamic_cast<const QuantizedKvShard*>(t.cpu.get());
      for (int l = 0; l < kLayers; ++l)
        for (int h = 0; h < kKvHeads; ++h)
          for (KvPart part : {KvPart::kKey, KvPart::kValue}) {
            const PagedCodes& codes = part == KvPart::kKey ? qs->key_codes(l, h) : qs->value_codes(l, h);
            for (int64_t p = 0; p < codes.pages(); ++p) {
              auto got = store.CodePage(id, l, h, p, part);
              ASSERT_TRUE(got.ok()) << got.status();
              EXPECT_TRUE(*got == codes.page(p)) << what << ": code page " << p << " of sequence " << id << " layer " << l
                                                 << " head " << h << (part == KvPart::kKey ? " keys" : " values");
            }
          }
    }
  };
  auto check_memory = [&](const std::string& what) {
    KvMemory total;
    for (auto& [id, t] : twins) {
      const KvMemory want = t.cpu->Memory(), got = store.Memory(id);
      EXPECT_EQ(got.bytes, want.bytes) << what << " sequence " << id;
      EXPECT_EQ(got.elements, want.elements) << what << " sequence " << id;
      total.bytes += want.bytes;
    }
    EXPECT_EQ(store.Memory().bytes, total.bytes) << what;
  };

  // Prefill of sequence 1 in odd chunks, each attended after its append.
  for (int n : {1, 37, 129, 300}) {
    append(1, n);
    if (skipped) GTEST_SKIP() << c.scheme << " is not built";
    check_chunk(1, n, "seq1 chunk " + std::to_string(n));
  }
  append(2, 300);
  check_chunk(2, 300, "seq2");
  append(3, 3);
  check_chunk(3, 3, "seq3 (sink only)");
  append(7, 129);
  check_chunk(7, 129, "seq7 (start 1000)");
  check_pages("after prefill");
  check_memory("after prefill");
  check_rows({1, -1, 2, 3, 7}, "after prefill");

  // Decode: one token per step to sequences 1, 2 and 7 (row -1 skipped), every layer append then attend.
  const std::vector<int64_t> append_ids = {1, -1, 2, 7};
  for (int step = 0; step < 140; ++step) {
    for (int l = 0; l < kLayers; ++l) {
      const testing::SyntheticKv kv = testing::MakeSyntheticKv(g, l, 4, 3000 + step);
      for (int r = 0; r < 4; ++r) {
        if (append_ids[r] < 0) continue;
        Twin& t = twins.at(append_ids[r]);
        ASSERT_TRUE(t.cpu->Append(l, 1, kv.k.data() + r * row, kv.v.data() + r * row).ok());
        t.k_in[l].insert(t.k_in[l].end(), kv.k.begin() + r * row, kv.k.begin() + (r + 1) * row);
        t.v_in[l].insert(t.v_in[l].end(), kv.v.begin() + r * row, kv.v.begin() + (r + 1) * row);
      }
      auto dk = ToDevice(kv.k);
      auto dv = ToDevice(kv.v);
      ASSERT_TRUE(store.AppendRows(l, append_ids, dk.get(), dv.get(), row, stream).ok());
      KV_CUDA_OK(cudaDeviceSynchronize());
    }
    if (step % 7 == 0 || step == 139) check_rows({1, -1, 2, 3, 7}, "decode step " + std::to_string(step));
  }
  for (int l = 0; l < kLayers; ++l) EXPECT_EQ(store.length(1, l), 467 + 140);
  check_pages("after decode");
  check_memory("after decode");
  check_chunk(1, 64, "seq1 after decode");

  // Seal sequence 2: its residual is quantized; appends are refused.
  ASSERT_TRUE(store.Seal(2, stream).ok());
  twins.at(2).cpu->Seal();
  KV_CUDA_OK(cudaDeviceSynchronize());
  check_pages("after seal");
  check_memory("after seal");
  check_rows({2, 1, -1}, "after seal");
  check_chunk(2, 100, "seq2 after seal");
  for (auto& [id, t] : twins) EXPECT_TRUE(store.Health(id).ok()) << store.Health(id);
  if (c.mostly_key_outliers) {  // pages beyond the dequantize kernel's staged outliers
    const auto* qs = dynamic_cast<const QuantizedKvShard*>(twins.at(1).cpu.get());
    EXPECT_GT(qs->KeyOutliers(0, 0), 2048 * qs->key_codes(0, 0).pages());
  }
  if (c.outlier_segment > 0) {  // the pages' outliers did run past their own room
    const auto* qs = dynamic_cast<const QuantizedKvShard*>(twins.at(1).cpu.get());
    const int64_t quantized_pages = qs->key_codes(0, 0).pages();
    EXPECT_GT(qs->KeyOutliers(0, 0), c.outlier_segment * quantized_pages);
  }
  float* none = nullptr;
  EXPECT_EQ(store.Append(0, 2, 0, none, none, row, stream).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store.Append(0, 3, 200, none, none, row, stream).code(), absl::StatusCode::kOutOfRange);
  store.RemoveSequence(7);
  EXPECT_FALSE(store.Contains(7));
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return info.param.scheme + "_d" + std::to_string(info.param.head_dim) + "_g" + std::to_string(info.param.group) +
         "_tile" + std::to_string(info.param.tile) +
         (info.param.outlier_segment > 0 ? "_segment" + std::to_string(info.param.outlier_segment) : "") +
         (info.param.packed_prefill ? "_packed" : "") + (info.param.mostly_key_outliers ? "_outliers" : "");
}

INSTANTIATE_TEST_SUITE_P(Schemes, DeviceKvStoreTest,
                         ::testing::Values(Case{"kvq3", 64, 4, 32768}, Case{"kvq3", 128, 4, 128},
                                           Case{"kvq3", 128, 3, 64}, Case{"kvq2", 64, 4, 192},
                                           Case{"kvq4", 128, 4, 32768}, Case{"kvq3", 64, 4, 32768, 32},
                                           Case{"kvq3", 128, 3, 128, 64}, Case{"kvq3", 64, 4, 32768, 0, true},
                                           Case{"kvq3", 128, 4, 32768, 0, true}, Case{"kvq3", 128, 3, 32768, 64, true},
                                           Case{"kvq3", 64, 4, 32768, 0, false, true},
                                           Case{"kvq3", 128, 3, 128, 0, false, true},
                                           Case{"kvq3", 128, 4, 32768, 0, true, true},
                                           Case{"fp16", 64, 4, 32768},
                                           Case{"fp16", 128, 3, 32768}),
                         CaseName);

// kvq3 (a 4-token sink, a 32-token residual) over a head_dim-64 geometry and its synthetic calibration.
struct SmallKvq3 {
  KvGeometry g;
  Calibration cal;
  absl::StatusOr<KvSchemeConfig> config;
};
SmallKvq3 MakeSmallKvq3(int n_layers, int n_heads) {
  const KvGeometry g = testing::SmallGeometry(64, n_layers, n_heads, kKvHeads);
  return {g, testing::MakeSyntheticCalibration(g, 512), ParseKvScheme("kvq3:sink=4,residual=32")};
}

TEST(DeviceKvStoreAdmissionTest, RefusesWhenThePoolIsFull) {
  KV_SKIP_WITHOUT_GPU();
  const auto [g, cal, config] = MakeSmallKvq3(kLayers, 8);
  ASSERT_TRUE(config.ok());
  DeviceKvStoreOptions opt;
  opt.pool_bytes = int64_t{4} << 20;
  opt.max_sequences = 3;
  opt.max_chunk = 64;
  opt.fill_chunk = 64;
  auto made = DeviceKvStore::Create(g, *config, &cal, opt);
  ASSERT_TRUE(made.ok()) << made.status();
  DeviceKvStore& store = **made;
  const int64_t free0 = store.FreeTokens();
  ASSERT_GT(free0, 128);
  const absl::Status too_big = store.AddSequence(1, 0, free0 + 1);
  EXPECT_EQ(too_big.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(too_big.message()).find(std::to_string(free0)), std::string::npos) << too_big;
  ASSERT_TRUE(store.AddSequence(1, 0, free0).ok());
  EXPECT_EQ(store.FreeTokens(), 4);  // no page left: only a sink fits
  EXPECT_EQ(store.AddSequence(2, 0, 200).code(), absl::StatusCode::kResourceExhausted);
  store.RemoveSequence(1);
  EXPECT_EQ(store.FreeTokens(), free0);
  ASSERT_TRUE(store.AddSequence(2, 0, 10).ok());
  ASSERT_TRUE(store.AddSequence(3, 0, 10).ok());
  ASSERT_TRUE(store.AddSequence(4, 0, 10).ok());
  EXPECT_EQ(store.AddSequence(5, 0, 10).code(), absl::StatusCode::kResourceExhausted);  // max_sequences
  EXPECT_EQ(DeviceKvStore::Create(g, *ParseKvScheme("int4"), &cal, opt).status().code(),
            absl::StatusCode::kUnimplemented);
}

// A pool sized by tokens (single-process mode) holds exactly one sequence of that many tokens; one beyond
// the GPU's memory is refused with the bytes, not left to fail in cudaMalloc.
TEST(DeviceKvStoreAdmissionTest, PoolSizedByTokens) {
  KV_SKIP_WITHOUT_GPU();
  const auto [g, cal, config] = MakeSmallKvq3(kLayers, 8);
  ASSERT_TRUE(config.ok());
  DeviceKvStoreOptions opt;
  opt.max_sequences = 1;
  opt.max_chunk = 64;
  opt.fill_chunk = 64;
  for (const int64_t tokens : {int64_t{1}, int64_t{37}, int64_t{1000}}) {
    opt.pool_tokens = tokens;
    auto made = DeviceKvStore::Create(g, *config, &cal, opt);
    ASSERT_TRUE(made.ok()) << made.status();
    EXPECT_GE((*made)->FreeTokens(), tokens);
    EXPECT_LT((*made)->FreeTokens(), tokens + 4 + 128);  // the sink plus at most one page of slack
    EXPECT_TRUE((*made)->AddSequence(0, 0, tokens).ok());
  }
  opt.pool_tokens = int64_t{1} << 40;
  auto huge = DeviceKvStore::Create(g, *config, &cal, opt);
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(huge.status().message()).find("GiB are free"), std::string::npos) << huge.status();
}

// The overflowing sequence fails alone: the other sequence goes on, and a new one in its slot starts clean.
TEST(DeviceKvStoreAdmissionTest, KeyOutlierOverflowFailsClearly) {
  KV_SKIP_WITHOUT_GPU();
  const auto [g, cal, config] = MakeSmallKvq3(1, 4);
  ASSERT_TRUE(config.ok());
  DeviceKvStoreOptions opt;
  opt.pool_bytes = int64_t{8} << 20;
  opt.max_sequences = 2;
  opt.max_chunk = 256;
  opt.fill_chunk = 256;
  opt.key_outlier_capacity = 16;  // a page of 128 tokens brings ~100; sequence 1's 3 pages hold 48
  auto made = DeviceKvStore::Create(g, *config, &cal, opt);
  ASSERT_TRUE(made.ok()) << made.status();
  DeviceKvStore& store = **made;
  ASSERT_TRUE(store.AddSequence(1, 0, 300).ok());
  ASSERT_TRUE(store.AddSequence(2, 0, 100).ok());
  const testing::SyntheticKv kv = testing::MakeSyntheticKv(g, 0, 256, 4);
  auto dk = ToDevice(kv.k);
  auto dv = ToDevice(kv.v);
  ASSERT_TRUE(store.Append(0, 2, 20, dk.get(), dv.get(), kKvHeads * 64, nullptr).ok());  // sink and residual only
  ASSERT_TRUE(store.Append(0, 1, 256, dk.get(), dv.get(), kKvHeads * 64, nullptr).ok());
  KV_CUDA_OK(cudaDeviceSynchronize());
  const absl::Status next = store.Append(0, 1, 1, dk.get(), dv.get(), kKvHeads * 64, nullptr);
  EXPECT_EQ(next.code(), absl::StatusCode::kResourceExhausted) << next;
  EXPECT_NE(std::string(next.message()).find("outlier"), std::string::npos) << next;
  EXPECT_NE(std::string(next.message()).find("sequence 1"), std::string::npos) << next;
  EXPECT_EQ(store.Health(1).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(store.Health(2).ok()) << store.Health(2);
  EXPECT_EQ(store.Health(7).code(), absl::StatusCode::kNotFound);

  std::vector<float> q(2 * 4 * 64, 0.5f);
  auto dq = ToDevice(q);
  DeviceBuffer<float> out(q.size()), lse(2 * 4);
  const std::vector<int64_t> both = {1, 2}, other = {-1, 2};
  EXPECT_EQ(store.AttendRows(0, both, dq.get(), 4 * 64, out.get(), lse.get(), nullptr).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(store.AttendRows(0, other, dq.get(), 4 * 64, out.get(), lse.get(), nullptr).ok());
  EXPECT_TRUE(store.AppendRows(0, other, dk.get(), dv.get(), kKvHeads * 64, nullptr).ok());
  EXPECT_TRUE(store.Append(0, 2, 1, dk.get(), dv.get(), kKvHeads * 64, nullptr).ok());
  KV_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(store.length(2, 0), 22);

  store.RemoveSequence(1);
  ASSERT_TRUE(store.AddSequence(3, 0, 100).ok());  // the freed slot
  EXPECT_TRUE(store.Health(3).ok()) << store.Health(3);
  EXPECT_TRUE(store.Append(0, 3, 20, dk.get(), dv.get(), kKvHeads * 64, nullptr).ok());
}

// A kvq3 calibration (outlier fraction 0.01) from worker/synthetic.h's generator with seed 5 at positions
// far from the ones a test fills. Fills must use seed 5 too: the seed sets the per-channel offsets and
// scales, so another seed's keys are mostly outliers to these thresholds.
Calibration GeneratorCalibration(const KvGeometry& g, int64_t n_cal) {
  CalibrationBuilder builder(testing::IdentityFor(g), n_cal, {0.01}, {3});
  const int64_t n = n_cal * g.n_kv_heads * g.head_dim;
  std::vector<std::vector<float>> k(g.n_layers, std::vector<float>(n)), v(g.n_layers, std::vector<float>(n));
  for (int l = 0; l < g.n_layers; ++l) {
    SyntheticKvTokens(g, l, int64_t{1} << 40, n_cal, 5, k[l].data(), v[l].data());
    EXPECT_TRUE(builder.ObserveThresholds(l, static_cast<int>(n_cal), k[l].data(), v[l].data()).ok());
  }
  EXPECT_TRUE(builder.FinishThresholds().ok());
  for (int l = 0; l < g.n_layers; ++l) {
    EXPECT_TRUE(builder.ObserveSamples(l, static_cast<int>(n_cal), k[l].data(), v[l].data(), nullptr, nullptr).ok());
  }
  auto built = builder.Finish("uniform");
  EXPECT_TRUE(built.ok()) << built.status();
  return *built;
}

TEST(DeviceKvStoreSyntheticTest, GeneratorIsTheCpuOne) {
  KV_SKIP_WITHOUT_GPU();
  const KvGeometry g = testing::SmallGeometry(128, kLayers, 8, kKvHeads);
  const int64_t n = 300, begin = 12345;
  std::vector<float> k(n * kKvHeads * 128), v(k.size());
  SyntheticKvTokens(g, 1, begin, n, 77, k.data(), v.data());
  DeviceBuffer<float> dk(k.size()), dv(v.size());
  ASSERT_TRUE(SyntheticKvTokensCuda(kKvHeads, 128, 1, begin, n, 77, dk.get(), dv.get(), nullptr).ok());
  EXPECT_EQ(CountMismatches("synthetic k", dk.Download(), k, 0, 0), 0);
  EXPECT_EQ(CountMismatches("synthetic v", dv.Download(), v, 0, 0), 0);
  // Statistics the quantizers care about: values near N(0, 0.25) apart from spikes, keys wider.
  double sv = 0, sv2 = 0;
  for (float x : v) {
    sv += x;
    sv2 += static_cast<double>(x) * x;
  }
  const double mean = sv / v.size(), var = sv2 / v.size() - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.02);
  EXPECT_GT(var, 0.2);
  EXPECT_LT(var, 0.5);
}

TEST(DeviceKvStoreSyntheticTest, FillStoresWhatTheCpuFillStores) {
  KV_SKIP_WITHOUT_GPU();
  const KvGeometry g = testing::SmallGeometry(128, kLayers, 8, kKvHeads);
  // A calibration from the fill's own generator (other positions), so the outliers are at the
  // calibrated fraction as with real data and a real calibration.
  const Calibration cal = GeneratorCalibration(g, 1024);
  auto config = ParseKvScheme("kvq3:sink=4,residual=32");
  ASSERT_TRUE(config.ok());
  DeviceKvStoreOptions opt;
  opt.pool_bytes = int64_t{256} << 20;
  opt.max_sequences = 4;
  opt.max_chunk = 128;
  opt.fill_chunk = 1000;  // not a multiple of the word group or page
  opt.chunk_tile_tokens = 2048;
  auto made = DeviceKvStore::Create(g, *config, &cal, opt);
  ASSERT_TRUE(made.ok()) << made.status();
  DeviceKvStore& store = **made;
  const int64_t start = 2, end = 2 + 4321;
  ASSERT_TRUE(store.AddSequence(9, start, 5000).ok());
  ASSERT_TRUE(store.SyntheticFill(9, end, 5, nullptr).ok());
  for (int l = 0; l < kLayers; ++l) EXPECT_EQ(store.length(9, l), end - start);
  auto cpu = QuantizedKvShard::Create(*config, g, start, &cal);
  ASSERT_TRUE(cpu.ok());
  ASSERT_TRUE(SyntheticFill(**cpu, start, end, 5).ok());
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h)
      for (int64_t p : {int64_t{0}, int64_t{17}, (*cpu)->key_codes(l, h).pages() - 1}) {
        auto key = store.CodePage(9, l, h, p, KvPart::kKey);
        auto value = store.CodePage(9, l, h, p, KvPart::kValue);
        ASSERT_TRUE(key.ok() && value.ok());
        EXPECT_TRUE(*key == (*cpu)->key_codes(l, h).page(p)) << "key page " << p;
        EXPECT_TRUE(*value == (*cpu)->value_codes(l, h).page(p)) << "value page " << p;
      }
  EXPECT_EQ(store.Memory(9).bytes, (*cpu)->Memory().bytes);
  // Attention over the filled sequence runs and agrees (decode and a chunk over two tiles).
  const std::vector<float> q = testing::MakeQueries(g, 1, 3);
  const int64_t pos = end;
  std::vector<float> want_out(q.size()), want_lse(g.n_heads);
  ASSERT_TRUE((*cpu)->Attend(1, 1, q.data(), &pos, want_out.data(), want_lse.data()).ok());
  auto dq = ToDevice(q);
  DeviceBuffer<float> out(q.size()), lse(g.n_heads);
  const std::vector<int64_t> ids = {9};
  ASSERT_TRUE(store.AttendRows(1, ids, dq.get(), g.n_heads * 128, out.get(), lse.get(), nullptr).ok());
  KV_CUDA_OK(cudaDeviceSynchronize());
  std::vector<std::vector<float>> k, v;
  StoredKv(**cpu, 1, &k, &v);
  Bounds rows_bounds, chunk_bounds;
  AddBounds(g, q.data(), 1, k, v, end - start, 4e-5, 0.0, &rows_bounds);
  AddBounds(g, q.data(), 1, k, v, end - start, 2e-3, 2e-3, &chunk_bounds);
  EXPECT_EQ(CountMismatches("filled rows out", out.Download(), want_out, 0, 1e-5, &rows_bounds.out), 0);
  EXPECT_EQ(CountMismatches("filled rows lse", lse.Download(), want_lse, 0, 1e-5, &rows_bounds.lse), 0);
  ASSERT_TRUE(store.AttendChunk(1, 9, 1, dq.get(), g.n_heads * 128, end - 1, out.get(), lse.get(), nullptr).ok());
  KV_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(CountMismatches("filled chunk out", out.Download(), want_out, 0, 1e-4, &chunk_bounds.out), 0);
  EXPECT_EQ(CountMismatches("filled chunk lse", lse.Download(), want_lse, 0, 1e-5, &chunk_bounds.lse), 0);
}

// Timings at a long context (Llama-3-8B's KV geometry, kvq3): run with KVSHARD_STORE_PERF_TOKENS=N.
TEST(DeviceKvStorePerfTest, FillAndAttendLongContext) {
  KV_SKIP_WITHOUT_GPU();
  const char* env = std::getenv("KVSHARD_STORE_PERF_TOKENS");
  if (env == nullptr) GTEST_SKIP() << "set KVSHARD_STORE_PERF_TOKENS to run";
  const int64_t n_tokens = std::atoll(env);
  KvGeometry g = testing::SmallGeometry(128, 32, 32, 8);
  g.rope.theta = 500000.0f;
  const Calibration cal = GeneratorCalibration(g, 256);
  auto config = ParseKvScheme("kvq3:sink=4,residual=32");
  ASSERT_TRUE(config.ok());
  DeviceKvStoreOptions opt;
  opt.max_sequences = 4;
  opt.max_rows = 4;
  auto made = DeviceKvStore::Create(g, *config, &cal, opt);
  ASSERT_TRUE(made.ok()) << made.status();
  DeviceKvStore& store = **made;
  std::printf("pool %.2f GiB, %lld tokens free\n", store.pool_bytes() / 1073741824.0,
              static_cast<long long>(store.FreeTokens()));
  ASSERT_TRUE(store.AddSequence(1, 0, n_tokens + 64).ok());
  cudaStream_t stream;
  KV_CUDA_OK(cudaStreamCreate(&stream));
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::time_point a) { return std::chrono::duration<double>(Clock::now() - a).count(); };
  int64_t filled = 0;
  for (int64_t target : {std::min<int64_t>(n_tokens, 65536), n_tokens}) {
    const auto t0 = Clock::now();
    // The seed of the calibration: the generator's seed also sets its channel structure.
    const absl::Status filled_ok = store.SyntheticFill(1, target, 5, stream);
    ASSERT_TRUE(filled_ok.ok()) << filled_ok;
    KV_CUDA_OK(cudaStreamSynchronize(stream));
    const double s = seconds(t0);
    std::printf("SyntheticFill %lld -> %lld tokens x 32 layers: %.2f s (%.0f tokens/s)\n",
                static_cast<long long>(filled), static_cast<long long>(target), s, (target - filled) / s);
    filled = target;
  }
  const KvMemory m = store.Memory(1);
  std::printf("memory %.2f GiB, %.3f bits per element\n", m.bytes / 1073741824.0, m.bits_per_element());
  const int64_t row = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  DeviceBuffer<float> q(32 * 128 * 512), out(32 * 128 * 512), lse(32 * 512), kv(row * 2);
  KV_CUDA_OK(cudaMemset(q.get(), 0, q.size() * 4));
  KV_CUDA_OK(cudaMemset(kv.get(), 0, kv.size() * 4));
  const std::vector<int64_t> ids = {1};
  // Decode steps: every layer appends one token and attends.
  for (int rep = 0; rep < 2; ++rep) {
    const int steps = rep == 0 ? 1 : 5;
    const auto t0 = Clock::now();
    for (int step = 0; step < steps; ++step)
      for (int l = 0; l < 32; ++l) {
        ASSERT_TRUE(store.AppendRows(l, ids, kv.get(), kv.get() + row, row, stream).ok());
        ASSERT_TRUE(store.AttendRows(l, ids, q.get(), 32 * 128, out.get(), lse.get(), stream).ok());
      }
    KV_CUDA_OK(cudaStreamSynchronize(stream));
    if (rep == 1) std::printf("decode step (32 layers, batch 1, %lld tokens): %.2f ms\n",
                              static_cast<long long>(filled), 1e3 * seconds(t0) / steps);
  }
  // A 512-query prefill chunk at the end of the context, one layer.
  for (int rep = 0; rep < 2; ++rep) {
    const auto t0 = Clock::now();
    ASSERT_TRUE(store.AttendChunk(3, 1, 512, q.get(), 32 * 128, store.length(1, 3) - 512, out.get(), lse.get(), stream).ok());
    KV_CUDA_OK(cudaStreamSynchronize(stream));
    if (rep == 1) std::printf("AttendChunk (512 queries over %lld tokens, one layer): %.1f ms\n",
                              static_cast<long long>(store.length(1, 3)), 1e3 * seconds(t0));
  }
  EXPECT_TRUE(store.Seal(1, stream).ok());
  KV_CUDA_OK(cudaStreamSynchronize(stream));
  KV_CUDA_OK(cudaStreamDestroy(stream));
}


// kvq3 chunk attention over the packed pages against the path through dequantized fp16 tiles, at a long
// context (Llama-3-8B's KV geometry): times (CUDA events, median of 7 after a warm-up) and the largest
// difference of the two outputs. Run with KVSHARD_STORE_PERF_TOKENS=N (a comma-separated list runs each).
TEST(DeviceKvStorePerfTest, PackedPrefillAgainstDequantizedTiles) {
  KV_SKIP_WITHOUT_GPU();
  const char* env = std::getenv("KVSHARD_STORE_PERF_TOKENS");
  if (env == nullptr) GTEST_SKIP() << "set KVSHARD_STORE_PERF_TOKENS to run";
  KvGeometry g = testing::SmallGeometry(128, 32, 32, 8);
  g.rope.theta = 500000.0f;
  const Calibration cal = GeneratorCalibration(g, 256);
  auto config = ParseKvScheme("kvq3:sink=4,residual=32");
  ASSERT_TRUE(config.ok());
  constexpr int kQueries = 512;
  const std::vector<float> q_host = testing::MakeQueries(g, kQueries, 77);
  auto q = ToDevice(q_host);
  for (const std::string& item : std::vector<std::string>(absl::StrSplit(env, ','))) {
    const int64_t n_tokens = std::atoll(item.c_str());
    std::vector<float> outs[2];
    double ms[2] = {0, 0};
    for (int packed = 0; packed < 2; ++packed) {
      DeviceKvStoreOptions opt;
      opt.max_sequences = 1;
      opt.max_rows = 1;
      opt.pool_bytes = n_tokens * 32768 + (int64_t{1} << 30);  // about 29 KB a token over 32 layers
      opt.prefill_reads_packed = packed == 1;
      auto made = DeviceKvStore::Create(g, *config, &cal, opt);
      ASSERT_TRUE(made.ok()) << made.status();
      DeviceKvStore& store = **made;
      ASSERT_TRUE(store.AddSequence(1, 0, n_tokens + 64).ok());
      ASSERT_TRUE(store.SyntheticFill(1, n_tokens, 5, nullptr).ok());
      DeviceBuffer<float> out(q_host.size()), lse(static_cast<size_t>(kQueries) * g.n_heads);
      const int64_t first = n_tokens - kQueries;
      cudaEvent_t start, stop;
      KV_CUDA_OK(cudaEventCreate(&start));
      KV_CUDA_OK(cudaEventCreate(&stop));
      std::vector<float> times;
      for (int rep = 0; rep < 8; ++rep) {
        out.Poison();
        KV_CUDA_OK(cudaEventRecord(start, nullptr));
        ASSERT_TRUE(store.AttendChunk(3, 1, kQueries, q.get(), g.n_heads * 128, first, out.get(), lse.get(), nullptr).ok());
        KV_CUDA_OK(cudaEventRecord(stop, nullptr));
        KV_CUDA_OK(cudaEventSynchronize(stop));
        float t = 0;
        KV_CUDA_OK(cudaEventElapsedTime(&t, start, stop));
        if (rep > 0) times.push_back(t);
      }
      std::sort(times.begin(), times.end());
      ms[packed] = times[times.size() / 2];
      outs[packed] = out.Download();
      KV_CUDA_OK(cudaEventDestroy(start));
      KV_CUDA_OK(cudaEventDestroy(stop));
    }
    double max_diff = 0.0, max_ref = 0.0;
    int64_t not_finite = 0;
    for (size_t i = 0; i < outs[0].size(); ++i) {
      if (!std::isfinite(outs[1][i])) ++not_finite;
      max_diff = std::max(max_diff, std::fabs(static_cast<double>(outs[1][i]) - outs[0][i]));
      max_ref = std::max(max_ref, std::fabs(static_cast<double>(outs[0][i])));
    }
    std::printf("AttendChunk kvq3, %d queries over %lld tokens, one layer: dequantized tiles %.3f ms, packed pages "
                "%.3f ms (%.2fx); max |packed - tiles| %.3g (max |out| %.3g), %lld not finite\n",
                kQueries, static_cast<long long>(n_tokens), ms[0], ms[1], ms[0] / ms[1], max_diff, max_ref,
                static_cast<long long>(not_finite));
    EXPECT_EQ(not_finite, 0);
    EXPECT_LE(max_diff, 0.02 * max_ref + 1e-3);
  }
}

}  // namespace
}  // namespace kvshard
