#include "worker/synthetic.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvshard {
namespace {

// SplitMix64: a counter-based generator, so any element can be drawn independently (and in parallel).
inline uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline uint64_t Key(uint64_t a, uint64_t b) { return Mix(a ^ Mix(b)); }
// Uniform in [-1, 1).
inline float Uniform(uint64_t bits) { return static_cast<float>(bits >> 40) * (2.0f / 16777216.0f) - 1.0f; }
// Near-normal with unit variance: the sum of four uniforms (Irwin-Hall), bounded by +-3.46.
inline float Normal(uint64_t key) {
  const uint64_t a = Mix(key), b = Mix(key + 1);
  const float s = Uniform(a) + Uniform(a << 24) + Uniform(b) + Uniform(b << 24);
  return s * 0.8660254f;  // sqrt(3/4): each uniform on [-1,1) has variance 1/3
}

// Uniform weights with variance `variance`, from tensor key `tensor`.
HostTensor RandomTensor(std::vector<int64_t> shape, float variance, uint64_t tensor) {
  HostTensor t;
  t.shape = std::move(shape);
  t.data.resize(t.numel());
  const float amplitude = std::sqrt(3.0f * variance);
  const int64_t n = static_cast<int64_t>(t.data.size());
  float* data = t.data.data();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) data[i] = amplitude * Uniform(Key(tensor, static_cast<uint64_t>(i)));
  return t;
}

HostTensor Ones(int64_t n) {
  HostTensor t;
  t.shape = {n};
  t.data.assign(n, 1.0f);
  return t;
}

}  // namespace

std::string SyntheticModelSpec::Name() const {
  return absl::StrCat("synthetic(L", n_layers, ",H", hidden, ",q", n_heads, ",kv", n_kv_heads, ",d", head_dim,
                      ",ffn", ffn_hidden, ",V", vocab_size, ",seed", seed, ")");
}

absl::StatusOr<ModelConfig> SyntheticModelConfig(const SyntheticModelSpec& spec) {
  for (auto [name, value] : {std::pair<const char*, int64_t>{"layers", spec.n_layers},
                             {"hidden", spec.hidden},
                             {"heads", spec.n_heads},
                             {"kv_heads", spec.n_kv_heads},
                             {"head_dim", spec.head_dim},
                             {"ffn", spec.ffn_hidden},
                             {"vocab", spec.vocab_size},
                             {"max_context", spec.max_context}}) {
    if (value <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("synthetic model: ", name, " must be positive, got ", value));
    }
  }
  if (spec.n_heads % spec.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("synthetic model: ", spec.n_heads, " heads are not a multiple of ",
                                                   spec.n_kv_heads, " KV heads"));
  }
  if (spec.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("synthetic model: head_dim ", spec.head_dim, " must be even (RoPE)"));
  }
  ModelConfig c;
  c.architecture = "llama";
  c.name = spec.Name();
  c.n_layers = spec.n_layers;
  c.hidden = spec.hidden;
  c.n_heads = spec.n_heads;
  c.n_kv_heads = spec.n_kv_heads;
  c.head_dim = spec.head_dim;
  c.ffn_hidden = spec.ffn_hidden;
  c.vocab_size = spec.vocab_size;
  c.max_context = spec.max_context;
  c.rope_theta = spec.rope_theta;
  c.norm_eps = 1e-5f;
  c.tied_embeddings = true;
  return c;
}

