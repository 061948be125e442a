// The device-sampling specification, SampleTokenCpu (kernels/sampling.h), on the CPU.
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/sampling.h"
#include "worker/sampler.h"

namespace kvshard {
namespace {

TokenSampling Params(float temperature, int top_k, float top_p, uint64_t seed, uint64_t step) {
  TokenSampling p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  p.step = step;
  return p;
}

TEST(SampleTokenCpuTest, GreedyTakesTheLowestIdOfEqualMaxima) {
  const std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(SampleTokenCpu(logits.data(), 4, Params(0, 0, 1, 0, 0)).token, 1);
  const std::vector<float> one = {-2.0f};
  EXPECT_EQ(SampleTokenCpu(one.data(), 1, Params(0.7f, 0, 1, 0, 0)).token, 0);
}

TEST(SampleTokenCpuTest, UniformIsDeterministicAndInRange) {
  EXPECT_EQ(SamplingUniform(5, 7), SamplingUniform(5, 7));
  EXPECT_NE(SamplingUniform(5, 7), SamplingUniform(5, 8));
  EXPECT_NE(SamplingUniform(5, 7), SamplingUniform(6, 7));
  double sum = 0;
  for (uint64_t step = 0; step < 10000; ++step) {
    const double u = SamplingUniform(1, step);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.01);  // 4 sigma of the mean of 10000 uniforms is 0.0115
}

TEST(SampleTokenCpuTest, TopKKeepsTheKLargestAndTiesAtTheCut) {
  const std::vector<float> logits = {1.0f, 5.0f, 3.0f, 3.0f, 0.0f, 4.0f};
  std::set<int> seen;
  for (uint64_t step = 0; step < 2000; ++step) seen.insert(SampleTokenCpu(logits.data(), 6, Params(5, 3, 1, 9, step)).token);
  EXPECT_EQ(seen, (std::set<int>{1, 2, 3, 5}));  // k = 3 cuts at logit 3, held by ids 2 and 3
}

TEST(SampleTokenCpuTest, TopPKeepsTheNucleus) {
  // Probabilities at temperature 1: about 0.84, 0.11, 0.04, 0.01; top_p 0.9 keeps ids 0 and 1.
  const std::vector<float> logits = {4.0f, 2.0f, 1.0f, 0.0f};
  std::map<int, int> counts;
  for (uint64_t step = 0; step < 4000; ++step) counts[SampleTokenCpu(logits.data(), 4, Params(1, 0, 0.9f, 2, step)).token]++;
  EXPECT_EQ(counts.count(2) + counts.count(3), 0u);
  const double p1 = std::exp(2.0) / (std::exp(4.0) + std::exp(2.0));  // renormalized over the nucleus
  const double sigma = std::sqrt(4000 * p1 * (1 - p1));
  EXPECT_NEAR(counts[1], 4000 * p1, 4 * sigma);
}

TEST(SampleTokenCpuTest, FrequenciesFollowTheSoftmax) {
  const std::vector<float> logits = {std::log(1.0f), std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  std::vector<int> counts(4, 0);
  constexpr int kDraws = 20000;
  for (uint64_t step = 0; step < kDraws; ++step) counts[SampleTokenCpu(logits.data(), 4, Params(1, 0, 1, 3, step)).token]++;
  for (int i = 0; i < 4; ++i) {
    const double p = (i + 1) / 10.0;
    EXPECT_NEAR(counts[i], kDraws * p, 4 * std::sqrt(kDraws * p * (1 - p))) << "token " << i;
  }
}

TEST(SampleTokenCpuTest, RepetitionPenaltyMatchesSampler) {
  // Greedy decoding with a penalty through worker/sampler.h's Sampler and through the twin pair
  // ApplyRepetitionPenaltyCpu + SampleTokenCpu picks the same tokens.
  constexpr int kVocab = 50;
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  SamplingParams params;
  params.repetition_penalty = 1.5f;
  params.repetition_window = 8;
  Sampler sampler(params);
  std::vector<int32_t> recent;
  for (int step = 0; step < 200; ++step) {
    std::vector<float> logits(kVocab);
    for (float& l : logits) l = dist(rng);
    if (step % 3 == 0 && !recent.empty()) logits[recent.back()] = 10.0f;  // tempt a repeat
    std::vector<float> penalized = logits;
    ApplyRepetitionPenaltyCpu(penalized.data(), kVocab, recent.data(), static_cast<int>(recent.size()), 1.5f);
    const int32_t twin = SampleTokenCpu(penalized.data(), kVocab, TokenSampling{}).token;
    const int32_t want = sampler.Sample(logits.data(), kVocab);
    ASSERT_EQ(twin, want) << "step " << step;
    sampler.Accept(want);
    recent.push_back(want);
    if (recent.size() > 8) recent.erase(recent.begin());
  }
}

TEST(SampleTokenCpuTest, RepetitionPenaltyOncePerDistinctId) {
  std::vector<float> logits = {2.0f, -2.0f, 1.0f, 0.5f};
  const std::vector<int32_t> recent = {0, 1, 0, 7, -1, 1};
  ApplyRepetitionPenaltyCpu(logits.data(), 4, recent.data(), static_cast<int>(recent.size()), 2.0f);
  EXPECT_EQ(logits, (std::vector<float>{1.0f, -4.0f, 1.0f, 0.5f}));
}

}  // namespace
}  // namespace kvshard
