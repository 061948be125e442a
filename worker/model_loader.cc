#include "worker/model_loader.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "worker/dequantize.h"
#include "worker/safetensors.h"

namespace kvshard {
namespace {

// Prefixes `path` to an error unless the message names it already (errors from the file readers do).
absl::Status WithPath(const absl::Status& status, const std::string& path) {
  if (status.ok() || absl::StrContains(status.message(), path)) return status;
  return Annotate(status, path);
}

std::string ShapeString(const std::vector<int64_t>& shape) { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

// Checks the geometry both loaders rely on; `source` names the file the numbers came from.
absl::Status ValidateConfig(const ModelConfig& c, std::string_view source) {
  auto bad = [&](std::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(ToAbsl(source), ": ", ToAbsl(what)));
  };
  if (c.n_layers <= 0) return bad(absl::StrCat("layer count ", c.n_layers, " must be positive"));
  if (c.hidden <= 0) return bad(absl::StrCat("hidden size ", c.hidden, " must be positive"));
  if (c.n_heads <= 0 || c.n_kv_heads <= 0) {
    return bad(absl::StrCat("head counts ", c.n_heads, " / ", c.n_kv_heads, " (query / KV) must be positive"));
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return bad(absl::StrCat(c.n_heads, " query heads are not a multiple of ", c.n_kv_heads, " KV heads"));
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) {
    return bad(absl::StrCat("head_dim ", c.head_dim, " must be positive and even"));
  }
  if (c.ffn_hidden <= 0) return bad(absl::StrCat("feed-forward size ", c.ffn_hidden, " must be positive"));
  if (c.vocab_size <= 0) return bad(absl::StrCat("vocabulary size ", c.vocab_size, " must be positive"));
  if (c.max_context <= 0) return bad(absl::StrCat("context length ", c.max_context, " must be positive"));
  if (!(c.rope_theta > 0.0f)) return bad(absl::StrCat("rope theta ", c.rope_theta, " must be positive"));
  if (!(c.norm_eps > 0.0f)) return bad(absl::StrCat("norm epsilon ", c.norm_eps, " must be positive"));
  if (c.rope_scaling.type != RopeScalingType::kNone && !(c.rope_scaling.factor > 0.0f)) {
    return bad(absl::StrCat("rope scaling factor ", c.rope_scaling.factor, " must be positive"));
  }
  if (c.rope_scaling.type == RopeScalingType::kLlama3 &&
      !(c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor && c.rope_scaling.low_freq_factor > 0 &&
        c.rope_scaling.original_max_position > 0)) {
    return bad("llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and a positive original context");
  }
  return absl::OkStatus();
}

absl::StatusOr<int> ToInt(int64_t value, std::string_view key, std::string_view source) {
  if (value < 0 || value > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat(ToAbsl(source), ": '", ToAbsl(key), "' = ", value, " is out of range"));
  }
  return static_cast<int>(value);
}

// ---------------------------------------------------------------------------------------------------------
// Weight assembly, shared by both formats.

// Where each weight lives in a format, and how to read one as fp32 in Hugging Face layout.
struct WeightSource {
  std::string embedding, output_norm, output;
  std::string layer_prefix;  // followed by the layer index and a dot
  std::string attn_norm, wq, wk, wv, wo, bq, bk, bv, ffn_norm, w_gate, w_up, w_down;
  // The tensor's shape (outermost first) without reading its data; an error when it is missing or its
  // type cannot be read. Called before any data is read, so bad files fail fast.
  std::function<absl::StatusOr<std::vector<int64_t>>(const std::string& name)> describe;
  // The tensor as fp32. Called concurrently from several threads.
  std::function<absl::StatusOr<HostTensor>(const std::string& name)> read;
  // llama-architecture GGUF: Q/K rows are interleaved for adjacent-pair RoPE and must be put back.
  bool unpermute_qk = false;
};

// Inverts llama.cpp's convert-time permutation of Q/K rows (and biases) of one projection with `n_heads`
// heads: the row at h*head_dim + 2*i + s of the file belongs at h*head_dim + s*head_dim/2 + i (s = 0, 1),
// i.e. back to the "rotate_half" pairing of channel i with channel i + head_dim/2.
void UnpermuteRows(HostTensor& t, int n_heads) {
  const int64_t rows = t.shape[0];
  const int64_t row_length = t.shape.size() > 1 ? t.numel() / rows : 1;
  const int64_t head_dim = rows / n_heads;
  const int64_t half = head_dim / 2;
  std::vector<float> head(static_cast<size_t>(head_dim * row_length));
  for (int h = 0; h < n_heads; ++h) {
    float* base = t.data.data() + h * head_dim * row_length;
    std::copy(base, base + head_dim * row_length, head.begin());
    for (int64_t i = 0; i < half; ++i) {
      for (int s = 0; s < 2; ++s) {
        const float* from = head.data() + (2 * i + s) * row_length;
        std::copy(from, from + row_length, base + (s * half + i) * row_length);
      }
    }
  }
}

struct WeightJob {
  std::string name;
  std::vector<int64_t> shape;  // what the config implies
  HostTensor* destination;
  int unpermute_heads = 0;     // > 0: undo llama.cpp's Q/K row permutation over this many heads
};

absl::StatusOr<ModelWeights> AssembleWeights(const ModelConfig& config, const WeightSource& source) {
  const int64_t hidden = config.hidden, q_dim = int64_t{config.n_heads} * config.head_dim,
                kv_dim = int64_t{config.n_kv_heads} * config.head_dim, ffn = config.ffn_hidden,
                vocab = config.vocab_size;
  const int q_heads = source.unpermute_qk ? config.n_heads : 0;
  const int k_heads = source.unpermute_qk ? config.n_kv_heads : 0;
  ModelWeights w;
  w.config = config;
  w.layers.resize(config.n_layers);
  std::vector<WeightJob> jobs;
  jobs.push_back({source.embedding, {vocab, hidden}, &w.token_embedding});
  for (int l = 0; l < config.n_layers; ++l) {
    const std::string p = absl::StrCat(source.layer_prefix, l, ".");
    LayerWeights& L = w.layers[l];
    jobs.push_back({p + source.attn_norm, {hidden}, &L.attn_norm});
    jobs.push_back({p + source.wq, {q_dim, hidden}, &L.wq, q_heads});
    jobs.push_back({p + source.wk, {kv_dim, hidden}, &L.wk, k_heads});
    jobs.push_back({p + source.wv, {kv_dim, hidden}, &L.wv});
    jobs.push_back({p + source.wo, {hidden, q_dim}, &L.wo});
    if (config.qkv_bias) {
      jobs.push_back({p + source.bq, {q_dim}, &L.bq, q_heads});
      jobs.push_back({p + source.bk, {kv_dim}, &L.bk, k_heads});
      jobs.push_back({p + source.bv, {kv_dim}, &L.bv});
    }
    jobs.push_back({p + source.ffn_norm, {hidden}, &L.ffn_norm});
    jobs.push_back({p + source.w_gate, {ffn, hidden}, &L.w_gate});
    jobs.push_back({p + source.w_up, {ffn, hidden}, &L.w_up});
    jobs.push_back({p + source.w_down, {hidden, ffn}, &L.w_down});
  }
  jobs.push_back({source.output_norm, {hidden}, &w.output_norm});
  if (!config.tied_embeddings) jobs.push_back({source.output, {vocab, hidden}, &w.output});

  // Names, types and shapes first: cheap, and their errors come before any data is read.
  for (const WeightJob& job : jobs) {
    KV_ASSIGN_OR_RETURN(const std::vector<int64_t> shape, source.describe(job.name));
    if (shape != job.shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", job.name, "' has shape ", ShapeString(shape),
                                                     ", expected ", ShapeString(job.shape), " from the config"));
    }
  }

  // One parallel loop over whole tensors, largest first, rather than a parallel loop inside each: a
  // few hundred short parallel regions cost far more than the work on a machine whose cores are busy
  // (threads spin at every barrier while a descheduled one finishes).
  std::vector<size_t> order(jobs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto numel = [](const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return numel(jobs[a].shape) > numel(jobs[b].shape); });
  std::vector<absl::Status> statuses(jobs.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t k = 0; k < order.size(); ++k) {
    const size_t j = order[k];
    absl::StatusOr<HostTensor> t = source.read(jobs[j].name);
    if (!t.ok()) {
      statuses[j] = t.status();
      continue;
    }
    *jobs[j].destination = *std::move(t);
    if (jobs[j].unpermute_heads > 0) UnpermuteRows(*jobs[j].destination, jobs[j].unpermute_heads);
  }
  for (const absl::Status& status : statuses) KV_RETURN_IF_ERROR(status);
  return w;
}

