// `kvshard perplexity --device gpu` (coordinator/quality.h, EvaluatePerplexityOnGpu) against the CPU
// path on a small synthetic model: the same windows, the same scored tokens, nearly the same mean loss
// (the GPU's dense layers run in bf16), and the same stored bits per element, for fp16 and kvq3 with a
// batch smaller than the window count (so windows run in two batches). And `kvshard calibrate` on the GPU
// against the CPU: nearly the same tables, and the same kvq3 loss through either.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "coordinator/quality.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kvstore/kv_scheme.h"
#include "worker/forward.h"
#include "worker/synthetic.h"

namespace kvshard {
namespace {

// 3 windows of 300 tokens: past the kvq sink (4) and residual (32), so pages get quantized.
constexpr int64_t kCtx = 300, kWindows = 3;

// A small synthetic model, random tokens, and calibration settings over the first two windows.
class SmallModelOnGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    KV_SKIP_WITHOUT_GPU();
    SyntheticModelSpec spec;
    spec.n_layers = 2;
    spec.hidden = 128;
    spec.n_heads = 4;
    spec.n_kv_heads = 2;
    spec.head_dim = 64;
    spec.ffn_hidden = 256;
    spec.vocab_size = 512;
    spec.max_context = 4096;
    spec.seed = 5;
    absl::StatusOr<ModelWeights> weights = MakeSyntheticModel(spec);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = std::make_unique<ModelWeights>(std::move(*weights));
    cpu_ = std::make_unique<CpuModel>(*weights_);
    identity_ = ModelIdentityOf(*weights_);
    std::mt19937_64 rng(6);
    tokens_.resize(kCtx * kWindows);
    for (int32_t& t : tokens_) t = static_cast<int32_t>(rng() % spec.vocab_size);
    calibrate_.max_tokens = 2 * kCtx;
    calibrate_.ctx = kCtx;
    calibrate_.show_progress = false;
  }

  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<CpuModel> cpu_;
  ModelIdentity identity_;
  std::vector<int32_t> tokens_;
  CalibrateOptions calibrate_;
};

TEST_F(SmallModelOnGpu, PerplexityMatchesTheCpuDecodeView) {
  absl::StatusOr<Calibration> calibration = CalibrateKv(*cpu_, identity_, tokens_, calibrate_);
  ASSERT_TRUE(calibration.ok()) << calibration.status();

  PerplexityOptions options;
  options.ctx = kCtx;
  options.show_progress = false;
  for (const char* name : {"fp16", "kvq3"}) {
    absl::StatusOr<KvSchemeConfig> scheme = ParseKvScheme(name);
    ASSERT_TRUE(scheme.ok());
    absl::StatusOr<PerplexityResult> want = EvaluatePerplexity(*cpu_, tokens_, *scheme, &*calibration, options);
    ASSERT_TRUE(want.ok()) << want.status();
    absl::StatusOr<PerplexityResult> got =
        EvaluatePerplexityOnGpu(*weights_, tokens_, *scheme, &*calibration, options, /*batch=*/2);
    ASSERT_TRUE(got.ok()) << got.status();
    std::printf("  %s: mean loss GPU %.6f CPU %.6f, bits/element GPU %.4f CPU %.4f\n", name, got->mean_nll,
                want->mean_nll, got->bits_per_element, want->bits_per_element);
    EXPECT_EQ(got->windows, kWindows);
    EXPECT_EQ(got->scored_tokens, want->scored_tokens);
    // bf16 GEMM inputs move each logit by ~1e-3 relative; the mean loss over 897 tokens must agree to
    // 0.01 nats plus 0.2%.
    EXPECT_NEAR(got->mean_nll, want->mean_nll, 0.01 + 0.002 * std::fabs(want->mean_nll));
    // Same bytes stored, up to key outliers that bf16 rounding moves across a threshold.
    EXPECT_NEAR(got->bits_per_element, want->bits_per_element, 0.005 * want->bits_per_element);
  }
  // Schemes the GPU store does not hold are refused, not run wrongly.
  absl::StatusOr<KvSchemeConfig> kivi = ParseKvScheme("kivi2");
  ASSERT_TRUE(kivi.ok());
  absl::StatusOr<PerplexityResult> refused = EvaluatePerplexityOnGpu(*weights_, tokens_, *kivi, &*calibration, options, 2);
  EXPECT_FALSE(refused.ok());
}

