// The quantized KV store (CPU reference): every scheme of kv_scheme.h behind the KvShard interface.
//
// Per (layer, KV head) a stream holds the shard's tokens in three ranges (kv_scheme.h): an fp16 sink
// (after RoPE), quantized pages (kv_codecs.h gives the code layout), and an fp16 residual window. Inputs
// are rounded to fp16 first, so a token's codes do not depend on how appends were chunked.
//
// Attention: per KV head, the visible tokens are dequantized to fp32 (keys: codes, then the exact
// outliers, then RoPE at each token's position for pre-RoPE schemes; values: codes and outliers) and
// handed to kernels/attention.h's AttentionPartialsCpu with all query heads of the head's group as rows
// (GQA natively: one pass over a KV head serves its group). A query at position p sees the store as
// decode at p would: the residual window of p's time is fp16, older tokens quantized. Without
// exact_decode_view a query sees tokens quantized once the store has quantized them (prefill chunks);
// with it, the store keeps fp16 copies so chunked queries see exactly the decode view.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_codecs.h"
#include "kvstore/kv_scheme.h"
#include "kvstore/kv_shard.h"

namespace kvshard {

class QuantizedKvShard final : public KvShard {
 public:
  // Checks the configuration against the geometry and, for kvq/wkv, the calibration (which must match
  // the geometry and hold the configured outlier fraction and bit width). fp16 is not handled here
  // (MakeKvShard returns the foundation cache for it).
  static absl::StatusOr<std::unique_ptr<QuantizedKvShard>> Create(const KvSchemeConfig& config,
                                                                  const KvGeometry& geometry,
                                                                  int64_t start_position,
                                                                  const Calibration* calibration);

  const KvGeometry& geometry() const override { return geometry_; }
  std::string scheme() const override { return config_.name(); }
  int64_t start_position() const override { return start_position_; }
  int64_t length(int layer) const override { return layers_[layer].length; }
  absl::Status Append(int layer, int n_tokens, const float* k, const float* v) override;
  absl::Status Attend(int layer, int n_queries, const float* q, const int64_t* q_positions, float* out,
                      float* lse) const override;
  KvMemory Memory() const override;
  void Clear() override;
  void Seal() override;

  const KvSchemeConfig& config() const { return config_; }
  bool sealed() const { return sealed_; }
  KvStreamLayout layout(int layer) const;
  // K after RoPE and V of local tokens [first, first + n) of one (layer, KV head), fp32 [n][head_dim],
  // as the store holds them now (sink and residual fp16, the rest dequantized).
  void Dequantize(int layer, int kv_head, int64_t first, int64_t n, float* k, float* v) const;
  // kvq key outliers held by one (layer, KV head) (0 for other schemes).
  int64_t KeyOutliers(int layer, int kv_head) const;
  const PagedCodes& key_codes(int layer, int kv_head) const;
  const PagedCodes& value_codes(int layer, int kv_head) const;

 private:
  struct Stream {
    std::unique_ptr<PartCodec> key, value;
    std::vector<uint16_t> sink_k, sink_v;  // [sink][head_dim], keys after RoPE
    // fp16 tokens from local index fp_begin on: the residual (and, with exact_decode_view, every token
    // after the sink). Keys pre-RoPE for pre-RoPE schemes, after RoPE otherwise.
    std::vector<uint16_t> fp_k, fp_v;
    int64_t fp_begin = 0;
  };
  struct Layer {
    int64_t length = 0;
    std::vector<Stream> streams;
  };

  QuantizedKvShard(const KvSchemeConfig& config, const KvGeometry& geometry, int64_t start_position);
  void Flush(Layer& layer);
  void EnsureRopeTable(int64_t n_tokens);
  void Rotate(float* x, int64_t local_token) const;
  // Fills k/v [end - begin][head_dim] with local tokens [begin, end) of a stream: the sink fp16,
  // [sink, fp_from) dequantized, [fp_from, end) from the fp16 copy.
  void Materialize(const Stream& s, int64_t sink, int64_t begin, int64_t end, int64_t fp_from, float* k,
                   float* v) const;

  KvSchemeConfig config_;
  KvGeometry geometry_;
  int64_t start_position_;
  bool sealed_ = false;
  std::vector<float> inv_freq_;
  std::vector<float> rope_cos_, rope_sin_;  // [local token][head_dim / 2], the angles ApplyRopeCpu uses
  std::vector<Layer> layers_;
};

// The store for a scheme: fp16 gives the foundation cache (MakeFullPrecisionKvShard(kFp16)), bit for bit;
// every other scheme a QuantizedKvShard. kvq and wkv need `calibration`; others ignore it.
absl::StatusOr<std::unique_ptr<KvShard>> MakeKvShard(const KvSchemeConfig& config, const KvGeometry& geometry,
                                                     int64_t start_position, const Calibration* calibration);

}  // namespace kvshard
