// `kvshard scale-bench`: decode-step and prefill timings of the distributed engine at the sizes of the
// scale runs (bench/scale_run.sh drives it; bench/RESULTS.md holds the figures). Runs under mpirun, or in
// one process over its one worker, with the model from the usual flags (normally --synthetic_model).
//
// Decode: for every tokens-per-worker size T and batch B, B requests of equal context run together, each
// holding N*T/B tokens over the N workers: SYNTHETIC FILL of N*T/B - prompt - steps tokens written straight
// into the stores, then a short real prompt, then greedy decode. Only the steps that decode all B rows and
// carry nothing else (no fill, no prefill chunk) are timed; the report gives their median.
//
// Prefill: one request with a real prompt of P tokens (random ids, or --bench_text) and no fill: time to first token, tokens/s,
// and the model FLOPs per second, as a fraction of --bench_gemm_tflops per worker (a cuBLAS GEMM rate the
// caller measured on the same GPUs) when given.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/progress.h"
#include "common/status.h"
#include "coordinator/commands.h"
#include "coordinator/distributed_engine.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, bench_tokens_per_worker, "262144",
          "scale-bench: comma-separated KV tokens per worker for the decode runs (weak scaling holds it fixed)");
ABSL_FLAG(std::string, bench_batches, "1,16", "scale-bench: comma-separated decode batch sizes");
ABSL_FLAG(int, bench_decode_steps, 32, "scale-bench: tokens each request generates");
ABSL_FLAG(int, bench_prompt_tokens, 64, "scale-bench: real prompt tokens after each request's SYNTHETIC FILL");
ABSL_FLAG(std::string, bench_prefill_tokens, "",
          "scale-bench: comma-separated prompt sizes whose real prefill is timed (time to first token)");
ABSL_FLAG(std::string, bench_text, "",
          "scale-bench: prompts are this file's tokens, repeated as needed (default: random token ids). A kvq "
          "calibration must come from the same kind of input: a page whose keys bring more outliers than it "
          "holds fails the request");
ABSL_FLAG(double, bench_gemm_tflops, 0, "scale-bench: the GPUs' cuBLAS bf16 GEMM rate, for prefill MFU");
ABSL_FLAG(std::string, bench_json, "", "scale-bench: append one JSON object per measurement to this file");
ABSL_FLAG(std::string, bench_label, "", "scale-bench: a label copied into every JSON object (the device)");

namespace kvshard {
namespace {

using nlohmann::json;

absl::StatusOr<std::vector<int64_t>> ParseSizes(const std::string& flag, const std::string& text) {
  std::vector<int64_t> sizes;
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(piece, &v) || v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", piece, "' is not a positive integer"));
    }
    sizes.push_back(v);
  }
  return sizes;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Collects the engine's steps while a measurement runs.
class StepRecorder final : public EngineObserver {
 public:
  void OnStep(const StepTiming& step) override {
    std::lock_guard<std::mutex> lock(mu_);
    steps_.push_back(step);
  }
  std::vector<StepTiming> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(steps_, {});
  }

 private:
  std::mutex mu_;
  std::vector<StepTiming> steps_;
};

// Prompt tokens: --bench_text's tokens repeated from an offset, or seeded random ids.
class PromptSource {
 public:
  static absl::StatusOr<PromptSource> FromFlags(const Tokenizer& tokenizer) {
    PromptSource source;
    source.vocab_ = tokenizer.vocab_size();
    if (const std::string path = absl::GetFlag(FLAGS_bench_text); !path.empty()) {
      KV_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
      source.text_ = tokenizer.Encode(text, /*parse_special=*/false);
      if (source.text_.empty()) return absl::InvalidArgumentError(absl::StrCat("--bench_text ", path, " has no tokens"));
    }
    return source;
  }
  std::vector<int32_t> Make(int64_t n, uint64_t seed) const {
    std::vector<int32_t> ids(n);
    std::mt19937_64 rng(seed);
    if (!text_.empty()) {
      const size_t offset = rng() % text_.size();
      for (int64_t i = 0; i < n; ++i) ids[i] = text_[(offset + i) % text_.size()];
      return ids;
    }
    std::uniform_int_distribution<int32_t> id(0, vocab_ - 1);
    for (auto& t : ids) t = id(rng);
    return ids;
  }

