// Calibration for the KV schemes that need it (kvq, wkv): per-channel key thresholds, non-uniform
// codebooks, WKV smoothing factors; the builder that computes them from K/V activations; and the
// versioned, checksummed file that stores them.
//
// File format (all little-endian):
//   8 bytes   magic "KVSHCAL\n"
//   u32       format version (kCalibrationFormatVersion)
//   u64       payload size in bytes
//   payload   (below)
//   u64       FNV-1a 64 of the payload
// Payload: str = u32 length + bytes; arrays are f32 unless said.
//   str model name; i32 n_layers, n_heads, n_kv_heads, head_dim; u64 model fingerprint
//   str weighting ("fisher", "uniform", ...); i64 calibration tokens
//   u32 F, f64[F] outlier fractions; u32 B, i32[B] codebook bit widths
//   per layer: per fraction: key_low[C], key_high[C], per bit width b: key codebook[2^b], value codebook[2^b]
//              then key_shift[C], key_scale[C], value_shift[C], value_scale[C]        (C = n_kv_heads*head_dim)
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/kv_shard.h"

namespace kvshard {

inline constexpr uint32_t kCalibrationFormatVersion = 1;

// FNV-1a, 64 bit: the file checksum and model fingerprints.
inline constexpr uint64_t kFnvOffsetBasis = 0xcbf29ce484222325ull;
uint64_t Fnv1a64(const void* data, size_t size, uint64_t hash = kFnvOffsetBasis);

// What a calibration file belongs to. The fingerprint is a hash of model-specific data (the loader's
// caller hashes e.g. a weight tensor), so two models with one name and geometry still differ.
struct ModelIdentity {
  std::string name;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  uint64_t fingerprint = 0;
  std::string ToString() const;
};

// kvq tables of one layer for one outlier fraction.
struct KvqLayerTables {
  // Per-channel thresholds of pre-RoPE keys, [n_kv_heads][head_dim]: the fraction/2 and 1 - fraction/2
  // quantiles over the calibration tokens. They are the scale and zero point of the key normalization
  // u = 2 (x - low) / (high - low) - 1; keys outside [low, high] are outliers.
  std::vector<float> key_low, key_high;
  // Codebooks per bit width (same order as Calibration::codebook_bits): 2^b sorted centroids in [-1, 1]
  // over normalized keys and normalized values.
  std::vector<std::vector<float>> key_codebooks, value_codebooks;
};

struct LayerCalibration {
  std::vector<KvqLayerTables> kvq;  // one per Calibration::outlier_fractions
  // WKV static smoothing, [n_kv_heads][head_dim]: x~ = (x - shift) / scale before per-token quantization
  // (keys pre-RoPE).
  std::vector<float> key_shift, key_scale, value_shift, value_scale;
};

struct Calibration {
  ModelIdentity model;
  std::string weighting;  // how k-means samples were weighted: "fisher", "uniform"
  int64_t tokens = 0;     // calibration tokens
  std::vector<double> outlier_fractions;
  std::vector<int> codebook_bits;
  std::vector<LayerCalibration> layers;

  // Index into outlier_fractions / codebook_bits, or a clear error naming what the file has.
  absl::StatusOr<int> FractionIndex(double fraction) const;
  absl::StatusOr<int> BitsIndex(int bits) const;
};

std::string SerializeCalibration(const Calibration& calibration);
absl::StatusOr<Calibration> ParseCalibration(std::string_view bytes);
absl::Status SaveCalibration(const Calibration& calibration, const std::string& path);
// Reads and checks a file (magic, version, size, checksum, structure).
absl::StatusOr<Calibration> LoadCalibration(const std::string& path);
// Refuses a calibration made for another model (name, geometry or fingerprint differ).
absl::Status CheckCalibrationForModel(const Calibration& calibration, const ModelIdentity& model);
// Refuses a calibration whose geometry does not match a KV store's.
absl::Status CheckCalibrationGeometry(const Calibration& calibration, const KvGeometry& geometry);

// Weighted samples in [-1, 1] gathered into fine bins (weight and weighted sum per bin), so k-means over
// hundreds of millions of activations costs only the bins.
class WeightedHistogram {
 public:
  explicit WeightedHistogram(int bins = 8192);
  void Add(float x, float weight);  // x is clamped to [-1, 1]
  void Merge(const WeightedHistogram& other);
  int bins() const { return static_cast<int>(weight_.size()); }
  double weight(int bin) const { return weight_[bin]; }
  double mean(int bin) const;  // weighted mean of the bin's samples (its center when empty)
  double total_weight() const;

 private:
  std::vector<double> weight_, weighted_sum_;
};

// Weighted 1-D k-means (Lloyd's algorithm from weighted-quantile seeds) over the histogram's bins.
// Returns k sorted centroids; a cluster that empties keeps its last centroid.
std::vector<float> WeightedKMeans1D(const WeightedHistogram& histogram, int k, int max_iterations = 300);
// The same over raw samples (small inputs, tests); weights may be nullptr (all 1).
std::vector<float> WeightedKMeans1D(const float* x, const float* weights, int64_t n, int k,
                                    int max_iterations = 300);

// Computes a Calibration from K/V activations in two passes over the same tokens:
//   pass 1 (ObserveThresholds): per-channel quantile thresholds (exact order statistics) and smoothing;
//   pass 2 (ObserveSamples): normalized activations, weighted, into histograms; Finish runs k-means.
// Activations are [n_tokens][n_kv_heads][head_dim], keys pre-RoPE, as worker/forward.h's KvObserver
// gives them; like the store, the builder rounds them to fp16 first. Weights have the same shape (Fisher: squared loss gradients; nullptr: all 1).
class CalibrationBuilder {
 public:
  // `total_tokens` is the number of tokens each layer will see in each pass (needed up front to keep
  // only the extreme order statistics).
  CalibrationBuilder(ModelIdentity model, int64_t total_tokens, std::vector<double> outlier_fractions = {0.01},
                     std::vector<int> codebook_bits = {2, 3, 4});

  absl::Status ObserveThresholds(int layer, int n_tokens, const float* k, const float* v);
  absl::Status FinishThresholds();
  absl::Status ObserveSamples(int layer, int n_tokens, const float* k, const float* v, const float* k_weights,
                              const float* v_weights);
  absl::StatusOr<Calibration> Finish(std::string weighting);

  // Thresholds after FinishThresholds (tests).
  const Calibration& partial() const { return calibration_; }

 private:
  struct LayerState;  // order statistics and histograms of one layer
  ModelIdentity model_;
  int64_t total_tokens_;
  Calibration calibration_;
  std::vector<std::unique_ptr<LayerState>> state_;
  bool thresholds_done_ = false;

 public:
  ~CalibrationBuilder();
};

}  // namespace kvshard
