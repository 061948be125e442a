// main() of the multi-rank tests of the distributed engine (*_engine_test.cc): rank 0 runs the tests,
// which create DistributedEngines; ranks 1..N are workers until rank 0 shuts them down.
#include <cstdio>

#include "coordinator/distributed_engine.h"
#include "coordinator/engine_factory.h"
#include "gtest/gtest.h"
#include "worker/kv_shard_factory.h"
#include "worker/mpi_runtime.h"
#include "worker/worker_runtime.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
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
