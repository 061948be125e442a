#include "kvstore/calibration.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/half.h"
#include "common/status.h"
#include "kvstore/kv_codecs.h"

namespace kvshard {

static_assert(std::endian::native == std::endian::little, "the calibration format is written little-endian");

namespace {

constexpr char kMagic[8] = {'K', 'V', 'S', 'H', 'C', 'A', 'L', '\n'};

class ByteWriter {
 public:
  template <typename T>
  void Put(T value) {
    const size_t at = bytes_.size();
    bytes_.resize(at + sizeof(T));
    std::memcpy(bytes_.data() + at, &value, sizeof(T));
  }
  void PutString(const std::string& s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    bytes_.append(s);
  }
  void PutFloats(const std::vector<float>& v) {
    const size_t at = bytes_.size();
    bytes_.resize(at + v.size() * sizeof(float));
    if (!v.empty()) std::memcpy(bytes_.data() + at, v.data(), v.size() * sizeof(float));
  }
  std::string& bytes() { return bytes_; }

 private:
  std::string bytes_;
};

class ByteReader {
 public:
  explicit ByteReader(std::string_view bytes) : bytes_(bytes) {}
  template <typename T>
  absl::Status Get(T* value) {
    if (bytes_.size() - at_ < sizeof(T)) return Truncated();
    std::memcpy(value, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return absl::OkStatus();
  }
  absl::Status GetString(std::string* s) {
    uint32_t n = 0;
    KV_RETURN_IF_ERROR(Get(&n));
    if (bytes_.size() - at_ < n) return Truncated();
    s->assign(bytes_.data() + at_, n);
    at_ += n;
    return absl::OkStatus();
  }
  absl::Status GetFloats(size_t n, std::vector<float>* v) {
    if ((bytes_.size() - at_) / sizeof(float) < n) return Truncated();
    v->resize(n);
    if (n) std::memcpy(v->data(), bytes_.data() + at_, n * sizeof(float));
    at_ += n * sizeof(float);
    return absl::OkStatus();
  }
  bool done() const { return at_ == bytes_.size(); }

 private:
  static absl::Status Truncated() { return absl::DataLossError("calibration payload ends early (corrupt file)"); }
  std::string_view bytes_;
  size_t at_ = 0;
};

int64_t Channels(const ModelIdentity& m) { return static_cast<int64_t>(m.n_kv_heads) * m.head_dim; }

// The store rounds its inputs to fp16 before quantizing; calibration sees the same values.
float RoundToHalf(float x) { return HalfToFloat(FloatToHalf(x)); }

}  // namespace

uint64_t Fnv1a64(const void* data, size_t size, uint64_t hash) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < size; ++i) {
    hash ^= p[i];
    hash *= 0x100000001b3ull;
  }
  return hash;
}

std::string ModelIdentity::ToString() const {
  return absl::StrFormat("\"%s\" (%d layers, %d heads, %d KV heads, head_dim %d, fingerprint %016x)", name, n_layers,
                         n_heads, n_kv_heads, head_dim, fingerprint);
}

absl::StatusOr<int> Calibration::FractionIndex(double fraction) const {
  for (size_t i = 0; i < outlier_fractions.size(); ++i)
    if (std::fabs(outlier_fractions[i] - fraction) < 1e-9) return static_cast<int>(i);
  return absl::InvalidArgumentError(
      absl::StrCat("the calibration has no tables for outlier fraction ", fraction, " (it has ",
                   absl::StrJoin(outlier_fractions, ", "), "); recalibrate with that fraction"));
}

absl::StatusOr<int> Calibration::BitsIndex(int bits) const {
  for (size_t i = 0; i < codebook_bits.size(); ++i)
    if (codebook_bits[i] == bits) return static_cast<int>(i);
  return absl::InvalidArgumentError(absl::StrCat("the calibration has no ", bits, "-bit codebooks (it has ",
                                                 absl::StrJoin(codebook_bits, ", "), " bits)"));
}

