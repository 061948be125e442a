// GpuWorker over GpuModel (dense layers), DeviceKvStore (the worker's KV) and NCCL (the data plane).
#include "worker/gpu_worker.h"

#include <algorithm>
#include <chrono>
#include <set>

#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dense.h"
#include "kvstore/kv_scheme.h"
#include "worker/cuda/device_kv_store.h"
#include "worker/cuda/gpu_model.h"
#include "worker/cuda/nccl_collectives.h"
#include "worker/cuda/nccl_merge.h"

namespace kvshard {
namespace {

constexpr int64_t kKvReserveBytes = int64_t{3} << 29;  // 1.5 GiB left for cuBLAS, NCCL and scratch growth
constexpr int32_t kNegativeInfinityBits = static_cast<int32_t>(0xff800000u);

// Names a span of host work for profilers (ncu --nvtx --nvtx-include "decode step/"); free without one.
class ProfileRange {
 public:
  explicit ProfileRange(const char* name) { nvtxRangePushA(name); }
  ~ProfileRange() { nvtxRangePop(); }
  ProfileRange(const ProfileRange&) = delete;
  ProfileRange& operator=(const ProfileRange&) = delete;
};

DType WireDType(WireType wire) { return wire == WireType::kBf16 ? DType::kBF16 : DType::kF32; }

// Rows with no partials of this worker: out = 0, lse = -inf (they merge as no-ops).
absl::Status NeutralPartials(int64_t rows, int head_dim, float* out, float* lse, cudaStream_t stream) {
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0, rows * head_dim * sizeof(float), stream));
  return FillInt32Cuda(reinterpret_cast<int32_t*>(lse), kNegativeInfinityBits, rows, stream);
}

// Scratch of the contexts, grown on demand.
struct Scratch {
  DeviceMemory queries;  // fp32 [rows][q_dim], packed for the wire
  DeviceMemory out;      // fp32 [rows][n_heads][head_dim]
  DeviceMemory lse;      // fp32 [rows][n_heads]
  DeviceMemory records;  // partial records of the sources and the local part

  static absl::Status Ensure(DeviceMemory& mem, int64_t bytes, const char* what) {
    if (mem.bytes() >= bytes) return absl::OkStatus();
    mem = DeviceMemory();
    KV_ASSIGN_OR_RETURN(mem, DeviceMemory::Allocate(bytes, what));
    return absl::OkStatus();
  }
};

// Records one local failure (the first) in a request's error slot.
void FailOnce(absl::Status* slot, const absl::Status& status) {
  if (slot != nullptr && slot->ok()) *slot = status;
}

