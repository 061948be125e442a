#include "coordinator/engine_factory.h"

#include <cstdio>
#include <filesystem>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/byte_tokenizer.h"
#include "coordinator/commands.h"
#include "coordinator/quality.h"
#include "worker/model_loader.h"
#include "worker/mpi_runtime.h"

ABSL_FLAG(bool, synthetic_model, false,
          "Use a synthetic model (seeded random weights, geometry from --synthetic_*) instead of --model; "
          "for speed and capacity runs, its outputs mean nothing");
ABSL_FLAG(int, synthetic_layers, 30, "Synthetic model: layers");
ABSL_FLAG(int, synthetic_hidden, 576, "Synthetic model: hidden size");
ABSL_FLAG(int, synthetic_heads, 9, "Synthetic model: query heads");
ABSL_FLAG(int, synthetic_kv_heads, 3, "Synthetic model: KV heads");
ABSL_FLAG(int, synthetic_head_dim, 64, "Synthetic model: head dim");
ABSL_FLAG(int, synthetic_ffn, 1536, "Synthetic model: FFN hidden size");
ABSL_FLAG(int, synthetic_vocab, 49152, "Synthetic model: vocabulary size (at least 256)");
ABSL_FLAG(int64_t, synthetic_max_context, int64_t{1} << 24, "Synthetic model: context length");
ABSL_FLAG(double, synthetic_rope_theta, 10000.0, "Synthetic model: RoPE theta");
ABSL_FLAG(uint64_t, synthetic_seed, 1, "Synthetic model: weight seed");
ABSL_FLAG(int64_t, synthetic_fill_tokens, 0,
          "SYNTHETIC FILL: write this many tokens of synthetic K/V into the shards before every prompt "
          "(capacity and decode-speed runs; kvq wants a calibration of the fill, `kvshard calibrate "
          "--calibrate_on_fill`); every report of it says SYNTHETIC FILL");
ABSL_FLAG(uint64_t, synthetic_fill_seed, 1, "SYNTHETIC FILL: value seed");
ABSL_FLAG(int64_t, worker_kv_budget_mb, 0,
          "KV cache memory each worker may hold, in MiB (0: a GPU worker takes what its GPU has free after the "
          "model, a CPU worker half the memory the host (or its container) has available, shared by the node's "
          "workers)");
ABSL_FLAG(int64_t, single_worker_threshold_tokens, 2048,
          "Contexts of at most this many tokens (fill + prompt + max_tokens) go whole to one worker. Below "
          "about 3K tokens the demo model's attention costs less than its dense layers, so splitting gains "
          "little; where workers share cores (the CPU tests) splitting never paid, up to 8K tokens");
ABSL_FLAG(std::string, merge, "allgather",
          "How decode merges attention partials across workers: allgather (one allgather, local merge) or "
          "tree (allreduce-max of lse, then allreduce-sum)");
ABSL_FLAG(std::string, partials_wire, "fp32", "Wire precision of attention partials' outputs: fp32 or bf16");
ABSL_FLAG(int, worker_threads, 0, "CPU threads per worker (0: the node's CPUs within its CPU quota over its ranks, at most those the worker may run on)");
ABSL_FLAG(int, max_batch, 64, "Most requests in one decode step");
ABSL_FLAG(double, kv_outlier_headroom, 3.0,
          "GPUs, kvq schemes: key outlier room, in multiples of the calibrated key outlier fraction of "
          "a request's reserved tokens (its pages and KV heads share it, so single pages may hold far more); a "
          "request whose text has more outliers in a layer fails (raise this, at 3 bytes per extra outlier "
          "slot, or calibrate on text like the requests')");
ABSL_FLAG(int, cuda_graph_rows, 64,
          "GPUs: forward passes of at most this many rows (decode steps) replay their dense layers from CUDA "
          "graphs, captured once per row count (0: no graphs)");