std::string SerializeCalibration(const Calibration& c) {
  ByteWriter payload;
  payload.PutString(c.model.name);
  payload.Put<int32_t>(c.model.n_layers);
  payload.Put<int32_t>(c.model.n_heads);
  payload.Put<int32_t>(c.model.n_kv_heads);
  payload.Put<int32_t>(c.model.head_dim);
  payload.Put<uint64_t>(c.model.fingerprint);
  payload.PutString(c.weighting);
  payload.Put<int64_t>(c.tokens);
  payload.Put<uint32_t>(static_cast<uint32_t>(c.outlier_fractions.size()));
  for (double f : c.outlier_fractions) payload.Put<double>(f);
  payload.Put<uint32_t>(static_cast<uint32_t>(c.codebook_bits.size()));
  for (int b : c.codebook_bits) payload.Put<int32_t>(b);
  for (const LayerCalibration& layer : c.layers) {
    for (const KvqLayerTables& t : layer.kvq) {
      payload.PutFloats(t.key_low);
      payload.PutFloats(t.key_high);
      for (size_t b = 0; b < c.codebook_bits.size(); ++b) {
        payload.PutFloats(t.key_codebooks[b]);
        payload.PutFloats(t.value_codebooks[b]);
      }
    }
    payload.PutFloats(layer.key_shift);
    payload.PutFloats(layer.key_scale);
    payload.PutFloats(layer.value_shift);
    payload.PutFloats(layer.value_scale);
  }
  ByteWriter file;
  file.bytes().append(kMagic, sizeof(kMagic));
  file.Put<uint32_t>(kCalibrationFormatVersion);
  file.Put<uint64_t>(payload.bytes().size());
  file.bytes().append(payload.bytes());
  file.Put<uint64_t>(Fnv1a64(payload.bytes().data(), payload.bytes().size()));
  return std::move(file.bytes());
}

