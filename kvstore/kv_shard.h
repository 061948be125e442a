// The KV store of one worker: the keys and values of a contiguous token range, for every layer, and the
// attention partials of queries over that range.
//
// Partials (DESIGN.md, "Attention partials"): for each query row and query head,
//   out = sum_t softmax(scale * q.k_t) v_t over this shard's visible tokens (fp32, head_dim values)
//   lse = log sum_t exp(scale * q.k_t)     natural log (base e), fp32
// A query that sees no token of the shard gets out = 0 and lse = -inf, and merges as a no-op.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/rope.h"

namespace kvshard {

// The CPU shards' Attend works in items of (KV head, block of this many queries): a 512-query prefill
// chunk gives 4 per KV head, so the demo's 3 KV heads keep 2 or 4 threads busy (one item per head left
// one of two threads idle a third of the time). Fixed, so results do not depend on the thread count.
inline constexpr int kAttendQueriesPerItem = 128;

struct KvGeometry {
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // KV heads; n_heads % n_kv_heads == 0 (GQA groups)
  int head_dim = 0;
  RopeParams rope;     // stores that keep pre-RoPE keys rotate at attention time
  float scale() const;  // 1/sqrt(head_dim)
};

// The CPU shards' Attend gathers the query rows of one KV head's group into a dense block for its GEMMs:
// with q and out laid out [query][n_heads][head_dim], (query i, head h * group + g) is row
// (i - q0) * group + g of the block for queries [q0, q1).
inline void GatherGroupRows(const KvGeometry& geometry, const float* q, int h, int q0, int q1, float* rows) {
  const int group = geometry.n_heads / geometry.n_kv_heads, d = geometry.head_dim;
  for (int i = q0; i < q1; ++i) {
    const float* src = q + (static_cast<int64_t>(i) * geometry.n_heads + h * group) * d;
    std::copy(src, src + group * d, rows + static_cast<int64_t>(i - q0) * group * d);
  }
}
// The block's outputs and log-sum-exps back to out [query][n_heads][head_dim] and lse [query][n_heads].
inline void ScatterGroupRows(const KvGeometry& geometry, const float* out_rows, const float* lse_rows, int h, int q0,
                             int q1, float* out, float* lse) {
  const int group = geometry.n_heads / geometry.n_kv_heads, d = geometry.head_dim;
  for (int i = q0; i < q1; ++i) {
    float* dst = out + (static_cast<int64_t>(i) * geometry.n_heads + h * group) * d;
    const int64_t r = static_cast<int64_t>(i - q0) * group;
    std::copy(out_rows + r * d, out_rows + (r + group) * d, dst);
    for (int g = 0; g < group; ++g) lse[static_cast<int64_t>(i) * geometry.n_heads + h * group + g] = lse_rows[r + g];
  }
}

struct KvMemory {
  int64_t bytes = 0;     // everything the store holds for its tokens: codes, scales, zero points,
                         // outliers with their indices, sink, residual, page slack excluded
  int64_t elements = 0;  // K and V elements represented: 2 * layers * kv_heads * head_dim * tokens
  double bits_per_element() const { return elements ? 8.0 * bytes / elements : 0.0; }
};

class KvShard {
 public:
  virtual ~KvShard() = default;

  virtual const KvGeometry& geometry() const = 0;
  virtual std::string scheme() const = 0;
  // Absolute position of the first token this shard holds.
  virtual int64_t start_position() const = 0;
  // Tokens appended so far to `layer`.
  virtual int64_t length(int layer) const = 0;

  // Appends `n_tokens` tokens to `layer`, at positions start_position() + length(layer) onwards.
  // k and v are [n_tokens][n_kv_heads][head_dim] fp32; k is pre-RoPE.
  virtual absl::Status Append(int layer, int n_tokens, const float* k, const float* v) = 0;

  // Attention partials for `n_queries` query rows of one layer. q is [n_queries][n_heads][head_dim],
  // RoPE already applied at its position, not scaled (the store multiplies scores by
  // geometry().scale()). Query i sees the stored tokens at positions <= q_positions[i].
  // out is [n_queries][n_heads][head_dim], lse is [n_queries][n_heads].
  virtual absl::Status Attend(int layer, int n_queries, const float* q, const int64_t* q_positions,
                              float* out, float* lse) const = 0;

  virtual KvMemory Memory() const = 0;

  // Drops every token (the shard keeps its start position), so a finished request's memory is reused.
  virtual void Clear() = 0;

  // The shard will get no more tokens: another shard now holds the sequence's tail. Quantized stores
  // then quantize their fp16 residual window, so the sequence split over shards is stored as one store
  // would store it. Full-precision stores have nothing to do.
  virtual void Seal() {}
};

// The unquantized cache: keys after RoPE and values, held as fp32 or fp16 (round to nearest even).
enum class FullPrecision { kFp32, kFp16 };
std::unique_ptr<KvShard> MakeFullPrecisionKvShard(const KvGeometry& geometry, int64_t start_position,
                                                  FullPrecision precision);

}  // namespace kvshard
