// KV quality tools on the demo model: perplexity with quantized stores, calibration from activations,
// Fisher weight files, and `kvshard calibrate` / `kvshard perplexity` refusing bad input.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "common/half.h"
#include "coordinator/quality.h"
#include "gtest/gtest.h"
#include "kvstore/quantized_shard.h"
#include "tests/test_util.h"
#include "worker/model_loader.h"

namespace kvshard {
namespace {

std::filesystem::path TempDir() {
  static const std::filesystem::path dir = testing::FreshTempDir("quality");
  return dir;
}

std::string WriteTemp(const std::string& name, const std::string& bytes) {
  const auto path = TempDir() / name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path.string();
}

// The demo model, loaded once for the whole test program.
const ModelWeights* DemoWeights() {
  static const ModelWeights* weights = []() -> const ModelWeights* {
    const std::string path = testing::DemoModelPath();
    if (path.empty()) return nullptr;
    auto w = LoadModel(path);
    if (!w.ok()) return nullptr;
    return new ModelWeights(std::move(*w));
  }();
  return weights;
}

#define REQUIRE_WEIGHTS(var)                                                                    \
  const ModelWeights* var = DemoWeights();                                                      \
  if (var == nullptr) GTEST_SKIP() << "demo model not found: run deploy/fetch-demo-model.sh or set KVSHARD_MODEL"

std::vector<int32_t> SomeTokens(int64_t n) {
  // A deterministic token stream of ordinary ids (no text needed): a repeating sentence-like pattern.
  std::vector<int32_t> ids;
  const int32_t pattern[] = {504, 1789, 282, 260, 2117, 28, 357, 253, 1193, 30, 378, 1166, 314, 7294, 281, 3185};
  for (int64_t i = 0; i < n; ++i) ids.push_back(pattern[(i * 7 + i / 16) % 16]);
  return ids;
}

TEST(Perplexity, QuantizedSchemesStayCloseToFp16) {
  REQUIRE_WEIGHTS(weights);
  CpuModel model(*weights);
  const std::vector<int32_t> tokens = SomeTokens(2 * 96 + 5);
  PerplexityOptions options;
  options.ctx = 96;
  options.show_progress = false;
  auto fp16 = EvaluatePerplexity(model, tokens, *ParseKvScheme("fp16"), nullptr, options);
  ASSERT_TRUE(fp16.ok()) << fp16.status();
  EXPECT_EQ(fp16->windows, 2);
  EXPECT_EQ(fp16->scored_tokens, 2 * 95);
  EXPECT_DOUBLE_EQ(fp16->bits_per_element, 16.0);
  EXPECT_GT(fp16->perplexity, 1.0);
  auto int8 = EvaluatePerplexity(model, tokens, *ParseKvScheme("int8"), nullptr, options);
  ASSERT_TRUE(int8.ok()) << int8.status();
  EXPECT_NEAR(int8->perplexity / fp16->perplexity, 1.0, 0.01);
  EXPECT_NEAR(int8->bits_per_element, 8.5, 1e-9);
  auto kivi = EvaluatePerplexity(model, tokens, *ParseKvScheme("kivi4:residual=16,group=16"), nullptr, options);
  ASSERT_TRUE(kivi.ok()) << kivi.status();
  EXPECT_NEAR(kivi->perplexity / fp16->perplexity, 1.0, 0.1);
}

TEST(Perplexity, RefusesTextShorterThanOneWindow) {
  REQUIRE_WEIGHTS(weights);
  CpuModel model(*weights);
  PerplexityOptions options;
  options.ctx = 64;
  auto r = EvaluatePerplexity(model, SomeTokens(63), *ParseKvScheme("fp16"), nullptr, options);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("shorter than one window"), std::string::npos) << r.status();
}

TEST(Calibrate, TablesFromActivationsAndTheirModelCheck) {
  REQUIRE_WEIGHTS(weights);
  CpuModel model(*weights);
  const ModelIdentity id = ModelIdentityOf(*weights);
  EXPECT_EQ(id.n_layers, weights->config.n_layers);
  CalibrateOptions options;
  options.ctx = 64;
  options.max_tokens = 128;
  options.outlier_fractions = {0.01};
  options.codebook_bits = {3};
  options.show_progress = false;
  auto cal = CalibrateKv(model, id, SomeTokens(150), options);
  ASSERT_TRUE(cal.ok()) << cal.status();
  EXPECT_EQ(cal->tokens, 128);
  EXPECT_EQ(cal->weighting, "uniform");
  EXPECT_TRUE(CheckCalibrationForModel(*cal, id).ok());
  const auto& cb = cal->layers[3].kvq[0].key_codebooks[0];
  ASSERT_EQ(cb.size(), 8u);
  for (size_t i = 1; i < cb.size(); ++i) EXPECT_LT(cb[i - 1], cb[i]);
  EXPECT_GE(cb.front(), -1.0f);
  EXPECT_LE(cb.back(), 1.0f);
  // A store built on it works with the model.
  PerplexityOptions popt;
  popt.ctx = 64;
  popt.show_progress = false;
  auto kvq = EvaluatePerplexity(model, SomeTokens(64), *ParseKvScheme("kvq3"), &*cal, popt);
  ASSERT_TRUE(kvq.ok()) << kvq.status();
  EXPECT_TRUE(std::isfinite(kvq->perplexity));

  ModelIdentity other = id;
  other.name = "SomeOtherModel";
  EXPECT_FALSE(CheckCalibrationForModel(*cal, other).ok());
}

TEST(FisherWeights, LoadsTheScriptFormatAndRefusesCorruptFiles) {
  std::string bytes = "KVSHFSH\n";
  auto put = [&](const void* p, size_t n) { bytes.append(static_cast<const char*>(p), n); };
  const uint32_t version = 1;
  const int32_t layers = 2, channels = 3;
  const int64_t tokens = 4, ctx = 2;
  put(&version, 4);
  put(&layers, 4);
  put(&channels, 4);
  put(&tokens, 8);
  put(&ctx, 8);
  for (int32_t t = 0; t < tokens; ++t) put(&t, 4);
  for (int l = 0; l < layers; ++l)
    for (int part = 0; part < 2; ++part)
      for (int i = 0; i < tokens * channels; ++i) {
        const uint16_t w = FloatToBf16(static_cast<float>(l * 100 + part * 10 + i));
        put(&w, 2);
      }
  auto fw = LoadFisherWeights(WriteTemp("fisher.bin", bytes));
  ASSERT_TRUE(fw.ok()) << fw.status();
  EXPECT_EQ(fw->n_layers, 2);
  EXPECT_EQ(fw->channels, 3);
  EXPECT_EQ(fw->ctx, 2);
  EXPECT_EQ(fw->tokens, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(Bf16ToFloat(fw->value[1][5]), 115.0f);
  auto bad = LoadFisherWeights(WriteTemp("fisher_short.bin", bytes.substr(0, bytes.size() - 1)));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("size"), std::string::npos) << bad.status();
  EXPECT_FALSE(LoadFisherWeights(WriteTemp("fisher_magic.bin", "XXXXXXXX" + bytes.substr(8))).ok());
}

// The binary on bad input: one line on stderr naming the problem, non-zero exit.
struct CliResult {
  int exit_code = -1;
  std::string err;
};
CliResult RunKvshard(const std::string& args) {
  const std::string err = (TempDir() / "stderr.txt").string();
  const std::string command = "timeout 300 " + std::string(KVSHARD_BINARY_DIR) + "/kvshard " + args +
                              " >/dev/null 2>" + err + " </dev/null";
  const int status = std::system(command.c_str());
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream e(err);
  r.err.assign(std::istreambuf_iterator<char>(e), {});
  return r;
}
void ExpectCleanError(const CliResult& r, const std::string& needle) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(r.exit_code, 124) << "crashed or timed out: " << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(QualityCli, RefusesBadInput) {
  const std::string text = WriteTemp("short.txt", "Only a few words here.");
  ExpectCleanError(RunKvshard("perplexity --text " + text + " --kv kvq9"), "out of range");
  ExpectCleanError(RunKvshard("perplexity --text " + text + " --kv nuq3"), "unknown KV scheme");
  ExpectCleanError(RunKvshard("calibrate --synthetic_model --text " + text), "needs --out");
  ExpectCleanError(RunKvshard("calibrate --synthetic_model --out x.kvcal --device tpu"), "--device must be auto, gpu or cpu");
  ExpectCleanError(RunKvshard("calibrate --synthetic_model --calibrate_on_fill --out x.kvcal --text " + text), "give one");
  // A fill calibration must not replace MODEL.kvcal, the calibration of real text (refused before the model).
  ExpectCleanError(RunKvshard("calibrate --calibrate_on_fill"), "needs --out");
  ExpectCleanError(RunKvshard("perplexity --text " + text + " --kv fp16 --device tpu"), "--device must be auto, gpu or cpu");
  // Another command's flag is refused with the one that does the job, not ignored.
  ExpectCleanError(RunKvshard("perplexity --text " + text + " --max_tokens 100"), "--max_eval_tokens");
  ExpectCleanError(RunKvshard("calibrate --synthetic_model --out x.kvcal --text " + text + " --max_tokens 100"),
                   "--calibration_tokens");
  // The config file holds every command's settings: a max_tokens there is not refused (the run goes on to
  // the next check).
  const std::string config = WriteTemp("generation.yaml", "max_tokens: 100\n");
  ExpectCleanError(RunKvshard("perplexity --config " + config + " --text " + text + " --kv kvq9"), "out of range");
  ExpectCleanError(RunKvshard("perplexity --text " + text + " --kv kvq3 --calibration " +
                              WriteTemp("corrupt.kvcal", "KVSHCAL\nrubbish")),
                   "calibration file");
}

// SYNTHETIC FILL's keys are not the model's, so runs that fill a context with kvq need a calibration of
// the fill; a real model gets one for its own identity.
TEST(QualityCli, CalibratesARealModelOnTheSyntheticFill) {
  REQUIRE_WEIGHTS(weights);
  const std::string out = (TempDir() / "fill.kvcal").string();
  const CliResult r = RunKvshard("calibrate --model " + testing::DemoModelPath() +
                                 " --calibrate_on_fill --calibration_tokens 256 --device cpu --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("256 tokens of SYNTHETIC FILL"), std::string::npos) << r.err;
  auto calibration = LoadCalibration(out);
  ASSERT_TRUE(calibration.ok()) << calibration.status();
  EXPECT_TRUE(CheckCalibrationForModel(*calibration, ModelIdentityOf(*weights)).ok());
  EXPECT_EQ(calibration->tokens, 256);
}

TEST(QualityCli, RefusesShortTextAndForeignCalibration) {
  REQUIRE_WEIGHTS(weights);
  const std::string model = testing::DemoModelPath();
  const std::string text = WriteTemp("short.txt", "Only a few words here.");
  ExpectCleanError(RunKvshard("perplexity --model " + model + " --text " + text + " --ctx 64 --kv int4"),
                   "shorter than one window");
  ExpectCleanError(RunKvshard("calibrate --model " + model + " --text " + text + " --ctx 64 --out " +
                              (TempDir() / "x.kvcal").string()),
                   "shorter than one window");
  // No --calibration and none beside the model (a link to it in a folder of its own): the error says
  // how to make one and where it will be found.
  const std::filesystem::path alone = std::filesystem::path(testing::FreshTempDir("quality_uncalibrated")) / "model.gguf";
  std::filesystem::create_symlink(model, alone);
  ExpectCleanError(RunKvshard("perplexity --model " + alone.string() + " --text " + text + " --kv kvq3"),
                   "kvshard calibrate --text FILE`, which writes " + alone.string() + ".kvcal");
  // A calibration made for another model (same geometry, other name and fingerprint).
  Calibration other;
  other.model = ModelIdentityOf(*weights);
  other.model.name = "another-model";
  other.model.fingerprint ^= 0x5a5a;
  other.weighting = "uniform";
  other.outlier_fractions = {0.01};
  other.codebook_bits = {3};
  other.layers.resize(other.model.n_layers);
  const int64_t channels = static_cast<int64_t>(other.model.n_kv_heads) * other.model.head_dim;
  for (auto& l : other.layers) {
    l.kvq.resize(1);
    l.kvq[0].key_low.assign(channels, -1.0f);
    l.kvq[0].key_high.assign(channels, 1.0f);
    l.kvq[0].key_codebooks = {std::vector<float>(8, 0.0f)};
    l.kvq[0].value_codebooks = {std::vector<float>(8, 0.0f)};
    l.key_shift = l.key_scale = l.value_shift = l.value_scale = std::vector<float>(channels, 1.0f);
  }
  const std::string path = (TempDir() / "other.kvcal").string();
  ASSERT_TRUE(SaveCalibration(other, path).ok());
  ExpectCleanError(
      RunKvshard("perplexity --model " + model + " --text " + text + " --ctx 64 --kv kvq3 --calibration " + path),
      "another-model");
}

}  // namespace
}  // namespace kvshard
