#include "common/host_resources.h"

#include <sched.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvshard {
namespace {

std::string ReadSmallFile(const std::string& path) {
  std::ifstream f(path);
  if (!f) return "";
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int CeilCpus(int64_t quota, int64_t period) {
  if (quota <= 0 || period <= 0) return 0;
  return static_cast<int>(std::min<int64_t>((quota + period - 1) / period, 1 << 20));
}

// Sets *path to the cgroup path of `controller` ("" for v2's unified line) in /proc/self/cgroup; false when
// there is none.
bool CgroupPath(absl::string_view controller, std::string* path) {
  const std::string text = ReadSmallFile("/proc/self/cgroup");
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    // "ID:CONTROLLERS:PATH"; v2 is "0::PATH".
    const std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) continue;
    const bool match = controller.empty()
                           ? parts[0] == "0" && parts[1].empty()
                           : [&] {
                               for (absl::string_view c : absl::StrSplit(parts[1], ','))
                                 if (c == controller) return true;
                               return false;
                             }();
    if (match) {
      *path = std::string(parts[2]);
      return true;
    }
  }
  return false;
}

// Tightest quota from `read(dir)` over `dir` (under root) and its ancestors up to root.
template <typename ReadQuota>
int TightestUpTo(const std::string& root, std::string path, ReadQuota read) {
  int tightest = 0;
  while (true) {
    const int cpus = read(root + path);
    if (cpus > 0) tightest = tightest == 0 ? cpus : std::min(tightest, cpus);
    if (path.empty() || path == "/") break;
    const size_t slash = path.find_last_of('/');
    path = slash == std::string::npos || slash == 0 ? "/" : path.substr(0, slash);
  }
  return tightest;
}

}  // namespace

int CpusOfCgroupV2Max(absl::string_view cpu_max) {
  const std::vector<absl::string_view> parts =
      absl::StrSplit(absl::StripAsciiWhitespace(cpu_max), ' ', absl::SkipEmpty());
  int64_t quota = 0, period = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &quota) || !absl::SimpleAtoi(parts[1], &period)) return 0;
  return CeilCpus(quota, period);
}

int CpusOfCgroupV1Quota(absl::string_view quota_us, absl::string_view period_us) {
  int64_t quota = 0, period = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(quota_us), &quota) ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(period_us), &period)) {
    return 0;
  }
  return CeilCpus(quota, period);
}

int CgroupCpuQuota() {
  std::string path;
  if (CgroupPath("", &path)) {
    const int cpus = TightestUpTo("/sys/fs/cgroup", path, [](const std::string& dir) {
      return CpusOfCgroupV2Max(ReadSmallFile(dir + "/cpu.max"));
    });
    if (cpus > 0) return cpus;
  }
  if (CgroupPath("cpu", &path)) {
    for (const char* root : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}) {
      const int cpus = TightestUpTo(root, path, [](const std::string& dir) {
        return CpusOfCgroupV1Quota(ReadSmallFile(dir + "/cpu.cfs_quota_us"), ReadSmallFile(dir + "/cpu.cfs_period_us"));
      });
      if (cpus > 0) return cpus;
    }
  }
  return 0;
}

int AffinityCpuCount() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return std::max(1u, std::thread::hardware_concurrency());
  return std::max(1, CPU_COUNT(&set));
}

int NodeCpuCount() {
  static const int cpus = [] {
    const int online = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    const int quota = CgroupCpuQuota();
    return quota > 0 ? std::min(online, quota) : online;
  }();
  return cpus;
}

int ThreadsPerRank(int ranks_on_node) {
  const int share = std::max(1, NodeCpuCount() / std::max(1, ranks_on_node));
  return std::max(1, std::min(share, AffinityCpuCount()));
}

int64_t MemAvailableOfMeminfo(absl::string_view meminfo) {
  for (absl::string_view line : absl::StrSplit(meminfo, '\n', absl::SkipEmpty())) {
    if (!absl::ConsumePrefix(&line, "MemAvailable:")) continue;
    line = absl::StripAsciiWhitespace(line);
    int64_t kib = 0;
    if (!absl::ConsumeSuffix(&line, "kB") || !absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &kib) || kib < 0) {
      return 0;
    }
    return kib * 1024;
  }
  return 0;
}

int64_t CgroupMemoryLeft(absl::string_view limit, absl::string_view usage) {
  int64_t max_bytes = 0, used = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(limit), &max_bytes) || max_bytes <= 0) return -1;
  // cgroup v1 writes "no limit" as a huge page-rounded number.
  if (max_bytes >= (int64_t{1} << 60)) return -1;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(usage), &used) || used < 0) used = 0;
  return std::max<int64_t>(0, max_bytes - used);
}

int64_t AvailableMemoryBytes() {
  int64_t available = MemAvailableOfMeminfo(ReadSmallFile("/proc/meminfo"));
  int64_t left = -1;
  std::string path;
  if (CgroupPath("", &path)) {
    const std::string dir = "/sys/fs/cgroup" + path;
    left = CgroupMemoryLeft(ReadSmallFile(dir + "/memory.max"), ReadSmallFile(dir + "/memory.current"));
  } else if (CgroupPath("memory", &path)) {
    const std::string dir = "/sys/fs/cgroup/memory" + path;
    left = CgroupMemoryLeft(ReadSmallFile(dir + "/memory.limit_in_bytes"), ReadSmallFile(dir + "/memory.usage_in_bytes"));
  }
  if (left >= 0) available = available > 0 ? std::min(available, left) : left;
  return available;
}

}  // namespace kvshard
