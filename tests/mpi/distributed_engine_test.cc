// The distributed engine on rank 0 against workers on ranks 1..N, with a small synthetic model (nothing
// to download): greedy tokens equal single-process mode's for contexts spanning every shard, in both
// merge modes; continuous batching of concurrent requests gives each the tokens it gets alone; SYNTHETIC
// FILL matches a single shard filled the same way; admission control refuses with the capacity;
// requests wait for room; an injected worker failure fails its request and the engine goes on.
#include <algorithm>
#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/byte_tokenizer.h"
#include "coordinator/distributed_engine.h"
#include "coordinator/engine_factory.h"
#include "coordinator/single_process_engine.h"
#include "gtest/gtest.h"
#include "tests/mpi/test_engine.h"
#include "worker/forward.h"
#include "worker/sampler.h"
#include "worker/synthetic.h"

namespace kvshard {
namespace {

SyntheticModelSpec SmallSpec() {
  SyntheticModelSpec spec;
  spec.n_layers = 4;
  spec.hidden = 128;
  spec.n_heads = 4;
  spec.n_kv_heads = 2;
  spec.head_dim = 32;
  spec.ffn_hidden = 256;
  spec.vocab_size = 512;
  spec.max_context = 1 << 20;
  spec.seed = 5;
  return spec;
}

DistributedEngineOptions SmallOptions() {
  DistributedEngineOptions options;
  options.worker.synthetic = SmallSpec();
  options.worker.device = "cpu";  // the reference runs on the CPU; tests/mpi/gpu_workers_test.cc covers GPUs
  options.worker.kv_budget_bytes = int64_t{64} << 20;
  options.worker.collective_timeout_s = 120;
  options.worker_timeout_s = 300;
  options.placement.single_worker_threshold = 0;  // split everything: every test spans the workers
  return options;
}

std::unique_ptr<DistributedEngine> MakeEngine(DistributedEngineOptions options) {
  auto config = SyntheticModelConfig(*options.worker.synthetic);
  EXPECT_TRUE(config.ok());
  auto tokenizer = MakeByteTokenizer(config->vocab_size);
  auto engine = CreateDistributedEngine(*config, std::move(*tokenizer), std::move(options));
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

std::unique_ptr<SingleProcessEngine> MakeReference() {
  auto weights = MakeSyntheticModel(SmallSpec());
  auto tokenizer = MakeByteTokenizer(weights->config.vocab_size);
  EngineOptions options;
  options.device = "cpu";  // the workers' backend
  auto engine = SingleProcessEngine::Create(std::move(*weights), std::move(*tokenizer), options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

GenerationRequest Request(int64_t prompt_tokens, int max_tokens, uint64_t seed) {
  GenerationRequest r;
  std::mt19937 rng(static_cast<uint32_t>(seed));
  for (int64_t i = 0; i < prompt_tokens; ++i) r.prompt_ids.push_back(static_cast<int32_t>(rng() % 512));
  r.max_tokens = max_tokens;
  r.kv_scheme = "fp32";
  return r;
}

std::vector<int32_t> Tokens(Engine& engine, const GenerationRequest& request) {
  auto result = engine.Generate(request, nullptr, nullptr);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? result->token_ids : std::vector<int32_t>{};
}

class DistributedEngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { reference_ = MakeReference().release(); }
  static void TearDownTestSuite() {
    delete reference_;
    reference_ = nullptr;
  }
  static SingleProcessEngine* reference_;
};
SingleProcessEngine* DistributedEngineTest::reference_ = nullptr;

TEST_F(DistributedEngineTest, GreedyTokensEqualSingleProcessInBothMergeModes) {
  const GenerationRequest request = Request(1500, 32, 1);
  const std::vector<int32_t> want = Tokens(*reference_, request);
  ASSERT_EQ(want.size(), 32u);
  for (MergeMode mode : {MergeMode::kAllGather, MergeMode::kTree}) {
    DistributedEngineOptions options = SmallOptions();
    options.worker.merge.mode = mode;
    auto engine = MakeEngine(options);
    ASSERT_NE(engine, nullptr);
    EXPECT_EQ(Tokens(*engine, request), want) << MergeModeName(mode);
  }
}

TEST_F(DistributedEngineTest, ShortContextOnOneWorkerAndOddSizesMatch) {
  DistributedEngineOptions options = SmallOptions();
  options.placement.single_worker_threshold = 2048;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  for (int64_t n : {1, 37, 511, 513}) {
    const GenerationRequest request = Request(n, 9, n);
    EXPECT_EQ(Tokens(*engine, request), Tokens(*reference_, request)) << n << " prompt tokens";
  }
}

TEST_F(DistributedEngineTest, Bf16WireStaysCloseToSingleProcess) {
  const GenerationRequest request = Request(1500, 32, 2);
  const std::vector<int32_t> want = Tokens(*reference_, request);
  for (MergeMode mode : {MergeMode::kAllGather, MergeMode::kTree}) {
    DistributedEngineOptions options = SmallOptions();
    options.worker.merge = {mode, WireType::kBf16};
    auto engine = MakeEngine(options);
    ASSERT_NE(engine, nullptr);
    const std::vector<int32_t> got = Tokens(*engine, request);
    ASSERT_EQ(got.size(), want.size());
    size_t agree = 0;
    while (agree < got.size() && got[agree] == want[agree]) ++agree;
    std::printf("bf16 partials on the wire, merge %s: the first %zu of %zu greedy tokens equal fp32 single-process\n",
                MergeModeName(mode).c_str(), agree, want.size());
  }
}

TEST_F(DistributedEngineTest, SeededSamplingWithRepetitionPenaltyMatchesSingleProcess) {
  GenerationRequest request = Request(900, 24, 3);
  request.sampling = {0.8f, 50, 0.95f, 77, 1.3f, 16};
  auto engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(Tokens(*engine, request), Tokens(*reference_, request));
}

TEST_F(DistributedEngineTest, ConcurrentRequestsAreBatchedAndEachGetsItsOwnTokens) {
  auto engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const std::vector<GenerationRequest> requests = {Request(300, 20, 11), Request(700, 35, 12), Request(1500, 50, 13),
                                                   Request(5, 25, 14)};
  std::vector<std::vector<int32_t>> got(requests.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < requests.size(); ++i) {
    threads.emplace_back([&, i] { got[i] = Tokens(*engine, requests[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(got[i], Tokens(*reference_, requests[i])) << "request " << i;
  }
  const DistributedEngineStats stats = engine->stats();
  EXPECT_GT(stats.decode_rows, stats.decode_steps) << "no decode step ran more than one request";
}

TEST_F(DistributedEngineTest, StopsWhenTheCallbackCancelsAndServesTheNext) {
  auto engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  int seen = 0;
  auto result = engine->Generate(Request(600, 100, 21), [&](int32_t, const std::string&) { return ++seen < 5; },
                                 nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->token_ids.size(), 5u);
  const GenerationRequest next = Request(600, 10, 22);
  EXPECT_EQ(Tokens(*engine, next), Tokens(*reference_, next));
}

TEST_F(DistributedEngineTest, SyntheticFillMatchesOneShardFilledTheSameWay) {
  constexpr int64_t kFill = 3000;
  DistributedEngineOptions options = SmallOptions();
  options.synthetic_fill_tokens = kFill;
  options.synthetic_fill_seed = 9;
  options.fill_tokens_per_step = 700;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const GenerationRequest request = Request(40, 12, 31);
  const std::vector<int32_t> got = Tokens(*engine, request);

  // Reference: one fp32 shard holding the same fill, then the prompt and greedy decode after it.
  auto weights = MakeSyntheticModel(SmallSpec());
  ASSERT_TRUE(weights.ok());
  CpuModel model(*weights);
  auto shard = MakeFullPrecisionKvShard(model.kv_geometry(), 0, FullPrecision::kFp32);
  ASSERT_TRUE(SyntheticFill(*shard, 0, kFill, 9).ok());
  ShardAttentionContext context(*shard);
  std::vector<float> logits;
  ASSERT_TRUE(model.Forward(request.prompt_ids, kFill, context, false, logits).ok());
  Sampler sampler({});
  std::vector<int32_t> want;
  int64_t pos = kFill + static_cast<int64_t>(request.prompt_ids.size());
  for (int i = 0; i < request.max_tokens; ++i) {
    const int32_t token = sampler.Sample(logits.data(), weights->config.vocab_size);
    want.push_back(token);
    if (i + 1 == request.max_tokens) break;
    ASSERT_TRUE(model.Forward(std::span<const int32_t>(&token, 1), pos++, context, false, logits).ok());
  }
  EXPECT_EQ(got, want);
}

TEST_F(DistributedEngineTest, RefusesWhatExceedsTheCapacityAndKeepsServing) {
  DistributedEngineOptions options = SmallOptions();
  options.worker.kv_budget_bytes = 1 << 20;  // fp32, 4 layers x 2 heads x 32 dims: 2 KiB/token, 512 tokens
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  auto refused = engine->Generate(Request(100000, 4, 41), nullptr, nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  const std::string message(refused.status().message());
  EXPECT_NE(message.find("capacity of"), std::string::npos) << message;
  EXPECT_NE(message.find("MiB"), std::string::npos) << message;
  const GenerationRequest small = Request(200, 6, 42);
  EXPECT_EQ(Tokens(*engine, small), Tokens(*reference_, small));
}

TEST_F(DistributedEngineTest, RequestsWaitForRoomWhileOthersRun) {
  DistributedEngineOptions options = SmallOptions();
  options.worker.kv_budget_bytes = 1 << 20;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const int n = engine->n_workers();
  // Each request takes most of the capacity: they run one after the other.
  const GenerationRequest a = Request(400 * n, 20, 51), b = Request(400 * n, 20, 52);
  std::vector<int32_t> got_a, got_b;
  std::thread ta([&] { got_a = Tokens(*engine, a); });
  std::thread tb([&] { got_b = Tokens(*engine, b); });
  ta.join();
  tb.join();
  EXPECT_EQ(got_a, Tokens(*reference_, a));
  EXPECT_EQ(got_b, Tokens(*reference_, b));
}

TEST_F(DistributedEngineTest, InjectedWorkerFailureFailsTheRequestWithTheRankAndTheEngineGoesOn) {
  DistributedEngineOptions options = SmallOptions();
  options.worker.faults.fail_step = 3;
  options.worker.faults.worker = TestEngineWorkers() - 1;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  auto failed = engine->Generate(Request(1500, 20, 61), nullptr, nullptr);
  ASSERT_FALSE(failed.ok());
  const std::string message(failed.status().message());
  EXPECT_NE(message.find(TestEngineWorkerName(TestEngineWorkers()) + ": injected failure"), std::string::npos)
      << message;
  EXPECT_NE(message.find("injected failure"), std::string::npos) << message;
  const GenerationRequest next = Request(1500, 8, 62);
  EXPECT_EQ(Tokens(*engine, next), Tokens(*reference_, next));
}

TEST_F(DistributedEngineTest, BadRequestsAreClearErrors) {
  auto engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  GenerationRequest empty;
  EXPECT_FALSE(engine->Generate(empty, nullptr, nullptr).ok());
  GenerationRequest bad_token = Request(10, 2, 71);
  bad_token.prompt_ids[3] = 100000;
  auto r = engine->Generate(bad_token, nullptr, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("outside the vocabulary"), std::string::npos) << r.status();
  GenerationRequest bad_scheme = Request(10, 2, 72);
  bad_scheme.kv_scheme = "nonsense";
  r = engine->Generate(bad_scheme, nullptr, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("unknown KV scheme"), std::string::npos) << r.status();
  const GenerationRequest fine = Request(100, 3, 73);
  EXPECT_EQ(Tokens(*engine, fine), Tokens(*reference_, fine));
}

}  // namespace
}  // namespace kvshard
