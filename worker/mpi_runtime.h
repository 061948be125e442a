// Process roles under mpirun and the MPI plumbing of both planes.
//
// `mpirun -np N+1 kvshard COMMAND ...` starts rank 0 as the coordinator and ranks 1..N as workers.
// Without mpirun (or with a single rank) kvshard runs in single-process mode and never touches MPI.
//
// Control plane: messages of bytes over MPI_COMM_WORLD with a tag per kind (worker/control.h).
// Data plane: a communicator of the workers only (MPI_Comm_split leaving rank 0 out), behind the
// Collectives interface (worker/collectives.h).
//
// Waiting never busy-spins for long: requests are polled with MPI_Test and a short sleep that grows to
// a cap, so idle ranks leave the cores to the busy ones (tests run many ranks on two cores).
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/collectives.h"
#include "worker/job_runtime.h"

namespace kvshard {

// True when this process was started by mpirun/mpiexec (Open MPI, PMIx or PMI launch variables), and
// the job has more than one rank.
bool LaunchedByMpirunWithPeers();

class MpiRuntime final : public JobRuntime {
 public:
  // Initializes MPI once per process (thread level "serialized": one thread at a time calls MPI) and
  // builds the workers' communicator. Later calls return the same runtime.
  static absl::StatusOr<MpiRuntime*> Initialize(int* argc, char*** argv);
  // The runtime, or nullptr when MPI was not initialized (single-process mode).
  static MpiRuntime* Get();

  int world_rank() const override { return world_rank_; }
  int world_size() const override { return world_size_; }
  int ranks_on_node() const override { return ranks_on_node_; }
  int local_worker_index() const override { return local_worker_index_; }
  int workers_on_node() const override { return workers_on_node_; }

  // Control messages over MPI_COMM_WORLD; the workers' data plane over their own communicator.
  absl::Status SendMessage(int dest, int tag, std::string_view bytes, absl::Duration timeout) override;
  absl::StatusOr<Message> ReceiveMessage(int source, int tag, absl::Duration timeout) override;
  absl::StatusOr<std::unique_ptr<Collectives>> MakeWorkerCollectives(absl::Duration timeout) override;
  // Collectives over every rank of the job, the coordinator included: for multi-rank unit tests that
  // run the same code on every rank.
  std::unique_ptr<Collectives> MakeWorldCollectivesForTesting(absl::Duration timeout);

  // Prints "kvshard: rank R: MESSAGE" on stderr and ends the whole job (MPI_Abort).
  [[noreturn]] void Abort(std::string_view message) override;
  // Ends MPI for this process (after every message is done).
  void Finalize();

 private:
  MpiRuntime() = default;
  int world_rank_ = 0;
  int world_size_ = 1;
  int ranks_on_node_ = 1;
  int local_worker_index_ = 0;
  int workers_on_node_ = 0;
  bool finalized_ = false;
};

}  // namespace kvshard