 private:
  int32_t vocab_ = 0;
  std::vector<int32_t> text_;
};

// Runs `requests` together (one thread each) and returns the first error.
absl::Status RunTogether(DistributedEngine& engine, const std::vector<GenerationRequest>& requests,
                         std::vector<GenerationResult>* results, const PrefillCallback& on_prefill) {
  results->assign(requests.size(), {});
  std::vector<absl::Status> statuses(requests.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < requests.size(); ++i) {
    threads.emplace_back([&, i] {
      auto r = engine.Generate(requests[i], [](int32_t, const std::string&) { return true; },
                               i == 0 ? on_prefill : PrefillCallback());
      if (r.ok()) {
        (*results)[i] = std::move(*r);
      } else {
        statuses[i] = r.status();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& s : statuses) KV_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

void AppendJson(const json& j) {
  const std::string path = absl::GetFlag(FLAGS_bench_json);
  if (path.empty()) return;
  std::ofstream out(path, std::ios::app);
  out << j.dump() << "\n";
}

absl::Status DecodeRun(DistributedEngine& engine, StepRecorder& recorder, const PromptSource& prompts,
                       int64_t per_worker, int64_t batch, const std::string& scheme) {
  const int n = engine.n_workers();
  const int steps = absl::GetFlag(FLAGS_bench_decode_steps);
  const int prompt = absl::GetFlag(FLAGS_bench_prompt_tokens);
  if (steps < 2 || prompt < 1) return absl::InvalidArgumentError("--bench_decode_steps must be >= 2, --bench_prompt_tokens >= 1");
  const int64_t context = per_worker * n / batch;
  const int64_t fill = context - prompt - steps;
  if (fill < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%d tokens per worker over %d workers and batch %d leave no room "
                                                      "for a %d-token prompt and %d steps",
                                                      per_worker, n, batch, prompt, steps));
  }
  std::vector<GenerationRequest> requests(batch);
  for (int64_t i = 0; i < batch; ++i) {
    requests[i].prompt_ids = prompts.Make(prompt, 1000 + i);
    requests[i].max_tokens = steps;
    requests[i].synthetic_fill_tokens = fill;
    requests[i].kv_scheme = scheme;
  }
  std::fprintf(stderr, "scale-bench: %d workers, %lld tokens per worker, batch %lld: %lld requests of %lld SYNTHETIC "
               "FILL + %d prompt tokens, %d steps each\n", n, static_cast<long long>(per_worker),
               static_cast<long long>(batch), static_cast<long long>(batch), static_cast<long long>(fill), prompt, steps);
  recorder.Take();
  std::vector<GenerationResult> results;
  KV_RETURN_IF_ERROR(RunTogether(engine, requests, &results, nullptr));
  const std::vector<StepTiming> all = recorder.Take();

  std::vector<double> step_s, worker_step_s, worker_s, merge_s;
  int64_t max_kv_bytes = 0;
  double bits = 0;
  int64_t merges_per_step = 0;
  for (const StepTiming& t : all) {
    for (size_t w = 0; w < t.worker_kv_bytes.size(); ++w) {
      if (t.worker_kv_bytes[w] > max_kv_bytes) {
        max_kv_bytes = t.worker_kv_bytes[w];
        bits = t.worker_kv_elements[w] > 0 ? 8.0 * t.worker_kv_bytes[w] / t.worker_kv_elements[w] : 0;
      }
    }
    if (t.decode_rows != batch || t.prefill || t.fills > 0) continue;
    step_s.push_back(t.seconds);
    worker_step_s.push_back(t.worker_step_seconds);
    worker_s.push_back(t.worker_decode_seconds);
    merge_s.push_back(t.merge_seconds);
    merges_per_step = t.merges;
  }
  if (step_s.empty()) {
    return absl::InternalError(absl::StrFormat("no step decoded all %d rows alone; raise --bench_decode_steps",
                                               static_cast<int>(batch)));
  }
  const double step = Median(step_s), worker_step = Median(worker_step_s), worker = Median(worker_s),
               merge = Median(merge_s);
  const double merge_per_layer = merges_per_step > 0 ? merge / merges_per_step : 0;
  std::printf("decode  workers %d  tokens/worker %9lld  batch %3lld  step %8.2f ms (worker step %8.2f, forward %8.2f)  "
              "%8.1f tokens/s  "
              "merge %6.1f us/layer (%4.1f%% of the step)  KV %6.2f GB/worker  %.2f bits/element  [%zu steps; "
              "SYNTHETIC FILL %lld per request]\n",
              n, static_cast<long long>(per_worker), static_cast<long long>(batch), 1e3 * step, 1e3 * worker_step,
              1e3 * worker, batch / step, 1e6 * merge_per_layer, step > 0 ? 100 * merge / step : 0, max_kv_bytes / 1e9, bits,
              step_s.size(), static_cast<long long>(fill));
  std::fflush(stdout);
  AppendJson({{"kind", "decode"},
              {"label", absl::GetFlag(FLAGS_bench_label)},
              {"workers", n},
              {"devices", engine.device_name()},
              {"scheme", scheme},
              {"tokens_per_worker", per_worker},
              {"batch", batch},
              {"synthetic_fill_per_request", fill},
              {"prompt_tokens", prompt},
              {"timed_steps", step_s.size()},
              {"step_ms_median", 1e3 * step},
              {"worker_step_ms_median", 1e3 * worker_step},
              {"worker_decode_ms_median", 1e3 * worker},
              {"merge_ms_per_step_median", 1e3 * merge},
              {"merges_per_step", merges_per_step},
              {"merge_us_per_layer", 1e6 * merge_per_layer},
              {"kv_bytes_per_worker_max", max_kv_bytes},
              {"bits_per_element", bits}});
  return absl::OkStatus();
}

// Model FLOPs of a causal prefill of n tokens: the dense layers (2 per weight per token; logits of the
// last token only) and attention (QK^T and PV over the causal triangle).
double PrefillFlops(const ModelConfig& c, int64_t n) {
  const double q_dim = static_cast<double>(c.n_heads) * c.head_dim;
  const double kv_dim = static_cast<double>(c.n_kv_heads) * c.head_dim;
  const double per_layer = c.hidden * (q_dim + 2 * kv_dim) + q_dim * c.hidden + 3.0 * c.hidden * c.ffn_hidden;
  const double dense = 2.0 * n * c.n_layers * per_layer + 2.0 * c.hidden * c.vocab_size;
  const double attention = 4.0 * c.n_layers * q_dim * (static_cast<double>(n) * (n + 1) / 2);
  return dense + attention;
}

absl::Status PrefillRun(DistributedEngine& engine, StepRecorder& recorder, const PromptSource& prompts,
                        const ModelConfig& config, int64_t n, const std::string& scheme) {
  GenerationRequest request;
  request.prompt_ids = prompts.Make(n, 7);
  request.max_tokens = 1;
  request.synthetic_fill_tokens = 0;
  request.kv_scheme = scheme;
  auto progress = std::make_unique<ProgressLine>("prefill", "tokens", n);
  auto on_prefill = [&](const PrefillProgress& p) {
    progress->Update(p.done);
    if (p.done == p.total) progress->Finish();
  };
  recorder.Take();
  std::vector<GenerationResult> results;
  KV_RETURN_IF_ERROR(RunTogether(engine, {request}, &results, on_prefill));
  const std::vector<StepTiming> all = recorder.Take();
  int64_t chunks = 0;
  for (const StepTiming& t : all) chunks += t.prefill ? 1 : 0;
  const double ttft = results[0].prefill_seconds;
  const double flops = PrefillFlops(config, n);
  const double rate = ttft > 0 ? flops / ttft / 1e12 : 0;
  const double gemm = absl::GetFlag(FLAGS_bench_gemm_tflops);
  const int workers = engine.n_workers();
  const double mfu = gemm > 0 ? rate / (gemm * workers) : 0;
  std::printf("prefill workers %d  tokens %9lld  time to first token %8.2f s  %9.0f tokens/s  %7.1f TFLOP/s  %s  "
              "[%lld chunks]\n",
              workers, static_cast<long long>(n), ttft, ttft > 0 ? n / ttft : 0, rate,
              gemm > 0 ? absl::StrFormat("MFU %.1f%% of %d x %.0f TFLOP/s GEMM", 100 * mfu, workers, gemm).c_str()
                       : "(no GEMM rate given)",
              static_cast<long long>(chunks));
  std::fflush(stdout);
  AppendJson({{"kind", "prefill"},
              {"label", absl::GetFlag(FLAGS_bench_label)},
              {"workers", workers},
              {"devices", engine.device_name()},
              {"scheme", scheme},
              {"tokens", n},
              {"ttft_s", ttft},
              {"tflops", rate},
              {"gemm_tflops", gemm},
              {"mfu", mfu},
              {"chunks", chunks}});
  return absl::OkStatus();
}

}  // namespace

absl::Status RunScaleBench(const std::vector<std::string>& args) {
  KV_ASSIGN_OR_RETURN(auto engine, MakeEngineFromFlags());
  auto* distributed = dynamic_cast<DistributedEngine*>(engine.get());
  if (distributed == nullptr) {
    return absl::FailedPreconditionError(
        "scale-bench measures the distributed engine, which this engine is not");
  }
  KV_ASSIGN_OR_RETURN(std::vector<int64_t> sizes,
                      ParseSizes("bench_tokens_per_worker", absl::GetFlag(FLAGS_bench_tokens_per_worker)));
  KV_ASSIGN_OR_RETURN(std::vector<int64_t> batches, ParseSizes("bench_batches", absl::GetFlag(FLAGS_bench_batches)));
  KV_ASSIGN_OR_RETURN(std::vector<int64_t> prefills,
                      ParseSizes("bench_prefill_tokens", absl::GetFlag(FLAGS_bench_prefill_tokens)));
  KV_ASSIGN_OR_RETURN(const PromptSource prompts, PromptSource::FromFlags(distributed->tokenizer()));
  const std::string scheme = distributed->options().default_kv_scheme;
  StepRecorder recorder;
  distributed->set_observer(&recorder);
  std::printf("# scale-bench on %s, model %s, KV scheme %s; decode figures are medians over steps that decode the "
              "whole batch alone; the decode contexts are SYNTHETIC FILL\n",
              distributed->device_name().c_str(), distributed->model_name().c_str(), scheme.c_str());
  absl::Status first_error;
  auto keep = [&](absl::Status s, const std::string& what) {
    if (s.ok()) return;
    std::printf("%s: %s\n", what.c_str(), s.ToString().c_str());
    if (first_error.ok()) first_error = s;
  };
  for (int64_t per_worker : sizes) {
    for (int64_t batch : batches) {
      keep(DecodeRun(*distributed, recorder, prompts, per_worker, batch, scheme),
           absl::StrFormat("decode %d tokens per worker, batch %d", per_worker, batch));
    }
  }
  for (int64_t n : prefills) {
    keep(PrefillRun(*distributed, recorder, prompts, distributed->model_config(), n, scheme),
         absl::StrFormat("prefill %d tokens", n));
  }
  distributed->set_observer(nullptr);
  return first_error;
}

}  // namespace kvshard
