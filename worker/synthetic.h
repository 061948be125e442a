// Synthetic models and synthetic KV fill, for speed, memory and capacity runs at scales where real
// weights or a real causal prefill are out of reach. Their outputs mean nothing; their shapes, bytes and
// costs are real.
//
// - A synthetic model has the geometry given in config (layers, hidden, heads, KV heads, head_dim, FFN,
//   vocabulary) and seeded random weights: the same seed gives the same weights on every worker and for
//   any thread count.
// - A synthetic fill writes N tokens of keys/values straight into a shard, without running the model. Its
//   values follow the statistics that matter to the quantizers: pre-RoPE keys with a per-channel offset
//   and a few outlier channels of large scale, values per token near Gaussian with rare large entries.
//   Everything that reports on a filled context labels it "SYNTHETIC FILL".
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/kv_shard.h"
#include "worker/model.h"

namespace kvshard {

struct SyntheticModelSpec {
  int n_layers = 30;
  int hidden = 576;
  int n_heads = 9;
  int n_kv_heads = 3;
  int head_dim = 64;
  int ffn_hidden = 1536;
  int vocab_size = 49152;
  int64_t max_context = int64_t{1} << 24;
  float rope_theta = 10000.0f;
  uint64_t seed = 1;

  // "synthetic(L30,H576,q9,kv3,d64,ffn1536,V49152,seed1)": the model name reported to users.
  std::string Name() const;
};

// Checks the geometry (positive sizes, heads divisible by KV heads, even head_dim); the model's config.
absl::StatusOr<ModelConfig> SyntheticModelConfig(const SyntheticModelSpec& spec);

// Checks the geometry and builds the weights.
// Tied embeddings; linear weights uniform with variance 1/in_features; norm weights 1.
absl::StatusOr<ModelWeights> MakeSyntheticModel(const SyntheticModelSpec& spec);

// Appends synthetic keys/values for absolute positions [begin, end) to every layer of `shard`; each
// layer must hold exactly the tokens before `begin` (shard.start_position() + length == begin). The
// values depend only on (seed, layer, KV head, position), so a context filled across several shards
// equals the same context filled into one.
absl::Status SyntheticFill(KvShard& shard, int64_t begin, int64_t end, uint64_t seed);

// Fills `k` and `v` ([n_tokens][n_kv_heads][head_dim], keys pre-RoPE) for one layer and positions
// [begin, begin + n_tokens): the generator behind SyntheticFill, for tests and capacity probes.
void SyntheticKvTokens(const KvGeometry& geometry, int layer, int64_t begin, int64_t n_tokens, uint64_t seed,
                       float* k, float* v);

}  // namespace kvshard
