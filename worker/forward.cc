#include "worker/forward.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/dense_cpu.h"
#include "kernels/gemm_cpu.h"

namespace kvshard {

absl::Status ShardAttentionContext::AppendKv(int layer, int n_tokens, const float* k, const float* v) {
  return shard_.Append(layer, n_tokens, k, v);
}

absl::Status ShardAttentionContext::Attend(int layer, int n_queries, const float* q, const int64_t* positions,
                                           float* out) {
  lse_.resize(static_cast<size_t>(n_queries) * shard_.geometry().n_heads);
  return shard_.Attend(layer, n_queries, q, positions, out, lse_.data());
}

CpuModel::CpuModel(const ModelWeights& weights)
    : weights_(weights),
      inv_freq_(RopeInverseFrequencies(
          RopeParams{weights.config.head_dim, weights.config.rope_theta, weights.config.rope_scaling})) {}

KvGeometry CpuModel::kv_geometry() const { return KvGeometryOf(weights_.config); }

namespace {

void AddBias(float* y, const HostTensor& bias, int64_t rows, int64_t cols) {
  if (bias.empty()) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * cols + c] += bias.data[c];
}

}  // namespace

absl::Status CpuModel::Forward(std::span<const int32_t> tokens, int64_t first_position, AttentionContext& context,
                               bool all_logits, std::vector<float>& logits) {
  std::vector<int64_t> positions(tokens.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = first_position + static_cast<int64_t>(i);
  return Forward(tokens, positions, context, all_logits, logits);
}

absl::Status CpuModel::Forward(std::span<const int32_t> tokens, std::span<const int64_t> token_positions,
                               AttentionContext& context, bool all_logits, std::vector<float>& logits) {
  const ModelConfig& c = weights_.config;
  if (token_positions.size() != tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("forward pass over ", tokens.size(), " tokens with ",
                                                   token_positions.size(), " positions"));
  }
  const int64_t n_total = static_cast<int64_t>(tokens.size());
  if (n_total == 0) return absl::InvalidArgumentError("forward pass over zero tokens");
  for (int32_t id : tokens) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " outside the vocabulary of ", c.vocab_size));
    }
  }
  const int64_t hidden = c.hidden;
  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  const int64_t ffn = c.ffn_hidden;
  const HostTensor& out_matrix = weights_.output_matrix();

  logits.assign((all_logits ? n_total : 1) * static_cast<int64_t>(c.vocab_size), 0.0f);

  const int64_t chunk = max_chunk();
  std::vector<float> x(chunk * hidden), h(chunk * hidden), q(chunk * q_dim), k(chunk * kv_dim),
      v(chunk * kv_dim), attn(chunk * q_dim), gate(chunk * ffn), up(chunk * ffn), proj(chunk * hidden);
  std::vector<int64_t> positions(chunk);

  for (int64_t c0 = 0; c0 < n_total; c0 += chunk) {
    const int64_t n = std::min(chunk, n_total - c0);
    for (int64_t i = 0; i < n; ++i) positions[i] = token_positions[c0 + i];
    EmbeddingGatherCpu(weights_.token_embedding.data.data(), tokens.data() + c0, n, hidden, x.data());

    for (int layer = 0; layer < c.n_layers; ++layer) {
      const LayerWeights& L = weights_.layers[layer];
      RmsNormCpu(x.data(), L.attn_norm.data.data(), n, hidden, c.norm_eps, h.data());
      LinearCpu(h.data(), L.wq.data.data(), n, hidden, q_dim, q.data());
      LinearCpu(h.data(), L.wk.data.data(), n, hidden, kv_dim, k.data());
      LinearCpu(h.data(), L.wv.data.data(), n, hidden, kv_dim, v.data());
      AddBias(q.data(), L.bq, n, q_dim);
      AddBias(k.data(), L.bk, n, kv_dim);
      AddBias(v.data(), L.bv, n, kv_dim);
      if (kv_observer_) kv_observer_(layer, static_cast<int>(n), k.data(), v.data());
      KV_RETURN_IF_ERROR(context.AppendKv(layer, static_cast<int>(n), k.data(), v.data()));
      for (int64_t i = 0; i < n; ++i) ApplyRopeCpu(q.data() + i * q_dim, c.n_heads, c.head_dim, positions[i], inv_freq_);
      KV_RETURN_IF_ERROR(context.Attend(layer, static_cast<int>(n), q.data(), positions.data(), attn.data()));
      LinearCpu(attn.data(), L.wo.data.data(), n, q_dim, hidden, proj.data());
      for (int64_t i = 0; i < n * hidden; ++i) x[i] += proj[i];

      RmsNormCpu(x.data(), L.ffn_norm.data.data(), n, hidden, c.norm_eps, h.data());
      LinearCpu(h.data(), L.w_gate.data.data(), n, hidden, ffn, gate.data());
      LinearCpu(h.data(), L.w_up.data.data(), n, hidden, ffn, up.data());
      SwiGluCpu(gate.data(), up.data(), n * ffn, gate.data());
      LinearCpu(gate.data(), L.w_down.data.data(), n, ffn, hidden, proj.data());
      for (int64_t i = 0; i < n * hidden; ++i) x[i] += proj[i];
    }

    if (all_logits) {
      RmsNormCpu(x.data(), weights_.output_norm.data.data(), n, hidden, c.norm_eps, h.data());
      LinearCpu(h.data(), out_matrix.data.data(), n, hidden, c.vocab_size, logits.data() + c0 * c.vocab_size);
    } else if (c0 + n == n_total) {
      RmsNormCpu(x.data() + (n - 1) * hidden, weights_.output_norm.data.data(), 1, hidden, c.norm_eps, h.data());
      LinearCpu(h.data(), out_matrix.data.data(), 1, hidden, c.vocab_size, logits.data());
    }
  }
  return absl::OkStatus();
}

}  // namespace kvshard