// ---------------------------------------------------------------------------------------------------------
// GGUF

constexpr const char* kSupportedArchitectures = "llama, qwen2";

// llama.cpp's converter stores llama3-style RoPE scaling as a tensor of per-frequency divisors
// (rope_freqs.weight) rather than as parameters. Recovers parameters that reproduce it: factor is the
// largest divisor; low/high_freq_factor follow from the divisors strictly between 1 and factor, where
// 1/divisor is linear in 1/wavelength. original_max_position only rescales the other two, so any value
// (the file's, else 8192) reproduces the same frequencies. Verified by recomputing every divisor.
absl::StatusOr<RopeScaling> Llama3ScalingFromFactors(const std::vector<float>& divisors, int head_dim, float theta,
                                                     int64_t original_max, std::string_view source) {
  auto fail = [&](std::string_view why) {
    return absl::UnimplementedError(absl::StrCat(ToAbsl(source), ": rope_freqs.weight ", ToAbsl(why)));
  };
  const int half = head_dim / 2;
  if (static_cast<int>(divisors.size()) != half) {
    return fail(absl::StrCat("has ", divisors.size(), " values, expected head_dim/2 = ", half));
  }
  if (original_max <= 0) return fail(absl::StrCat("comes with an original context of ", original_max));
  const std::vector<float> inv_freq = RopeInverseFrequencies(RopeParams{head_dim, theta, {}});
  const double factor = *std::max_element(divisors.begin(), divisors.end());
  RopeScaling scaling;
  if (std::abs(factor - 1.0) < 1e-6) return scaling;  // all ones: no scaling
  constexpr double kTol = 1e-4;
  // x = original_max / wavelength; in the smooth band 1/divisor = (1 - s)/factor + s with s linear in x.
  std::vector<std::pair<double, double>> band;  // (x, s)
  int last_one = -1, first_full = half;
  for (int i = 0; i < half; ++i) {
    const double x = original_max / (2.0 * M_PI / inv_freq[i]);
    const double d = divisors[i];
    if (std::abs(d - 1.0) <= kTol) {
      last_one = i;
    } else if (std::abs(d - factor) <= kTol * factor) {
      first_full = std::min(first_full, i);
    } else {
      band.emplace_back(x, (1.0 / d - 1.0 / factor) / (1.0 - 1.0 / factor));
    }
  }
  if (last_one < 0 && band.empty()) {  // every frequency divided by the same factor: linear scaling
    scaling.type = RopeScalingType::kLinear;
    scaling.factor = static_cast<float>(factor);
    return scaling;
  }
  auto x_of = [&](int i) { return original_max / (2.0 * M_PI / inv_freq[std::clamp(i, 0, half - 1)]); };
  double low = 0, high = 0;  // low_freq_factor, high_freq_factor: s = (x - low) / (high - low)
  if (band.size() >= 2) {    // least-squares line s = a x + b
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (auto [x, s] : band) sx += x, sy += s, sxx += x * x, sxy += x * s;
    const double n = static_cast<double>(band.size());
    const double a = (n * sxy - sx * sy) / (n * sxx - sx * sx);
    const double b = (sy - a * sx) / n;
    if (!(a > 0)) return fail("is not llama3-style scaling (divisors do not fall with wavelength)");
    high = (1.0 - b) / a;
    low = -b / a;
  } else {
    // Too few points in the band to fit: put the band edges between neighbouring frequencies (x falls
    // as i grows) and, with one point in the band, solve for the low edge through it.
    const double x_one = x_of(last_one), x_full = x_of(first_full);
    if (band.empty()) {
      high = x_full + (x_one - x_full) * 2.0 / 3.0;
      low = x_full + (x_one - x_full) / 3.0;
    } else {
      const auto [x, s] = band[0];
      high = std::sqrt(x_one * x);
      low = (x - s * high) / (1.0 - s);
    }
  }
  scaling.type = RopeScalingType::kLlama3;
  scaling.factor = static_cast<float>(factor);
  scaling.low_freq_factor = static_cast<float>(low);
  scaling.high_freq_factor = static_cast<float>(high);
  scaling.original_max_position = original_max;
  const std::vector<float> scaled = RopeInverseFrequencies(RopeParams{head_dim, theta, scaling});
  for (int i = 0; i < half; ++i) {
    const double d = inv_freq[i] / scaled[i];
    if (!(std::abs(d - divisors[i]) <= 1e-3 * divisors[i])) {
      return fail(absl::StrCat("is not llama3-style scaling: divisor ", i, " is ", divisors[i],
                               ", the best llama3 fit gives ", d));
    }
  }
  return scaling;
}

