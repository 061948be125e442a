// The engine the settings ask for: the distributed engine, over the workers of mpirun (on rank 0) or, in
// single-process mode, over one in-process worker. Every front end (generate, summarize, serve, run-batch)
// makes its engine here.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/distributed_engine.h"
#include "coordinator/engine.h"
#include "worker/kv_shard_factory.h"
#include "worker/synthetic.h"

namespace kvshard {

// `kv_note`, when given, receives what --kv_scheme auto chose and why (empty when it was not auto), for
// the command to show.
absl::StatusOr<std::unique_ptr<Engine>> CreateEngineFromFlags(std::string* kv_note = nullptr);

// The KV shard factories of every scheme this binary knows, from a calibration file (empty: none). The
// engines here and the workers (RunWorker) make theirs with it.
KvShardFactoryMaker KvShardFactoryMakerForThisBuild();

// Where a model's calibration is looked for when --calibration is empty: MODEL.kvcal beside a model file,
// DIR/kvshard.kvcal in a Hugging Face directory ("" for no model: a synthetic one). `kvshard calibrate`
// writes there by default.
std::string DefaultCalibrationPath(const std::string& model_path);

// The KV scheme and calibration the engine uses, from --kv_scheme and --calibration. An empty
// --calibration takes DefaultCalibrationPath(model_path) when that file exists. --kv_scheme auto (the
// default) is kvq3 when there is a calibration, else fp16; `note` says which and why.
struct KvSettings {
  std::string scheme;
  std::string calibration_path;  // absolute; empty: none
  std::string note;              // empty unless the scheme was chosen by auto
};
absl::StatusOr<KvSettings> KvSettingsFromFlags(const std::string& model_path);

// The pieces, for tests and tools.
// The distributed engine over this process's job: the workers of mpirun (on rank 0), or without mpirun
// one in-process worker.
absl::StatusOr<std::unique_ptr<DistributedEngine>> CreateDistributedEngine(ModelConfig config,
                                                                            std::unique_ptr<Tokenizer> tokenizer,
                                                                            DistributedEngineOptions options);
// --synthetic_model: the synthetic geometry from the --synthetic_* flags; nullopt otherwise.
std::optional<SyntheticModelSpec> SyntheticSpecFromFlags();
// The distributed engine's options from the flags (model, budget, merge, timeouts, faults, ...).
absl::StatusOr<DistributedEngineOptions> DistributedOptionsFromFlags(std::string* kv_note = nullptr);
// The coordinator's view of a model (config and tokenizer, no weights): a .gguf file, a Hugging Face
// directory, or a synthetic spec (byte tokenizer).
absl::StatusOr<std::pair<ModelConfig, std::unique_ptr<Tokenizer>>> LoadModelDescription(
    const std::string& model_path, const std::optional<SyntheticModelSpec>& synthetic);

}  // namespace kvshard
