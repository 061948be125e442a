// `kvshard calibrate` and `kvshard perplexity`: KV-cache calibration and quality on real text.
#include <cstdio>
#include <memory>
#include <optional>
#include <utility>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/config.h"
#include "common/status.h"
#include "coordinator/byte_tokenizer.h"
#include "coordinator/commands.h"
#include "coordinator/engine_factory.h"
#include "coordinator/quality.h"
#include "coordinator/single_process_engine.h"
#include "nlohmann/json.hpp"
#include "worker/forward.h"
#include "worker/synthetic.h"

ABSL_DECLARE_FLAG(std::string, kv_scheme);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_FLAG(std::string, text, "", "calibrate, perplexity: the text file");
ABSL_FLAG(std::string, out, "",
          "calibrate: the calibration file to write (default: MODEL.kvcal beside the model, where the other "
          "commands look for it)");
ABSL_FLAG(int64_t, ctx, 2048, "perplexity, calibrate: tokens per window");
ABSL_FLAG(std::string, kv, "",
          "perplexity: KV scheme with optional parameters, e.g. kvq3 or kvq3:outliers=0.005,residual=0 "
          "(default: --kv_scheme)");
ABSL_FLAG(std::string, calibration, "",
          "KV calibration file, which kvq and wkv schemes need (default: MODEL.kvcal beside the model when it "
          "exists)");
ABSL_FLAG(int64_t, max_eval_tokens, 0, "perplexity: evaluate at most this many tokens (0: the whole text)");
ABSL_FLAG(int, perplexity_batch, 64,
          "perplexity on the GPU: windows decoded side by side (each window is one row of a decode batch)");
ABSL_FLAG(int64_t, calibration_tokens, 16384, "calibrate: tokens of --text to calibrate on");
ABSL_FLAG(bool, calibrate_on_fill, false,
          "calibrate: on the keys and values SYNTHETIC FILL writes (--synthetic_fill_tokens) instead of --text: "
          "what runs that fill a context need, as the fill's statistics are not the model's (needs --out; "
          "the default for a synthetic model without --text)");
ABSL_FLAG(std::string, outlier_fractions, "0.005,0.01,0.02",
          "calibrate: outlier fractions to make kvq tables for, comma-separated");
ABSL_FLAG(std::string, fisher_weights, "",
          "calibrate: Fisher weights from bench/fisher_weights.py; k-means samples are weighted by them "
          "(default: every sample weighs 1)");

namespace kvshard {
namespace {

struct LoadedModel {
  std::unique_ptr<SingleProcessEngine> engine;  // owns the weights and the tokenizer
  std::unique_ptr<CpuModel> model;
  ModelIdentity identity;
};

// The model file (--model), or the synthetic model `synthetic` describes with its byte tokenizer.
absl::StatusOr<LoadedModel> LoadForQuality(const std::optional<SyntheticModelSpec>& synthetic = std::nullopt) {
  LoadedModel m;
  if (synthetic) {
    KV_ASSIGN_OR_RETURN(ModelWeights weights, MakeSyntheticModel(*synthetic));
    KV_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, MakeByteTokenizer(weights.config.vocab_size));
    KV_ASSIGN_OR_RETURN(m.engine, SingleProcessEngine::Create(std::move(weights), std::move(tokenizer), EngineOptions()));
  } else {
    KV_ASSIGN_OR_RETURN(std::string model_path, ResolveModelPath());
    KV_ASSIGN_OR_RETURN(m.engine, SingleProcessEngine::Create(model_path, EngineOptions()));
  }
  m.model = std::make_unique<CpuModel>(m.engine->weights());
  m.identity = ModelIdentityOf(m.engine->weights());
  return m;
}

absl::StatusOr<std::vector<int32_t>> TokenizeTextFlag(const Tokenizer& tokenizer, const char* command) {
  const std::string path = absl::GetFlag(FLAGS_text);
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat(command, " needs --text FILE"));
  KV_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  // Plain text: special-token strings inside it stay text.
  return tokenizer.Encode(text, /*parse_special=*/false);
}