absl::StatusOr<Calibration> ParseCalibration(std::string_view bytes) {
  constexpr size_t kHeader = sizeof(kMagic) + sizeof(uint32_t) + sizeof(uint64_t);
  if (bytes.size() < kHeader || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::InvalidArgumentError("not a kvshard calibration file (bad magic)");
  }
  uint32_t version;
  uint64_t payload_size;
  std::memcpy(&version, bytes.data() + sizeof(kMagic), sizeof(version));
  std::memcpy(&payload_size, bytes.data() + sizeof(kMagic) + sizeof(version), sizeof(payload_size));
  if (version != kCalibrationFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat("calibration format version ", version, " is not supported (this build reads version ",
                                                   kCalibrationFormatVersion, "); recalibrate"));
  }
  if (bytes.size() != kHeader + payload_size + sizeof(uint64_t)) {
    return absl::DataLossError(absl::StrCat("calibration file is ", bytes.size(), " bytes, its header says ",
                                            kHeader + payload_size + sizeof(uint64_t), " (truncated or corrupt)"));
  }
  const std::string_view payload = bytes.substr(kHeader, payload_size);
  uint64_t checksum;
  std::memcpy(&checksum, bytes.data() + kHeader + payload_size, sizeof(checksum));
  if (checksum != Fnv1a64(payload.data(), payload.size())) {
    return absl::DataLossError("calibration file checksum mismatch (corrupt file)");
  }

  Calibration c;
  ByteReader r(payload);
  int32_t i32;
  KV_RETURN_IF_ERROR(r.GetString(&c.model.name));
  KV_RETURN_IF_ERROR(r.Get(&i32));
  c.model.n_layers = i32;
  KV_RETURN_IF_ERROR(r.Get(&i32));
  c.model.n_heads = i32;
  KV_RETURN_IF_ERROR(r.Get(&i32));
  c.model.n_kv_heads = i32;
  KV_RETURN_IF_ERROR(r.Get(&i32));
  c.model.head_dim = i32;
  KV_RETURN_IF_ERROR(r.Get(&c.model.fingerprint));
  if (c.model.n_layers <= 0 || c.model.n_layers > 4096 || c.model.n_kv_heads <= 0 || c.model.n_kv_heads > 4096 ||
      c.model.head_dim <= 0 || c.model.head_dim > 4096) {
    return absl::DataLossError("calibration geometry out of range (corrupt file)");
  }
  KV_RETURN_IF_ERROR(r.GetString(&c.weighting));
  KV_RETURN_IF_ERROR(r.Get(&c.tokens));
  uint32_t n;
  KV_RETURN_IF_ERROR(r.Get(&n));
  if (n > 64) return absl::DataLossError("too many outlier fractions (corrupt file)");
  c.outlier_fractions.resize(n);
  for (double& f : c.outlier_fractions) KV_RETURN_IF_ERROR(r.Get(&f));
  KV_RETURN_IF_ERROR(r.Get(&n));
  if (n > 16) return absl::DataLossError("too many codebook bit widths (corrupt file)");
  c.codebook_bits.resize(n);
  for (int& b : c.codebook_bits) {
    KV_RETURN_IF_ERROR(r.Get(&i32));
    if (i32 < 1 || i32 > 8) return absl::DataLossError("codebook bit width out of range (corrupt file)");
    b = i32;
  }
  const int64_t channels = Channels(c.model);
  c.layers.resize(c.model.n_layers);
  for (LayerCalibration& layer : c.layers) {
    layer.kvq.resize(c.outlier_fractions.size());
    for (KvqLayerTables& t : layer.kvq) {
      KV_RETURN_IF_ERROR(r.GetFloats(channels, &t.key_low));
      KV_RETURN_IF_ERROR(r.GetFloats(channels, &t.key_high));
      t.key_codebooks.resize(c.codebook_bits.size());
      t.value_codebooks.resize(c.codebook_bits.size());
      for (size_t b = 0; b < c.codebook_bits.size(); ++b) {
        KV_RETURN_IF_ERROR(r.GetFloats(size_t{1} << c.codebook_bits[b], &t.key_codebooks[b]));
        KV_RETURN_IF_ERROR(r.GetFloats(size_t{1} << c.codebook_bits[b], &t.value_codebooks[b]));
      }
    }
    KV_RETURN_IF_ERROR(r.GetFloats(channels, &layer.key_shift));
    KV_RETURN_IF_ERROR(r.GetFloats(channels, &layer.key_scale));
    KV_RETURN_IF_ERROR(r.GetFloats(channels, &layer.value_shift));
    KV_RETURN_IF_ERROR(r.GetFloats(channels, &layer.value_scale));
  }
  if (!r.done()) return absl::DataLossError("calibration payload has trailing bytes (corrupt file)");
  return c;
}

