// Sampler and stop-string handling.
#include <map>
#include <vector>

#include "coordinator/stop_strings.h"
#include "gtest/gtest.h"
#include "worker/sampler.h"

namespace kvshard {
namespace {

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler sampler(SamplingParams{});
  std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(sampler.Sample(logits.data(), 4), 1);
}

TEST(SamplerTest, TopKOneIsGreedy) {
  Sampler sampler(SamplingParams{.temperature = 1.5f, .top_k = 1, .top_p = 1.0f, .seed = 3});
  std::vector<float> logits = {0.1f, 0.2f, 5.0f, 0.3f};
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sampler.Sample(logits.data(), 4), 2);
}

TEST(SamplerTest, TopPKeepsOnlyTheNucleus) {
  // Probabilities at temperature 1: about 0.84, 0.11, 0.04, 0.01. top_p 0.9 keeps ids 0 and 1.
  Sampler sampler(SamplingParams{.temperature = 1.0f, .top_k = 0, .top_p = 0.9f, .seed = 1});
  std::vector<float> logits = {4.0f, 2.0f, 1.0f, 0.0f};
  std::map<int, int> counts;
  for (int i = 0; i < 2000; ++i) counts[sampler.Sample(logits.data(), 4)]++;
  EXPECT_EQ(counts.count(2) + counts.count(3), 0u);
  EXPECT_GT(counts[1], 100);
}

TEST(SamplerTest, SameSeedSameSequence) {
  std::vector<float> logits = {1.0f, 1.1f, 0.9f, 1.05f, 0.7f};
  SamplingParams params{.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 42};
  Sampler a(params), b(params);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(a.Sample(logits.data(), 5), b.Sample(logits.data(), 5));
}

TEST(StopStringFilterTest, StopsAndHoldsBackPossiblePrefixes) {
  StopStringFilter filter({"END"});
  std::string out = filter.Push("Hello E");
  EXPECT_EQ(out, "Hello");  // the last two bytes " E" may begin "END": held back
  out += filter.Push("N");
  out += filter.Push("D and more");
  EXPECT_TRUE(filter.stopped());
  EXPECT_EQ(out, "Hello ");
  EXPECT_EQ(filter.text(), "Hello ");
}

TEST(StopStringFilterTest, NoStopsPassesEverythingThrough) {
  StopStringFilter filter({});
  EXPECT_EQ(filter.Push("abc"), "abc");
  EXPECT_EQ(filter.Flush(), "");
  EXPECT_FALSE(filter.stopped());
}

TEST(StopStringFilterTest, FlushReleasesHeldTextWhenNoStopFollows) {
  StopStringFilter filter({"###"});
  std::string out = filter.Push("a#");
  out += filter.Push("#b");
  out += filter.Flush();
  EXPECT_EQ(out, "a##b");
  EXPECT_FALSE(filter.stopped());
}

}  // namespace
}  // namespace kvshard
