// CPU counts under container quotas and affinity masks, and available memory under container limits
// (common/host_resources.h).
#include "common/host_resources.h"

#include <algorithm>
#include <cstdio>
#include <thread>

#include "gtest/gtest.h"

namespace kvshard {
namespace {

TEST(CpuCount, CgroupV2Max) {
  EXPECT_EQ(CpusOfCgroupV2Max("200000 100000\n"), 2);
  EXPECT_EQ(CpusOfCgroupV2Max("150000 100000"), 2);  // 1.5 CPUs: two threads, each busy three quarters
  EXPECT_EQ(CpusOfCgroupV2Max("50000 100000"), 1);
  EXPECT_EQ(CpusOfCgroupV2Max("max 100000\n"), 0);
  EXPECT_EQ(CpusOfCgroupV2Max(""), 0);
  EXPECT_EQ(CpusOfCgroupV2Max("rubbish"), 0);
}

TEST(CpuCount, CgroupV1Quota) {
  EXPECT_EQ(CpusOfCgroupV1Quota("400000\n", "100000\n"), 4);
  EXPECT_EQ(CpusOfCgroupV1Quota("-1\n", "100000\n"), 0);
  EXPECT_EQ(CpusOfCgroupV1Quota("", ""), 0);
  EXPECT_EQ(CpusOfCgroupV1Quota("100000", "0"), 0);
}

TEST(CpuCount, ThisProcess) {
  const int online = static_cast<int>(std::thread::hardware_concurrency());
  std::printf("  online %d, affinity %d, cgroup quota %d, node %d, per rank of 1 / 3: %d / %d\n", online,
              AffinityCpuCount(), CgroupCpuQuota(), NodeCpuCount(), ThreadsPerRank(1), ThreadsPerRank(3));
  EXPECT_GE(NodeCpuCount(), 1);
  EXPECT_LE(NodeCpuCount(), std::max(1, online));
  EXPECT_GE(ThreadsPerRank(1), 1);
  EXPECT_LE(ThreadsPerRank(1), AffinityCpuCount());
  EXPECT_LE(ThreadsPerRank(1), NodeCpuCount());
  EXPECT_GE(ThreadsPerRank(1000), 1);
  EXPECT_LE(ThreadsPerRank(3), ThreadsPerRank(1));
}

TEST(AvailableMemory, Meminfo) {
  EXPECT_EQ(MemAvailableOfMeminfo("MemTotal:       16384 kB\nMemFree:          1024 kB\nMemAvailable:     8192 kB\n"),
            int64_t{8192} * 1024);
  EXPECT_EQ(MemAvailableOfMeminfo("MemTotal:       16384 kB\n"), 0);
  EXPECT_EQ(MemAvailableOfMeminfo("MemAvailable: lots\n"), 0);
  EXPECT_EQ(MemAvailableOfMeminfo(""), 0);
}

TEST(AvailableMemory, CgroupLimit) {
  EXPECT_EQ(CgroupMemoryLeft("4294967296\n", "1073741824\n"), int64_t{3} << 30);
  EXPECT_EQ(CgroupMemoryLeft("1000", "5000"), 0);      // over the limit: nothing left
  EXPECT_EQ(CgroupMemoryLeft("max\n", "1073741824"), -1);  // v2, unlimited
  EXPECT_EQ(CgroupMemoryLeft("9223372036854771712\n", "1"), -1);  // v1, unlimited
  EXPECT_EQ(CgroupMemoryLeft("", ""), -1);
  EXPECT_EQ(CgroupMemoryLeft("2048", ""), 2048);  // usage unreadable: the whole limit
}

TEST(AvailableMemory, ThisProcess) {
  const int64_t available = AvailableMemoryBytes();
  std::printf("  available memory %.2f GiB\n", available / 1073741824.0);
  EXPECT_GT(available, 0);
}

}  // namespace
}  // namespace kvshard
