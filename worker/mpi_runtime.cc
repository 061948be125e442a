#include "worker/mpi_runtime.h"

#include <mpi.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/half.h"

namespace kvshard {
namespace {

MpiRuntime* g_runtime = nullptr;
MPI_Comm g_worker_comm = MPI_COMM_NULL;
MPI_Op g_bf16_sum = MPI_OP_NULL;
MPI_Op g_bf16_max = MPI_OP_NULL;

constexpr int kExchangeTag = 17;  // on the workers' communicator, apart from every control tag

void Bf16Sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = FloatToBf16(Bf16ToFloat(a[i]) + Bf16ToFloat(b[i]));
}

void Bf16Max(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    if (Bf16ToFloat(a[i]) > Bf16ToFloat(b[i])) b[i] = a[i];
  }
}

// Sleeps between polls: a few quick retries, then sleeps of a 64th of the time waited so far (at least
// 4 us), at most kFastSleepCapUs for the first kFastWindow of waiting (a step's message usually comes
// within it: a longer sleep there is latency every step pays), then at most `cap_us` (an idle worker
// should not spin). The polling thread asks for precise sleeps: with Linux's default timer slack of 50 us
// a 4 us sleep lasted 55 us or more, and each control message of a decode step waited for one (0.36 ms
// a step between the coordinator and one GPU worker; 0.09 ms with precise sleeps).
class Backoff {
 public:
  explicit Backoff(int cap_us) : cap_us_(cap_us), start_(absl::Now()) {}
  void Pause() {
    if (++polls_ <= 32) return;
    RequestPreciseSleeps();
    const absl::Duration waited = absl::Now() - start_;
    const int cap = waited < kFastWindow ? std::min(cap_us_, kFastSleepCapUs) : cap_us_;
    const int64_t proportional = absl::ToInt64Microseconds(waited) / 64;
    usleep(static_cast<useconds_t>(std::clamp<int64_t>(proportional, 4, cap)));
  }

 private:
  static void RequestPreciseSleeps() {
    thread_local bool done = false;
    if (done) return;
    done = true;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);  // 1 us; best effort (sleeps are only less precise without)
  }

  static constexpr int kFastSleepCapUs = 50;
  static constexpr absl::Duration kFastWindow = absl::Milliseconds(500);
  int cap_us_;
  absl::Time start_;
  int polls_ = 0;
};

constexpr int kCollectiveSleepCapUs = 200;
constexpr int kControlSleepCapUs = 2000;

absl::Time DeadlineAfter(absl::Duration timeout) {
  return timeout == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + timeout;
}

// Polls `requests` until all complete, or returns DeadlineExceeded at `deadline` (the requests are then
// left pending: the job cannot continue and is aborted by the caller).
absl::Status WaitAll(std::vector<MPI_Request>& requests, absl::Time deadline, absl::Duration timeout,
                     const std::string& what) {
  Backoff backoff(kCollectiveSleepCapUs);
  while (true) {
    int done = 0;
    const int rc = MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) return absl::InternalError(absl::StrCat(what, ": MPI error ", rc));
    if (done) return absl::OkStatus();
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, " timed out after ", absl::FormatDuration(timeout),
                                                      ": a peer did not take part"));
    }
    backoff.Pause();
  }
}

absl::Status CheckCount(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX) return absl::InvalidArgumentError(absl::StrCat(what, ": count ", n, " out of range"));
  return absl::OkStatus();
}

class MpiCollectives final : public Collectives {
 public:
  MpiCollectives(MPI_Comm comm, absl::Duration timeout) : comm_(comm), timeout_(timeout) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  absl::Status AllReduce(void* data, int64_t count, WireType type, ReduceOp op) override {
    if (count == 0) return absl::OkStatus();
    if (auto s = CheckCount(count, "allreduce"); !s.ok()) return s;
    MPI_Datatype datatype = type == WireType::kF32 ? MPI_FLOAT : MPI_UINT16_T;
    MPI_Op mpi_op;
    if (type == WireType::kF32) {
      mpi_op = op == ReduceOp::kSum ? MPI_SUM : MPI_MAX;
    } else {
      mpi_op = op == ReduceOp::kSum ? g_bf16_sum : g_bf16_max;
    }
    std::vector<MPI_Request> request(1);
    MPI_Iallreduce(MPI_IN_PLACE, data, static_cast<int>(count), datatype, mpi_op, comm_, &request[0]);
    return Wait(request, absl::StrCat("allreduce of ", count, " values"));
  }

