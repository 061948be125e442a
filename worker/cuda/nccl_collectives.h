// The GPU data plane: the Collectives interface (worker/collectives.h) over NCCL. Buffers are device
// memory of the calling thread's current CUDA device; every operation is enqueued on the stream the
// communicator was made with, and returns once it is enqueued (later work on that stream sees the result).
//
// Never a hang, at the cost of a plain NCCL call. Joining is non-blocking (ncclConfig_t::blocking = 0,
// polled with ncclCommGetAsyncError), so a worker that never joins gives DeadlineExceeded. Once every
// worker has joined, worker 0 broadcasts a second ncclUniqueId and every worker makes the working
// communicator with it, blocking = 1, then drops the joined one: with blocking = 0 NCCL launches every
// call from a new thread (~100 us a call), with blocking = 1 the caller's thread enqueues it. (A
// blocking split of the joined communicator failed with ncclInternalError on NCCL 2.28.9; NCCL refuses
// blocking and non-blocking communicators in one group, which may be why.)
//
// Two kinds of wait for peers, bounded in two ways:
//   - inside a call: the working communicator's init, and a call that makes the connections of an
//     algorithm on its first use, wait for peers on the calling thread. Every call into NCCL runs
//     under a watchdog thread that aborts the communicator (ncclCommAbort) when the call has not
//     returned within `timeout`; the call then fails with DeadlineExceeded naming the operation. NCCL
//     documents an abort at any point only for non-blocking communicators: on a blocking one (NCCL
//     2.28) the abort sets the abort flag that the blocked call polls, then frees the communicator while
//     that call unwinds. So the watchdog fires only where the process would otherwise hang for good.
//   - on the GPU: a collective that cannot complete because a peer does not take part shows up when the
//     stream is waited for. Synchronize() polls the operations' completion events and the
//     communicator's asynchronous error, and after `timeout` without progress aborts the communicator
//     from the calling thread (which also stops its kernels) and returns DeadlineExceeded naming the
//     operation that did not complete. Callers wait for the stream through Synchronize() only, never with
//     cudaStreamSynchronize.
// After an abort every call fails: the job cannot go on (collectives.h).
//
// CUDA graphs: operations enqueued while the stream is being captured are recorded into the graph and
// not tracked here; a replay is stream work like any other, waited for with Synchronize().
//
// One communicator serves one thread at a time, like the MPI backend.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/collectives.h"

namespace kvshard {

class NcclCollectives final : public Collectives {
 public:
  // Collective over the workers of `bootstrap` (the MPI backend over the workers): worker 0 makes an
  // ncclUniqueId and broadcasts it through `bootstrap`, then every worker joins with
  // ncclCommInitRankConfig(size, id, rank) on its current CUDA device; then the same again for the
  // blocking working communicator. `stream` is the worker's stream (not owned). `timeout` bounds each
  // of the two inits and every later wait for peers.
  static absl::StatusOr<std::unique_ptr<NcclCollectives>> Create(Collectives& bootstrap, cudaStream_t stream,
                                                                 absl::Duration timeout);
  // Finalizes the communicator when its work is done (bounded by the timeout), else aborts it.
  ~NcclCollectives() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  absl::Status AllReduce(void* data, int64_t count, WireType type, ReduceOp op) override;
  absl::Status AllGather(const void* send, void* recv, int64_t bytes_per_rank) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Exchange(std::span<const SendBuffer> sends, std::span<const RecvBuffer> recvs) override;

  // Several all-reduces as one NCCL group (one launch); each as AllReduce would do it.
  struct Reduction {
    void* data;
    int64_t count;
    WireType type;
    ReduceOp op;
  };
  absl::Status AllReduces(std::span<const Reduction> reductions);

  // Waits until everything enqueued on the stream so far has completed. DeadlineExceeded (after aborting
  // the communicator) when no enqueued operation completes within the timeout; the error of the
  // communicator when NCCL reports one.
  absl::Status Synchronize();

  cudaStream_t stream() const { return stream_; }
  absl::Duration timeout() const { return timeout_; }
  // Set once the communicator was aborted (a timeout or an asynchronous NCCL error).
  bool aborted() const { return aborted_; }

 private:
  NcclCollectives(ncclComm_t comm, int rank, int size, cudaStream_t stream, absl::Duration timeout);

  // Makes the blocking working communicator from `id` (every worker calls it) under the watchdog.
  absl::Status MakeWorkingCommunicator(const ncclUniqueId& id);
  // Runs `call` into comm_ under the watchdog: DeadlineExceeded naming `what` (the communicator
  // aborted) when it has not returned within the timeout; its NCCL error otherwise.
  absl::Status Guarded(absl::FunctionRef<ncclResult_t()> call, const char* expr, const std::string& what,
                       const char* file, int line);
  void Watch();
  void StopWatchdog();
  // Polls a non-blocking NCCL call that returned ncclInProgress until it is done; `what` names it.
  absl::Status Complete(ncclResult_t result, const char* expr, const std::string& what, const char* file,
                        int line);
  // After an operation was enqueued: records its completion event, named `what` (nothing while the
  // stream is being captured).
  absl::Status Track(const std::string& what);
  // Fails when the communicator was aborted.
  absl::Status Usable(const std::string& what) const;
  // Aborts the communicator and returns `status` (remembered for later calls).
  absl::Status Abort(absl::Status status);
  std::string Describe(const std::string& what) const;

  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  cudaStream_t stream_ = nullptr;
  absl::Duration timeout_;
  bool aborted_ = false;
  absl::Status abort_status_;
  struct Pending {
    cudaEvent_t event;
    std::string what;
  };
  std::deque<Pending> pending_;        // enqueued, not yet seen complete (in stream order)
  std::vector<cudaEvent_t> free_events_;

  // The watchdog: while a call runs (in_call_), aborts the communicator once call_deadline_ passes.
  std::mutex mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  bool in_call_ = false;
  bool fired_ = false;
  std::chrono::steady_clock::time_point call_deadline_;
  std::thread watchdog_;
};

}  // namespace kvshard