// A missing required key is a malformed model file (InvalidArgument), not a missing resource.
absl::Status RequireKey(const GgufFile& file, const std::string& key) {
  if (file.Has(key)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(file.path(), ": required metadata key '", key, "' is missing"));
}

std::string GgufModelName(const GgufFile& file) {
  if (auto name = file.GetString("general.name"); name.ok() && !name->empty()) return *name;
  return std::filesystem::path(file.path()).stem().string();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& file) {
  const std::string& path = file.path();
  KV_RETURN_IF_ERROR(RequireKey(file, "general.architecture"));
  KV_ASSIGN_OR_RETURN(const std::string arch, file.GetString("general.architecture"));
  if (arch != "llama" && arch != "qwen2") {
    return absl::UnimplementedError(absl::StrCat(path, ": model architecture '", arch,
                                                 "' is not supported (supported: ", kSupportedArchitectures, ")"));
  }
  const std::string k = arch + ".";
  auto required_int = [&](const std::string& key) -> absl::StatusOr<int> {
    KV_RETURN_IF_ERROR(RequireKey(file, key));
    KV_ASSIGN_OR_RETURN(const int64_t v, file.GetInt(key));
    return ToInt(v, key, path);
  };
  ModelConfig c;
  c.architecture = arch;
  c.name = GgufModelName(file);
  KV_ASSIGN_OR_RETURN(c.n_layers, required_int(k + "block_count"));
  KV_ASSIGN_OR_RETURN(c.hidden, required_int(k + "embedding_length"));
  KV_ASSIGN_OR_RETURN(c.n_heads, required_int(k + "attention.head_count"));
  c.n_kv_heads = c.n_heads;  // llama.cpp's default when the key is absent: no GQA
  if (file.Has(k + "attention.head_count_kv")) {
    KV_ASSIGN_OR_RETURN(c.n_kv_heads, required_int(k + "attention.head_count_kv"));
  }
  KV_ASSIGN_OR_RETURN(c.ffn_hidden, required_int(k + "feed_forward_length"));
  KV_RETURN_IF_ERROR(RequireKey(file, k + "context_length"));
  KV_ASSIGN_OR_RETURN(c.max_context, file.GetInt(k + "context_length"));
  if (file.Has(k + "attention.key_length")) {
    KV_ASSIGN_OR_RETURN(c.head_dim, required_int(k + "attention.key_length"));
  } else {
    if (c.n_heads <= 0 || c.hidden % c.n_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": hidden size ", c.hidden, " is not a multiple of ",
                                                     c.n_heads, " heads and ", k, "attention.key_length is absent"));
    }
    c.head_dim = c.hidden / c.n_heads;
  }
  if (file.Has(k + "attention.value_length")) {
    KV_ASSIGN_OR_RETURN(const int value_length, required_int(k + "attention.value_length"));
    if (value_length != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat(path, ": value head size ", value_length,
                                                   " differs from key head size ", c.head_dim));
    }
  }
  if (file.Has(k + "rope.dimension_count")) {
    KV_ASSIGN_OR_RETURN(const int rope_dims, required_int(k + "rope.dimension_count"));
    if (rope_dims != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat(path, ": partial rotary embedding (", k, "rope.dimension_count ",
                                                   rope_dims, " < head_dim ", c.head_dim, ") is not supported"));
    }
  }
  if (file.Has(k + "rope.freq_base")) {
    KV_ASSIGN_OR_RETURN(const double theta, file.GetFloat(k + "rope.freq_base"));
    c.rope_theta = static_cast<float>(theta);
  }
  KV_RETURN_IF_ERROR(RequireKey(file, k + "attention.layer_norm_rms_epsilon"));
  KV_ASSIGN_OR_RETURN(const double eps, file.GetFloat(k + "attention.layer_norm_rms_epsilon"));
  c.norm_eps = static_cast<float>(eps);

  // RoPE scaling: linear through metadata; llama3-style through the rope_freqs tensor.
  std::string scaling_type = "none";
  if (file.Has(k + "rope.scaling.type")) {
    KV_ASSIGN_OR_RETURN(scaling_type, file.GetString(k + "rope.scaling.type"));
  } else if (file.Has(k + "rope.scale_linear")) {  // the older key
    scaling_type = "linear";
  }
  if (scaling_type == "linear") {
    const std::string factor_key = file.Has(k + "rope.scaling.factor") ? k + "rope.scaling.factor" : k + "rope.scale_linear";
    KV_ASSIGN_OR_RETURN(const double factor, file.GetFloat(factor_key));
    c.rope_scaling.type = RopeScalingType::kLinear;
    c.rope_scaling.factor = static_cast<float>(factor);
  } else if (scaling_type != "none") {
    return absl::UnimplementedError(absl::StrCat(path, ": rope scaling type '", scaling_type,
                                                 "' is not supported (supported: none, linear, llama3)"));
  }
  if (const GgufTensorInfo* freqs = file.FindTensor("rope_freqs.weight")) {
    if (c.rope_scaling.type != RopeScalingType::kNone) {
      return absl::UnimplementedError(absl::StrCat(path, ": both ", scaling_type, " rope scaling and rope_freqs.weight"));
    }
    KV_ASSIGN_OR_RETURN(const HostTensor divisors, DequantizeTensor(file, *freqs));
    int64_t original_max = 8192;
    if (file.Has(k + "rope.scaling.original_context_length")) {
      KV_ASSIGN_OR_RETURN(original_max, file.GetInt(k + "rope.scaling.original_context_length"));
    }
    KV_ASSIGN_OR_RETURN(c.rope_scaling,
                        Llama3ScalingFromFactors(divisors.data, c.head_dim, c.rope_theta, original_max, path));
  }

  // Vocabulary: the embedding's rows (the token list may be shorter when the embedding is padded).
  if (const GgufTensorInfo* embd = file.FindTensor("token_embd.weight"); embd != nullptr && embd->ne.size() == 2) {
    KV_ASSIGN_OR_RETURN(c.vocab_size, ToInt(embd->ne[1], "token_embd.weight rows", path));
  } else if (file.Has("tokenizer.ggml.tokens")) {
    KV_ASSIGN_OR_RETURN(const std::vector<std::string> tokens, file.GetStringArray("tokenizer.ggml.tokens"));
    c.vocab_size = static_cast<int>(tokens.size());
  } else {
    KV_ASSIGN_OR_RETURN(c.vocab_size, required_int(k + "vocab_size"));
  }
  c.tied_embeddings = file.FindTensor("output.weight") == nullptr;
  c.qkv_bias = file.FindTensor("blk.0.attn_q.bias") != nullptr;
  if (file.FindTensor("blk.0.attn_output.bias") != nullptr) {
    return absl::UnimplementedError(absl::StrCat(path, ": attention output bias (blk.0.attn_output.bias) is not supported"));
  }
  KV_RETURN_IF_ERROR(ValidateConfig(c, path));
  return c;
}

