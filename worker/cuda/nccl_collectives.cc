#include "worker/cuda/nccl_collectives.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"

namespace kvshard {
namespace {

// Paces the polls of a wait for the GPU or for peers. It yields (spins) for the first kSpin of a wait, as
// cudaStreamSynchronize would: a decode step is 1 to 25 ms, and each poll after it ends is latency every
// token pays. After that it sleeps a 64th of the time waited so far, at most 1 ms, so a wait of T returns
// at most about T / 64 late and a long prefill chunk or a stalled peer does not keep a core busy.
// (Sleeps doubling to 1 ms after 200 us of spinning woke the demo's 2 ms decode step up to a millisecond
// late.)
class Backoff {
 public:
  void Wait() {
    const auto elapsed = std::chrono::steady_clock::now() - start_;
    if (elapsed < kSpin) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(elapsed / 64, kMaxSleep));
  }

 private:
  static constexpr std::chrono::milliseconds kSpin{50};
  static constexpr std::chrono::milliseconds kMaxSleep{1};
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

absl::Time Now() { return absl::Now(); }

absl::Status CheckBytes(int64_t bytes, const char* what) {
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat("nccl ", what, ": negative size ", bytes));
  return absl::OkStatus();
}

}  // namespace

NcclCollectives::NcclCollectives(ncclComm_t comm, int rank, int size, cudaStream_t stream, absl::Duration timeout)
    : comm_(comm), rank_(rank), size_(size), stream_(stream), timeout_(timeout) {}

absl::StatusOr<std::unique_ptr<NcclCollectives>> NcclCollectives::Create(Collectives& bootstrap, cudaStream_t stream,
                                                                          absl::Duration timeout) {
  const int rank = bootstrap.rank();
  const int size = bootstrap.size();
  ncclUniqueId id{};
  if (rank == 0) NCCL_RETURN_IF_ERROR(rank, ncclGetUniqueId(&id));
  KV_RETURN_IF_ERROR(bootstrap.Broadcast(&id, sizeof(id), 0));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every wait is polled, so a missing peer gives DeadlineExceeded, not a hang
  ncclComm_t comm = nullptr;
  const ncclResult_t result = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  if (comm == nullptr) NCCL_RETURN_IF_ERROR(rank, result);
  std::unique_ptr<NcclCollectives> collectives(new NcclCollectives(comm, rank, size, stream, timeout));
  KV_RETURN_IF_ERROR(collectives->Complete(result, "ncclCommInitRankConfig(&comm, size, id, rank, &config)",
                                           absl::StrCat("join of a communicator of ", size, " workers"), __FILE__,
                                           __LINE__));
  // Every worker is there: make the blocking working communicator from a fresh id, then drop the joined
  // one (no work on it, so its abort is local).
  ncclComm_t joined = collectives->comm_;
  collectives->comm_ = nullptr;
  ncclUniqueId working_id{};
  absl::Status made = rank == 0 ? NcclStatus(ncclGetUniqueId(&working_id), "ncclGetUniqueId(&working_id)", rank,
                                             __FILE__, __LINE__)
                                : absl::OkStatus();
  // Worker 0 broadcasts even after a failure (a zero id), so that the others fail in the init, bounded.
  const absl::Status sent = bootstrap.Broadcast(&working_id, sizeof(working_id), 0);
  if (made.ok()) made = sent;
  if (made.ok()) {
    collectives->watchdog_ = std::thread([c = collectives.get()] { c->Watch(); });
    made = collectives->MakeWorkingCommunicator(working_id);
  }
  ncclCommAbort(joined);
  KV_RETURN_IF_ERROR(made);
  return collectives;
}

