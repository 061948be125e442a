// `kvshard perplexity --device gpu` (coordinator/quality.h, EvaluatePerplexityOnGpu) against the CPU
// path on a small synthetic model: the same windows, the same scored tokens, nearly the same mean loss
// (the GPU's dense layers run in bf16), and the same stored bits per element, for fp16 and kvq3 with a
// batch smaller than the window count (so windows run in two batches).
#include <cmath>
#include <cstdio>
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

TEST(GpuPerplexityTest, MatchesTheCpuDecodeView) {
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
  CpuModel cpu(*weights);
  // 3 windows of 300 tokens: past the kvq sink (4) and residual (32), so pages get quantized.
  constexpr int64_t kCtx = 300, kWindows = 3;
  std::mt19937_64 rng(6);
  std::vector<int32_t> tokens(kCtx * kWindows);
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % spec.vocab_size);
  CalibrateOptions calibrate;
  calibrate.max_tokens = 2 * kCtx;
  calibrate.ctx = kCtx;
  calibrate.show_progress = false;
  absl::StatusOr<Calibration> calibration = CalibrateKv(cpu, ModelIdentityOf(*weights), tokens, calibrate);
  ASSERT_TRUE(calibration.ok()) << calibration.status();

  PerplexityOptions options;
  options.ctx = kCtx;
  options.show_progress = false;
  for (const char* name : {"fp16", "kvq3"}) {
    absl::StatusOr<KvSchemeConfig> scheme = ParseKvScheme(name);
    ASSERT_TRUE(scheme.ok());
    absl::StatusOr<PerplexityResult> want = EvaluatePerplexity(cpu, tokens, *scheme, &*calibration, options);
    ASSERT_TRUE(want.ok()) << want.status();
    absl::StatusOr<PerplexityResult> got =
        EvaluatePerplexityOnGpu(*weights, tokens, *scheme, &*calibration, options, /*batch=*/2);
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
  absl::StatusOr<PerplexityResult> refused = EvaluatePerplexityOnGpu(*weights, tokens, *kivi, &*calibration, options, 2);
  EXPECT_FALSE(refused.ok());
}

}  // namespace
}  // namespace kvshard