absl::StatusOr<ModelWeights> LoadGgufModel(const GgufFile& file) {
  KV_ASSIGN_OR_RETURN(const ModelConfig config, ModelConfigFromGguf(file));
  WeightSource source{
      .embedding = "token_embd.weight", .output_norm = "output_norm.weight", .output = "output.weight",
      .layer_prefix = "blk.", .attn_norm = "attn_norm.weight", .wq = "attn_q.weight", .wk = "attn_k.weight",
      .wv = "attn_v.weight", .wo = "attn_output.weight", .bq = "attn_q.bias", .bk = "attn_k.bias",
      .bv = "attn_v.bias", .ffn_norm = "ffn_norm.weight", .w_gate = "ffn_gate.weight", .w_up = "ffn_up.weight",
      .w_down = "ffn_down.weight",
      .describe = [&](const std::string& name) -> absl::StatusOr<std::vector<int64_t>> {
        const GgufTensorInfo* info = file.FindTensor(name);
        if (info == nullptr) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is missing"));
        KV_RETURN_IF_ERROR(CheckDequantizable(file, *info));
        return std::vector<int64_t>(info->ne.rbegin(), info->ne.rend());
      },
      .read = [&](const std::string& name) { return DequantizeTensor(file, *file.FindTensor(name)); },
      // llama.cpp permutes Q/K for the llama architecture only (qwen2 is converted as is).
      .unpermute_qk = config.architecture == "llama",
  };
  absl::StatusOr<ModelWeights> weights = AssembleWeights(config, source);
  if (!weights.ok()) return WithPath(weights.status(), file.path());
  return weights;
}

