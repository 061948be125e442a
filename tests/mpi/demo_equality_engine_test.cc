// The demo model (SmolLM2-135M) with a prompt of over 6,000 tokens of a novel, split over every worker:
// greedy decoding for 128 steps gives exactly the tokens of single-process mode, for the fp16 and kvq3
// KV stores. Run by ctest with 1+2 and 1+4 ranks. The single-process tokens (and kvq3's calibration)
// are computed once and kept in the build folder, keyed by the model file, the prompt and this test's
// build, so the second rank count reuses them.
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "coordinator/distributed_engine.h"
#include "coordinator/engine_factory.h"
#include "coordinator/single_process_engine.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "coordinator/quality.h"
#include "kvstore/calibration.h"
#include "worker/forward.h"
#include "worker/kv_shard_factory.h"
#include "worker/model_loader.h"
#include "worker/mpi_runtime.h"

namespace kvshard {
namespace {

constexpr int64_t kPromptTokens = 6100;
constexpr int kSteps = 128;

std::vector<int32_t> NovelPrompt(const Tokenizer& tokenizer) {
  const std::string dir = testing::TextsDir();
  if (dir.empty()) return {};
  std::ifstream in(std::filesystem::path(dir) / "austen_persuasion.txt", std::ios::binary);
  std::string text(200000, '\0');  // about 45,000 tokens: plenty
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(in.gcount());
  std::vector<int32_t> ids = tokenizer.Encode(text);
  if (static_cast<int64_t>(ids.size()) > kPromptTokens) ids.resize(kPromptTokens);
  return ids;
}

GenerationRequest GreedyRequest(std::vector<int32_t> prompt, const std::string& scheme) {
  GenerationRequest request;
  request.prompt_ids = std::move(prompt);
  request.max_tokens = kSteps;
  request.kv_scheme = scheme;
  return request;
}

// A file in the build folder for what this test computes once: its name holds a hash of `what`, the
// model file and this test binary's build time, so a rebuilt forward pass never meets stale results.
std::filesystem::path CachePath(const std::string& model_path, const std::string& what, const std::string& ext) {
  const auto built = std::filesystem::last_write_time(std::filesystem::read_symlink("/proc/self/exe"));
  const size_t key = std::hash<std::string>()(absl::StrCat(
      model_path, ":", std::filesystem::file_size(model_path), ":", built.time_since_epoch().count(), ":", what));
  return std::filesystem::path(KVSHARD_BINARY_DIR) / "tests" / "mpi" / absl::StrCat("equality_", key, ext);
}

// Single-process tokens, cached for the run with the other rank count.
std::vector<int32_t> ReferenceTokens(const std::string& model_path, const std::string& calibration_path,
                                     const GenerationRequest& request) {
  const std::filesystem::path cache =
      CachePath(model_path,
                absl::StrCat(request.kv_scheme, ":", calibration_path, ":", request.max_tokens, ":",
                             absl::StrJoin(request.prompt_ids, ",")),
                ".tokens");
  if (std::ifstream in(cache); in) {
    std::string line;
    std::getline(in, line);
    std::vector<int32_t> ids;
    for (absl::string_view piece : absl::StrSplit(line, ',', absl::SkipEmpty())) {
      ids.push_back(std::stoi(std::string(piece)));
    }
    return ids;
  }
  EngineOptions options;
  options.device = "cpu";  // the workers' backend
  options.default_kv_scheme = request.kv_scheme;
  auto factory = KvShardFactoryMakerForThisBuild()(calibration_path, nullptr);
  EXPECT_TRUE(factory.ok()) << factory.status();
  if (!factory.ok()) return {};
  options.kv_factory = *factory;
  auto engine = SingleProcessEngine::Create(model_path, options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  auto result = (*engine)->Generate(request, nullptr, nullptr);
  EXPECT_TRUE(result.ok()) << result.status();
  if (!result.ok()) return {};
  std::ofstream(cache) << absl::StrJoin(result->token_ids, ",") << "\n";
  return result->token_ids;
}

void ExpectSameTokensAsSingleProcess(const std::string& model, const std::string& scheme,
                                     const std::string& calibration_path = "") {
  auto description = LoadModelDescription(model, std::nullopt);
  ASSERT_TRUE(description.ok()) << description.status();
  std::vector<int32_t> prompt = NovelPrompt(*description->second);
  if (prompt.empty()) GTEST_SKIP() << "texts not found: set KVSHARD_TEXTS";
  ASSERT_EQ(static_cast<int64_t>(prompt.size()), kPromptTokens);
  const GenerationRequest request = GreedyRequest(std::move(prompt), scheme);
  const std::vector<int32_t> want = ReferenceTokens(model, calibration_path, request);
  ASSERT_FALSE(want.empty());

  DistributedEngineOptions options;
  options.default_kv_scheme = scheme;
  options.worker.model_path = model;
  options.worker.calibration_path = calibration_path;
  auto factory = KvShardFactoryMakerForThisBuild()(calibration_path, nullptr);
  ASSERT_TRUE(factory.ok()) << factory.status();
  options.kv_factory = *factory;
  options.worker.kv_budget_bytes = int64_t{1} << 30;
  options.placement.single_worker_threshold = 0;  // span every worker, whatever the default
  auto engine = DistributedEngine::Create(*MpiRuntime::Get(), std::move(description->first),
                                          std::move(description->second), options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  int64_t prefill_reports = 0;
  auto result = (*engine)->Generate(request, nullptr, [&](const PrefillProgress&) { ++prefill_reports; });
  ASSERT_TRUE(result.ok()) << result.status();
  const std::vector<int32_t>& got = result->token_ids;
  size_t agree = 0;
  while (agree < got.size() && agree < want.size() && got[agree] == want[agree]) ++agree;
  EXPECT_EQ(got, want) << "the first " << agree << " tokens agree";
  std::printf("%s, %d workers: %zu of %zu greedy tokens equal single-process mode; prefill of %lld tokens in %.1f s, "
              "decode %.1f s (%lld prefill chunks)\n",
              scheme.c_str(), (*engine)->n_workers(), agree, want.size(), static_cast<long long>(kPromptTokens),
              result->prefill_seconds, result->decode_seconds, static_cast<long long>(prefill_reports));
  if (want.size() < static_cast<size_t>(kSteps)) {
    std::printf("note: generation stopped after %zu tokens (a stop token)\n", want.size());
  }
}

TEST(DemoEqualityTest, Fp16GreedyTokensEqualSingleProcess) {
  KVSHARD_REQUIRE_DEMO_MODEL(model);
  ExpectSameTokensAsSingleProcess(model, "fp16");
}

// kvq3 needs a calibration of the model: made here from 2,048 tokens of another novel (uniform weights,
// 1% outliers, 3 bits), once per build.
std::string DemoCalibration(const std::string& model) {
  const std::filesystem::path path = CachePath(model, "calibration", ".kvcal");
  if (std::filesystem::exists(path)) return path.string();
  auto weights = LoadModel(model);
  EXPECT_TRUE(weights.ok()) << weights.status();
  if (!weights.ok()) return "";
  auto description = LoadModelDescription(model, std::nullopt);
  EXPECT_TRUE(description.ok()) << description.status();
  if (!description.ok()) return "";
  std::ifstream in(std::filesystem::path(testing::TextsDir()) / "austen_emma.txt", std::ios::binary);
  std::string text(40000, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(in.gcount());
  const std::vector<int32_t> tokens = description->second->Encode(text);
  CpuModel cpu_model(*weights);
  CalibrateOptions options;
  options.ctx = 1024;
  options.max_tokens = 2048;
  options.outlier_fractions = {0.01};
  options.codebook_bits = {3};
  options.show_progress = false;
  auto calibration = CalibrateKv(cpu_model, ModelIdentityOf(*weights), tokens, options);
  EXPECT_TRUE(calibration.ok()) << calibration.status();
  if (!calibration.ok()) return "";
  const absl::Status saved = SaveCalibration(*calibration, path.string());
  EXPECT_TRUE(saved.ok()) << saved;
  return saved.ok() ? path.string() : "";
}

TEST(DemoEqualityTest, Kvq3GreedyTokensEqualSingleProcess) {
  KVSHARD_REQUIRE_DEMO_MODEL(model);
  if (testing::TextsDir().empty()) GTEST_SKIP() << "texts not found: set KVSHARD_TEXTS";
  const std::string calibration = DemoCalibration(model);
  ASSERT_FALSE(calibration.empty());
  ExpectSameTokensAsSingleProcess(model, "kvq3", calibration);
}

}  // namespace
}  // namespace kvshard
