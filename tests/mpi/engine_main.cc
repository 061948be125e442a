// main() of the tests of the distributed engine (*_engine_test.cc). Under mpirun rank 0 runs the tests,
// which create DistributedEngines, and ranks 1..N are workers until rank 0 shuts them down. Run alone, the
// tests' engines each have one in-process worker (single-process mode).
#include <cstdio>

#include "coordinator/distributed_engine.h"
#include "coordinator/engine_factory.h"
#include "gtest/gtest.h"
#include "tests/mpi/test_engine.h"
#include "worker/kv_shard_factory.h"
#include "worker/mpi_runtime.h"
#include "worker/worker_runtime.h"

namespace kvshard {

int TestEngineWorkers() { return MpiRuntime::Get() != nullptr ? MpiRuntime::Get()->n_workers() : 1; }
std::string TestEngineWorkerName(int rank) {
  return MpiRuntime::Get() != nullptr ? MpiRuntime::Get()->WorkerName(rank) : "worker";
}

}  // namespace kvshard

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!kvshard::LaunchedByMpirunWithPeers()) {
    std::printf("no mpirun: each engine runs over one in-process worker\n");
    return RUN_ALL_TESTS();
  }
  auto mpi = kvshard::MpiRuntime::Initialize(&argc, &argv);
  if (!mpi.ok()) {
    std::fprintf(stderr, "%s\n", std::string(mpi.status().message()).c_str());
    return 2;
  }
  int code = 0;
  if ((*mpi)->is_coordinator()) {
    code = RUN_ALL_TESTS();
    kvshard::ShutdownWorkers(**mpi);
  } else {
    code = kvshard::RunWorker(**mpi, kvshard::KvShardFactoryMakerForThisBuild());
  }
  (*mpi)->Finalize();
  return code;
}