  absl::Status AllGather(const void* send, void* recv, int64_t bytes_per_rank) override {
    if (auto s = CheckCount(bytes_per_rank, "allgather"); !s.ok()) return s;
    std::vector<MPI_Request> request(1);
    MPI_Iallgather(send, static_cast<int>(bytes_per_rank), MPI_BYTE, recv, static_cast<int>(bytes_per_rank),
                   MPI_BYTE, comm_, &request[0]);
    return Wait(request, absl::StrCat("allgather of ", bytes_per_rank, " bytes per worker"));
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    if (auto s = CheckCount(bytes, "broadcast"); !s.ok()) return s;
    if (root < 0 || root >= size_) return absl::InvalidArgumentError(absl::StrCat("broadcast root ", root));
    std::vector<MPI_Request> request(1);
    MPI_Ibcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_, &request[0]);
    return Wait(request, absl::StrCat("broadcast of ", bytes, " bytes"));
  }

  absl::Status Exchange(std::span<const SendBuffer> sends, std::span<const RecvBuffer> recvs) override {
    std::vector<MPI_Request> requests;
    requests.reserve(sends.size() + recvs.size());
    for (const RecvBuffer& r : recvs) {
      if (auto s = CheckCount(r.bytes, "receive"); !s.ok()) return s;
      requests.emplace_back();
      MPI_Irecv(r.data, static_cast<int>(r.bytes), MPI_BYTE, r.peer, kExchangeTag, comm_, &requests.back());
    }
    for (const SendBuffer& s : sends) {
      if (auto st = CheckCount(s.bytes, "send"); !st.ok()) return st;
      requests.emplace_back();
      MPI_Isend(s.data, static_cast<int>(s.bytes), MPI_BYTE, s.peer, kExchangeTag, comm_, &requests.back());
    }
    if (requests.empty()) return absl::OkStatus();
    return Wait(requests, absl::StrCat("exchange of ", sends.size(), " sends and ", recvs.size(), " receives"));
  }

 private:
  absl::Status Wait(std::vector<MPI_Request>& requests, const std::string& what) {
    return WaitAll(requests, DeadlineAfter(timeout_), timeout_,
                   absl::StrCat("worker ", rank_, " (MPI rank ", g_runtime ? g_runtime->world_rank() : -1,
                                "): ", what));
  }

  MPI_Comm comm_;
  absl::Duration timeout_;
  int rank_ = 0;
  int size_ = 1;
};

bool EnvSet(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0';
}

int EnvInt(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

}  // namespace

bool LaunchedByMpirunWithPeers() {
  // The launcher's own variables: Open MPI, then PMIx/PMI (MPICH, Slurm's srun).
  for (const char* size_var : {"OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"}) {
    if (EnvSet(size_var)) return EnvInt(size_var) > 1;
  }
  if (EnvSet("PMIX_RANK")) return true;  // PMIx without a size variable: ask MPI
  return false;
}

