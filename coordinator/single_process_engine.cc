#include "coordinator/single_process_engine.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/generation_stream.h"
#include "kernels/gemm_cpu.h"
#include "worker/model_loader.h"

namespace kvshard {

absl::StatusOr<std::unique_ptr<SingleProcessEngine>> SingleProcessEngine::Create(const std::string& model_path,
                                                                                  EngineOptions options) {
  KV_ASSIGN_OR_RETURN(ModelWeights weights, LoadModel(model_path));
  std::unique_ptr<Tokenizer> tokenizer;
  if (std::filesystem::is_directory(model_path)) {
    KV_ASSIGN_OR_RETURN(tokenizer,
                        Tokenizer::FromJsonFile((std::filesystem::path(model_path) / "tokenizer.json").string()));
  } else {
    KV_ASSIGN_OR_RETURN(auto gguf, GgufFile::Open(model_path));
    KV_ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromGguf(*gguf));
  }
  if (weights.config.name.empty()) weights.config.name = std::filesystem::path(model_path).stem().string();
  return Create(std::move(weights), std::move(tokenizer), std::move(options));
}

absl::StatusOr<std::unique_ptr<SingleProcessEngine>> SingleProcessEngine::Create(
    ModelWeights weights, std::unique_ptr<Tokenizer> tokenizer, EngineOptions options) {
  const std::string device = options.device;
  if (device != "auto" && device != "cpu" && device != "gpu") {
    return absl::InvalidArgumentError(absl::StrCat("unknown device '", device, "' (auto, cpu, gpu)"));
  }
  std::string name = weights.config.name;
  std::unique_ptr<SingleProcessEngine> engine(
      new SingleProcessEngine(std::move(weights), std::move(tokenizer), std::move(name), std::move(options)));
  if (device != "cpu") {
    GpuBackendOptions gpu_options;
    gpu_options.graph_rows = engine->options_.cuda_graph_rows;
    gpu_options.max_chunk = engine->options_.gpu_prefill_chunk;
    gpu_options.calibration = engine->options_.calibration;
    gpu_options.key_outlier_headroom = engine->options_.key_outlier_headroom;
    auto gpu = GpuBackend::Create(engine->weights_, gpu_options);
    if (gpu.ok()) {
      engine->gpu_ = std::move(*gpu);
    } else if (device == "gpu" || !absl::IsUnavailable(gpu.status())) {
      return Annotate(gpu.status(), "GPU backend");
    }
  }
  return engine;
}

SingleProcessEngine::SingleProcessEngine(ModelWeights weights, std::unique_ptr<Tokenizer> tokenizer,
                                         std::string model_name, EngineOptions options)
    : weights_(std::move(weights)),
      tokenizer_(std::move(tokenizer)),
      model_name_(std::move(model_name)),
      options_(std::move(options)),
      model_(weights_) {}

void SingleProcessEngine::NoteKvMemory(const KvMemory& memory, const std::string& scheme, int64_t tokens) {
  kv_memory_.worker = 0;
  kv_memory_.scheme = scheme;
  kv_memory_.bytes_used = memory.bytes;
  kv_memory_.bits_per_element = memory.bits_per_element();
  // What the request's cache would take at the full context, at the same bytes per token.
  if (tokens > 0) kv_memory_.bytes_capacity = memory.bytes / tokens * max_context();
}

