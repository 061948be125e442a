// Synthetic keys/values with the structure real ones have (outlier channels, a few spikes), calibrations
// built from them, and an exact double-precision attention reference, shared by the KV store tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kvstore/calibration.h"
#include "kvstore/kv_shard.h"

namespace kvshard::testing {

inline KvGeometry SmallGeometry(int head_dim = 64, int n_layers = 2, int n_heads = 4, int n_kv_heads = 2) {
  KvGeometry g;
  g.n_layers = n_layers;
  g.n_heads = n_heads;
  g.n_kv_heads = n_kv_heads;
  g.head_dim = head_dim;
  g.rope.head_dim = head_dim;
  g.rope.theta = 10000.0f;
  return g;
}

inline ModelIdentity IdentityFor(const KvGeometry& g, const std::string& name = "synthetic") {
  ModelIdentity m;
  m.name = name;
  m.n_layers = g.n_layers;
  m.n_heads = g.n_heads;
  m.n_kv_heads = g.n_kv_heads;
  m.head_dim = g.head_dim;
  m.fingerprint = Fnv1a64(name.data(), name.size());
  return m;
}

// K/V activations [n_tokens][n_kv_heads][head_dim] of one layer: keys have per-channel offsets and a few
// channels 8x wider (as pre-RoPE keys do), values are narrower; both have rare spikes.
struct SyntheticKv {
  std::vector<float> k, v;
};
inline SyntheticKv MakeSyntheticKv(const KvGeometry& g, int layer, int64_t n_tokens, uint32_t seed) {
  std::mt19937 rng(seed * 7919u + static_cast<uint32_t>(layer));
  std::mt19937 shape_rng(1234u + static_cast<uint32_t>(layer));  // channel structure fixed per layer
  const int64_t channels = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  std::vector<float> offset(channels), width(channels);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int64_t c = 0; c < channels; ++c) {
    offset[c] = 0.5f * normal(shape_rng);
    width[c] = (shape_rng() % 11 == 0) ? 8.0f : 1.0f + 0.5f * uniform(shape_rng);
  }
  SyntheticKv kv;
  kv.k.resize(n_tokens * channels);
  kv.v.resize(n_tokens * channels);
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t c = 0; c < channels; ++c) {
      float kval = offset[c] + width[c] * normal(rng);
      float vval = 0.3f * normal(rng);
      if (uniform(rng) < 0.005f) kval *= 6.0f;
      if (uniform(rng) < 0.01f) vval *= 8.0f;
      kv.k[t * channels + c] = kval;
      kv.v[t * channels + c] = vval;
    }
  }
  return kv;
}

// A calibration from n_tokens synthetic tokens (seed differs from the evaluation data's).
inline Calibration MakeSyntheticCalibration(const KvGeometry& g, int64_t n_tokens = 2048,
                                            std::vector<double> fractions = {0.01, 0.005},
                                            uint32_t seed = 99) {
  CalibrationBuilder builder(IdentityFor(g), n_tokens, fractions, {2, 3, 4});
  std::vector<SyntheticKv> data;
  for (int l = 0; l < g.n_layers; ++l) data.push_back(MakeSyntheticKv(g, l, n_tokens, seed));
  for (int l = 0; l < g.n_layers; ++l) {
    EXPECT_TRUE(builder.ObserveThresholds(l, static_cast<int>(n_tokens), data[l].k.data(), data[l].v.data()).ok());
  }
  EXPECT_TRUE(builder.FinishThresholds().ok());
  for (int l = 0; l < g.n_layers; ++l) {
    EXPECT_TRUE(
        builder.ObserveSamples(l, static_cast<int>(n_tokens), data[l].k.data(), data[l].v.data(), nullptr, nullptr)
            .ok());
  }
  auto c = builder.Finish("uniform");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

// |mid| + |half-range| of kvq's calibrated key thresholds, [KV head][channel]: what the kvq3 GPU decode
// kernel's fp16 key dequantization rounds, so its tests' error bounds add it to |k|.
inline std::vector<std::vector<double>> KvqKeyRange(const KvqLayerTables& t, int n_kv_heads, int d) {
  std::vector<std::vector<double>> range(n_kv_heads, std::vector<double>(d));
  for (int h = 0; h < n_kv_heads; ++h)
    for (int c = 0; c < d; ++c) {
      const double lo = t.key_low[h * d + c], hi = t.key_high[h * d + c];
      range[h][c] = std::fabs((lo + hi) / 2) + std::fabs((hi - lo) / 2);
    }
  return range;
}

// Queries [n][n_heads][head_dim] (RoPE applied or not does not matter to the reference).
inline std::vector<float> MakeQueries(const KvGeometry& g, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(n) * g.n_heads * g.head_dim);
  for (float& x : q) x = normal(rng);
  return q;
}

// Exact attention of queries over explicit K (after RoPE) / V of one layer, in double.
// k, v: per KV head, [n_keys][head_dim] (kv[h] holds head h), key j at absolute position first + j.
inline void ReferenceAttention(const KvGeometry& g, const std::vector<std::vector<float>>& k,
                               const std::vector<std::vector<float>>& v, int64_t first, int n_queries,
                               const float* q, const int64_t* q_positions, std::vector<double>* out,
                               std::vector<double>* lse) {
  const int d = g.head_dim;
  const int group = g.n_heads / g.n_kv_heads;
  out->assign(static_cast<size_t>(n_queries) * g.n_heads * d, 0.0);
  lse->assign(static_cast<size_t>(n_queries) * g.n_heads, -std::numeric_limits<double>::infinity());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int i = 0; i < n_queries; ++i) {
    for (int hq = 0; hq < g.n_heads; ++hq) {
      const int h = hq / group;
      const int64_t n_keys = static_cast<int64_t>(k[h].size()) / d;
      const int64_t visible = std::clamp<int64_t>(q_positions[i] - first + 1, 0, n_keys);
      if (visible == 0) continue;
      const float* qv = q + (static_cast<int64_t>(i) * g.n_heads + hq) * d;
      std::vector<double> s(visible);
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += static_cast<double>(qv[c]) * k[h][j * d + c];
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < visible; ++j) sum += std::exp(s[j] - m);
      double* o = out->data() + (static_cast<int64_t>(i) * g.n_heads + hq) * d;
      for (int64_t j = 0; j < visible; ++j) {
        const double p = std::exp(s[j] - m) / sum;
        for (int c = 0; c < d; ++c) o[c] += p * v[h][j * d + c];
      }
      (*lse)[static_cast<int64_t>(i) * g.n_heads + hq] = m + std::log(sum);
    }
  }
}

}  // namespace kvshard::testing
