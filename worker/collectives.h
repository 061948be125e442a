// The data plane among the workers of one job: the per-layer merge of attention partials in decode and
// the pass-Q transfers of prefill. One small interface with two backends:
//   - MPI on the CPU backend (MakeMpiCollectives in worker/mpi_runtime.h), over a communicator of the
//     workers only (the coordinator, MPI rank 0, takes no part);
//   - NCCL on GPUs: worker 0 makes an ncclUniqueId and broadcasts it with the MPI backend's Broadcast,
//     then every worker calls ncclCommInitRank(size(), id, rank()).
//
// Ranks here are worker indices 0..size()-1 (MPI world rank minus one). Buffers are host memory for MPI
// and device memory for NCCL. Every call is collective over all workers, except Exchange, which involves
// only the peers it names. A call returns when its output buffers hold the result; the NCCL backend
// returns once the work is enqueued on the worker's stream, whose later work then sees the result.
//
// A peer that does not take part within the backend's timeout gives DeadlineExceeded naming the
// operation. Collectives cannot be cancelled, so the job cannot go on after that: the caller reports
// the error and aborts the job.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"

namespace kvshard {

// Element types on the wire. bf16 is round-to-nearest-even (common/half.h); a bf16 sum adds in fp32
// and rounds once per reduction step.
enum class WireType { kF32, kBf16 };
enum class ReduceOp { kSum, kMax };

inline int64_t WireTypeBytes(WireType type) { return type == WireType::kBf16 ? 2 : 4; }

struct SendBuffer {
  int peer = 0;
  const void* data = nullptr;
  int64_t bytes = 0;
};
struct RecvBuffer {
  int peer = 0;
  void* data = nullptr;
  int64_t bytes = 0;  // must equal what the peer sends
};

class Collectives {
 public:
  virtual ~Collectives() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "mpi", "nccl"

  // In place over `count` elements of `type`: every worker ends with the elementwise sum or max.
  virtual absl::Status AllReduce(void* data, int64_t count, WireType type, ReduceOp op) = 0;
  // Each worker contributes `bytes_per_rank` bytes from `send`; `recv` gets size() * bytes_per_rank
  // bytes, worker i's at offset i * bytes_per_rank.
  virtual absl::Status AllGather(const void* send, void* recv, int64_t bytes_per_rank) = 0;
  // Worker `root`'s `bytes` bytes of `data` reach every worker's `data`.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root) = 0;
  // Point-to-point: all these sends and receives are in flight together (one NCCL group), so their
  // order cannot deadlock. Messages between two workers are matched in the order they are posted.
  virtual absl::Status Exchange(std::span<const SendBuffer> sends, std::span<const RecvBuffer> recvs) = 0;
};

}  // namespace kvshard
