#include "worker/worker_runtime.h"

#include <omp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/host_resources.h"
#include "common/status.h"
#include "worker/control.h"
#include "worker/distributed_attention.h"
#include "worker/forward.h"
#include "worker/gpu_worker.h"
#include "kernels/gemm_cpu.h"
#include "kvstore/calibration.h"
#include "worker/model_loader.h"
#include "worker/sampler.h"
#include "worker/synthetic.h"

namespace kvshard {
namespace {

constexpr absl::Duration kReplyTimeout = absl::Minutes(5);

struct LocalRequest {
  LocalRequestState state;
  std::optional<Sampler> sampler;
  uint64_t fill_seed = 0;
  bool reported = false;  // its failure went to the coordinator already
  bool sealed = false;    // the shard is full: later positions live on other workers
};

class Worker {
 public:
  Worker(JobRuntime& job, KvShardFactoryMaker kv_factories)
      : job_(job), kv_factories_(std::move(kv_factories)), me_(job.world_rank() - 1) {}

  int Run() {
    while (true) {
      auto message = job_.ReceiveMessage(0, kCommandTag, absl::InfiniteDuration());
      if (!message.ok()) job_.Abort(absl::StrCat("worker lost the coordinator: ", message.status().message()));
      auto command = DecodeCommand(message->bytes);
      if (!command.ok()) job_.Abort(absl::StrCat("bad command from the coordinator: ", command.status().message()));
      switch (command->kind) {
        case CommandKind::kConfigure:
          Reply(EncodeHello(Configure(command->config)));
          break;
        case CommandKind::kStep: {
          const auto start = std::chrono::steady_clock::now();
          StepReport report = Step(command->plan);
          report.step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          Reply(EncodeReport(report));
          break;
        }
        case CommandKind::kReset:
          while (!requests_.empty()) Forget(requests_.begin()->first);
          gpu_memory_ = KvMemory{};
          break;
        case CommandKind::kShutdown:
          return 0;
      }
    }
  }

 private:
  void Reply(const std::string& bytes) {
    const absl::Status sent = job_.SendMessage(0, kReplyTag, bytes, kReplyTimeout);
    if (!sent.ok()) job_.Abort(absl::StrCat("cannot answer the coordinator: ", sent.message()));
  }

  std::string Who() const { return job_.WorkerName(job_.world_rank()); }

  WorkerHello Configure(const WorkerConfig& config) {
    WorkerHello hello;
    hello.worker = me_;
    config_ = config;
    requests_.clear();
    steps_since_configure_ = 0;
    gpu_memory_ = KvMemory{};
    threads_ = config.threads > 0 ? config.threads : ThreadsPerRank(job_.ranks_on_node());
    omp_set_num_threads(threads_);
    hello.threads = threads_;
    kv_budget_bytes_ = config.kv_budget_bytes > 0 ? config.kv_budget_bytes : AutomaticCpuKvBudget();
    hello.kv_budget_bytes = kv_budget_bytes_;
    const absl::Status loaded = LoadModelOnce(config);
    if (!loaded.ok()) {
      hello.error = absl::StrCat(Who(), ": ", loaded.message());
      return hello;
    }
    auto factory = kv_factories_(config.calibration_path, weights_.get());
    if (!factory.ok()) {
      hello.error = absl::StrCat(Who(), ": ", factory.status().message());
      return hello;
    }
    factory_ = std::move(*factory);
    auto collectives = job_.MakeWorkerCollectives(absl::Seconds(config.collective_timeout_s));
    if (!collectives.ok()) {
      hello.error = absl::StrCat(Who(), ": ", collectives.status().message());
      return hello;
    }
    collectives_ = std::move(*collectives);
    const absl::Status device = ChooseDevice(config, hello);
    if (!device.ok()) {
      hello.error = absl::StrCat(Who(), ": ", device.message());
      return hello;
    }
    hello.model_name = weights_->config.name;
    hello.n_layers = weights_->config.n_layers;
    hello.vocab_size = weights_->config.vocab_size;
    return hello;
  }

  // The CPU backend's KV budget when config names none: half the memory this process may still take, shared
  // by the node's workers (the rest is for the weights, activations and everything else on the host).
  int64_t AutomaticCpuKvBudget() const {
    constexpr int64_t kWhenUnknown = int64_t{4} << 30;
    const int64_t available = AvailableMemoryBytes();
    if (available <= 0) return kWhenUnknown;
    return std::max<int64_t>(int64_t{64} << 20, available / 2 / std::max(1, job_.workers_on_node()));
  }

