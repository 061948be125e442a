#include "worker/cuda/device_kv_store.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dense.h"
#include "kernels/cuda/kvq_attention.h"
#include "kernels/cuda/kvq_store.h"
#include "kernels/cuda/synthetic_kv.h"
#include "kernels/rope.h"
#include "kvstore/kv_codecs.h"
#include "worker/cuda/gpu_model.h"

namespace kvshard {
namespace {

constexpr int64_t kAlign = 256;
constexpr int kStagingSlots = 8;

int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Host-to-device uploads of per-call metadata through pinned memory, without waiting for the device: a
// ring of slots, each reused only after the event recorded behind the work that read it.
class StagingRing {
 public:
  struct Slot {
    char* host = nullptr;
    char* device = nullptr;
    int index = 0;
  };
  StagingRing() = default;
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;
  ~StagingRing() {
    for (cudaEvent_t e : events_)
      if (e != nullptr) cudaEventDestroy(e);
    if (host_ != nullptr) cudaFreeHost(host_);
  }

  absl::Status Init(int64_t slot_bytes) {
    slot_bytes_ = AlignUp(std::max<int64_t>(slot_bytes, kAlign), kAlign);
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&host_), slot_bytes_ * kStagingSlots,
                                       cudaHostAllocDefault));
    KV_ASSIGN_OR_RETURN(device_, DeviceMemory::Allocate(slot_bytes_ * kStagingSlots, "metadata staging"));
    for (cudaEvent_t& e : events_) CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return absl::OkStatus();
  }
  int64_t slot_bytes() const { return slot_bytes_; }

  // The next slot, once the work that last used it is done (normally long ago).
  absl::StatusOr<Slot> Acquire() {
    const int i = next_;
    next_ = (next_ + 1) % kStagingSlots;
    if (used_[i]) CUDA_RETURN_IF_ERROR(cudaEventSynchronize(events_[i]));
    return Slot{host_ + i * slot_bytes_, device_.as<char>() + i * slot_bytes_, i};
  }
  // Copies the first `bytes` of the slot to the device (before the work that reads them): to the slot's
  // device part, or to `to`.
  absl::Status Upload(const Slot& s, int64_t bytes, cudaStream_t stream, char* to = nullptr) {
    if (bytes > slot_bytes_) {
      return absl::InternalError(absl::StrCat("metadata of ", bytes, " bytes exceeds the staging slot of ", slot_bytes_));
    }
    if (bytes > 0) {
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(to != nullptr ? to : s.device, s.host, bytes, cudaMemcpyHostToDevice, stream));
    }
    return absl::OkStatus();
  }
  // After the work that reads the slot is enqueued.
  absl::Status Release(const Slot& s, cudaStream_t stream) {
    CUDA_RETURN_IF_ERROR(cudaEventRecord(events_[s.index], stream));
    used_[s.index] = true;
    return absl::OkStatus();
  }

 private:
  int64_t slot_bytes_ = 0;
  char* host_ = nullptr;
  DeviceMemory device_;
  cudaEvent_t events_[kStagingSlots] = {};
  bool used_[kStagingSlots] = {};
  int next_ = 0;
};

// Packs arrays into a staging slot, 16-byte aligned; returns their device addresses.
class SlotWriter {
 public:
  explicit SlotWriter(const StagingRing::Slot& slot) : slot_(slot) {}
  template <typename T>
  const T* Put(const std::vector<T>& v) {
    offset_ = AlignUp(offset_, 16);
    const int64_t at = offset_;
    offset_ += static_cast<int64_t>(v.size() * sizeof(T));
    if (!v.empty()) std::memcpy(slot_.host + at, v.data(), v.size() * sizeof(T));
    return reinterpret_cast<const T*>(slot_.device + at);
  }
  int64_t bytes() const { return offset_; }

 private:
  StagingRing::Slot slot_;
  int64_t offset_ = 0;
};

// Per-call metadata that every layer of a decode step repeats (the rows' slots, lengths and positions):
// packed on the host, kept in a device buffer of its own, and uploaded through the staging ring only when
// its bytes change, so a step uploads it once instead of once per layer. (A small model's decode step is
// bound by the host's CUDA calls, so each call a layer saves shortens the step.) Uploads are ordered on the
// caller's stream, after the work that read the previous contents.
class StepMetadata {
 public:
  void Bind(char* device, int64_t capacity) {
    device_ = device;
    capacity_ = capacity;
    uploaded_.clear();
  }
  // Starts packing one call's arrays.
  void Begin() { packing_.clear(); }
  // Packs `v` (16-byte aligned); returns where its copy is on the device once committed.
  template <typename T>
  const T* Put(const std::vector<T>& v) {
    const size_t at = static_cast<size_t>(AlignUp(static_cast<int64_t>(packing_.size()), 16));
    packing_.resize(at + v.size() * sizeof(T));
    if (!v.empty()) std::memcpy(packing_.data() + at, v.data(), v.size() * sizeof(T));
    return reinterpret_cast<const T*>(device_ + at);
  }
  bool fits(const StagingRing& ring) const {
    const int64_t bytes = static_cast<int64_t>(packing_.size());
    return bytes <= capacity_ && bytes <= ring.slot_bytes();
  }
  // Makes the device copy hold what was packed since Begin.
  absl::Status Commit(StagingRing& ring, cudaStream_t stream) {
    if (!fits(ring)) {
      return absl::InternalError(absl::StrCat("step metadata of ", packing_.size(), " bytes exceeds its buffer of ",
                                              capacity_));
    }
    if (packing_ == uploaded_) return absl::OkStatus();
    KV_ASSIGN_OR_RETURN(StagingRing::Slot slot, ring.Acquire());
    std::memcpy(slot.host, packing_.data(), packing_.size());
    KV_RETURN_IF_ERROR(ring.Upload(slot, static_cast<int64_t>(packing_.size()), stream, device_));
    KV_RETURN_IF_ERROR(ring.Release(slot, stream));
    uploaded_.swap(packing_);
    return absl::OkStatus();
  }
  // After sequences come or go (conservative: equal bytes would mean the same rows anyway).
  void Forget() { uploaded_.clear(); }

 private:
  char* device_ = nullptr;
  int64_t capacity_ = 0;
  std::vector<char> packing_;
  std::vector<char> uploaded_;  // what device_ holds
};

struct Sequence {
  int32_t slot = 0;
  int64_t start = 0;
  int64_t capacity = 0;
  std::vector<int32_t> pages;
  std::vector<int64_t> lengths;  // per layer
  bool sealed = false;
};

// The kvq tokens one append moves and writes, for KvqStoreAppendCuda (kvq_store.h).
struct KvqAppendPlan {
  std::vector<KvqFlushRun> runs;
  std::vector<KvqFlushPage> pages;
  std::vector<KvqWriteToken> writes;
  int n_flush = 0;
};

class DeviceKvStoreImpl final : public DeviceKvStore {
 public:
  DeviceKvStoreImpl(const KvGeometry& g, const KvSchemeConfig& c, const DeviceKvStoreOptions& o)
      : geometry_(g), config_(c), options_(o), kvq_(c.kind == KvSchemeKind::kKvq) {}
  ~DeviceKvStoreImpl() override {
    if (overflow_host_ != nullptr) cudaFreeHost(overflow_host_);
  }

  absl::Status Init(const Calibration* calibration);

  const KvGeometry& geometry() const override { return geometry_; }
  std::string scheme() const override { return config_.name(); }
  absl::Status AddSequence(int64_t id, int64_t start_position, int64_t capacity) override;
  void RemoveSequence(int64_t id) override;
  absl::Status Health(int64_t id) const override;
  bool Contains(int64_t id) const override { return sequences_.count(id) > 0; }
  int64_t start_position(int64_t id) const override {
    auto it = sequences_.find(id);
    return it == sequences_.end() ? 0 : it->second.start;
  }
  int64_t length(int64_t id, int layer) const override {
    auto it = sequences_.find(id);
    if (it == sequences_.end() || layer < 0 || layer >= geometry_.n_layers) return 0;
    return it->second.lengths[layer];
  }
  int64_t FreeTokens() const override;
  absl::Status Append(int layer, int64_t id, int n_tokens, const float* k, const float* v, int64_t row_stride,
                      cudaStream_t stream) override;
  absl::Status AppendRows(int layer, std::span<const int64_t> ids, const float* k, const float* v,
                          int64_t row_stride, cudaStream_t stream) override;
  absl::Status AttendRows(int layer, std::span<const int64_t> ids, const float* q, int64_t q_stride, float* out,
                          float* lse, cudaStream_t stream) override;
  absl::Status AttendChunk(int layer, int64_t id, int n_queries, const float* q, int64_t q_stride,
                           int64_t first_position, float* out, float* lse, cudaStream_t stream) override;
  absl::Status SyntheticFill(int64_t id, int64_t end, uint64_t seed, cudaStream_t stream) override;
  absl::Status Seal(int64_t id, cudaStream_t stream) override;
  KvMemory Memory(int64_t id) const override;
  KvMemory Memory() const override;
  int64_t pool_bytes() const override { return pool_.bytes(); }
  absl::StatusOr<std::vector<uint8_t>> CodePage(int64_t id, int layer, int kv_head, int64_t page,
                                                KvPart part) const override;

