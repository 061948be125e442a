// KvSettingsFromFlags: --kv_scheme auto and the calibration found beside the model.
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "coordinator/engine_factory.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

ABSL_DECLARE_FLAG(std::string, kv_scheme);
ABSL_DECLARE_FLAG(std::string, calibration);

namespace kvshard {
namespace {

class KvSettingsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(testing::FreshTempDir("kv_settings"));
    model_ = (dir_ / "model.gguf").string();
    std::ofstream(model_) << "weights";
    absl::SetFlag(&FLAGS_kv_scheme, "auto");
    absl::SetFlag(&FLAGS_calibration, "");
  }
  void TearDown() override {
    absl::SetFlag(&FLAGS_kv_scheme, "auto");
    absl::SetFlag(&FLAGS_calibration, "");
  }
  std::filesystem::path dir_;
  std::string model_;
};

TEST_F(KvSettingsTest, AutoIsFp16WithoutACalibrationAndSaysHowToMakeOne) {
  auto kv = KvSettingsFromFlags(model_);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ(kv->scheme, "fp16");
  EXPECT_EQ(kv->calibration_path, "");
  EXPECT_NE(kv->note.find("kvshard calibrate"), std::string::npos) << kv->note;
  EXPECT_NE(kv->note.find(model_ + ".kvcal"), std::string::npos) << kv->note;
}

TEST_F(KvSettingsTest, AutoIsKvq3WithTheCalibrationBesideTheModel) {
  std::ofstream(model_ + ".kvcal") << "calibration";
  auto kv = KvSettingsFromFlags(model_);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ(kv->scheme, "kvq3");
  EXPECT_EQ(kv->calibration_path, model_ + ".kvcal");
  EXPECT_NE(kv->note.find(model_ + ".kvcal"), std::string::npos) << kv->note;
}

TEST_F(KvSettingsTest, ExplicitSettingsWin) {
  std::ofstream(model_ + ".kvcal") << "calibration";
  const std::string other = (dir_ / "other.kvcal").string();
  absl::SetFlag(&FLAGS_kv_scheme, "int4");
  absl::SetFlag(&FLAGS_calibration, other);
  auto kv = KvSettingsFromFlags(model_);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ(kv->scheme, "int4");
  EXPECT_EQ(kv->calibration_path, other);
  EXPECT_EQ(kv->note, "");
}

TEST_F(KvSettingsTest, HuggingFaceDirectoryAndSyntheticModel) {
  EXPECT_EQ(DefaultCalibrationPath(dir_.string()), (dir_ / "kvshard.kvcal").string());
  auto kv = KvSettingsFromFlags("");  // a synthetic model: nothing to look for, nothing to say
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ(kv->scheme, "fp16");
  EXPECT_EQ(kv->note, "");
}

}  // namespace
}  // namespace kvshard
