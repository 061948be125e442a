// The GPU forward pass (worker/cuda/gpu_model.h) against the CPU forward pass (worker/forward.h): logits
// of a prompt, then 64 greedy tokens. On a synthetic Llama-shaped model with seeded random weights that
// are exact in bf16 (so both backends hold identical weights), and on the demo model when it is cached;
// with the fp16 KV cache, and with kvq3 in a one-sequence DeviceKvStore as single-process mode holds it.
// Then the single-process engine on the GPU (worker/gpu_backend.h): which schemes it holds there.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common/half.h"
#include "coordinator/byte_tokenizer.h"
#include "coordinator/quality.h"
#include "coordinator/single_process_engine.h"
#include "coordinator/tokenizer.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_shard.h"
#include "tests/model_calibration.h"
#include "tests/test_util.h"
#include "worker/cuda/device_kv_store.h"
#include "worker/cuda/gpu_model.h"
#include "worker/cuda/sequence_context.h"
#include "worker/forward.h"
#include "worker/model_loader.h"
#include "worker/sampler.h"

namespace kvshard {
namespace {

constexpr int kGreedyTokens = 64;

HostTensor RandomTensor(std::vector<int64_t> shape, float lo, float hi, std::mt19937_64& rng) {
  HostTensor t;
  t.shape = std::move(shape);
  std::uniform_real_distribution<float> dist(lo, hi);
  t.data.resize(t.numel());
  for (float& x : t.data) x = Bf16ToFloat(FloatToBf16(dist(rng)));  // exact in bf16
  return t;
}

ModelWeights SyntheticModel(bool qkv_bias, bool tied, uint64_t seed) {
  ModelWeights w;
  ModelConfig& c = w.config;
  c.architecture = "llama";
  c.name = "synthetic";
  c.n_layers = 4;
  c.hidden = 256;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 64;
  c.ffn_hidden = 512;
  c.vocab_size = 2048;
  c.max_context = 4096;
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  c.tied_embeddings = tied;
  c.qkv_bias = qkv_bias;
  std::mt19937_64 rng(seed);
  const int64_t q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
  auto linear = [&](int64_t out, int64_t in) {
    const float a = std::sqrt(3.0f / in);  // unit-variance outputs for unit-variance inputs
    return RandomTensor({out, in}, -a, a, rng);
  };
  w.token_embedding = RandomTensor({c.vocab_size, c.hidden}, -1.0f, 1.0f, rng);
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights L;
    L.attn_norm = RandomTensor({c.hidden}, 0.8f, 1.2f, rng);
    L.ffn_norm = RandomTensor({c.hidden}, 0.8f, 1.2f, rng);
    L.wq = linear(q_dim, c.hidden);
    L.wk = linear(kv_dim, c.hidden);
    L.wv = linear(kv_dim, c.hidden);
    L.wo = linear(c.hidden, q_dim);
    if (qkv_bias) {
      L.bq = RandomTensor({q_dim}, -0.1f, 0.1f, rng);
      L.bk = RandomTensor({kv_dim}, -0.1f, 0.1f, rng);
      L.bv = RandomTensor({kv_dim}, -0.1f, 0.1f, rng);
    }
    L.w_gate = linear(c.ffn_hidden, c.hidden);
    L.w_up = linear(c.ffn_hidden, c.hidden);
    L.w_down = linear(c.hidden, c.ffn_hidden);
    w.layers.push_back(std::move(L));
  }
  w.output_norm = RandomTensor({c.hidden}, 0.8f, 1.2f, rng);
  if (!tied) w.output = linear(c.vocab_size, c.hidden);
  return w;
}

struct Comparison {
  double step0_relative_l2 = 0;   // ||gpu - cpu|| / ||cpu|| of the prompt's last logits
  double step0_max_abs = 0;
  int matched = 0;                // greedy tokens equal before the first divergence
  int first_divergence = -1;      // -1: all kGreedyTokens equal
  double cpu_gap = 0;             // at the divergence: cpu_logit[cpu token] - cpu_logit[gpu token]
  double max_abs_at_divergence = 0;
  double logit_range = 0;         // max - min of the CPU logits at the divergence (or step 0)
  std::vector<float> cpu_step0;   // the CPU's logits of the prompt's last token
  std::vector<float> gpu_step0;   // the GPU's
};

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// Greedy decoding on both backends from the same prompt, with the CLI's repetition penalty when
// `repetition_penalty` != 1; logits of every step (before the penalty) are kept for the report. The KV
// lives in `scheme`: on the CPU a shard of the engines' factory, on the GPU the fp16 cache or (kvq) one
// sequence of a DeviceKvStore. Both prefill in the CPU's chunks, since where a chunk ends decides which
// tokens a kvq store still holds in its fp16 residual window.
Comparison CompareGreedy(const ModelWeights& weights, const std::vector<int32_t>& prompt,
                         float repetition_penalty = 1.0f, const std::string& scheme = "fp16",
                         std::shared_ptr<const Calibration> calibration = nullptr) {
  Comparison result;
  const int vocab = weights.config.vocab_size;

  CpuModel cpu(weights);
  auto shard = AllSchemesKvShardFactory(calibration)(scheme, cpu.kv_geometry(), 0);
  EXPECT_TRUE(shard.ok()) << shard.status();
  if (!shard.ok()) return result;
  ShardAttentionContext cpu_context(**shard);
  std::vector<std::vector<float>> cpu_logits;
  std::vector<int32_t> cpu_tokens;
  std::vector<float> logits;
  for (size_t begin = 0; begin < prompt.size(); begin += CpuModel::max_chunk()) {
    const size_t n = std::min<size_t>(CpuModel::max_chunk(), prompt.size() - begin);
    EXPECT_TRUE(cpu.Forward(std::span<const int32_t>(prompt.data() + begin, n), begin, cpu_context, false, logits).ok());
  }
  SamplingParams greedy_params;
  greedy_params.repetition_penalty = repetition_penalty;
  Sampler greedy(greedy_params);
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int step = 0; step < kGreedyTokens; ++step) {
    cpu_logits.push_back(logits);
    const int32_t token = greedy.Sample(logits.data(), vocab);
    greedy.Accept(token);
    cpu_tokens.push_back(token);
    EXPECT_TRUE(cpu.Forward(std::span<const int32_t>(&token, 1), pos++, cpu_context, false, logits).ok());
  }

