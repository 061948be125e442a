// Device sampling against its CPU twin SampleTokenCpu (kernels/sampling.h).
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kernels/cuda/sampling.h"
#include "kernels/sampling.h"

namespace kvshard {
namespace {

using testing::CountMismatches;
using testing::DeviceBuffer;
using testing::RandomUniform;
using testing::ToDevice;

struct SamplingCase {
  std::string name;
  int vocab;
  float temperature;
  int top_k;
  float top_p;
};

class SampleTokensTest : public ::testing::TestWithParam<SamplingCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(SampleTokensTest, MatchesCpuTwin) {
  const SamplingCase c = GetParam();
  constexpr int kRows = 64;
  const int64_t stride = c.vocab + 5;  // padded rows exercise row_stride
  std::vector<float> logits = RandomUniform(kRows * stride, 71, -6.0f, 6.0f);
  // Exact ties at the top in a few rows: greedy must take the lowest id.
  for (int r = 0; r < kRows; r += 4) {
    if (c.vocab >= 3) logits[r * stride + c.vocab - 1] = logits[r * stride + 1] = 7.0f;
  }
  std::vector<TokenSampling> params(kRows);
  for (int r = 0; r < kRows; ++r) {
    params[r].temperature = c.temperature;
    params[r].top_k = c.top_k;
    params[r].top_p = c.top_p;
    params[r].seed = 1234 + r % 3;
    params[r].step = r;
  }
  DeviceBuffer<float> dlogits = ToDevice(logits);
  DeviceBuffer<TokenSampling> dparams = ToDevice(params);
  DeviceBuffer<int32_t> dtokens(kRows);
  dtokens.Poison();
  ASSERT_TRUE(SampleTokensCuda(dlogits.get(), stride, c.vocab, kRows, dparams.get(), dtokens.get(), nullptr).ok());
  const std::vector<int32_t> got = dtokens.Download();
  int wrong = 0, near_boundary = 0;
  for (int r = 0; r < kRows; ++r) {
    const SampledToken want = SampleTokenCpu(logits.data() + r * stride, c.vocab, params[r]);
    if (got[r] == want.token) continue;
    // The GPU sums weights in fp32 in another order: a disagreement is allowed only when the draw fell
    // within float rounding (1e-5 of the kept weight) of a boundary.
    if (want.margin < 1e-5) {
      ++near_boundary;
      continue;
    }
    if (wrong++ < 8) std::printf("  row %d: got %d want %d (margin %.3g)\n", r, got[r], want.token, want.margin);
  }
  std::printf("  %s: #wrong %d, #near-boundary %d of %d\n", c.name.c_str(), wrong, near_boundary, kRows);
  EXPECT_EQ(wrong, 0);
  EXPECT_LE(near_boundary, 2);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SampleTokensTest,
    ::testing::Values(SamplingCase{"greedy_smollm_vocab", 49152, 0.0f, 0, 1.0f},
                      SamplingCase{"greedy_llama3_vocab", 128256, 0.0f, 0, 1.0f},
                      SamplingCase{"greedy_tiny", 1, 0.0f, 0, 1.0f},
                      SamplingCase{"temperature_only", 49152, 0.8f, 0, 1.0f},
                      SamplingCase{"top_k_50", 49152, 1.0f, 50, 1.0f},
                      SamplingCase{"top_k_1", 1000, 1.3f, 1, 1.0f},
                      SamplingCase{"top_p_0_9", 49152, 0.7f, 0, 0.9f},
                      SamplingCase{"top_k_and_p", 128256, 1.0f, 40, 0.95f},
                      SamplingCase{"small_vocab_37", 37, 1.5f, 10, 0.5f}),
    [](const auto& info) { return info.param.name; });

// The draws follow the softmax: 4 tokens with logits ln(1..4) should come out 1:2:3:4.
TEST(SampleTokensDistributionTest, FrequenciesFollowTheSoftmax) {
  KV_SKIP_WITHOUT_GPU();
  constexpr int kRows = 20000;
  const std::vector<float> row = {std::log(1.0f), std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  std::vector<float> logits;
  std::vector<TokenSampling> params(kRows);
  for (int r = 0; r < kRows; ++r) {
    logits.insert(logits.end(), row.begin(), row.end());
    params[r].temperature = 1.0f;
    params[r].seed = 99;
    params[r].step = r;
  }
  DeviceBuffer<float> dlogits = ToDevice(logits);
  DeviceBuffer<TokenSampling> dparams = ToDevice(params);
  DeviceBuffer<int32_t> dtokens(kRows);
  dtokens.Poison();
  ASSERT_TRUE(SampleTokensCuda(dlogits.get(), 4, 4, kRows, dparams.get(), dtokens.get(), nullptr).ok());
  std::vector<int> counts(4, 0);
  for (int32_t t : dtokens.Download()) {
    ASSERT_GE(t, 0);
    ASSERT_LT(t, 4);
    ++counts[t];
  }
  for (int i = 0; i < 4; ++i) {
    const double p = (i + 1) / 10.0;
    const double sigma = std::sqrt(kRows * p * (1 - p));
    EXPECT_NEAR(counts[i], kRows * p, 4 * sigma) << "token " << i;
  }
}

// The penalty kernel changes the same logits by the same IEEE operations as the CPU twin: bit-exact.
TEST(RepetitionPenaltyTest, MatchesCpuTwinBitExactly) {
  KV_SKIP_WITHOUT_GPU();
  constexpr int kRows = 5, kVocab = 1000, kStride = 1003, kRecentStride = 70;
  std::vector<float> logits = RandomUniform(kRows * kStride, 81, -5.0f, 5.0f);
  std::vector<int32_t> recent(kRows * kRecentStride, 0);
  std::vector<int32_t> counts = {0, 1, 64, 70, 33};
  std::vector<TokenSampling> params(kRows);
  const float penalties[kRows] = {1.3f, 1.1f, 1.0f, 2.0f, 0.9f};
  std::mt19937_64 rng(82);
  for (int r = 0; r < kRows; ++r) {
    params[r].repetition_penalty = penalties[r];
    for (int i = 0; i < counts[r]; ++i) {
      // Repeats, and ids outside the vocabulary, on purpose.
      recent[r * kRecentStride + i] = static_cast<int32_t>(rng() % 40) * (i % 7 == 6 ? 100 : 1) - (i == 5 ? 2000 : 0);
    }
  }
  std::vector<float> want = logits;
  for (int r = 0; r < kRows; ++r) {
    ApplyRepetitionPenaltyCpu(want.data() + r * kStride, kVocab, recent.data() + r * kRecentStride, counts[r],
                              penalties[r]);
  }
  DeviceBuffer<float> dlogits = ToDevice(logits);
  DeviceBuffer<int32_t> drecent = ToDevice(recent), dcounts = ToDevice(counts);
  DeviceBuffer<TokenSampling> dparams = ToDevice(params);
  ASSERT_TRUE(ApplyRepetitionPenaltyCuda(dlogits.get(), kStride, kVocab, kRows, drecent.get(), kRecentStride,
                                         dcounts.get(), dparams.get(), nullptr)
                  .ok());
  const std::vector<float> got = dlogits.Download();
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], 4) != 0 && wrong++ < 8) {
      std::printf("  [%zu]: got %.9g want %.9g\n", i, got[i], want[i]);
    }
  }
  EXPECT_EQ(wrong, 0);
}

class TargetLogProbabilitiesTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

// Bound: the kernel sums exp in fp32 (fast-math expf, a few ulp each, relative error of the sum ~1e-6
// at these vocabularies) where the twin sums in double; log(sum) turns that into an absolute error.
TEST_P(TargetLogProbabilitiesTest, MatchesCpuTwin) {
  const int vocab = GetParam();
  constexpr int kRows = 9;
  const int64_t stride = vocab + 3;  // padded rows exercise row_stride
  std::vector<float> logits = RandomUniform(kRows * stride, 91, -20.0f, 20.0f);
  for (int64_t i = 0; i < stride; ++i) logits[stride + i] += 80.0f;  // large logits must not overflow exp
  std::vector<int32_t> targets(kRows);
  for (int r = 0; r < kRows; ++r) targets[r] = r == 0 ? 0 : r == 1 ? vocab - 1 : static_cast<int32_t>((r * 7919) % vocab);
  std::vector<float> want(kRows);
  for (int r = 0; r < kRows; ++r) {
    want[r] = static_cast<float>(TargetLogProbabilityCpu(logits.data() + r * stride, vocab, targets[r]));
  }
  DeviceBuffer<float> dlogits = ToDevice(logits);
  DeviceBuffer<int32_t> dtargets = ToDevice(targets);
  DeviceBuffer<float> dout(kRows);
  dout.Poison();
  ASSERT_TRUE(
      TargetLogProbabilitiesCuda(dlogits.get(), stride, vocab, kRows, dtargets.get(), dout.get(), nullptr).ok());
  EXPECT_EQ(CountMismatches("log_probability", dout.Download(), want, 2e-5, 1e-5), 0);
}

INSTANTIATE_TEST_SUITE_P(Vocabularies, TargetLogProbabilitiesTest, ::testing::Values(1, 37, 1000, 49152, 128256));

TEST(TargetLogProbabilitiesErrors, OutOfRangeTargetIsNanAndBadShapeIsRefused) {
  KV_SKIP_WITHOUT_GPU();
  const std::vector<float> logits = RandomUniform(2 * 37, 92);
  DeviceBuffer<float> dlogits = ToDevice(logits);
  DeviceBuffer<int32_t> dtargets = ToDevice(std::vector<int32_t>{37, -1});
  DeviceBuffer<float> dout(2);
  ASSERT_TRUE(TargetLogProbabilitiesCuda(dlogits.get(), 37, 37, 2, dtargets.get(), dout.get(), nullptr).ok());
  for (float x : dout.Download()) EXPECT_TRUE(std::isnan(x));
  EXPECT_FALSE(TargetLogProbabilitiesCuda(dlogits.get(), 36, 37, 2, dtargets.get(), dout.get(), nullptr).ok());
}

}  // namespace
}  // namespace kvshard
