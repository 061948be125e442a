// The engine the settings ask for: under mpirun with workers (on rank 0) the distributed engine, else
// the single-process engine. Every front end (generate, summarize, serve, run-batch) makes its engine here.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "coordinator/distributed_engine.h"
#include "coordinator/engine.h"
#include "worker/kv_shard_factory.h"
#include "worker/synthetic.h"

namespace kvshard {

absl::StatusOr<std::unique_ptr<Engine>> CreateEngineFromFlags();

// The KV shard factories of every scheme this binary knows, from a calibration file (empty: none). The
// engines here and the workers (RunWorker) make theirs with it.
KvShardFactoryMaker KvShardFactoryMakerForThisBuild();

// The pieces, for tests and tools.
// --synthetic_model: the synthetic geometry from the --synthetic_* flags; nullopt otherwise.
std::optional<SyntheticModelSpec> SyntheticSpecFromFlags();
// The distributed engine's options from the flags (model, budget, merge, timeouts, faults, ...).
absl::StatusOr<DistributedEngineOptions> DistributedOptionsFromFlags();
// The coordinator's view of a model (config and tokenizer, no weights): a .gguf file, a Hugging Face
// directory, or a synthetic spec (byte tokenizer).
absl::StatusOr<std::pair<ModelConfig, std::unique_ptr<Tokenizer>>> LoadModelDescription(
    const std::string& model_path, const std::optional<SyntheticModelSpec>& synthetic);

}  // namespace kvshard
