// DeviceKvStore for the fp16 scheme: pages of 128 tokens, keys rotated when written, read by the paged
// split-KV decode kernel and the causal prefill kernel of kernels/cuda/attention.h.
#include "worker/cuda/device_kv_store.h"

#include <algorithm>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dense.h"
#include "kernels/rope.h"
#include "worker/cuda/gpu_model.h"

namespace kvshard {
namespace {

constexpr int64_t kPageTokens = 128;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

class Fp16DeviceKvStore final : public DeviceKvStore {
 public:
  Fp16DeviceKvStore(const KvGeometry& geometry, const KvSchemeConfig& scheme, const DeviceKvStoreOptions& options)
      : geometry_(geometry), scheme_(scheme), options_(options) {}

  absl::Status Init() {
    const KvGeometry& g = geometry_;
    page_elements_ = static_cast<int64_t>(g.n_kv_heads) * kPageTokens * g.head_dim;
    const int64_t page_bytes_all_layers = 2 * 2 * page_elements_ * g.n_layers;  // K and V, fp16
    int64_t pool = options_.pool_bytes;
    if (pool <= 0) {
      size_t free_bytes = 0, total_bytes = 0;
      CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
      pool = static_cast<int64_t>(free_bytes) - options_.reserve_bytes;
    }
    n_pages_ = pool / page_bytes_all_layers;
    if (n_pages_ <= 0) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "a KV pool of %.2f GiB holds no page of %lld tokens (%.2f MiB for all layers)", pool / 1073741824.0,
          static_cast<long long>(kPageTokens), page_bytes_all_layers / 1048576.0));
    }
    const int64_t layer_bytes = n_pages_ * page_elements_ * 2;
    KV_ASSIGN_OR_RETURN(keys_, DeviceMemory::Allocate(layer_bytes * g.n_layers, "KV pool keys"));
    KV_ASSIGN_OR_RETURN(values_, DeviceMemory::Allocate(layer_bytes * g.n_layers, "KV pool values"));
    const std::vector<float> inv_freq = RopeInverseFrequencies(g.rope);
    KV_ASSIGN_OR_RETURN(inv_freq_, DeviceMemory::Allocate(inv_freq.size() * 4, "RoPE frequencies"));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq_.get(), inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice));
    const int64_t rows = std::max(options_.max_rows, options_.max_chunk);
    KV_ASSIGN_OR_RETURN(positions_, DeviceMemory::Allocate(rows * 8, "KV positions"));
    KV_ASSIGN_OR_RETURN(lens_, DeviceMemory::Allocate(options_.max_rows * 4, "decode lengths"));
    KV_ASSIGN_OR_RETURN(workspace_, DeviceMemory::Allocate(DecodeAttentionWorkspaceBytes(options_.max_rows, g.n_heads,
                                                                                         g.head_dim),
                                                           "decode workspace"));
    KV_ASSIGN_OR_RETURN(query16_, DeviceMemory::Allocate(static_cast<int64_t>(options_.max_chunk) * g.n_heads *
                                                             g.head_dim * 2,
                                                         "chunk queries"));
    for (int64_t p = n_pages_ - 1; p >= 0; --p) free_pages_.push_back(static_cast<int32_t>(p));
    return absl::OkStatus();
  }

  const KvGeometry& geometry() const override { return geometry_; }
  std::string scheme() const override { return scheme_.name(); }

  absl::Status AddSequence(int64_t id, int64_t start_position, int64_t capacity) override {
    if (sequences_.count(id) != 0) return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " exists"));
    if (capacity < 0 || start_position < 0) return absl::InvalidArgumentError("negative capacity or start position");
    if (static_cast<int>(sequences_.size()) >= options_.max_sequences) {
      return absl::ResourceExhaustedError(absl::StrCat("the GPU KV store holds at most ", options_.max_sequences,
                                                       " sequences at once"));
    }
    const int64_t pages = std::max<int64_t>(1, CeilDiv(capacity, kPageTokens));
    if (pages > static_cast<int64_t>(free_pages_.size())) {
      return absl::ResourceExhaustedError(absl::StrCat("the GPU KV store has room for ", FreeTokens(),
                                                       " more tokens; the request needs ", capacity));
    }
    Sequence s;
    s.start = start_position;
    s.capacity = pages * kPageTokens;
    s.lengths.assign(geometry_.n_layers, 0);
    for (int64_t i = 0; i < pages; ++i) {
      s.pages.push_back(free_pages_.back());
      free_pages_.pop_back();
    }
    KV_ASSIGN_OR_RETURN(s.page_table, DeviceMemory::Allocate(pages * 4, "page table"));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(s.page_table.get(), s.pages.data(), pages * 4, cudaMemcpyHostToDevice));
    sequences_.emplace(id, std::move(s));
    return absl::OkStatus();
  }

  void RemoveSequence(int64_t id) override {
    auto it = sequences_.find(id);
    if (it == sequences_.end()) return;
    // Kernels still queued may read the pages; their next writer is queued after them on one stream.
    free_pages_.insert(free_pages_.end(), it->second.pages.rbegin(), it->second.pages.rend());
    retired_tables_.push_back(std::move(it->second.page_table));
    if (retired_tables_.size() > 64) retired_tables_.erase(retired_tables_.begin());
    sequences_.erase(it);
  }

  bool Contains(int64_t id) const override { return sequences_.count(id) != 0; }
  int64_t start_position(int64_t id) const override {
    auto it = sequences_.find(id);
    return it == sequences_.end() ? 0 : it->second.start;
  }
  int64_t length(int64_t id, int layer) const override {
    auto it = sequences_.find(id);
    return it == sequences_.end() || layer < 0 || layer >= geometry_.n_layers ? 0 : it->second.lengths[layer];
  }
  int64_t FreeTokens() const override { return static_cast<int64_t>(free_pages_.size()) * kPageTokens; }

  absl::Status Append(int layer, int64_t id, int n_tokens, const float* k, const float* v, int64_t row_stride,
                      cudaStream_t stream) override {
    KV_ASSIGN_OR_RETURN(Sequence * s, Find(id, layer));
    if (n_tokens < 0 || n_tokens > std::max(options_.max_chunk, options_.max_rows)) {
      return absl::InvalidArgumentError(absl::StrCat("an append of ", n_tokens, " tokens"));
    }
    if (s->lengths[layer] + n_tokens > s->capacity) {
      return absl::OutOfRangeError(absl::StrCat("sequence ", id, " holds ", s->lengths[layer], " of ", s->capacity,
                                                " tokens; ", n_tokens, " more do not fit"));
    }
    if (n_tokens == 0) return absl::OkStatus();
    std::vector<int64_t> positions(n_tokens);
    for (int t = 0; t < n_tokens; ++t) positions[t] = s->start + s->lengths[layer] + t;
    // Pageable source: the call returns once the bytes are staged, so the vector may go.
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(positions_.get(), positions.data(), n_tokens * 8, cudaMemcpyHostToDevice, stream));
    KvWriteArgs w;
    w.k = k;
    w.v = v;
    w.row_stride = row_stride;
    w.n_tokens = n_tokens;
    w.n_kv_heads = geometry_.n_kv_heads;
    w.head_dim = geometry_.head_dim;
    w.positions = positions_.as<int64_t>();
    w.inv_freq = inv_freq_.as<float>();
    w.cache = Layer(layer, s->page_table.as<int32_t>(), static_cast<int64_t>(s->pages.size()));
    w.request = 0;
    w.first_index = s->lengths[layer];
    KV_RETURN_IF_ERROR(WriteKvCacheCuda(w, stream));
    s->lengths[layer] += n_tokens;
    return absl::OkStatus();
  }

  absl::Status AppendRows(int layer, std::span<const int64_t> ids, const float* k, const float* v,
                          int64_t row_stride, cudaStream_t stream) override {
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0) continue;
      KV_RETURN_IF_ERROR(Append(layer, ids[i], 1, k + i * row_stride, v + i * row_stride, row_stride, stream));
    }
    return absl::OkStatus();
  }

  absl::Status AttendRows(int layer, std::span<const int64_t> ids, const float* q, int64_t q_stride, float* out,
                          float* lse, cudaStream_t stream) override {
    const int rows = static_cast<int>(ids.size());
    if (rows == 0) return absl::OkStatus();
    if (rows > options_.max_rows) {
      return absl::InvalidArgumentError(absl::StrCat(rows, " decode rows; the store takes at most ", options_.max_rows));
    }
    const int64_t q_dim = static_cast<int64_t>(geometry_.n_heads) * geometry_.head_dim;
    if (q_stride != q_dim) {
      // The decode kernel reads packed queries.
      KV_RETURN_IF_ERROR(EnsureQueries32(rows));
      CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(query32_.get(), q_dim * 4, q, q_stride * 4, q_dim * 4, rows,
                                             cudaMemcpyDeviceToDevice, stream));
      q = query32_.as<float>();
    }
    int64_t pages_per_row = 1, max_len = 0;
    std::vector<const Sequence*> seqs(rows, nullptr);
    for (int i = 0; i < rows; ++i) {
      if (ids[i] < 0) continue;
      KV_ASSIGN_OR_RETURN(Sequence * s, Find(ids[i], layer));
      seqs[i] = s;
      pages_per_row = std::max<int64_t>(pages_per_row, static_cast<int64_t>(s->pages.size()));
      max_len = std::max(max_len, s->lengths[layer]);
    }
    std::vector<int32_t> table(rows * pages_per_row, 0), lens(rows, 0);
    for (int i = 0; i < rows; ++i) {
      if (seqs[i] == nullptr) continue;
      std::copy(seqs[i]->pages.begin(), seqs[i]->pages.end(), table.begin() + i * pages_per_row);
      lens[i] = static_cast<int32_t>(seqs[i]->lengths[layer]);
    }
    if (batch_table_.bytes() < static_cast<int64_t>(table.size()) * 4) {
      KV_ASSIGN_OR_RETURN(batch_table_, DeviceMemory::Allocate(table.size() * 4 * 2, "decode page table"));
    }
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(batch_table_.get(), table.data(), table.size() * 4, cudaMemcpyHostToDevice,
                                         stream));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lens_.get(), lens.data(), rows * 4, cudaMemcpyHostToDevice, stream));
    DecodeAttentionArgs a;
    a.q = q;
    a.kv = Layer(layer, batch_table_.as<int32_t>(), pages_per_row);
    a.kv_lens = lens_.as<int32_t>();
    a.max_kv_len = max_len;
    a.batch = rows;
    a.n_heads = geometry_.n_heads;
    a.n_kv_heads = geometry_.n_kv_heads;
    a.head_dim = geometry_.head_dim;
    a.scale = geometry_.scale();
    a.out = out;
    a.lse = lse;
    a.workspace = workspace_.get();
    a.workspace_bytes = workspace_.bytes();
    return DecodeAttentionCuda(a, stream);
  }

  absl::Status AttendChunk(int layer, int64_t id, int n_queries, const float* q, int64_t q_stride,
                           int64_t first_position, float* out, float* lse, cudaStream_t stream) override {
    KV_ASSIGN_OR_RETURN(Sequence * s, Find(id, layer));
    if (n_queries <= 0 || n_queries > options_.max_chunk) {
      return absl::InvalidArgumentError(absl::StrCat(n_queries, " chunk queries; the store takes 1..",
                                                     options_.max_chunk));
    }
    const int64_t q_dim = static_cast<int64_t>(geometry_.n_heads) * geometry_.head_dim;
    KV_RETURN_IF_ERROR(
        ConvertRowsCuda(q, DType::kF32, q_stride, query16_.get(), DType::kF16, q_dim, n_queries, q_dim, stream));
    PrefillAttentionArgs a;
    a.q = query16_.get();
    a.kv = Layer(layer, s->page_table.as<int32_t>(), static_cast<int64_t>(s->pages.size()));
    a.n_queries = n_queries;
    a.n_keys = s->lengths[layer];
    a.query_first_position = first_position;
    a.key_first_position = s->start;
    a.n_heads = geometry_.n_heads;
    a.n_kv_heads = geometry_.n_kv_heads;
    a.head_dim = geometry_.head_dim;
    a.scale = geometry_.scale();
    a.out = out;
    a.lse = lse;
    return PrefillAttentionCuda(a, stream);
  }

  absl::Status SyntheticFill(int64_t, int64_t, uint64_t, cudaStream_t) override {
    return absl::UnimplementedError("synthetic fill of the GPU KV store is not available in this build");
  }

  absl::Status Seal(int64_t, cudaStream_t) override { return absl::OkStatus(); }  // nothing to quantize

  KvMemory Memory(int64_t id) const override {
    KvMemory m;
    auto it = sequences_.find(id);
    if (it == sequences_.end()) return m;
    for (int64_t n : it->second.lengths) {
      m.elements += 2 * static_cast<int64_t>(geometry_.n_kv_heads) * geometry_.head_dim * n;
    }
    m.bytes = m.elements * 2;
    return m;
  }
  KvMemory Memory() const override {
    KvMemory total;
    for (const auto& [id, s] : sequences_) {
      const KvMemory m = Memory(id);
      total.bytes += m.bytes;
      total.elements += m.elements;
    }
    return total;
  }
  int64_t pool_bytes() const override { return keys_.bytes() + values_.bytes(); }

 private:
  struct Sequence {
    int64_t start = 0;
    int64_t capacity = 0;
    std::vector<int32_t> pages;
    DeviceMemory page_table;  // int32 [pages]
    std::vector<int64_t> lengths;  // per layer
  };

  absl::StatusOr<Sequence*> Find(int64_t id, int layer) {
    if (layer < 0 || layer >= geometry_.n_layers) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
    }
    auto it = sequences_.find(id);
    if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("sequence ", id, " is not in the GPU KV store"));
    return &it->second;
  }

  PagedKv Layer(int layer, const int32_t* page_table, int64_t pages_per_request) const {
    PagedKv kv;
    kv.dtype = DType::kF16;
    kv.k = keys_.as<uint16_t>() + layer * n_pages_ * page_elements_;
    kv.v = values_.as<uint16_t>() + layer * n_pages_ * page_elements_;
    kv.page_size = kPageTokens;
    kv.page_table = page_table;
    kv.pages_per_request = pages_per_request;
    return kv;
  }

  absl::Status EnsureQueries32(int rows) {
    const int64_t bytes = static_cast<int64_t>(rows) * geometry_.n_heads * geometry_.head_dim * 4;
    if (query32_.bytes() >= bytes) return absl::OkStatus();
    KV_ASSIGN_OR_RETURN(query32_, DeviceMemory::Allocate(
                                      static_cast<int64_t>(options_.max_rows) * geometry_.n_heads * geometry_.head_dim * 4,
                                      "decode queries"));
    return absl::OkStatus();
  }

  KvGeometry geometry_;
  KvSchemeConfig scheme_;
  DeviceKvStoreOptions options_;
  int64_t page_elements_ = 0;  // per page and layer: n_kv_heads * 128 * head_dim
  int64_t n_pages_ = 0;
  DeviceMemory keys_, values_;  // [n_layers][n_pages][n_kv_heads][128][head_dim] fp16
  DeviceMemory inv_freq_, positions_, lens_, workspace_, query16_, query32_, batch_table_;
  std::vector<int32_t> free_pages_;
  std::map<int64_t, Sequence> sequences_;
  std::vector<DeviceMemory> retired_tables_;  // freed page tables that queued kernels may still read
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceKvStore>> DeviceKvStore::Create(const KvGeometry& geometry,
                                                                     const KvSchemeConfig& scheme,
                                                                     const Calibration* calibration,
                                                                     const DeviceKvStoreOptions& options) {
  if (geometry.head_dim != 64 && geometry.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("the GPU KV store supports head_dim 64 and 128, not ",
                                                   geometry.head_dim));
  }
  if (scheme.kind != KvSchemeKind::kFp16) {
    return absl::UnimplementedError(absl::StrCat("the GPU KV store holds fp16 so far, not ", scheme.name(),
                                                 "; run the workers with --device cpu for other schemes"));
  }
  auto store = std::make_unique<Fp16DeviceKvStore>(geometry, scheme, options);
  KV_RETURN_IF_ERROR(store->Init());
  return std::unique_ptr<DeviceKvStore>(std::move(store));
}

}  // namespace kvshard