// Decode: every worker runs the same rows; partials of the rows it holds, then the merge of every layer.
class DecodeContext final : public GpuAttentionContext {
 public:
  DecodeContext(DeviceKvStore* store, NcclPartialsMerger& merger, const MergeOptions& merge, const KvGeometry& g,
                std::span<const GpuDecodeRow> rows, const InjectedFault& fault, std::vector<absl::Status>& errors,
                Scratch& scratch, std::vector<cudaEvent_t>& merge_events)
      : store_(store), merger_(merger), merge_(merge), geometry_(g), rows_(rows), fault_(fault), errors_(errors),
        scratch_(scratch), merge_events_(merge_events) {}

  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride,
                        const int64_t*, cudaStream_t stream) override {
    if (layer == fault_.layer) {
      for (size_t i = 0; i < rows_.size(); ++i) {
        if (rows_[i].held) FailOnce(&errors_[i], fault_.status);
      }
    }
    FailUnhealthyRows();
    std::vector<int64_t> ids(rows_.size(), -1);
    bool any = false;
    for (size_t i = 0; i < rows_.size(); ++i) {
      if (rows_[i].appends && Live(i)) {
        ids[i] = rows_[i].id;
        any = true;
      }
    }
    if (!any || store_ == nullptr) return absl::OkStatus();
    const absl::Status appended = store_->AppendRows(layer, ids, k, v, row_stride, stream);
    if (!appended.ok()) {
      for (size_t i = 0; i < rows_.size(); ++i) {
        if (ids[i] >= 0) FailOnce(&errors_[i], appended);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t, float* out,
                      cudaStream_t stream) override {
    const int64_t rows = static_cast<int64_t>(n_queries) * geometry_.n_heads;
    KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.lse, rows * 4, "decode lse"));
    float* lse = scratch_.lse.as<float>();
    FailUnhealthyRows();
    std::vector<int64_t> ids(rows_.size(), -1);
    bool any = false;
    for (size_t i = 0; i < rows_.size(); ++i) {
      if (rows_[i].held && Live(i)) {
        ids[i] = rows_[i].id;
        any = true;
      }
    }
    absl::Status local = absl::OkStatus();
    if (any && store_ != nullptr) local = store_->AttendRows(layer, ids, q, q_stride, out, lse, stream);
    if (!any || store_ == nullptr || !local.ok()) {
      for (size_t i = 0; i < rows_.size(); ++i) {
        if (ids[i] >= 0 && !local.ok()) FailOnce(&errors_[i], local);
      }
      KV_RETURN_IF_ERROR(NeutralPartials(rows, geometry_.head_dim, out, lse, stream));
    }
    // The rows that failed here contribute nothing; the other workers' partials still merge. One worker's
    // partials are the result: nothing to merge or time (a small model's decode step is bound by the host's
    // CUDA calls, so two event records a layer cost time).
    if (merge_events_.empty()) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(cudaEventRecord(merge_events_[2 * layer], stream));
    KV_RETURN_IF_ERROR(merger_.Merge(merge_, rows, geometry_.head_dim, out, lse));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(merge_events_[2 * layer + 1], stream));
    return absl::OkStatus();
  }

 private:
  bool Live(size_t i) const { return !rows_[i].failed && errors_[i].ok(); }
  // A row whose sequence the store can no longer serve (kvq key-outlier overflow) fails alone, before the
  // batch calls, so the other rows of the step go on.
  void FailUnhealthyRows() {
    if (store_ == nullptr) return;
    for (size_t i = 0; i < rows_.size(); ++i) {
      if (rows_[i].held && Live(i)) FailOnce(&errors_[i], store_->Health(rows_[i].id));
    }
  }

  DeviceKvStore* store_;
  NcclPartialsMerger& merger_;
  MergeOptions merge_;
  KvGeometry geometry_;
  std::span<const GpuDecodeRow> rows_;
  InjectedFault fault_;
  std::vector<absl::Status>& errors_;
  Scratch& scratch_;
  std::vector<cudaEvent_t>& merge_events_;
};