 private:
  int64_t sink_max() const { return kvq_ ? config_.sink_tokens : 0; }
  // Final sink of a sequence starting at `start` (tokens at absolute positions < sink_tokens).
  int64_t SinkOf(int64_t start) const { return kvq_ ? std::max<int64_t>(0, config_.sink_tokens - start) : 0; }
  int64_t PagesFor(int64_t start, int64_t capacity) const {
    return CeilDiv(std::max<int64_t>(0, capacity - SinkOf(start)), kPageTokens);
  }
  // ResourceExhausted once a page of the sequence got more key outliers than it holds.
  absl::Status CheckOverflow(int64_t id, const Sequence& s) const;
  absl::StatusOr<Sequence*> Find(int64_t id);
  absl::Status CheckLayer(int layer) const;
  absl::Status CheckAppend(const Sequence& s, int layer, int64_t n) const;
  // Appends n tokens of k/v (any count up to the scratch's) to one layer of a sequence.
  absl::Status AppendTokens(int layer, Sequence& s, int64_t n, const float* k, const float* v, int64_t row_stride,
                            cudaStream_t stream);
  // The kvq moves of sequence s growing from `old` to `now` tokens (sealed: all quantized); new token j
  // is call token chunk0 + (j - old).
  void PlanKvqAppend(const Sequence& s, int64_t old, int64_t now, bool sealed, int32_t chunk0,
                     KvqAppendPlan& plan) const;
  // same_every_layer: the plan repeats in every layer of a decode step (kept in append_meta_).
  absl::Status RunKvqAppend(int layer, const KvqAppendPlan& plan, const float* k, const float* v,
                            int64_t row_stride, cudaStream_t stream, bool same_every_layer = false);
  KvqStoreLayer LayerView(int layer) const { return layers_[layer]; }
  int64_t StreamBits(const Sequence& s, int layer, const std::vector<int64_t>& outliers) const;
  // Key outliers per [layer][slot][n_kv_heads] (empty for fp16). Waits for the device.
  std::vector<int64_t> KeyOutlierCounts() const;
  KvMemory MemoryOf(const Sequence& s, const std::vector<int64_t>& outlier_counts) const;

  KvGeometry geometry_;
  KvSchemeConfig config_;
  DeviceKvStoreOptions options_;
  bool kvq_;
  int n_value_outliers_ = 0;
  int key_outlier_shift_ = 0;  // kvq: each (layer, page, KV head) brings 2^shift key outlier entries to its
                               // sequence's pool
  int ring_ = 1;
  int64_t n_pages_ = 0;
  int64_t code_bytes_ = 0;
  int64_t max_tokens_ = 0;  // tokens one internal append may bring (max_chunk or fill_chunk)
  int64_t tile_tokens_ = 0;
  // kvq3 chunks attend over the packed pages (KvqPrefillAttentionCuda) when the options ask; otherwise,
  // and for kvq2 and kvq4, over fp16 tiles dequantized first.
  bool ReadsPackedInPrefill() const { return kvq_ && config_.bits == 3 && options_.prefill_reads_packed; }

  DeviceMemory pool_;         // pages of every layer, and the sink/residual slots
  DeviceMemory page_table_;   // int32 [max_sequences][n_pages_]
  DeviceMemory tables_;       // calibration per layer, inv_freq, key outlier counters
  DeviceMemory scratch_;
  std::vector<KvqStoreLayer> layers_;   // kvq
  std::vector<uint16_t*> fp_k_, fp_v_;  // fp16: [page][n_kv_heads][128][head_dim] per layer
  std::vector<float*> key_low_, key_high_, key_codebook_, value_codebook_;
  float* inv_freq_ = nullptr;
  uint2* rope_table_ = nullptr;  // kvq: KvqRopeTable, the fp16 RoPE factors of page offsets
  int64_t* key_outliers_ = nullptr;  // [layer][slot][n_kv_heads]
  int* segments_taken_ = nullptr;    // [slot]: key outlier segments of the sequence's pool in use
  int* overflow_host_ = nullptr;     // mapped pinned flags [slot] the kernels raise
  int* overflow_device_ = nullptr;

  // Scratch.
  __half* q_half_ = nullptr;       // fp16 [max_chunk][n_heads][head_dim]
  void* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  char* attend_meta_buffer_ = nullptr;  // device memory of attend_meta_ and append_meta_
  char* append_meta_buffer_ = nullptr;
  uint8_t* flush_count_ = nullptr;
  uint8_t* flush_channel_ = nullptr;
  uint16_t* flush_value_ = nullptr;
  __half* tile_k_ = nullptr;       // fp16 [n_kv_heads][tile][head_dim]
  __half* tile_v_ = nullptr;
  float* merge_out_[2] = {};       // fp32 [2][max_chunk * n_heads][head_dim]
  float* merge_lse_[2] = {};
  float* fill_k_ = nullptr;        // fp32 [fill_chunk][n_kv_heads][head_dim]
  float* fill_v_ = nullptr;
  StagingRing staging_;
  StepMetadata attend_meta_;  // AttendRows: the rows' starts, slots and stream lengths
  StepMetadata append_meta_;  // AppendRows: the rows' positions (fp16) or the kvq append plan

  std::unordered_map<int64_t, Sequence> sequences_;
  std::vector<int32_t> free_pages_;  // descending, so pages are taken in ascending order
  std::vector<int32_t> free_slots_;
};

