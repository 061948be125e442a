// The engine of the *_engine_test programs (engine_main.cc): under mpirun, over the job's workers; run
// alone (no mpirun), over single-process mode's one in-process worker, as `kvshard` without mpirun.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "coordinator/distributed_engine.h"

namespace kvshard {

absl::StatusOr<std::unique_ptr<DistributedEngine>> CreateTestEngine(ModelConfig config,
                                                                     std::unique_ptr<Tokenizer> tokenizer,
                                                                     DistributedEngineOptions options);
// Workers of the engines CreateTestEngine makes.
int TestEngineWorkers();

}  // namespace kvshard