// ---------------------------------------------------------------------------------------------------------
// Hugging Face directory

namespace {

// Typed access to config.json fields, with errors that name the field.
class JsonFields {
 public:
  // `prefix` names the enclosing object in messages ("rope_scaling.").
  explicit JsonFields(const nlohmann::json& j, std::string prefix = "") : j_(j), prefix_(std::move(prefix)) {}

  bool Has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

  absl::StatusOr<int64_t> Int(const std::string& key) const {
    if (!Has(key)) return Missing(key);
    if (!j_[key].is_number_integer()) return Wrong(key, "an integer");
    return j_[key].get<int64_t>();
  }
  absl::StatusOr<int> SmallInt(const std::string& key) const {
    KV_ASSIGN_OR_RETURN(const int64_t v, Int(key));
    return ToInt(v, key, "config.json");
  }
  absl::StatusOr<double> Float(const std::string& key) const {
    if (!Has(key)) return Missing(key);
    if (!j_[key].is_number()) return Wrong(key, "a number");
    return j_[key].get<double>();
  }
  absl::StatusOr<bool> Bool(const std::string& key) const {
    if (!Has(key)) return Missing(key);
    if (!j_[key].is_boolean()) return Wrong(key, "true or false");
    return j_[key].get<bool>();
  }
  absl::StatusOr<std::string> String(const std::string& key) const {
    if (!Has(key)) return Missing(key);
    if (!j_[key].is_string()) return Wrong(key, "a string");
    return j_[key].get<std::string>();
  }

