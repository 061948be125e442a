// Llama-family model geometry and weights, as every backend sees them.
//
// Conventions (both loaders produce these, whatever the file format):
// - Linear weights are row-major [out_features, in_features], as Hugging Face stores them.
// - Q and K projections are in Hugging Face order: RoPE rotates channel pairs (i, i + head_dim/2)
//   ("rotate_half" / NeoX style). GGUF files of the llama architecture store Q/K rows permuted for
//   adjacent-pair RoPE; the GGUF loader undoes that permutation.
// - Everything is fp32 after load; quantized files are dequantized.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor.h"
#include "kernels/rope.h"
#include "kvstore/kv_shard.h"

namespace kvshard {

// Prompt tokens a GPU backend takes in one forward pass (GpuModelOptions::max_chunk, --gpu_prefill_chunk).
// Long prompts go in chunks of this size, and a chunk's attention reads the whole earlier context once
// (kvq schemes dequantize it), so that cost falls with the chunk; 4,096 rows also keep the GEMMs near
// their peak. The CPU backend's chunk is fixed (CpuModel::max_chunk()).
inline constexpr int kDefaultGpuPrefillChunk = 4096;

struct ModelConfig {
  std::string architecture;  // "llama" (Llama 2/3, Mistral, SmolLM2) or "qwen2"
  std::string name;          // general.name or the directory name; used to match calibration files
  int n_layers = 0;
  int hidden = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int ffn_hidden = 0;
  int vocab_size = 0;
  int64_t max_context = 0;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  float norm_eps = 1e-5f;
  bool tied_embeddings = false;
  bool qkv_bias = false;

  int group_size() const { return n_heads / n_kv_heads; }  // query heads per KV head
};

// The shape of the model's KV cache.
inline KvGeometry KvGeometryOf(const ModelConfig& c) {
  KvGeometry g;
  g.n_layers = c.n_layers;
  g.n_heads = c.n_heads;
  g.n_kv_heads = c.n_kv_heads;
  g.head_dim = c.head_dim;
  g.rope = RopeParams{c.head_dim, c.rope_theta, c.rope_scaling};
  return g;
}

struct LayerWeights {
  HostTensor attn_norm;         // [hidden]
  HostTensor wq, wk, wv, wo;    // [n_heads*head_dim, hidden], [n_kv*hd, hidden] x2, [hidden, n_heads*hd]
  HostTensor bq, bk, bv;        // optional biases, empty unless config.qkv_bias
  HostTensor ffn_norm;          // [hidden]
  HostTensor w_gate, w_up;      // [ffn_hidden, hidden]
  HostTensor w_down;            // [hidden, ffn_hidden]
};

struct ModelWeights {
  ModelConfig config;
  HostTensor token_embedding;   // [vocab, hidden]
  std::vector<LayerWeights> layers;
  HostTensor output_norm;       // [hidden]
  HostTensor output;            // [vocab, hidden]; empty when config.tied_embeddings

  const HostTensor& output_matrix() const { return config.tied_embeddings ? token_embedding : output; }
};

}  // namespace kvshard
