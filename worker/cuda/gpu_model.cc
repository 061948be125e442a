#include "worker/cuda/gpu_model.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/sampling.h"
#include "kernels/rope.h"

namespace kvshard {
namespace {

constexpr int64_t kCapacityAlign = 64;  // the attention kernels' page granularity
constexpr int64_t kMemoryReserve = 256ll << 20;  // left free for cuBLAS, the CUDA context's growth

std::string GiB(int64_t bytes) { return absl::StrFormat("%.2f GiB", bytes / 1073741824.0); }

absl::Status CheckFreeMemory(int64_t needed, const std::string& what) {
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (needed + kMemoryReserve > static_cast<int64_t>(free_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(what, " needs ", GiB(needed), " of GPU memory (", needed,
                                                     " bytes) plus ", GiB(kMemoryReserve), " reserve; the GPU has ",
                                                     GiB(free_bytes), " free of ", GiB(total_bytes)));
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceMemory> UploadBf16(const std::vector<const HostTensor*>& parts, const char* what) {
  int64_t n = 0;
  for (const HostTensor* t : parts) n += static_cast<int64_t>(t->data.size());
  KV_ASSIGN_OR_RETURN(DeviceMemory mem, DeviceMemory::Allocate(n * 2, what));
  std::vector<uint16_t> host(n);
  int64_t offset = 0;
  for (const HostTensor* t : parts) {
    for (float f : t->data) host[offset++] = FloatToBf16(f);
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpy(mem.get(), host.data(), n * 2, cudaMemcpyHostToDevice));
  return mem;
}

absl::StatusOr<DeviceMemory> UploadF32(const std::vector<const HostTensor*>& parts, const char* what) {
  int64_t n = 0;
  for (const HostTensor* t : parts) n += static_cast<int64_t>(t->data.size());
  KV_ASSIGN_OR_RETURN(DeviceMemory mem, DeviceMemory::Allocate(n * 4, what));
  int64_t offset = 0;
  for (const HostTensor* t : parts) {
    CUDA_RETURN_IF_ERROR(cudaMemcpy(mem.as<float>() + offset, t->data.data(), t->data.size() * 4,
                                    cudaMemcpyHostToDevice));
    offset += static_cast<int64_t>(t->data.size());
  }
  return mem;
}

absl::StatusOr<DeviceMemory> UploadInvFreq(const RopeParams& rope) {
  const std::vector<float> inv_freq = RopeInverseFrequencies(rope);
  KV_ASSIGN_OR_RETURN(DeviceMemory mem, DeviceMemory::Allocate(inv_freq.size() * 4, "RoPE frequencies"));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(mem.get(), inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice));
  return mem;
}

absl::Status ExpectShape(const HostTensor& t, int64_t rows, int64_t cols, const char* name) {
  if (static_cast<int64_t>(t.data.size()) != rows * cols) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has ", t.data.size(), " values, expected ", rows, " x ",
                                                   cols));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
absl::StatusOr<DeviceMemory> DeviceMemory::Allocate(int64_t bytes, const char* what) {
  DeviceMemory mem;
  if (bytes <= 0) return mem;
  const cudaError_t err = cudaMalloc(&mem.ptr_, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    mem.ptr_ = nullptr;
    return absl::ResourceExhaustedError(absl::StrCat("cudaMalloc of ", bytes, " bytes for ", what, " failed: ",
                                                     cudaGetErrorString(err)));
  }
  mem.bytes_ = bytes;
  return mem;
}

DeviceMemory::DeviceMemory(DeviceMemory&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceMemory& DeviceMemory::operator=(DeviceMemory&& other) noexcept {
  if (this != &other) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceMemory::~DeviceMemory() {
  if (ptr_ != nullptr) cudaFree(ptr_);
}

// ---------------------------------------------------------------------------------------------------
absl::StatusOr<std::unique_ptr<GpuKvCache>> GpuKvCache::Create(const KvGeometry& geometry, int64_t capacity) {
  if (capacity <= 0) return absl::InvalidArgumentError("GpuKvCache: capacity must be positive");
  std::unique_ptr<GpuKvCache> cache(new GpuKvCache());
  cache->geometry_ = geometry;
  cache->capacity_ = (capacity + kCapacityAlign - 1) / kCapacityAlign * kCapacityAlign;
  const int64_t per_tensor = static_cast<int64_t>(geometry.n_layers) * geometry.n_kv_heads * cache->capacity_ *
                             geometry.head_dim * 2;
  KV_RETURN_IF_ERROR(CheckFreeMemory(2 * per_tensor, absl::StrCat("an fp16 KV cache of ", cache->capacity_, " tokens")));
  KV_ASSIGN_OR_RETURN(cache->keys_, DeviceMemory::Allocate(per_tensor, "KV cache keys"));
  KV_ASSIGN_OR_RETURN(cache->values_, DeviceMemory::Allocate(per_tensor, "KV cache values"));
  KV_ASSIGN_OR_RETURN(cache->inv_freq_, UploadInvFreq(geometry.rope));
  KV_ASSIGN_OR_RETURN(cache->kv_len_, DeviceMemory::Allocate(4, "KV length"));
  KV_ASSIGN_OR_RETURN(cache->decode_workspace_,
                      DeviceMemory::Allocate(DecodeAttentionWorkspaceBytes(1, geometry.n_heads, geometry.head_dim),
                                             "decode workspace"));
  cache->lengths_.assign(geometry.n_layers, 0);
  return cache;
}

void GpuKvCache::Clear() { std::fill(lengths_.begin(), lengths_.end(), 0); }

absl::Status GpuKvCache::EnsureScratch(int n_queries) {
  if (n_queries <= scratch_rows_) return absl::OkStatus();
  const int64_t rows = static_cast<int64_t>(n_queries) * geometry_.n_heads;
  KV_ASSIGN_OR_RETURN(query16_, DeviceMemory::Allocate(rows * geometry_.head_dim * 2, "prefill queries"));
  KV_ASSIGN_OR_RETURN(lse_, DeviceMemory::Allocate(rows * 4, "attention lse"));
  scratch_rows_ = n_queries;
  return absl::OkStatus();
}

absl::Status GpuKvCache::AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride,
                                  const int64_t* positions, cudaStream_t stream) {
  if (layer < 0 || layer >= geometry_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (lengths_[layer] + n_tokens > capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat("the request needs ", lengths_[layer] + n_tokens,
                                                     " tokens of KV cache; the GPU cache holds ", capacity_));
  }
  const int64_t layer_elems = static_cast<int64_t>(geometry_.n_kv_heads) * capacity_ * geometry_.head_dim;
  KvWriteArgs w;
  w.k = k;
  w.v = v;
  w.row_stride = row_stride;
  w.n_tokens = n_tokens;
  w.n_kv_heads = geometry_.n_kv_heads;
  w.head_dim = geometry_.head_dim;
  w.positions = positions;
  w.inv_freq = inv_freq_.as<float>();
  w.cache.dtype = DType::kF16;
  w.cache.k = keys_.as<uint16_t>() + layer * layer_elems;
  w.cache.v = values_.as<uint16_t>() + layer * layer_elems;
  w.cache.page_size = capacity_;
  w.cache.pages_per_request = 1;
  w.first_index = lengths_[layer];
  KV_RETURN_IF_ERROR(WriteKvCacheCuda(w, stream));
  lengths_[layer] += n_tokens;
  return absl::OkStatus();
}

absl::Status GpuKvCache::Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t first_position,
                                float* out, cudaStream_t stream) {
  if (layer < 0 || layer >= geometry_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  const int64_t layer_elems = static_cast<int64_t>(geometry_.n_kv_heads) * capacity_ * geometry_.head_dim;
  PagedKv kv;
  kv.dtype = DType::kF16;
  kv.k = keys_.as<uint16_t>() + layer * layer_elems;
  kv.v = values_.as<uint16_t>() + layer * layer_elems;
  kv.page_size = capacity_;
  kv.pages_per_request = 1;
  const int64_t visible = std::min(lengths_[layer], first_position + n_queries);
  KV_RETURN_IF_ERROR(EnsureScratch(n_queries));
  if (n_queries == 1) {
    // One query sees every stored token up to its position: the split-KV decode kernel.
    KV_RETURN_IF_ERROR(FillInt32Cuda(kv_len_.as<int32_t>(), static_cast<int32_t>(visible), 1, stream));
    DecodeAttentionArgs a;
    a.q = q;
    a.kv = kv;
    a.kv_lens = kv_len_.as<int32_t>();
    a.max_kv_len = visible;
    a.batch = 1;
    a.n_heads = geometry_.n_heads;
    a.n_kv_heads = geometry_.n_kv_heads;
    a.head_dim = geometry_.head_dim;
    a.scale = geometry_.scale();
    a.out = out;
    a.lse = lse_.as<float>();
    a.workspace = decode_workspace_.get();
    a.workspace_bytes = decode_workspace_.bytes();
    return DecodeAttentionCuda(a, stream);
  }
  const int64_t q_dim = static_cast<int64_t>(geometry_.n_heads) * geometry_.head_dim;
  KV_RETURN_IF_ERROR(ConvertRowsCuda(q, DType::kF32, q_stride, query16_.get(), DType::kF16, q_dim, n_queries, q_dim,
                                     stream));
  PrefillAttentionArgs a;
  a.q = query16_.get();
  a.kv = kv;
  a.n_queries = n_queries;
  a.n_keys = visible;
  a.query_first_position = first_position;
  a.key_first_position = 0;
  a.n_heads = geometry_.n_heads;
  a.n_kv_heads = geometry_.n_kv_heads;
  a.head_dim = geometry_.head_dim;
  a.scale = geometry_.scale();
  a.out = out;
  a.lse = lse_.as<float>();
  return PrefillAttentionCuda(a, stream);
}

// ---------------------------------------------------------------------------------------------------
int64_t GpuModelBytes(const ModelConfig& c, const GpuModelOptions& options) {
  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  const int64_t per_layer = 2 * ((q_dim + 2 * kv_dim) * c.hidden + c.hidden * q_dim + 3LL * c.ffn_hidden * c.hidden) +
                            4 * (2LL * c.hidden + (c.qkv_bias ? q_dim + 2 * kv_dim : 0));
  const int64_t embeddings = 2LL * c.vocab_size * c.hidden * (c.tied_embeddings ? 1 : 2) + 4LL * c.hidden;
  const int64_t rows = options.max_chunk;
  const int64_t activations =
      rows * (4 + 8 + 4LL * c.hidden + 2LL * c.hidden + 4 * (q_dim + 2 * kv_dim) + 4 * q_dim + 2 * q_dim +
              4 * 2LL * c.ffn_hidden + 2LL * c.ffn_hidden) +
      4LL * c.vocab_size + 64;
  return per_layer * c.n_layers + embeddings + activations;
}

GpuModel::GpuModel(const ModelConfig& config, const GpuModelOptions& options, CublasHandle cublas, cudaStream_t stream)
    : config_(config), options_(options), cublas_(std::move(cublas)), stream_(stream) {}

GpuModel::~GpuModel() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  DropGraphs();
  if (staging_ids_ != nullptr) cudaFreeHost(staging_ids_);
  if (staging_positions_ != nullptr) cudaFreeHost(staging_positions_);
  if (draws_host_ != nullptr) cudaFreeHost(draws_host_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

KvGeometry GpuModel::kv_geometry() const { return KvGeometryOf(config_); }

absl::StatusOr<std::unique_ptr<GpuModel>> GpuModel::Create(const ModelWeights& weights,
                                                           const GpuModelOptions& options) {
  const ModelConfig& c = weights.config;
  if (options.max_chunk <= 0 || options.max_chunk > 65535) {
    return absl::InvalidArgumentError("GpuModel: max_chunk must be in 1..65535");
  }
  if (options.graph_rows < 0) return absl::InvalidArgumentError("GpuModel: graph_rows must not be negative");
  if (c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0 ||
      static_cast<int>(weights.layers.size()) != c.n_layers) {
    return absl::InvalidArgumentError("GpuModel: inconsistent model configuration");
  }
  const int64_t needed = GpuModelBytes(c, options);
  KV_RETURN_IF_ERROR(CheckFreeMemory(needed, absl::StrCat("the model (bf16 weights and activations of ",
                                                          options.max_chunk, " tokens)")));
  KV_ASSIGN_OR_RETURN(CublasHandle cublas, CublasHandle::Create());
  cudaStream_t stream = nullptr;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::unique_ptr<GpuModel> model(new GpuModel(c, options, std::move(cublas), stream));
  KV_RETURN_IF_ERROR(model->Upload(weights));
  KV_RETURN_IF_ERROR(model->AllocateActivations());
  return model;
}

absl::Status GpuModel::Upload(const ModelWeights& w) {
  const ModelConfig& c = config_;
  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  KV_RETURN_IF_ERROR(ExpectShape(w.token_embedding, c.vocab_size, c.hidden, "token_embedding"));
  layers_.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    const LayerWeights& L = w.layers[i];
    Layer& D = layers_[i];
    KV_RETURN_IF_ERROR(ExpectShape(L.wq, q_dim, c.hidden, "wq"));
    KV_RETURN_IF_ERROR(ExpectShape(L.wk, kv_dim, c.hidden, "wk"));
    KV_RETURN_IF_ERROR(ExpectShape(L.wv, kv_dim, c.hidden, "wv"));
    KV_RETURN_IF_ERROR(ExpectShape(L.wo, c.hidden, q_dim, "wo"));
    KV_RETURN_IF_ERROR(ExpectShape(L.w_gate, c.ffn_hidden, c.hidden, "w_gate"));
    KV_RETURN_IF_ERROR(ExpectShape(L.w_up, c.ffn_hidden, c.hidden, "w_up"));
    KV_RETURN_IF_ERROR(ExpectShape(L.w_down, c.hidden, c.ffn_hidden, "w_down"));
    KV_ASSIGN_OR_RETURN(D.attn_norm, UploadF32({&L.attn_norm}, "attn_norm"));
    KV_ASSIGN_OR_RETURN(D.ffn_norm, UploadF32({&L.ffn_norm}, "ffn_norm"));
    KV_ASSIGN_OR_RETURN(D.w_qkv, UploadBf16({&L.wq, &L.wk, &L.wv}, "wqkv"));
    if (c.qkv_bias) {
      KV_ASSIGN_OR_RETURN(D.b_qkv, UploadF32({&L.bq, &L.bk, &L.bv}, "bqkv"));
    }
    KV_ASSIGN_OR_RETURN(D.w_o, UploadBf16({&L.wo}, "wo"));
    KV_ASSIGN_OR_RETURN(D.w_gate_up, UploadBf16({&L.w_gate, &L.w_up}, "w_gate_up"));
    KV_ASSIGN_OR_RETURN(D.w_down, UploadBf16({&L.w_down}, "w_down"));
  }
  KV_ASSIGN_OR_RETURN(embedding_, UploadBf16({&w.token_embedding}, "token_embedding"));
  if (!c.tied_embeddings) {
    KV_RETURN_IF_ERROR(ExpectShape(w.output, c.vocab_size, c.hidden, "output"));
    KV_ASSIGN_OR_RETURN(output_, UploadBf16({&w.output}, "output"));
  }
  KV_ASSIGN_OR_RETURN(output_norm_, UploadF32({&w.output_norm}, "output_norm"));
  KV_ASSIGN_OR_RETURN(inv_freq_, UploadInvFreq(kv_geometry().rope));
  weight_bytes_ = embedding_.bytes() + output_.bytes() + output_norm_.bytes();
  for (const Layer& D : layers_) {
    weight_bytes_ += D.attn_norm.bytes() + D.ffn_norm.bytes() + D.w_qkv.bytes() + D.b_qkv.bytes() + D.w_o.bytes() +
                     D.w_gate_up.bytes() + D.w_down.bytes();
  }
  return absl::OkStatus();
}

absl::Status GpuModel::AllocateActivations() {
  const ModelConfig& c = config_;
  const int64_t rows = options_.max_chunk;
  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  KV_ASSIGN_OR_RETURN(ids_, DeviceMemory::Allocate(rows * 4, "token ids"));
  KV_ASSIGN_OR_RETURN(positions_, DeviceMemory::Allocate(rows * 8, "positions"));
  KV_ASSIGN_OR_RETURN(x_, DeviceMemory::Allocate(rows * c.hidden * 4, "residual"));
  KV_ASSIGN_OR_RETURN(h_, DeviceMemory::Allocate(rows * c.hidden * 2, "normed"));
  KV_ASSIGN_OR_RETURN(qkv_, DeviceMemory::Allocate(rows * (q_dim + 2 * kv_dim) * 4, "qkv"));
  KV_ASSIGN_OR_RETURN(attn_, DeviceMemory::Allocate(rows * q_dim * 4, "attention output"));
  KV_ASSIGN_OR_RETURN(attn16_, DeviceMemory::Allocate(rows * q_dim * 2, "attention output bf16"));
  KV_ASSIGN_OR_RETURN(gate_up_, DeviceMemory::Allocate(rows * 2 * c.ffn_hidden * 4, "gate|up"));
  KV_ASSIGN_OR_RETURN(act_, DeviceMemory::Allocate(rows * c.ffn_hidden * 2, "SwiGLU output"));
  KV_ASSIGN_OR_RETURN(logits_, DeviceMemory::Allocate(static_cast<int64_t>(c.vocab_size) * 4, "logits"));
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&staging_ids_, rows * 4));
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&staging_positions_, rows * 8));
  return absl::OkStatus();
}

