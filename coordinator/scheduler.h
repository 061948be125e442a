// Runs API requests on the engine in arrival order, as many at once as the engine batches
// (Engine::max_concurrent_requests: the distributed engine's decode batch; one in single-process mode),
// each on an engine thread of its own. HTTP handler threads submit requests and wait on a ticket; the
// engine threads never block on a client socket.
// The queue of waiting requests is bounded: when it is full, Submit answers ResourceExhausted (429)
// instead of letting the queue grow.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/engine.h"
#include "coordinator/metrics.h"
#include "coordinator/openai_api.h"

namespace kvshard {

// One submitted request, shared by the handler thread that waits on it and the engine thread.
class RequestTicket {
 public:
  enum class Event { kText, kDone, kIdle };

  explicit RequestTicket(bool stream) : stream_(stream) {}
  // Blocks until new text, the end, or `timeout`. kText moves the text shown since the last call into
  // *text (pieces coalesce when the client reads slower than the engine writes); kDone means outcome()
  // is set; kIdle means nothing happened within the timeout (a long prefill).
  Event WaitNext(std::string* text, std::chrono::milliseconds timeout);
  // Blocks until the request is done; returns its outcome.
  const absl::StatusOr<GenerationOutcome>& Wait();
  const absl::StatusOr<GenerationOutcome>& outcome() const { return outcome_; }
  // The client went away: the request leaves the queue, or its generation stops at the next token.
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  // Engine side.
  bool PushText(std::string_view text);  // false when cancelled
  void Finish(absl::StatusOr<GenerationOutcome> outcome);

 private:
  const bool stream_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::string text_;
  bool done_ = false;
  absl::StatusOr<GenerationOutcome> outcome_ = absl::UnknownError("not finished");
  std::atomic<bool> cancelled_{false};
};

class RequestScheduler {
 public:
  // `metrics` may be null. At most `max_waiting` requests wait while others run.
  RequestScheduler(Engine& engine, int max_waiting, ServingMetrics* metrics);
  ~RequestScheduler();  // Shutdown()
  RequestScheduler(const RequestScheduler&) = delete;
  RequestScheduler& operator=(const RequestScheduler&) = delete;

  // Queues a request. ResourceExhausted when the queue is full, Unavailable after Shutdown.
  absl::StatusOr<std::shared_ptr<RequestTicket>> Submit(const ApiRequest& request);
  // Fails every waiting request, cancels the running one, and joins the engine thread.
  void Shutdown();

  int64_t waiting() const;

 private:
  struct Job {
    GenerationRequest request;
    std::shared_ptr<RequestTicket> ticket;
    std::chrono::steady_clock::time_point arrival;
  };
  void Loop();
  void Run(Job& job);
  void UpdateQueueGauges();  // mutex_ held

  Engine& engine_;
  const int max_waiting_;
  ServingMetrics* metrics_;
  mutable std::mutex mutex_;
  std::condition_variable has_work_;
  std::deque<Job> queue_;
  std::vector<std::shared_ptr<RequestTicket>> running_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvshard
