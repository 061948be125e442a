#include "coordinator/distributed_engine.h"

#include <omp.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/progress.h"
#include "common/status.h"
#include "coordinator/generation_stream.h"
#include "kvstore/kv_scheme.h"
#include "worker/synthetic.h"
#include "worker/worker_runtime.h"

namespace kvshard {

using Clock = std::chrono::steady_clock;

namespace {

double SecondsSince(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

std::string FailureWithAdvice(std::string message, int64_t synthetic_fill_tokens) {
  if (synthetic_fill_tokens > 0 && absl::StrContains(message, kKvqKeyOutlierOverflow)) {
    // The fill's keys are not the model's: a calibration of real text leaves many outside its thresholds.
    absl::StrAppend(&message, ". This request's SYNTHETIC FILL needs a calibration of the fill: kvshard calibrate "
                              "--calibrate_on_fill --out FILE, then --calibration FILE");
  }
  return message;
}

struct DistributedEngine::Request {
  struct Event {
    enum Kind { kFill, kPrefill, kToken, kDone } kind = kDone;
    int64_t done = 0;
    int64_t total = 0;
    double seconds = 0;
    int32_t token = 0;
    absl::Status status;
  };

  // Fixed at creation.
  int64_t id = 0;
  GenerationRequest request;
  std::string scheme;
  int64_t fill = 0;
  int64_t prompt = 0;
  int64_t budget = 0;  // most tokens to generate

  // Scheduler thread only.
  enum class State { kQueued, kFilling, kPrefilling, kDecoding } state = State::kQueued;
  Placement placement;
  std::vector<int64_t> reserved;  // bytes per worker
  int64_t fill_steps = 0;
  int64_t next_chunk = 0;  // absolute position of the next prefill chunk
  int64_t generated = 0;
  int32_t pending_token = -1;
  int64_t next_position = 0;
  Clock::time_point prefill_start, decode_start;
  double prefill_seconds = 0;

  // Shared with the Generate thread.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> events;
  std::atomic<bool> cancelled{false};

  void Post(Event event) {
    {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back(std::move(event));
    }
    cv.notify_one();
  }
  Event Next() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return !events.empty(); });
    Event e = std::move(events.front());
    events.pop_front();
    return e;
  }
};

absl::StatusOr<std::unique_ptr<DistributedEngine>> DistributedEngine::Create(JobRuntime& job, ModelConfig config,
                                                                             std::unique_ptr<Tokenizer> tokenizer,
                                                                             DistributedEngineOptions options) {
  if (!job.is_coordinator()) return absl::FailedPreconditionError("the distributed engine runs on rank 0 only");
  if (job.n_workers() < 1) return absl::FailedPreconditionError("the distributed engine needs at least one worker");
  if (options.worker.kv_budget_bytes < 0) return absl::InvalidArgumentError("the workers' KV budget must not be negative");
  const absl::Duration timeout = absl::Seconds(options.worker_timeout_s);
  WorkerCommand configure;
  configure.kind = CommandKind::kConfigure;
  configure.config = options.worker;
  KV_RETURN_IF_ERROR(SendToAllWorkers(job, configure, timeout));
  std::vector<int64_t> budgets(job.n_workers(), 0);
  std::vector<std::string> devices(job.n_workers());
  std::vector<std::string> errors;
  for (int i = 0; i < job.n_workers(); ++i) {
    auto message = job.ReceiveMessage(JobRuntime::kAnySource, kReplyTag, timeout);
    if (!message.ok()) {
      job.Abort(absl::StrCat("the workers did not report ready within ", options.worker_timeout_s,
                             " s (--worker_timeout_s); ending the job"));
    }
    KV_ASSIGN_OR_RETURN(WorkerHello hello, DecodeHello(message->bytes));
    if (!hello.error.empty()) {
      errors.push_back(hello.error);
      continue;
    }
    if (hello.n_layers != config.n_layers || hello.vocab_size != config.vocab_size) {
      errors.push_back(absl::StrCat(job.WorkerName(message->source), " loaded a model of ", hello.n_layers,
                                    " layers and vocabulary ", hello.vocab_size, "; the coordinator expects ",
                                    config.n_layers, " and ", config.vocab_size));
      continue;
    }
    budgets[hello.worker] = hello.kv_budget_bytes;
    devices[hello.worker] = hello.device;
    if (hello.max_prefill_chunk <= 0) {
      errors.push_back(absl::StrCat(job.WorkerName(message->source), " takes no prompt tokens per step"));
      continue;
    }
    options.prefill_chunk = options.prefill_chunk > 0 ? std::min(options.prefill_chunk, hello.max_prefill_chunk)
                                                      : hello.max_prefill_chunk;
  }
  if (!errors.empty()) {
    std::sort(errors.begin(), errors.end());
    return absl::FailedPreconditionError(absl::StrJoin(errors, "; "));
  }
  return std::unique_ptr<DistributedEngine>(
      new DistributedEngine(job, std::move(config), std::move(tokenizer), std::move(options), std::move(budgets),
                            std::move(devices)));
}

absl::StatusOr<std::unique_ptr<DistributedEngine>> DistributedEngine::CreateInProcess(
    ModelConfig config, std::unique_ptr<Tokenizer> tokenizer, DistributedEngineOptions options,
    KvShardFactoryMaker kv_factories) {
  std::unique_ptr<InProcessJob> job = InProcessJob::Start(std::move(kv_factories));
  KV_ASSIGN_OR_RETURN(std::unique_ptr<DistributedEngine> engine,
                      Create(job->coordinator(), std::move(config), std::move(tokenizer), std::move(options)));
  engine->in_process_job_ = std::move(job);
  return engine;
}

DistributedEngine::DistributedEngine(JobRuntime& job, ModelConfig config, std::unique_ptr<Tokenizer> tokenizer,
                                     DistributedEngineOptions options, std::vector<int64_t> budgets,
                                     std::vector<std::string> devices)
    : job_(job),
      config_(std::move(config)),
      tokenizer_(std::move(tokenizer)),
      stop_ids_(tokenizer_->stop_ids()),
      options_(std::move(options)),
      budgets_(std::move(budgets)),
      devices_(std::move(devices)),
      reserved_(budgets_.size(), 0) {
  scheduler_ = std::thread([this] { SchedulerLoop(); });
}

DistributedEngine::~DistributedEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  scheduler_.join();
  WorkerCommand reset;
  reset.kind = CommandKind::kReset;
  const absl::Status sent = SendToAllWorkers(job_, reset, absl::Seconds(options_.worker_timeout_s));
  if (!sent.ok()) job_.Abort(absl::StrCat("cannot reset the workers: ", sent.message()));
}

std::string DistributedEngine::device_name() const {
  if (in_process_job_ != nullptr && devices_.size() == 1) return devices_.front();  // single-process mode
  // "2 workers (NVIDIA H200 (GPU 0), NVIDIA H200 (GPU 1))"; one name when all workers compute alike.
  std::vector<std::string> names = devices_;
  const bool alike = std::all_of(names.begin(), names.end(), [&](const std::string& d) {
    return d.substr(0, d.find(" (GPU")) == names.front().substr(0, names.front().find(" (GPU"));
  });
  const std::string what = alike && !names.empty() ? names.front().substr(0, names.front().find(" (GPU"))
                                                   : absl::StrJoin(names, ", ");
  return absl::StrCat(n_workers(), n_workers() == 1 ? " worker" : " workers", " (", what, ")");
}

std::vector<WorkerKvMemory> DistributedEngine::kv_memory() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  std::vector<WorkerKvMemory> memory;
  for (int w = 0; w < n_workers(); ++w) {
    WorkerKvMemory m;
    m.worker = w;
    m.scheme = options_.default_kv_scheme;
    m.bytes_capacity = budgets_[w];
    if (w < static_cast<int>(stats_.worker_kv_bytes.size())) {
      m.bytes_used = stats_.worker_kv_bytes[w];
      const int64_t elements = stats_.worker_kv_elements[w];
      m.bits_per_element = elements > 0 ? 8.0 * m.bytes_used / elements : 0.0;
    }
    memory.push_back(m);
  }
  return memory;
}

DistributedEngineStats DistributedEngine::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

absl::StatusOr<DistributedEngine::SchemeCost> DistributedEngine::CostOf(const std::string& scheme) {
  auto it = scheme_costs_.find(scheme);
  if (it != scheme_costs_.end()) return it->second;
  // Measured on synthetic K/V of the model's geometry, all-in (codes, scales, outliers, sink, residual):
  // the marginal bytes per token, and what a shard holds beyond that (its fp16 sink and residual).
  KV_ASSIGN_OR_RETURN(std::unique_ptr<KvShard> shard, options_.kv_factory(scheme, KvGeometryOf(config_), 0));
  constexpr int64_t kWarmTokens = 512, kProbeTokens = 1024;
  KV_RETURN_IF_ERROR(SyntheticFill(*shard, 0, kWarmTokens, /*seed=*/1));
  const int64_t warm_bytes = shard->Memory().bytes;
  KV_RETURN_IF_ERROR(SyntheticFill(*shard, kWarmTokens, kWarmTokens + kProbeTokens, /*seed=*/1));
  SchemeCost cost;
  cost.per_token = std::max<int64_t>(1, (shard->Memory().bytes - warm_bytes + kProbeTokens - 1) / kProbeTokens);
  cost.per_shard = std::max<int64_t>(0, warm_bytes - kWarmTokens * cost.per_token);
  scheme_costs_[scheme] = cost;
  return cost;
}

absl::StatusOr<GenerationResult> DistributedEngine::Generate(const GenerationRequest& request,
                                                             const TokenCallback& on_token,
                                                             const PrefillCallback& on_prefill) {
  const int64_t n_prompt = static_cast<int64_t>(request.prompt_ids.size());
  const int64_t fill = request.synthetic_fill_tokens >= 0 ? request.synthetic_fill_tokens : options_.synthetic_fill_tokens;
  if (n_prompt == 0) return absl::InvalidArgumentError("the prompt is empty");
  if (fill + n_prompt >= max_context()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the prompt has ", n_prompt, " tokens", fill > 0 ? absl::StrCat(" after ", fill, " SYNTHETIC FILL tokens") : "",
        "; the model's context holds ", max_context(), " (prompt plus at least one generated token)"));
  }
  if (request.max_tokens < 0) return absl::InvalidArgumentError("max_tokens must not be negative");
  for (int32_t id : request.prompt_ids) {
    if (id < 0 || id >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " outside the vocabulary of ", config_.vocab_size));
    }
  }
  auto r = std::make_shared<Request>();
  r->request = request;
  r->scheme = request.kv_scheme.empty() ? options_.default_kv_scheme : request.kv_scheme;
  r->fill = fill;
  r->prompt = n_prompt;
  r->budget = std::min<int64_t>(request.max_tokens, max_context() - fill - n_prompt);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::CancelledError("the engine is shutting down");
    incoming_.push_back(r);
  }
  cv_.notify_all();

  GenerationResult result;
  result.prompt_tokens = n_prompt;
  result.kv_scheme = r->scheme;
  GenerationStream stream(*tokenizer_, request, on_token, result);
  // Started now, so its rate counts from the request's start.
  std::unique_ptr<ProgressLine> fill_progress =
      fill > 0 ? std::make_unique<ProgressLine>("SYNTHETIC FILL", "tokens", fill) : nullptr;
  bool streaming = true;
  while (true) {
    Request::Event e = r->Next();
    if (e.kind == Request::Event::kFill) {
      fill_progress->Update(e.done);
      if (e.done == e.total) fill_progress->Finish();
    } else if (e.kind == Request::Event::kPrefill) {
      if (on_prefill) on_prefill({e.done, e.total, e.seconds});
    } else if (e.kind == Request::Event::kToken) {
      if (streaming && !stream.Push(e.token)) {
        streaming = false;
        r->cancelled = true;
        cv_.notify_all();
      }
    } else {
      if (!e.status.ok()) return e.status;
      break;
    }
  }
  stream.Finish();
  result.prefill_seconds = r->prefill_seconds;
  result.decode_seconds = r->decode_start == Clock::time_point() ? 0.0
                          : std::chrono::duration<double>(Clock::now() - r->decode_start).count();
  return result;
}

void DistributedEngine::Finish(const std::shared_ptr<Request>& request, const absl::Status& status) {
  for (size_t w = 0; w < request->reserved.size(); ++w) reserved_[w] -= request->reserved[w];
  request->reserved.clear();
  if (request->state != Request::State::kQueued) frees_.push_back(request->id);
  active_.erase(request->id);
  Request::Event done;
  done.kind = Request::Event::kDone;
  done.status = status;
  request->Post(std::move(done));
}

void DistributedEngine::Admit(StepPlan& plan) {
  while (!queued_.empty()) {
    std::shared_ptr<Request> r = queued_.front();
    auto cost = CostOf(r->scheme);
    if (!cost.ok()) {
      queued_.pop_front();
      Finish(r, cost.status());
      continue;
    }
    // Each worker's room leaves space for one shard's fixed part.
    std::vector<WorkerRoom> rooms(budgets_.size());
    for (size_t w = 0; w < budgets_.size(); ++w) {
      rooms[w] = {budgets_[w] - reserved_[w] - cost->per_shard, budgets_[w] - cost->per_shard};
    }
    const int64_t total = r->fill + r->prompt + r->budget;
    auto placement = PlaceContext(total, cost->per_token, rooms, options_.placement, r->scheme);
    if (absl::IsUnavailable(placement.status())) return;  // waits for running requests to finish
    queued_.pop_front();
    if (!placement.ok()) {
      Finish(r, placement.status());
      continue;
    }
    r->id = next_id_++;
    r->placement = std::move(*placement);
    r->reserved.resize(budgets_.size());
    for (size_t w = 0; w < budgets_.size(); ++w) {
      const int64_t tokens = r->placement.ranges[w].size();
      r->reserved[w] = tokens > 0 ? tokens * cost->per_token + cost->per_shard : 0;
      reserved_[w] += r->reserved[w];
    }
    r->state = r->fill > 0 ? Request::State::kFilling : Request::State::kPrefilling;
    r->next_chunk = r->fill;
    r->next_position = r->fill + r->prompt;
    r->prefill_start = Clock::now();
    RequestAlloc alloc;
    alloc.id = r->id;
    alloc.scheme = r->scheme;
    alloc.ranges = r->placement.ranges;
    alloc.sampler = r->placement.OwnerOf(r->fill + r->prompt - 1);
    alloc.sampling = r->request.sampling;
    alloc.fill_seed = options_.synthetic_fill_seed;
    plan.allocs.push_back(std::move(alloc));
    active_[r->id] = r;
  }
}

void DistributedEngine::BuildWork(StepPlan& plan) {
  bool prefill_taken = false;
  std::vector<std::shared_ptr<Request>> decoding;
  for (auto& [id, r] : active_) {
    if (r->state == Request::State::kFilling) {
      plan.fills.push_back({id, r->fill, options_.fill_tokens_per_step});
    } else if (r->state == Request::State::kPrefilling && !prefill_taken) {
      // The next chunk: on the grid of the workers' chunk from the prompt's start (as in single-process
      // mode), and never across a worker boundary.
      prefill_taken = true;
      const int owner = r->placement.OwnerOf(r->next_chunk);
      const int64_t chunk = options_.prefill_chunk;
      const int64_t grid_end = r->fill + ((r->next_chunk - r->fill) / chunk + 1) * chunk;
      const int64_t end = std::min({grid_end, r->placement.ranges[owner].end, r->fill + r->prompt});
      PrefillWork work;
      work.id = id;
      work.first_position = r->next_chunk;
      work.tokens.assign(r->request.prompt_ids.begin() + (r->next_chunk - r->fill),
                         r->request.prompt_ids.begin() + (end - r->fill));
      work.owner = owner;
      work.sample = end == r->fill + r->prompt;
      plan.prefill = std::move(work);
    } else if (r->state == Request::State::kDecoding) {
      decoding.push_back(r);
    }
  }
  // At most max_batch rows, rotating the start so that no request waits for ever.
  const size_t n = decoding.size();
  const size_t take = std::min<size_t>(n, std::max(1, options_.max_batch));
  for (size_t i = 0; i < take; ++i) {
    const auto& r = decoding[(decode_rotation_ + i) % n];
    plan.decode.push_back({r->id, r->pending_token, r->next_position});
  }
  if (n > 0) decode_rotation_ = (decode_rotation_ + take) % n;
}