absl::Status GpuModel::Enqueue(std::span<const int32_t> tokens, std::span<const int64_t> positions,
                              GpuAttentionContext& context, bool logits_of_every_row) {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("forward pass over zero tokens");
  if (static_cast<int64_t>(positions.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("forward pass over ", n, " tokens with ", positions.size(),
                                                   " positions"));
  }
  if (n > options_.max_chunk) {
    return absl::InvalidArgumentError(absl::StrCat("forward pass over ", n, " tokens; the GPU model takes at most ",
                                                   options_.max_chunk, " per call"));
  }
  for (int32_t id : tokens) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " outside the vocabulary of ", c.vocab_size));
    }
  }
  const int64_t hidden = c.hidden;
  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  const int64_t ffn = c.ffn_hidden;
  const int64_t logit_rows = logits_of_every_row ? n : 1;
  cudaStream_t s = stream_;

  if (logits_.bytes() < logit_rows * c.vocab_size * 4) {
    KV_RETURN_IF_ERROR(Synchronize());  // the old buffer may still be read by queued work
    DropGraphs();                       // they write the old one
    KV_ASSIGN_OR_RETURN(logits_, DeviceMemory::Allocate(logit_rows * c.vocab_size * 4, "logits"));
  }
  // Staged through pinned memory so the copies do not wait for the stream; the previous forward pass
  // has been waited for by then (every caller synchronizes once per pass).
  std::copy(tokens.begin(), tokens.end(), staging_ids_);
  std::copy(positions.begin(), positions.end(), staging_positions_);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.get(), staging_ids_, n * 4, cudaMemcpyHostToDevice, s));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(positions_.get(), staging_positions_, n * 8, cudaMemcpyHostToDevice, s));
  float* x = x_.as<float>();
  float* qkv = qkv_.as<float>();
  float* gate_up = gate_up_.as<float>();
  GraphSet* graphs = n <= options_.graph_rows ? &GraphsFor(n, logits_of_every_row) : nullptr;

  // Layer `layer`'s work before its KV calls. The queries' RoPE comes before the append, which reads
  // only the keys and values of qkv, so the graph segments span it.
  const auto before_kv = [&](int layer) -> absl::Status {
    const Layer& L = layers_[layer];
    KV_RETURN_IF_ERROR(RmsNormCuda(x, L.attn_norm.as<float>(), n, hidden, c.norm_eps, h_.get(), DType::kBF16, s));
    KV_RETURN_IF_ERROR(GemmBf16(cublas_, h_.get(), L.w_qkv.get(), n, qkv_dim, hidden, qkv, DType::kF32, 1.0f, 0.0f, s));
    if (c.qkv_bias) KV_RETURN_IF_ERROR(AddBiasCuda(qkv, L.b_qkv.as<float>(), n, qkv_dim, s));
    return RopeCuda(qkv, qkv_dim, positions_.as<int64_t>(), inv_freq_.as<float>(), n, c.n_heads, c.head_dim, s);
  };
  // Layer `layer`'s work after its attention: the output projection and the feed-forward block.
  const auto after_attention = [&](int layer) -> absl::Status {
    const Layer& L = layers_[layer];
    KV_RETURN_IF_ERROR(ConvertCuda(attn_.get(), DType::kF32, attn16_.get(), DType::kBF16, n * q_dim, s));
    KV_RETURN_IF_ERROR(GemmBf16(cublas_, attn16_.get(), L.w_o.get(), n, hidden, q_dim, x, DType::kF32, 1.0f, 1.0f, s));
    KV_RETURN_IF_ERROR(RmsNormCuda(x, L.ffn_norm.as<float>(), n, hidden, c.norm_eps, h_.get(), DType::kBF16, s));
    KV_RETURN_IF_ERROR(
        GemmBf16(cublas_, h_.get(), L.w_gate_up.get(), n, 2 * ffn, hidden, gate_up, DType::kF32, 1.0f, 0.0f, s));
    KV_RETURN_IF_ERROR(SwiGluCuda(gate_up, gate_up + ffn, 2 * ffn, n, ffn, act_.get(), DType::kBF16, s));
    return GemmBf16(cublas_, act_.get(), L.w_down.get(), n, hidden, ffn, x, DType::kF32, 1.0f, 1.0f, s);
  };

  KV_RETURN_IF_ERROR(RunSegment(graphs, 0, [&]() -> absl::Status {
    KV_RETURN_IF_ERROR(EmbeddingGatherCuda(embedding_.get(), DType::kBF16, c.vocab_size, hidden, ids_.as<int32_t>(),
                                           n, x, s));
    return before_kv(0);
  }));
  for (int layer = 0; layer < c.n_layers; ++layer) {
    KV_RETURN_IF_ERROR(context.AppendKv(layer, static_cast<int>(n), qkv + q_dim, qkv + q_dim + kv_dim, qkv_dim,
                                        positions_.as<int64_t>(), s));
    KV_RETURN_IF_ERROR(context.Attend(layer, static_cast<int>(n), qkv, qkv_dim, positions[0], attn_.as<float>(), s));
    KV_RETURN_IF_ERROR(RunSegment(graphs, layer + 1, [&]() -> absl::Status {
      KV_RETURN_IF_ERROR(after_attention(layer));
      if (layer + 1 < c.n_layers) return before_kv(layer + 1);
      const void* w_out = c.tied_embeddings ? embedding_.get() : output_.get();
      return FinalNormLogitsCuda(cublas_, x + (n - logit_rows) * hidden, output_norm_.as<float>(), w_out,
                                 logit_rows, hidden, c.vocab_size, c.norm_eps, h_.get(), logits_.as<float>(), s);
    }));
  }
  return absl::OkStatus();
}