  // A GPU per worker (by its index among the workers of its node) when config says gpu, or auto and the
  // node has a GPU for each of its workers; else the CPU backend. Every worker of a node decides alike,
  // so the GPU workers join their NCCL communicator together.
  absl::Status ChooseDevice(const WorkerConfig& config, WorkerHello& hello) {
    if (config.device != "auto" && config.device != "cpu" && config.device != "gpu") {
      return absl::InvalidArgumentError(absl::StrCat("unknown device '", config.device, "' (auto, cpu, gpu)"));
    }
    const int gpus = config.device == "cpu" ? 0 : GpuWorker::DeviceCount();
    const int needed = std::max(1, job_.workers_on_node());
    if (config.device == "gpu" && gpus < needed) {
      return absl::FailedPreconditionError(absl::StrCat("--device gpu: this node has ", gpus, " GPUs for ", needed,
                                                        " workers (one GPU each)"));
    }
    hello.device = absl::StrCat("CPU (", CpuGemmLibrary(), ")");
    hello.max_prefill_chunk = max_prefill_chunk_ = CpuModel::max_chunk();
    if (gpus < needed) {
      gpu_.reset();
      gpu_key_.clear();
      return absl::OkStatus();
    }
    const std::string key = absl::StrCat(model_key_, "|", config.calibration_path, "|", config.kv_budget_bytes, "|",
                                         MergeModeName(config.merge.mode), WireTypeName(config.merge.wire), "|",
                                         config.key_outlier_headroom, "|", config.cuda_graph_rows, "|",
                                         config.gpu_prefill_chunk);
    if (gpu_ == nullptr || key != gpu_key_) {
      gpu_.reset();
      GpuWorkerOptions options;
      options.device = job_.local_worker_index();
      options.merge = config.merge;
      options.collective_timeout = absl::Seconds(config.collective_timeout_s);
      options.kv_budget_bytes = config.kv_budget_bytes;
      options.key_outlier_headroom = config.key_outlier_headroom;
      options.graph_rows = config.cuda_graph_rows;
      options.max_chunk = config.gpu_prefill_chunk;
      if (!config.calibration_path.empty()) {
        KV_ASSIGN_OR_RETURN(Calibration calibration, LoadCalibration(config.calibration_path));
        options.calibration = std::make_shared<const Calibration>(std::move(calibration));
      }
      KV_ASSIGN_OR_RETURN(gpu_, GpuWorker::Create(*weights_, *collectives_, options));
      gpu_key_ = key;
    }
    hello.device = gpu_->device_name();
    hello.max_prefill_chunk = max_prefill_chunk_ = config.gpu_prefill_chunk;
    // Placement sizes ranges by bits per element; page slack and per-request slots need the rest.
    hello.kv_budget_bytes = gpu_->kv_budget_bytes() / 10 * 9;
    return absl::OkStatus();
  }

  // Drops a request and its KV.
  void Forget(int64_t id) {
    requests_.erase(id);
    if (gpu_ != nullptr) gpu_->RemoveRequest(id);
  }

  absl::Status LoadModelOnce(const WorkerConfig& config) {
    const std::string key = config.synthetic ? config.synthetic->Name() : config.model_path;
    if (weights_ != nullptr && key == model_key_) return absl::OkStatus();
    gpu_.reset();
    model_.reset();
    weights_.reset();
    model_key_.clear();
    ModelWeights weights;
    if (config.synthetic) {
      KV_ASSIGN_OR_RETURN(weights, MakeSyntheticModel(*config.synthetic));
    } else {
      KV_ASSIGN_OR_RETURN(weights, LoadModel(config.model_path));
    }
    weights_ = std::make_unique<ModelWeights>(std::move(weights));
    model_ = std::make_unique<CpuModel>(*weights_);
    model_key_ = key;
    return absl::OkStatus();
  }