absl::Status SaveCalibration(const Calibration& calibration, const std::string& path) {
  const std::string bytes = SerializeCalibration(calibration);
  // Written under another name and renamed: an interrupted run never leaves half a file under `path`,
  // where engines look for a model's calibration by default.
  const std::string partial = absl::StrCat(path, ".partial");
  std::ofstream f(partial, std::ios::binary | std::ios::trunc);
  if (!f) return absl::PermissionDeniedError(absl::StrCat("cannot write calibration file ", path));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  std::error_code renamed;
  if (f) std::filesystem::rename(partial, path, renamed);
  if (!f || renamed) {
    std::error_code ignored;
    std::filesystem::remove(partial, ignored);
    return absl::DataLossError(absl::StrCat("writing calibration file ", path, " failed"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Calibration> LoadCalibration(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open calibration file ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  absl::StatusOr<Calibration> c = ParseCalibration(ss.str());
  if (!c.ok()) return Annotate(c.status(), absl::StrCat("calibration file ", path));
  return c;
}

absl::Status CheckCalibrationForModel(const Calibration& calibration, const ModelIdentity& model) {
  const ModelIdentity& have = calibration.model;
  if (have.name != model.name || have.n_layers != model.n_layers || have.n_heads != model.n_heads ||
      have.n_kv_heads != model.n_kv_heads || have.head_dim != model.head_dim || have.fingerprint != model.fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat("the calibration was made for model ", have.ToString(),
                                                      ", not for ", model.ToString(), "; recalibrate"));
  }
  return absl::OkStatus();
}

absl::Status CheckCalibrationGeometry(const Calibration& calibration, const KvGeometry& g) {
  const ModelIdentity& m = calibration.model;
  if (m.n_layers != g.n_layers || m.n_heads != g.n_heads || m.n_kv_heads != g.n_kv_heads || m.head_dim != g.head_dim) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the calibration was made for model ", m.ToString(), ", whose KV geometry differs from this store's (",
        g.n_layers, " layers, ", g.n_heads, " heads, ", g.n_kv_heads, " KV heads, head_dim ", g.head_dim, ")"));
  }
  if (static_cast<int>(calibration.layers.size()) != m.n_layers) {
    return absl::FailedPreconditionError("the calibration has no tables for some layers");
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------------
// Weighted 1-D k-means

WeightedHistogram::WeightedHistogram(int bins) : weight_(bins, 0.0), weighted_sum_(bins, 0.0) {}

void WeightedHistogram::Add(float x, float weight) {
  const int n = bins();
  const float u = std::clamp(x, -1.0f, 1.0f);
  const int bin = std::min(n - 1, static_cast<int>((u + 1.0f) * 0.5f * static_cast<float>(n)));
  weight_[bin] += weight;
  weighted_sum_[bin] += static_cast<double>(weight) * u;
}

void WeightedHistogram::Merge(const WeightedHistogram& other) {
  for (int i = 0; i < bins(); ++i) {
    weight_[i] += other.weight_[i];
    weighted_sum_[i] += other.weighted_sum_[i];
  }
}

double WeightedHistogram::mean(int bin) const {
  if (weight_[bin] > 0) return weighted_sum_[bin] / weight_[bin];
  return -1.0 + (bin + 0.5) * 2.0 / bins();
}

double WeightedHistogram::total_weight() const { return std::accumulate(weight_.begin(), weight_.end(), 0.0); }

namespace {

// Lloyd's algorithm over sorted points with positive weights.
std::vector<float> KMeansSorted(const std::vector<double>& x, const std::vector<double>& w, int k, int max_iterations) {
  const int n = static_cast<int>(x.size());
  std::vector<double> c;
  if (n <= k) {
    // Every point is a centroid; fill the rest with evenly spaced values not already taken.
    c = x;
    for (int i = 0; static_cast<int>(c.size()) < k; ++i) {
      const double candidate = -1.0 + 2.0 * (i + 0.5) / (2 * k);
      if (std::find(c.begin(), c.end(), candidate) == c.end()) c.push_back(candidate);
    }
    std::sort(c.begin(), c.end());
    return std::vector<float>(c.begin(), c.end());
  }
  // Seeds: weighted quantiles (i + 0.5) / k.
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  c.resize(k);
  {
    double cum = 0;
    int p = 0;
    for (int i = 0; i < k; ++i) {
      const double target = total * (i + 0.5) / k;
      while (p < n - 1 && cum + w[p] < target) cum += w[p++];
      c[i] = x[p];
    }
    // Distinct seeds: nudge duplicates to the next unused points.
    for (int i = 1; i < k; ++i) {
      if (c[i] <= c[i - 1]) {
        auto it = std::upper_bound(x.begin(), x.end(), c[i - 1]);
        c[i] = it != x.end() ? *it : c[i - 1] + 1e-6;
      }
    }
  }
  std::vector<double> sum_w(k), sum_wx(k);
  for (int iter = 0; iter < max_iterations; ++iter) {
    std::fill(sum_w.begin(), sum_w.end(), 0.0);
    std::fill(sum_wx.begin(), sum_wx.end(), 0.0);
    int cluster = 0;
    for (int p = 0; p < n; ++p) {  // points sorted: the nearest centroid index only grows
      while (cluster < k - 1 && x[p] - c[cluster] > c[cluster + 1] - x[p]) ++cluster;
      sum_w[cluster] += w[p];
      sum_wx[cluster] += w[p] * x[p];
    }
    double moved = 0;
    for (int i = 0; i < k; ++i) {
      if (sum_w[i] <= 0) continue;  // an empty cluster keeps its centroid
      const double nc = sum_wx[i] / sum_w[i];
      moved = std::max(moved, std::fabs(nc - c[i]));
      c[i] = nc;
    }
    std::sort(c.begin(), c.end());
    if (moved < 1e-9) break;
  }
  return std::vector<float>(c.begin(), c.end());
}

}  // namespace

std::vector<float> WeightedKMeans1D(const WeightedHistogram& h, int k, int max_iterations) {
  std::vector<double> x, w;
  for (int b = 0; b < h.bins(); ++b) {
    if (h.weight(b) > 0) {
      x.push_back(h.mean(b));
      w.push_back(h.weight(b));
    }
  }
  return KMeansSorted(x, w, k, max_iterations);
}

std::vector<float> WeightedKMeans1D(const float* x, const float* weights, int64_t n, int k, int max_iterations) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [x](int64_t a, int64_t b) { return x[a] < x[b]; });
  std::vector<double> xs, ws;
  for (int64_t i : order) {
    const double wi = weights ? weights[i] : 1.0;
    if (wi <= 0) continue;
    if (!xs.empty() && xs.back() == x[i]) {
      ws.back() += wi;  // merge equal points
    } else {
      xs.push_back(x[i]);
      ws.push_back(wi);
    }
  }
  return KMeansSorted(xs, ws, k, max_iterations);
}

