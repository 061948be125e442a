// main() of the multi-rank tests that run the same code on every rank (*_spmd_test.cc): every rank runs
// every test; rank 0 prints the usual report, the other ranks print only their failures. The exit code
// is non-zero when any rank failed.
//
// Built with KVSHARD_TESTS_ON_WORKERS_ONLY (*_workers_test.cc), rank 0 plays the coordinator and runs no
// test; the workers (ranks 1..N) run every test and worker 0 (rank 1) prints the report. The tests make
// their own collectives over the workers (MpiRuntime::MakeWorkerCollectives).
#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>

#include "common/host_resources.h"
#include "gtest/gtest.h"
#include "worker/mpi_runtime.h"

namespace {

class FailuresOnly : public ::testing::EmptyTestEventListener {
 public:
  explicit FailuresOnly(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.summary());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto mpi = kvshard::MpiRuntime::Initialize(&argc, &argv);
  if (!mpi.ok()) {
    std::fprintf(stderr, "%s\n", std::string(mpi.status().message()).c_str());
    return 2;
  }
  const int rank = (*mpi)->world_rank();
  // The ranks share the node's cores, as workers do (worker_runtime.cc).
  omp_set_num_threads(kvshard::ThreadsPerRank((*mpi)->ranks_on_node()));
#ifdef KVSHARD_TESTS_ON_WORKERS_ONLY
  const int reporting_rank = 1;
  const bool runs_tests = rank != 0;
#else
  const int reporting_rank = 0;
  const bool runs_tests = true;
#endif
  if (rank != reporting_rank) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailuresOnly(rank));
  }
#ifdef KVSHARD_TESTS_ON_WORKERS_ONLY
  if ((*mpi)->world_size() < 2) std::printf("SKIPPED: no workers (start under mpirun with 1 + N ranks)\n");
#endif
  int failed = runs_tests && RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  (*mpi)->Finalize();
  return any_failed;
}
