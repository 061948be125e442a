// Calibration: weighted k-means, thresholds, the file format and its refusals.
#include <cstdio>
#include <filesystem>
#include <random>

#include "common/half.h"
#include "gtest/gtest.h"
#include "kv_test_util.h"
#include "kvstore/calibration.h"
#include "kvstore/quantized_shard.h"

namespace kvshard {
namespace {

using ::kvshard::testing::IdentityFor;
using ::kvshard::testing::MakeSyntheticCalibration;
using ::kvshard::testing::MakeSyntheticKv;
using ::kvshard::testing::SmallGeometry;

TEST(WeightedKMeans, FindsSeparatedClusters) {
  std::mt19937 rng(3);
  std::normal_distribution<float> noise(0.0f, 0.01f);
  const float centers[4] = {-0.8f, -0.2f, 0.3f, 0.9f};
  std::vector<float> x;
  for (int i = 0; i < 4000; ++i) x.push_back(centers[i % 4] + noise(rng));
  const std::vector<float> c = WeightedKMeans1D(x.data(), nullptr, static_cast<int64_t>(x.size()), 4);
  ASSERT_EQ(c.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(c[i], centers[i], 0.005) << i;

  // The histogram version agrees.
  WeightedHistogram h;
  for (float v : x) h.Add(v, 1.0f);
  const std::vector<float> ch = WeightedKMeans1D(h, 4);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(ch[i], centers[i], 0.005) << i;
}

TEST(WeightedKMeans, WeightsPullCentroids) {
  // One cluster over {0, 1} with weights 3:1 -> centroid 0.25.
  const float x[] = {0.0f, 1.0f};
  const float w[] = {3.0f, 1.0f};
  const std::vector<float> c = WeightedKMeans1D(x, w, 2, 1);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_NEAR(c[0], 0.25f, 1e-6);
  // Zero-weight samples are ignored.
  const float w0[] = {1.0f, 0.0f};
  EXPECT_NEAR(WeightedKMeans1D(x, w0, 2, 1)[0], 0.0f, 1e-6);
}

TEST(WeightedKMeans, FewerDistinctPointsThanClusters) {
  const float x[] = {0.5f, 0.5f, -0.5f};
  const std::vector<float> c = WeightedKMeans1D(x, nullptr, 3, 8);
  ASSERT_EQ(c.size(), 8u);
  for (int i = 1; i < 8; ++i) EXPECT_LT(c[i - 1], c[i]);
  EXPECT_NE(std::find(c.begin(), c.end(), 0.5f), c.end());
  EXPECT_NE(std::find(c.begin(), c.end(), -0.5f), c.end());
}

// Key thresholds are exact order statistics: on the calibration tokens themselves each channel has
// round(n f / 2) values below and above, i.e. the configured fraction within +-1 per channel vector.
TEST(CalibrationBuilder, KeyOutliersPerChannelMatchTheFraction) {
  const KvGeometry g = SmallGeometry(64, 2, 4, 2);
  const int64_t n = 1500;
  for (double f : {0.01, 0.005, 0.02}) {
    CalibrationBuilder builder(IdentityFor(g), n, {f}, {3});
    std::vector<testing::SyntheticKv> data;
    for (int l = 0; l < g.n_layers; ++l) {
      data.push_back(MakeSyntheticKv(g, l, n, 5));
      ASSERT_TRUE(builder.ObserveThresholds(l, n, data[l].k.data(), data[l].v.data()).ok());
    }
    ASSERT_TRUE(builder.FinishThresholds().ok());
    const int64_t channels = g.n_kv_heads * g.head_dim;
    for (int l = 0; l < g.n_layers; ++l) {
      const KvqLayerTables& t = builder.partial().layers[l].kvq[0];
      for (int64_t c = 0; c < channels; ++c) {
        int64_t outside = 0;
        for (int64_t tok = 0; tok < n; ++tok) {
          const float x = HalfToFloat(FloatToHalf(data[l].k[tok * channels + c]));
          outside += x < t.key_low[c] || x > t.key_high[c];
        }
        EXPECT_LE(std::abs(static_cast<double>(outside) - f * n), 1.0) << "layer " << l << " channel " << c;
      }
    }
  }
}

TEST(CalibrationBuilder, RefusesMisuse) {
  const KvGeometry g = SmallGeometry();
  CalibrationBuilder builder(IdentityFor(g), 10);
  auto kv = MakeSyntheticKv(g, 0, 20, 1);
  EXPECT_FALSE(builder.ObserveThresholds(0, 20, kv.k.data(), kv.v.data()).ok());  // more than announced
  EXPECT_FALSE(builder.ObserveThresholds(5, 1, kv.k.data(), kv.v.data()).ok());   // no such layer
  EXPECT_FALSE(builder.FinishThresholds().ok());                                  // layers saw too few
  EXPECT_FALSE(builder.Finish("uniform").ok());
}

TEST(CalibrationFile, RoundTripsExactly) {
  const KvGeometry g = SmallGeometry();
  const Calibration c = MakeSyntheticCalibration(g, 512);
  const std::string bytes = SerializeCalibration(c);
  auto parsed = ParseCalibration(bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(SerializeCalibration(*parsed), bytes);
  EXPECT_EQ(parsed->model.name, "synthetic");
  EXPECT_EQ(parsed->weighting, "uniform");
  EXPECT_EQ(parsed->tokens, 512);
  ASSERT_EQ(parsed->layers.size(), 2u);
  EXPECT_EQ(parsed->layers[1].kvq[0].key_codebooks[1], c.layers[1].kvq[0].key_codebooks[1]);

  const std::string path = (std::filesystem::temp_directory_path() / "kvshard_calibration_test.kvcal").string();
  ASSERT_TRUE(SaveCalibration(c, path).ok());
  auto loaded = LoadCalibration(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(SerializeCalibration(*loaded), bytes);
  std::filesystem::remove(path);
}

TEST(CalibrationFile, RefusesCorruptTruncatedAndForeignFiles) {
  const KvGeometry g = SmallGeometry();
  const Calibration c = MakeSyntheticCalibration(g, 256);
  const std::string bytes = SerializeCalibration(c);

  std::string flipped = bytes;
  flipped[bytes.size() / 2] ^= 0x10;
  auto r = ParseCalibration(flipped);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("checksum"), std::string::npos) << r.status();

  r = ParseCalibration(bytes.substr(0, bytes.size() - 9));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("truncated"), std::string::npos) << r.status();

  r = ParseCalibration("GGUF....rest");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("magic"), std::string::npos) << r.status();

  std::string future = bytes;
  future[8] = 99;  // version field
  r = ParseCalibration(future);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("version"), std::string::npos) << r.status();

