// One rank's view of a job: its role, and the two planes between the coordinator and the workers.
//
// Rank 0 is the coordinator, ranks 1..N the workers. Two implementations:
//   - MpiRuntime (worker/mpi_runtime.h): `mpirun -np N+1 kvshard ...`, one process per rank;
//   - InProcessJob (worker/in_process_job.h): single-process mode, the coordinator and one worker as two
//     threads of one process.
// The coordinator (coordinator/distributed_engine.h) and the worker loop (worker/worker_runtime.h) see
// only this interface, so single-process mode runs the same engine as a job under mpirun.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "worker/collectives.h"

namespace kvshard {

class JobRuntime {
 public:
  static constexpr int kAnySource = -1;

  virtual ~JobRuntime() = default;

  virtual int world_rank() const = 0;
  virtual int world_size() const = 0;
  int n_workers() const { return world_size() - 1; }
  bool is_coordinator() const { return world_rank() == 0; }
  // How messages name the worker of world rank `rank`: "worker rank 2" in a job of ranks; in one process,
  // which has no ranks to speak of, "worker".
  virtual std::string WorkerName(int rank) const { return absl::StrCat("worker rank ", rank); }
  // Ranks of this job on this node (the coordinator included): workers size their CPU thread pools by it.
  virtual int ranks_on_node() const = 0;
  // On a worker: its index among the workers of its node (0-based), and their number. A GPU worker
  // takes the GPU of that index.
  virtual int local_worker_index() const = 0;
  virtual int workers_on_node() const = 0;

  // Control plane. Sends `bytes` to rank `dest` with `tag`; waits at most `timeout` for the receiver to
  // take it (or for it to be queued).
  virtual absl::Status SendMessage(int dest, int tag, std::string_view bytes, absl::Duration timeout) = 0;
  struct Message {
    int source = -1;
    std::string bytes;
  };
  // The next message with `tag` from `source` (kAnySource: from any rank). DeadlineExceeded after
  // `timeout` (absl::InfiniteDuration(): wait for ever).
  virtual absl::StatusOr<Message> ReceiveMessage(int source, int tag, absl::Duration timeout) = 0;

  // The data plane of the workers (call on workers only). Operations fail with DeadlineExceeded when
  // peers do not take part within `timeout`.
  virtual absl::StatusOr<std::unique_ptr<Collectives>> MakeWorkerCollectives(absl::Duration timeout) = 0;

  // Prints "kvshard: WHO: MESSAGE" on stderr and ends the whole job: for a peer that stopped answering or a
  // collective that failed, after which no rank can go on.
  [[noreturn]] virtual void Abort(std::string_view message) = 0;
};

}  // namespace kvshard