absl::Status DeviceKvStoreImpl::Init(const Calibration* calibration) {
  const KvGeometry& g = geometry_;
  const int d = g.head_dim, kvh = g.n_kv_heads, L = g.n_layers;
  if (options_.max_sequences <= 0 || options_.max_rows <= 0 || options_.max_chunk <= 0 || options_.fill_chunk <= 0) {
    return absl::InvalidArgumentError("DeviceKvStoreOptions: max_sequences, max_rows, max_chunk and fill_chunk must be positive");
  }
  if (options_.chunk_tile_tokens <= 0 || options_.chunk_tile_tokens % 64 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceKvStoreOptions: chunk_tile_tokens ", options_.chunk_tile_tokens,
                                                   " must be a positive multiple of 64"));
  }
  max_tokens_ = std::max<int64_t>(options_.max_chunk, options_.fill_chunk);
  tile_tokens_ = options_.chunk_tile_tokens;
  const int max_seq = options_.max_sequences;
  int fi = 0, bi = 0;
  if (kvq_) {
    KV_RETURN_IF_ERROR(ValidateKvScheme(config_, d));
    if (!config_.quantize_keys || !config_.quantize_values || config_.exact_decode_view) {
      return absl::UnimplementedError(absl::StrCat("the device KV store keeps kvq keys and values quantized and has no "
                                                   "exact decode view (scheme ", config_.ToString(), ")"));
    }
    if (calibration == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("KV scheme ", config_.name(), " needs a calibration file"));
    }
    KV_RETURN_IF_ERROR(CheckCalibrationGeometry(*calibration, g));
    KV_ASSIGN_OR_RETURN(fi, calibration->FractionIndex(config_.outlier_fraction));
    KV_ASSIGN_OR_RETURN(bi, calibration->BitsIndex(config_.bits));
    n_value_outliers_ = std::clamp(KvqValueOutliersPerToken(config_, d), 0, d - 1);
    ring_ = static_cast<int>(std::max<int64_t>(1, config_.residual_tokens));
    code_bytes_ = 16 * config_.bits * d;
    if (!(options_.key_outlier_headroom > 0.0)) {
      return absl::InvalidArgumentError("DeviceKvStoreOptions: key_outlier_headroom must be positive");
    }
    const int64_t segment =
        options_.key_outlier_capacity > 0
            ? options_.key_outlier_capacity
            : static_cast<int64_t>(std::ceil(options_.key_outlier_headroom * config_.outlier_fraction * kPageTokens * d));
    key_outlier_shift_ = 4;
    while ((int64_t{1} << key_outlier_shift_) < segment) ++key_outlier_shift_;
    if (key_outlier_shift_ > 24) {
      return absl::InvalidArgumentError(absl::StrCat("DeviceKvStoreOptions: key outlier room of ", segment,
                                                     " per page is beyond 2^24"));
    }
  }

  // Scratch first, so that "all free memory" below leaves room for it.
  const int64_t chunk_rows = static_cast<int64_t>(options_.max_chunk) * g.n_heads;
  workspace_bytes_ = kvq_ ? KvqDecodeAttentionWorkspaceBytes(options_.max_rows, g.n_heads, d)
                          : DecodeAttentionWorkspaceBytes(options_.max_rows, g.n_heads, d);
  const int64_t max_flush = max_tokens_ + ring_ + sink_max() + 64;
  // Step metadata: AttendRows packs 5 arrays of 4 or 8 bytes a row; a decode append packs 3 arrays (fp16)
  // or its kvq plan, at most a few runs, pages and writes of about 28 bytes a row (larger plans go
  // through the staging ring each time).
  const int64_t attend_meta_bytes = static_cast<int64_t>(options_.max_rows) * 24 + 5 * 16;
  const int64_t append_meta_bytes = static_cast<int64_t>(options_.max_rows) * 256 + 3 * 16;
  struct Part {
    void** ptr;
    int64_t bytes;
  };
  std::vector<Part> parts = {
      {reinterpret_cast<void**>(&q_half_), chunk_rows * d * 2},
      {&workspace_, std::max<int64_t>(workspace_bytes_, 16)},
      {reinterpret_cast<void**>(&attend_meta_buffer_), attend_meta_bytes},
      {reinterpret_cast<void**>(&append_meta_buffer_), append_meta_bytes},
      {reinterpret_cast<void**>(&fill_k_), static_cast<int64_t>(options_.fill_chunk) * kvh * d * 4},
      {reinterpret_cast<void**>(&fill_v_), static_cast<int64_t>(options_.fill_chunk) * kvh * d * 4},
  };
  if (kvq_) {
    parts.push_back({reinterpret_cast<void**>(&flush_count_), max_flush * kvh});
    parts.push_back({reinterpret_cast<void**>(&flush_channel_), max_flush * kvh * d});
    parts.push_back({reinterpret_cast<void**>(&flush_value_), max_flush * kvh * d * 2});
  }
  if (kvq_ && !ReadsPackedInPrefill()) {  // chunk attention over dequantized tiles
    parts.push_back({reinterpret_cast<void**>(&tile_k_), static_cast<int64_t>(kvh) * tile_tokens_ * d * 2});
    parts.push_back({reinterpret_cast<void**>(&tile_v_), static_cast<int64_t>(kvh) * tile_tokens_ * d * 2});
    for (int i = 0; i < 2; ++i) {
      parts.push_back({reinterpret_cast<void**>(&merge_out_[i]), 2 * chunk_rows * d * 4});
      parts.push_back({reinterpret_cast<void**>(&merge_lse_[i]), 2 * chunk_rows * 4});
    }
  }
  int64_t scratch_bytes = 0;
  for (const Part& p : parts) scratch_bytes += AlignUp(p.bytes, kAlign);
  KV_ASSIGN_OR_RETURN(scratch_, DeviceMemory::Allocate(scratch_bytes, "KV store scratch"));
  {
    char* base = scratch_.as<char>();
    for (const Part& p : parts) {
      *p.ptr = base;
      base += AlignUp(p.bytes, kAlign);
    }
  }
  attend_meta_.Bind(attend_meta_buffer_, attend_meta_bytes);
  append_meta_.Bind(append_meta_buffer_, append_meta_bytes);

  // Calibration tables, RoPE frequencies, key outlier counters.
  const std::vector<float> inv_freq = RopeInverseFrequencies(g.rope);
  const int64_t per_layer_floats = kvq_ ? 2 * kvh * d + 2 * 16 : 0;
  const int64_t counters = kvq_ ? static_cast<int64_t>(L) * max_seq * kvh : 0;
  const std::vector<uint2> rope_table = kvq_ ? KvqRopeTable(inv_freq) : std::vector<uint2>();
  const int64_t rope_bytes = static_cast<int64_t>(rope_table.size() * sizeof(uint2));
  const int64_t table_bytes = AlignUp(static_cast<int64_t>(inv_freq.size()) * 4, kAlign) + AlignUp(rope_bytes, kAlign) +
                              AlignUp(L * per_layer_floats * 4, kAlign) + AlignUp(counters * 8, kAlign) +
                              AlignUp(static_cast<int64_t>(max_seq) * 4, kAlign);
  KV_ASSIGN_OR_RETURN(tables_, DeviceMemory::Allocate(table_bytes, "KV store tables"));
  {
    char* base = tables_.as<char>();
    inv_freq_ = reinterpret_cast<float*>(base);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq_, inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice));
    base += AlignUp(static_cast<int64_t>(inv_freq.size()) * 4, kAlign);
    if (rope_bytes > 0) {
      rope_table_ = reinterpret_cast<uint2*>(base);
      CUDA_RETURN_IF_ERROR(cudaMemcpy(rope_table_, rope_table.data(), rope_bytes, cudaMemcpyHostToDevice));
      base += AlignUp(rope_bytes, kAlign);
    }
    if (kvq_) {
      float* f = reinterpret_cast<float*>(base);
      for (int l = 0; l < L; ++l) {
        const KvqLayerTables& t = calibration->layers[l].kvq[fi];
        std::vector<float> host(per_layer_floats, 0.0f);
        std::copy(t.key_low.begin(), t.key_low.begin() + kvh * d, host.begin());
        std::copy(t.key_high.begin(), t.key_high.begin() + kvh * d, host.begin() + kvh * d);
        std::copy(t.key_codebooks[bi].begin(), t.key_codebooks[bi].end(), host.begin() + 2 * kvh * d);
        std::copy(t.value_codebooks[bi].begin(), t.value_codebooks[bi].end(), host.begin() + 2 * kvh * d + 16);
        float* dst = f + l * per_layer_floats;
        CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
        key_low_.push_back(dst);
        key_high_.push_back(dst + kvh * d);
        key_codebook_.push_back(dst + 2 * kvh * d);
        value_codebook_.push_back(dst + 2 * kvh * d + 16);
      }
      base += AlignUp(L * per_layer_floats * 4, kAlign);
      key_outliers_ = reinterpret_cast<int64_t*>(base);
      CUDA_RETURN_IF_ERROR(cudaMemset(key_outliers_, 0, counters * 8));
      base += AlignUp(counters * 8, kAlign);
      segments_taken_ = reinterpret_cast<int*>(base);
      CUDA_RETURN_IF_ERROR(cudaMemset(segments_taken_, 0, static_cast<int64_t>(max_seq) * 4));
    }
  }
  // One overflow flag per sequence slot: a sequence whose pages overflow fails on its own.
  CUDA_RETURN_IF_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&overflow_host_), sizeof(int) * options_.max_sequences,
                                     cudaHostAllocMapped));
  std::fill(overflow_host_, overflow_host_ + options_.max_sequences, 0);
  CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(reinterpret_cast<void**>(&overflow_device_), overflow_host_, 0));

  // Staging: the largest per-call metadata (an append of max_tokens_, or max_rows decode rows).
  const int64_t per_token = sizeof(KvqFlushRun) + sizeof(KvqFlushPage) + sizeof(KvqWriteToken) + 8 + 16;
  KV_RETURN_IF_ERROR(staging_.Init((max_tokens_ + ring_ + sink_max() + 64 + options_.max_rows) * per_token +
                                   attend_meta_bytes + append_meta_bytes + 16 * 16));

  // The pool: pages shared by all layers, the sink/residual slots, the page table and outlier offsets.
  const int64_t slot_bytes =
      kvq_ ? static_cast<int64_t>(L) * max_seq * kvh * (sink_max() + ring_) * d * 2 * 2 : 0;
  int64_t per_ph = 0;  // bytes of one (page, KV head) of one layer
  if (kvq_) {
    per_ph = 2 * code_bytes_ + 2 * kPageTokens * 2 + kPageTokens * n_value_outliers_ * 3 + kPageTokens + 8 +
             4 * kKvqSegmentTableWidth + (int64_t{3} << key_outlier_shift_);
  } else {
    per_ph = 2 * kPageTokens * d * 2;
  }
  const int64_t page_bytes = static_cast<int64_t>(L) * kvh * per_ph + max_seq * 4 + kvh * 8;
  // Alignment slack of the per-layer arrays.
  const int64_t slack = static_cast<int64_t>(L) * 12 * kAlign + 8 * kAlign;
  // What the pool may take: the memory free now, after the scratch above, less the reserve. A budget
  // measured before the scratch (a worker's) would otherwise fail the pool's allocation once the scratch
  // outgrows the reserve (large prefill chunks).
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  const int64_t available = static_cast<int64_t>(free_bytes) - options_.reserve_bytes;
  int64_t budget = options_.pool_bytes;
  if (options_.pool_tokens > 0) {
    budget = slot_bytes + slack + std::max<int64_t>(1, PagesFor(0, options_.pool_tokens)) * page_bytes;
    if (budget > available) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "a %s KV cache of %d tokens needs %.2f GiB of GPU memory; %.2f GiB are free (%.2f GiB of them kept in "
          "reserve)", config_.name(), options_.pool_tokens, budget / 1073741824.0, free_bytes / 1073741824.0,
          options_.reserve_bytes / 1073741824.0));
    }
  } else if (budget <= 0 || budget > available) {
    budget = available;
  }
  n_pages_ = (budget - slot_bytes - slack) / page_bytes;
  if (n_pages_ <= 0) {
    return absl::ResourceExhaustedError(absl::StrCat("the KV pool of ", budget, " bytes holds no page (a page of ",
                                                     kPageTokens, " tokens takes ", page_bytes, " bytes, the ",
                                                     max_seq, " sequence slots ", slot_bytes, ")"));
  }
  n_pages_ = std::min<int64_t>(n_pages_, std::numeric_limits<int32_t>::max() / std::max(kvh, 1) / kPageTokens);
  n_pages_ = std::min<int64_t>(n_pages_, std::numeric_limits<int32_t>::max() / std::max(kvh * L, 1));  // segment ids
  const int64_t phs = n_pages_ * kvh;
  int64_t pool_total = 0;
  auto sized = [&](int64_t bytes) {
    const int64_t b = AlignUp(std::max<int64_t>(bytes, 16), kAlign);
    pool_total += b;
    return b;
  };
  if (kvq_) {
    for (int l = 0; l < L; ++l) {
      sized(phs * code_bytes_);
      sized(phs * code_bytes_);
      sized(phs * kPageTokens * 2);
      sized(phs * kPageTokens * 2);
      sized(phs * kPageTokens * n_value_outliers_);
      sized(phs * kPageTokens * n_value_outliers_ * 2);
      sized(phs * kPageTokens);
      sized(phs * 8);
      sized(phs * kKvqSegmentTableWidth * 4);
    }
    sized((L * phs) << key_outlier_shift_);  // key outliers of every layer: one pool per sequence
    sized(((L * phs) << key_outlier_shift_) * 2);
    sized(slot_bytes / 2);
    sized(slot_bytes / 2);
  } else {
    for (int l = 0; l < L; ++l) {
      sized(phs * kPageTokens * d * 2);
      sized(phs * kPageTokens * d * 2);
    }
  }
  KV_ASSIGN_OR_RETURN(pool_, DeviceMemory::Allocate(pool_total, "KV pool"));
  char* base = pool_.as<char>();
  auto take = [&](int64_t bytes) {
    char* p = base;
    base += AlignUp(std::max<int64_t>(bytes, 16), kAlign);
    return p;
  };
  if (kvq_) {
    layers_.resize(L);
    for (int l = 0; l < L; ++l) {
      KvqStoreLayer& x = layers_[l];
      x.key_codes = reinterpret_cast<uint8_t*>(take(phs * code_bytes_));
      x.value_codes = reinterpret_cast<uint8_t*>(take(phs * code_bytes_));
      x.value_low = reinterpret_cast<uint16_t*>(take(phs * kPageTokens * 2));
      x.value_high = reinterpret_cast<uint16_t*>(take(phs * kPageTokens * 2));
      x.value_outlier_channel = reinterpret_cast<uint8_t*>(take(phs * kPageTokens * n_value_outliers_));
      x.value_outlier_value = reinterpret_cast<uint16_t*>(take(phs * kPageTokens * n_value_outliers_ * 2));
      x.key_outlier_count = reinterpret_cast<uint8_t*>(take(phs * kPageTokens));
      x.key_outlier_start = reinterpret_cast<int64_t*>(take(phs * 8));
      x.key_outlier_segments = reinterpret_cast<int32_t*>(take(phs * kKvqSegmentTableWidth * 4));
      x.key_outlier_segment_shift = key_outlier_shift_;
      x.n_layers = L;
      x.layer_segments = phs;
      x.max_sink = static_cast<int>(sink_max());
      x.ring = ring_;
      x.key_low = key_low_[l];
      x.key_high = key_high_[l];
      x.key_codebook = key_codebook_[l];
      x.value_codebook = value_codebook_[l];
      x.inv_freq = inv_freq_;
      x.key_outliers = key_outliers_ + static_cast<int64_t>(l) * max_seq * kvh;
      x.key_outlier_segments_taken = segments_taken_;
      x.overflow = overflow_device_;
    }
    uint8_t* outlier_channel = reinterpret_cast<uint8_t*>(take((L * phs) << key_outlier_shift_));
    uint16_t* outlier_value = reinterpret_cast<uint16_t*>(take(((L * phs) << key_outlier_shift_) * 2));
    for (KvqStoreLayer& x : layers_) {
      x.key_outlier_channel = outlier_channel;
      x.key_outlier_value = outlier_value;
    }
    const int64_t per_layer_sink = static_cast<int64_t>(max_seq) * kvh * sink_max() * d;
    const int64_t per_layer_ring = static_cast<int64_t>(max_seq) * kvh * ring_ * d;
    uint16_t* k_slots = reinterpret_cast<uint16_t*>(take(slot_bytes / 2));
    uint16_t* v_slots = reinterpret_cast<uint16_t*>(take(slot_bytes / 2));
    for (int l = 0; l < L; ++l) {
      const int64_t off = l * (per_layer_sink + per_layer_ring);
      layers_[l].sink_k = sink_max() > 0 ? k_slots + off : nullptr;
      layers_[l].sink_v = sink_max() > 0 ? v_slots + off : nullptr;
      layers_[l].residual_k = k_slots + off + per_layer_sink;
      layers_[l].residual_v = v_slots + off + per_layer_sink;
    }
  } else {
    for (int l = 0; l < L; ++l) {
      fp_k_.push_back(reinterpret_cast<uint16_t*>(take(phs * kPageTokens * d * 2)));
      fp_v_.push_back(reinterpret_cast<uint16_t*>(take(phs * kPageTokens * d * 2)));
    }
  }
  KV_ASSIGN_OR_RETURN(page_table_, DeviceMemory::Allocate(static_cast<int64_t>(max_seq) * n_pages_ * 4, "page table"));
  free_pages_.resize(n_pages_);
  for (int64_t i = 0; i < n_pages_; ++i) free_pages_[i] = static_cast<int32_t>(n_pages_ - 1 - i);
  for (int s = max_seq - 1; s >= 0; --s) free_slots_.push_back(s);
  return absl::OkStatus();
}