// ---------------------------------------------------------------------------------------------------
// CalibrationBuilder

struct CalibrationBuilder::LayerState {
  // Per channel (keys then values, each [n_kv_heads * head_dim]): the `keep` largest values as a
  // min-heap and the `keep` smallest as a max-heap.
  std::vector<std::vector<float>> largest, smallest;
  int64_t threshold_tokens = 0, sample_tokens = 0;
  // [fraction][0 = keys, 1 = values]
  std::vector<std::array<WeightedHistogram, 2>> histograms;
};

CalibrationBuilder::CalibrationBuilder(ModelIdentity model, int64_t total_tokens, std::vector<double> outlier_fractions,
                                       std::vector<int> codebook_bits)
    : model_(std::move(model)), total_tokens_(total_tokens) {
  calibration_.model = model_;
  calibration_.tokens = total_tokens;
  calibration_.outlier_fractions = std::move(outlier_fractions);
  calibration_.codebook_bits = std::move(codebook_bits);
  calibration_.layers.resize(model_.n_layers);
  const int64_t channels = Channels(model_);
  for (int l = 0; l < model_.n_layers; ++l) {
    auto s = std::make_unique<LayerState>();
    s->largest.resize(2 * channels);
    s->smallest.resize(2 * channels);
    s->histograms.resize(calibration_.outlier_fractions.size());
    state_.push_back(std::move(s));
  }
}

CalibrationBuilder::~CalibrationBuilder() = default;

namespace {

// Order statistic index m (0-based from each end) of a fraction over n samples: fraction/2 per side.
int64_t SideCount(double fraction, int64_t n) {
  return std::min<int64_t>(std::llround(static_cast<double>(n) * fraction / 2.0), (n - 1) / 2);
}

}  // namespace

