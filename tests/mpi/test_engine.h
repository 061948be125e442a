// The *_engine_test programs (engine_main.cc) run under mpirun, their engines over the job's workers, and
// alone, each engine over one in-process worker (CreateDistributedEngine, coordinator/engine_factory.h).
#pragma once

#include <string>

namespace kvshard {

// Workers of the engines CreateDistributedEngine makes in this program.
int TestEngineWorkers();
// How their messages name the worker of world rank `rank` (JobRuntime::WorkerName).
std::string TestEngineWorkerName(int rank);

}  // namespace kvshard