absl::Status DeviceKvStoreImpl::CheckOverflow(int64_t id, const Sequence& s) const {
  if (kvq_ && reinterpret_cast<volatile int*>(overflow_host_)[s.slot] != 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "sequence ", id, ": ", kKvqKeyOutlierOverflow, " of its ", s.pages.size(), " pages (",
        int64_t{1} << key_outlier_shift_, " per page, KV head and layer, shared; raise --kv_outlier_headroom, or "
        "calibrate on text like this request's: thresholds from other text keep fewer keys inside them); the excess "
        "was dropped, so the sequence is refused"));
  }
  return absl::OkStatus();
}

absl::Status DeviceKvStoreImpl::Health(int64_t id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("sequence ", id, " is not in the KV store"));
  return CheckOverflow(id, it->second);
}

absl::StatusOr<Sequence*> DeviceKvStoreImpl::Find(int64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("sequence ", id, " is not in the KV store"));
  return &it->second;
}

absl::Status DeviceKvStoreImpl::CheckLayer(int layer) const {
  if (layer < 0 || layer >= geometry_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range [0, ", geometry_.n_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status DeviceKvStoreImpl::CheckAppend(const Sequence& s, int layer, int64_t n) const {
  if (s.sealed) {
    return absl::FailedPreconditionError("the sequence is sealed (another worker holds its tail)");
  }
  if (s.lengths[layer] + n > s.capacity) {
    return absl::OutOfRangeError(absl::StrCat("appending ", n, " tokens to layer ", layer, " (", s.lengths[layer],
                                              " held) exceeds the ", s.capacity, " reserved"));
  }
  return absl::OkStatus();
}

int64_t DeviceKvStoreImpl::FreeTokens() const {
  if (free_slots_.empty()) return 0;
  return static_cast<int64_t>(free_pages_.size()) * kPageTokens + sink_max();
}

absl::Status DeviceKvStoreImpl::AddSequence(int64_t id, int64_t start_position, int64_t capacity) {
  if (start_position < 0 || capacity < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", id, ": negative start position or capacity"));
  }
  if (sequences_.count(id) > 0) return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " is already held"));
  if (free_slots_.empty()) {
    return absl::ResourceExhaustedError(absl::StrCat("the KV store holds its maximum of ", options_.max_sequences,
                                                     " sequences (DeviceKvStoreOptions::max_sequences)"));
  }
  const int64_t pages = PagesFor(start_position, capacity);
  if (pages > static_cast<int64_t>(free_pages_.size())) {
    return absl::ResourceExhaustedError(absl::StrCat("the KV pool cannot hold ", capacity, " more tokens; ",
                                                     FreeTokens(), " still fit"));
  }
  Sequence s;
  s.slot = free_slots_.back();
  s.start = start_position;
  s.capacity = capacity;
  s.lengths.assign(geometry_.n_layers, 0);
  for (int64_t i = 0; i < pages; ++i) {
    s.pages.push_back(free_pages_.back());
    free_pages_.pop_back();
  }
  free_slots_.pop_back();
  // Work of a removed sequence may still read these pages: admission waits for the device (rare).
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  if (!s.pages.empty()) {
    CUDA_RETURN_IF_ERROR(cudaMemcpy(page_table_.as<int32_t>() + static_cast<int64_t>(s.slot) * n_pages_, s.pages.data(),
                                    s.pages.size() * 4, cudaMemcpyHostToDevice));
  }
  if (kvq_) {
    // Absent tokens' codes are 0, as the CPU pages (the bytes then compare whole).
    const int64_t kvh = geometry_.n_kv_heads;
    for (size_t i = 0; i < s.pages.size();) {
      size_t j = i + 1;
      while (j < s.pages.size() && s.pages[j] == s.pages[j - 1] + 1) ++j;
      const int64_t off = static_cast<int64_t>(s.pages[i]) * kvh * code_bytes_;
      const int64_t bytes = static_cast<int64_t>(j - i) * kvh * code_bytes_;
      for (const KvqStoreLayer& x : layers_) {
        CUDA_RETURN_IF_ERROR(cudaMemset(x.key_codes + off, 0, bytes));
        CUDA_RETURN_IF_ERROR(cudaMemset(x.value_codes + off, 0, bytes));
      }
      i = j;
    }
    for (const KvqStoreLayer& x : layers_) {
      CUDA_RETURN_IF_ERROR(cudaMemset(x.key_outliers + static_cast<int64_t>(s.slot) * kvh, 0, kvh * 8));
    }
    CUDA_RETURN_IF_ERROR(cudaMemset(segments_taken_ + s.slot, 0, 4));
  }
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  overflow_host_[s.slot] = 0;  // the slot's last holder may have overflowed; its work is done
  sequences_.emplace(id, std::move(s));
  attend_meta_.Forget();  // a slot may have changed hands
  append_meta_.Forget();
  return absl::OkStatus();
}