absl::Status CalibrationBuilder::ObserveThresholds(int layer, int n_tokens, const float* k, const float* v) {
  if (thresholds_done_) return absl::FailedPreconditionError("calibration thresholds are already final");
  if (layer < 0 || layer >= model_.n_layers) return absl::InvalidArgumentError("calibration layer out of range");
  LayerState& s = *state_[layer];
  if (s.threshold_tokens + n_tokens > total_tokens_) {
    return absl::InvalidArgumentError(absl::StrCat("calibration layer ", layer, " got more than the announced ",
                                                   total_tokens_, " tokens"));
  }
  double max_fraction = 0;
  for (double f : calibration_.outlier_fractions) max_fraction = std::max(max_fraction, f);
  const size_t keep = static_cast<size_t>(SideCount(max_fraction, total_tokens_) + 1);
  const int64_t channels = Channels(model_);
  for (int part = 0; part < 2; ++part) {
    const float* x = part == 0 ? k : v;
    for (int64_t c = 0; c < channels; ++c) {
      std::vector<float>& big = s.largest[part * channels + c];
      std::vector<float>& small = s.smallest[part * channels + c];
      for (int t = 0; t < n_tokens; ++t) {
        const float value = RoundToHalf(x[t * channels + c]);
        if (big.size() < keep) {
          big.push_back(value);
          std::push_heap(big.begin(), big.end(), std::greater<float>());
        } else if (value > big.front()) {
          std::pop_heap(big.begin(), big.end(), std::greater<float>());
          big.back() = value;
          std::push_heap(big.begin(), big.end(), std::greater<float>());
        }
        if (small.size() < keep) {
          small.push_back(value);
          std::push_heap(small.begin(), small.end());
        } else if (value < small.front()) {
          std::pop_heap(small.begin(), small.end());
          small.back() = value;
          std::push_heap(small.begin(), small.end());
        }
      }
    }
  }
  s.threshold_tokens += n_tokens;
  return absl::OkStatus();
}

absl::Status CalibrationBuilder::FinishThresholds() {
  const int64_t channels = Channels(model_);
  for (int l = 0; l < model_.n_layers; ++l) {
    LayerState& s = *state_[l];
    if (s.threshold_tokens != total_tokens_) {
      return absl::FailedPreconditionError(absl::StrCat("calibration layer ", l, " saw ", s.threshold_tokens,
                                                        " tokens, not the announced ", total_tokens_));
    }
    LayerCalibration& lc = calibration_.layers[l];
    lc.kvq.resize(calibration_.outlier_fractions.size());
    std::vector<float> value_low(channels), value_high(channels);
    for (int64_t part_channel = 0; part_channel < 2 * channels; ++part_channel) {
      std::vector<float>& big = s.largest[part_channel];
      std::vector<float>& small = s.smallest[part_channel];
      std::sort(big.begin(), big.end(), std::greater<float>());
      std::sort(small.begin(), small.end());
    }
    for (size_t fi = 0; fi < calibration_.outlier_fractions.size(); ++fi) {
      const int64_t m = SideCount(calibration_.outlier_fractions[fi], total_tokens_);
      KvqLayerTables& t = lc.kvq[fi];
      t.key_low.resize(channels);
      t.key_high.resize(channels);
      for (int64_t c = 0; c < channels; ++c) {
        t.key_low[c] = s.smallest[c][m];  // the (m+1)-th smallest: m values lie below it
        t.key_high[c] = s.largest[c][m];
        if (fi == 0) {
          value_low[c] = s.smallest[channels + c][m];
          value_high[c] = s.largest[channels + c][m];
        }
      }
    }
    // WKV smoothing from the first fraction's per-channel ranges: centre and half range.
    auto smoothing = [](const std::vector<float>& lo, const std::vector<float>& hi, std::vector<float>* shift,
                        std::vector<float>* scale) {
      shift->resize(lo.size());
      scale->resize(lo.size());
      for (size_t c = 0; c < lo.size(); ++c) {
        (*shift)[c] = 0.5f * (lo[c] + hi[c]);
        (*scale)[c] = std::max(0.5f * (hi[c] - lo[c]), 1e-6f);
      }
    };
    smoothing(lc.kvq[0].key_low, lc.kvq[0].key_high, &lc.key_shift, &lc.key_scale);
    smoothing(value_low, value_high, &lc.value_shift, &lc.value_scale);
    s.largest.clear();
    s.smallest.clear();
  }
  thresholds_done_ = true;
  return absl::OkStatus();
}

