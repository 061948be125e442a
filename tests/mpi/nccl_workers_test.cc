// The NCCL data plane on the workers of `mpirun -np 1+N` (one GPU each; rank 0 is the coordinator and
// runs nothing): the collectives with seeded inputs whose results are exact (bit-exact for all-gather,
// broadcast and exchange, and for sums and maxima of small integers in fp32 and bf16; an all-reduce also
// replayed from a CUDA graph), the GPU cross-worker merge of attention partials in both modes and wire
// types against MergePartialsCpu over every worker's partials, and a peer that does not take part: in a
// collective, in the join, or in the first use of a connection (DeadlineExceeded naming the operation,
// within the timeout). Skips when the machine has fewer GPUs than workers (CI has none).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_status.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/mpi/seeded_partials.h"
#include "worker/cuda/nccl_collectives.h"
#include "worker/cuda/nccl_merge.h"
#include "worker/mpi_runtime.h"

namespace kvshard {
namespace {

using testing::CountMismatches;
using testing::DeviceBuffer;

// The workers' MPI collectives (the bootstrap), this worker's GPU and stream, and the NCCL communicator
// shared by the tests; made on first use.
struct Workers {
  std::unique_ptr<Collectives> mpi;
  cudaStream_t stream = nullptr;
  std::unique_ptr<NcclCollectives> nccl;
};

// Empty when the test must skip; the reason goes to `why`.
Workers* GetWorkers(std::string* why) {
  static Workers* workers = nullptr;
  static std::string skip;
  if (workers == nullptr && skip.empty()) {
    MpiRuntime* runtime = MpiRuntime::Get();
    const int n_workers = runtime->n_workers();
    const int gpus = CudaDeviceCount();
    if (gpus < n_workers) {
      skip = "SKIPPED: " + std::to_string(n_workers) + " workers need as many GPUs; this machine has " +
             std::to_string(gpus);
    } else {
      auto* w = new Workers();
      auto mpi = runtime->MakeWorkerCollectives(absl::Seconds(120));
      if (!mpi.ok()) {
        skip = std::string(mpi.status().message());
      } else {
        w->mpi = std::move(*mpi);
        cudaSetDevice(w->mpi->rank() % gpus);  // one node: worker i on GPU i
        cudaStreamCreateWithFlags(&w->stream, cudaStreamNonBlocking);
        auto nccl = NcclCollectives::Create(*w->mpi, w->stream, absl::Seconds(60));
        if (!nccl.ok()) {
          ADD_FAILURE() << nccl.status();
          skip = "no NCCL communicator";
        } else {
          w->nccl = std::move(*nccl);
          workers = w;
        }
      }
    }
  }
  *why = skip;
  return workers;
}

#define KV_GET_WORKERS_OR_SKIP(var)     \
  std::string var##_why;                \
  Workers* var = GetWorkers(&var##_why); \
  if (var == nullptr) GTEST_SKIP() << var##_why

template <typename T>
std::vector<T> Download(NcclCollectives& nccl, const DeviceBuffer<T>& buffer) {
  const absl::Status synced = nccl.Synchronize();
  EXPECT_TRUE(synced.ok()) << synced;
  return buffer.Download();
}

TEST(NcclCollectivesTest, AllReduceSumAndMaxOfSmallIntegersAreExact) {
  KV_GET_WORKERS_OR_SKIP(w);
  NcclCollectives& nccl = *w->nccl;
  const int n = nccl.size(), me = nccl.rank();
  for (int64_t count : {int64_t{1}, int64_t{1023}, int64_t{(1 << 20) + 3}}) {
    // fp32: sums below 2^24 and bf16: sums below 2^8 are exact whatever the order of the additions.
    std::vector<float> sum_in(count), max_in(count), want_sum(count), want_max(count, -1e30f);
    std::vector<uint16_t> bf16_in(count), want_bf16(count);
    for (int64_t i = 0; i < count; ++i) {
      sum_in[i] = static_cast<float>((me + 1) * (i % 97));
      want_sum[i] = static_cast<float>((i % 97) * n * (n + 1) / 2);
      for (int r = 0; r < n; ++r) want_max[i] = std::max(want_max[i], static_cast<float>((i * 7 + r * 13) % 101 - 50));
      max_in[i] = static_cast<float>((i * 7 + me * 13) % 101 - 50);
      bf16_in[i] = FloatToBf16(static_cast<float>((me + 1) * (i % 8)));
      want_bf16[i] = FloatToBf16(static_cast<float>((i % 8) * n * (n + 1) / 2));
    }
    DeviceBuffer<float> sum = testing::ToDevice(sum_in), max = testing::ToDevice(max_in);
    DeviceBuffer<uint16_t> bf16 = testing::ToDevice(bf16_in);
    ASSERT_TRUE(nccl.AllReduce(sum.get(), count, WireType::kF32, ReduceOp::kSum).ok());
    ASSERT_TRUE(nccl.AllReduce(max.get(), count, WireType::kF32, ReduceOp::kMax).ok());
    ASSERT_TRUE(nccl.AllReduce(bf16.get(), count, WireType::kBf16, ReduceOp::kSum).ok());
    EXPECT_EQ(Download(nccl, sum), want_sum) << count;
    EXPECT_EQ(Download(nccl, max), want_max) << count;
    EXPECT_EQ(Download(nccl, bf16), want_bf16) << count;
  }
}

uint8_t SeededByte(int rank, int64_t i) { return static_cast<uint8_t>((rank * 131 + i * 7 + (i >> 8)) & 0xff); }

TEST(NcclCollectivesTest, AllGatherIsBitExactAlsoInPlace) {
  KV_GET_WORKERS_OR_SKIP(w);
  NcclCollectives& nccl = *w->nccl;
  const int n = nccl.size(), me = nccl.rank();
  for (int64_t bytes : {int64_t{1}, int64_t{4097}, int64_t{1} << 20}) {
    std::vector<uint8_t> mine(bytes), want(bytes * n);
    for (int64_t i = 0; i < bytes; ++i) mine[i] = SeededByte(me, i);
    for (int r = 0; r < n; ++r)
      for (int64_t i = 0; i < bytes; ++i) want[r * bytes + i] = SeededByte(r, i);
    DeviceBuffer<uint8_t> send = testing::ToDevice(mine), recv(bytes * n);
    recv.Poison();
    ASSERT_TRUE(nccl.AllGather(send.get(), recv.get(), bytes).ok());
    EXPECT_TRUE(Download(nccl, recv) == want) << bytes << " bytes per worker";
    // In place: this worker's part already sits at its offset of the receive buffer.
    std::vector<uint8_t> in_place_host(bytes * n, 0xEE);
    std::copy(mine.begin(), mine.end(), in_place_host.begin() + me * bytes);
    DeviceBuffer<uint8_t> in_place = testing::ToDevice(in_place_host);
    ASSERT_TRUE(nccl.AllGather(in_place.get() + me * bytes, in_place.get(), bytes).ok());
    EXPECT_TRUE(Download(nccl, in_place) == want) << bytes << " bytes per worker, in place";
  }
}

TEST(NcclCollectivesTest, BroadcastFromEveryRootIsBitExact) {
  KV_GET_WORKERS_OR_SKIP(w);
  NcclCollectives& nccl = *w->nccl;
  const int n = nccl.size(), me = nccl.rank();
  const int64_t bytes = 12345;
  for (int root = 0; root < n; ++root) {
    std::vector<uint8_t> want(bytes), mine(bytes, 0xEE);
    for (int64_t i = 0; i < bytes; ++i) want[i] = SeededByte(root, i);
    DeviceBuffer<uint8_t> data = testing::ToDevice(me == root ? want : mine);
    ASSERT_TRUE(nccl.Broadcast(data.get(), bytes, root).ok());
    EXPECT_TRUE(Download(nccl, data) == want) << "root " << root;
  }
  EXPECT_EQ(nccl.Broadcast(nullptr, 1, n).code(), absl::StatusCode::kInvalidArgument);
}

TEST(NcclCollectivesTest, ExchangeAroundARingIsBitExactAndInOrder) {
  KV_GET_WORKERS_OR_SKIP(w);
  NcclCollectives& nccl = *w->nccl;
  const int n = nccl.size(), me = nccl.rank();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  // Two messages to the same peer in one exchange arrive in the order they were posted.
  const int64_t a_bytes = 333, b_bytes = 70001;
  auto message = [](int from, int which, int64_t bytes) {
    std::vector<uint8_t> m(bytes);
    for (int64_t i = 0; i < bytes; ++i) m[i] = SeededByte(from * 2 + which, i);
    return m;
  };
  DeviceBuffer<uint8_t> send_a = testing::ToDevice(message(me, 0, a_bytes));
  DeviceBuffer<uint8_t> send_b = testing::ToDevice(message(me, 1, b_bytes));
  DeviceBuffer<uint8_t> recv_a(a_bytes), recv_b(b_bytes);
  recv_a.Poison();
  recv_b.Poison();
  const SendBuffer sends[] = {{next, send_a.get(), a_bytes}, {next, send_b.get(), b_bytes}};
  const RecvBuffer recvs[] = {{prev, recv_a.get(), a_bytes}, {prev, recv_b.get(), b_bytes}};
  ASSERT_TRUE(nccl.Exchange(sends, recvs).ok());
  EXPECT_TRUE(Download(nccl, recv_a) == message(prev, 0, a_bytes));
  EXPECT_TRUE(Download(nccl, recv_b) == message(prev, 1, b_bytes));
  EXPECT_TRUE(nccl.Exchange({}, {}).ok());
}

TEST(NcclCollectivesTest, AllReduceCapturedInACudaGraphIsExactOnEveryReplay) {
  KV_GET_WORKERS_OR_SKIP(w);
  NcclCollectives& nccl = *w->nccl;
  const int n = nccl.size(), me = nccl.rank();
  const int64_t count = 4099;
  std::vector<float> mine(count), want(count);
  for (int64_t i = 0; i < count; ++i) {
    mine[i] = static_cast<float>((me + 1) * (i % 97));
    want[i] = static_cast<float>((i % 97) * n * (n + 1) / 2);
  }
  DeviceBuffer<float> source = testing::ToDevice(mine), data(count);
  // The graph copies the inputs in, then sums in place, so every replay starts from the same values.
  cudaStream_t stream = nccl.stream();
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const cudaError_t copied =
      cudaMemcpyAsync(data.get(), source.get(), count * sizeof(float), cudaMemcpyDeviceToDevice, stream);
  const absl::Status enqueued = nccl.AllReduce(data.get(), count, WireType::kF32, ReduceOp::kSum);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(copied, cudaSuccess);
  ASSERT_TRUE(enqueued.ok()) << enqueued;
  cudaGraphExec_t replayable = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&replayable, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 3; ++replay) {
    data.Poison();
    ASSERT_EQ(cudaGraphLaunch(replayable, stream), cudaSuccess);
    EXPECT_EQ(Download(nccl, data), want) << "replay " << replay;
  }
  EXPECT_EQ(cudaGraphExecDestroy(replayable), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
}

// ---------------------------------------------------------------------------------------------------------
// The GPU merge of partials against MergePartialsCpu over every worker's partials.

struct MergeCase {
  MergeMode mode;
  WireType wire;
  int64_t rows;
  int head_dim;
  bool empty_last_worker;  // the last worker holds no tokens: lse = -inf on every row
};

std::string MergeCaseName(const ::testing::TestParamInfo<MergeCase>& info) {
  const MergeCase& c = info.param;
  return MergeModeName(c.mode) + "_" + WireTypeName(c.wire) + "_rows" + std::to_string(c.rows) + "_d" +
         std::to_string(c.head_dim) + (c.empty_last_worker ? "_empty_worker" : "");
}

class NcclMergeTest : public ::testing::TestWithParam<MergeCase> {};

TEST_P(NcclMergeTest, MatchesCpuMergeOfAllWorkers) {
  KV_GET_WORKERS_OR_SKIP(w);
  const MergeCase c = GetParam();
  NcclCollectives& nccl = *w->nccl;
  const int n = nccl.size();
  const int empty = c.empty_last_worker ? n - 1 : -1;
  const testing::Partials mine = testing::SeededPartials(nccl.rank(), c.rows, c.head_dim, empty);
  DeviceBuffer<float> out = testing::ToDevice(mine.out), lse = testing::ToDevice(mine.lse);
  NcclPartialsMerger merger(nccl);
  ASSERT_TRUE(merger.Merge({c.mode, c.wire}, c.rows, c.head_dim, out.get(), lse.get()).ok());
  const std::vector<float> got_out = Download(nccl, out), got_lse = Download(nccl, lse);
  const testing::Partials want = testing::ReferenceMerge(n, c.rows, c.head_dim, empty);

  const double atol = testing::MergeOutTolerance(c.mode, c.wire, n);  // justified there
  EXPECT_EQ(CountMismatches("out", got_out, want.out, atol, 0.0), 0);
  EXPECT_EQ(CountMismatches("lse", got_lse, want.lse, testing::kMergeLseAtol, testing::kMergeLseRtol), 0);
  for (int64_t r = 0; r < c.rows; ++r) {
    if (std::isinf(want.lse[r])) {
      EXPECT_EQ(got_lse[r], want.lse[r]) << "row " << r << " sees no key anywhere";
    }
  }

  // Every worker ends with the same bits (allgather: the same kernel over the same records in the same
  // order; tree: all-reduce results are identical on every rank).
  std::vector<float> first(got_out.size());
  std::memcpy(first.data(), got_out.data(), got_out.size() * sizeof(float));
  ASSERT_TRUE(w->mpi->Broadcast(first.data(), first.size() * sizeof(float), 0).ok());
  EXPECT_EQ(std::memcmp(first.data(), got_out.data(), first.size() * sizeof(float)), 0)
      << "worker " << nccl.rank() << " differs from worker 0";
  if (nccl.rank() == 0) {
    double max_err = 0;
    for (size_t i = 0; i < got_out.size(); ++i) max_err = std::max(max_err, std::abs(double(got_out[i]) - want.out[i]));
    std::printf("gpu merge %s wire %s, %d workers, %lld rows x %d: max |out - cpu| %.3g (bound %.3g)\n",
                MergeModeName(c.mode).c_str(), WireTypeName(c.wire).c_str(), n, static_cast<long long>(c.rows),
                c.head_dim, max_err, atol);
  }
}

std::vector<MergeCase> MergeCases() {
  std::vector<MergeCase> cases;
  for (MergeMode mode : {MergeMode::kAllGather, MergeMode::kTree}) {
    for (WireType wire : {WireType::kF32, WireType::kBf16}) {
      cases.push_back({mode, wire, 1, 128, false});
      cases.push_back({mode, wire, 37, 64, false});
      cases.push_back({mode, wire, 512, 128, false});  // batch 16 x 32 heads
      cases.push_back({mode, wire, 37, 128, true});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Modes, NcclMergeTest, ::testing::ValuesIn(MergeCases()), MergeCaseName);

// Last: a peer that does not take part. On a communicator of its own with a short timeout, every worker
// first completes one all-reduce (connections made), then only worker 0 enqueues a second one: its
// Synchronize must give DeadlineExceeded naming the all-reduce, within the timeout plus slack, and the
// aborted communicator then refuses further work.
// (A parameterized suite, so that it is registered, and runs, after the merge tests.)
class NcclTimeoutTest : public ::testing::TestWithParam<int> {};

TEST_P(NcclTimeoutTest, MissingPeerGivesDeadlineExceededNamingTheOperation) {
  KV_GET_WORKERS_OR_SKIP(w);
  const int timeout_seconds = GetParam();
  const absl::Duration timeout = absl::Seconds(timeout_seconds);
  auto made = NcclCollectives::Create(*w->mpi, w->stream, timeout);
  ASSERT_TRUE(made.ok()) << made.status();
  std::unique_ptr<NcclCollectives> nccl = std::move(*made);
  DeviceBuffer<float> data = testing::ToDevice(std::vector<float>(1024, 1.0f));
  ASSERT_TRUE(nccl->AllReduce(data.get(), 1024, WireType::kF32, ReduceOp::kSum).ok());
  ASSERT_TRUE(nccl->Synchronize().ok());
  if (nccl->rank() == 0) {
    const auto start = std::chrono::steady_clock::now();
    absl::Status status = nccl->AllReduce(data.get(), 1024, WireType::kF32, ReduceOp::kSum);
    if (status.ok()) status = nccl->Synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
    EXPECT_NE(std::string(status.message()).find("allreduce"), std::string::npos) << status;
    EXPECT_LT(seconds, timeout_seconds + 3.0) << "the wait is bounded by the timeout";
    EXPECT_TRUE(nccl->aborted());
    EXPECT_EQ(nccl->AllReduce(data.get(), 1, WireType::kF32, ReduceOp::kSum).code(),
              absl::StatusCode::kFailedPrecondition);
    std::printf("missing peer after %.2f s: %s\n", seconds, std::string(status.message()).c_str());
  }
  float done = 0;  // the other workers wait (over MPI) until worker 0 has seen the timeout
  ASSERT_TRUE(w->mpi->AllReduce(&done, 1, WireType::kF32, ReduceOp::kSum).ok());
  const auto start = std::chrono::steady_clock::now();
  nccl.reset();  // bounded too: a finalize that cannot complete is aborted after the timeout
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), timeout_seconds + 3.0);
}

// Only worker 0 makes a communicator; the others take its broadcast of the id (the bootstrap's part)
// and never join: Create must give DeadlineExceeded naming the join, within the timeout plus slack.
TEST_P(NcclTimeoutTest, PeerThatNeverJoinsGivesDeadlineExceeded) {
  KV_GET_WORKERS_OR_SKIP(w);
  const int timeout_seconds = GetParam();
  if (w->mpi->rank() == 0) {
    const auto start = std::chrono::steady_clock::now();
    auto made = NcclCollectives::Create(*w->mpi, w->stream, absl::Seconds(timeout_seconds));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(made.status().code(), absl::StatusCode::kDeadlineExceeded) << made.status();
    EXPECT_NE(std::string(made.status().message()).find("join"), std::string::npos) << made.status();
    EXPECT_LT(seconds, timeout_seconds + 3.0) << "the join is bounded by the timeout";
    std::printf("peer never joins, after %.2f s: %s\n", seconds, std::string(made.status().message()).c_str());
  } else {
    ncclUniqueId id{};
    ASSERT_TRUE(w->mpi->Broadcast(&id, sizeof(id), 0).ok());
  }
  float done = 0;
  ASSERT_TRUE(w->mpi->AllReduce(&done, 1, WireType::kF32, ReduceOp::kSum).ok());
}

// A wait for a peer inside a call: on a fresh communicator, only worker 0 sends to worker 1, whose
// connection is made on that first use and needs worker 1. The watchdog must abort the blocked call:
// DeadlineExceeded naming the exchange, within the timeout plus slack.
TEST_P(NcclTimeoutTest, PeerThatNeverConnectsGivesDeadlineExceededInTheCall) {
  KV_GET_WORKERS_OR_SKIP(w);
  const int timeout_seconds = GetParam();
  auto made = NcclCollectives::Create(*w->mpi, w->stream, absl::Seconds(timeout_seconds));
  ASSERT_TRUE(made.ok()) << made.status();
  std::unique_ptr<NcclCollectives> nccl = std::move(*made);
  if (nccl->rank() == 0) {
    DeviceBuffer<uint8_t> data(4096);
    const SendBuffer send{1, data.get(), 4096};
    const auto start = std::chrono::steady_clock::now();
    absl::Status status = nccl->Exchange(std::span<const SendBuffer>(&send, 1), {});
    if (status.ok()) status = nccl->Synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
    EXPECT_NE(std::string(status.message()).find("exchange"), std::string::npos) << status;
    EXPECT_LT(seconds, timeout_seconds + 3.0) << "the call is bounded by the timeout";
    EXPECT_TRUE(nccl->aborted());
    std::printf("peer never connects, after %.2f s: %s\n", seconds, std::string(status.message()).c_str());
  }
  float done = 0;
  ASSERT_TRUE(w->mpi->AllReduce(&done, 1, WireType::kF32, ReduceOp::kSum).ok());
  const auto start = std::chrono::steady_clock::now();
  nccl.reset();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), timeout_seconds + 3.0);
}

INSTANTIATE_TEST_SUITE_P(Seconds, NcclTimeoutTest, ::testing::Values(2));

}  // namespace
}  // namespace kvshard