// A calibration of the keys and values the synthetic fill writes for a model of geometry `g` (the KV that
// scale runs' decode contexts store): options.max_tokens tokens from position 0, every sample weighing 1.
absl::StatusOr<Calibration> CalibrateSyntheticFill(const KvGeometry& g, const ModelIdentity& identity,
                                                   const CalibrateOptions& options) {
  const int64_t n = options.max_tokens;
  if (n <= 0) return absl::InvalidArgumentError("--calibration_tokens must be positive");
  CalibrationBuilder builder(identity, n, options.outlier_fractions);
  const int64_t per_token = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  std::vector<float> k(n * per_token), v(n * per_token);
  for (int pass = 0; pass < 2; ++pass) {
    for (int layer = 0; layer < g.n_layers; ++layer) {
      SyntheticKvTokens(g, layer, 0, n, /*seed=*/1, k.data(), v.data());
      if (pass == 0) {
        KV_RETURN_IF_ERROR(builder.ObserveThresholds(layer, static_cast<int>(n), k.data(), v.data()));
      } else {
        KV_RETURN_IF_ERROR(builder.ObserveSamples(layer, static_cast<int>(n), k.data(), v.data(), nullptr, nullptr));
      }
    }
    if (pass == 0) KV_RETURN_IF_ERROR(builder.FinishThresholds());
  }
  return builder.Finish("uniform");
}

// --device for calibrate and perplexity: auto, gpu or cpu.
absl::StatusOr<std::string> QualityDeviceFlag() {
  const std::string device = absl::GetFlag(FLAGS_device);
  if (device != "auto" && device != "gpu" && device != "cpu") {
    return absl::InvalidArgumentError(absl::StrCat("--device must be auto, gpu or cpu, not '", device, "'"));
  }
  return device;
}

// After the GPU could not run `command`: OK (go on with the CPU, and say so) only under --device auto
// and only when the GPU is missing or does not hold the scheme; any other failure is the answer.
absl::Status FallBackToCpu(const char* command, const std::string& device, const absl::Status& gpu_status) {
  if (device == "gpu" || (!absl::IsUnavailable(gpu_status) && !absl::IsUnimplemented(gpu_status))) return gpu_status;
  std::fprintf(stderr, "kvshard %s: on the CPU (%s)\n", command, std::string(gpu_status.message()).c_str());
  return absl::OkStatus();
}