// Prefill on the chunk's owner (pass-Q): its queries go to the sources every layer, their partial
// records come back and merge with the local causal part.
class PassQOwnerContext final : public GpuAttentionContext {
 public:
  PassQOwnerContext(DeviceKvStore* store, NcclCollectives& nccl, WireType wire, const KvGeometry& g, int64_t id,
                    std::span<const int> sources, bool failed, const InjectedFault& fault, absl::Status* error,
                    Scratch& scratch)
      : store_(store), nccl_(nccl), wire_(wire), geometry_(g), id_(id), sources_(sources), fault_(fault),
        error_(error), scratch_(scratch) {
    if (failed) FailOnce(error_, absl::AbortedError("the request failed earlier on this worker"));
  }

  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride,
                        const int64_t*, cudaStream_t stream) override {
    if (layer == fault_.layer) FailOnce(error_, fault_.status);
    if (!error_->ok() || store_ == nullptr) return absl::OkStatus();
    FailOnce(error_, store_->Append(layer, id_, n_tokens, k, v, row_stride, stream));
    return absl::OkStatus();
  }

  absl::Status Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t first_position, float* out,
                      cudaStream_t stream) override {
    const int head_dim = geometry_.head_dim;
    const int64_t q_dim = static_cast<int64_t>(geometry_.n_heads) * head_dim;
    const int64_t rows = static_cast<int64_t>(n_queries) * geometry_.n_heads;
    const int n_sources = static_cast<int>(sources_.size());
    const DType wire = WireDType(wire_);
    const int64_t record_bytes = PartialsRecordBytes(rows, head_dim, wire);
    KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.lse, rows * 4, "prefill lse"));
    float* lse = scratch_.lse.as<float>();
    if (n_sources > 0) {
      KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.queries, rows * head_dim * 4, "pass-Q queries"));
      KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.out, rows * head_dim * 4, "local partials"));
      KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.records, (n_sources + 1) * record_bytes, "partial records"));
      CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(scratch_.queries.get(), q_dim * 4, q, q_stride * 4, q_dim * 4, n_queries,
                                             cudaMemcpyDeviceToDevice, stream));
      std::vector<SendBuffer> sends;
      for (int source : sources_) sends.push_back({source, scratch_.queries.get(), rows * head_dim * 4});
      KV_RETURN_IF_ERROR(nccl_.Exchange(sends, {}));
    }
    float* local_out = n_sources > 0 ? scratch_.out.as<float>() : out;
    bool local_done = false;
    if (error_->ok() && store_ != nullptr) {
      const absl::Status s = store_->AttendChunk(layer, id_, n_queries, q, q_stride, first_position, local_out, lse,
                                                 stream);
      FailOnce(error_, s);
      local_done = s.ok();
    }
    if (!local_done) KV_RETURN_IF_ERROR(NeutralPartials(rows, head_dim, local_out, lse, stream));
    if (n_sources == 0) return absl::OkStatus();
    char* records = scratch_.records.as<char>();
    KV_RETURN_IF_ERROR(PackPartialsCuda(local_out, lse, rows, head_dim, wire, records + n_sources * record_bytes, stream));
    std::vector<RecvBuffer> recvs;
    for (int s = 0; s < n_sources; ++s) recvs.push_back({sources_[s], records + s * record_bytes, record_bytes});
    KV_RETURN_IF_ERROR(nccl_.Exchange({}, recvs));
    return MergePartialRecordsCuda(records, wire, n_sources + 1, rows, head_dim, out, lse, stream);
  }

 private:
  DeviceKvStore* store_;
  NcclCollectives& nccl_;
  WireType wire_;
  KvGeometry geometry_;
  int64_t id_;
  std::span<const int> sources_;
  InjectedFault fault_;
  absl::Status* error_;
  Scratch& scratch_;
};

class CudaGpuWorker final : public GpuWorker {
 public:
  CudaGpuWorker(const GpuWorkerOptions& options, std::unique_ptr<GpuModel> model,
                std::unique_ptr<NcclCollectives> nccl, int64_t kv_budget)
      : options_(options), model_(std::move(model)), nccl_(std::move(nccl)), merger_(*nccl_),
        kv_budget_(kv_budget) {}

  ~CudaGpuWorker() override {
    store_.reset();
    for (cudaEvent_t e : merge_events_) cudaEventDestroy(e);
  }

  absl::Status Init() {
    if (nccl_->size() == 1) return absl::OkStatus();  // no merges (merge_events_ stays empty)
    merge_events_.resize(2 * model_->config().n_layers);
    for (cudaEvent_t& e : merge_events_) CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
    return absl::OkStatus();
  }