ABSL_FLAG(int, gpu_prefill_chunk, kvshard::kDefaultGpuPrefillChunk,
          "GPUs: prompt tokens per prefill step (1..65535). Each chunk's attention reads the whole earlier "
          "context, so larger chunks prefill long prompts faster; activation memory grows with it (about "
          "0.2 MB a token for an 8B model). CPU workers take 512");
ABSL_FLAG(double, collective_timeout_s, 300,
          "A worker whose peers do not join a collective within this many seconds ends the job");
ABSL_FLAG(double, worker_timeout_s, 600,
          "The coordinator ends the job when a worker does not report a step within this many seconds");
ABSL_FLAG(int64_t, debug_fail_worker_at_step, -1,
          "Test only: worker --debug_fault_worker_rank fails its requests at this step (from 0)");
ABSL_FLAG(int64_t, debug_kill_worker_at_step, -1,
          "Test only: worker --debug_fault_worker_rank kills itself (SIGKILL) at this step");
ABSL_FLAG(int64_t, debug_hang_worker_at_step, -1, "Test only: worker --debug_fault_worker_rank hangs at this step");
ABSL_FLAG(int, debug_fault_worker_rank, 1, "Test only: the MPI rank (1..N) of the faulty worker");

ABSL_DECLARE_FLAG(std::string, kv_scheme);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, calibration);

namespace kvshard {
namespace {

// GpuModelOptions::graph_rows, for GPU workers and the single-process GPU backend alike.
absl::StatusOr<int> CudaGraphRowsFromFlags() {
  const int rows = absl::GetFlag(FLAGS_cuda_graph_rows);
  if (rows < 0) return absl::InvalidArgumentError("--cuda_graph_rows must not be negative");
  return rows;
}

// GpuModelOptions::max_chunk, likewise.
absl::StatusOr<int> GpuPrefillChunkFromFlags() {
  const int chunk = absl::GetFlag(FLAGS_gpu_prefill_chunk);
  if (chunk < 1 || chunk > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu_prefill_chunk ", chunk, " is not in 1..65535"));
  }
  return chunk;
}

// DeviceKvStoreOptions::key_outlier_headroom, likewise.
absl::StatusOr<double> KeyOutlierHeadroomFromFlags() {
  const double headroom = absl::GetFlag(FLAGS_kv_outlier_headroom);
  if (!(headroom >= 1.0 && headroom <= 100.0)) {
    return absl::InvalidArgumentError(absl::StrCat("--kv_outlier_headroom ", headroom, " is not in [1, 100]"));
  }
  return headroom;
}

}  // namespace

std::optional<SyntheticModelSpec> SyntheticSpecFromFlags() {
  if (!absl::GetFlag(FLAGS_synthetic_model)) return std::nullopt;
  SyntheticModelSpec spec;
  spec.n_layers = absl::GetFlag(FLAGS_synthetic_layers);
  spec.hidden = absl::GetFlag(FLAGS_synthetic_hidden);
  spec.n_heads = absl::GetFlag(FLAGS_synthetic_heads);
  spec.n_kv_heads = absl::GetFlag(FLAGS_synthetic_kv_heads);
  spec.head_dim = absl::GetFlag(FLAGS_synthetic_head_dim);
  spec.ffn_hidden = absl::GetFlag(FLAGS_synthetic_ffn);
  spec.vocab_size = absl::GetFlag(FLAGS_synthetic_vocab);
  spec.max_context = absl::GetFlag(FLAGS_synthetic_max_context);
  spec.rope_theta = static_cast<float>(absl::GetFlag(FLAGS_synthetic_rope_theta));
  spec.seed = absl::GetFlag(FLAGS_synthetic_seed);
  return spec;
}

absl::StatusOr<std::pair<ModelConfig, std::unique_ptr<Tokenizer>>> LoadModelDescription(
    const std::string& model_path, const std::optional<SyntheticModelSpec>& synthetic) {
  if (synthetic) {
    KV_ASSIGN_OR_RETURN(ModelConfig config, SyntheticModelConfig(*synthetic));
    KV_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, MakeByteTokenizer(config.vocab_size));
    return std::make_pair(std::move(config), std::move(tokenizer));
  }
  ModelConfig config;
  std::unique_ptr<Tokenizer> tokenizer;
  if (std::filesystem::is_directory(model_path)) {
    const std::filesystem::path dir(model_path);
    KV_ASSIGN_OR_RETURN(std::string json, ReadTextFile((dir / "config.json").string()));
    KV_ASSIGN_OR_RETURN(config, ModelConfigFromHfJson(json));
    KV_ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromJsonFile((dir / "tokenizer.json").string()));
  } else {
    KV_ASSIGN_OR_RETURN(auto gguf, GgufFile::Open(model_path));
    KV_ASSIGN_OR_RETURN(config, ModelConfigFromGguf(*gguf));
    KV_ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromGguf(*gguf));
  }
  if (config.name.empty()) config.name = std::filesystem::path(model_path).stem().string();
  return std::make_pair(std::move(config), std::move(tokenizer));
}