// Flags of other commands that one may reach for here (--max_tokens to shorten a perplexity run) are
// refused when written on the command line, with the flag that does the job, rather than ignored: a run is
// never silently longer than asked. The config file sets every command's settings and is not checked.
absl::Status RefuseOtherCommandsFlags(absl::string_view command,
                                      std::initializer_list<std::pair<const char*, const char*>> flags) {
  for (const auto& [name, instead] : flags) {
    if (GivenOnCommandLine(name)) {
      return absl::InvalidArgumentError(absl::StrCat(command, " does not use --", name, "; ", instead));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunCalibrate(const std::vector<std::string>& args) {
  KV_RETURN_IF_ERROR(RefuseOtherCommandsFlags(
      "calibrate", {{"max_tokens", "--calibration_tokens N calibrates on the first N tokens of --text"},
                    {"max_eval_tokens", "--calibration_tokens N calibrates on the first N tokens of --text"},
                    {"kv", "a calibration serves every kvq and wkv scheme"}}));
  KV_ASSIGN_OR_RETURN(const std::string device, QualityDeviceFlag());
  const std::optional<SyntheticModelSpec> synthetic = SyntheticSpecFromFlags();
  std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty() && synthetic) return absl::InvalidArgumentError("calibrate of a synthetic model needs --out FILE");
  const bool text_given = !absl::GetFlag(FLAGS_text).empty();
  if (absl::GetFlag(FLAGS_calibrate_on_fill) && text_given) {
    return absl::InvalidArgumentError("--calibrate_on_fill calibrates on the SYNTHETIC FILL, not on --text; give one");
  }
  const bool on_fill = absl::GetFlag(FLAGS_calibrate_on_fill) || (synthetic && !text_given);
  if (on_fill && out.empty()) {
    // MODEL.kvcal beside the model is what real requests use; a fill calibration would replace it.
    return absl::InvalidArgumentError("--calibrate_on_fill needs --out FILE (MODEL.kvcal is the calibration of real text)");
  }
  if (out.empty()) {
    KV_ASSIGN_OR_RETURN(const std::string model_path, ResolveModelPath());
    out = DefaultCalibrationPath(model_path);
  }
  CalibrateOptions options;
  options.ctx = absl::GetFlag(FLAGS_ctx);
  options.max_tokens = absl::GetFlag(FLAGS_calibration_tokens);
  options.outlier_fractions.clear();
  for (absl::string_view item : absl::StrSplit(absl::GetFlag(FLAGS_outlier_fractions), ',', absl::SkipWhitespace())) {
    double f = 0;
    if (!absl::SimpleAtod(item, &f) || !(f >= 0.0 && f <= 0.25)) {
      return absl::InvalidArgumentError(absl::StrCat("--outlier_fractions: \"", std::string(item.data(), item.size()),
                                                     "\" is not a fraction in [0, 0.25]"));
    }
    options.outlier_fractions.push_back(f);
  }
  if (options.outlier_fractions.empty()) return absl::InvalidArgumentError("--outlier_fractions is empty");
  FisherWeights fisher;
  if (const std::string path = absl::GetFlag(FLAGS_fisher_weights); !path.empty()) {
    KV_ASSIGN_OR_RETURN(fisher, LoadFisherWeights(path));
    options.fisher = &fisher;
  }
  if (synthetic && options.fisher != nullptr) {
    return absl::InvalidArgumentError("--fisher_weights: not for a synthetic model");
  }
  if (on_fill) {
    if (options.fisher != nullptr) return absl::InvalidArgumentError("--fisher_weights: not for the SYNTHETIC FILL");
    // Only the model's geometry and identity matter (a synthetic model's weights are made for them).
    KvGeometry geometry;
    ModelIdentity identity;
    if (synthetic) {
      KV_ASSIGN_OR_RETURN(ModelWeights weights, MakeSyntheticModel(*synthetic));
      geometry = KvGeometryOf(weights.config);
      identity = ModelIdentityOf(weights);
    } else {
      KV_ASSIGN_OR_RETURN(LoadedModel m, LoadForQuality());
      geometry = m.model->kv_geometry();
      identity = m.identity;
    }
    KV_ASSIGN_OR_RETURN(Calibration calibration, CalibrateSyntheticFill(geometry, identity, options));
    KV_RETURN_IF_ERROR(SaveCalibration(calibration, out));
    std::fprintf(stderr, "kvshard calibrate: %lld tokens of SYNTHETIC FILL, wrote %s\n",
                 static_cast<long long>(calibration.tokens), out.c_str());
    return absl::OkStatus();
  }
  // The model's own K/V over --text (a synthetic model reads its bytes): what a real prefill stores.
  KV_ASSIGN_OR_RETURN(LoadedModel m, LoadForQuality(synthetic));
  KV_ASSIGN_OR_RETURN(std::vector<int32_t> tokens, TokenizeTextFlag(m.engine->tokenizer(), "calibrate"));
  if (options.fisher != nullptr) {
    // The weights carry their own tokens; they must be the text's, so activations and gradients agree.
    const size_t n = std::min(tokens.size(), fisher.tokens.size());
    if (tokens.size() < fisher.tokens.size() || !std::equal(fisher.tokens.begin(), fisher.tokens.begin() + n, tokens.begin())) {
      return absl::FailedPreconditionError(
          "the Fisher weights were computed on other tokens than the start of --text (another text or tokenizer)");
    }
  }
  // --device auto: the GPU when there is one (minutes on a CPU are seconds there), the CPU otherwise.
  absl::StatusOr<Calibration> calibration = absl::UnavailableError("--device cpu");
  bool on_gpu = false;
  if (device != "cpu") {
    calibration = CalibrateKvOnGpu(m.engine->weights(), m.identity, tokens, options);
    on_gpu = calibration.ok();
    if (!calibration.ok()) KV_RETURN_IF_ERROR(FallBackToCpu("calibrate", device, calibration.status()));
  }
  if (!on_gpu) calibration = CalibrateKv(*m.model, m.identity, tokens, options);
  if (!calibration.ok()) return calibration.status();
  KV_RETURN_IF_ERROR(SaveCalibration(*calibration, out));
  std::fprintf(stderr, "kvshard calibrate: %lld tokens on the %s, %s weighting, wrote %s\n",
               static_cast<long long>(calibration->tokens), on_gpu ? "GPU" : "CPU", calibration->weighting.c_str(),
               out.c_str());
  return absl::OkStatus();
}

absl::Status RunPerplexity(const std::vector<std::string>& args) {
  KV_RETURN_IF_ERROR(RefuseOtherCommandsFlags(
      "perplexity", {{"max_tokens", "--max_eval_tokens N evaluates at most N tokens of --text"},
                     {"calibration_tokens", "--max_eval_tokens N evaluates at most N tokens of --text"}}));
  std::string spec = absl::GetFlag(FLAGS_kv);
  if (!spec.empty()) KV_RETURN_IF_ERROR(ParseKvScheme(spec).status());  // a bad scheme before the model
  KV_ASSIGN_OR_RETURN(const std::string model_path, ResolveModelPath());
  KV_ASSIGN_OR_RETURN(const KvSettings kv, KvSettingsFromFlags(model_path));
  if (spec.empty()) {
    spec = kv.scheme;
    if (!kv.note.empty()) std::fprintf(stderr, "%s\n", kv.note.c_str());
  }
  KV_ASSIGN_OR_RETURN(KvSchemeConfig scheme, ParseKvScheme(spec));
  PerplexityOptions options;
  options.ctx = absl::GetFlag(FLAGS_ctx);
  options.max_tokens = absl::GetFlag(FLAGS_max_eval_tokens);
  if (options.ctx < 2) return absl::InvalidArgumentError("--ctx must be at least 2");

  std::unique_ptr<Calibration> calibration;
  const std::string& calibration_path = kv.calibration_path;
  if (!calibration_path.empty()) {
    KV_ASSIGN_OR_RETURN(Calibration c, LoadCalibration(calibration_path));
    calibration = std::make_unique<Calibration>(std::move(c));
  } else if (scheme.needs_calibration()) {
    return absl::InvalidArgumentError(absl::StrCat("KV scheme ", scheme.name(),
                                                   " needs a calibration: --calibration FILE, or `kvshard "
                                                   "calibrate --text FILE`, which writes ",
                                                   DefaultCalibrationPath(model_path), " where it is found"));
  }
  KV_ASSIGN_OR_RETURN(LoadedModel m, LoadForQuality());
  if (calibration) {
    KV_RETURN_IF_ERROR(Annotate(CheckCalibrationForModel(*calibration, m.identity), calibration_path));
  }
  KV_ASSIGN_OR_RETURN(std::vector<int32_t> tokens, TokenizeTextFlag(m.engine->tokenizer(), "perplexity"));
  // --device auto: the GPU when there is one and its KV store holds the scheme, the CPU otherwise. The
  // two differ slightly (bf16 dense layers on the GPU), so the result names its device.
  KV_ASSIGN_OR_RETURN(const std::string device, QualityDeviceFlag());
  absl::StatusOr<PerplexityResult> gpu_result = absl::UnavailableError("--device cpu");
  if (device != "cpu") {
    gpu_result = EvaluatePerplexityOnGpu(m.engine->weights(), tokens, scheme, calibration.get(), options,
                                         absl::GetFlag(FLAGS_perplexity_batch));
    if (!gpu_result.ok()) KV_RETURN_IF_ERROR(FallBackToCpu("perplexity", device, gpu_result.status()));
  }
  const bool on_gpu = gpu_result.ok();
  PerplexityResult r;
  if (on_gpu) {
    r = *gpu_result;
  } else {
    KV_ASSIGN_OR_RETURN(r, EvaluatePerplexity(*m.model, tokens, scheme, calibration.get(), options));
  }
  nlohmann::json j;
  j["text"] = absl::GetFlag(FLAGS_text);
  j["ctx"] = options.ctx;
  j["kv"] = scheme.ToString();
  j["scheme"] = scheme.name();
  j["windows"] = r.windows;
  j["scored_tokens"] = r.scored_tokens;
  j["mean_nll"] = r.mean_nll;
  j["perplexity"] = r.perplexity;
  j["bits_per_element"] = r.bits_per_element;
  j["calibration"] = calibration ? calibration->weighting : "";
  j["seconds"] = r.seconds;
  j["device"] = on_gpu ? "gpu" : "cpu";
  std::printf("%s\n", j.dump().c_str());
  std::fprintf(stderr, "%s\n",
               absl::StrFormat("kvshard perplexity: %s ctx %d on the %s: perplexity %.4f over %d tokens (%d windows), "
                               "%.3f bits/element, %.0f s",
                               scheme.ToString(), options.ctx, on_gpu ? "GPU" : "CPU", r.perplexity, r.scored_tokens, r.windows,
                               r.bits_per_element, r.seconds)
                   .c_str());
  return absl::OkStatus();
}

}  // namespace kvshard