void DeviceKvStoreImpl::RemoveSequence(int64_t id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return;
  for (int32_t p : it->second.pages) free_pages_.push_back(p);
  std::sort(free_pages_.begin(), free_pages_.end(), std::greater<int32_t>());
  free_slots_.push_back(it->second.slot);
  sequences_.erase(it);
  attend_meta_.Forget();
  append_meta_.Forget();
}

void DeviceKvStoreImpl::PlanKvqAppend(const Sequence& s, int64_t old, int64_t now, bool sealed, int32_t chunk0,
                                      KvqAppendPlan& plan) const {
  const int64_t sink = SinkOf(s.start);
  const int64_t q_old = std::max(StreamLayout(config_, s.start, old, s.sealed).quantized_end, sink);
  const int64_t q_new = std::max(StreamLayout(config_, s.start, now, sealed).quantized_end, sink);
  // Moves into the quantized range: runs within one 32-token word group, entries per page.
  for (int64_t j = q_old; j < q_new;) {
    const int64_t t = j - sink;
    const int64_t n = std::min<int64_t>(32 - t % 32, q_new - j);
    KvqFlushRun r;
    r.slot = s.slot;
    r.page = s.pages[t / kPageTokens];
    r.part0 = static_cast<int32_t>(t);
    r.n = static_cast<int32_t>(n);
    r.fp_from = static_cast<int32_t>(old - sink);
    r.chunk0 = chunk0;
    r.scratch0 = plan.n_flush;
    plan.runs.push_back(r);
    if (plan.pages.empty() || t % kPageTokens == 0 || plan.pages.back().slot != s.slot) {
      plan.pages.push_back(KvqFlushPage{s.slot, r.page, static_cast<int32_t>(t % kPageTokens), 0, plan.n_flush,
                                        static_cast<int32_t>(s.pages.size())});
    }
    plan.pages.back().n += static_cast<int32_t>(n);
    plan.n_flush += static_cast<int>(n);
    j += n;
  }
  // New tokens that stay fp16.
  for (int64_t j = old; j < now; ++j) {
    KvqWriteToken w{};
    w.slot = s.slot;
    w.chunk_token = chunk0 + static_cast<int32_t>(j - old);
    w.position = s.start + j;
    if (j < sink) {
      w.dest = static_cast<int32_t>(-1 - j);
    } else if (j >= q_new) {
      w.dest = static_cast<int32_t>((j - sink) % ring_);
    } else {
      continue;  // quantized straight from the call's tokens
    }
    plan.writes.push_back(w);
  }
}

absl::Status DeviceKvStoreImpl::RunKvqAppend(int layer, const KvqAppendPlan& plan, const float* k, const float* v,
                                             int64_t row_stride, cudaStream_t stream, bool same_every_layer) {
  if (plan.runs.empty() && plan.writes.empty()) return absl::OkStatus();
  KvqAppendArgs a;
  a.layer = LayerView(layer);
  a.page_table = page_table_.as<int32_t>();
  a.page_table_stride = n_pages_;
  a.n_kv_heads = geometry_.n_kv_heads;
  a.head_dim = geometry_.head_dim;
  a.bits = config_.bits;
  a.n_value_outliers = n_value_outliers_;
  a.k = k;
  a.v = v;
  a.row_stride = row_stride;
  a.n_runs = static_cast<int>(plan.runs.size());
  a.n_pages = static_cast<int>(plan.pages.size());
  a.n_flush = plan.n_flush;
  a.scratch_count = flush_count_;
  a.scratch_channel = flush_channel_;
  a.scratch_value = flush_value_;
  a.n_writes = static_cast<int>(plan.writes.size());
  auto pack = [&](auto& writer) {
    a.runs = writer.Put(plan.runs);
    a.pages = writer.Put(plan.pages);
    a.writes = writer.Put(plan.writes);
  };
  if (same_every_layer) {  // a decode step's plan: uploaded once for all its layers
    append_meta_.Begin();
    pack(append_meta_);
    if (append_meta_.fits(staging_)) {
      KV_RETURN_IF_ERROR(append_meta_.Commit(staging_, stream));
      return KvqStoreAppendCuda(a, stream);
    }
  }
  KV_ASSIGN_OR_RETURN(StagingRing::Slot slot, staging_.Acquire());
  SlotWriter w(slot);
  pack(w);
  KV_RETURN_IF_ERROR(staging_.Upload(slot, w.bytes(), stream));
  const absl::Status launched = KvqStoreAppendCuda(a, stream);
  KV_RETURN_IF_ERROR(staging_.Release(slot, stream));
  return launched;
}