absl::StatusOr<ModelWeights> MakeSyntheticModel(const SyntheticModelSpec& spec) {
  ModelWeights w;
  KV_ASSIGN_OR_RETURN(w.config, SyntheticModelConfig(spec));

  const int64_t hidden = spec.hidden;
  const int64_t q_dim = static_cast<int64_t>(spec.n_heads) * spec.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(spec.n_kv_heads) * spec.head_dim;
  const int64_t ffn = spec.ffn_hidden;
  uint64_t tensor = Mix(spec.seed);
  auto next = [&tensor] { return tensor = Mix(tensor); };
  w.token_embedding = RandomTensor({spec.vocab_size, hidden}, 1.0f / hidden, next());
  w.layers.resize(spec.n_layers);
  for (LayerWeights& L : w.layers) {
    L.attn_norm = Ones(hidden);
    L.ffn_norm = Ones(hidden);
    L.wq = RandomTensor({q_dim, hidden}, 1.0f / hidden, next());
    L.wk = RandomTensor({kv_dim, hidden}, 1.0f / hidden, next());
    L.wv = RandomTensor({kv_dim, hidden}, 1.0f / hidden, next());
    L.wo = RandomTensor({hidden, q_dim}, 1.0f / q_dim, next());
    L.w_gate = RandomTensor({ffn, hidden}, 1.0f / hidden, next());
    L.w_up = RandomTensor({ffn, hidden}, 1.0f / hidden, next());
    L.w_down = RandomTensor({hidden, ffn}, 1.0f / ffn, next());
  }
  w.output_norm = Ones(hidden);
  return w;
}

void SyntheticKvTokens(const KvGeometry& geometry, int layer, int64_t begin, int64_t n_tokens, uint64_t seed,
                       float* k, float* v) {
  const int kvh = geometry.n_kv_heads;
  const int d = geometry.head_dim;
  // Per (layer, head, channel): a key offset and scale; about 3% of channels are outliers of 4-8x scale.
  std::vector<float> key_mean(static_cast<size_t>(kvh) * d), key_scale(static_cast<size_t>(kvh) * d);
  for (int h = 0; h < kvh; ++h) {
    for (int c = 0; c < d; ++c) {
      const uint64_t channel = Key(Key(seed, 0x6b657973ull + layer), static_cast<uint64_t>(h) * d + c);
      const size_t i = static_cast<size_t>(h) * d + c;
      key_mean[i] = 0.5f * Normal(channel);
      const bool outlier = (Mix(channel + 7) % 100) < 3;
      key_scale[i] = outlier ? 4.0f + 4.0f * (0.5f + 0.5f * Uniform(Mix(channel + 11))) : 1.0f;
    }
  }
  const uint64_t layer_key = Key(seed, 0x76616c73ull + layer);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n_tokens; ++t) {
    const uint64_t token_key = Key(layer_key, static_cast<uint64_t>(begin + t));
    for (int h = 0; h < kvh; ++h) {
      float* kt = k + (t * kvh + h) * d;
      float* vt = v + (t * kvh + h) * d;
      const uint64_t head_key = Key(token_key, static_cast<uint64_t>(h));
      for (int c = 0; c < d; ++c) {
        const size_t i = static_cast<size_t>(h) * d + c;
        kt[c] = key_mean[i] + key_scale[i] * Normal(Key(head_key, 2 * c));
        const uint64_t vk = Key(head_key, 2 * c + 1);
        const bool spike = (Mix(vk + 3) % 1000) < 5;  // 0.5% of value entries are 6x outliers
        vt[c] = 0.5f * Normal(vk) * (spike ? 6.0f : 1.0f);
      }
    }
  }
}

absl::Status SyntheticFill(KvShard& shard, int64_t begin, int64_t end, uint64_t seed) {
  const KvGeometry& g = shard.geometry();
  if (end < begin) return absl::InvalidArgumentError(absl::StrCat("synthetic fill of [", begin, ", ", end, ")"));
  for (int layer = 0; layer < g.n_layers; ++layer) {
    if (shard.start_position() + shard.length(layer) != begin) {
      return absl::FailedPreconditionError(absl::StrCat("synthetic fill from position ", begin, " into a shard whose layer ",
                                                        layer, " ends at ", shard.start_position() + shard.length(layer)));
    }
  }
  constexpr int64_t kBlock = 256;
  const int64_t row = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  std::vector<float> k(kBlock * row), v(kBlock * row);
  for (int64_t t0 = begin; t0 < end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, end - t0);
    for (int layer = 0; layer < g.n_layers; ++layer) {
      SyntheticKvTokens(g, layer, t0, n, seed, k.data(), v.data());
      KV_RETURN_IF_ERROR(shard.Append(layer, static_cast<int>(n), k.data(), v.data()));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvshard
