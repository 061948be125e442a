// What this host lets a process use: CPU threads and memory.
//
// How many CPU threads this process should run: std::thread::hardware_concurrency and OpenMP's default
// count every online CPU, while a container's CPU quota (docker --cpus, Kubernetes CPU limits: the cgroup's
// cpu.max or cpu.cfs_quota_us) or an affinity mask (taskset, mpirun --bind-to) may allow far fewer, and
// threads beyond those only wait for each other.
#pragma once

#include <cstdint>

#include "absl/strings/string_view.h"

namespace kvshard {

// CPUs a cgroup v2 cpu.max ("QUOTA PERIOD", or "max PERIOD" for none) allows, rounded up; 0 when unlimited
// or unreadable.
int CpusOfCgroupV2Max(absl::string_view cpu_max);
// The same for cgroup v1's cpu.cfs_quota_us (-1 for none) and cpu.cfs_period_us.
int CpusOfCgroupV1Quota(absl::string_view quota_us, absl::string_view period_us);

// The tightest CPU quota of this process's cgroup and its ancestors (v2 or v1); 0 when there is none.
int CgroupCpuQuota();

// CPUs in this process's affinity mask (at least 1).
int AffinityCpuCount();

// CPUs the processes of this node share: the online CPUs, capped by the cgroup quota (at least 1).
int NodeCpuCount();

// Threads for one of `ranks_on_node` processes of this node: its share of NodeCpuCount, at most the CPUs
// its affinity mask allows, at least 1.
int ThreadsPerRank(int ranks_on_node);

// Memory: /proc/meminfo's MemAvailable counts the whole host, while a container's memory limit (cgroup v2
// memory.max, v1 memory.limit_in_bytes) may leave far less.

// MemAvailable of a /proc/meminfo text, in bytes; 0 when absent.
int64_t MemAvailableOfMeminfo(absl::string_view meminfo);
// Bytes a cgroup limit ("max", or a byte count) leaves after `usage` bytes; -1 when unlimited or unreadable.
int64_t CgroupMemoryLeft(absl::string_view limit, absl::string_view usage);

// Memory this process may still take: MemAvailable, capped by its cgroup's limit less its usage; 0 when
// neither can be read.
int64_t AvailableMemoryBytes();

}  // namespace kvshard
