// The model run directly in this process, one request at a time (the GPU, or the CPU backend), no
// coordinator or worker: the reference the engine tests compare the distributed engine with, and the model
// `kvshard perplexity` and `calibrate` hold. The front ends' single-process mode is the distributed engine
// over one in-process worker (DistributedEngine::CreateInProcess), which batches.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/engine.h"
#include "kvstore/kv_shard.h"
#include "worker/forward.h"
#include "worker/gpu_backend.h"
#include "worker/kv_shard_factory.h"
#include "worker/model.h"

namespace kvshard {

struct EngineOptions {
  std::string default_kv_scheme = "fp16";
  KvShardFactory kv_factory = DefaultKvShardFactory();
  // "auto": the GPU when this build and host have one, else the CPU; "gpu": the GPU or an error; "cpu":
  // the CPU backend. The GPU holds fp16 and (with `calibration`) kvq2..4; requests of other schemes run
  // on the CPU.
  std::string device = "auto";
  int cuda_graph_rows = 64;  // GpuModelOptions::graph_rows
  int gpu_prefill_chunk = kDefaultGpuPrefillChunk;  // GpuModelOptions::max_chunk
  std::shared_ptr<const Calibration> calibration;  // the one kv_factory holds, for the GPU's kvq store
  double key_outlier_headroom = 3.0;               // DeviceKvStoreOptions::key_outlier_headroom
};

class SingleProcessEngine final : public Engine {
 public:
  // Loads the model and tokenizer from `model_path` (GGUF file or Hugging Face directory).
  static absl::StatusOr<std::unique_ptr<SingleProcessEngine>> Create(const std::string& model_path,
                                                                      EngineOptions options);
  // From weights already in memory (a synthetic model) and a tokenizer.
  static absl::StatusOr<std::unique_ptr<SingleProcessEngine>> Create(ModelWeights weights,
                                                                      std::unique_ptr<Tokenizer> tokenizer,
                                                                      EngineOptions options);

  const Tokenizer& tokenizer() const override { return *tokenizer_; }
  std::string model_name() const override { return model_name_; }
  int64_t max_context() const override { return weights_.config.max_context; }
  const ModelConfig& config() const { return weights_.config; }
  const ModelWeights& weights() const { return weights_; }
  // Where the last request ran: "CPU", or the GPU's name.
  std::string device_name() const override { return last_device_; }
  // Whether requests of the GPU's schemes (GpuBackend::Holds) run on a GPU.
  bool has_gpu() const { return gpu_ != nullptr; }

  absl::StatusOr<GenerationResult> Generate(const GenerationRequest& request, const TokenCallback& on_token,
                                            const PrefillCallback& on_prefill) override;

  // The KV memory of the running request (none between requests) and per-step timings, for metrics.
  std::vector<WorkerKvMemory> kv_memory() const override { return {kv_memory_}; }
  void set_observer(EngineObserver* observer) override { observer_ = observer; }

 private:
  SingleProcessEngine(ModelWeights weights, std::unique_ptr<Tokenizer> tokenizer, std::string model_name,
                      EngineOptions options);
  absl::StatusOr<GenerationResult> GenerateOnGpu(const GenerationRequest& request, const std::string& scheme,
                                                 const KvSchemeConfig& config, const TokenCallback& on_token,
                                                 const PrefillCallback& on_prefill);
  ModelWeights weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string model_name_;
  EngineOptions options_;
  CpuModel model_;
  std::unique_ptr<GpuBackend> gpu_;  // null: requests run on the CPU
  std::string last_device_ = "CPU";
  EngineObserver* observer_ = nullptr;
  WorkerKvMemory kv_memory_;
  void NoteKvMemory(const KvMemory& memory, const std::string& scheme, int64_t tokens);
};

}  // namespace kvshard