  std::string device_name() const override {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, options_.device) != cudaSuccess) return absl::StrCat("GPU ", options_.device);
    return absl::StrCat(prop.name, " (GPU ", options_.device, ")");
  }
  int64_t kv_budget_bytes() const override { return kv_budget_; }
  KvGeometry kv_geometry() const override { return model_->kv_geometry(); }

  absl::Status AddRequest(int64_t id, const std::string& scheme, int64_t start_position, int64_t capacity) override {
    // One scheme at a time: an idle worker remakes its store for a request of another scheme.
    if (store_ != nullptr && scheme != scheme_ && held_.empty()) store_.reset();
    if (store_ == nullptr) {
      KV_ASSIGN_OR_RETURN(KvSchemeConfig config, ParseKvScheme(scheme));
      if (config.needs_calibration() && options_.calibration == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat("the KV scheme ", scheme,
                                                          " needs a calibration file (--calibration)"));
      }
      DeviceKvStoreOptions store_options;
      store_options.pool_bytes = kv_budget_;
      store_options.reserve_bytes = kKvReserveBytes;  // kv_budget_ was measured before the store's scratch
      store_options.max_rows = options_.max_decode_rows;
      store_options.max_chunk = model_->max_chunk();
      store_options.key_outlier_headroom = options_.key_outlier_headroom;
      KV_ASSIGN_OR_RETURN(store_, DeviceKvStore::Create(model_->kv_geometry(), config, options_.calibration.get(),
                                                        store_options));
      scheme_ = scheme;
    } else if (scheme != scheme_) {
      return absl::InvalidArgumentError(absl::StrCat("GPU workers hold one KV scheme at a time; the requests they hold "
                                                     "now use ", scheme_, ", this one asks for ", scheme,
                                                     " (send it again once they are done)"));
    }
    KV_RETURN_IF_ERROR(store_->AddSequence(id, start_position, capacity));
    held_.insert(id);
    return absl::OkStatus();
  }

  void RemoveRequest(int64_t id) override {
    if (store_ != nullptr) store_->RemoveSequence(id);
    held_.erase(id);
  }
  bool Holds(int64_t id) const override { return store_ != nullptr && store_->Contains(id); }
  int64_t length(int64_t id) const override {
    return Holds(id) ? store_->length(id, model_->config().n_layers - 1) : 0;
  }

  absl::Status Fill(int64_t id, int64_t end, uint64_t seed) override {
    if (!Holds(id)) return absl::FailedPreconditionError(absl::StrCat("request ", id, " has no KV on this GPU"));
    KV_RETURN_IF_ERROR(store_->SyntheticFill(id, end, seed, model_->stream()));
    return nccl_->Synchronize();
  }

  absl::Status Seal(int64_t id) override {
    if (!Holds(id)) return absl::OkStatus();
    return store_->Seal(id, model_->stream());
  }

  KvMemory Memory() const override { return store_ == nullptr ? KvMemory{} : store_->Memory(); }

  absl::Status PrefillOwner(int64_t id, std::span<const int32_t> tokens, int64_t first_position,
                            std::span<const int> sources, bool failed, const InjectedFault& fault,
                            std::vector<float>* logits, absl::Status* error) override {
    ProfileRange range("prefill chunk");
    const int64_t n = static_cast<int64_t>(tokens.size());
    std::vector<int64_t> positions(n);
    for (int64_t i = 0; i < n; ++i) positions[i] = first_position + i;
    PassQOwnerContext context(Holds(id) ? store_.get() : nullptr, *nccl_, options_.merge.wire, model_->kv_geometry(),
                              id, sources, failed || !Holds(id), fault, error, scratch_);
    KV_RETURN_IF_ERROR(model_->Enqueue(tokens, positions, context, /*logits_of_every_row=*/false));
    KV_RETURN_IF_ERROR(nccl_->Synchronize());
    if (logits != nullptr && error->ok()) {
      const int vocab = model_->config().vocab_size;
      logits->resize(vocab);
      CUDA_RETURN_IF_ERROR(cudaMemcpy(logits->data(), model_->logits(), static_cast<int64_t>(vocab) * 4,
                                      cudaMemcpyDeviceToHost));
    }
    return absl::OkStatus();
  }

  absl::Status PrefillSource(int64_t id, int owner, int n_queries, int64_t first_position, bool failed,
                             const InjectedFault& fault, absl::Status* error) override {
    const KvGeometry g = model_->kv_geometry();
    const int64_t rows = static_cast<int64_t>(n_queries) * g.n_heads;
    const int64_t q_bytes = rows * g.head_dim * 4;
    const DType wire = WireDType(options_.merge.wire);
    const int64_t record_bytes = PartialsRecordBytes(rows, g.head_dim, wire);
    KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.queries, q_bytes, "pass-Q queries"));
    KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.out, q_bytes, "source partials"));
    KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.lse, rows * 4, "source lse"));
    KV_RETURN_IF_ERROR(Scratch::Ensure(scratch_.records, record_bytes, "source record"));
    if (failed || !Holds(id)) FailOnce(error, absl::AbortedError("the request failed earlier on this worker"));
    cudaStream_t stream = model_->stream();
    float* out = scratch_.out.as<float>();
    float* lse = scratch_.lse.as<float>();
    for (int layer = 0; layer < g.n_layers; ++layer) {
      if (layer == fault.layer) FailOnce(error, fault.status);
      const RecvBuffer recv{owner, scratch_.queries.get(), q_bytes};
      KV_RETURN_IF_ERROR(nccl_->Exchange({}, std::span<const RecvBuffer>(&recv, 1)));
      bool done = false;
      if (error->ok()) {
        const absl::Status s = store_->AttendChunk(layer, id, n_queries, scratch_.queries.as<float>(),
                                                   static_cast<int64_t>(g.n_heads) * g.head_dim, first_position, out,
                                                   lse, stream);
        FailOnce(error, s);
        done = s.ok();
      }
      if (!done) KV_RETURN_IF_ERROR(NeutralPartials(rows, g.head_dim, out, lse, stream));
      KV_RETURN_IF_ERROR(PackPartialsCuda(out, lse, rows, g.head_dim, wire, scratch_.records.get(), stream));
      const SendBuffer send{owner, scratch_.records.get(), record_bytes};
      KV_RETURN_IF_ERROR(nccl_->Exchange(std::span<const SendBuffer>(&send, 1), {}));
    }
    return nccl_->Synchronize();
  }

  absl::Status Decode(std::span<const GpuDecodeRow> rows, const std::vector<bool>& want_logits,
                      const InjectedFault& fault, std::vector<float>* logits, std::vector<int32_t>* tokens,
                      std::vector<absl::Status>* errors, double* merge_seconds, int64_t* merges) override {
    ProfileRange range("decode step");
    const int64_t n = static_cast<int64_t>(rows.size());
    if (n > options_.max_decode_rows || n > model_->max_chunk()) {
      return absl::InvalidArgumentError(absl::StrCat("a decode step of ", n, " rows; GPU workers take at most ",
                                                     std::min(options_.max_decode_rows, model_->max_chunk())));
    }
    errors->assign(n, absl::OkStatus());
    tokens->assign(n, -1);
    std::vector<int32_t> ids(n);
    std::vector<int64_t> positions(n);
    bool any_draws = false;
    for (int64_t i = 0; i < n; ++i) {
      ids[i] = rows[i].token;
      positions[i] = rows[i].position;
      any_draws = any_draws || rows[i].draw.has_value();
    }
    const bool any_logits = std::find(want_logits.begin(), want_logits.end(), true) != want_logits.end();
    DecodeContext context(store_.get(), merger_, options_.merge, model_->kv_geometry(), rows, fault, *errors,
                          scratch_, merge_events_);
    KV_RETURN_IF_ERROR(model_->Enqueue(ids, positions, context, any_logits || any_draws));
    const int64_t vocab = model_->config().vocab_size;
    cudaStream_t stream = model_->stream();
    if (any_logits) {  // queued before the draws' penalty changes them
      logits->resize(n * vocab);
      for (int64_t i = 0; i < n; ++i) {
        if (!want_logits[i]) continue;
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(logits->data() + i * vocab, model_->logits() + i * vocab, vocab * 4,
                                             cudaMemcpyDeviceToHost, stream));
      }
    }
    if (any_draws) {  // rows without a draw are drawn greedily and ignored
      std::vector<LogitsDraw> draws(n);
      for (int64_t i = 0; i < n; ++i) {
        if (rows[i].draw.has_value()) draws[i] = {*rows[i].draw, rows[i].recent};
      }
      KV_RETURN_IF_ERROR(model_->EnqueueDraws(draws));
    }
    KV_RETURN_IF_ERROR(nccl_->Synchronize());
    for (int64_t i = 0; i < n && any_draws; ++i) {
      if (rows[i].draw.has_value()) (*tokens)[i] = model_->drawn()[i];
    }
    *merge_seconds = 0;
    *merges = 0;
    if (merge_events_.empty()) return absl::OkStatus();
    float total_ms = 0;
    for (int layer = 0; layer < model_->config().n_layers; ++layer) {
      float ms = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, merge_events_[2 * layer], merge_events_[2 * layer + 1]));
      total_ms += ms;
    }
    *merge_seconds = total_ms / 1000.0;
    *merges = model_->config().n_layers;
    return absl::OkStatus();
  }

 private:
  GpuWorkerOptions options_;
  std::unique_ptr<GpuModel> model_;
  std::unique_ptr<NcclCollectives> nccl_;
  NcclPartialsMerger merger_;
  int64_t kv_budget_;
  std::unique_ptr<DeviceKvStore> store_;
  std::string scheme_;
  std::set<int64_t> held_;  // requests with KV in store_
  Scratch scratch_;
  std::vector<cudaEvent_t> merge_events_;
};

}  // namespace