  // Faults that end or stall this process, for the tests of the coordinator's and mpirun's handling.
  void MaybeDieOrHang(int64_t step) {
    const FaultInjection& f = config_.faults;
    if (f.worker != me_) return;
    if (f.kill_step == step) {
      std::fprintf(stderr, "kvshard: %s: killing itself at step %lld (--debug_kill_worker_at_step)\n",
                   Who().c_str(), static_cast<long long>(step));
      std::fflush(stderr);
      raise(SIGKILL);
    }
    if (f.hang_step == step) {
      std::fprintf(stderr, "kvshard: %s: hanging at step %lld (--debug_hang_worker_at_step)\n", Who().c_str(),
                   static_cast<long long>(step));
      std::fflush(stderr);
      while (true) sleep(1);
    }
  }

  StepReport Step(const StepPlan& plan) {
    StepReport report;
    report.step = plan.step;
    report.worker = me_;
    const int64_t local_step = steps_since_configure_++;
    if (model_ == nullptr || collectives_ == nullptr) {
      report.fatal = absl::StrCat(Who(), ": a step arrived before a successful configure");
      return report;
    }
    MaybeDieOrHang(local_step);
    InjectedFault fault;
    if (config_.faults.fail_step == local_step && config_.faults.worker == me_) {
      fault.layer = model_->config().n_layers / 2;
      fault.status = absl::InternalError(absl::StrCat("injected failure at step ", local_step,
                                                      " (--debug_fail_worker_at_step)"));
    }
    std::set<int64_t> touched;  // requests this step concerns, for the failure report
    for (int64_t id : plan.frees) Forget(id);
    if (fault.layer >= 0) {
      // The worker is broken at this step: every request it holds fails, whatever part it plays in
      // the step (the contexts also fail mid-layer, to exercise the neutral partials).
      for (auto& [id, request] : requests_) {
        request.state.Fail(fault.status);
        touched.insert(id);
      }
    }

    for (const RequestAlloc& alloc : plan.allocs) {
      LocalRequest& request = requests_[alloc.id];
      request.state.ranges = alloc.ranges;
      request.fill_seed = alloc.fill_seed;
      touched.insert(alloc.id);
      if (me_ < static_cast<int>(alloc.ranges.size()) && !alloc.ranges[me_].empty() && gpu_ != nullptr) {
        request.state.Fail(
            gpu_->AddRequest(alloc.id, alloc.scheme, alloc.ranges[me_].start, alloc.ranges[me_].size()));
      } else if (me_ < static_cast<int>(alloc.ranges.size()) && !alloc.ranges[me_].empty()) {
        auto shard = factory_(alloc.scheme, model_->kv_geometry(), alloc.ranges[me_].start);
        if (shard.ok()) {
          request.state.shard = std::move(*shard);
        } else {
          request.state.Fail(shard.status());
        }
      }
      if (alloc.sampler == me_) request.sampler.emplace(alloc.sampling);
    }
    for (const FillWork& fill : plan.fills) {
      LocalRequest& request = Lookup(fill.id);
      touched.insert(fill.id);
      Fill(fill.id, request, fill);
    }
    if (plan.prefill) {
      const absl::Status s = Prefill(*plan.prefill, fault, report);
      if (!s.ok()) {
        report.fatal = absl::StrCat(Who(), ": ", s.message());
        return report;
      }
      touched.insert(plan.prefill->id);
    }
    if (!plan.decode.empty()) {
      const absl::Status s = Decode(plan.decode, fault, report);
      if (!s.ok()) {
        report.fatal = absl::StrCat(Who(), ": ", s.message());
        return report;
      }
      for (const DecodeWork& row : plan.decode) touched.insert(row.id);
    }

    SealFullShards();
    if (gpu_ != nullptr) {
      // A kvq store counts its key outliers on the device, a wait on the GPU: the gauge is refreshed when
      // requests come, go or prefill, and every kGpuMemoryEvery decode steps in between.
      const bool changed = !plan.allocs.empty() || !plan.frees.empty() || !plan.fills.empty() || plan.prefill;
      if (changed || ++decode_steps_since_memory_ >= kGpuMemoryEvery) {
        gpu_memory_ = gpu_->Memory();
        decode_steps_since_memory_ = 0;
      }
      report.kv_bytes += gpu_memory_.bytes;
      report.kv_elements += gpu_memory_.elements;
    }
    for (const auto& [id, request] : requests_) {
      if (!request.state.shard) continue;
      const KvMemory memory = request.state.shard->Memory();
      report.kv_bytes += memory.bytes;
      report.kv_elements += memory.elements;
    }
    if (gpu_ == nullptr && report.kv_bytes > kv_budget_bytes_) {
      for (int64_t id : touched) {
        Lookup(id).state.Fail(absl::ResourceExhaustedError(absl::StrFormat(
            "holds %.1f MiB of KV, over its budget of %.1f MiB", report.kv_bytes / 1048576.0,
            kv_budget_bytes_ / 1048576.0)));
      }
    }
    for (int64_t id : touched) {
      LocalRequest& request = Lookup(id);
      if (!request.state.error.ok() && !request.reported) {
        request.reported = true;
        report.failed.push_back({id, absl::StrCat(Who(), ": ", request.state.error.message())});
      }
    }
    // Sampled tokens of failed requests are dropped: the request is over.
    std::erase_if(report.sampled, [&](const ReportedToken& s) { return !Lookup(s.id).state.error.ok(); });
    // Placeholders of requests the coordinator never announced (reported failed above) go now.
    std::vector<int64_t> unannounced;
    for (const auto& [id, request] : requests_) {
      if (request.state.ranges.empty()) unannounced.push_back(id);
    }
    for (int64_t id : unannounced) Forget(id);
    return report;
  }

