// Placement of a context on the workers: contiguous ranges in worker order covering exactly the context,
// sized by free capacity, boundaries on the chunk grid, short contexts on one worker, and admission
// control that names the capacity.
#include "coordinator/placement.h"

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvshard {
namespace {

constexpr int64_t kBytesPerToken = 1000;

std::vector<WorkerRoom> Rooms(const std::vector<int64_t>& free_tokens, int64_t budget_tokens) {
  std::vector<WorkerRoom> rooms;
  for (int64_t f : free_tokens) rooms.push_back({f * kBytesPerToken, budget_tokens * kBytesPerToken});
  return rooms;
}

void ExpectCovers(const Placement& p, int64_t total) {
  int64_t next = 0;
  for (const TokenRange& r : p.ranges) {
    EXPECT_EQ(r.start, next);
    EXPECT_LE(r.start, r.end);
    next = r.end;
  }
  EXPECT_EQ(next, total);
}

struct SplitCase {
  int64_t total;
  std::vector<int64_t> free_tokens;
};

class PlacementSplitTest : public ::testing::TestWithParam<SplitCase> {};

TEST_P(PlacementSplitTest, CoversTheContextWithinEachWorkersRoom) {
  const SplitCase c = GetParam();
  PlacementOptions options;
  options.single_worker_threshold = 0;
  auto p = PlaceContext(c.total, kBytesPerToken, Rooms(c.free_tokens, 1 << 20), options, "fp16");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->ranges.size(), c.free_tokens.size());
  ExpectCovers(*p, c.total);
  for (size_t w = 0; w < c.free_tokens.size(); ++w) {
    EXPECT_LE(p->ranges[w].size(), c.free_tokens[w]) << "worker " << w;
    // Inner boundaries fall on the chunk grid unless a nearly full worker forced a sequential fill.
    if (w > 0 && p->ranges[w].start % options.granularity != 0) {
      EXPECT_EQ(p->ranges[w - 1].size(), c.free_tokens[w - 1]) << "worker " << w - 1;
    }
  }
  int first_holder = 0;
  while (p->ranges[first_holder].empty()) ++first_holder;
  EXPECT_EQ(p->OwnerOf(0), first_holder);
  EXPECT_EQ(p->OwnerOf(c.total - 1), static_cast<int>(p->ranges.size()) - 1 -
                                         static_cast<int>(std::find_if(p->ranges.rbegin(), p->ranges.rend(),
                                                                       [](const TokenRange& r) { return !r.empty(); }) -
                                                          p->ranges.rbegin()));
  EXPECT_EQ(p->OwnerOf(c.total), -1);
}

INSTANTIATE_TEST_SUITE_P(Sizes, PlacementSplitTest,
                         ::testing::Values(SplitCase{6128, {100000, 100000}},
                                           SplitCase{6128, {100000, 100000, 100000, 100000}},
                                           SplitCase{4097, {3000, 100000}},      // small first worker
                                           SplitCase{10000, {5000, 5000}},       // exactly full
                                           SplitCase{9999, {5000, 4999, 1}},     // boundary off the grid
                                           SplitCase{513, {1, 1, 1000}},         // tiny rooms first
                                           SplitCase{1, {0, 1}},                 // one token, first full
                                           SplitCase{1537, {700, 700, 700}}));

TEST(PlacementTest, EvenCapacitySplitsEvenlyOnTheChunkGrid) {
  PlacementOptions options;
  options.single_worker_threshold = 2048;
  auto p = PlaceContext(6128, kBytesPerToken, Rooms({100000, 100000, 100000, 100000}, 100000), options, "fp16");
  ASSERT_TRUE(p.ok()) << p.status();
  const std::vector<int64_t> starts = {0, 1536, 3072, 4608};
  for (int w = 0; w < 4; ++w) EXPECT_EQ(p->ranges[w].start, starts[w]);
  EXPECT_EQ(p->ranges[3].end, 6128);
}

TEST(PlacementTest, SplitFollowsFreeCapacity) {
  PlacementOptions options;
  options.single_worker_threshold = 0;
  options.granularity = 1;
  auto p = PlaceContext(3000, kBytesPerToken, Rooms({1000, 2000, 3000}, 3000), options, "fp16");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->ranges[0].size(), 500);
  EXPECT_EQ(p->ranges[1].size(), 1000);
  EXPECT_EQ(p->ranges[2].size(), 1500);
}

TEST(PlacementTest, ShortContextGoesWholeToTheRoomiestWorker) {
  PlacementOptions options;
  options.single_worker_threshold = 2048;
  auto p = PlaceContext(2048, kBytesPerToken, Rooms({5000, 9000, 9000}, 10000), options, "fp16");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->ranges[0].empty());
  EXPECT_EQ(p->ranges[1].start, 0);
  EXPECT_EQ(p->ranges[1].end, 2048);
  EXPECT_TRUE(p->ranges[2].empty());
  // Just above the threshold: split.
  p = PlaceContext(2049, kBytesPerToken, Rooms({5000, 9000, 9000}, 10000), options, "fp16");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_FALSE(p->ranges[0].empty());
}

TEST(PlacementTest, ShortContextThatFitsNoSingleWorkerIsSplit) {
  PlacementOptions options;
  options.single_worker_threshold = 2048;
  auto p = PlaceContext(1500, kBytesPerToken, Rooms({1000, 1000}, 4000), options, "fp16");
  ASSERT_TRUE(p.ok()) << p.status();
  ExpectCovers(*p, 1500);
  EXPECT_FALSE(p->ranges[0].empty());
  EXPECT_FALSE(p->ranges[1].empty());
}

TEST(PlacementTest, RefusesWhatExceedsTheCapacityNamingIt) {
  auto p = PlaceContext(20001, kBytesPerToken, Rooms({10000, 10000}, 10000), {}, "kvq3");
  ASSERT_FALSE(p.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(p.status())) << p.status();
  const std::string message(p.status().message());
  EXPECT_NE(message.find("20001 tokens"), std::string::npos) << message;
  EXPECT_NE(message.find("capacity of 20000 tokens"), std::string::npos) << message;
  EXPECT_NE(message.find("kvq3"), std::string::npos) << message;
  EXPECT_NE(message.find("MiB"), std::string::npos) << message;
}

TEST(PlacementTest, WaitsWhenOnlyBusyWorkersLackRoom) {
  auto p = PlaceContext(15000, kBytesPerToken, Rooms({5000, 5000}, 10000), {}, "fp16");
  ASSERT_FALSE(p.ok());
  EXPECT_TRUE(absl::IsUnavailable(p.status())) << p.status();
}

TEST(PlacementTest, RejectsBadArguments) {
  EXPECT_FALSE(PlaceContext(0, kBytesPerToken, Rooms({10}, 10), {}, "fp16").ok());
  EXPECT_FALSE(PlaceContext(5, 0, Rooms({10}, 10), {}, "fp16").ok());
  EXPECT_FALSE(PlaceContext(5, kBytesPerToken, {}, {}, "fp16").ok());
}

}  // namespace
}  // namespace kvshard
