// The Llama-family forward pass on the CPU backend.
//
// The model does not know where the KV cache lives: each layer hands its new keys/values to an
// AttentionContext and asks it for the attention output of its queries. Single-process mode uses one
// KvShard (ShardAttentionContext); the distributed runtime merges partials from several workers.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kvstore/kv_shard.h"
#include "worker/model.h"

namespace kvshard {

class AttentionContext {
 public:
  virtual ~AttentionContext() = default;
  // New tokens' keys (pre-RoPE) and values, [n][n_kv_heads][head_dim], at the positions given to Forward.
  virtual absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v) = 0;
  // Attention output for n query rows, q [n][n_heads][head_dim] after RoPE, unscaled; each row sees
  // positions <= positions[i]. out is [n][n_heads][head_dim], softmax-normalized over all the context.
  virtual absl::Status Attend(int layer, int n_queries, const float* q, const int64_t* positions,
                              float* out) = 0;
};

// All KV in one shard: append, then attend (the shard's output is already normalized).
class ShardAttentionContext final : public AttentionContext {
 public:
  explicit ShardAttentionContext(KvShard& shard) : shard_(shard) {}
  absl::Status AppendKv(int layer, int n_tokens, const float* k, const float* v) override;
  absl::Status Attend(int layer, int n_queries, const float* q, const int64_t* positions, float* out) override;

 private:
  KvShard& shard_;
  std::vector<float> lse_;
};

// Observes each layer's inputs to the KV cache (for calibration): keys pre-RoPE and values,
// [n][n_kv_heads][head_dim].
using KvObserver = std::function<void(int layer, int n_tokens, const float* k, const float* v)>;

class CpuModel {
 public:
  explicit CpuModel(const ModelWeights& weights);

  const ModelConfig& config() const { return weights_.config; }
  KvGeometry kv_geometry() const;

  // Runs `tokens` at positions first_position.. through every layer. Earlier positions must already be
  // in `context`. Writes logits: for every token ([n][vocab]) when all_logits, else for the last
  // token only ([vocab]). Large inputs should be fed in chunks (see max_chunk()).
  absl::Status Forward(std::span<const int32_t> tokens, int64_t first_position, AttentionContext& context,
                       bool all_logits, std::vector<float>& logits);
  // The same with an explicit position per token (positions.size() == tokens.size()). Rows need not be
  // consecutive nor of one sequence: batched decode runs one row per request, and `context` knows which
  // request each row belongs to.
  absl::Status Forward(std::span<const int32_t> tokens, std::span<const int64_t> positions,
                       AttentionContext& context, bool all_logits, std::vector<float>& logits);

  void set_kv_observer(KvObserver observer) { kv_observer_ = std::move(observer); }
  static constexpr int max_chunk() { return 512; }

 private:
  const ModelWeights& weights_;
  std::vector<float> inv_freq_;
  KvObserver kv_observer_;
};

}  // namespace kvshard