  GpuModelOptions gpu_options;
  gpu_options.max_chunk = CpuModel::max_chunk();
  auto gpu = GpuModel::Create(weights, gpu_options);
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (!gpu.ok()) return result;
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + kGreedyTokens + 1;
  std::unique_ptr<GpuKvCache> cache;
  std::unique_ptr<DeviceKvStore> store;
  std::unique_ptr<StoreSequenceContext> sequence;
  GpuAttentionContext* context = nullptr;
  if (scheme == "fp16") {
    auto made = GpuKvCache::Create((*gpu)->kv_geometry(), capacity);
    EXPECT_TRUE(made.ok()) << made.status();
    if (!made.ok()) return result;
    cache = std::move(*made);
    context = cache.get();
  } else {
    auto config = ParseKvScheme(scheme);
    EXPECT_TRUE(config.ok()) << config.status();
    if (!config.ok()) return result;
    // As single-process mode makes it (worker/cuda/gpu_backend.cc).
    auto made = DeviceKvStore::Create((*gpu)->kv_geometry(), *config, calibration.get(),
                                      OneSequenceStoreOptions(capacity, gpu_options.max_chunk));
    EXPECT_TRUE(made.ok()) << made.status();
    if (!made.ok()) return result;
    store = std::move(*made);
    const absl::Status added = store->AddSequence(0, 0, capacity);
    EXPECT_TRUE(added.ok()) << added;
    if (!added.ok()) return result;
    sequence = std::make_unique<StoreSequenceContext>(*store, 0, weights.config.n_heads);
    context = sequence.get();
  }
  TokenSampling sampling;  // greedy
  sampling.repetition_penalty = repetition_penalty;
  std::vector<int32_t> recent;  // Sampler's window of accepted tokens
  std::vector<std::vector<float>> gpu_logits;
  std::vector<int32_t> gpu_tokens;
  absl::StatusOr<int32_t> next = -1;
  for (size_t begin = 0; begin < prompt.size(); begin += (*gpu)->max_chunk()) {
    const size_t n = std::min<size_t>((*gpu)->max_chunk(), prompt.size() - begin);
    next = (*gpu)->Forward(std::span<const int32_t>(prompt.data() + begin, n), begin, *context, &sampling, &logits);
    EXPECT_TRUE(next.ok()) << next.status();
    if (!next.ok()) return result;
  }
  pos = static_cast<int64_t>(prompt.size());
  for (int step = 0; step < kGreedyTokens; ++step) {
    gpu_logits.push_back(logits);
    gpu_tokens.push_back(*next);
    const int32_t token = *next;
    recent.push_back(token);
    if (recent.size() > static_cast<size_t>(greedy_params.repetition_window)) recent.erase(recent.begin());
    sampling.step = step + 1;
    next = (*gpu)->Forward(std::span<const int32_t>(&token, 1), pos++, *context, &sampling, &logits, recent);
    EXPECT_TRUE(next.ok()) << next.status();
    if (!next.ok()) return result;
  }