 private:
  absl::Status Missing(const std::string& key) const {
    return absl::InvalidArgumentError(absl::StrCat("config.json: required field '", prefix_, key, "' is missing"));
  }
  absl::Status Wrong(const std::string& key, std::string_view expected) const {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: field '", prefix_, key, "' must be ", ToAbsl(expected), ", got ", j_[key].dump()));
  }

  const nlohmann::json& j_;
  std::string prefix_;
};

absl::StatusOr<RopeScaling> RopeScalingFromJson(const nlohmann::json& j, const std::string& field) {
  RopeScaling scaling;
  JsonFields f(j, field + ".");
  std::string type = "default";
  if (f.Has("rope_type")) {
    KV_ASSIGN_OR_RETURN(type, f.String("rope_type"));
  } else if (f.Has("type")) {
    KV_ASSIGN_OR_RETURN(type, f.String("type"));
  }
  if (type == "default") return scaling;
  if (type == "linear") {
    scaling.type = RopeScalingType::kLinear;
    KV_ASSIGN_OR_RETURN(const double factor, f.Float("factor"));
    scaling.factor = static_cast<float>(factor);
    return scaling;
  }
  if (type == "llama3") {
    scaling.type = RopeScalingType::kLlama3;
    KV_ASSIGN_OR_RETURN(const double factor, f.Float("factor"));
    KV_ASSIGN_OR_RETURN(const double low, f.Float("low_freq_factor"));
    KV_ASSIGN_OR_RETURN(const double high, f.Float("high_freq_factor"));
    KV_ASSIGN_OR_RETURN(scaling.original_max_position, f.Int("original_max_position_embeddings"));
    scaling.factor = static_cast<float>(factor);
    scaling.low_freq_factor = static_cast<float>(low);
    scaling.high_freq_factor = static_cast<float>(high);
    return scaling;
  }
  return absl::UnimplementedError(absl::StrCat("config.json: ", field, " type '", type,
                                               "' is not supported (supported: default, linear, llama3)"));
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read file"));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::StatusOr<nlohmann::json> ParseJsonFile(const std::string& path) {
  KV_ASSIGN_OR_RETURN(const std::string text, ReadTextFile(path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return j;
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromHfJson(const std::string& config_json_text) {
  const nlohmann::json j = nlohmann::json::parse(config_json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("config.json: not a JSON object");
  JsonFields f(j);
  ModelConfig c;
  KV_ASSIGN_OR_RETURN(const std::string model_type, f.String("model_type"));
  if (model_type == "llama" || model_type == "mistral") {
    c.architecture = "llama";
  } else if (model_type == "qwen2") {
    c.architecture = "qwen2";
  } else {
    return absl::UnimplementedError(absl::StrCat("config.json: model_type '", model_type,
                                                 "' is not supported (supported: llama, mistral, qwen2)"));
  }
  KV_ASSIGN_OR_RETURN(c.hidden, f.SmallInt("hidden_size"));
  KV_ASSIGN_OR_RETURN(c.n_layers, f.SmallInt("num_hidden_layers"));
  KV_ASSIGN_OR_RETURN(c.n_heads, f.SmallInt("num_attention_heads"));
  c.n_kv_heads = c.n_heads;
  if (f.Has("num_key_value_heads")) {
    KV_ASSIGN_OR_RETURN(c.n_kv_heads, f.SmallInt("num_key_value_heads"));
  }
  if (f.Has("head_dim")) {
    KV_ASSIGN_OR_RETURN(c.head_dim, f.SmallInt("head_dim"));
  } else {
    if (c.n_heads <= 0 || c.hidden % c.n_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: hidden_size ", c.hidden,
                                                     " is not a multiple of num_attention_heads ", c.n_heads));
    }
    c.head_dim = c.hidden / c.n_heads;
  }
  KV_ASSIGN_OR_RETURN(c.ffn_hidden, f.SmallInt("intermediate_size"));
  KV_ASSIGN_OR_RETURN(c.vocab_size, f.SmallInt("vocab_size"));
  KV_ASSIGN_OR_RETURN(c.max_context, f.Int("max_position_embeddings"));
  c.norm_eps = 1e-6f;  // transformers' default for llama, mistral and qwen2
  if (f.Has("rms_norm_eps")) {
    KV_ASSIGN_OR_RETURN(const double eps, f.Float("rms_norm_eps"));
    c.norm_eps = static_cast<float>(eps);
  }
  // transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; older configs rope_theta and
  // rope_scaling at the top level.
  const bool has_parameters = f.Has("rope_parameters") && j["rope_parameters"].is_object();
  if (f.Has("rope_theta")) {
    KV_ASSIGN_OR_RETURN(const double theta, f.Float("rope_theta"));
    c.rope_theta = static_cast<float>(theta);
  } else if (has_parameters && JsonFields(j["rope_parameters"]).Has("rope_theta")) {
    JsonFields p(j["rope_parameters"], "rope_parameters.");
    KV_ASSIGN_OR_RETURN(const double theta, p.Float("rope_theta"));
    c.rope_theta = static_cast<float>(theta);
  }
  if (f.Has("rope_scaling")) {
    if (!j["rope_scaling"].is_object()) return absl::InvalidArgumentError("config.json: rope_scaling must be an object");
    KV_ASSIGN_OR_RETURN(c.rope_scaling, RopeScalingFromJson(j["rope_scaling"], "rope_scaling"));
  } else if (has_parameters) {
    KV_ASSIGN_OR_RETURN(c.rope_scaling, RopeScalingFromJson(j["rope_parameters"], "rope_parameters"));
  }
  if (f.Has("tie_word_embeddings")) {
    KV_ASSIGN_OR_RETURN(c.tied_embeddings, f.Bool("tie_word_embeddings"));
  }
  c.qkv_bias = c.architecture == "qwen2";  // Qwen2 always has Q/K/V biases; llama only with attention_bias
  if (c.architecture == "llama" && f.Has("attention_bias")) {
    KV_ASSIGN_OR_RETURN(const bool attention_bias, f.Bool("attention_bias"));
    if (attention_bias) {
      return absl::UnimplementedError("config.json: attention_bias (which adds an o_proj bias) is not supported");
    }
  }
  if (f.Has("mlp_bias")) {
    KV_ASSIGN_OR_RETURN(const bool mlp_bias, f.Bool("mlp_bias"));
    if (mlp_bias) return absl::UnimplementedError("config.json: mlp_bias is not supported");
  }
  if (f.Has("hidden_act")) {
    KV_ASSIGN_OR_RETURN(const std::string act, f.String("hidden_act"));
    if (act != "silu") return absl::UnimplementedError(absl::StrCat("config.json: hidden_act '", act, "' is not supported (silu)"));
  }
  KV_RETURN_IF_ERROR(ValidateConfig(c, "config.json"));
  return c;
}

absl::StatusOr<ModelWeights> LoadHfModel(const std::string& directory) {
  namespace fs = std::filesystem;
  const fs::path dir(directory);
  const fs::path config_path = dir / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config_path, ec)) {
    return absl::NotFoundError(absl::StrCat(directory, ": config.json is missing (expected a Hugging Face model directory)"));
  }
  KV_ASSIGN_OR_RETURN(const std::string config_text, ReadTextFile(config_path.string()));
  absl::StatusOr<ModelConfig> config = ModelConfigFromHfJson(config_text);
  if (!config.ok()) return WithPath(config.status(), directory);
  config->name = dir.filename().empty() ? dir.parent_path().filename().string() : dir.filename().string();

  // Shards: those the index names, else every *.safetensors file of the directory.
  std::vector<std::string> shard_names;
  const fs::path index_path = dir / "model.safetensors.index.json";
  if (fs::exists(index_path, ec)) {
    KV_ASSIGN_OR_RETURN(const nlohmann::json index, ParseJsonFile(index_path.string()));
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": needs a \"weight_map\" object"));
    }
    for (const auto& [tensor, shard] : index["weight_map"].items()) {
      if (!shard.is_string() || shard.get<std::string>().find('/') != std::string::npos ||
          shard.get<std::string>().empty() || shard.get<std::string>()[0] == '.') {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": tensor '", tensor,
                                                       "' maps to a bad file name ", shard.dump()));
      }
      shard_names.push_back(shard.get<std::string>());
    }
  } else {
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (entry.path().extension() == ".safetensors") shard_names.push_back(entry.path().filename().string());
    }
  }
  std::sort(shard_names.begin(), shard_names.end());
  shard_names.erase(std::unique(shard_names.begin(), shard_names.end()), shard_names.end());
  if (shard_names.empty()) return absl::NotFoundError(absl::StrCat(directory, ": no *.safetensors files"));

  std::vector<std::unique_ptr<SafetensorsFile>> shards;
  std::map<std::string, std::pair<const SafetensorsFile*, const SafetensorsTensor*>> tensors;
  for (const std::string& name : shard_names) {
    KV_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> shard, SafetensorsFile::Open((dir / name).string()));
    for (const auto& [tensor_name, tensor] : shard->tensors()) {
      if (!tensors.emplace(tensor_name, std::make_pair(shard.get(), &tensor)).second) {
        return absl::InvalidArgumentError(absl::StrCat(directory, ": tensor '", tensor_name,
                                                       "' appears in more than one safetensors file"));
      }
    }
    shards.push_back(std::move(shard));
  }

  WeightSource source{
      .embedding = "model.embed_tokens.weight", .output_norm = "model.norm.weight", .output = "lm_head.weight",
      .layer_prefix = "model.layers.", .attn_norm = "input_layernorm.weight", .wq = "self_attn.q_proj.weight",
      .wk = "self_attn.k_proj.weight", .wv = "self_attn.v_proj.weight", .wo = "self_attn.o_proj.weight",
      .bq = "self_attn.q_proj.bias", .bk = "self_attn.k_proj.bias", .bv = "self_attn.v_proj.bias",
      .ffn_norm = "post_attention_layernorm.weight", .w_gate = "mlp.gate_proj.weight", .w_up = "mlp.up_proj.weight",
      .w_down = "mlp.down_proj.weight",
      .describe = [&](const std::string& name) -> absl::StatusOr<std::vector<int64_t>> {
        auto it = tensors.find(name);
        if (it == tensors.end()) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is missing"));
        const auto& [shard, tensor] = it->second;
        KV_RETURN_IF_ERROR(shard->CheckFloat(*tensor));
        return tensor->shape;
      },
      .read = [&](const std::string& name) {
        const auto& [shard, tensor] = tensors.at(name);
        return shard->ToFloat(*tensor);
      },
      .unpermute_qk = false,
  };
  absl::StatusOr<ModelWeights> weights = AssembleWeights(*config, source);
  if (!weights.ok()) return WithPath(weights.status(), directory);
  return weights;
}

absl::StatusOr<ModelWeights> LoadModel(const std::string& path) {
  std::error_code ec;
  const std::filesystem::file_status status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) {
    return absl::NotFoundError(absl::StrCat("model path ", path, " does not exist"));
  }
  if (std::filesystem::is_directory(status)) return LoadHfModel(path);
  KV_ASSIGN_OR_RETURN(const std::unique_ptr<GgufFile> file, GgufFile::Open(path));
  return LoadGgufModel(*file);
}

}  // namespace kvshard
