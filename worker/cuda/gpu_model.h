// The Llama-family forward pass on one GPU (the CUDA backend of worker/forward.h's CpuModel).
//
// - Weights live on the device in bf16: Q|K|V and gate|up are fused into one GEMM each; norms and biases
//   stay fp32. The residual stream is fp32; every GEMM rounds its input activations to bf16 and
//   accumulates in fp32 (cuBLAS); output projections add straight into the residual.
// - As on the CPU, the model does not know where the KV cache lives: each layer hands its new keys
//   (pre-RoPE) and values to a GpuAttentionContext and asks it for the attention output of its queries.
//   GpuKvCache is the single-request fp16 context; a distributed one merges partials across GPUs.
// - Sampling runs on the device (kernels/cuda/sampling.h): only the token id comes back to the host.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/dense.h"
#include "kernels/sampling.h"
#include "kvstore/kv_shard.h"
#include "worker/model.h"

namespace kvshard {

// Device memory owned by one object; freed on destruction.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  static absl::StatusOr<DeviceMemory> Allocate(int64_t bytes, const char* what);
  DeviceMemory(DeviceMemory&& other) noexcept;
  DeviceMemory& operator=(DeviceMemory&& other) noexcept;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory();

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

class GpuAttentionContext {
 public:
  virtual ~GpuAttentionContext() = default;
  // New tokens' keys (pre-RoPE) and values, device fp32: token t's KV head h at k + t * row_stride +
  // h * head_dim (same for v). positions: device int64 [n_tokens], the tokens' absolute positions.
  virtual absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride,
                                const int64_t* positions, cudaStream_t stream) = 0;
  // Attention output for n query rows: q device fp32, RoPE applied, unscaled, row i at q + i * q_stride
  // ([n_heads][head_dim]), at position first_position + i, seeing positions <= its own. out: device
  // fp32 [n][n_heads][head_dim], softmax-normalized over all the context.
  virtual absl::Status Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t first_position,
                              float* out, cudaStream_t stream) = 0;
};

// One request's fp16 KV cache on the device, for every layer: keys after RoPE and values, positions
// 0 .. capacity-1, read by the split-KV decode kernel (one query) or the causal prefill kernel (a chunk).
class GpuKvCache final : public GpuAttentionContext {
 public:
  // Refuses (ResourceExhausted, with the bytes needed and free) a capacity the GPU cannot hold.
  static absl::StatusOr<std::unique_ptr<GpuKvCache>> Create(const KvGeometry& geometry, int64_t capacity);

  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v, int64_t row_stride,
                        const int64_t* positions, cudaStream_t stream) override;
  absl::Status Attend(int layer, int n_queries, const float* q, int64_t q_stride, int64_t first_position, float* out,
                      cudaStream_t stream) override;

  int64_t capacity() const { return capacity_; }
  int64_t length(int layer) const { return lengths_[layer]; }
  void Clear();

 private:
  GpuKvCache() = default;
  absl::Status EnsureScratch(int n_queries);

  KvGeometry geometry_;
  int64_t capacity_ = 0;  // tokens; a multiple of 64
  DeviceMemory keys_, values_;  // [n_layers][n_kv_heads][capacity][head_dim] fp16
  DeviceMemory inv_freq_;
  DeviceMemory kv_len_;        // int32 [1] for the decode kernel
  DeviceMemory decode_workspace_;
  DeviceMemory query16_, lse_;  // prefill scratch: fp16 queries, lse
  int scratch_rows_ = 0;
  std::vector<int64_t> lengths_;
};

// One row's draw from GpuModel::logits() (kernels/sampling.h): its settings and the ids its repetition
// penalty covers.
struct LogitsDraw {
  TokenSampling sampling;
  std::span<const int32_t> recent;
};

struct GpuModelOptions {
  int max_chunk = kDefaultGpuPrefillChunk;  // most tokens per Forward call; longer prompts are fed in chunks
  // Forward passes of at most this many rows (decode steps, short chunks) replay the dense work between
  // two KV calls (norms, GEMMs, RoPE of the queries, SwiGLU, the logits) from CUDA graphs: one graph per
  // layer boundary and row count, captured on the count's first pass. The KV calls stay stream launches,
  // as their sizes change every step. 0: no graphs.
  int graph_rows = 64;
};

class GpuModel {
 public:
  // Uploads the weights (bf16). Refuses (ResourceExhausted) a model too large for the GPU's free memory,
  // naming the bytes needed and available.
  static absl::StatusOr<std::unique_ptr<GpuModel>> Create(const ModelWeights& weights, const GpuModelOptions& options);
  ~GpuModel();

  const ModelConfig& config() const { return config_; }
  KvGeometry kv_geometry() const;
  int max_chunk() const { return options_.max_chunk; }
  int64_t weight_bytes() const { return weight_bytes_; }
  cudaStream_t stream() const { return stream_; }

