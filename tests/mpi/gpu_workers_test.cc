// GPU workers (worker/gpu_worker.h) on the workers of `mpirun -np 1+N`, one GPU each (rank 0 is the
// coordinator and runs nothing): a context sharded over every worker is prefilled chunk by chunk with
// pass-Q over NCCL, then decoded in a batch with a request that lives on worker 0 only. The logits of
// every step must match one CPU shard holding the whole context (CpuModel, a store of the same scheme:
// fp16, or kvq3 with the same calibration) within the rounding of the GPU's bf16 activations. The weights are exact in bf16, so both backends hold the
// same model; the tokens are fixed, so the comparison never follows a divergence. Skips when the
// machine has fewer GPUs than workers (CI has none).
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "coordinator/quality.h"
#include "gtest/gtest.h"
#include "kernels/sampling.h"
#include "kvstore/quantized_shard.h"
#include "tests/model_calibration.h"
#include "tests/test_util.h"
#include "worker/forward.h"
#include "worker/gpu_worker.h"
#include "worker/mpi_runtime.h"
#include "worker/synthetic.h"

namespace kvshard {
namespace {

constexpr int64_t kPrompt = 700;      // request A: spans every worker
constexpr int64_t kShortPrompt = 45;  // request B: worker 0 only
constexpr int kSteps = 12;
constexpr int kChunk = 256;
// ||gpu - cpu|| / ||cpu|| of the logits: the GPU forward pass rounds activations to bf16 before every
// GEMM (tests/gpu/gpu_model_test.cc measures about 1e-2 for one GPU).
constexpr double kMaxRelativeL2 = 3e-2;
// kvq3: the GPU store holds the CPU packer's codes for the same inputs, but the bf16 differences move
// some keys and values across a code boundary (3-bit codes are coarse), and the change grows through the
// layers. So the bound is relative to what quantization itself does to this model: the GPU's kvq3
// logits must lie much nearer the CPU's kvq3 logits than the CPU's kvq3 logits lie to its fp16 ones
// (2× H200: about 0.2 of it; a store that dropped the quantization would be at about 1).
constexpr double kMaxShareOfQuantizationEffect = 0.35;

void RoundToBf16(HostTensor& t) {
  for (float& x : t.data) x = Bf16ToFloat(FloatToBf16(x));
}

ModelWeights Bf16ExactSyntheticModel() {
  SyntheticModelSpec spec;
  spec.n_layers = 3;
  spec.hidden = 256;
  spec.n_heads = 8;
  spec.n_kv_heads = 2;
  spec.head_dim = 64;
  spec.ffn_hidden = 512;
  spec.vocab_size = 512;
  spec.seed = 9;
  auto weights = MakeSyntheticModel(spec);
  EXPECT_TRUE(weights.ok()) << weights.status();
  ModelWeights w = std::move(*weights);
  RoundToBf16(w.token_embedding);
  RoundToBf16(w.output_norm);
  RoundToBf16(w.output);
  for (LayerWeights& L : w.layers) {
    for (HostTensor* t : {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.wo, &L.ffn_norm, &L.w_gate, &L.w_up, &L.w_down}) {
      RoundToBf16(*t);
    }
  }
  return w;
}

using testing::RelativeL2;

int32_t PromptToken(int64_t i, int64_t salt) { return static_cast<int32_t>((i * 131 + salt * 17 + 7) % 512); }


// The logits of the last prompt token and of every decode step of one request, on one CPU shard.
std::vector<std::vector<float>> ReferenceLogits(const ModelWeights& weights, const std::string& scheme,
                                                const Calibration* calibration, int64_t prompt, int64_t salt) {
  CpuModel model(weights);
  auto config = ParseKvScheme(scheme);
  EXPECT_TRUE(config.ok()) << config.status();
  auto shard = MakeKvShard(*config, model.kv_geometry(), 0, calibration);
  EXPECT_TRUE(shard.ok()) << shard.status();
  if (!shard.ok()) return {};
  ShardAttentionContext context(**shard);
  std::vector<std::vector<float>> out;
  std::vector<float> logits;
  for (int64_t begin = 0; begin < prompt; begin += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, prompt - begin);
    std::vector<int32_t> tokens(n);
    for (int64_t i = 0; i < n; ++i) tokens[i] = PromptToken(begin + i, salt);
    EXPECT_TRUE(model.Forward(tokens, begin, context, false, logits).ok());
  }
  out.push_back(logits);
  for (int step = 0; step < kSteps; ++step) {
    const int32_t token = PromptToken(prompt + step, salt);
    EXPECT_TRUE(model.Forward(std::span<const int32_t>(&token, 1), prompt + step, context, false, logits).ok());
    out.push_back(logits);
  }
  return out;
}

// Why this machine cannot run the job's workers, one GPU each; empty when it can.
std::string TooFewGpus() {
  const int workers = MpiRuntime::Get()->n_workers(), gpus = GpuWorker::DeviceCount();
  if (gpus >= workers) return "";
  return absl::StrCat(workers, " workers need as many GPUs; this machine has ", gpus);
}

// A worker's GPU (by its rank), a small KV budget, and with `kvq3` the model's kvq3 calibration.
GpuWorkerOptions SmallWorkerOptions(const Collectives& workers, const ModelWeights& weights, bool kvq3) {
  GpuWorkerOptions options;
  options.device = workers.rank() % GpuWorker::DeviceCount();
  if (kvq3) options.calibration = testing::ModelKvq3Calibration(weights);
  options.collective_timeout = absl::Seconds(60);
  options.kv_budget_bytes = int64_t{256} << 20;
  return options;
}

struct WorkerTestCase {
  MergeMode merge;
  std::string scheme;
};

class GpuWorkerTest : public ::testing::TestWithParam<WorkerTestCase> {};

TEST_P(GpuWorkerTest, ShardedPrefillAndBatchedDecodeMatchOneCpuShard) {
  if (const std::string why = TooFewGpus(); !why.empty()) GTEST_SKIP() << why;
  auto mpi = MpiRuntime::Get()->MakeWorkerCollectives(absl::Seconds(120));
  ASSERT_TRUE(mpi.ok()) << mpi.status();
  const int me = (*mpi)->rank(), n_workers = (*mpi)->size();
  const ModelWeights weights = Bf16ExactSyntheticModel();
  const std::string scheme = GetParam().scheme;
  const bool kvq = scheme != "fp16";
  GpuWorkerOptions options = SmallWorkerOptions(**mpi, weights, kvq);
  options.merge.mode = GetParam().merge;
  auto gpu = GpuWorker::Create(weights, **mpi, options);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const int vocab = weights.config.vocab_size;

  // Request A's ranges: contiguous and even; the last worker also takes the decoded tokens.
  constexpr int64_t kA = 1, kB = 2;
  std::vector<int64_t> begin(n_workers + 1);
  for (int w = 0; w <= n_workers; ++w) begin[w] = kPrompt * w / n_workers;
  const int64_t my_end = me == n_workers - 1 ? kPrompt + kSteps : begin[me + 1];
  ASSERT_TRUE((*gpu)->AddRequest(kA, scheme, begin[me], my_end - begin[me]).ok());
  if (me == 0) {
    ASSERT_TRUE((*gpu)->AddRequest(kB, scheme, 0, kShortPrompt + kSteps).ok());
  }

  const Calibration* calibration = options.calibration.get();
  const std::vector<std::vector<float>> want_a = ReferenceLogits(weights, scheme, calibration, kPrompt, kA);
  const std::vector<std::vector<float>> want_b = ReferenceLogits(weights, scheme, calibration, kShortPrompt, kB);
  ASSERT_EQ(want_a.size(), kSteps + 1);
  ASSERT_EQ(want_b.size(), kSteps + 1);
  // The bound per request: fp16's, or a share of the quantization's own effect on the CPU.
  double bound_a = kMaxRelativeL2, bound_b = kMaxRelativeL2;
  if (kvq) {
    const auto fp16_a = ReferenceLogits(weights, "fp16", nullptr, kPrompt, kA);
    const auto fp16_b = ReferenceLogits(weights, "fp16", nullptr, kShortPrompt, kB);
    double effect_a = 0, effect_b = 0;
    for (int i = 0; i <= kSteps; ++i) {
      effect_a = std::max(effect_a, RelativeL2(want_a[i].data(), fp16_a[i]));
      effect_b = std::max(effect_b, RelativeL2(want_b[i].data(), fp16_b[i]));
    }
    bound_a = std::max(kMaxRelativeL2, kMaxShareOfQuantizationEffect * effect_a);
    bound_b = std::max(kMaxRelativeL2, kMaxShareOfQuantizationEffect * effect_b);
    if (me == 0) {
      std::printf("%s against fp16 on the CPU (worst step): A %.2e, B %.2e; bounds %.2e, %.2e\n", scheme.c_str(),
                  effect_a, effect_b, bound_a, bound_b);
    }
  }

  // Prefill A: chunks that never straddle two workers' ranges, each on its owner with pass-Q.
  for (int owner = 0; owner < n_workers; ++owner) {
    for (int64_t first = begin[owner]; first < begin[owner + 1]; first += kChunk) {
      const int64_t n = std::min<int64_t>(kChunk, begin[owner + 1] - first);
      std::vector<int> sources;
      for (int w = 0; w < owner; ++w) sources.push_back(w);
      absl::Status error;
      if (me == owner) {
        std::vector<int32_t> tokens(n);
        for (int64_t i = 0; i < n; ++i) tokens[i] = PromptToken(first + i, kA);
        std::vector<float> logits;
        const bool last = first + n == kPrompt;
        ASSERT_TRUE((*gpu)->PrefillOwner(kA, tokens, first, sources, false, {}, last ? &logits : nullptr, &error).ok());
        EXPECT_TRUE(error.ok()) << error;
        if (last) {
          const double rel = RelativeL2(logits.data(), want_a[0]);
          std::printf("worker %d: request A's prompt logits, relative L2 %.2e\n", me, rel);
          EXPECT_LE(rel, bound_a);
        }
      } else if (me < owner) {
        ASSERT_TRUE((*gpu)->PrefillSource(kA, owner, static_cast<int>(n), first, false, {}, &error).ok());
        EXPECT_TRUE(error.ok()) << error;
      }
    }
    // As the worker runtime does: a full range that is not the sequence's tail is sealed.
    if (me == owner && owner < n_workers - 1) {
      ASSERT_TRUE((*gpu)->Seal(kA).ok());
    }
  }
  if (me == 0) {  // request B: one worker, no sources
    std::vector<int32_t> tokens(kShortPrompt);
    for (int64_t i = 0; i < kShortPrompt; ++i) tokens[i] = PromptToken(i, kB);
    std::vector<float> logits;
    absl::Status error;
    ASSERT_TRUE((*gpu)->PrefillOwner(kB, tokens, 0, {}, false, {}, &logits, &error).ok());
    EXPECT_TRUE(error.ok()) << error;
    EXPECT_LE(RelativeL2(logits.data(), want_b[0]), bound_b);
  }

  // Batched decode of A and B: every worker runs both rows.
  double worst_a = 0, worst_b = 0;
  for (int step = 0; step < kSteps; ++step) {
    std::vector<GpuDecodeRow> rows(2);
    rows[0] = {kA, PromptToken(kPrompt + step, kA), kPrompt + step, true, me == n_workers - 1, false, {}, {}};
    rows[1] = {kB, PromptToken(kShortPrompt + step, kB), kShortPrompt + step, me == 0, me == 0, false, {}, {}};
    const std::vector<bool> want_logits = {me == n_workers - 1, me == 0};
    // The rows whose logits come back are also drawn on the device: greedy, or at a temperature with
    // top-k and top-p (odd steps), under a repetition penalty over two earlier prompt ids.
    const std::vector<int32_t> recent = {PromptToken(step, kA), PromptToken(step + 1, kB)};
    TokenSampling draw;
    draw.repetition_penalty = 1.3f;
    draw.seed = 7;
    draw.step = static_cast<uint64_t>(step);
    if (step % 2 == 1) {
      draw.temperature = 0.8f;
      draw.top_k = 40;
      draw.top_p = 0.9f;
    }
    for (int r = 0; r < 2; ++r) {
      if (!want_logits[r]) continue;
      rows[r].draw = draw;
      rows[r].recent = recent;
    }
    std::vector<float> logits;
    std::vector<int32_t> drawn;
    std::vector<absl::Status> errors;
    double merge_seconds = 0;
    int64_t merges = 0;
    ASSERT_TRUE((*gpu)->Decode(rows, want_logits, {}, &logits, &drawn, &errors, &merge_seconds, &merges).ok());
    EXPECT_TRUE(errors[0].ok() && errors[1].ok()) << errors[0] << " " << errors[1];
    EXPECT_EQ(merges, n_workers > 1 ? weights.config.n_layers : 0);  // one worker has nothing to merge
    if (want_logits[0]) worst_a = std::max(worst_a, RelativeL2(logits.data(), want_a[step + 1]));
    if (want_logits[1]) worst_b = std::max(worst_b, RelativeL2(logits.data() + vocab, want_b[step + 1]));
    for (int r = 0; r < 2; ++r) {
      if (!want_logits[r]) {
        EXPECT_EQ(drawn[r], -1);
        continue;
      }
      // The CPU twin on the same logits (returned before the penalty) picks the same token, unless the
      // draw fell within rounding of a boundary (kernels/sampling.h).
      std::vector<float> penalized(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
      ApplyRepetitionPenaltyCpu(penalized.data(), vocab, recent.data(), static_cast<int>(recent.size()), 1.3f);
      const SampledToken want = SampleTokenCpu(penalized.data(), vocab, draw);
      if (want.margin > 1e-5) {
        EXPECT_EQ(drawn[r], want.token) << "row " << r << " step " << step;
      }
    }
  }
  std::printf("worker %d of %d, %s, merge %s: worst relative L2 of decode logits: A %.2e, B %.2e\n", me,
              n_workers, scheme.c_str(), MergeModeName(GetParam().merge).c_str(), worst_a, worst_b);
  EXPECT_LE(worst_a, bound_a);
  EXPECT_LE(worst_b, bound_b);
  EXPECT_EQ((*gpu)->length(kA), my_end - begin[me]);
  const KvMemory memory = (*gpu)->Memory();
  EXPECT_GT(memory.bytes, 0);
  if (kvq) {
    std::printf("worker %d: %s store, %.2f bits per element\n", me, scheme.c_str(), memory.bits_per_element());
    EXPECT_LT(memory.bits_per_element(), 16.0);
  } else {
    EXPECT_DOUBLE_EQ(memory.bits_per_element(), 16.0);
  }
}

INSTANTIATE_TEST_SUITE_P(MergeModesAndSchemes, GpuWorkerTest,
                         ::testing::Values(WorkerTestCase{MergeMode::kAllGather, "fp16"},
                                           WorkerTestCase{MergeMode::kTree, "fp16"},
                                           WorkerTestCase{MergeMode::kAllGather, "kvq3"},
                                           WorkerTestCase{MergeMode::kTree, "kvq3"}),
                         [](const ::testing::TestParamInfo<WorkerTestCase>& info) {
                           return MergeModeName(info.param.merge) + "_" + info.param.scheme;
                         });

// One scheme at a time: a worker holding requests refuses another scheme, and an idle one remakes its store.
TEST(GpuWorkerSchemes, AnIdleWorkerTakesAnotherScheme) {
  if (const std::string why = TooFewGpus(); !why.empty()) GTEST_SKIP() << why;
  auto mpi = MpiRuntime::Get()->MakeWorkerCollectives(absl::Seconds(120));
  ASSERT_TRUE(mpi.ok()) << mpi.status();
  const ModelWeights weights = Bf16ExactSyntheticModel();
  auto gpu = GpuWorker::Create(weights, **mpi, SmallWorkerOptions(**mpi, weights, /*kvq3=*/true));
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  ASSERT_TRUE((*gpu)->AddRequest(1, "fp16", 0, 300).ok());
  const absl::Status other = (*gpu)->AddRequest(2, "kvq3", 0, 300);
  EXPECT_TRUE(absl::IsInvalidArgument(other)) << other;
  EXPECT_NE(other.message().find("one KV scheme at a time"), std::string::npos) << other;
  EXPECT_TRUE((*gpu)->Holds(1));
  EXPECT_FALSE((*gpu)->Holds(2));
  (*gpu)->RemoveRequest(1);
  const absl::Status kvq3 = (*gpu)->AddRequest(3, "kvq3", 0, 300);
  ASSERT_TRUE(kvq3.ok()) << kvq3;
  EXPECT_TRUE((*gpu)->Holds(3));
  EXPECT_FALSE((*gpu)->Holds(1));
  (*gpu)->RemoveRequest(3);
  EXPECT_TRUE((*gpu)->AddRequest(4, "fp16", 0, 300).ok());
}

}  // namespace
}  // namespace kvshard