  if (store != nullptr) {
    const absl::Status health = store->Health(0);
    EXPECT_TRUE(health.ok()) << health;
  }
  result.cpu_step0 = cpu_logits[0];
  result.gpu_step0 = gpu_logits[0];
  result.step0_relative_l2 = testing::RelativeL2(gpu_logits[0].data(), cpu_logits[0]);
  result.step0_max_abs = MaxAbsDiff(gpu_logits[0], cpu_logits[0]);
  int step = 0;
  while (step < kGreedyTokens && cpu_tokens[step] == gpu_tokens[step]) ++step;
  result.matched = step;
  const int at = step < kGreedyTokens ? step : 0;
  const auto [lo, hi] = std::minmax_element(cpu_logits[at].begin(), cpu_logits[at].end());
  result.logit_range = *hi - *lo;
  if (step < kGreedyTokens) {
    result.first_divergence = step;
    result.cpu_gap = cpu_logits[step][cpu_tokens[step]] - cpu_logits[step][gpu_tokens[step]];
    result.max_abs_at_divergence = MaxAbsDiff(gpu_logits[step], cpu_logits[step]);
    std::printf("  first divergence at greedy step %d: CPU token %d, GPU token %d\n", step, cpu_tokens[step],
                gpu_tokens[step]);
  }
  std::printf("  step 0 logits: relative L2 %.3g, max |diff| %.4g; greedy: %d/%d equal; logit range %.3g\n",
              result.step0_relative_l2, result.step0_max_abs, result.matched, kGreedyTokens, result.logit_range);
  if (result.first_divergence >= 0) {
    std::printf("  at the divergence: CPU margin of its token over the GPU's %.4g, max |logit diff| %.4g\n",
                result.cpu_gap, result.max_abs_at_divergence);
  }
  return result;
}

// Checks shared by both models. The GPU rounds each GEMM input (weights and activations) to bf16, 2^-9
// relative; through a few layers that keeps the logits within ~1e-2 relative (L2) of the fp32 CPU pass
// (bf16 operands: between 1e-3 and 1e-2). A greedy divergence is acceptable only as a near-tie: the CPU's
// margin between the two tokens is smaller than the logit deviation at that step, which itself is at the
// rounding level of step 0.
void ExpectAgreement(const Comparison& r, double max_relative_l2) {
  EXPECT_LE(r.step0_relative_l2, max_relative_l2);
  if (r.first_divergence >= 0) {
    EXPECT_LE(r.cpu_gap, 2 * r.max_abs_at_divergence) << "not a near-tie";
    EXPECT_LE(r.max_abs_at_divergence, 3 * r.step0_max_abs + 1e-3) << "deviation grew beyond rounding level";
  }
}

