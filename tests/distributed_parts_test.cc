// The pieces of the distributed runtime that need no MPI: synthetic models and fill, the byte tokenizer
// of synthetic models, the control messages' encoding, and quantized contexts split over sealed shards.
#include <cmath>
#include <string>
#include <vector>

#include "coordinator/byte_tokenizer.h"
#include "coordinator/distributed_engine.h"
#include "coordinator/quality.h"
#include "kvstore/kv_scheme.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/test_util.h"
#include "worker/forward.h"
#include "worker/control.h"
#include "worker/synthetic.h"

namespace kvshard {
namespace {

SyntheticModelSpec TinySpec() {
  SyntheticModelSpec spec;
  spec.n_layers = 2;
  spec.hidden = 64;
  spec.n_heads = 4;
  spec.n_kv_heads = 2;
  spec.head_dim = 16;
  spec.ffn_hidden = 96;
  spec.vocab_size = 300;
  return spec;
}

TEST(SyntheticModelTest, SameSeedSameWeightsOtherSeedOthers) {
  auto a = MakeSyntheticModel(TinySpec());
  auto b = MakeSyntheticModel(TinySpec());
  SyntheticModelSpec other = TinySpec();
  other.seed = 2;
  auto c = MakeSyntheticModel(other);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->layers[1].w_down.data, b->layers[1].w_down.data);
  EXPECT_NE(a->layers[1].w_down.data, c->layers[1].w_down.data);
  EXPECT_EQ(a->config.n_layers, 2);
  EXPECT_TRUE(a->config.tied_embeddings);
  EXPECT_EQ(a->token_embedding.shape, (std::vector<int64_t>{300, 64}));
  EXPECT_EQ(a->layers[0].wk.shape, (std::vector<int64_t>{32, 64}));
  // Variance 1/in_features.
  double sum2 = 0;
  for (float x : a->layers[0].w_gate.data) sum2 += x * x;
  EXPECT_NEAR(sum2 / a->layers[0].w_gate.data.size(), 1.0 / 64, 0.1 / 64);
}

TEST(SyntheticModelTest, BadGeometryIsAClearError) {
  SyntheticModelSpec spec = TinySpec();
  spec.n_kv_heads = 3;
  auto w = MakeSyntheticModel(spec);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(std::string(w.status().message()).find("not a multiple"), std::string::npos) << w.status();
  spec = TinySpec();
  spec.head_dim = 15;
  EXPECT_FALSE(MakeSyntheticModel(spec).ok());
  spec = TinySpec();
  spec.n_layers = 0;
  EXPECT_FALSE(MakeSyntheticModel(spec).ok());
}

KvGeometry FillGeometry() {
  KvGeometry g;
  g.n_layers = 2;
  g.n_heads = 4;
  g.n_kv_heads = 2;
  g.head_dim = 64;
  g.rope = RopeParams{64, 10000.0f, {}};
  return g;
}

TEST(SyntheticFillTest, ValuesDependOnPositionNotOnHowTheRangeIsSplit) {
  const KvGeometry g = FillGeometry();
  const int64_t row = g.n_kv_heads * g.head_dim;
  for (int64_t n : {1, 37, 300}) {
    std::vector<float> k_all(n * row), v_all(n * row);
    SyntheticKvTokens(g, 1, 1000, n, 7, k_all.data(), v_all.data());
    const int64_t cut = n / 3;
    std::vector<float> k(n * row), v(n * row);
    SyntheticKvTokens(g, 1, 1000, cut, 7, k.data(), v.data());
    SyntheticKvTokens(g, 1, 1000 + cut, n - cut, 7, k.data() + cut * row, v.data() + cut * row);
    EXPECT_EQ(k, k_all) << n;
    EXPECT_EQ(v, v_all) << n;
  }
}

TEST(SyntheticFillTest, KeysHaveOutlierChannelsValuesAreCentered) {
  const KvGeometry g = FillGeometry();
  const int64_t n = 2000, row = g.n_kv_heads * g.head_dim;
  std::vector<float> k(n * row), v(n * row);
  SyntheticKvTokens(g, 0, 0, n, 3, k.data(), v.data());
  int outlier_channels = 0;
  for (int64_t c = 0; c < row; ++c) {
    double mean = 0, sq = 0;
    for (int64_t t = 0; t < n; ++t) mean += k[t * row + c];
    mean /= n;
    for (int64_t t = 0; t < n; ++t) sq += (k[t * row + c] - mean) * (k[t * row + c] - mean);
    if (std::sqrt(sq / n) > 3.0) ++outlier_channels;
  }
  EXPECT_GE(outlier_channels, 1);
  EXPECT_LE(outlier_channels, row / 10);
  double v_mean = 0;
  for (float x : v) v_mean += x;
  EXPECT_NEAR(v_mean / v.size(), 0.0, 0.01);
}

TEST(SyntheticFillTest, FillsEveryLayerAndChecksItsStart) {
  const KvGeometry g = FillGeometry();
  auto shard = MakeFullPrecisionKvShard(g, 100, FullPrecision::kFp16);
  EXPECT_TRUE(SyntheticFill(*shard, 100, 357, 1).ok());
  EXPECT_EQ(shard->length(0), 257);
  EXPECT_EQ(shard->length(1), 257);
  EXPECT_FALSE(SyntheticFill(*shard, 300, 400, 1).ok());  // not where the shard ends
  EXPECT_EQ(shard->Memory().bytes, 2 * 2 * 257 * g.n_kv_heads * g.head_dim * 2);
}

TEST(ByteTokenizerTest, RoundTripsBytesAndNeedsRoomForThem) {
  auto tok = MakeByteTokenizer(300);
  ASSERT_TRUE(tok.ok());
  const std::string text = "h\xc3\xa9llo\n";
  const std::vector<int32_t> ids = (*tok)->Encode(text);
  EXPECT_EQ(ids.size(), text.size());
  EXPECT_EQ((*tok)->Decode(ids), text);
  EXPECT_EQ((*tok)->TokenBytes(299), "<299>");
  EXPECT_TRUE((*tok)->stop_ids().empty());
  EXPECT_FALSE(MakeByteTokenizer(255).ok());
}

TEST(FailureAdviceTest, SyntheticFillOverflowPointsToAFillCalibration) {
  const std::string overflow = std::string("sequence 3: ") + std::string(kKvqKeyOutlierOverflow) + " of its 8 pages";
  EXPECT_NE(FailureWithAdvice(overflow, 4096).find("--calibrate_on_fill"), std::string::npos);
  EXPECT_EQ(FailureWithAdvice(overflow, 0), overflow);  // real text: the store's own advice stands
  EXPECT_EQ(FailureWithAdvice("worker rank 1: out of memory", 4096), "worker rank 1: out of memory");
}

TEST(ControlMessagesTest, StepPlanRoundTrips) {
  WorkerCommand command;
  command.kind = CommandKind::kStep;
  StepPlan& plan = command.plan;
  plan.step = 42;
  RequestAlloc alloc;
  alloc.id = 7;
  alloc.scheme = "kvq3";
  alloc.ranges = {{0, 512}, {512, 512}, {512, 6128}};
  alloc.sampler = 2;
  alloc.sampling = {0.7f, 40, 0.9f, 1234567890123ull, 1.1f, 32};
  alloc.fill_seed = 5;
  plan.allocs.push_back(alloc);
  plan.frees = {3, 4};
  plan.fills.push_back({7, 100000, 65536});
  plan.prefill = PrefillWork{7, 512, {1, 2, 49151}, 2, true};
  plan.decode = {{5, 11, 9000}, {6, 12, 9001}};
  auto decoded = DecodeCommand(EncodeCommand(command));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const StepPlan& p = decoded->plan;
  EXPECT_EQ(p.step, 42);
  ASSERT_EQ(p.allocs.size(), 1u);
  EXPECT_EQ(p.allocs[0].scheme, "kvq3");
  ASSERT_EQ(p.allocs[0].ranges.size(), 3u);
  EXPECT_EQ(p.allocs[0].ranges[2].end, 6128);
  EXPECT_EQ(p.allocs[0].sampling.seed, 1234567890123ull);
  EXPECT_FLOAT_EQ(p.allocs[0].sampling.top_p, 0.9f);
  EXPECT_FLOAT_EQ(p.allocs[0].sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(p.allocs[0].sampling.repetition_window, 32);
  EXPECT_EQ(p.frees, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(p.fills[0].tokens_per_worker, 65536);
  ASSERT_TRUE(p.prefill.has_value());
  EXPECT_EQ(p.prefill->tokens, (std::vector<int32_t>{1, 2, 49151}));
  EXPECT_TRUE(p.prefill->sample);
  ASSERT_EQ(p.decode.size(), 2u);
  EXPECT_EQ(p.decode[1].position, 9001);
}

TEST(ControlMessagesTest, ConfigureReportAndHelloRoundTrip) {
  WorkerCommand command;
  command.kind = CommandKind::kConfigure;
  command.config.synthetic = SyntheticModelSpec{};
  command.config.kv_budget_bytes = int64_t{80} << 30;
  command.config.merge = {MergeMode::kTree, WireType::kBf16};
  command.config.faults.fail_step = 3;
  auto decoded = DecodeCommand(EncodeCommand(command));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_TRUE(decoded->config.synthetic.has_value());
  EXPECT_EQ(decoded->config.synthetic->Name(), SyntheticModelSpec{}.Name());
  EXPECT_EQ(decoded->config.kv_budget_bytes, int64_t{80} << 30);
  EXPECT_EQ(decoded->config.merge.mode, MergeMode::kTree);
  EXPECT_EQ(decoded->config.merge.wire, WireType::kBf16);
  EXPECT_EQ(decoded->config.faults.fail_step, 3);

  StepReport report;
  report.step = 9;
  report.worker = 1;
  report.sampled = {{7, 123}};
  report.failed = {{8, "worker rank 2: out of memory"}};
  report.kv_bytes = 1 << 20;
  auto r = DecodeReport(EncodeReport(report));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sampled[0].token, 123);
  EXPECT_EQ(r->failed[0].message, "worker rank 2: out of memory");
  EXPECT_FALSE(DecodeHello(EncodeReport(report)).ok());  // a report is no hello

  WorkerHello hello;
  hello.worker = 3;
  hello.error = "cannot load";
  auto h = DecodeHello(EncodeHello(hello));
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->error, "cannot load");
}

TEST(ControlMessagesTest, GarbageIsAnErrorNotACrash) {
  EXPECT_FALSE(DecodeCommand("not msgpack at all").ok());
  EXPECT_FALSE(DecodeCommand("").ok());
  EXPECT_FALSE(DecodeReport(std::string("\x81\xa4type\xa6report", 13)).ok());  // fields missing
}

}  // namespace
}  // namespace kvshard

