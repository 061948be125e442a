// Single-process mode: the coordinator and one worker as two threads of this process.
//
// The worker thread runs the same loop as a worker rank under mpirun (RunWorker), so single-process mode
// gets everything the distributed engine does, continuous batching of concurrent requests included. Control
// messages go through in-memory mailboxes; the data plane has one worker, so its collectives copy in place
// (a GPU worker still makes its one-rank NCCL communicator through them).
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "worker/job_runtime.h"
#include "worker/kv_shard_factory.h"

namespace kvshard {

class InProcessJob {
 public:
  // Starts the worker thread. `kv_factories` as for RunWorker.
  static std::unique_ptr<InProcessJob> Start(KvShardFactoryMaker kv_factories);
  // Ends the worker's loop (ShutdownWorkers) and joins its thread.
  ~InProcessJob();
  InProcessJob(const InProcessJob&) = delete;
  InProcessJob& operator=(const InProcessJob&) = delete;

  // The coordinator's end (rank 0), for the distributed engine.
  JobRuntime& coordinator();

  // In-memory control plane shared by both ends (defined in the .cc).
  struct Mailboxes;
  class End;

 private:
  InProcessJob();
  std::unique_ptr<Mailboxes> mailboxes_;
  std::unique_ptr<End> coordinator_;
  std::unique_ptr<End> worker_;
  std::thread worker_thread_;
};

// The data plane of a job with a single worker: every operation is local (host memory). Exchange takes
// only pairs with peer 0 (the worker itself), copying each send to the receive posted in the same order.
std::unique_ptr<Collectives> MakeSingleWorkerCollectives();

}  // namespace kvshard
