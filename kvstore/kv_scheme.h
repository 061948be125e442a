// KV quantization schemes: their configuration, parsing, token layout and exact bit formulas.
//
// A scheme is named on the command line or in YAML, e.g. "kvq3", "int4", "kivi2", "wkv4", "deco",
// optionally with parameters: "kvq3:outliers=0.005,sink=4,residual=32". In YAML:
//   kv: {scheme: kvq3, outliers: 0.01, sink: 4, residual: 32}
//
// Every quantized scheme keeps, per (layer, KV head), three token ranges of its shard:
//   [0, sink)          fp16 after RoPE: tokens at absolute positions < sink_tokens (attention sink)
//   [sink, quantized)  quantized (codes + metadata), in pages of 128 tokens
//   [quantized, n)     fp16: the residual window of newest tokens, at least residual_tokens of them
// Tokens move from the residual into the quantized range in units of flush_unit() tokens (a KIVI key
// group or a DecoQuant block, else 1); a sealed shard (one that will get no more tokens because
// another shard holds the sequence's tail) quantizes its whole residual, the last unit possibly partial.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace YAML {
class Node;
}

namespace kvshard {

enum class KvSchemeKind {
  kFp16,  // unquantized (the foundation cache)
  kInt,   // llama.cpp q8_0/q4_0 class: per token, groups of group_size channels, one fp16 scale each
  kKivi,  // KIVI: keys per channel over groups of group_size tokens, values per token in groups of
          // group_size channels; asymmetric (fp16 scale and zero point)
  kKvq,   // KVQuant: pre-RoPE per-channel keys, per-token values, non-uniform codebooks, dense-and-sparse
  kWkv,   // WKVQuant (KV part): static per-channel smoothing times dynamic per-token asymmetric scales
  kDeco,  // DecoQuant: per block of tokens an MPO (tensor-train) decomposition, low-bit core
};

enum class KvPart { kKey, kValue };

struct KvSchemeConfig {
  KvSchemeKind kind = KvSchemeKind::kKvq;
  int bits = 3;
  int group_size = 32;            // int: channels per scale; kivi: key tokens and value channels per group
  int64_t sink_tokens = 0;        // absolute positions < sink_tokens stay fp16 after RoPE
  int64_t residual_tokens = 0;    // the newest tokens stay fp16
  double outlier_fraction = 0.01; // kvq: fraction of each vector kept exactly (dense-and-sparse)
  int deco_block_tokens = 64;     // deco: tokens per decomposed block (divides 128)
  int deco_local_channels = 4;    // deco: channel factor of each small local tensor (head_dim % it^2 == 0)
  // Ablations ("parts=k" / "parts=v"): quantize only keys or only values; the other part stays fp16.
  bool quantize_keys = true;
  bool quantize_values = true;
  // Keeps an fp16 copy of every token so that each query of a chunk sees exactly what decode at its
  // position would see (the residual window as it was then). For perplexity runs; the copy is not part
  // of the store's memory and never used in serving.
  bool exact_decode_view = false;

  // "kvq3", "int4", "fp16", "deco4", ...
  std::string name() const;
  // The name with every parameter that applies to the scheme: "kvq3:outliers=0.01,sink=4,residual=32".
  std::string ToString() const;
  // Tokens that move from the residual into the quantized range together.
  int flush_unit() const;
  // Keys are quantized before RoPE (and rotated after dequantization, inside attention).
  bool keys_pre_rope() const { return kind == KvSchemeKind::kKvq || kind == KvSchemeKind::kWkv; }
  bool quantizes(KvPart part) const { return part == KvPart::kKey ? quantize_keys : quantize_values; }
  bool needs_calibration() const { return kind == KvSchemeKind::kKvq || kind == KvSchemeKind::kWkv; }
};

// The defaults of each scheme (the paper's where there is one):
//   int<b>   b in 2..8, group 32, no sink, no residual
//   kivi<b>  b in 2..8, group 32, residual 128
//   kvq<b>   b in 2..4, outliers 0.01, sink 4, residual 32
//   wkv<b>   b in 2..8, residual 1 (past-only: a token sees its own K/V unquantized)
//   deco<b>  b in 2..8 ("deco" is deco4), block 64 tokens, local channels 4
absl::StatusOr<KvSchemeConfig> ParseKvScheme(absl::string_view spec);
// {scheme: NAME, bits?, group?, sink?, residual?, outliers?, block?, local_channels?, parts?}
absl::StatusOr<KvSchemeConfig> KvSchemeFromYaml(const YAML::Node& node);
// Checks a configuration against a head dim (deco's factorization, group sizes, index widths).
absl::Status ValidateKvScheme(const KvSchemeConfig& config, int head_dim);

// The token ranges of one (layer, KV head) stream holding n tokens from `start_position` on.
struct KvStreamLayout {
  int64_t sink = 0;            // tokens [0, sink) fp16 after RoPE
  int64_t quantized_end = 0;   // tokens [sink, quantized_end) quantized
  int64_t n = 0;               // tokens [quantized_end, n) fp16 residual
  int64_t quantized() const { return quantized_end - sink; }
  int64_t full_precision() const { return sink + n - quantized_end; }
};
KvStreamLayout StreamLayout(const KvSchemeConfig& config, int64_t start_position, int64_t n_tokens, bool sealed);

// Value outliers per token kept by kvq: round(outlier_fraction * head_dim).
int KvqValueOutliersPerToken(const KvSchemeConfig& config, int head_dim);

// Words in the error of a kvq sequence whose key outliers outgrew the room a GPU store gives them. Errors
// cross the control plane as text; the coordinator looks for these to add advice for SYNTHETIC FILL.
inline constexpr absl::string_view kKvqKeyOutlierOverflow = "kvq key outliers exceeded the room";

// Bits one (layer, KV head) stream of n tokens holds, keys and values, all-in: codes, scales and zero
// points, outliers with their indices and per-token counts, sink and residual. Calibration tables
// (codebooks, thresholds, smoothing) are per model, not per token, and not counted. kvq's key outliers
// depend on the data (per-channel thresholds are fixed); pass the stream's count.
int64_t KvStreamBits(const KvSchemeConfig& config, int head_dim, int64_t start_position, int64_t n_tokens,
                     bool sealed, int64_t key_outliers = 0);

// Bits per element for a long context (sink and residual amortized away), kvq key outliers at the
// configured fraction.
double KvAsymptoticBitsPerElement(const KvSchemeConfig& config, int head_dim);

// Sizes of the per-element metadata, shared by the store and the formula.
inline constexpr int kHalfBits = 16;
inline constexpr int kOutlierIndexBits = 8;       // channel index within the head; head_dim <= 256
inline constexpr int kOutlierCountBits = 8;       // kvq key outliers per token; at most 255 are kept
inline constexpr int kMaxKeyOutliersPerToken = 255;

}  // namespace kvshard