  // A shard whose range is full will get no more tokens (the sequence goes on on a later worker): sealed,
  // a quantized store stores it as one store of the whole sequence would (its residual is quantized).
  void SealFullShards() {
    for (auto& [id, request] : requests_) {
      if (request.sealed || !HoldsKv(id, request) || !request.state.error.ok()) continue;
      const TokenRange mine = request.state.ranges[me_];
      if (mine.start + StoredTokens(id, request) == mine.end && mine.end < request.state.ranges.back().end) {
        if (gpu_ != nullptr) {
          request.state.Fail(gpu_->Seal(id));
        } else {
          request.state.shard->Seal();
        }
        request.sealed = true;
      }
    }
  }

  // Whether this worker keeps KV of the request (on its GPU or in a CPU shard), and how many of its
  // tokens (every layer holds as many once a step is done). A shard starts at the worker's range.
  bool HoldsKv(int64_t id, const LocalRequest& request) const {
    return gpu_ != nullptr ? gpu_->Holds(id) : request.state.shard != nullptr;
  }
  int64_t StoredTokens(int64_t id, const LocalRequest& request) const {
    if (gpu_ != nullptr) return gpu_->length(id);
    return request.state.shard->length(model_->config().n_layers - 1);
  }

  // The request's local state; one the coordinator never announced gets a failed placeholder so the step
  // still runs its collectives.
  LocalRequest& Lookup(int64_t id) {
    auto it = requests_.find(id);
    if (it != requests_.end()) return it->second;
    LocalRequest& request = requests_[id];
    request.state.Fail(absl::InternalError(absl::StrCat("request ", id, " is unknown on this worker")));
    return request;
  }

  void Fill(int64_t id, LocalRequest& request, const FillWork& fill) {
    if (!request.state.error.ok() || !HoldsKv(id, request)) return;
    const TokenRange mine = request.state.ranges[me_];
    const int64_t begin = mine.start + StoredTokens(id, request);
    const int64_t end = std::min(std::min(mine.end, fill.end), begin + fill.tokens_per_worker);
    if (end <= begin) return;
    request.state.Fail(gpu_ != nullptr ? gpu_->Fill(id, end, request.fill_seed)
                                       : SyntheticFill(*request.state.shard, begin, end, request.fill_seed));
  }

  // Every sampled token is accepted (the repetition penalty's memory), as in single-process mode.
  int32_t SampleAndAccept(Sampler& sampler, const float* logits) {
    const int32_t token = sampler.Sample(logits, model_->config().vocab_size);
    sampler.Accept(token);
    return token;
  }

  bool ValidTokens(LocalRequest& request, std::vector<int32_t>& tokens) {
    const int vocab = model_->config().vocab_size;
    for (int32_t& t : tokens) {
      if (t < 0 || t >= vocab) {
        request.state.Fail(absl::InvalidArgumentError(absl::StrCat("token id ", t, " outside the vocabulary of ", vocab)));
        t = 0;  // the step still runs, in step with the other workers
      }
    }
    return request.state.error.ok();
  }

