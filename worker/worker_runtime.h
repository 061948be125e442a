// A worker rank of the distributed runtime (ranks 1..N under mpirun, or single-process mode's one worker): it waits for the coordinator's commands
// (worker/control.h), keeps the KV shards of its token ranges, runs the replicated dense layers and its
// part of attention in lock step with the other workers, and answers every step with a report.
//
// A local failure (bad input, a shard that cannot take more tokens, an injected fault) fails the
// requests it touches and the worker goes on; only a failed collective (a peer gone) ends the job.
#pragma once

#include "worker/control.h"
#include "worker/kv_shard_factory.h"
#include "worker/job_runtime.h"

namespace kvshard {

// Runs until the coordinator sends shutdown; returns the process exit code. `kv_factories` makes the
// worker's KV shard factory from the settings each configure command brings.
int RunWorker(JobRuntime& job, KvShardFactoryMaker kv_factories);

// On rank 0: sends `command` to every worker, each waiting at most `timeout`.
absl::Status SendToAllWorkers(JobRuntime& job, const WorkerCommand& command, absl::Duration timeout);

// Ends every worker's loop (call once, on rank 0, when no engine is left).
void ShutdownWorkers(JobRuntime& job);

}  // namespace kvshard