absl::Status DeviceKvStoreImpl::AppendTokens(int layer, Sequence& s, int64_t n, const float* k, const float* v,
                                             int64_t row_stride, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const int64_t old = s.lengths[layer];
  if (kvq_) {
    KvqAppendPlan plan;
    PlanKvqAppend(s, old, old + n, /*sealed=*/false, 0, plan);
    KV_RETURN_IF_ERROR(RunKvqAppend(layer, plan, k, v, row_stride, stream));
  } else {
    KV_ASSIGN_OR_RETURN(StagingRing::Slot slot, staging_.Acquire());
    SlotWriter w(slot);
    std::vector<int64_t> positions(n);
    for (int64_t i = 0; i < n; ++i) positions[i] = s.start + old + i;
    KvWriteArgs a;
    a.k = k;
    a.v = v;
    a.row_stride = row_stride;
    a.n_tokens = static_cast<int>(n);
    a.n_kv_heads = geometry_.n_kv_heads;
    a.head_dim = geometry_.head_dim;
    a.positions = w.Put(positions);
    a.inv_freq = inv_freq_;
    a.cache = PagedKv{DType::kF16, fp_k_[layer], fp_v_[layer], kPageTokens, page_table_.as<int32_t>(), n_pages_};
    a.request = s.slot;
    a.first_index = old;
    KV_RETURN_IF_ERROR(staging_.Upload(slot, w.bytes(), stream));
    const absl::Status launched = WriteKvCacheCuda(a, stream);
    KV_RETURN_IF_ERROR(staging_.Release(slot, stream));
    KV_RETURN_IF_ERROR(launched);
  }
  s.lengths[layer] = old + n;
  return absl::OkStatus();
}

absl::Status DeviceKvStoreImpl::Append(int layer, int64_t id, int n_tokens, const float* k, const float* v,
                                       int64_t row_stride, cudaStream_t stream) {
  KV_RETURN_IF_ERROR(CheckLayer(layer));
  if (n_tokens < 0 || n_tokens > options_.max_chunk) {
    return absl::InvalidArgumentError(absl::StrCat("Append of ", n_tokens, " tokens; 0..", options_.max_chunk,
                                                   " per call (DeviceKvStoreOptions::max_chunk)"));
  }
  KV_ASSIGN_OR_RETURN(Sequence * s, Find(id));
  KV_RETURN_IF_ERROR(CheckOverflow(id, *s));
  KV_RETURN_IF_ERROR(CheckAppend(*s, layer, n_tokens));
  return AppendTokens(layer, *s, n_tokens, k, v, row_stride, stream);
}

absl::Status DeviceKvStoreImpl::AppendRows(int layer, std::span<const int64_t> ids, const float* k, const float* v,
                                           int64_t row_stride, cudaStream_t stream) {
  KV_RETURN_IF_ERROR(CheckLayer(layer));
  const int rows = static_cast<int>(ids.size());
  if (rows > options_.max_rows) {
    return absl::InvalidArgumentError(absl::StrCat("AppendRows of ", rows, " rows; at most ", options_.max_rows,
                                                   " (DeviceKvStoreOptions::max_rows)"));
  }
  std::vector<Sequence*> seqs(rows, nullptr);
  for (int i = 0; i < rows; ++i) {
    if (ids[i] < 0) continue;
    KV_ASSIGN_OR_RETURN(seqs[i], Find(ids[i]));
    KV_RETURN_IF_ERROR(CheckOverflow(ids[i], *seqs[i]));
    KV_RETURN_IF_ERROR(CheckAppend(*seqs[i], layer, 1));
    for (int j = 0; j < i; ++j) {
      if (ids[j] == ids[i]) return absl::InvalidArgumentError(absl::StrCat("sequence ", ids[i], " appears twice in AppendRows"));
    }
  }
  if (kvq_) {
    KvqAppendPlan plan;
    for (int i = 0; i < rows; ++i) {
      if (seqs[i] == nullptr) continue;
      const int64_t old = seqs[i]->lengths[layer];
      PlanKvqAppend(*seqs[i], old, old + 1, /*sealed=*/false, i, plan);
    }
    KV_RETURN_IF_ERROR(RunKvqAppend(layer, plan, k, v, row_stride, stream, /*same_every_layer=*/true));
  } else {
    // Runs of held rows: one write each (a skipped row breaks the token stride of the kernel's input). Their
    // positions are packed together and uploaded once for all the step's layers.
    std::vector<KvWriteArgs> writes;
    append_meta_.Begin();
    for (int i = 0; i < rows;) {
      if (seqs[i] == nullptr) {
        ++i;
        continue;
      }
      int j = i;
      while (j < rows && seqs[j] != nullptr) ++j;
      std::vector<int32_t> requests;
      std::vector<int64_t> indices, positions;
      for (int r = i; r < j; ++r) {
        requests.push_back(seqs[r]->slot);
        indices.push_back(seqs[r]->lengths[layer]);
        positions.push_back(seqs[r]->start + seqs[r]->lengths[layer]);
      }
      KvWriteArgs a;
      a.k = k + static_cast<int64_t>(i) * row_stride;
      a.v = v + static_cast<int64_t>(i) * row_stride;
      a.row_stride = row_stride;
      a.n_tokens = j - i;
      a.n_kv_heads = geometry_.n_kv_heads;
      a.head_dim = geometry_.head_dim;
      a.positions = append_meta_.Put(positions);
      a.token_requests = append_meta_.Put(requests);
      a.token_indices = append_meta_.Put(indices);
      a.inv_freq = inv_freq_;
      a.cache = PagedKv{DType::kF16, fp_k_[layer], fp_v_[layer], kPageTokens, page_table_.as<int32_t>(), n_pages_};
      writes.push_back(a);
      i = j;
    }
    KV_RETURN_IF_ERROR(append_meta_.Commit(staging_, stream));
    for (const KvWriteArgs& a : writes) KV_RETURN_IF_ERROR(WriteKvCacheCuda(a, stream));
  }
  for (Sequence* s : seqs)
    if (s != nullptr) ++s->lengths[layer];
  return absl::OkStatus();
}