  auto missing = LoadCalibration("/nonexistent/dir/none.kvcal");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(std::string(missing.status().message()).find("none.kvcal"), std::string::npos);

  // Another model: a different name, geometry or fingerprint.
  ModelIdentity other = c.model;
  other.name = "other-model";
  auto st = CheckCalibrationForModel(c, other);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(std::string(st.message()).find("other-model"), std::string::npos) << st;
  other = c.model;
  other.fingerprint ^= 1;
  EXPECT_FALSE(CheckCalibrationForModel(c, other).ok());
  EXPECT_TRUE(CheckCalibrationForModel(c, c.model).ok());

  // A store of another geometry refuses it.
  const KvGeometry wider = SmallGeometry(128);
  auto shard = MakeKvShard(*ParseKvScheme("kvq3"), wider, 0, &c);
  ASSERT_FALSE(shard.ok());
  EXPECT_NE(std::string(shard.status().message()).find("geometry"), std::string::npos) << shard.status();
  // ... and a fraction or bit width it has no tables for.
  shard = MakeKvShard(*ParseKvScheme("kvq3:outliers=0.03"), g, 0, &c);
  ASSERT_FALSE(shard.ok());
  EXPECT_NE(std::string(shard.status().message()).find("outlier fraction"), std::string::npos) << shard.status();
  Calibration only3 = c;
  only3.codebook_bits = {3};
  for (auto& layer : only3.layers)
    for (auto& t : layer.kvq) {
      t.key_codebooks = {t.key_codebooks[1]};
      t.value_codebooks = {t.value_codebooks[1]};
    }
  shard = MakeKvShard(*ParseKvScheme("kvq4"), g, 0, &only3);
  ASSERT_FALSE(shard.ok());
  EXPECT_NE(std::string(shard.status().message()).find("4-bit"), std::string::npos) << shard.status();
  // kvq and wkv without any calibration.
  shard = MakeKvShard(*ParseKvScheme("wkv4"), g, 0, nullptr);
  ASSERT_FALSE(shard.ok());
  EXPECT_NE(std::string(shard.status().message()).find("calibration"), std::string::npos) << shard.status();
}

}  // namespace
}  // namespace kvshard