  absl::Status Prefill(const PrefillWork& work, const InjectedFault& fault, StepReport& report) {
    LocalRequest& request = Lookup(work.id);
    const KvGeometry geometry = model_->kv_geometry();
    const int n = static_cast<int>(work.tokens.size());
    const std::vector<TokenRange>& ranges = request.state.ranges;
    if (work.owner == me_) {
      std::vector<int> sources;
      for (int w = 0; w < work.owner && w < static_cast<int>(ranges.size()); ++w) {
        if (!ranges[w].empty() && ranges[w].start < work.first_position) sources.push_back(w);
      }
      std::vector<int32_t> tokens = work.tokens;
      ValidTokens(request, tokens);
      std::vector<float> logits;
      // One step covers the layers once only for chunks this worker's backend takes in one pass (the
      // sources serve exactly one pass; the coordinator sizes chunks by every worker's hello).
      const absl::Status chunk_fits =
          n > max_prefill_chunk_
              ? absl::InvalidArgumentError(absl::StrCat("a prefill chunk of ", n, " tokens; at most ",
                                                        max_prefill_chunk_, " go in one step"))
              : absl::OkStatus();
      if (gpu_ != nullptr) {
        // The GPU sources already wait in their transfers: the job cannot stay in step.
        KV_RETURN_IF_ERROR(chunk_fits);
        absl::Status error;
        KV_RETURN_IF_ERROR(gpu_->PrefillOwner(work.id, tokens, work.first_position, sources, !request.state.error.ok(),
                                              fault, work.sample ? &logits : nullptr, &error));
        request.state.Fail(error);
        SampleAfterPrefill(work, request, logits, report);
        return absl::OkStatus();
      }
      PassQPrefillContext context(*collectives_, request.state, geometry, sources, config_.merge.wire, fault);
      const absl::Status forward =
          chunk_fits.ok() ? model_->Forward(tokens, work.first_position, context, false, logits) : chunk_fits;
      if (!context.fatal().ok()) return context.fatal();
      if (!forward.ok()) {
        request.state.Fail(forward);
        KV_RETURN_IF_ERROR(context.Drain(n, work.first_position));
      }
      SampleAfterPrefill(work, request, logits, report);
      return absl::OkStatus();
    }
    const bool source = me_ < work.owner && me_ < static_cast<int>(ranges.size()) && !ranges[me_].empty() &&
                        ranges[me_].start < work.first_position;
    if (source && gpu_ != nullptr) {
      absl::Status error;
      KV_RETURN_IF_ERROR(gpu_->PrefillSource(work.id, work.owner, n, work.first_position, !request.state.error.ok(),
                                             fault, &error));
      request.state.Fail(error);
      return absl::OkStatus();
    }
    if (source) return ServePassQ(*collectives_, request.state, geometry, work.owner, n, config_.merge.wire, fault);
    return absl::OkStatus();
  }

  void SampleAfterPrefill(const PrefillWork& work, LocalRequest& request, const std::vector<float>& logits,
                          StepReport& report) {
    if (!work.sample || !request.state.error.ok()) return;
    if (!request.sampler) {
      request.state.Fail(absl::InternalError("the last prompt chunk ran on a worker that is not the sampler"));
    } else {
      report.sampled.push_back({work.id, SampleAndAccept(*request.sampler, logits.data())});
    }
  }

  absl::Status DecodeOnGpu(const std::vector<DecodeWork>& work, const InjectedFault& fault, StepReport& report) {
    std::vector<GpuDecodeRow> rows;
    for (const DecodeWork& w : work) {
      LocalRequest& request = Lookup(w.id);
      std::vector<int32_t> token = {w.token};
      ValidTokens(request, token);
      GpuDecodeRow row;
      row.id = w.id;
      row.token = token[0];
      row.position = w.position;
      row.held = gpu_->Holds(w.id);
      row.appends = row.held && me_ < static_cast<int>(request.state.ranges.size()) &&
                    request.state.ranges[me_].contains(w.position);
      row.failed = !request.state.error.ok();
      if (request.sampler.has_value() && request.state.error.ok()) {  // drawn on the GPU: no logits to the host
        row.draw = request.sampler->TakeDraw();
        row.recent = request.sampler->recent();
      }
      rows.push_back(row);
    }
    std::vector<int32_t> drawn;
    std::vector<absl::Status> errors;
    const auto start = std::chrono::steady_clock::now();
    KV_RETURN_IF_ERROR(gpu_->Decode(rows, /*want_logits=*/{}, fault, /*logits=*/nullptr, &drawn, &errors,
                                    &report.merge_seconds, &report.merges));
    report.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (size_t i = 0; i < work.size(); ++i) {
      LocalRequest& request = Lookup(work[i].id);
      request.state.Fail(errors[i]);
      if (rows[i].draw.has_value() && request.state.error.ok()) {
        request.sampler->Accept(drawn[i]);
        report.sampled.push_back({work[i].id, drawn[i]});
      }
    }
    return absl::OkStatus();
  }