int GpuWorker::DeviceCount() { return CudaDeviceCount(); }

absl::StatusOr<std::unique_ptr<GpuWorker>> GpuWorker::Create(const ModelWeights& weights, Collectives& bootstrap,
                                                             const GpuWorkerOptions& options) {
  const int devices = CudaDeviceCount();
  if (options.device < 0 || options.device >= devices) {
    return absl::UnavailableError(absl::StrCat("GPU ", options.device, " does not exist (this host has ", devices,
                                               " CUDA devices)"));
  }
  absl::StatusOr<std::unique_ptr<GpuModel>> model = absl::InternalError("cudaSetDevice failed");
  GpuModelOptions model_options;
  model_options.graph_rows = options.graph_rows;
  model_options.max_chunk = options.max_chunk;
  if (cudaSetDevice(options.device) == cudaSuccess) model = GpuModel::Create(weights, model_options);
  // Every worker learns whether all have their model before any joins NCCL (a worker that failed alone
  // would leave the others waiting in the join until the timeout).
  float failed_here = model.ok() ? 0.0f : 1.0f;
  KV_RETURN_IF_ERROR(bootstrap.AllReduce(&failed_here, 1, WireType::kF32, ReduceOp::kMax));
  if (!model.ok()) return Annotate(model.status(), absl::StrCat("GPU ", options.device));
  if (failed_here != 0.0f) return absl::AbortedError("another worker could not start its GPU backend");
  KV_ASSIGN_OR_RETURN(std::unique_ptr<NcclCollectives> nccl,
                      NcclCollectives::Create(bootstrap, (*model)->stream(), options.collective_timeout));
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  int64_t budget = static_cast<int64_t>(free_bytes) - kKvReserveBytes;
  if (options.kv_budget_bytes > 0) budget = std::min(budget, options.kv_budget_bytes);
  if (budget <= 0) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "GPU %d has %.2f GiB free after the model; nothing is left for the KV cache", options.device,
        free_bytes / 1073741824.0));
  }
  auto worker = std::make_unique<CudaGpuWorker>(options, std::move(*model), std::move(nccl), budget);
  KV_RETURN_IF_ERROR(worker->Init());
  return std::unique_ptr<GpuWorker>(std::move(worker));
}

}  // namespace kvshard