absl::Status DeviceKvStoreImpl::AttendRows(int layer, std::span<const int64_t> ids, const float* q, int64_t q_stride,
                                           float* out, float* lse, cudaStream_t stream) {
  KV_RETURN_IF_ERROR(CheckLayer(layer));
  const int rows = static_cast<int>(ids.size());
  if (rows > options_.max_rows) {
    return absl::InvalidArgumentError(absl::StrCat("AttendRows of ", rows, " rows; at most ", options_.max_rows,
                                                   " (DeviceKvStoreOptions::max_rows)"));
  }
  if (rows == 0) return absl::OkStatus();
  const KvGeometry& g = geometry_;
  const int64_t row_floats = static_cast<int64_t>(g.n_heads) * g.head_dim;
  // Row metadata: start positions, slots, and the sink, quantized and residual (fp16: all) lengths.
  std::vector<int32_t> slots(rows, 0), sink(rows, 0), quantized(rows, 0), residual(rows, 0);
  std::vector<int64_t> starts(rows, 0);
  int64_t max_len = 0;
  for (int i = 0; i < rows; ++i) {
    if (ids[i] < 0) continue;
    KV_ASSIGN_OR_RETURN(Sequence * s, Find(ids[i]));
    KV_RETURN_IF_ERROR(CheckOverflow(ids[i], *s));
    slots[i] = s->slot;
    starts[i] = s->start;
    const int64_t n = s->lengths[layer];
    if (kvq_) {
      const KvStreamLayout l = StreamLayout(config_, s->start, n, s->sealed);
      sink[i] = static_cast<int32_t>(l.sink);
      quantized[i] = static_cast<int32_t>(l.quantized());
      residual[i] = static_cast<int32_t>(n - l.quantized_end);
      max_len = std::max(max_len, l.quantized());
    } else {
      residual[i] = static_cast<int32_t>(n);
      max_len = std::max(max_len, n);
    }
  }
  attend_meta_.Begin();
  const int64_t* d_starts = attend_meta_.Put(starts);
  const int32_t* d_slots = attend_meta_.Put(slots);
  const int32_t* d_sink = attend_meta_.Put(sink);
  const int32_t* d_quantized = attend_meta_.Put(quantized);
  const int32_t* d_residual = attend_meta_.Put(residual);
  KV_RETURN_IF_ERROR(attend_meta_.Commit(staging_, stream));  // the layers of one decode step share it

  if (q_stride < row_floats) {
    return absl::InvalidArgumentError(absl::StrCat("AttendRows: query rows ", q_stride, " floats apart hold fewer than ",
                                                   row_floats));
  }
  // The fields the fp16 and kvq decode launchers share. The kernels read the queries where the model left
  // them (rows of the fused QKV output), which saves a copy per layer.
  auto set_common = [&](auto& a) {
    a.q = q;
    a.q_row_stride = q_stride;
    a.batch = rows;
    a.n_heads = g.n_heads;
    a.n_kv_heads = g.n_kv_heads;
    a.head_dim = g.head_dim;
    a.scale = g.scale();
    a.out = out;
    a.lse = lse;
    a.workspace = workspace_;
    a.workspace_bytes = workspace_bytes_;
  };
  if (kvq_) {
    const KvqStoreLayer& x = layers_[layer];
    KvqDecodeAttentionArgs a;
    KvqStoreView& kv = a.kv;
    kv.bits = config_.bits;
    kv.n_value_outliers = n_value_outliers_;
    kv.key_codes = x.key_codes;
    kv.value_codes = x.value_codes;
    kv.value_low = x.value_low;
    kv.value_high = x.value_high;
    kv.value_outlier_channel = x.value_outlier_channel;
    kv.value_outlier_value = x.value_outlier_value;
    kv.key_outlier_count = x.key_outlier_count;
    kv.key_outlier_offset = x.key_outlier_start;
    kv.key_outlier_segment_shift = key_outlier_shift_;
    kv.key_outlier_segments = x.key_outlier_segments;
    kv.key_outlier_channel = x.key_outlier_channel;
    kv.key_outlier_value = x.key_outlier_value;
    kv.page_table = page_table_.as<int32_t>();
    kv.pages_per_request = n_pages_;
    kv.sink_k = x.sink_k;
    kv.sink_v = x.sink_v;
    kv.max_sink = x.max_sink;
    kv.residual_k = x.residual_k;
    kv.residual_v = x.residual_v;
    kv.max_residual = ring_;
    kv.sink_lens = d_sink;
    kv.quantized_lens = d_quantized;
    kv.residual_lens = d_residual;
    kv.start_positions = d_starts;
    kv.key_low = x.key_low;
    kv.key_high = x.key_high;
    kv.key_codebook = x.key_codebook;
    kv.value_codebook = x.value_codebook;
    kv.inv_freq = inv_freq_;
    kv.rope_table = rope_table_;
    kv.slots = d_slots;
    kv.residual_ring = true;
    a.max_quantized_len = max_len;
    set_common(a);
    return KvqDecodeAttentionCuda(a, stream);
  }
  DecodeAttentionArgs a;
  a.kv = PagedKv{DType::kF16, fp_k_[layer], fp_v_[layer], kPageTokens, page_table_.as<int32_t>(), n_pages_};
  a.kv_lens = d_residual;
  a.max_kv_len = max_len;
  set_common(a);
  a.page_rows = d_slots;
  return DecodeAttentionCuda(a, stream);
}

absl::Status DeviceKvStoreImpl::AttendChunk(int layer, int64_t id, int n_queries, const float* q, int64_t q_stride,
                                            int64_t first_position, float* out, float* lse, cudaStream_t stream) {
  KV_RETURN_IF_ERROR(CheckLayer(layer));
  if (n_queries < 0 || n_queries > options_.max_chunk) {
    return absl::InvalidArgumentError(absl::StrCat("AttendChunk of ", n_queries, " queries; 0..", options_.max_chunk,
                                                   " per call (DeviceKvStoreOptions::max_chunk)"));
  }
  KV_ASSIGN_OR_RETURN(Sequence * s, Find(id));
  KV_RETURN_IF_ERROR(CheckOverflow(id, *s));
  if (n_queries == 0) return absl::OkStatus();
  const KvGeometry& g = geometry_;
  const int d = g.head_dim;
  const int64_t rows = static_cast<int64_t>(n_queries) * g.n_heads;
  const int64_t length = s->lengths[layer];
  const int64_t visible = std::clamp<int64_t>(first_position + n_queries - s->start, 0, length);
  if (visible == 0) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0, rows * d * 4, stream));
    return FillInt32Cuda(reinterpret_cast<int32_t*>(lse), static_cast<int32_t>(0xff800000u), rows, stream);  // -inf
  }
  const int64_t row_floats = static_cast<int64_t>(g.n_heads) * d;
  KV_RETURN_IF_ERROR(ConvertRowsCuda(q, DType::kF32, q_stride, q_half_, DType::kF16, row_floats, n_queries, row_floats,
                                     stream));
  PrefillAttentionArgs p;
  p.q = q_half_;
  p.n_queries = n_queries;
  p.query_first_position = first_position;
  p.n_heads = g.n_heads;
  p.n_kv_heads = g.n_kv_heads;
  p.head_dim = d;
  p.scale = g.scale();
  if (!kvq_) {
    p.kv = PagedKv{DType::kF16, fp_k_[layer], fp_v_[layer], kPageTokens,
                   page_table_.as<int32_t>() + static_cast<int64_t>(s->slot) * n_pages_, n_pages_};
    p.n_keys = visible;
    p.key_first_position = s->start;
    p.out = out;
    p.lse = lse;
    return PrefillAttentionCuda(p, stream);
  }
  const KvStreamLayout l = StreamLayout(config_, s->start, length, s->sealed);
  KvqStream kvq_stream;
  kvq_stream.layer = layers_[layer];
  kvq_stream.n_kv_heads = g.n_kv_heads;
  kvq_stream.head_dim = d;
  kvq_stream.bits = config_.bits;
  kvq_stream.n_value_outliers = n_value_outliers_;
  kvq_stream.slot = s->slot;
  kvq_stream.page_table = page_table_.as<int32_t>() + static_cast<int64_t>(s->slot) * n_pages_;
  kvq_stream.start_position = s->start;
  kvq_stream.sink = l.sink;
  kvq_stream.quantized_end = l.quantized_end;
  kvq_stream.length = length;
  if (ReadsPackedInPrefill()) {
    KvqPrefillArgs k;
    static_cast<KvqStream&>(k) = kvq_stream;
    k.n_heads = g.n_heads;
    k.q = q_half_;
    k.n_queries = n_queries;
    k.query_first_position = first_position;
    k.scale = g.scale();
    k.out = out;
    k.lse = lse;
    return KvqPrefillAttentionCuda(k, stream);
  }
  // Otherwise (kvq3 by default, kvq2, kvq4): the visible tokens dequantized to fp16 a tile at a time, the
  // tiles' partials merged in turn (two [2][rows] buffers: the running partial and the new tile, merged into
  // the other's first half).
  const int64_t n_tiles = CeilDiv(visible, tile_tokens_);
  int cur = 0;
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t first = t * tile_tokens_;
    const int64_t n = std::min(tile_tokens_, visible - first);
    KvqDequantizeArgs dq;
    static_cast<KvqStream&>(dq) = kvq_stream;
    dq.first = first;
    dq.n = n;
    dq.k = tile_k_;
    dq.v = tile_v_;
    dq.out_stride = tile_tokens_;
    KV_RETURN_IF_ERROR(KvqDequantizeCuda(dq, stream));
    p.kv = PagedKv{DType::kF16, tile_k_, tile_v_, tile_tokens_, nullptr, 1};
    p.n_keys = n;
    p.key_first_position = s->start + first;
    if (n_tiles == 1) {
      p.out = out;
      p.lse = lse;
      return PrefillAttentionCuda(p, stream);
    }
    const int source = t == 0 ? 0 : 1;
    p.out = merge_out_[cur] + source * rows * d;
    p.lse = merge_lse_[cur] + source * rows;
    KV_RETURN_IF_ERROR(PrefillAttentionCuda(p, stream));
    if (t == 0) continue;
    const bool last = t == n_tiles - 1;
    float* dst_out = last ? out : merge_out_[1 - cur];
    float* dst_lse = last ? lse : merge_lse_[1 - cur];
    KV_RETURN_IF_ERROR(MergePartialsCuda(merge_out_[cur], merge_lse_[cur], 2, rows, d, dst_out, dst_lse, stream));
    cur = 1 - cur;
  }
  return absl::OkStatus();
}