std::string DefaultCalibrationPath(const std::string& model_path) {
  if (model_path.empty()) return "";
  const std::filesystem::path model = std::filesystem::absolute(model_path);
  if (std::filesystem::is_directory(model)) return (model / "kvshard.kvcal").string();
  return model.string() + ".kvcal";
}

absl::StatusOr<KvSettings> KvSettingsFromFlags(const std::string& model_path) {
  KvSettings settings;
  settings.scheme = absl::GetFlag(FLAGS_kv_scheme);
  settings.calibration_path = absl::GetFlag(FLAGS_calibration);
  const std::string beside = DefaultCalibrationPath(model_path);
  if (settings.calibration_path.empty() && !beside.empty() && std::filesystem::is_regular_file(beside)) {
    settings.calibration_path = beside;
  }
  if (!settings.calibration_path.empty()) {
    settings.calibration_path = std::filesystem::absolute(settings.calibration_path).string();
  }
  if (settings.scheme == "auto") {
    if (!settings.calibration_path.empty()) {
      settings.scheme = "kvq3";
      settings.note = absl::StrCat("auto: calibration ", settings.calibration_path);
    } else {
      settings.scheme = "fp16";
      if (!beside.empty()) {
        settings.note = absl::StrCat("auto: kvq3 needs a calibration of the model, which `kvshard calibrate "
                                     "--model ", model_path, " --text FILE` writes to ", beside);
      }
    }
  }
  return settings;
}