absl::Status NcclCollectives::MakeWorkingCommunicator(const ncclUniqueId& id) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 1;
  // Inside a group the init only records the work and hands out the communicator, so the watchdog has
  // it to abort while ncclGroupEnd waits for the other workers.
  NCCL_RETURN_IF_ERROR(rank_, ncclGroupStart());
  ncclComm_t working = nullptr;
  const ncclResult_t init = ncclCommInitRankConfig(&working, size_, id, rank_, &config);
  if (working == nullptr) {
    ncclGroupEnd();  // closes the group; the init's error is the one to report
    return NcclStatus(init == ncclSuccess ? ncclInternalError : init,
                      "ncclCommInitRankConfig(&working, size_, id, rank_, &config)", rank_, __FILE__, __LINE__);
  }
  comm_ = working;  // published to the watchdog by the lock Guarded takes
  return Guarded(
      [&] {
        const ncclResult_t end = ncclGroupEnd();  // makes the communicator
        return init != ncclSuccess ? init : end;
      },
      "ncclCommInitRankConfig(blocking) + ncclGroupEnd",
      absl::StrCat("init of the working communicator of ", size_, " workers"), __FILE__, __LINE__);
}

NcclCollectives::~NcclCollectives() {
  if (comm_ != nullptr) {
    absl::Status status = Synchronize();
    if (status.ok()) {
      status = Guarded([this] { return ncclCommFinalize(comm_); }, "ncclCommFinalize(comm_)", "finalize", __FILE__,
                       __LINE__);
    }
    if (status.ok() && comm_ != nullptr) {
      ncclCommDestroy(comm_);  // local once finalized
      comm_ = nullptr;
    }
    if (comm_ != nullptr) Abort(status).IgnoreError();  // a destructor has no one to report to
  }
  StopWatchdog();
  for (Pending& p : pending_) cudaEventDestroy(p.event);
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
}

void NcclCollectives::StopWatchdog() {
  if (!watchdog_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  watchdog_.join();
}

void NcclCollectives::Watch() {
  // Checks every timeout / 20 (1 ms to 100 ms), so a call is aborted at most that late. The calling
  // thread only takes an uncontended lock around a call; it never wakes this thread.
  const auto period = std::clamp(absl::ToChronoMilliseconds(timeout_) / 20, std::chrono::milliseconds(1),
                                 std::chrono::milliseconds(100));
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    if (in_call_ && !fired_ && std::chrono::steady_clock::now() >= call_deadline_) {
      fired_ = true;
      // The calling thread is inside the call and touches comm_ only after taking mu_ again.
      ncclCommAbort(comm_);
    }
    stop_cv_.wait_for(lock, period, [this] { return stop_; });
  }
}

absl::Status NcclCollectives::Guarded(absl::FunctionRef<ncclResult_t()> call, const char* expr,
                                      const std::string& what, const char* file, int line) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_call_ = true;
    call_deadline_ = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout_);
  }
  const ncclResult_t result = call();
  bool fired;
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_call_ = false;
    fired = fired_;
  }
  if (fired) {
    comm_ = nullptr;  // aborted (and freed) by the watchdog
    return Abort(absl::DeadlineExceededError(
        absl::StrCat(file, ":", line, ": ", Describe(what), " did not return within ",
                     absl::FormatDuration(timeout_), ": a peer did not take part")));
  }
  if (result != ncclSuccess) return Abort(NcclStatus(result, absl::StrCat(expr, " (", what, ")").c_str(), rank_, file, line));
  return absl::OkStatus();
}

std::string NcclCollectives::Describe(const std::string& what) const {
  return absl::StrCat("worker ", rank_, " of ", size_, ": nccl ", what);
}

absl::Status NcclCollectives::Usable(const std::string& what) const {
  if (!aborted_) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(Describe(what), ": the communicator was aborted after: ",
                                                    abort_status_.message()));
}

absl::Status NcclCollectives::Abort(absl::Status status) {
  if (comm_ != nullptr) {
    ncclCommAbort(comm_);  // stops this communicator's kernels, so the stream drains
    comm_ = nullptr;
  }
  // Events of aborted work are released once the stream passes them.
  for (Pending& p : pending_) cudaEventDestroy(p.event);
  pending_.clear();
  if (!aborted_) {
    aborted_ = true;
    abort_status_ = status;
  }
  return status;
}