absl::StatusOr<MpiRuntime*> MpiRuntime::Initialize(int* argc, char*** argv) {
  if (g_runtime != nullptr) return g_runtime;
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
    return absl::InternalError("MPI_Init_thread failed");
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    return absl::FailedPreconditionError("the MPI library does not support MPI_THREAD_SERIALIZED");
  }
  // Errors come back as return codes rather than aborting inside the library.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  auto* runtime = new MpiRuntime();
  MPI_Comm_rank(MPI_COMM_WORLD, &runtime->world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &runtime->world_size_);
  MPI_Comm node_comm;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, runtime->world_rank_, MPI_INFO_NULL, &node_comm);
  MPI_Comm_size(node_comm, &runtime->ranks_on_node_);
  MPI_Comm_free(&node_comm);
  MPI_Comm_split(MPI_COMM_WORLD, runtime->world_rank_ == 0 ? MPI_UNDEFINED : 1, runtime->world_rank_,
                 &g_worker_comm);
  if (g_worker_comm != MPI_COMM_NULL) {
    MPI_Comm_set_errhandler(g_worker_comm, MPI_ERRORS_RETURN);
    // A worker's index among the workers of its node picks its GPU.
    MPI_Comm worker_node_comm;
    MPI_Comm_split_type(g_worker_comm, MPI_COMM_TYPE_SHARED, runtime->world_rank_, MPI_INFO_NULL,
                        &worker_node_comm);
    MPI_Comm_rank(worker_node_comm, &runtime->local_worker_index_);
    MPI_Comm_size(worker_node_comm, &runtime->workers_on_node_);
    MPI_Comm_free(&worker_node_comm);
  }
  MPI_Op_create(&Bf16Sum, /*commute=*/1, &g_bf16_sum);
  MPI_Op_create(&Bf16Max, /*commute=*/1, &g_bf16_max);
  g_runtime = runtime;
  return runtime;
}

MpiRuntime* MpiRuntime::Get() { return g_runtime; }

absl::Status MpiRuntime::SendMessage(int dest, int tag, std::string_view bytes, absl::Duration timeout) {
  if (auto s = CheckCount(static_cast<int64_t>(bytes.size()), "control message"); !s.ok()) return s;
  std::vector<MPI_Request> request(1);
  MPI_Isend(bytes.data(), static_cast<int>(bytes.size()), MPI_BYTE, dest, tag, MPI_COMM_WORLD, &request[0]);
  return WaitAll(request, DeadlineAfter(timeout), timeout,
                 absl::StrCat("rank ", world_rank_, ": control message to rank ", dest));
}

absl::StatusOr<MpiRuntime::Message> MpiRuntime::ReceiveMessage(int source, int tag, absl::Duration timeout) {
  const absl::Time deadline = DeadlineAfter(timeout);
  Backoff backoff(kControlSleepCapUs);
  const int mpi_source = source == kAnySource ? MPI_ANY_SOURCE : source;
  while (true) {
    int found = 0;
    MPI_Message message;
    MPI_Status status;
    MPI_Improbe(mpi_source, tag, MPI_COMM_WORLD, &found, &message, &status);
    if (found) {
      int count = 0;
      MPI_Get_count(&status, MPI_BYTE, &count);
      Message out;
      out.source = status.MPI_SOURCE;
      out.bytes.resize(count);
      MPI_Mrecv(out.bytes.data(), count, MPI_BYTE, &message, MPI_STATUS_IGNORE);
      return out;
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat("no message (tag ", tag, ") within ",
                                                      absl::FormatDuration(timeout)));
    }
    backoff.Pause();
  }
}

absl::StatusOr<std::unique_ptr<Collectives>> MpiRuntime::MakeWorkerCollectives(absl::Duration timeout) {
  if (g_worker_comm == MPI_COMM_NULL) {
    return absl::FailedPreconditionError("the coordinator (rank 0) has no worker communicator");
  }
  return std::unique_ptr<Collectives>(new MpiCollectives(g_worker_comm, timeout));
}

std::unique_ptr<Collectives> MpiRuntime::MakeWorldCollectivesForTesting(absl::Duration timeout) {
  return std::make_unique<MpiCollectives>(MPI_COMM_WORLD, timeout);
}

void MpiRuntime::Abort(std::string_view message) {
  std::fprintf(stderr, "kvshard: rank %d: %s\n", world_rank_, std::string(message).c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

void MpiRuntime::Finalize() {
  if (finalized_) return;
  finalized_ = true;
  if (g_worker_comm != MPI_COMM_NULL) MPI_Comm_free(&g_worker_comm);
  MPI_Op_free(&g_bf16_sum);
  MPI_Op_free(&g_bf16_max);
  MPI_Finalize();
}

}  // namespace kvshard