GpuModel::GraphSet& GpuModel::GraphsFor(int64_t rows, bool logits_of_every_row) {
  ++graph_uses_;
  for (GraphSet& set : graph_sets_) {
    if (set.rows == rows && set.logits_of_every_row == logits_of_every_row) {
      set.last_use = graph_uses_;
      return set;
    }
  }
  if (static_cast<int>(graph_sets_.size()) >= kMaxGraphSets) {
    // A replay still queued keeps its graph alive: cudaGraphExecDestroy frees it once it has run.
    auto oldest = std::min_element(graph_sets_.begin(), graph_sets_.end(),
                                   [](const GraphSet& a, const GraphSet& b) { return a.last_use < b.last_use; });
    DestroyGraphs(*oldest);
    graph_sets_.erase(oldest);
  }
  GraphSet& set = graph_sets_.emplace_back();
  set.rows = rows;
  set.logits_of_every_row = logits_of_every_row;
  set.last_use = graph_uses_;
  set.segments.assign(config_.n_layers + 1, nullptr);
  return set;
}

void GpuModel::DestroyGraphs(const GraphSet& set) {
  for (cudaGraphExec_t exec : set.segments) {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
  }
}

void GpuModel::DropGraphs() {
  for (const GraphSet& set : graph_sets_) DestroyGraphs(set);
  graph_sets_.clear();
}