namespace kvshard {
namespace {

// A quantized context split over two shards (the first sealed when the second starts) attends like one
// shard holding it all: same stored codes, only the softmax sums split differently.
class SplitShardTest : public ::testing::TestWithParam<std::string> {};

TEST_P(SplitShardTest, SealedSplitAttendsLikeOneShard) {
  SyntheticModelSpec spec = TinySpec();
  spec.head_dim = 32;
  auto weights = MakeSyntheticModel(spec);
  ASSERT_TRUE(weights.ok());
  CpuModel model(*weights);
  CalibrateOptions options;
  options.ctx = 64;
  options.max_tokens = 128;
  options.outlier_fractions = {0.01};
  options.codebook_bits = {3};
  options.show_progress = false;
  std::vector<int32_t> tokens(128);
  for (int i = 0; i < 128; ++i) tokens[i] = (i * 37) % spec.vocab_size;
  auto calibration = CalibrateKv(model, ModelIdentityOf(*weights), tokens, options);
  ASSERT_TRUE(calibration.ok()) << calibration.status();
  const KvShardFactory factory =
      AllSchemesKvShardFactory(std::make_shared<const Calibration>(std::move(*calibration)));
  const KvGeometry g = model.kv_geometry();
  const std::string scheme = GetParam();
  constexpr int64_t kTotal = 700, kCut = 512;
  auto one = factory(scheme, g, 0);
  auto first = factory(scheme, g, 0);
  auto second = factory(scheme, g, kCut);
  ASSERT_TRUE(one.ok() && first.ok() && second.ok()) << one.status();
  ASSERT_TRUE(SyntheticFill(**one, 0, kTotal, 5).ok());
  ASSERT_TRUE(SyntheticFill(**first, 0, kCut, 5).ok());
  (*first)->Seal();
  ASSERT_TRUE(SyntheticFill(**second, kCut, kTotal, 5).ok());
  EXPECT_EQ((*one)->Memory().bytes, (*first)->Memory().bytes + (*second)->Memory().bytes) << "stored differently";

  const int64_t q_row = static_cast<int64_t>(g.n_heads) * g.head_dim;
  std::vector<float> q(3 * q_row);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 7919) % 200) / 50.0f - 2.0f;
  const int64_t positions[3] = {kTotal - 1, kTotal - 40, kCut + 3};
  for (int layer = 0; layer < g.n_layers; ++layer) {
    std::vector<float> want(3 * q_row), want_lse(3 * g.n_heads);
    ASSERT_TRUE((*one)->Attend(layer, 3, q.data(), positions, want.data(), want_lse.data()).ok());
    std::vector<float> a(3 * q_row), a_lse(3 * g.n_heads), b(3 * q_row), b_lse(3 * g.n_heads);
    ASSERT_TRUE((*first)->Attend(layer, 3, q.data(), positions, a.data(), a_lse.data()).ok());
    ASSERT_TRUE((*second)->Attend(layer, 3, q.data(), positions, b.data(), b_lse.data()).ok());
    const float* outs[2] = {a.data(), b.data()};
    const float* lses[2] = {a_lse.data(), b_lse.data()};
    std::vector<float> got(3 * q_row), got_lse(3 * g.n_heads);
    MergePartialsCpu(2, outs, lses, 3 * g.n_heads, g.head_dim, got.data(), got_lse.data());
    const std::vector<double> want_d(want.begin(), want.end());
    // Same K/V in both: only fp32 summation order differs.
    EXPECT_EQ(testing::CountMismatches(got.data(), want_d.data(), 3 * q_row, 1e-5, 1e-5,
                                       scheme + " layer " + std::to_string(layer)),
              0);
  }
}

INSTANTIATE_TEST_SUITE_P(Schemes, SplitShardTest, ::testing::Values("fp16", "kvq3", "int4", "kivi2"));

}  // namespace
}  // namespace kvshard
