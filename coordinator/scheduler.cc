#include "coordinator/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvshard {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// KV gauges are refreshed at most this often during a generation (and always at its end).
constexpr double kKvMemoryRefreshSeconds = 1.0;

}  // namespace

RequestTicket::Event RequestTicket::WaitNext(std::string* text, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!changed_.wait_for(lock, timeout, [&] { return !text_.empty() || done_; })) return Event::kIdle;
  if (!text_.empty()) {
    text->swap(text_);
    text_.clear();
    return Event::kText;
  }
  return Event::kDone;
}

const absl::StatusOr<GenerationOutcome>& RequestTicket::Wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return done_; });
  return outcome_;
}

bool RequestTicket::PushText(std::string_view text) {
  if (cancelled()) return false;
  if (!stream_) return true;  // the handler waits for the outcome, which carries the whole text
  {
    std::lock_guard<std::mutex> lock(mutex_);
    text_.append(text);
  }
  changed_.notify_all();
  return true;
}

void RequestTicket::Finish(absl::StatusOr<GenerationOutcome> outcome) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    outcome_ = std::move(outcome);
    done_ = true;
  }
  changed_.notify_all();
}

RequestScheduler::RequestScheduler(Engine& engine, int max_waiting, ServingMetrics* metrics)
    : engine_(engine), max_waiting_(max_waiting), metrics_(metrics) {
  if (metrics_ != nullptr) engine_.set_observer(metrics_);
  const int engine_threads = std::max(1, engine_.max_concurrent_requests());
  for (int i = 0; i < engine_threads; ++i) threads_.emplace_back([this] { Loop(); });
}

RequestScheduler::~RequestScheduler() { Shutdown(); }

absl::StatusOr<std::shared_ptr<RequestTicket>> RequestScheduler::Submit(const ApiRequest& request) {
  auto ticket = std::make_shared<RequestTicket>(request.stream);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) {
      return ApiError(absl::StatusCode::kUnavailable, "the server is shutting down");
    }
    if (static_cast<int>(queue_.size()) >= max_waiting_) {
      return ApiError(absl::StatusCode::kResourceExhausted,
                      absl::StrCat("the server is busy: ", queue_.size(),
                                   " requests are waiting (max_queue); retry later"),
                      {}, "queue_full");
    }
    queue_.push_back(Job{request.generation, ticket, Clock::now()});
    UpdateQueueGauges();
  }
  has_work_.notify_one();
  return ticket;
}

int64_t RequestScheduler::waiting() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(queue_.size());
}

void RequestScheduler::UpdateQueueGauges() {
  if (metrics_ == nullptr) return;
  metrics_->SetRequestsWaiting(static_cast<int64_t>(queue_.size()));
  metrics_->SetRequestsRunning(static_cast<int64_t>(running_.size()));
}

void RequestScheduler::Shutdown() {
  std::deque<Job> abandoned;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_ && threads_.empty()) return;
    stopping_ = true;
    abandoned.swap(queue_);
    for (const std::shared_ptr<RequestTicket>& ticket : running_) ticket->Cancel();
    UpdateQueueGauges();
  }
  for (Job& job : abandoned) job.ticket->Finish(absl::UnavailableError("the server is shutting down"));
  has_work_.notify_all();
  for (std::thread& thread : threads_) thread.join();
  threads_.clear();
  if (metrics_ != nullptr) engine_.set_observer(nullptr);
}

void RequestScheduler::Loop() {
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      has_work_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      running_.push_back(job.ticket);
      UpdateQueueGauges();
    }
    if (job.ticket->cancelled()) {
      job.ticket->Finish(absl::CancelledError("the client went away before the request started"));
    } else {
      Run(job);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    running_.erase(std::find(running_.begin(), running_.end(), job.ticket));
    UpdateQueueGauges();
  }
}

void RequestScheduler::Run(Job& job) {
  RequestTicket& ticket = *job.ticket;
  const Clock::time_point start = Clock::now();
  Clock::time_point last_token = start;
  Clock::time_point last_kv_refresh = start;
  Clock::time_point first_token{};
  int64_t tokens = 0;

  GenerationHooks hooks;
  hooks.on_text = [&](std::string_view text) { return ticket.PushText(text); };
  hooks.on_token = [&] {
    const Clock::time_point now = Clock::now();
    if (metrics_ != nullptr) {
      metrics_->AddTokenGenerated();
      if (tokens == 0) {
        metrics_->ObserveTimeToFirstToken(SecondsBetween(job.arrival, now));
      } else {
        metrics_->ObserveInterTokenLatency(SecondsBetween(last_token, now));
      }
      if (SecondsBetween(last_kv_refresh, now) >= kKvMemoryRefreshSeconds) {
        metrics_->SetKvMemory(engine_.kv_memory());
        last_kv_refresh = now;
      }
    }
    if (tokens == 0) first_token = now;
    ++tokens;
    last_token = now;
  };
  // A token callback that returns false is the only way to stop the engine, so a request cancelled
  // while prefilling stops at its first token.
  absl::StatusOr<GenerationOutcome> outcome = RunApiGeneration(engine_, job.request, hooks);

  if (metrics_ != nullptr) {
    const Clock::time_point end = Clock::now();
    metrics_->ObserveRequestDuration(SecondsBetween(job.arrival, end));
    if (outcome.ok()) {
      metrics_->AddTokensPrefilled(outcome->prompt_tokens);
      // The engine's own prefill time when it reports one; else start to first token.
      double prefill = outcome->prefill_seconds;
      if (prefill <= 0 && tokens > 0) prefill = SecondsBetween(start, first_token);
      if (prefill > 0) metrics_->SetPrefillTokensPerSecond(outcome->prompt_tokens / prefill);
    }
    metrics_->SetKvMemory(engine_.kv_memory());
  }
  ticket.Finish(std::move(outcome));
}

}  // namespace kvshard