absl::Status NcclCollectives::Complete(ncclResult_t result, const char* expr, const std::string& what,
                                       const char* file, int line) {
  if (result != ncclSuccess && result != ncclInProgress) {
    return Abort(NcclStatus(result, absl::StrCat(expr, " (", what, ")").c_str(), rank_, file, line));
  }
  const absl::Time deadline = Now() + timeout_;
  Backoff backoff;
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
    if (query != ncclSuccess) return Abort(NcclStatus(query, "ncclCommGetAsyncError", rank_, file, line));
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      return Abort(NcclStatus(state, absl::StrCat(expr, " (", what, ")").c_str(), rank_, file, line));
    }
    if (Now() > deadline) {
      return Abort(absl::DeadlineExceededError(
          absl::StrCat(file, ":", line, ": ", Describe(what), " did not complete within ",
                       absl::FormatDuration(timeout_), ": a peer did not take part")));
    }
    backoff.Wait();
  }
}

absl::Status NcclCollectives::Track(const std::string& what) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream_, &capture));
  if (capture != cudaStreamCaptureStatusNone) return absl::OkStatus();  // the graph's replay is waited for
  while (!pending_.empty()) {  // recycle the events the stream has passed
    const cudaError_t e = cudaEventQuery(pending_.front().event);
    if (e == cudaErrorNotReady) break;
    CUDA_RETURN_IF_ERROR(e);
    free_events_.push_back(pending_.front().event);
    pending_.pop_front();
  }
  cudaEvent_t event;
  if (free_events_.empty()) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  } else {
    event = free_events_.back();
    free_events_.pop_back();
  }
  CUDA_RETURN_IF_ERROR(cudaEventRecord(event, stream_));
  pending_.push_back({event, what});
  return absl::OkStatus();
}

absl::Status NcclCollectives::Synchronize() {
  KV_RETURN_IF_ERROR(Usable("synchronize"));
  KV_RETURN_IF_ERROR(Track("stream work after the last collective"));
  absl::Time deadline = Now() + timeout_;
  Backoff backoff;
  while (!pending_.empty()) {
    const cudaError_t e = cudaEventQuery(pending_.front().event);
    if (e == cudaSuccess) {
      free_events_.push_back(pending_.front().event);
      pending_.pop_front();
      deadline = Now() + timeout_;  // progress
      backoff = Backoff();
      continue;
    }
    if (e != cudaErrorNotReady) CUDA_RETURN_IF_ERROR(e);
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
    if (query != ncclSuccess) return Abort(NcclStatus(query, "ncclCommGetAsyncError", rank_, __FILE__, __LINE__));
    if (state != ncclSuccess && state != ncclInProgress) {
      return Abort(NcclStatus(state, absl::StrCat("(asynchronous) ", pending_.front().what).c_str(), rank_,
                              __FILE__, __LINE__));
    }
    if (Now() > deadline) {
      return Abort(absl::DeadlineExceededError(absl::StrCat(Describe(pending_.front().what),
                                                            " did not complete within ",
                                                            absl::FormatDuration(timeout_),
                                                            ": a peer did not take part")));
    }
    backoff.Wait();
  }
  return absl::OkStatus();
}

absl::Status NcclCollectives::AllReduce(void* data, int64_t count, WireType type, ReduceOp op) {
  const Reduction reduction{data, count, type, op};
  return AllReduces(std::span<const Reduction>(&reduction, 1));
}

absl::Status NcclCollectives::AllReduces(std::span<const Reduction> reductions) {
  std::string what;
  bool any = false;
  for (const Reduction& r : reductions) {
    KV_RETURN_IF_ERROR(CheckBytes(r.count, "allreduce"));
    absl::StrAppend(&what, what.empty() ? "" : " + ", "allreduce ", r.op == ReduceOp::kSum ? "sum" : "max", " of ",
                    r.count, r.type == WireType::kBf16 ? " bf16" : " fp32", " values");
    any = any || r.count > 0;
  }
  KV_RETURN_IF_ERROR(Usable(what));
  if (!any) return absl::OkStatus();
  auto enqueue = [&] {
    // Inside a group the calls only record the operations; ncclGroupEnd launches them together.
    ncclResult_t first_error = ncclSuccess;
    auto note = [&](ncclResult_t r) {
      if (r != ncclSuccess && first_error == ncclSuccess) first_error = r;
    };
    const bool group = reductions.size() > 1;
    if (group) note(ncclGroupStart());
    for (const Reduction& r : reductions) {
      if (r.count == 0) continue;
      note(ncclAllReduce(r.data, r.data, static_cast<size_t>(r.count),
                         r.type == WireType::kBf16 ? ncclBfloat16 : ncclFloat32,
                         r.op == ReduceOp::kSum ? ncclSum : ncclMax, comm_, stream_));
    }
    if (group) note(ncclGroupEnd());
    return first_error;
  };
  KV_RETURN_IF_ERROR(Guarded(enqueue, "ncclAllReduce", what, __FILE__, __LINE__));
  return Track(what);
}

absl::Status NcclCollectives::AllGather(const void* send, void* recv, int64_t bytes_per_rank) {
  KV_RETURN_IF_ERROR(CheckBytes(bytes_per_rank, "allgather"));
  const std::string what = absl::StrCat("allgather of ", bytes_per_rank, " bytes per worker");
  KV_RETURN_IF_ERROR(Usable(what));
  if (bytes_per_rank == 0) return absl::OkStatus();
  KV_RETURN_IF_ERROR(Guarded(
      [&] { return ncclAllGather(send, recv, static_cast<size_t>(bytes_per_rank), ncclUint8, comm_, stream_); },
      "ncclAllGather", what, __FILE__, __LINE__));
  return Track(what);
}

absl::Status NcclCollectives::Broadcast(void* data, int64_t bytes, int root) {
  KV_RETURN_IF_ERROR(CheckBytes(bytes, "broadcast"));
  if (root < 0 || root >= size_) {
    return absl::InvalidArgumentError(absl::StrCat(Describe("broadcast"), ": root ", root, " of ", size_));
  }
  const std::string what = absl::StrCat("broadcast of ", bytes, " bytes from worker ", root);
  KV_RETURN_IF_ERROR(Usable(what));
  if (bytes == 0) return absl::OkStatus();
  KV_RETURN_IF_ERROR(Guarded(
      [&] { return ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, stream_); },
      "ncclBroadcast", what, __FILE__, __LINE__));
  return Track(what);
}

absl::Status NcclCollectives::Exchange(std::span<const SendBuffer> sends, std::span<const RecvBuffer> recvs) {
  const std::string what = absl::StrCat("exchange of ", sends.size(), " sends and ", recvs.size(), " receives");
  for (const SendBuffer& s : sends) {
    KV_RETURN_IF_ERROR(CheckBytes(s.bytes, "send"));
    if (s.peer < 0 || s.peer >= size_) {
      return absl::InvalidArgumentError(absl::StrCat(Describe(what), ": send to worker ", s.peer));
    }
  }
  for (const RecvBuffer& r : recvs) {
    KV_RETURN_IF_ERROR(CheckBytes(r.bytes, "receive"));
    if (r.peer < 0 || r.peer >= size_) {
      return absl::InvalidArgumentError(absl::StrCat(Describe(what), ": receive from worker ", r.peer));
    }
  }
  KV_RETURN_IF_ERROR(Usable(what));
  if (sends.empty() && recvs.empty()) return absl::OkStatus();
  // Inside a group the calls only record the operations; ncclGroupEnd launches them all together.
  auto enqueue = [&] {
    ncclResult_t first_error = ncclSuccess;
    auto note = [&](ncclResult_t r) {
      if (r != ncclSuccess && first_error == ncclSuccess) first_error = r;
    };
    note(ncclGroupStart());
    for (const RecvBuffer& r : recvs) {
      if (r.bytes > 0) note(ncclRecv(r.data, static_cast<size_t>(r.bytes), ncclUint8, r.peer, comm_, stream_));
    }
    for (const SendBuffer& s : sends) {
      if (s.bytes > 0) note(ncclSend(s.data, static_cast<size_t>(s.bytes), ncclUint8, s.peer, comm_, stream_));
    }
    note(ncclGroupEnd());
    return first_error;
  };
  KV_RETURN_IF_ERROR(Guarded(enqueue, "ncclSend/ncclRecv", what, __FILE__, __LINE__));
  return Track(what);
}

}  // namespace kvshard