absl::StatusOr<DistributedEngineOptions> DistributedOptionsFromFlags(std::string* kv_note) {
  DistributedEngineOptions options;
  WorkerConfig& w = options.worker;
  w.synthetic = SyntheticSpecFromFlags();
  if (!w.synthetic) {
    KV_ASSIGN_OR_RETURN(w.model_path, ResolveModelPath());
    w.model_path = std::filesystem::absolute(w.model_path).string();
  }
  KV_ASSIGN_OR_RETURN(KvSettings kv, KvSettingsFromFlags(w.model_path));
  if (kv_note != nullptr) *kv_note = kv.note;
  options.default_kv_scheme = kv.scheme;
  w.calibration_path = kv.calibration_path;
  // The coordinator measures each scheme's bytes per token with the same factory the workers make (they
  // check the calibration against the weights they load).
  KV_ASSIGN_OR_RETURN(options.kv_factory, KvShardFactoryMakerForThisBuild()(w.calibration_path, nullptr));
  const int64_t budget_mb = absl::GetFlag(FLAGS_worker_kv_budget_mb);
  if (budget_mb < 0) return absl::InvalidArgumentError("--worker_kv_budget_mb must not be negative (0: automatic)");
  w.kv_budget_bytes = budget_mb << 20;
  w.threads = absl::GetFlag(FLAGS_worker_threads);
  w.device = absl::GetFlag(FLAGS_device);
  KV_ASSIGN_OR_RETURN(w.merge.mode, ParseMergeMode(absl::GetFlag(FLAGS_merge)));
  KV_ASSIGN_OR_RETURN(w.merge.wire, ParseWireType(absl::GetFlag(FLAGS_partials_wire)));
  w.collective_timeout_s = absl::GetFlag(FLAGS_collective_timeout_s);
  KV_ASSIGN_OR_RETURN(w.key_outlier_headroom, KeyOutlierHeadroomFromFlags());
  KV_ASSIGN_OR_RETURN(w.cuda_graph_rows, CudaGraphRowsFromFlags());
  KV_ASSIGN_OR_RETURN(w.gpu_prefill_chunk, GpuPrefillChunkFromFlags());
  w.faults.fail_step = absl::GetFlag(FLAGS_debug_fail_worker_at_step);
  w.faults.kill_step = absl::GetFlag(FLAGS_debug_kill_worker_at_step);
  w.faults.hang_step = absl::GetFlag(FLAGS_debug_hang_worker_at_step);
  w.faults.worker = absl::GetFlag(FLAGS_debug_fault_worker_rank) - 1;
  options.placement.single_worker_threshold = absl::GetFlag(FLAGS_single_worker_threshold_tokens);
  options.synthetic_fill_tokens = absl::GetFlag(FLAGS_synthetic_fill_tokens);
  if (options.synthetic_fill_tokens < 0) return absl::InvalidArgumentError("--synthetic_fill_tokens must not be negative");
  options.synthetic_fill_seed = absl::GetFlag(FLAGS_synthetic_fill_seed);
  options.max_batch = absl::GetFlag(FLAGS_max_batch);
  options.worker_timeout_s = absl::GetFlag(FLAGS_worker_timeout_s);
  if (options.worker_timeout_s <= 0 || w.collective_timeout_s <= 0) {
    return absl::InvalidArgumentError("--worker_timeout_s and --collective_timeout_s must be positive");
  }
  return options;
}

KvShardFactoryMaker KvShardFactoryMakerForThisBuild() {
  return [](const std::string& calibration_path, const ModelWeights* weights) -> absl::StatusOr<KvShardFactory> {
    std::shared_ptr<const Calibration> calibration;
    if (!calibration_path.empty()) {
      KV_ASSIGN_OR_RETURN(Calibration c, LoadCalibration(calibration_path));
      if (weights != nullptr) {
        KV_RETURN_IF_ERROR(Annotate(CheckCalibrationForModel(c, ModelIdentityOf(*weights)), calibration_path));
      }
      calibration = std::make_shared<const Calibration>(std::move(c));
    }
    return AllSchemesKvShardFactory(std::move(calibration));
  };
}

absl::StatusOr<std::unique_ptr<DistributedEngine>> CreateDistributedEngine(ModelConfig config,
                                                                            std::unique_ptr<Tokenizer> tokenizer,
                                                                            DistributedEngineOptions options) {
  if (MpiRuntime* mpi = MpiRuntime::Get(); mpi != nullptr && mpi->n_workers() > 0) {
    return DistributedEngine::Create(*mpi, std::move(config), std::move(tokenizer), std::move(options));
  }
  return DistributedEngine::CreateInProcess(std::move(config), std::move(tokenizer), std::move(options),
                                            KvShardFactoryMakerForThisBuild());
}

absl::StatusOr<std::unique_ptr<Engine>> CreateEngineFromFlags(std::string* kv_note) {
  KV_ASSIGN_OR_RETURN(DistributedEngineOptions options, DistributedOptionsFromFlags(kv_note));
  KV_ASSIGN_OR_RETURN(auto description, LoadModelDescription(options.worker.model_path, options.worker.synthetic));
  KV_ASSIGN_OR_RETURN(std::unique_ptr<DistributedEngine> engine,
                      CreateDistributedEngine(std::move(description.first), std::move(description.second),
                                              std::move(options)));
  return std::unique_ptr<Engine>(std::move(engine));
}

}  // namespace kvshard