absl::StatusOr<GenerationResult> SingleProcessEngine::Generate(const GenerationRequest& request,
                                                               const TokenCallback& on_token,
                                                               const PrefillCallback& on_prefill) {
  using Clock = std::chrono::steady_clock;
  const int64_t n_prompt = static_cast<int64_t>(request.prompt_ids.size());
  if (n_prompt == 0) return absl::InvalidArgumentError("the prompt is empty");
  if (n_prompt >= max_context()) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", n_prompt,
                                                   " tokens; the model's context holds ", max_context(),
                                                   " (prompt plus at least one generated token)"));
  }
  if (request.max_tokens < 0) return absl::InvalidArgumentError("max_tokens must not be negative");
  const std::string scheme = request.kv_scheme.empty() ? options_.default_kv_scheme : request.kv_scheme;
  if (gpu_ != nullptr) {
    // Names ParseKvScheme does not know (the CPU's "fp32", typos) go to the CPU factory, which says why.
    const absl::StatusOr<KvSchemeConfig> config = ParseKvScheme(scheme);
    if (config.ok() && gpu_->Holds(*config)) {
      last_device_ = gpu_->device_name();
      return GenerateOnGpu(request, scheme, *config, on_token, on_prefill);
    }
  }
  last_device_ = absl::StrCat("CPU (", CpuGemmLibrary(), ")");
  KV_ASSIGN_OR_RETURN(std::unique_ptr<KvShard> shard, options_.kv_factory(scheme, model_.kv_geometry(), 0));
  ShardAttentionContext context(*shard);

  GenerationResult result;
  result.prompt_tokens = n_prompt;
  result.kv_scheme = scheme;
  std::vector<float> logits;
  const auto prefill_start = Clock::now();
  const int64_t chunk = CpuModel::max_chunk();
  for (int64_t pos = 0; pos < n_prompt; pos += chunk) {
    const int64_t n = std::min(chunk, n_prompt - pos);
    KV_RETURN_IF_ERROR(model_.Forward(std::span<const int32_t>(request.prompt_ids.data() + pos, n), pos, context,
                                      /*all_logits=*/false, logits));
    if (on_prefill) {
      on_prefill({pos + n, n_prompt, std::chrono::duration<double>(Clock::now() - prefill_start).count()});
    }
  }
  result.prefill_seconds = std::chrono::duration<double>(Clock::now() - prefill_start).count();
  NoteKvMemory(shard->Memory(), scheme, n_prompt);
  struct FreeKvOnExit {  // the shard goes with this call; so does its memory
    WorkerKvMemory& memory;
    ~FreeKvOnExit() { memory.bytes_used = 0; }
  } free_kv_on_exit{kv_memory_};

  // Generation stops at max_tokens or at the end of the context, whichever comes first.
  const int64_t budget = std::min<int64_t>(request.max_tokens, max_context() - n_prompt);
  Sampler sampler(request.sampling);
  GenerationStream stream(*tokenizer_, request, on_token, result);
  const auto decode_start = Clock::now();
  int64_t pos = n_prompt;
  for (int64_t step = 0; step < budget; ++step) {
    const int32_t token = sampler.Sample(logits.data(), weights_.config.vocab_size);
    sampler.Accept(token);
    if (!stream.Push(token)) break;
    if (step + 1 == budget) break;  // no forward pass for a token that will not be sampled
    const auto step_start = Clock::now();
    KV_RETURN_IF_ERROR(model_.Forward(std::span<const int32_t>(&token, 1), pos, context, false, logits));
    if (observer_ != nullptr) {
      observer_->OnDecodeStep(0, std::chrono::duration<double>(Clock::now() - step_start).count());
    }
    ++pos;
    NoteKvMemory(shard->Memory(), scheme, pos);
  }
  stream.Finish();
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - decode_start).count();
  return result;
}

// The same request loop with the forward pass and the sampling on the GPU: only token ids come back.
absl::StatusOr<GenerationResult> SingleProcessEngine::GenerateOnGpu(const GenerationRequest& request,
                                                                    const std::string& scheme,
                                                                    const KvSchemeConfig& config,
                                                                    const TokenCallback& on_token,
                                                                    const PrefillCallback& on_prefill) {
  using Clock = std::chrono::steady_clock;
  const int64_t n_prompt = static_cast<int64_t>(request.prompt_ids.size());
  const int64_t budget = std::min<int64_t>(request.max_tokens, max_context() - n_prompt);
  KV_RETURN_IF_ERROR(gpu_->StartRequest(n_prompt + std::max<int64_t>(budget, 1), config, request.sampling));
  GenerationResult result;
  result.prompt_tokens = n_prompt;
  result.kv_scheme = scheme;
  const auto prefill_start = Clock::now();
  const int64_t chunk = gpu_->max_chunk();
  int32_t token = -1;
  uint64_t draws = 0;
  for (int64_t pos = 0; pos < n_prompt; pos += chunk) {
    const int64_t n = std::min(chunk, n_prompt - pos);
    KV_ASSIGN_OR_RETURN(token, gpu_->Feed(std::span<const int32_t>(request.prompt_ids.data() + pos, n), pos, draws));
    if (on_prefill) {
      on_prefill({pos + n, n_prompt, std::chrono::duration<double>(Clock::now() - prefill_start).count()});
    }
  }
  ++draws;
  result.prefill_seconds = std::chrono::duration<double>(Clock::now() - prefill_start).count();
  NoteKvMemory(gpu_->kv_memory(), scheme, n_prompt);
  struct FreeKvOnExit {  // the request's cache is reused by the next one; its bytes count no more
    WorkerKvMemory& memory;
    ~FreeKvOnExit() { memory.bytes_used = 0; }
  } free_kv_on_exit{kv_memory_};

  GenerationStream stream(*tokenizer_, request, on_token, result);
  const auto decode_start = Clock::now();
  int64_t pos = n_prompt;
  for (int64_t step = 0; step < budget; ++step) {
    gpu_->Accept(token);
    if (!stream.Push(token)) break;
    if (step + 1 == budget) break;  // no forward pass for a token that will not be sampled
    const auto step_start = Clock::now();
    KV_ASSIGN_OR_RETURN(token, gpu_->Feed(std::span<const int32_t>(&token, 1), pos, draws++));
    if (observer_ != nullptr) {
      observer_->OnDecodeStep(0, std::chrono::duration<double>(Clock::now() - step_start).count());
    }
    ++pos;
    // Counting a kvq store's outliers reads the device: every 64 tokens is often enough for a gauge.
    if ((pos - n_prompt) % 64 == 0) NoteKvMemory(gpu_->kv_memory(), scheme, pos);
  }
  stream.Finish();
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - decode_start).count();
  return result;
}

}  // namespace kvshard