class GpuModelTest : public ::testing::Test {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_F(GpuModelTest, SyntheticModelMatchesCpu) {
  const ModelWeights weights = SyntheticModel(/*qkv_bias=*/false, /*tied=*/false, 1);
  std::vector<int32_t> prompt(700);  // two prefill chunks of the GPU model (512 + 188)
  std::mt19937_64 rng(2);
  for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % weights.config.vocab_size);
  ExpectAgreement(CompareGreedy(weights, prompt), 2e-2);
}

TEST_F(GpuModelTest, SyntheticModelWithBiasAndTiedEmbeddingsMatchesCpu) {
  const ModelWeights weights = SyntheticModel(/*qkv_bias=*/true, /*tied=*/true, 3);
  std::vector<int32_t> prompt(37);
  std::mt19937_64 rng(4);
  for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % weights.config.vocab_size);
  ExpectAgreement(CompareGreedy(weights, prompt, /*repetition_penalty=*/1.3f), 2e-2);
}

TEST_F(GpuModelTest, DemoModelGreedyTokensMatchCpu) {
  KVSHARD_REQUIRE_DEMO_MODEL(model_path);
  auto weights = LoadModel(model_path);
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto gguf = GgufFile::Open(model_path);
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  auto tokenizer = Tokenizer::FromGguf(**gguf);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const std::string text =
      "<|im_start|>user\nSummarize the following text.\n\nThe GNU General Public License is a free, copyleft "
      "license for software and other kinds of works. The licenses for most software and other practical works "
      "are designed to take away your freedom to share and change the works. By contrast, the GNU General Public "
      "License is intended to guarantee your freedom to share and change all versions of a program--to make "
      "sure it remains free software for all its users.<|im_end|>\n<|im_start|>assistant\n";
  const std::vector<int32_t> prompt = (*tokenizer)->Encode(text, /*parse_special=*/true);
  ASSERT_GT(prompt.size(), 50u);
  const Comparison r = CompareGreedy(*weights, prompt, /*repetition_penalty=*/1.1f);  // the CLI default
  // 30 layers of bf16 rounding of Q4_1-dequantized weights (not exact in bf16) and activations.
  ExpectAgreement(r, 5e-2);
}


// kvq3 as single-process mode holds it on the GPU, against a CPU kvq3 shard. The store holds the CPU
// packer's codes for the same inputs, but the GPU's bf16 GEMMs move some keys and values across 3-bit
// code boundaries, and the change grows through the layers. So the bound is a share of what kvq3 itself
// does to the logits (the CPU's kvq3 against its fp16), as tests/mpi/gpu_workers_test.cc bounds the GPU
// workers: a store that lost the quantization would sit near 1 of it, and the GPU's kvq3 must also lie
// that far from fp16. (H100: the GPU's kvq3 lay 0.40 of the effect from the CPU's, its fp16 0.08.)
TEST_F(GpuModelTest, SyntheticModelKvq3MatchesCpuKvq3) {
  const ModelWeights weights = SyntheticModel(/*qkv_bias=*/false, /*tied=*/false, 1);
  std::vector<int32_t> prompt(700);  // two prefill chunks (512 + 188)
  std::mt19937_64 rng(2);
  for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % weights.config.vocab_size);
  const std::shared_ptr<const Calibration> calibration = testing::ModelKvq3Calibration(weights);
  ASSERT_NE(calibration, nullptr);
  const Comparison fp16 = CompareGreedy(weights, prompt, 1.0f, "fp16");
  const Comparison kvq3 = CompareGreedy(weights, prompt, 1.0f, "kvq3", calibration);
  ASSERT_FALSE(kvq3.cpu_step0.empty());
  const double effect = testing::RelativeL2(kvq3.cpu_step0.data(), fp16.cpu_step0);
  const double bound = 0.6 * effect;
  const double gpu_effect = testing::RelativeL2(kvq3.gpu_step0.data(), fp16.cpu_step0);
  std::printf("  kvq3 against fp16 on the CPU: relative L2 %.3g; GPU kvq3 against CPU kvq3 %.3g (bound %.3g), "
              "against CPU fp16 %.3g\n",
              effect, kvq3.step0_relative_l2, bound, gpu_effect);
  EXPECT_GT(effect, 4 * fp16.step0_relative_l2) << "kvq3's effect must stand out of bf16 rounding";
  EXPECT_LE(kvq3.step0_relative_l2, bound);
  EXPECT_GE(gpu_effect, 0.5 * effect) << "the GPU's store did not quantize";
  if (kvq3.first_divergence >= 0) {
    EXPECT_LE(kvq3.cpu_gap, 2 * kvq3.max_abs_at_divergence) << "not a near-tie";
  }
}