absl::Status GpuModel::RunSegment(GraphSet* set, int index, absl::FunctionRef<absl::Status()> body) {
  if (set == nullptr) return body();
  cudaGraphExec_t& exec = set->segments[index];
  if (exec == nullptr) {
    // Thread-local capture: other threads' CUDA calls (the collectives' watchdog) do not join the graph.
    CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    const absl::Status recorded = body();
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);  // always: the stream leaves capture
    if (!recorded.ok()) {
      if (graph != nullptr) cudaGraphDestroy(graph);
      return recorded;
    }
    CUDA_RETURN_IF_ERROR(ended);
    const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (made != cudaSuccess) exec = nullptr;
    CUDA_RETURN_IF_ERROR(made);
  }
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec, stream_));
  return absl::OkStatus();
}

absl::Status GpuModel::Synchronize() {
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::StatusOr<int32_t> GpuModel::Forward(std::span<const int32_t> tokens, int64_t first_position,
                                          GpuAttentionContext& context, const TokenSampling* sampling,
                                          std::vector<float>* logits, std::span<const int32_t> recent) {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<int64_t> positions(n);
  for (int64_t i = 0; i < n; ++i) positions[i] = first_position + i;
  KV_RETURN_IF_ERROR(Enqueue(tokens, positions, context, /*logits_of_every_row=*/false));
  cudaStream_t s = stream_;
  if (logits != nullptr) {  // queued before the penalty changes them
    logits->resize(c.vocab_size);
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(logits->data(), logits_.get(), static_cast<int64_t>(c.vocab_size) * 4, cudaMemcpyDeviceToHost, s));
  }
  if (sampling != nullptr) {
    const LogitsDraw draw{*sampling, recent};
    KV_RETURN_IF_ERROR(EnqueueDraws({&draw, 1}));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return sampling != nullptr ? drawn_[0] : -1;
}

absl::Status GpuModel::EnqueueDraws(std::span<const LogitsDraw> draws) {
  const int n = static_cast<int>(draws.size());
  if (n == 0) return absl::OkStatus();
  int window = 1;
  for (const LogitsDraw& d : draws) window = std::max(window, static_cast<int>(d.recent.size()));
  // Layout: TokenSampling [n], int32 penalty counts [n], penalty ids [n][window], then the tokens [n].
  const int64_t params_bytes = static_cast<int64_t>(n) * sizeof(TokenSampling);
  const int64_t upload = params_bytes + 4 * static_cast<int64_t>(n) * (window + 1);
  const int64_t bytes = upload + 4 * static_cast<int64_t>(n);
  if (bytes > draws_capacity_) {
    KV_RETURN_IF_ERROR(Synchronize());  // queued draws may still use the old buffers
    if (draws_host_ != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(draws_host_));
    draws_host_ = nullptr;
    draws_capacity_ = 0;
    draws_device_ = DeviceMemory();
    KV_ASSIGN_OR_RETURN(draws_device_, DeviceMemory::Allocate(bytes, "token draws"));
    void* host = nullptr;
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&host, bytes));
    draws_host_ = static_cast<char*>(host);
    draws_capacity_ = bytes;
  }
  auto* params = reinterpret_cast<TokenSampling*>(draws_host_);
  auto* counts = reinterpret_cast<int32_t*>(draws_host_ + params_bytes);
  int32_t* recent = counts + n;
  for (int i = 0; i < n; ++i) {
    params[i] = draws[i].sampling;
    counts[i] = static_cast<int32_t>(draws[i].recent.size());
    std::copy(draws[i].recent.begin(), draws[i].recent.end(), recent + static_cast<int64_t>(i) * window);
  }
  drawn_ = reinterpret_cast<int32_t*>(draws_host_ + upload);
  cudaStream_t s = stream_;
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(draws_device_.get(), draws_host_, upload, cudaMemcpyHostToDevice, s));
  const auto* d_params = draws_device_.as<TokenSampling>();
  const auto* d_counts = reinterpret_cast<const int32_t*>(draws_device_.as<char>() + params_bytes);
  const int32_t* d_recent = d_counts + n;
  auto* d_tokens = reinterpret_cast<int32_t*>(draws_device_.as<char>() + upload);
  const int vocab = config_.vocab_size;
  KV_RETURN_IF_ERROR(
      ApplyRepetitionPenaltyCuda(logits_.as<float>(), vocab, vocab, n, d_recent, window, d_counts, d_params, s));
  KV_RETURN_IF_ERROR(SampleTokensCuda(logits_.as<float>(), vocab, vocab, n, d_params, d_tokens, s));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(drawn_, d_tokens, 4 * static_cast<int64_t>(n), cudaMemcpyDeviceToHost, s));
  return absl::OkStatus();
}

}  // namespace kvshard
