#include "coordinator/quality.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/progress.h"
#include "common/status.h"
#include "kernels/sampling.h"
#include "kvstore/quantized_shard.h"
#include "worker/gpu_kv_windows.h"
#include "worker/gpu_perplexity.h"

namespace kvshard {
namespace {

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

KvShardFactory AllSchemesKvShardFactory(std::shared_ptr<const Calibration> calibration) {
  return [calibration](const std::string& scheme, const KvGeometry& geometry,
                       int64_t start) -> absl::StatusOr<std::unique_ptr<KvShard>> {
    if (scheme == "fp32") return MakeFullPrecisionKvShard(geometry, start, FullPrecision::kFp32);
    KV_ASSIGN_OR_RETURN(KvSchemeConfig config, ParseKvScheme(scheme));
    return MakeKvShard(config, geometry, start, calibration.get());
  };
}

ModelIdentity ModelIdentityOf(const ModelWeights& weights) {
  const ModelConfig& c = weights.config;
  ModelIdentity id;
  id.name = c.name;
  id.n_layers = c.n_layers;
  id.n_heads = c.n_heads;
  id.n_kv_heads = c.n_kv_heads;
  id.head_dim = c.head_dim;
  uint64_t h = kFnvOffsetBasis;
  if (!weights.layers.empty()) {
    const HostTensor& wk = weights.layers.front().wk;
    const HostTensor& wv = weights.layers.back().wv;
    h = Fnv1a64(wk.data.data(), wk.data.size() * sizeof(float), h);
    h = Fnv1a64(wv.data.data(), wv.data.size() * sizeof(float), h);
  }
  id.fingerprint = h;
  return id;
}

namespace {

// Whole windows of options.ctx tokens in the text (within options.max_tokens); refuses a window the
// model cannot hold or a text shorter than one window.
absl::StatusOr<int64_t> PerplexityWindows(const ModelConfig& model, size_t n_tokens, const PerplexityOptions& options) {
  if (options.ctx < 2) return absl::InvalidArgumentError("the perplexity window (--ctx) must be at least 2 tokens");
  if (model.max_context > 0 && options.ctx > model.max_context) {
    return absl::InvalidArgumentError(absl::StrCat("--ctx ", options.ctx, " exceeds the model's context of ",
                                                   model.max_context, " tokens"));
  }
  int64_t usable = static_cast<int64_t>(n_tokens);
  if (options.max_tokens > 0) usable = std::min(usable, options.max_tokens);
  const int64_t windows = usable / options.ctx;
  if (windows == 0) {
    return absl::InvalidArgumentError(absl::StrCat("the text has ", n_tokens, " tokens",
                                                   options.max_tokens > 0 ? " (within --max_eval_tokens)" : "",
                                                   ", shorter than one window of ", options.ctx, " tokens"));
  }
  return windows;
}

}  // namespace

absl::StatusOr<PerplexityResult> EvaluatePerplexity(CpuModel& model, std::span<const int32_t> tokens,
                                                    const KvSchemeConfig& scheme, const Calibration* calibration,
                                                    const PerplexityOptions& options) {
  KV_ASSIGN_OR_RETURN(const int64_t windows, PerplexityWindows(model.config(), tokens.size(), options));
  KvSchemeConfig config = scheme;
  config.exact_decode_view = true;
  const KvGeometry geometry = model.kv_geometry();
  KV_ASSIGN_OR_RETURN(std::unique_ptr<KvShard> shard, MakeKvShard(config, geometry, 0, calibration));

  const int vocab = model.config().vocab_size;
  const int64_t chunk = CpuModel::max_chunk();
  std::unique_ptr<ProgressLine> progress;
  if (options.show_progress) {
    progress = std::make_unique<ProgressLine>(absl::StrCat("perplexity ", config.name(), " ctx ", options.ctx),
                                              "tokens", windows * options.ctx);
  }
  const auto start = std::chrono::steady_clock::now();
  PerplexityResult result;
  double nll_sum = 0, bits_sum = 0;
  std::vector<float> logits;
  for (int64_t w = 0; w < windows; ++w) {
    shard->Clear();
    ShardAttentionContext context(*shard);
    const int32_t* window = tokens.data() + w * options.ctx;
    for (int64_t c0 = 0; c0 < options.ctx; c0 += chunk) {
      const int64_t n = std::min(chunk, options.ctx - c0);
      KV_RETURN_IF_ERROR(model.Forward(std::span<const int32_t>(window + c0, n), c0, context, true, logits));
      for (int64_t i = 0; i < n; ++i) {
        if (c0 + i + 1 >= options.ctx) break;  // the window's last token predicts nothing inside it
        nll_sum -= TargetLogProbabilityCpu(logits.data() + i * vocab, vocab, window[c0 + i + 1]);
        ++result.scored_tokens;
      }
      if (progress) progress->Update(w * options.ctx + c0 + n);
    }
    bits_sum += shard->Memory().bits_per_element();
  }
  if (progress) progress->Finish();
  result.windows = windows;
  result.mean_nll = nll_sum / static_cast<double>(result.scored_tokens);
  result.perplexity = std::exp(result.mean_nll);
  result.bits_per_element = bits_sum / static_cast<double>(windows);
  result.seconds = Seconds(start);
  return result;
}

absl::StatusOr<PerplexityResult> EvaluatePerplexityOnGpu(const ModelWeights& weights,
                                                         std::span<const int32_t> tokens,
                                                         const KvSchemeConfig& scheme, const Calibration* calibration,
                                                         const PerplexityOptions& options, int batch) {
  KV_ASSIGN_OR_RETURN(const int64_t windows, PerplexityWindows(weights.config, tokens.size(), options));
  const auto start = std::chrono::steady_clock::now();
  KV_ASSIGN_OR_RETURN(GpuWindowScores scores, ScoreWindowsOnGpu(weights, tokens, options.ctx, windows, scheme,
                                                                calibration, batch, options.show_progress));
  PerplexityResult result;
  result.windows = scores.windows;
  result.scored_tokens = scores.scored_tokens;
  result.mean_nll = scores.nll_sum / static_cast<double>(scores.scored_tokens);
  result.perplexity = std::exp(result.mean_nll);
  result.bits_per_element = scores.bits_sum / static_cast<double>(scores.windows);
  result.seconds = Seconds(start);
  return result;
}

absl::StatusOr<FisherWeights> LoadFisherWeights(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open Fisher weights file ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string bytes = ss.str();
  size_t at = 0;
  auto take = [&](void* dst, size_t n) {
    if (bytes.size() - at < n) return false;
    std::memcpy(dst, bytes.data() + at, n);
    at += n;
    return true;
  };
  auto corrupt = [&](const char* what) {
    return absl::DataLossError(absl::StrCat("Fisher weights file ", path, ": ", what));
  };
  char magic[8];
  uint32_t version = 0;
  int32_t n_layers = 0, channels = 0;
  int64_t n_tokens = 0, ctx = 0;
  if (!take(magic, 8) || std::memcmp(magic, "KVSHFSH\n", 8) != 0) return corrupt("bad magic");
  if (!take(&version, 4) || version != 1) return corrupt("unsupported version");
  if (!take(&n_layers, 4) || !take(&channels, 4) || !take(&n_tokens, 8) || !take(&ctx, 8)) {
    return corrupt("truncated header");
  }
  if (n_layers <= 0 || n_layers > 4096 || channels <= 0 || channels > (1 << 20) || n_tokens <= 0 || ctx <= 0) {
    return corrupt("header values out of range");
  }
  const size_t per_layer = static_cast<size_t>(n_tokens) * channels * sizeof(uint16_t) * 2;
  const size_t expected = 36 + static_cast<size_t>(n_tokens) * 4 + per_layer * n_layers;
  if (bytes.size() != expected) {
    return corrupt(absl::StrCat("size ", bytes.size(), " bytes, the header implies ", expected).c_str());
  }
  FisherWeights fw;
  fw.n_layers = n_layers;
  fw.channels = channels;
  fw.ctx = ctx;
  fw.tokens.resize(n_tokens);
  take(fw.tokens.data(), fw.tokens.size() * 4);
  fw.key.resize(n_layers);
  fw.value.resize(n_layers);
  for (int l = 0; l < n_layers; ++l) {
    fw.key[l].resize(static_cast<size_t>(n_tokens) * channels);
    fw.value[l].resize(static_cast<size_t>(n_tokens) * channels);
    take(fw.key[l].data(), fw.key[l].size() * 2);
    take(fw.value[l].data(), fw.value[l].size() * 2);
  }
  return fw;
}

namespace {

// Runs one window of calibration tokens from position 0, handing each layer's new K/V to the observer.
using CalibrationWindowRunner = absl::FunctionRef<absl::Status(std::span<const int32_t>, const KvObserver&)>;

// The calibration's windows: whole windows of options.ctx tokens of the text (within
// options.max_tokens), or of the Fisher weights' own tokens and window length (weights that match the
// model's KV channels).
struct CalibrationWindows {
  std::span<const int32_t> tokens;
  int64_t ctx = 0;
  int64_t count = 0;
};

absl::StatusOr<CalibrationWindows> PlanCalibrationWindows(const KvGeometry& geometry, std::span<const int32_t> tokens,
                                                          const CalibrateOptions& options) {
  CalibrationWindows plan{tokens, options.ctx, 0};
  if (const FisherWeights* fisher = options.fisher; fisher != nullptr) {
    if (fisher->n_layers != geometry.n_layers ||
        fisher->channels != static_cast<int64_t>(geometry.n_kv_heads) * geometry.head_dim) {
      return absl::FailedPreconditionError(absl::StrCat("the Fisher weights are for ", fisher->n_layers,
                                                        " layers of ", fisher->channels, " KV channels; this model has ",
                                                        geometry.n_layers, " of ",
                                                        geometry.n_kv_heads * geometry.head_dim));
    }
    plan.tokens = fisher->tokens;
    plan.ctx = options.fisher->ctx;  // the gradients were taken over windows of this length
  }
  if (plan.ctx < 1) return absl::InvalidArgumentError("calibration window must be at least 1 token");
  int64_t usable = static_cast<int64_t>(plan.tokens.size());
  if (options.max_tokens > 0) usable = std::min(usable, options.max_tokens);
  plan.count = usable / plan.ctx;
  if (plan.count == 0) {
    return absl::InvalidArgumentError(absl::StrCat("the calibration text has ", plan.tokens.size(),
                                                   " tokens, shorter than one window of ", plan.ctx, " tokens"));
  }
  return plan;
}

// Both passes of the calibration over the windows (thresholds, then k-means samples), the model run by
// `run_window` (the CPU or the GPU).
absl::StatusOr<Calibration> CalibrateOverWindows(const KvGeometry& geometry, const ModelIdentity& identity,
                                                 const CalibrationWindows& plan, const CalibrateOptions& options,
                                                 const char* device, CalibrationWindowRunner run_window) {
  const FisherWeights* fisher = options.fisher;
  const int64_t ctx = plan.ctx, windows = plan.count;
  const int64_t n_tokens = windows * ctx;
  CalibrationBuilder builder(identity, n_tokens, options.outlier_fractions, options.codebook_bits);
  const int64_t channels = static_cast<int64_t>(geometry.n_kv_heads) * geometry.head_dim;
  const int last_layer = geometry.n_layers - 1;

  absl::Status observer_status;
  int64_t window_first = 0;             // calibration-token index of the window being run
  std::vector<int64_t> layer_seen;      // tokens of this window each layer has handed over
  std::unique_ptr<ProgressLine> progress;
  std::vector<float> key_weights, value_weights;
  for (int pass = 0; pass < 2; ++pass) {
    const KvObserver observer = [&](int layer, int n, const float* k, const float* v) {
      if (!observer_status.ok()) return;
      // Chunks come in order, so a layer's count so far is the chunk's offset in the window.
      const int64_t chunk_first = window_first + layer_seen[layer];
      layer_seen[layer] += n;
      if (pass == 0) {
        observer_status = builder.ObserveThresholds(layer, n, k, v);
      } else {
        const float* kw = nullptr;
        const float* vw = nullptr;
        if (fisher != nullptr) {
          key_weights.resize(static_cast<size_t>(n) * channels);
          value_weights.resize(static_cast<size_t>(n) * channels);
          const size_t off = static_cast<size_t>(chunk_first) * channels;
          for (size_t i = 0; i < key_weights.size(); ++i) {
            key_weights[i] = Bf16ToFloat(fisher->key[layer][off + i]);
            value_weights[i] = Bf16ToFloat(fisher->value[layer][off + i]);
          }
          kw = key_weights.data();
          vw = value_weights.data();
        }
        observer_status = builder.ObserveSamples(layer, n, k, v, kw, vw);
      }
      if (progress && layer == last_layer) progress->Update(chunk_first + n);
    };
    if (options.show_progress) {
      progress = std::make_unique<ProgressLine>(
          absl::StrCat(pass == 0 ? "calibrate: thresholds" : "calibrate: codebook samples", " (", device, ")"),
          "tokens", n_tokens);
    }
    for (int64_t w = 0; w < windows; ++w) {
      window_first = w * ctx;
      layer_seen.assign(static_cast<size_t>(geometry.n_layers), 0);
      KV_RETURN_IF_ERROR(
          run_window(plan.tokens.subspan(static_cast<size_t>(window_first), static_cast<size_t>(ctx)), observer));
      KV_RETURN_IF_ERROR(observer_status);
    }
    if (progress) progress->Finish();
    if (pass == 0) KV_RETURN_IF_ERROR(builder.FinishThresholds());
  }
  return builder.Finish(fisher != nullptr ? "fisher" : "uniform");
}

}  // namespace

absl::StatusOr<Calibration> CalibrateKv(CpuModel& model, const ModelIdentity& identity,
                                        std::span<const int32_t> tokens, const CalibrateOptions& options) {
  const KvGeometry geometry = model.kv_geometry();
  KV_ASSIGN_OR_RETURN(const CalibrationWindows plan, PlanCalibrationWindows(geometry, tokens, options));
  std::vector<float> logits;
  auto run_window = [&](std::span<const int32_t> window, const KvObserver& observer) -> absl::Status {
    model.set_kv_observer(observer);
    std::unique_ptr<KvShard> shard = MakeFullPrecisionKvShard(geometry, 0, FullPrecision::kFp16);
    ShardAttentionContext context(*shard);
    absl::Status status;
    for (size_t c0 = 0; c0 < window.size() && status.ok(); c0 += CpuModel::max_chunk()) {
      const size_t n = std::min<size_t>(CpuModel::max_chunk(), window.size() - c0);
      status = model.Forward(window.subspan(c0, n), static_cast<int64_t>(c0), context, false, logits);
    }
    model.set_kv_observer(nullptr);
    return status;
  };
  return CalibrateOverWindows(geometry, identity, plan, options, "CPU", run_window);
}

absl::StatusOr<Calibration> CalibrateKvOnGpu(const ModelWeights& weights, const ModelIdentity& identity,
                                             std::span<const int32_t> tokens, const CalibrateOptions& options) {
  const KvGeometry geometry = KvGeometryOf(weights.config);
  KV_ASSIGN_OR_RETURN(const CalibrationWindows plan, PlanCalibrationWindows(geometry, tokens, options));
  KV_ASSIGN_OR_RETURN(std::unique_ptr<GpuKvWindows> gpu, MakeGpuKvWindows(weights, plan.ctx));
  auto run_window = [&](std::span<const int32_t> window, const KvObserver& observer) {
    return gpu->Run(window, observer);
  };
  return CalibrateOverWindows(geometry, identity, plan, options, "GPU", run_window);
}

}  // namespace kvshard
