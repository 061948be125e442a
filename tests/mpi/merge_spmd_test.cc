// The cross-worker merge of attention partials and the distributed attention contexts, on every rank
// of `mpirun -np N` (the ranks play the workers): against a single shard holding the whole context.
// Covers empty shards, a shard holding only the sink tokens, a tail on a worker of its own, both merge
// modes and both wire precisions (the bf16 error is measured and printed), and injected faults (the
// collectives stay in step; only the faulty request fails).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/test_util.h"
#include "worker/distributed_attention.h"
#include "worker/forward.h"
#include "worker/mpi_runtime.h"
#include "worker/synthetic.h"

namespace kvshard {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

Collectives& World() {
  static std::unique_ptr<Collectives> world = MpiRuntime::Get()->MakeWorldCollectivesForTesting(absl::Seconds(120));
  return *world;
}

KvGeometry TestGeometry() {
  KvGeometry g;
  g.n_layers = 2;
  g.n_heads = 4;
  g.n_kv_heads = 2;
  g.head_dim = 64;
  g.rope = RopeParams{64, 10000.0f, {}};
  return g;
}

std::vector<float> RandomVector(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// MergePartialsAcrossWorkers on random partials.

struct MergeCase {
  MergeMode mode;
  WireType wire;
  int64_t rows;
};

std::string MergeCaseName(const ::testing::TestParamInfo<MergeCase>& info) {
  return MergeModeName(info.param.mode) + "_" + WireTypeName(info.param.wire) + "_rows" +
         std::to_string(info.param.rows);
}

// Worker w's partials: row 0 is empty everywhere; row r is empty on worker w when (r + w) % 3 == 1.
void WorkerPartials(int w, int64_t rows, int d, std::vector<float>& out, std::vector<float>& lse) {
  out = RandomVector(rows * d, 1000 + w);
  lse = RandomVector(rows, 2000 + w, 6.0f);
  for (int64_t r = 0; r < rows; ++r) {
    if (r == 0 || (r + w) % 3 == 1) {
      lse[r] = kNegInf;
      std::fill(out.begin() + r * d, out.begin() + (r + 1) * d, 0.0f);
    }
  }
}

class MergeAcrossWorkersTest : public ::testing::TestWithParam<MergeCase> {};

TEST_P(MergeAcrossWorkersTest, MatchesLocalMergeOfAllPartials) {
  const MergeCase c = GetParam();
  const int d = 64;
  Collectives& world = World();
  const int n = world.size();
  std::vector<float> out, lse;
  WorkerPartials(world.rank(), c.rows, d, out, lse);
  ASSERT_TRUE(MergePartialsAcrossWorkers(world, {c.mode, c.wire}, c.rows, d, out.data(), lse.data()).ok());

  // Reference in double from every worker's partials.
  std::vector<double> ref_out(c.rows * d, 0.0), ref_lse(c.rows, -std::numeric_limits<double>::infinity());
  std::vector<std::vector<float>> outs(n), lses(n);
  for (int w = 0; w < n; ++w) WorkerPartials(w, c.rows, d, outs[w], lses[w]);
  double max_abs_out = 0;
  for (int64_t r = 0; r < c.rows; ++r) {
    double m = -std::numeric_limits<double>::infinity();
    for (int w = 0; w < n; ++w) m = std::max(m, static_cast<double>(lses[w][r]));
    if (std::isinf(m)) continue;
    double total = 0;
    for (int w = 0; w < n; ++w) {
      if (std::isinf(lses[w][r])) continue;
      const double a = std::exp(lses[w][r] - m);
      total += a;
      for (int i = 0; i < d; ++i) ref_out[r * d + i] += a * outs[w][r * d + i];
    }
    for (int i = 0; i < d; ++i) {
      ref_out[r * d + i] /= total;
      max_abs_out = std::max(max_abs_out, std::abs(ref_out[r * d + i]));
    }
    ref_lse[r] = m + std::log(total);
  }
  // fp32: a few roundings of values <= 1. bf16 keeps 8 significant bits: rounding to nearest errs by
  // at most 2^-8 relative. allgather rounds each out_w once before a convex combination:
  // |err| <= 2^-8 max|out_w|. tree also rounds the weighted sum after each of the n - 1 reduction steps
  // (sums of weights <= n, divided by the fp32 sum of weights >= 1): |err| <= (n + 1) 2^-8 max|out_w|.
  // max|out_w| <= 1 here.
  const double atol = c.wire == WireType::kF32             ? 2e-6
                      : c.mode == MergeMode::kAllGather ? std::ldexp(1.0, -8)
                                                        : (n + 1) * std::ldexp(1.0, -8);
  double max_err = 0;
  for (int64_t i = 0; i < c.rows * d; ++i) max_err = std::max(max_err, std::abs(out[i] - ref_out[i]));
  EXPECT_EQ(testing::CountMismatches(out.data(), ref_out.data(), c.rows * d, atol, 0, "out"), 0);
  EXPECT_EQ(testing::CountMismatches(lse.data(), ref_lse.data(), c.rows, 1e-5, 1e-6, "lse"), 0);
  if (world.rank() == 0) {
    std::printf("merge %s wire %s, %d workers, %lld rows: max |out error| %.3g (max |out| %.3g)\n",
                MergeModeName(c.mode).c_str(), WireTypeName(c.wire).c_str(), n, static_cast<long long>(c.rows),
                max_err, max_abs_out);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, MergeAcrossWorkersTest,
                         ::testing::Values(MergeCase{MergeMode::kAllGather, WireType::kF32, 1},
                                           MergeCase{MergeMode::kAllGather, WireType::kF32, 37},
                                           MergeCase{MergeMode::kAllGather, WireType::kBf16, 37},
                                           MergeCase{MergeMode::kTree, WireType::kF32, 1},
                                           MergeCase{MergeMode::kTree, WireType::kF32, 37},
                                           MergeCase{MergeMode::kTree, WireType::kBf16, 37},
                                           MergeCase{MergeMode::kAllGather, WireType::kF32, 576},
                                           MergeCase{MergeMode::kTree, WireType::kBf16, 576}),
                         MergeCaseName);

TEST(MergeAcrossWorkersTest, ZeroRowsIsANoOp) {
  EXPECT_TRUE(MergePartialsAcrossWorkers(World(), {}, 0, 64, nullptr, nullptr).ok());
}

// Time per merge, for choosing the default mode (printed, not asserted: CI machines vary). Rows are
// batch x query heads of the demo model (9 heads, head_dim 64) and of Llama-3-8B (32 heads, 128).
TEST(MergeTiming, MicrosecondsPerMergeByMode) {
  Collectives& world = World();
  for (auto [heads, d] : {std::pair<int, int>{9, 64}, {32, 128}}) {
    for (int batch : {1, 16}) {
      const int64_t rows = static_cast<int64_t>(batch) * heads;
      for (MergeMode mode : {MergeMode::kAllGather, MergeMode::kTree}) {
        for (WireType wire : {WireType::kF32, WireType::kBf16}) {
          std::vector<float> out, lse;
          WorkerPartials(world.rank(), rows, d, out, lse);
          const MergeOptions options{mode, wire};
          constexpr int kWarmup = 20, kIterations = 200;
          std::vector<double> times;
          for (int i = 0; i < kWarmup + kIterations; ++i) {
            std::vector<float> o = out, l = lse;
            float barrier = 0;  // start together
            ASSERT_TRUE(world.AllReduce(&barrier, 1, WireType::kF32, ReduceOp::kSum).ok());
            const auto start = std::chrono::steady_clock::now();
            ASSERT_TRUE(MergePartialsAcrossWorkers(world, options, rows, d, o.data(), l.data()).ok());
            if (i >= kWarmup) times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
          }
          // The median resists other load on the machine; the slowest worker's is the merge's cost.
          std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
          float median_us = static_cast<float>(1e6 * times[times.size() / 2]);
          ASSERT_TRUE(world.AllReduce(&median_us, 1, WireType::kF32, ReduceOp::kMax).ok());
          if (world.rank() == 0) {
            std::printf("merge timing: %d workers, batch %2d, %2d heads x d%-3d  %-9s %s  %8.1f us (median)\n", world.size(),
                        batch, heads, d, MergeModeName(mode).c_str(), WireTypeName(wire).c_str(), median_us);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Contexts against one shard holding everything.

enum class Pattern { kEven, kSinkOnlyFirst, kAllOnLast, kEmptyMiddle, kTailAlone };

const char* PatternName(Pattern p) {
  switch (p) {
    case Pattern::kEven: return "even";
    case Pattern::kSinkOnlyFirst: return "sink_only_first";
    case Pattern::kAllOnLast: return "all_on_last";
    case Pattern::kEmptyMiddle: return "empty_middle";
    case Pattern::kTailAlone: return "tail_alone";
  }
  return "?";
}

// Ranges over [0, total) for n workers.
std::vector<TokenRange> MakeRanges(Pattern p, int64_t total, int n) {
  std::vector<int64_t> bounds(n + 1, 0);
  auto split = [&](int first, int64_t from) {  // workers first..n-1 split [from, total) evenly
    const int k = n - first;
    for (int i = 0; i <= k; ++i) bounds[first + i] = from + (total - from) * i / k;
  };
  switch (p) {
    case Pattern::kEven:
      split(0, 0);
      break;
    case Pattern::kSinkOnlyFirst:  // worker 0 holds the 4 sink tokens only
      bounds[1] = std::min<int64_t>(4, total);
      if (n > 1) split(1, bounds[1]);
      break;
    case Pattern::kAllOnLast:  // every worker but the last is empty
      for (int w = 0; w < n; ++w) bounds[w] = 0;
      break;
    case Pattern::kEmptyMiddle:  // worker 1 is empty
      bounds[1] = total / 2;
      if (n > 1) {
        bounds[2 > n ? n : 2] = total / 2;
        if (n > 2) split(2, total / 2);
      }
      break;
    case Pattern::kTailAlone:  // the last worker holds only the last position
      if (n == 1) break;
      split(0, 0);
      for (int i = 0; i <= n - 1; ++i) bounds[i] = (total - 1) * i / (n - 1);
      break;
  }
  bounds[n] = total;
  std::vector<TokenRange> ranges(n);
  for (int w = 0; w < n; ++w) ranges[w] = {bounds[w], bounds[w + 1]};
  return ranges;
}

// This worker's part of a request whose positions [0, held) already have K/V (synthetic, seed `seed`).
LocalRequestState MakeLocal(const KvGeometry& g, const std::vector<TokenRange>& ranges, int me, int64_t held,
                            uint64_t seed) {
  LocalRequestState state;
  state.ranges = ranges;
  if (ranges[me].empty()) return state;
  state.shard = MakeFullPrecisionKvShard(g, ranges[me].start, FullPrecision::kFp32);
  const int64_t end = std::min(ranges[me].end, held);
  if (end > ranges[me].start) {
    EXPECT_TRUE(SyntheticFill(*state.shard, ranges[me].start, end, seed).ok());
  }
  return state;
}

std::unique_ptr<KvShard> MakeReference(const KvGeometry& g, int64_t held, uint64_t seed) {
  auto shard = MakeFullPrecisionKvShard(g, 0, FullPrecision::kFp32);
  EXPECT_TRUE(SyntheticFill(*shard, 0, held, seed).ok());
  return shard;
}

struct ContextCase {
  Pattern pattern;
  int64_t context;  // tokens before the new rows
  MergeMode mode;
};

std::string ContextCaseName(const ::testing::TestParamInfo<ContextCase>& info) {
  return std::string(PatternName(info.param.pattern)) + "_T" + std::to_string(info.param.context) + "_" +
         MergeModeName(info.param.mode);
}

class DistributedContextTest : public ::testing::TestWithParam<ContextCase> {};

// Two requests decode one token each in one batch; every worker must end with the single-shard output.
TEST_P(DistributedContextTest, DecodeMatchesOneShard) {
  const ContextCase c = GetParam();
  const KvGeometry g = TestGeometry();
  Collectives& world = World();
  const int me = world.rank();
  const int n = world.size();
  const int64_t t_a = c.context, t_b = c.context / 2 + 1;
  LocalRequestState a = MakeLocal(g, MakeRanges(c.pattern, t_a + 1, n), me, t_a, 11);
  LocalRequestState b = MakeLocal(g, MakeRanges(Pattern::kEven, t_b + 1, n), me, t_b, 12);
  auto ref_a = MakeReference(g, t_a, 11);
  auto ref_b = MakeReference(g, t_b, 12);
  ShardAttentionContext ref_ctx_a(*ref_a), ref_ctx_b(*ref_b);

  DistributedDecodeContext ctx(world, g, {{&a, t_a}, {&b, t_b}}, {c.mode, WireType::kF32});
  const int64_t q_row = static_cast<int64_t>(g.n_heads) * g.head_dim;
  const int64_t kv_row = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  const int64_t positions[2] = {t_a, t_b};
  for (int layer = 0; layer < g.n_layers; ++layer) {
    const std::vector<float> q = RandomVector(2 * q_row, 100 + layer, 2.0f);
    const std::vector<float> k = RandomVector(2 * kv_row, 200 + layer, 2.0f);
    const std::vector<float> v = RandomVector(2 * kv_row, 300 + layer);
    std::vector<float> out(2 * q_row);
    ASSERT_TRUE(ctx.AppendKv(layer, 2, k.data(), v.data()).ok());
    ASSERT_TRUE(ctx.Attend(layer, 2, q.data(), positions, out.data()).ok());
    std::vector<float> want_a(q_row), want_b(q_row);
    ASSERT_TRUE(ref_ctx_a.AppendKv(layer, 1, k.data(), v.data()).ok());
    ASSERT_TRUE(ref_ctx_a.Attend(layer, 1, q.data(), &positions[0], want_a.data()).ok());
    ASSERT_TRUE(ref_ctx_b.AppendKv(layer, 1, k.data() + kv_row, v.data() + kv_row).ok());
    ASSERT_TRUE(ref_ctx_b.Attend(layer, 1, q.data() + q_row, &positions[1], want_b.data()).ok());
    std::vector<double> want(want_a.begin(), want_a.end());
    want.insert(want.end(), want_b.begin(), want_b.end());
    // fp32 throughout; merging splits the softmax sums differently: a few ulps of values ~1.
    EXPECT_EQ(testing::CountMismatches(out.data(), want.data(), 2 * q_row, 2e-6, 1e-5,
                                       "layer " + std::to_string(layer)),
              0);
  }
  EXPECT_TRUE(a.error.ok()) << a.error;
  EXPECT_TRUE(b.error.ok()) << b.error;
  // The new token went to the worker owning its position, and only there.
  for (LocalRequestState* s : {&a, &b}) {
    if (s->shard) {
      EXPECT_EQ(s->shard->start_position() + s->shard->length(0), s->ranges[me].end) << "worker " << me;
    }
  }
}

// The chunk of the last n_chunk positions, on the worker that owns them; earlier workers serve partials.
TEST_P(DistributedContextTest, PassQPrefillMatchesOneShard) {
  const ContextCase c = GetParam();
  const KvGeometry g = TestGeometry();
  Collectives& world = World();
  const int me = world.rank();
  const int n = world.size();
  const int64_t total = c.context + 1;
  const std::vector<TokenRange> ranges = MakeRanges(c.pattern, total, n);
  const int owner = n - 1;  // every pattern ends with a non-empty last worker
  const int64_t n_chunk = std::min<int64_t>(37, ranges[owner].size());
  if (n_chunk == 0) GTEST_SKIP() << "the last worker holds nothing in this placement";
  const int64_t first = total - n_chunk;
  LocalRequestState local = MakeLocal(g, ranges, me, first, 21);
  auto ref = MakeReference(g, first, 21);
  ShardAttentionContext ref_ctx(*ref);

  const int64_t q_row = static_cast<int64_t>(g.n_heads) * g.head_dim;
  const int64_t kv_row = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  std::vector<int64_t> positions(n_chunk);
  for (int64_t i = 0; i < n_chunk; ++i) positions[i] = first + i;
  if (me == owner) {
    std::vector<int> sources;
    for (int w = 0; w < owner; ++w) {
      if (!ranges[w].empty() && ranges[w].start < first) sources.push_back(w);
    }
    PassQPrefillContext ctx(world, local, g, sources, WireType::kF32);
    for (int layer = 0; layer < g.n_layers; ++layer) {
      const std::vector<float> q = RandomVector(n_chunk * q_row, 400 + layer, 2.0f);
      const std::vector<float> k = RandomVector(n_chunk * kv_row, 500 + layer, 2.0f);
      const std::vector<float> v = RandomVector(n_chunk * kv_row, 600 + layer);
      std::vector<float> out(n_chunk * q_row), want(n_chunk * q_row);
      ASSERT_TRUE(ctx.AppendKv(layer, n_chunk, k.data(), v.data()).ok());
      ASSERT_TRUE(ctx.Attend(layer, n_chunk, q.data(), positions.data(), out.data()).ok());
      ASSERT_TRUE(ref_ctx.AppendKv(layer, n_chunk, k.data(), v.data()).ok());
      ASSERT_TRUE(ref_ctx.Attend(layer, n_chunk, q.data(), positions.data(), want.data()).ok());
      const std::vector<double> want_d(want.begin(), want.end());
      EXPECT_EQ(testing::CountMismatches(out.data(), want_d.data(), n_chunk * q_row, 2e-6, 1e-5,
                                         "layer " + std::to_string(layer)),
                0);
    }
  } else if (!ranges[me].empty() && ranges[me].start < first) {
    ASSERT_TRUE(ServePassQ(world, local, g, owner, static_cast<int>(n_chunk), WireType::kF32).ok());
  }
  EXPECT_TRUE(local.error.ok()) << local.error;
}

std::vector<ContextCase> ContextCases() {
  std::vector<ContextCase> cases;
  for (Pattern p : {Pattern::kEven, Pattern::kSinkOnlyFirst, Pattern::kAllOnLast, Pattern::kEmptyMiddle,
                    Pattern::kTailAlone}) {
    for (int64_t t : {1, 37, 255, 1000}) cases.push_back({p, t, MergeMode::kAllGather});
    cases.push_back({p, 300, MergeMode::kTree});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Placements, DistributedContextTest, ::testing::ValuesIn(ContextCases()), ContextCaseName);

// ---------------------------------------------------------------------------------------------------------
// Faults: the faulty worker's request fails, every worker finishes the step, nothing hangs.

TEST(DistributedFaultTest, DecodeFaultFailsOnlyTheFaultyWorkersRequestAndKeepsStep) {
  const KvGeometry g = TestGeometry();
  Collectives& world = World();
  const int me = world.rank();
  const int64_t t = 100;
  LocalRequestState a = MakeLocal(g, MakeRanges(Pattern::kEven, t + 1, world.size()), me, t, 31);
  InjectedFault fault;
  if (me == world.size() - 1) fault.layer = 1;
  DistributedDecodeContext ctx(world, g, {{&a, t}}, {}, fault);
  const int64_t q_row = static_cast<int64_t>(g.n_heads) * g.head_dim;
  const int64_t kv_row = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  for (int layer = 0; layer < g.n_layers; ++layer) {
    const std::vector<float> q = RandomVector(q_row, 1), k = RandomVector(kv_row, 2), v = RandomVector(kv_row, 3);
    std::vector<float> out(q_row);
    ASSERT_TRUE(ctx.AppendKv(layer, 1, k.data(), v.data()).ok());
    ASSERT_TRUE(ctx.Attend(layer, 1, q.data(), &t, out.data()).ok());
  }
  EXPECT_TRUE(ctx.Drain().ok());
  EXPECT_TRUE(ctx.fatal().ok());
  if (me == world.size() - 1) {
    EXPECT_FALSE(a.error.ok());
    EXPECT_NE(std::string(a.error.message()).find("injected fault at layer 1"), std::string::npos) << a.error;
  } else {
    EXPECT_TRUE(a.error.ok()) << a.error;
  }
}

TEST(DistributedFaultTest, PrefillSourceFaultAndOwnerDrainKeepStep) {
  const KvGeometry g = TestGeometry();
  Collectives& world = World();
  const int me = world.rank();
  const int n = world.size();
  if (n < 2) GTEST_SKIP() << "needs two workers";
  const int64_t total = 200;
  const std::vector<TokenRange> ranges = MakeRanges(Pattern::kEven, total, n);
  const int owner = n - 1;
  const int64_t n_chunk = 10, first = total - n_chunk;
  LocalRequestState local = MakeLocal(g, ranges, me, first, 41);
  const int64_t q_row = static_cast<int64_t>(g.n_heads) * g.head_dim;
  const int64_t kv_row = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
  if (me == owner) {
    std::vector<int> sources;
    for (int w = 0; w < owner; ++w) sources.push_back(w);
    PassQPrefillContext ctx(world, local, g, sources, WireType::kBf16);
    // Forward stops after layer 0 (as on a local error): Drain runs the rest of the transfers.
    const std::vector<float> q = RandomVector(n_chunk * q_row, 5), k = RandomVector(n_chunk * kv_row, 6),
                             v = RandomVector(n_chunk * kv_row, 7);
    std::vector<int64_t> positions(n_chunk);
    for (int64_t i = 0; i < n_chunk; ++i) positions[i] = first + i;
    std::vector<float> out(n_chunk * q_row);
    ASSERT_TRUE(ctx.AppendKv(0, n_chunk, k.data(), v.data()).ok());
    ASSERT_TRUE(ctx.Attend(0, n_chunk, q.data(), positions.data(), out.data()).ok());
    ASSERT_TRUE(ctx.Drain(static_cast<int>(n_chunk), first).ok());
    EXPECT_FALSE(local.error.ok());
  } else {
    InjectedFault fault;
    if (me == 0) fault = {0, absl::ResourceExhaustedError("out of memory (simulated)")};
    ASSERT_TRUE(ServePassQ(world, local, g, owner, static_cast<int>(n_chunk), WireType::kBf16, fault).ok());
    if (me == 0) {
      EXPECT_TRUE(absl::IsResourceExhausted(local.error)) << local.error;
    } else {
      EXPECT_TRUE(local.error.ok()) << local.error;
    }
  }
}

}  // namespace
}  // namespace kvshard

namespace kvshard {
namespace {

// For the default of --single_worker_threshold_tokens: the time of one 512-token prefill chunk after T
// tokens of context, all on the chunk's worker or with the first half on another worker (pass-Q), with
// the demo model's geometry (4 of its 30 layers). Minimum of 5 runs. By hand:
//   mpirun -np 2 merge_spmd_test --gtest_also_run_disabled_tests --gtest_filter='*PrefillSplit*'
TEST(PrefillSplitTiming, DISABLED_ChunkTimeOnOneWorkerVersusSplit) {
  Collectives& world = World();
  if (world.size() < 2) GTEST_SKIP() << "needs two ranks";
  const int me = world.rank();
  SyntheticModelSpec spec;
  spec.n_layers = 4;
  auto weights = MakeSyntheticModel(spec);
  ASSERT_TRUE(weights.ok());
  CpuModel model(*weights);
  const KvGeometry g = model.kv_geometry();
  constexpr int64_t kChunk = 512;
  std::vector<int32_t> tokens(kChunk);
  for (int64_t i = 0; i < kChunk; ++i) tokens[i] = static_cast<int32_t>((i * 7919) % spec.vocab_size);
  for (int64_t context : {256, 512, 1024, 2048, 4096, 8192}) {
    double best[2] = {1e30, 1e30};
    for (int split = 0; split < 2; ++split) {
      std::vector<TokenRange> ranges(world.size());
      ranges[0] = {0, split ? context / 2 : 0};
      ranges[1] = {ranges[0].end, context + kChunk};
      for (int rep = 0; rep < 5; ++rep) {
        LocalRequestState local = MakeLocal(g, ranges, me, context, 3);
        float barrier = 0;
        ASSERT_TRUE(world.AllReduce(&barrier, 1, WireType::kF32, ReduceOp::kSum).ok());
        const auto start = std::chrono::steady_clock::now();
        if (me == 1) {
          std::vector<int> sources;
          if (split) sources.push_back(0);
          PassQPrefillContext ctx(world, local, g, sources, WireType::kF32);
          std::vector<float> logits;
          ASSERT_TRUE(model.Forward(tokens, context, ctx, false, logits).ok());
        } else if (me == 0 && split) {
          ASSERT_TRUE(ServePassQ(world, local, g, 1, kChunk, WireType::kF32).ok());
        }
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best[split] = std::min(best[split], seconds);
      }
    }
    if (me == 1) {
      std::printf("prefill chunk of %lld after %5lld tokens (4 layers): one worker %7.1f ms, split %7.1f ms\n",
                  static_cast<long long>(kChunk), static_cast<long long>(context), 1e3 * best[0], 1e3 * best[1]);
    }
  }
}

}  // namespace
}  // namespace kvshard
