// The per-layer cross-worker merge of attention partials on GPUs (worker/cuda/nccl_merge.h), under
// `mpirun -np 1+N` (rank 0 is the coordinator and idles; workers 1..N, one GPU each):
//
//   mpirun -x NCCL_NVLS_ENABLE=0 -np 3 build/bench/nccl_merge_bench
//
// One line per (mode, wire, batch): 32 query heads, head_dim 128, rows = batch x 32. Times are CUDA
// events on worker 0, medians over --iters; warm-up first, until worker 0 has merged for 0.3 s.
//   gpu_us: one merge as the host enqueues it; before each, the workers' streams are idle and the
//     workers start together (MeetAndRelease: within microseconds on one node), so it includes the
//     host's enqueue time and next to no launch skew.
//   graph_us: the same merge captured once into a CUDA graph (cudaStreamBeginCapture) and replayed, one
//     replay per timing, same protocol.
//   b2b_us: --layers merges enqueued back to back (as a decode step issues them, one per layer, without
//     the layers' other work), divided by --layers; the host's enqueue overlaps the GPU's work.
// mpi_cpu_us is the same merge of host buffers through the CPU backend (MergePartialsAcrossWorkers over
// MPI), median of wall-clock times from the same start, in the same run. #wrong: values of every worker's last eager merge
// and last graph replay outside the bounds of MergeOutTolerance against MergePartialsCpu over all
// workers' partials (as in nccl-tests, it should read 0).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "tests/mpi/seeded_partials.h"
#include "worker/cuda/nccl_collectives.h"
#include "worker/cuda/nccl_merge.h"
#include "worker/distributed_attention.h"
#include "worker/mpi_runtime.h"

ABSL_FLAG(int, iters, 200, "timed merges per line");
ABSL_FLAG(double, warmup_seconds, 0.3, "warm-up time per line (worker 0's clock)");
ABSL_FLAG(int, layers, 32, "merges enqueued back to back for b2b_us");