void DistributedEngine::RunStep(const StepPlan& plan) {
  const auto step_start = Clock::now();
  WorkerCommand command;
  command.kind = CommandKind::kStep;
  command.plan = plan;
  const absl::Duration timeout = absl::Seconds(options_.worker_timeout_s);
  const absl::Status sent = SendToAllWorkers(job_, command, timeout);
  if (!sent.ok()) job_.Abort(absl::StrCat("cannot send step ", plan.step, " to the workers: ", sent.message()));

  const int n = n_workers();
  std::vector<StepReport> reports(n);
  std::vector<bool> reported(n, false);
  const absl::Time deadline = absl::Now() + timeout;
  for (int received = 0; received < n; ++received) {
    auto message = job_.ReceiveMessage(JobRuntime::kAnySource, kReplyTag, std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (!message.ok()) {
      std::vector<int> missing;
      for (int w = 0; w < n; ++w) {
        if (!reported[w]) missing.push_back(w + 1);
      }
      job_.Abort(absl::StrCat(missing.size() == 1 ? job_.WorkerName(missing[0])
                                                  : absl::StrCat("worker ranks ", absl::StrJoin(missing, ", ")),
                              " did not report step ", plan.step,
                              " within ", options_.worker_timeout_s, " s (--worker_timeout_s); ending the job"));
    }
    auto report = DecodeReport(message->bytes);
    if (!report.ok()) job_.Abort(absl::StrCat("bad report from ", job_.WorkerName(message->source), ": ", report.status().message()));
    if (!report->fatal.empty()) job_.Abort(absl::StrCat(report->fatal, "; ending the job"));
    const int w = message->source - 1;
    reports[w] = std::move(*report);
    reported[w] = true;
  }

  // Failures first: a request failed anywhere is over, whatever else came back for it.
  std::map<int64_t, std::string> failed;
  for (const StepReport& report : reports) {
    for (const FailedRequest& f : report.failed) failed.emplace(f.id, f.message);
  }
  for (const auto& [id, message] : failed) {
    auto it = active_.find(id);
    if (it == active_.end()) continue;
    Finish(it->second, absl::InternalError(FailureWithAdvice(message, it->second->fill)));
  }

  if (!plan.fills.empty()) {
    for (const FillWork& fill : plan.fills) {
      auto it = active_.find(fill.id);
      if (it == active_.end()) continue;
      Request& r = *it->second;
      ++r.fill_steps;
      int64_t done = 0;
      for (const TokenRange& range : r.placement.ranges) {
        const int64_t part = std::max<int64_t>(0, std::min(range.end, r.fill) - range.start);
        done += std::min(part, r.fill_steps * fill.tokens_per_worker);
      }
      Request::Event e;
      e.kind = Request::Event::kFill;
      e.done = done;
      e.total = r.fill;
      e.seconds = SecondsSince(r.prefill_start);
      r.Post(e);
      if (done == r.fill) r.state = Request::State::kPrefilling;
    }
  }

  std::map<int64_t, int32_t> sampled;
  for (const StepReport& report : reports) {
    for (const ReportedToken& s : report.sampled) sampled[s.id] = s.token;
  }
  auto take_token = [&](const std::shared_ptr<Request>& r) {
    auto s = sampled.find(r->id);
    if (s == sampled.end()) {
      Finish(r, absl::InternalError(absl::StrCat("no worker sampled a token for step ", plan.step)));
      return;
    }
    const int32_t token = s->second;
    if (r->generated == r->budget) {  // max_tokens 0: the prefill's sample is not wanted
      Finish(r, absl::OkStatus());
      return;
    }
    ++r->generated;
    Request::Event e;
    e.kind = Request::Event::kToken;
    e.token = token;
    r->Post(e);
    const bool stop = std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end();
    if (stop || r->generated == r->budget) {
      Finish(r, absl::OkStatus());
      return;
    }
    r->pending_token = token;
  };

  if (plan.prefill) {
    auto it = active_.find(plan.prefill->id);
    if (it != active_.end()) {
      std::shared_ptr<Request> r = it->second;
      const int64_t end = plan.prefill->first_position + static_cast<int64_t>(plan.prefill->tokens.size());
      r->next_chunk = end;
      Request::Event e;
      e.kind = Request::Event::kPrefill;
      e.done = end - r->fill;
      e.total = r->prompt;
      e.seconds = SecondsSince(r->prefill_start);
      r->Post(e);
      if (plan.prefill->sample) {
        r->prefill_seconds = e.seconds;
        r->decode_start = Clock::now();
        r->state = Request::State::kDecoding;
        take_token(r);
      }
    }
  }
  for (const DecodeWork& row : plan.decode) {
    auto it = active_.find(row.id);
    if (it == active_.end()) continue;
    std::shared_ptr<Request> r = it->second;
    ++r->next_position;
    take_token(r);
  }

  if (EngineObserver* observer = observer_.load(); observer != nullptr) {
    if (!plan.decode.empty()) {
      for (size_t w = 0; w < reports.size(); ++w) observer->OnDecodeStep(static_cast<int>(w), reports[w].decode_seconds);
      if (reports[0].merges > 0) observer->OnMerge(reports[0].merge_seconds / reports[0].merges);
    }
    StepTiming timing;
    timing.decode_rows = static_cast<int>(plan.decode.size());
    timing.prefill = plan.prefill.has_value();
    timing.prefill_tokens = plan.prefill ? static_cast<int>(plan.prefill->tokens.size()) : 0;
    timing.fills = static_cast<int>(plan.fills.size());
    timing.seconds = SecondsSince(step_start);
    timing.merge_seconds = reports[0].merge_seconds;
    timing.merges = reports[0].merges;
    for (const StepReport& report : reports) {
      timing.worker_step_seconds = std::max(timing.worker_step_seconds, report.step_seconds);
      timing.worker_decode_seconds = std::max(timing.worker_decode_seconds, report.decode_seconds);
      timing.worker_kv_bytes.push_back(report.kv_bytes);
      timing.worker_kv_elements.push_back(report.kv_elements);
    }
    observer->OnStep(timing);
  }
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++stats_.steps;
  stats_.worker_kv_bytes.resize(reports.size());
  stats_.worker_kv_elements.resize(reports.size());
  for (size_t w = 0; w < reports.size(); ++w) {
    stats_.worker_kv_bytes[w] = reports[w].kv_bytes;
    stats_.worker_kv_elements[w] = reports[w].kv_elements;
  }
  if (!plan.decode.empty()) {
    ++stats_.decode_steps;
    stats_.decode_rows += static_cast<int64_t>(plan.decode.size());
    stats_.decode_step_seconds += SecondsSince(step_start);
  }
}

void DistributedEngine::SchedulerLoop() {
  // The coordinator's own work (probing a scheme's bytes per token) is small. A full OpenMP team of this
  // thread would double the process's OpenMP threads when the worker shares the process (single-process
  // mode), and libgomp then stops spinning between parallel regions: the CPU worker's decode lost a third
  // of its speed on 16 cores.
  omp_set_num_threads(1);
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !incoming_.empty() || !active_.empty() || !frees_.empty(); });
      if (stop_) break;
      while (!incoming_.empty()) {
        queued_.push_back(std::move(incoming_.front()));
        incoming_.pop_front();
      }
    }
    std::vector<std::shared_ptr<Request>> cancelled;
    for (auto& [id, r] : active_) {
      if (r->cancelled) cancelled.push_back(r);
    }
    for (auto& r : cancelled) Finish(r, absl::OkStatus());

    StepPlan plan;
    plan.step = next_step_;
    plan.frees.swap(frees_);
    Admit(plan);
    BuildWork(plan);
    if (plan.frees.empty() && plan.allocs.empty() && plan.fills.empty() && !plan.prefill && plan.decode.empty()) {
      // Nothing to run (requests waiting for room while none runs cannot happen; this guards a spin).
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(5));
      continue;
    }
    ++next_step_;
    RunStep(plan);
  }
  // Requests still here when the engine goes away end with an error.
  for (auto& r : queued_) Finish(r, absl::CancelledError("the engine shut down"));
  queued_.clear();
  std::vector<std::shared_ptr<Request>> left;
  for (auto& [id, r] : active_) left.push_back(r);
  for (auto& r : left) Finish(r, absl::CancelledError("the engine shut down"));
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& r : incoming_) {
    Request::Event done;
    done.status = absl::CancelledError("the engine shut down");
    r->Post(done);
  }
  incoming_.clear();
}

}  // namespace kvshard
