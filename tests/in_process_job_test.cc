// Single-process mode's job (worker/in_process_job.h): the in-memory control plane between the coordinator
// and the worker thread, and the one-worker data plane. The engine over it runs the *_engine_test programs
// without mpirun (tests/mpi/CMakeLists.txt).
#include "worker/in_process_job.h"

#include <chrono>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "worker/control.h"

namespace kvshard {
namespace {

TEST(InProcessJob, TheWorkerAnswersConfigureAndShutsDownWithTheJob) {
  // A worker that cannot load its model still answers configure, with the reason.
  auto job = InProcessJob::Start(DefaultKvShardFactoryMaker());
  JobRuntime& coordinator = job->coordinator();
  EXPECT_TRUE(coordinator.is_coordinator());
  EXPECT_EQ(coordinator.n_workers(), 1);
  EXPECT_EQ(coordinator.ranks_on_node(), 1);
  EXPECT_FALSE(coordinator.MakeWorkerCollectives(absl::Seconds(1)).ok());
  WorkerCommand configure;
  configure.kind = CommandKind::kConfigure;
  configure.config.model_path = "/nonexistent/model.gguf";
  configure.config.device = "cpu";
  ASSERT_TRUE(coordinator.SendMessage(1, kCommandTag, EncodeCommand(configure), absl::Seconds(1)).ok());
  auto reply = coordinator.ReceiveMessage(JobRuntime::kAnySource, kReplyTag, absl::Seconds(60));
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->source, 1);
  auto hello = DecodeHello(reply->bytes);
  ASSERT_TRUE(hello.ok()) << hello.status();
  EXPECT_NE(hello->error.find("model.gguf"), std::string::npos) << hello->error;
  const auto start = std::chrono::steady_clock::now();
  job.reset();  // sends shutdown and joins the worker thread
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(InProcessJob, MessagesMatchByTagAndSourceAndTimeOut) {
  auto job = InProcessJob::Start(DefaultKvShardFactoryMaker());
  JobRuntime& coordinator = job->coordinator();
  // Rank 0 sending to itself stands in for a worker's reply: the mailbox is per destination.
  ASSERT_TRUE(coordinator.SendMessage(0, 7, "seven", absl::Seconds(1)).ok());
  ASSERT_TRUE(coordinator.SendMessage(0, 8, "eight", absl::Seconds(1)).ok());
  ASSERT_TRUE(coordinator.SendMessage(0, 7, "seven again", absl::Seconds(1)).ok());
  auto eight = coordinator.ReceiveMessage(0, 8, absl::Seconds(1));
  ASSERT_TRUE(eight.ok());
  EXPECT_EQ(eight->bytes, "eight");
  auto first = coordinator.ReceiveMessage(JobRuntime::kAnySource, 7, absl::Seconds(1));
  auto second = coordinator.ReceiveMessage(0, 7, absl::Seconds(1));
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->bytes, "seven");
  EXPECT_EQ(second->bytes, "seven again");
  const auto start = std::chrono::steady_clock::now();
  auto none = coordinator.ReceiveMessage(1, 7, absl::Milliseconds(50));
  EXPECT_TRUE(absl::IsDeadlineExceeded(none.status())) << none.status();
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(50));
  EXPECT_TRUE(absl::IsInvalidArgument(coordinator.SendMessage(2, 7, "x", absl::Seconds(1))));
  // A message sent later from another thread wakes a waiting receiver.
  std::thread late([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    (void)coordinator.SendMessage(0, 9, "late", absl::Seconds(1));
  });
  auto got = coordinator.ReceiveMessage(JobRuntime::kAnySource, 9, absl::InfiniteDuration());
  late.join();
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->bytes, "late");
}

TEST(SingleWorkerCollectives, EveryOperationIsLocal) {
  std::unique_ptr<Collectives> c = MakeSingleWorkerCollectives();
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  std::vector<float> data(37);
  std::iota(data.begin(), data.end(), 1.0f);
  const std::vector<float> original = data;
  ASSERT_TRUE(c->AllReduce(data.data(), 37, WireType::kF32, ReduceOp::kSum).ok());
  ASSERT_TRUE(c->AllReduce(data.data(), 37, WireType::kF32, ReduceOp::kMax).ok());
  EXPECT_EQ(data, original);
  std::vector<float> gathered(37, -1.0f);
  ASSERT_TRUE(c->AllGather(data.data(), gathered.data(), 37 * sizeof(float)).ok());
  EXPECT_EQ(gathered, original);
  ASSERT_TRUE(c->AllGather(gathered.data(), gathered.data(), 37 * sizeof(float)).ok());  // in place
  EXPECT_EQ(gathered, original);
  ASSERT_TRUE(c->Broadcast(data.data(), 37 * sizeof(float), 0).ok());
  EXPECT_FALSE(c->Broadcast(data.data(), 4, 1).ok());
  std::vector<float> a(5, 0.0f), b(3, 0.0f);
  const SendBuffer sends[] = {{0, data.data(), 5 * sizeof(float)}, {0, data.data() + 10, 3 * sizeof(float)}};
  const RecvBuffer recvs[] = {{0, a.data(), 5 * sizeof(float)}, {0, b.data(), 3 * sizeof(float)}};
  ASSERT_TRUE(c->Exchange(sends, recvs).ok());
  EXPECT_EQ(a, std::vector<float>(original.begin(), original.begin() + 5));
  EXPECT_EQ(b, std::vector<float>(original.begin() + 10, original.begin() + 13));
  const SendBuffer to_peer[] = {{1, data.data(), 4}};
  const RecvBuffer from_peer[] = {{1, a.data(), 4}};
  EXPECT_FALSE(c->Exchange(to_peer, from_peer).ok());
  const RecvBuffer wrong_size[] = {{0, a.data(), 8}};
  EXPECT_FALSE(c->Exchange(std::span<const SendBuffer>(sends, 1), wrong_size).ok());
}

}  // namespace
}  // namespace kvshard