// Single-process mode on a GPU: fp16 and (with a calibration) kvq3 requests run there, with the KV gauge
// showing the running request's store; other schemes run on the CPU; an unknown one is refused.
TEST_F(GpuModelTest, SingleProcessEngineHoldsKvq3OnTheGpu) {
  ModelWeights weights = SyntheticModel(/*qkv_bias=*/false, /*tied=*/false, 1);
  const int vocab = weights.config.vocab_size;
  EngineOptions options;
  options.device = "gpu";
  options.calibration = testing::ModelKvq3Calibration(weights);
  ASSERT_NE(options.calibration, nullptr);
  options.kv_factory = AllSchemesKvShardFactory(options.calibration);
  auto tokenizer = MakeByteTokenizer(vocab);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto engine = SingleProcessEngine::Create(std::move(weights), std::move(*tokenizer), options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  SingleProcessEngine& e = **engine;
  ASSERT_TRUE(e.has_gpu());

  std::mt19937_64 rng(11);
  const auto run = [&](const std::string& scheme, int prompt_tokens, WorkerKvMemory* during) {
    GenerationRequest request;
    request.prompt_ids.resize(prompt_tokens);
    for (int32_t& id : request.prompt_ids) id = static_cast<int32_t>(rng() % vocab);
    request.max_tokens = 16;
    request.kv_scheme = scheme;
    return e.Generate(
        request,
        [&](int32_t, const std::string&) {
          if (during != nullptr) *during = e.kv_memory()[0];
          return true;
        },
        nullptr);
  };
  for (const auto& [scheme, prompt_tokens] : std::vector<std::pair<std::string, int>>{
           {"kvq3", 300}, {"fp16", 300}, {"kvq3", 200}, {"kvq3", 1500}}) {
    SCOPED_TRACE(scheme + ", prompt " + std::to_string(prompt_tokens));
    WorkerKvMemory during;
    auto result = run(scheme, prompt_tokens, &during);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->kv_scheme, scheme);
    EXPECT_FALSE(result->token_ids.empty());
    EXPECT_EQ(e.device_name().rfind("CPU", 0), std::string::npos) << e.device_name();
    EXPECT_EQ(during.scheme, scheme);
    EXPECT_GT(during.bytes_used, 0);
    // kvq3 at these lengths: 3-bit codes plus the fp16 sink and 32-token residual, outliers and scales.
    const double bits = during.bits_per_element;
    if (scheme == "kvq3") {
      EXPECT_GT(bits, 3.0);
      EXPECT_LT(bits, 8.0);
    } else {
      EXPECT_DOUBLE_EQ(bits, 16.0);
    }
    std::printf("  %s, prompt %d: %.3f bits per element, %lld bytes\n", scheme.c_str(), prompt_tokens, bits,
                static_cast<long long>(during.bytes_used));
    EXPECT_EQ(e.kv_memory()[0].bytes_used, 0) << "the gauge still counts a finished request";
  }
  auto kivi = run("kivi2", 100, nullptr);
  ASSERT_TRUE(kivi.ok()) << kivi.status();
  EXPECT_EQ(e.device_name().rfind("CPU", 0), 0u) << "kivi2 has no GPU store: " << e.device_name();
  auto unknown = run("kvq9", 100, nullptr);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument) << unknown.status();
}

// CUDA graphs (GpuModelOptions::graph_rows) replay the same kernels on the same buffers, so the logits of
// every pass equal those of stream launches bit for bit. The prompt goes in chunks of 1..18 tokens, more
// row counts than the model holds graphs for, so sets are evicted and captured again (decode: 1 row).
TEST_F(GpuModelTest, GraphsReplayTheSameLogits) {
  const ModelWeights weights = SyntheticModel(/*qkv_bias=*/true, /*tied=*/false, 7);
  GpuModelOptions eager_options, graph_options;
  eager_options.graph_rows = 0;
  graph_options.graph_rows = 64;
  auto eager = GpuModel::Create(weights, eager_options);
  auto graphed = GpuModel::Create(weights, graph_options);
  ASSERT_TRUE(eager.ok()) << eager.status();
  ASSERT_TRUE(graphed.ok()) << graphed.status();
  constexpr int kChunks = 18, kSteps = 20;
  const int64_t prompt_tokens = kChunks * (kChunks + 1) / 2;
  auto eager_cache = GpuKvCache::Create((*eager)->kv_geometry(), prompt_tokens + kSteps);
  auto graph_cache = GpuKvCache::Create((*graphed)->kv_geometry(), prompt_tokens + kSteps);
  ASSERT_TRUE(eager_cache.ok() && graph_cache.ok());
  std::mt19937_64 rng(8);
  std::vector<int32_t> tokens(prompt_tokens + kSteps);
  for (int32_t& id : tokens) id = static_cast<int32_t>(rng() % weights.config.vocab_size);
  int64_t position = 0, passes = 0, unequal_passes = 0;
  const auto pass = [&](int n) {
    const std::span<const int32_t> chunk(tokens.data() + position, n);
    std::vector<float> expected, actual;
    ASSERT_TRUE((*eager)->Forward(chunk, position, **eager_cache, nullptr, &expected).ok());
    ASSERT_TRUE((*graphed)->Forward(chunk, position, **graph_cache, nullptr, &actual).ok());
    ASSERT_EQ(expected.size(), actual.size());
    int64_t unequal = 0;
    for (size_t i = 0; i < expected.size(); ++i) unequal += std::memcmp(&expected[i], &actual[i], 4) != 0;
    if (unequal > 0) {
      ++unequal_passes;
      std::printf("  pass at position %lld (%d rows): %lld of %zu logits differ, max |diff| %.3g\n",
                  static_cast<long long>(position), n, static_cast<long long>(unequal), expected.size(),
                  MaxAbsDiff(expected, actual));
    }
    position += n;
    ++passes;
  };
  for (int n = 1; n <= kChunks; ++n) pass(n);
  for (int step = 0; step < kSteps; ++step) pass(1);
  EXPECT_EQ(unequal_passes, 0) << "of " << passes << " passes";
  EXPECT_EQ((*eager)->graph_sets(), 0);
  EXPECT_EQ((*graphed)->graph_sets(), 16);  // kMaxGraphSets
}

TEST_F(GpuModelTest, RefusesWhatDoesNotFit) {
  ModelWeights weights = SyntheticModel(false, true, 5);
  // A KV cache far beyond any GPU's memory is refused with the sizes, not an out-of-memory crash.
  auto gpu = GpuModel::Create(weights, GpuModelOptions{});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cache = GpuKvCache::Create((*gpu)->kv_geometry(), int64_t{1} << 40);
  ASSERT_FALSE(cache.ok());
  EXPECT_EQ(cache.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(cache.status().message()).find("GPU has"), std::string::npos) << cache.status();
  // A request longer than the cache is refused at the append.
  auto small = GpuKvCache::Create((*gpu)->kv_geometry(), 64);
  ASSERT_TRUE(small.ok());
  std::vector<int32_t> tokens(65, 1);
  TokenSampling sampling;
  auto next = (*gpu)->Forward(tokens, 0, **small, &sampling, nullptr);
  EXPECT_EQ(next.status().code(), absl::StatusCode::kResourceExhausted) << next.status();
  // A model whose weights exceed the GPU is refused at load, naming the bytes needed and free.
  weights.config.n_layers = 1;
  weights.layers.resize(1);
  weights.config.vocab_size = 1 << 30;  // 1G x 256 bf16 = 512 GiB of embeddings
  auto huge = GpuModel::Create(weights, GpuModelOptions{});
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  std::printf("  refusal: %s\n", std::string(huge.status().message()).c_str());
}

}  // namespace
}  // namespace kvshard
