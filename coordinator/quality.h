// KV-cache quality tools: calibration of the kvq/wkv schemes from model activations, and perplexity of
// a text with a quantized KV cache (what `kvshard calibrate` and `kvshard perplexity` run).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstore/calibration.h"
#include "coordinator/single_process_engine.h"
#include "kvstore/kv_scheme.h"
#include "worker/forward.h"
#include "worker/model.h"

namespace kvshard {

// The KV store factory of every scheme (kvstore/kv_scheme.h names with parameters, plus "fp32"), for
// EngineOptions::kv_factory. kvq and wkv use `calibration` (the caller checks it against the model) and
// are refused without one.
KvShardFactory AllSchemesKvShardFactory(std::shared_ptr<const Calibration> calibration);

// The identity calibration files are checked against: the model's name and geometry, and a hash of
// its layer-0 key projection and last-layer value projection.
ModelIdentity ModelIdentityOf(const ModelWeights& weights);

struct PerplexityOptions {
  int64_t ctx = 2048;        // tokens per window
  int64_t max_tokens = 0;    // evaluate at most this many tokens (whole windows); 0: the whole text
  bool show_progress = true; // a progress line on stderr
};

struct PerplexityResult {
  int64_t windows = 0;
  int64_t scored_tokens = 0;       // next-token predictions scored: ctx - 1 per window
  double mean_nll = 0;             // nats per scored token
  double perplexity = 0;
  double bits_per_element = 0;     // the store's all-in bits/element at each window's end, averaged
  double seconds = 0;
};

// Perplexity over non-overlapping windows of ctx tokens; every window starts an empty KV store of
// `scheme` at position 0. Within a window, tokens are fed in chunks of CpuModel::max_chunk() and every
// prediction is scored (the window's first token has no prediction). The store runs with
// exact_decode_view, so each token attends to exactly what decode at its position sees: the quantized
// K/V of all earlier tokens except the scheme's fp16 sink and its residual window as it was at that
// token, which is then the fp16 copy (see kvstore/quantized_shard.h).
absl::StatusOr<PerplexityResult> EvaluatePerplexity(CpuModel& model, std::span<const int32_t> tokens,
                                                    const KvSchemeConfig& scheme, const Calibration* calibration,
                                                    const PerplexityOptions& options);

// The same windows scored on the GPU (worker/gpu_perplexity.h): every token is one decode step, so each
// prediction sees the decode view by construction; `batch` windows run side by side. The dense layers
// run in bf16 (GpuModel), so perplexities differ slightly from the CPU path's: compare schemes within
// one device. Schemes: fp16 and kvq2..4 (Unimplemented otherwise); Unavailable without a GPU.
absl::StatusOr<PerplexityResult> EvaluatePerplexityOnGpu(const ModelWeights& weights,
                                                         std::span<const int32_t> tokens,
                                                         const KvSchemeConfig& scheme, const Calibration* calibration,
                                                         const PerplexityOptions& options, int batch);

// Squared loss gradients with respect to each layer's keys (pre-RoPE) and values, for the tokens they
// were computed on: the Fisher information weights of KVQuant's k-means. bench/fisher_weights.py
// writes the file (torch); format, little-endian:
//   8 bytes "KVSHFSH\n"; u32 version 1; i32 n_layers; i32 channels (n_kv_heads * head_dim);
//   i64 n_tokens; i64 ctx (window length the gradients were taken over); i32 tokens[n_tokens];
//   per layer: bf16 key_weights[n_tokens][channels], bf16 value_weights[n_tokens][channels]
struct FisherWeights {
  int n_layers = 0;
  int64_t channels = 0;
  int64_t ctx = 0;
  std::vector<int32_t> tokens;
  std::vector<std::vector<uint16_t>> key, value;  // [layer][token * channels + channel], bf16
};
absl::StatusOr<FisherWeights> LoadFisherWeights(const std::string& path);

struct CalibrateOptions {
  int64_t max_tokens = 16384;  // calibration tokens (whole windows of ctx)
  int64_t ctx = 2048;
  std::vector<double> outlier_fractions = {0.005, 0.01, 0.02};
  std::vector<int> codebook_bits = {2, 3, 4};
  const FisherWeights* fisher = nullptr;  // weights for k-means; nullptr: every sample weighs 1
  bool show_progress = true;
};

// Runs the model twice over the calibration windows (thresholds, then k-means samples) and returns the
// calibration. With Fisher weights the tokens are the weights' own.
absl::StatusOr<Calibration> CalibrateKv(CpuModel& model, const ModelIdentity& identity,
                                        std::span<const int32_t> tokens, const CalibrateOptions& options);
// The same on the GPU: the activations come from its bf16 dense layers, so the tables differ slightly from
// the CPU's. Unavailable without a GPU or a CUDA build.
absl::StatusOr<Calibration> CalibrateKvOnGpu(const ModelWeights& weights, const ModelIdentity& identity,
                                             std::span<const int32_t> tokens, const CalibrateOptions& options);

}  // namespace kvshard