namespace kvshard {
namespace {

constexpr int kHeads = 32;
constexpr int kHeadDim = 128;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Meets the other workers and returns at one instant on all of them: after a barrier, worker 0 names an
// instant 1 ms ahead on the node's monotonic clock (the workers share one node), and every worker spins
// until then. An MPI barrier alone lets the workers go up to ~200 us apart (its polls sleep between
// tries), which a timing that starts on one worker would count.
absl::Status MeetAndRelease(Collectives& mpi) {
  float x = 0;
  KV_RETURN_IF_ERROR(mpi.AllReduce(&x, 1, WireType::kF32, ReduceOp::kSum));
  auto now_ns = [] {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  int64_t release_ns = mpi.rank() == 0 ? now_ns() + 1'000'000 : 0;
  KV_RETURN_IF_ERROR(mpi.Broadcast(&release_ns, sizeof(release_ns), 0));
  while (now_ns() < release_ns) {
  }
  return absl::OkStatus();
}

struct Line {
  double gpu_us = 0;
  double graph_us = 0;
  double b2b_us = 0;
  double mpi_cpu_us = 0;
  int64_t wrong = 0;
};

absl::StatusOr<Line> RunLine(Collectives& mpi, NcclCollectives& nccl, const MergeOptions& options, int batch,
                             int iters, double warmup_seconds, int layers_per_step) {
  const int64_t rows = static_cast<int64_t>(batch) * kHeads;
  const int n = nccl.size();
  const testing::Partials mine = testing::SeededPartials(nccl.rank(), rows, kHeadDim, -1);
  cudaStream_t stream = nccl.stream();
  float *in_out = nullptr, *in_lse = nullptr, *out = nullptr, *lse = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&in_out, mine.out.size() * sizeof(float)));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&in_lse, mine.lse.size() * sizeof(float)));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&out, mine.out.size() * sizeof(float)));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&lse, mine.lse.size() * sizeof(float)));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(in_out, mine.out.data(), mine.out.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(in_lse, mine.lse.data(), mine.lse.size() * sizeof(float), cudaMemcpyHostToDevice));
  NcclPartialsMerger merger(nccl);
  auto reset_inputs = [&]() -> absl::Status {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out, in_out, mine.out.size() * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lse, in_lse, mine.lse.size() * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    return absl::OkStatus();
  };

  // Warm-up in rounds of 20 merges until worker 0 has spent warmup_seconds (its decision is broadcast,
  // so every worker runs the same number of collectives).
  const auto warm_start = std::chrono::steady_clock::now();
  for (bool more = true; more;) {
    for (int i = 0; i < 20; ++i) {
      KV_RETURN_IF_ERROR(reset_inputs());
      KV_RETURN_IF_ERROR(merger.Merge(options, rows, kHeadDim, out, lse));
    }
    KV_RETURN_IF_ERROR(nccl.Synchronize());
    uint8_t go = std::chrono::duration<double>(std::chrono::steady_clock::now() - warm_start).count() < warmup_seconds;
    KV_RETURN_IF_ERROR(mpi.Broadcast(&go, 1, 0));
    more = go != 0;
  }

  Line line;
  cudaEvent_t start, stop;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
  // Median over `reps` of the CUDA-event time around `enqueue`, each after (when `reset`) the inputs
  // were reset, the stream drained and the workers released together.
  auto median_time = [&](absl::FunctionRef<absl::Status()> enqueue, int reps, bool reset) -> absl::StatusOr<double> {
    std::vector<double> times;
    for (int i = 0; i < reps; ++i) {
      if (reset) KV_RETURN_IF_ERROR(reset_inputs());
      KV_RETURN_IF_ERROR(nccl.Synchronize());
      KV_RETURN_IF_ERROR(MeetAndRelease(mpi));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(start, stream));
      KV_RETURN_IF_ERROR(enqueue());
      CUDA_RETURN_IF_ERROR(cudaEventRecord(stop, stream));
      KV_RETURN_IF_ERROR(nccl.Synchronize());
      float ms = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start, stop));
      times.push_back(ms * 1e3);
    }
    return Median(times);
  };
  // This worker's count of values of the last merge outside the bounds, against the CPU merge of all
  // workers' partials.
  const testing::Partials want = testing::ReferenceMerge(n, rows, kHeadDim, -1);
  auto count_wrong = [&]() -> absl::StatusOr<int64_t> {
    KV_RETURN_IF_ERROR(nccl.Synchronize());
    testing::Partials got;
    got.out.resize(mine.out.size());
    got.lse.resize(mine.lse.size());
    CUDA_RETURN_IF_ERROR(cudaMemcpy(got.out.data(), out, got.out.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(got.lse.data(), lse, got.lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return testing::CountMergeMismatches(got, want, testing::MergeOutTolerance(options.mode, options.wire, n));
  };
  auto merge = [&]() { return merger.Merge(options, rows, kHeadDim, out, lse); };

  KV_ASSIGN_OR_RETURN(line.gpu_us, median_time(merge, iters, true));
  KV_ASSIGN_OR_RETURN(int64_t wrong, count_wrong());

  // The same merge as a CUDA graph: captured once (the workspace and NCCL's connections exist after the
  // warm-up), replayed per timing.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const absl::Status captured = merge();
  const cudaError_t capture_ended = cudaStreamEndCapture(stream, &graph);
  KV_RETURN_IF_ERROR(captured);
  CUDA_RETURN_IF_ERROR(capture_ended);
  CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&graph_exec, graph, 0));
  auto replay = [&]() -> absl::Status {
    CUDA_RETURN_IF_ERROR(cudaGraphLaunch(graph_exec, stream));
    return absl::OkStatus();
  };
  for (int i = 0; i < 20; ++i) {
    KV_RETURN_IF_ERROR(reset_inputs());
    KV_RETURN_IF_ERROR(replay());
  }
  KV_ASSIGN_OR_RETURN(line.graph_us, median_time(replay, iters, true));
  KV_ASSIGN_OR_RETURN(int64_t graph_wrong, count_wrong());
  wrong += graph_wrong;
  // Graphs hold a reference on the communicator (its finalize waits for them).
  CUDA_RETURN_IF_ERROR(cudaGraphExecDestroy(graph_exec));
  CUDA_RETURN_IF_ERROR(cudaGraphDestroy(graph));

  // Back to back, in place on the merged values (they stay finite: equal partials merge to themselves).
  auto layers = [&]() -> absl::Status {
    for (int l = 0; l < layers_per_step; ++l) KV_RETURN_IF_ERROR(merge());
    return absl::OkStatus();
  };
  KV_ASSIGN_OR_RETURN(const double step_us, median_time(layers, std::max(iters / 10, 5), false));
  line.b2b_us = step_us / layers_per_step;

  float wrong_everywhere = static_cast<float>(wrong);
  KV_RETURN_IF_ERROR(mpi.AllReduce(&wrong_everywhere, 1, WireType::kF32, ReduceOp::kSum));
  line.wrong = static_cast<int64_t>(wrong_everywhere);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(in_out);
  cudaFree(in_lse);
  cudaFree(out);
  cudaFree(lse);

  // The CPU backend's merge of the same partials over MPI, for comparison.
  std::vector<double> cpu_times;
  for (int i = 0; i < std::min(iters, 100); ++i) {
    std::vector<float> o = mine.out, l = mine.lse;
    KV_RETURN_IF_ERROR(MeetAndRelease(mpi));
    const auto t0 = std::chrono::steady_clock::now();
    KV_RETURN_IF_ERROR(MergePartialsAcrossWorkers(mpi, options, rows, kHeadDim, o.data(), l.data()));
    cpu_times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  line.mpi_cpu_us = Median(cpu_times);
  return line;
}

int RunWorker(MpiRuntime& runtime) {
  auto mpi = runtime.MakeWorkerCollectives(absl::Seconds(120));
  if (!mpi.ok()) {
    std::fprintf(stderr, "%s\n", std::string(mpi.status().message()).c_str());
    return 1;
  }
  const bool report = (*mpi)->rank() == 0;
  const int gpus = CudaDeviceCount();
  if (gpus < (*mpi)->size()) {
    if (report) std::printf("SKIPPED: %d workers need as many GPUs; this machine has %d\n", (*mpi)->size(), gpus);
    return 0;
  }
  cudaSetDevice((*mpi)->rank() % gpus);  // one node: worker i on GPU i
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  auto nccl = NcclCollectives::Create(**mpi, stream, absl::Seconds(60));
  if (!nccl.ok()) {
    std::fprintf(stderr, "%s\n", std::string(nccl.status().message()).c_str());
    return 1;
  }
  int nccl_version = 0;
  ncclGetVersion(&nccl_version);
  if (report) {
    std::printf("# %s; %d workers, one GPU each; NCCL %d; NCCL_NVLS_ENABLE=%s\n", bench::DeviceSummary().c_str(),
                (*mpi)->size(), nccl_version, std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "unset");
    std::printf("# per-layer merge, %d query heads, head_dim %d; gpu_us, graph_us: median of %d (CUDA events); "
                "b2b_us: %d merges back to back, per merge\n",
                kHeads, kHeadDim, absl::GetFlag(FLAGS_iters), absl::GetFlag(FLAGS_layers));
    std::printf("%-9s %-4s %5s %5s %11s %9s %9s %9s %7s %11s\n", "mode", "wire", "batch", "rows", "bytes/wkr",
                "gpu_us", "graph_us", "b2b_us", "#wrong", "mpi_cpu_us");
  }
  int failures = 0;
  for (int batch : {1, 16}) {
    for (MergeMode mode : {MergeMode::kAllGather, MergeMode::kTree}) {
      for (WireType wire : {WireType::kF32, WireType::kBf16}) {
        const MergeOptions options{mode, wire};
        auto line = RunLine(**mpi, **nccl, options, batch, absl::GetFlag(FLAGS_iters),
                            absl::GetFlag(FLAGS_warmup_seconds), absl::GetFlag(FLAGS_layers));
        if (!line.ok()) {
          std::fprintf(stderr, "worker %d: %s\n", (*mpi)->rank(), std::string(line.status().message()).c_str());
          return 1;
        }
        failures += line->wrong > 0;
        if (report) {
          const int64_t rows = static_cast<int64_t>(batch) * kHeads;
          std::printf("%-9s %-4s %5d %5lld %11lld %9.2f %9.2f %9.2f %7lld %11.2f\n", MergeModeName(mode).c_str(),
                      WireTypeName(wire).c_str(), batch, static_cast<long long>(rows),
                      static_cast<long long>(NcclPartialsMerger::WireBytesPerWorker(options, rows, kHeadDim)),
                      line->gpu_us, line->graph_us, line->b2b_us, static_cast<long long>(line->wrong),
                      line->mpi_cpu_us);
          std::fflush(stdout);
        }
      }
    }
  }
  nccl->reset();
  cudaStreamDestroy(stream);
  return failures > 0 ? 3 : 0;
}

}  // namespace
}  // namespace kvshard

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto runtime = kvshard::MpiRuntime::Initialize(&argc, &argv);
  if (!runtime.ok()) {
    std::fprintf(stderr, "%s\n", std::string(runtime.status().message()).c_str());
    return 2;
  }
  int code = 0;
  if ((*runtime)->world_size() < 2) {
    std::printf("SKIPPED: no workers (start under mpirun with 1 + N ranks)\n");
  } else if (!(*runtime)->is_coordinator()) {
    code = kvshard::RunWorker(**runtime);
  }
  (*runtime)->Finalize();
  return code;
}