absl::Status CalibrationBuilder::ObserveSamples(int layer, int n_tokens, const float* k, const float* v,
                                                const float* k_weights, const float* v_weights) {
  if (!thresholds_done_) return absl::FailedPreconditionError("calibration samples before thresholds");
  if (layer < 0 || layer >= model_.n_layers) return absl::InvalidArgumentError("calibration layer out of range");
  LayerState& s = *state_[layer];
  const int d = model_.head_dim;
  const int64_t channels = Channels(model_);
  std::vector<int> outliers;
  std::vector<char> is_outlier(d);
  std::vector<float> row(d);
  for (size_t fi = 0; fi < calibration_.outlier_fractions.size(); ++fi) {
    const KvqLayerTables& t = calibration_.layers[layer].kvq[fi];
    WeightedHistogram& hk = s.histograms[fi][0];
    WeightedHistogram& hv = s.histograms[fi][1];
    KvSchemeConfig kvq;
    kvq.outlier_fraction = calibration_.outlier_fractions[fi];
    const int n_out = KvqValueOutliersPerToken(kvq, d);
    for (int tok = 0; tok < n_tokens; ++tok) {
      for (int64_t c = 0; c < channels; ++c) {
        const float x = RoundToHalf(k[tok * channels + c]);
        const float lo = t.key_low[c], hi = t.key_high[c];
        if (x < lo || x > hi || !(hi > lo)) continue;  // outliers are kept exactly, not coded
        hk.Add(2.0f * (x - lo) / (hi - lo) - 1.0f, k_weights ? k_weights[tok * channels + c] : 1.0f);
      }
      for (int h = 0; h < model_.n_kv_heads; ++h) {
        const int64_t off = tok * channels + static_cast<int64_t>(h) * d;
        for (int c = 0; c < d; ++c) row[c] = RoundToHalf(v[off + c]);
        float lo, hi;
        KvqValueThresholds(row.data(), d, n_out, &lo, &hi, &outliers);
        lo = HalfToFloat(FloatToHalf(lo));  // the store normalizes with fp16 thresholds
        hi = HalfToFloat(FloatToHalf(hi));
        if (!(hi > lo)) continue;
        std::fill(is_outlier.begin(), is_outlier.end(), 0);
        for (int o : outliers) is_outlier[o] = 1;
        for (int c = 0; c < d; ++c) {
          if (is_outlier[c]) continue;
          hv.Add(2.0f * (row[c] - lo) / (hi - lo) - 1.0f, v_weights ? v_weights[off + c] : 1.0f);
        }
      }
    }
  }
  s.sample_tokens += n_tokens;
  return absl::OkStatus();
}

absl::StatusOr<Calibration> CalibrationBuilder::Finish(std::string weighting) {
  if (!thresholds_done_) return absl::FailedPreconditionError("calibration thresholds were never finished");
  for (int l = 0; l < model_.n_layers; ++l) {
    LayerState& s = *state_[l];
    if (s.sample_tokens == 0) {
      return absl::FailedPreconditionError(absl::StrCat("calibration layer ", l, " got no codebook samples"));
    }
    for (size_t fi = 0; fi < calibration_.outlier_fractions.size(); ++fi) {
      KvqLayerTables& t = calibration_.layers[l].kvq[fi];
      t.key_codebooks.clear();
      t.value_codebooks.clear();
      for (int bits : calibration_.codebook_bits) {
        t.key_codebooks.push_back(WeightedKMeans1D(s.histograms[fi][0], 1 << bits));
        t.value_codebooks.push_back(WeightedKMeans1D(s.histograms[fi][1], 1 << bits));
      }
    }
  }
  calibration_.weighting = std::move(weighting);
  return calibration_;
}

}  // namespace kvshard
