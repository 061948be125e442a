#include "worker/in_process_job.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "worker/worker_runtime.h"

namespace kvshard {
namespace {

constexpr int kCoordinatorRank = 0;
constexpr int kWorkerRank = 1;

class SingleWorkerCollectives final : public Collectives {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "local"; }
  absl::Status AllReduce(void*, int64_t count, WireType, ReduceOp) override {
    if (count < 0) return absl::InvalidArgumentError(absl::StrCat("AllReduce: count ", count, " out of range"));
    return absl::OkStatus();
  }
  absl::Status AllGather(const void* send, void* recv, int64_t bytes_per_rank) override {
    if (bytes_per_rank < 0) return absl::InvalidArgumentError("AllGather: negative size");
    if (bytes_per_rank > 0 && send != recv) std::memmove(recv, send, bytes_per_rank);
    return absl::OkStatus();
  }
  absl::Status Broadcast(void*, int64_t bytes, int root) override {
    if (root != 0 || bytes < 0) {
      return absl::InvalidArgumentError(absl::StrCat("Broadcast from worker ", root, " in a job of one worker"));
    }
    return absl::OkStatus();
  }
  absl::Status Exchange(std::span<const SendBuffer> sends, std::span<const RecvBuffer> recvs) override {
    if (sends.size() != recvs.size()) {
      return absl::InvalidArgumentError(absl::StrCat("Exchange in a job of one worker: ", sends.size(), " sends but ",
                                                     recvs.size(), " receives"));
    }
    for (size_t i = 0; i < sends.size(); ++i) {
      if (sends[i].peer != 0 || recvs[i].peer != 0) {
        return absl::InvalidArgumentError("Exchange names a peer beyond the job's one worker");
      }
      if (sends[i].bytes != recvs[i].bytes) {
        return absl::InvalidArgumentError(absl::StrCat("Exchange: ", sends[i].bytes, " bytes sent, ", recvs[i].bytes,
                                                       " expected"));
      }
      if (sends[i].bytes > 0) std::memcpy(recvs[i].data, sends[i].data, sends[i].bytes);
    }
    return absl::OkStatus();
  }
};

}  // namespace

std::unique_ptr<Collectives> MakeSingleWorkerCollectives() { return std::make_unique<SingleWorkerCollectives>(); }

struct InProcessJob::Mailboxes {
  struct Envelope {
    int source = 0;
    int tag = 0;
    std::string bytes;
  };
  std::mutex mu;
  std::condition_variable arrived;
  std::deque<Envelope> inbox[2];  // by destination rank; guarded by mu
};

class InProcessJob::End final : public JobRuntime {
 public:
  End(Mailboxes& mailboxes, int rank) : mailboxes_(mailboxes), rank_(rank) {}

  int world_rank() const override { return rank_; }
  int world_size() const override { return 2; }
  std::string WorkerName(int) const override { return "worker"; }
  // The coordinator's thread sleeps while the worker computes, so the worker may take every CPU.
  int ranks_on_node() const override { return 1; }
  int local_worker_index() const override { return 0; }
  int workers_on_node() const override { return 1; }

  absl::Status SendMessage(int dest, int tag, std::string_view bytes, absl::Duration) override {
    if (dest != kCoordinatorRank && dest != kWorkerRank) {
      return absl::InvalidArgumentError(absl::StrCat("no rank ", dest, " in single-process mode"));
    }
    {
      std::lock_guard<std::mutex> lock(mailboxes_.mu);
      mailboxes_.inbox[dest].push_back({rank_, tag, std::string(bytes)});
    }
    mailboxes_.arrived.notify_all();
    return absl::OkStatus();
  }

  absl::StatusOr<Message> ReceiveMessage(int source, int tag, absl::Duration timeout) override {
    const absl::Time deadline = timeout == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + timeout;
    std::unique_lock<std::mutex> lock(mailboxes_.mu);
    std::deque<Mailboxes::Envelope>& inbox = mailboxes_.inbox[rank_];
    while (true) {
      const auto match = std::find_if(inbox.begin(), inbox.end(), [&](const Mailboxes::Envelope& e) {
        return e.tag == tag && (source == kAnySource || e.source == source);
      });
      if (match != inbox.end()) {
        Message message{match->source, std::move(match->bytes)};
        inbox.erase(match);
        return message;
      }
      if (deadline == absl::InfiniteFuture()) {
        mailboxes_.arrived.wait(lock);
      } else if (mailboxes_.arrived.wait_until(lock, absl::ToChronoTime(deadline)) == std::cv_status::timeout &&
                 absl::Now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("no message (tag ", tag, ") within ", absl::FormatDuration(timeout)));
      }
    }
  }

  absl::StatusOr<std::unique_ptr<Collectives>> MakeWorkerCollectives(absl::Duration) override {
    if (rank_ != kWorkerRank) return absl::FailedPreconditionError("the coordinator has no worker communicator");
    return MakeSingleWorkerCollectives();
  }

  [[noreturn]] void Abort(std::string_view message) override {
    std::fprintf(stderr, "kvshard: %s: %s\n", rank_ == kCoordinatorRank ? "coordinator" : "worker",
                 std::string(message).c_str());
    std::fflush(stderr);
    std::_Exit(1);
  }

 private:
  Mailboxes& mailboxes_;
  const int rank_;
};

InProcessJob::InProcessJob()
    : mailboxes_(std::make_unique<Mailboxes>()),
      coordinator_(std::make_unique<End>(*mailboxes_, kCoordinatorRank)),
      worker_(std::make_unique<End>(*mailboxes_, kWorkerRank)) {}

std::unique_ptr<InProcessJob> InProcessJob::Start(KvShardFactoryMaker kv_factories) {
  std::unique_ptr<InProcessJob> job(new InProcessJob());
  job->worker_thread_ = std::thread([end = job->worker_.get(), factories = std::move(kv_factories)]() mutable {
    RunWorker(*end, std::move(factories));
  });
  return job;
}

InProcessJob::~InProcessJob() {
  if (worker_thread_.joinable()) {
    ShutdownWorkers(*coordinator_);
    worker_thread_.join();
  }
}

JobRuntime& InProcessJob::coordinator() { return *coordinator_; }

}  // namespace kvshard