absl::Status DeviceKvStoreImpl::SyntheticFill(int64_t id, int64_t end, uint64_t seed, cudaStream_t stream) {
  KV_ASSIGN_OR_RETURN(Sequence * s, Find(id));
  KV_RETURN_IF_ERROR(CheckOverflow(id, *s));
  const int64_t length = s->lengths[0];
  for (int l = 1; l < geometry_.n_layers; ++l) {
    if (s->lengths[l] != length) {
      return absl::FailedPreconditionError(absl::StrCat("synthetic fill of sequence ", id, ": layer ", l, " holds ",
                                                        s->lengths[l], " tokens, layer 0 ", length));
    }
  }
  const int64_t begin = s->start + length;
  if (end < begin) {
    return absl::InvalidArgumentError(absl::StrCat("synthetic fill to position ", end, " of a sequence ending at ", begin));
  }
  if (end - begin == 0) return absl::OkStatus();
  KV_RETURN_IF_ERROR(CheckAppend(*s, 0, end - begin));
  const int kvh = geometry_.n_kv_heads, d = geometry_.head_dim;
  for (int64_t p0 = begin; p0 < end; p0 += options_.fill_chunk) {
    const int64_t n = std::min<int64_t>(options_.fill_chunk, end - p0);
    for (int l = 0; l < geometry_.n_layers; ++l) {
      KV_RETURN_IF_ERROR(SyntheticKvTokensCuda(kvh, d, l, p0, n, seed, fill_k_, fill_v_, stream));
      KV_RETURN_IF_ERROR(AppendTokens(l, *s, n, fill_k_, fill_v_, static_cast<int64_t>(kvh) * d, stream));
    }
  }
  return absl::OkStatus();
}

absl::Status DeviceKvStoreImpl::Seal(int64_t id, cudaStream_t stream) {
  KV_ASSIGN_OR_RETURN(Sequence * s, Find(id));
  KV_RETURN_IF_ERROR(CheckOverflow(id, *s));
  if (s->sealed) return absl::OkStatus();
  if (kvq_) {
    for (int l = 0; l < geometry_.n_layers; ++l) {
      KvqAppendPlan plan;
      PlanKvqAppend(*s, s->lengths[l], s->lengths[l], /*sealed=*/true, 0, plan);
      KV_RETURN_IF_ERROR(RunKvqAppend(l, plan, nullptr, nullptr, 0, stream));
    }
  }
  s->sealed = true;
  return absl::OkStatus();
}

std::vector<int64_t> DeviceKvStoreImpl::KeyOutlierCounts() const {
  std::vector<int64_t> counts;
  if (!kvq_) return counts;
  counts.assign(static_cast<size_t>(geometry_.n_layers) * options_.max_sequences * geometry_.n_kv_heads, 0);
  // A sync point: the counters are updated by the append kernels. One copy of the whole table, [layer][slot]
  // [n_kv_heads], not one per sequence and layer: Memory() runs every step.
  if (cudaDeviceSynchronize() != cudaSuccess) return counts;
  cudaMemcpy(counts.data(), key_outliers_, counts.size() * sizeof(int64_t), cudaMemcpyDeviceToHost);
  return counts;
}

int64_t DeviceKvStoreImpl::StreamBits(const Sequence& s, int layer, const std::vector<int64_t>& outlier_counts) const {
  const int kvh = geometry_.n_kv_heads;
  int64_t bits = 0;
  for (int h = 0; h < kvh; ++h) {
    const size_t i = (static_cast<size_t>(layer) * options_.max_sequences + s.slot) * kvh + h;
    bits += KvStreamBits(config_, geometry_.head_dim, s.start, s.lengths[layer], s.sealed,
                         outlier_counts.empty() ? 0 : outlier_counts[i]);
  }
  return bits;
}

KvMemory DeviceKvStoreImpl::MemoryOf(const Sequence& s, const std::vector<int64_t>& outlier_counts) const {
  KvMemory m;
  int64_t bits = 0;
  for (int l = 0; l < geometry_.n_layers; ++l) {
    bits += StreamBits(s, l, outlier_counts);
    m.elements += 2 * s.lengths[l] * geometry_.n_kv_heads * geometry_.head_dim;
  }
  m.bytes = (bits + 7) / 8;
  return m;
}

KvMemory DeviceKvStoreImpl::Memory(int64_t id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return {};
  return MemoryOf(it->second, KeyOutlierCounts());
}

KvMemory DeviceKvStoreImpl::Memory() const {
  const std::vector<int64_t> outlier_counts = KeyOutlierCounts();
  KvMemory total;
  for (const auto& [id, s] : sequences_) {
    const KvMemory m = MemoryOf(s, outlier_counts);
    total.bytes += m.bytes;
    total.elements += m.elements;
  }
  return total;
}

absl::StatusOr<std::vector<uint8_t>> DeviceKvStoreImpl::CodePage(int64_t id, int layer, int kv_head, int64_t page,
                                                                 KvPart part) const {
  if (!kvq_) return absl::FailedPreconditionError("fp16 stores have no code pages");
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("sequence ", id, " is not in the KV store"));
  KV_RETURN_IF_ERROR(CheckLayer(layer));
  const Sequence& s = it->second;
  if (kv_head < 0 || kv_head >= geometry_.n_kv_heads || page < 0 || page >= static_cast<int64_t>(s.pages.size())) {
    return absl::OutOfRangeError(absl::StrCat("code page ", page, " of KV head ", kv_head, " out of range"));
  }
  std::vector<uint8_t> bytes(code_bytes_);
  const int64_t ph = static_cast<int64_t>(s.pages[page]) * geometry_.n_kv_heads + kv_head;
  const uint8_t* src = (part == KvPart::kKey ? layers_[layer].key_codes : layers_[layer].value_codes) + ph * code_bytes_;
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  CUDA_RETURN_IF_ERROR(cudaMemcpy(bytes.data(), src, code_bytes_, cudaMemcpyDeviceToHost));
  return bytes;
}

}  // namespace

DeviceKvStoreOptions OneSequenceStoreOptions(int64_t tokens, int max_chunk) {
  DeviceKvStoreOptions options;
  options.pool_tokens = tokens;
  options.max_sequences = 1;
  options.max_rows = 1;
  options.max_chunk = max_chunk;
  options.fill_chunk = max_chunk;
  return options;
}

absl::StatusOr<std::unique_ptr<DeviceKvStore>> DeviceKvStore::Create(const KvGeometry& geometry,
                                                                     const KvSchemeConfig& scheme,
                                                                     const Calibration* calibration,
                                                                     const DeviceKvStoreOptions& options) {
  if (scheme.kind != KvSchemeKind::kFp16 && scheme.kind != KvSchemeKind::kKvq) {
    return absl::UnimplementedError(absl::StrCat("the device KV store has the schemes fp16 and kvq2..4, not ",
                                                 scheme.name()));
  }
  if (geometry.n_layers <= 0 || geometry.n_kv_heads <= 0 || geometry.n_heads <= 0 ||
      geometry.n_heads % geometry.n_kv_heads != 0 || (geometry.head_dim != 64 && geometry.head_dim != 128)) {
    return absl::InvalidArgumentError(absl::StrCat("the device KV store needs head_dim 64 or 128 and query heads a "
                                                   "multiple of KV heads (", geometry.n_layers, " layers, ",
                                                   geometry.n_heads, " heads, ", geometry.n_kv_heads, " KV heads, head_dim ",
                                                   geometry.head_dim, ")"));
  }
  auto store = std::make_unique<DeviceKvStoreImpl>(geometry, scheme, options);
  KV_RETURN_IF_ERROR(store->Init(calibration));
  return std::unique_ptr<DeviceKvStore>(std::move(store));
}

}  // namespace kvshard