  // Runs `tokens` (at most max_chunk()) at positions first_position.. through every layer; earlier
  // positions must already be in `context`. Then, for the last token: when `logits` is not null, copies
  // its logits to the host ([vocab], before any penalty); when `sampling` is not null, applies its
  // repetition penalty to the ids in `recent` and draws the next token on the device, and returns it
  // (otherwise returns -1).
  absl::StatusOr<int32_t> Forward(std::span<const int32_t> tokens, int64_t first_position,
                                  GpuAttentionContext& context, const TokenSampling* sampling,
                                  std::vector<float>* logits, std::span<const int32_t> recent = {});

  // Enqueues the forward pass of `tokens` (at most max_chunk()) at `positions` (host, one per token) on
  // stream() and returns without waiting. Rows need not be consecutive nor of one request (batched
  // decode): the context knows which request each row belongs to, and Attend's first_position is
  // positions[0]. Then the logits of the last row, or of every row when logits_of_every_row, are
  // computed into logits() ([rows][vocab] fp32, before any penalty). Call Synchronize (or wait for the
  // stream another way) before the next Enqueue.
  absl::Status Enqueue(std::span<const int32_t> tokens, std::span<const int64_t> positions,
                       GpuAttentionContext& context, bool logits_of_every_row);
  const float* logits() const { return logits_.as<float>(); }
  // Enqueues on stream() a draw for each of the first draws.size() rows of logits(): the repetition penalty
  // (which changes those logits in place), then the draw. The settings and penalty ids go up in one pinned
  // buffer and only the token ids come back, into drawn() ([rows]; read it once the stream has finished).
  absl::Status EnqueueDraws(std::span<const LogitsDraw> draws);
  const int32_t* drawn() const { return drawn_; }
  absl::Status Synchronize();
  // Row counts whose graphs are held now (at most kMaxGraphSets; for tests).
  int graph_sets() const { return static_cast<int>(graph_sets_.size()); }

 private:
  // The graphs of one row count: segment 0 is the embedding and layer 0's work before its KV calls,
  // segment l + 1 the work after layer l's attention up to layer l + 1's KV calls (or the logits).
  struct GraphSet {
    int64_t rows = 0;
    bool logits_of_every_row = false;
    int64_t last_use = 0;
    std::vector<cudaGraphExec_t> segments;
  };
  static constexpr int kMaxGraphSets = 16;  // row counts held at once; the least recently used goes
  struct Layer {
    DeviceMemory attn_norm, ffn_norm;  // fp32 [hidden]
    DeviceMemory w_qkv;                // bf16 [q_dim + 2 kv_dim][hidden]
    DeviceMemory b_qkv;                // fp32 [q_dim + 2 kv_dim], or empty
    DeviceMemory w_o;                  // bf16 [hidden][q_dim]
    DeviceMemory w_gate_up;            // bf16 [2 ffn][hidden]
    DeviceMemory w_down;               // bf16 [hidden][ffn]
  };

  GpuModel(const ModelConfig& config, const GpuModelOptions& options, CublasHandle cublas, cudaStream_t stream);
  absl::Status Upload(const ModelWeights& weights);
  absl::Status AllocateActivations();
  // The graph set of (rows, logits_of_every_row), made empty on first use.
  GraphSet& GraphsFor(int64_t rows, bool logits_of_every_row);
  static void DestroyGraphs(const GraphSet& set);
  void DropGraphs();
  // Enqueues `body` on stream(), or replays it from set->segments[index] (capturing it the first time).
  absl::Status RunSegment(GraphSet* set, int index, absl::FunctionRef<absl::Status()> body);

  ModelConfig config_;
  GpuModelOptions options_;
  CublasHandle cublas_;
  cudaStream_t stream_ = nullptr;
  int64_t weight_bytes_ = 0;

  std::vector<Layer> layers_;
  DeviceMemory embedding_;     // bf16 [vocab][hidden]
  DeviceMemory output_;        // bf16 [vocab][hidden], empty when tied
  DeviceMemory output_norm_;   // fp32 [hidden]
  DeviceMemory inv_freq_;      // fp32 [head_dim / 2]

  // Activations for max_chunk rows.
  DeviceMemory ids_, positions_, x_, h_, qkv_, attn_, attn16_, gate_up_, act_, logits_;
  // The draws' settings, penalty counts and ids, and tokens (EnqueueDraws), on the device and pinned on the
  // host, grown on demand.
  DeviceMemory draws_device_;
  char* draws_host_ = nullptr;
  int64_t draws_capacity_ = 0;
  int32_t* drawn_ = nullptr;
  int32_t* staging_ids_ = nullptr;        // pinned host [max_chunk]
  int64_t* staging_positions_ = nullptr;  // pinned host [max_chunk]
  std::vector<GraphSet> graph_sets_;
  int64_t graph_uses_ = 0;
};

// Bytes of device memory a model of this configuration needs for its weights (bf16) and activations.
int64_t GpuModelBytes(const ModelConfig& config, const GpuModelOptions& options);

}  // namespace kvshard