  absl::Status Decode(const std::vector<DecodeWork>& work, const InjectedFault& fault, StepReport& report) {
    if (gpu_ != nullptr) return DecodeOnGpu(work, fault, report);
    std::vector<DecodeRow> rows;
    std::vector<int32_t> tokens;
    std::vector<int64_t> positions;
    for (const DecodeWork& row : work) {
      LocalRequest& request = Lookup(row.id);
      std::vector<int32_t> token = {row.token};
      ValidTokens(request, token);
      rows.push_back({&request.state, row.position});
      tokens.push_back(token[0]);
      positions.push_back(row.position);
    }
    DistributedDecodeContext context(*collectives_, model_->kv_geometry(), rows, config_.merge, fault);
    std::vector<float> logits;
    const auto start = std::chrono::steady_clock::now();
    const absl::Status forward = model_->Forward(tokens, positions, context, /*all_logits=*/true, logits);
    report.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    report.merge_seconds = context.merge_seconds();
    report.merges = context.merges();
    if (!context.fatal().ok()) return context.fatal();
    if (!forward.ok()) {
      for (DecodeRow& row : rows) row.request->Fail(forward);
      KV_RETURN_IF_ERROR(context.Drain());
      return absl::OkStatus();
    }
    const int vocab = model_->config().vocab_size;
    for (size_t i = 0; i < work.size(); ++i) {
      LocalRequest& request = Lookup(work[i].id);
      if (request.sampler && request.state.error.ok()) {
        report.sampled.push_back({work[i].id, SampleAndAccept(*request.sampler, logits.data() + i * vocab)});
      }
    }
    return absl::OkStatus();
  }

  JobRuntime& job_;
  KvShardFactoryMaker kv_factories_;
  KvShardFactory factory_;
  const int me_;
  WorkerConfig config_;
  int threads_ = 1;
  int64_t kv_budget_bytes_ = 0;  // the CPU backend's (config's, or AutomaticCpuKvBudget)
  int max_prefill_chunk_ = CpuModel::max_chunk();  // prompt tokens per prefill step (WorkerHello)
  std::string model_key_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<CpuModel> model_;
  std::unique_ptr<Collectives> collectives_;
  std::unique_ptr<GpuWorker> gpu_;  // set when this worker computes on a GPU
  static constexpr int kGpuMemoryEvery = 64;
  KvMemory gpu_memory_;  // gpu_'s KV memory as last counted
  int decode_steps_since_memory_ = 0;
  std::string gpu_key_;             // the settings gpu_ was made with
  std::map<int64_t, LocalRequest> requests_;
  int64_t steps_since_configure_ = 0;
};

}  // namespace

int RunWorker(JobRuntime& job, KvShardFactoryMaker kv_factories) {
  Worker worker(job, std::move(kv_factories));
  return worker.Run();
}

absl::Status SendToAllWorkers(JobRuntime& job, const WorkerCommand& command, absl::Duration timeout) {
  const std::string bytes = EncodeCommand(command);
  for (int rank = 1; rank < job.world_size(); ++rank) {
    KV_RETURN_IF_ERROR(job.SendMessage(rank, kCommandTag, bytes, timeout));
  }
  return absl::OkStatus();
}

void ShutdownWorkers(JobRuntime& job) {
  WorkerCommand shutdown;
  shutdown.kind = CommandKind::kShutdown;
  const absl::Status sent = SendToAllWorkers(job, shutdown, absl::Minutes(1));
  if (!sent.ok()) job.Abort(absl::StrCat("cannot shut the workers down: ", sent.message()));
}

}  // namespace kvshard