// The tables come from bf16 activations on the GPU, fp32 on the CPU: thresholds within a few percent of
// each channel's range (an order statistic may change places with its neighbour), and codebooks and the
// kvq3 loss through them nearly the same.
TEST_F(SmallModelOnGpu, CalibrationMatchesTheCpus) {
  absl::StatusOr<Calibration> want = CalibrateKv(*cpu_, identity_, tokens_, calibrate_);
  ASSERT_TRUE(want.ok()) << want.status();
  absl::StatusOr<Calibration> got = CalibrateKvOnGpu(*weights_, identity_, tokens_, calibrate_);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->tokens, want->tokens);
  EXPECT_EQ(got->weighting, want->weighting);
  EXPECT_EQ(got->outlier_fractions, want->outlier_fractions);
  EXPECT_EQ(got->codebook_bits, want->codebook_bits);
  ASSERT_EQ(got->layers.size(), want->layers.size());

  int64_t thresholds = 0, far_thresholds = 0;
  double worst_threshold = 0, worst_centroid = 0;
  for (size_t l = 0; l < want->layers.size(); ++l) {
    ASSERT_EQ(got->layers[l].kvq.size(), want->layers[l].kvq.size());
    for (size_t f = 0; f < want->layers[l].kvq.size(); ++f) {
      const KvqLayerTables& a = got->layers[l].kvq[f];
      const KvqLayerTables& b = want->layers[l].kvq[f];
      ASSERT_EQ(a.key_low.size(), b.key_low.size());
      for (size_t c = 0; c < b.key_low.size(); ++c) {
        const double range = b.key_high[c] - b.key_low[c];
        for (const double error : {std::fabs(a.key_low[c] - b.key_low[c]) / range,
                                   std::fabs(a.key_high[c] - b.key_high[c]) / range}) {
          ++thresholds;
          worst_threshold = std::max(worst_threshold, error);
          if (error > 0.02) ++far_thresholds;
        }
      }
      for (size_t i = 0; i < b.key_codebooks.size(); ++i) {
        for (size_t j = 0; j < b.key_codebooks[i].size(); ++j) {
          worst_centroid = std::max<double>(worst_centroid, std::fabs(a.key_codebooks[i][j] - b.key_codebooks[i][j]));
          worst_centroid =
              std::max<double>(worst_centroid, std::fabs(a.value_codebooks[i][j] - b.value_codebooks[i][j]));
        }
      }
    }
  }
  std::printf("  thresholds: worst %.4f of the channel's range, %lld of %lld beyond 0.02; worst centroid %.4f\n",
              worst_threshold, static_cast<long long>(far_thresholds), static_cast<long long>(thresholds),
              worst_centroid);
  EXPECT_LE(far_thresholds, thresholds / 50);
  EXPECT_LE(worst_threshold, 0.2);
  EXPECT_LE(worst_centroid, 0.05);

  PerplexityOptions options;
  options.ctx = kCtx;
  options.show_progress = false;
  absl::StatusOr<KvSchemeConfig> kvq3 = ParseKvScheme("kvq3");
  ASSERT_TRUE(kvq3.ok());
  absl::StatusOr<PerplexityResult> through_cpu = EvaluatePerplexity(*cpu_, tokens_, *kvq3, &*want, options);
  absl::StatusOr<PerplexityResult> through_gpu = EvaluatePerplexity(*cpu_, tokens_, *kvq3, &*got, options);
  ASSERT_TRUE(through_cpu.ok()) << through_cpu.status();
  ASSERT_TRUE(through_gpu.ok()) << through_gpu.status();
  std::printf("  kvq3 mean loss (CPU) with the GPU's calibration %.6f, with the CPU's %.6f\n", through_gpu->mean_nll,
              through_cpu->mean_nll);
  EXPECT_NEAR(through_gpu->mean_nll, through_cpu->mean_nll, 0.005 + 0.001 * std::fabs(through_cpu->mean_nll));
}

}  // namespace
}  // namespace kvshard
